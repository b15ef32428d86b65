"""Check every run of a command before anything trains: one module per thing checked,
``preflight.preflight`` runs them all."""
