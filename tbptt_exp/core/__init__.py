"""The core: config schema -> corpus -> layout -> engine -> measurements, as plain data.

It imports NumPy, TensorFlow and Keras only (never Hydra or MLflow), so it can be driven
from a notebook, and the app on top passes every value down to it.
"""
