"""tbptt-exp: sweep, track and size truncated-BPTT training of stateful LSTMs.

``tbptt_exp.core`` trains (no Hydra, no MLflow); ``tbptt_exp.app`` configures, sweeps
and tracks on top of it.
"""

__version__ = "0.1.0"
