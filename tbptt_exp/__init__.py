"""tbptt-exp: sweep, track and size truncated-BPTT training of stateful LSTMs."""

import os

# TensorFlow's C++ start-up chatter hides the progress lines users want to read.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
