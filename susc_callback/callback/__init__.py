"""The Hugging Face Trainer callback, its schedule and the DDP collectives it needs."""
