"""Optuna studies: the search space, trials over a shared storage, the study's report."""
