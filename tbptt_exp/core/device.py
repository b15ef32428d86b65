"""The training device's settings, which TensorFlow accepts only before it initialises.

Called first by every process that trains (a job, a batch-size probe), before anything
else touches TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Callable

from tbptt_exp.core.config import DeviceConfig


def prepare_tensorflow() -> None:
    """Settings TensorFlow reads once, when it loads; no effect once it has loaded.

    - oneDNN on: its CPU allocator keeps the statistics that ``get_memory_info('CPU:0')``
      reports, so a CPU run's peak memory is measured the way a GPU run's is (TensorFlow
      leaves oneDNN off by default on some x86 CPUs, and then has no CPU peak to give).
    - TensorFlow's C++ start-up chatter hidden.
    """
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _native_stderr_held():
    """Hold what native code writes to file descriptor 2 while the block runs; drop it if
    the block succeeds, write it out if it fails (so a failed load still explains itself)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_tensorflow():
    """Import TensorFlow and Keras and find the devices, quietly when asked.

    TensorFlow 2.21 logs through absl before absl is initialised, and such lines (oneDNN
    and CUDA notices, ``cuInit`` failures on a machine without a GPU) ignore
    ``TF_CPP_MIN_LOG_LEVEL``; with the level at 3 (the harness's default console) they are
    held back here. Later errors still surface as Python exceptions.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        import tensorflow as tf

        return tf
    with _native_stderr_held():
        import keras  # noqa: F401  (loads a second native library that logs the same notices)
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA's start-up lines come here
    return tf


def configure_device(cfg: DeviceConfig, say: Callable[[str], None] = print) -> None:
    """GPU memory cap or growth, as ``cfg`` asks; ``say`` explains what had no effect."""
    tf = load_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        if cfg.memory_limit_mb is not None:
            say(f"device.memory_limit_mb={cfg.memory_limit_mb} has no effect: there is no GPU")
        return
    try:
        if cfg.memory_limit_mb is not None:
            tf.config.set_logical_device_configuration(
                gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=cfg.memory_limit_mb)]
            )
        elif cfg.memory_growth:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        # A later job of an in-process sweep: the GPU kept the first job's settings.
        say("device settings unchanged: the GPU was initialised by an earlier job in this process "
            "(use hydra/launcher=joblib for a process per job)")
