"""Measurements: training-device memory from TensorFlow's allocator, process RSS, timing.

TensorFlow's allocator reports current/peak bytes for ``GPU:0`` and, on TF 2.21, for
``CPU:0`` as well, so a CPU run is measured by the same code path as a GPU run.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import tensorflow as tf

MB = 1024 * 1024


def training_device() -> str:
    """The device TensorFlow places training on: the first GPU, else the CPU."""
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


def device_description() -> dict[str, str]:
    """Name and memory of the training device, for tags and fingerprints.

    GPU memory is the card's total from NVML (``nvidia-ml-py``, in the ``gpu`` extra);
    on a CPU it is the host's memory.
    """
    device = training_device()
    if not device.startswith("GPU"):
        import platform

        import psutil

        name = platform.processor() or platform.machine() or "cpu"
        return {"device": device, "device_name": f"CPU {name}", "device_memory_mb": f"{psutil.virtual_memory().total / MB:.0f}"}
    gpu = tf.config.list_physical_devices("GPU")[0]
    name = tf.config.experimental.get_device_details(gpu).get("device_name", "GPU")
    try:
        import pynvml

        pynvml.nvmlInit()
        total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total / MB
        memory = f"{total:.0f}"
    except Exception:  # no NVML: the name still identifies the card
        memory = "unknown"
    return {"device": device, "device_name": name, "device_memory_mb": memory}


def reset_peak_memory(device: str) -> None:
    try:
        tf.config.experimental.reset_memory_stats(device)
    except (ValueError, tf.errors.InvalidArgumentError):
        pass  # an allocator without stats: peak_memory_mb() then reports nothing


def peak_memory_mb(device: str) -> float:
    """Peak bytes TensorFlow's allocator held on ``device`` since the last reset, in MiB."""
    try:
        return tf.config.experimental.get_memory_info(device)["peak"] / MB
    except (ValueError, tf.errors.InvalidArgumentError):
        return float("nan")


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (Linux reports KiB), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class EpochTiming:
    """Wall-clock marks of one epoch's executions.

    The first execution (tracing and compilation in epoch 1, host-side start-up in every
    epoch) is timed on its own and left out of the steady-state throughput.
    """

    start: float = 0.0
    first_done: float = 0.0
    end: float = 0.0
    executions: int = 0

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    @property
    def first_execution_s(self) -> float:
        return self.first_done - self.start

    @property
    def steady_s(self) -> float:
        return self.end - self.first_done

    @property
    def wall_s(self) -> float:
        return self.end - self.start
