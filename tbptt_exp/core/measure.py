"""Measurements, defined once for training runs, batch-size probes and nightly entries.

- **Throughput.** An epoch's executions are timed in windows of at least ``WINDOW_S``
  seconds, each closed by one host sync. The first execution (tracing and compilation in
  epoch 1, start-up in every epoch) is left out. ``tokens_per_s`` is the median over the
  windows of *real* tokens per second; ``padded_tokens_per_s`` the median of *all*
  timesteps computed per second (real + padding, so it is never below ``tokens_per_s``);
  ``tokens_per_s_spread`` the interquartile range of the windows' real-token rates (None
  with a single window: one sample carries no spread).
- **Peak memory.** TensorFlow's allocator peak on the training device since the run
  started (``reset_peak_memory`` at the start of a run; training and validation both
  count). TensorFlow reports ``GPU:0`` and, with oneDNN on, ``CPU:0`` through the same call,
  so a CPU run is measured like a GPU run. A device that reports nothing gives None
  ("unknown"), never a number that could pass a budget.
- **Peak RSS.** The process's resident-set high-water mark since the run started (Linux
  resets it per run through ``/proc/self/clear_refs``; elsewhere the process lifetime).
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

MB = 1024 * 1024
WINDOW_S = 0.5  # a throughput window closes at the first execution this long after the last

DEFINITIONS = {  # what each figure means, for the people reading it (a run's MLflow description)
    "tokens_per_s": "real tokens per second: the median over steady-state windows of at least "
                    f"{WINDOW_S} s, the first execution (compilation) left out",
    "tokens_per_s_spread": "the interquartile range of those windows' real-token rates",
    "padded_tokens_per_s": "all timesteps computed per second, real and padding (never below tokens_per_s)",
    "padding_waste": "the padded share of all timesteps computed",
    "peak_memory_mb": "TensorFlow's allocator peak on the training device since the run started, "
                      "training and validation included",
    "peak_rss_mb": "the process's resident-set high-water mark since the run started",
}


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
        pass  # an allocator without stats: peak_memory_mb() then reports None


def peak_memory_mb(device: str) -> float | None:
    """Peak bytes TensorFlow's allocator held on ``device`` since the last reset, in MiB;
    None when the allocator keeps no statistics."""
    try:
        return tf.config.experimental.get_memory_info(device)["peak"] / MB
    except (ValueError, tf.errors.InvalidArgumentError):
        return None


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> None:
    """Start a new resident-set high-water mark (Linux: write 5 to clear_refs)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: peak_rss_mb() falls back to the process lifetime


def peak_rss_mb() -> float:
    """Resident-set high-water mark since ``reset_peak_rss`` (else the process lifetime), MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class EpochTiming:
    """Wall-clock marks of one epoch: its start, and (time, batches done) at each sync.

    The first mark closes the first execution; each later one closes a throughput window.
    An engine calls ``due()`` after each execution and, when it says so, syncs with the
    device and calls ``mark``; ``finish`` marks the end.
    """

    start: float = field(default_factory=time.perf_counter)
    marks: list[tuple[float, int]] = field(default_factory=list)

    def due(self) -> bool:
        return not self.marks or time.perf_counter() - self.marks[-1][0] >= WINDOW_S

    def mark(self, batches_done: int) -> None:
        if not self.marks or batches_done > self.marks[-1][1]:
            self.marks.append((time.perf_counter(), batches_done))

    def finish(self, batches_done: int) -> None:
        self.mark(batches_done)

    @property
    def first_execution_s(self) -> float:
        return self.marks[0][0] - self.start

    @property
    def steady_s(self) -> float:
        return self.marks[-1][0] - self.marks[0][0]

    @property
    def wall_s(self) -> float:
        return self.marks[-1][0] - self.start

    @property
    def batches(self) -> int:
        return self.marks[-1][1]


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float  # real tokens per second: median over windows
    padded_tokens_per_s: float  # all timesteps (real + padding) per second: median over windows
    tokens_per_s_spread: float | None  # interquartile range of the windows' real-token rates
    windows: int


def throughput(timing: EpochTiming, real_per_batch: np.ndarray, total_per_batch: int) -> Throughput:
    """Steady-state rates of one epoch from its marks; ``real_per_batch[i]`` is batch i's real
    tokens (batch counts past the layout's length go round it again).

    With a single execution there is no steady state: the whole epoch is one window.
    """
    within = np.concatenate([[0], np.cumsum(real_per_batch, dtype=np.float64)])
    n = len(real_per_batch)

    def done(b: int) -> float:  # real tokens in the first b batches (a timed run may go round again)
        return (b // n) * within[n] + within[b % n]

    marks = timing.marks if len(timing.marks) > 1 else [(timing.start, 0), *timing.marks]
    real_rates, all_rates = [], []
    for (t0, b0), (t1, b1) in zip(marks, marks[1:]):
        dt = t1 - t0
        if dt > 0:
            real_rates.append((done(b1) - done(b0)) / dt)
            all_rates.append((b1 - b0) * total_per_batch / dt)
    if not real_rates:
        return Throughput(math.nan, math.nan, None, 0)
    spread = None
    if len(real_rates) >= 2:
        q1, _, q3 = statistics.quantiles(real_rates, n=4, method="inclusive")
        spread = q3 - q1
    return Throughput(statistics.median(real_rates), statistics.median(all_rates), spread, len(real_rates))
