"""Sweeps: grids over config keys, run as one run directory per point."""
