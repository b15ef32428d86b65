"""The app: the Hydra entry point, MLflow runs, sweeps and the drivers built on the core.

Data flows down: the app builds one validated config, calls the core, and records what
comes back. Nothing in ``tbptt_exp.core`` imports from here.
"""
