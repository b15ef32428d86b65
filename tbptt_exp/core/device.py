"""The training device's settings, which TensorFlow accepts only before it initialises.

Called first by every process that trains (a job, a batch-size probe), before anything
else touches TensorFlow.
"""

from __future__ import annotations

import os
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


def configure_device(cfg: DeviceConfig, say: Callable[[str], None] = print) -> None:
    """GPU memory cap or growth, as ``cfg`` asks; ``say`` explains what had no effect."""
    import tensorflow as tf

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
