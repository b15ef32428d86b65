"""The nightly benchmark: entries, the baseline and the regression report."""
