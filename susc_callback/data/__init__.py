"""Inputs: probe sets, sampling data and per-token losses."""
