"""Model components: named sets of parameter entries, and the built-in layouts of Hugging
Face causal LMs."""
