"""Batch-size probes: a real, shortened training run at one batch size, each in a process of
its own forked from a server that imported TensorFlow once."""
