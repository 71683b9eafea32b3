"""Susceptibility estimates: the engine that runs the chains, the streaming sums, the result."""
