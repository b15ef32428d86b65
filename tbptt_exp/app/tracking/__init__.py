"""A run's record: its MLflow run, liveness, stores, provenance and saved views."""
