"""Hydra sweeps: the link from a job to its parent run, and the sweep's summary."""
