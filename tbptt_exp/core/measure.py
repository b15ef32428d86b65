"""Measurements, defined once for training runs, batch-size probes and nightly entries,
and the registry of every figure the harness reports.

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

``FIGURES`` names each figure once: its field name (records, objectives, nightly files,
sweep tables), its MLflow name, how it is shown, which way is better and what it means.
Everything else (objectives, nightly thresholds, MLflow names, tables, descriptions) is
derived from it, so a new figure is one entry here plus the code that measures it.
TensorFlow is imported only by the functions that ask it, so the config can read the
registry without loading it.
"""

from __future__ import annotations

import itertools
import math
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

MB = 1024 * 1024
PROBE_SECTION = "probe/"  # MLflow's section of a batch-size probe's metrics, logged at step = its batch size
WINDOW_S = 0.5  # a throughput window closes at the first execution this long after the last


@dataclass(frozen=True)
class Figure:
    """One reported figure."""

    name: str  # the field name: in records, objectives, nightly results and sweep tables
    mlflow: str  # MLflow's name; its section (``loss/``, ``speed/``...) groups the UI's charts
    definition: str  # what it means, for the people reading it (a run's MLflow description)
    fmt: str = ",.4g"  # format spec of one value
    unit: str = ""
    label: str = ""  # a plot's axis title; the name and unit when empty
    higher_is_better: bool = False
    objective: bool = False  # a sweep or a study may optimise it
    sweep_table: bool = False  # a column of a sweep's results table and a ``best/`` metric of its parent
    probe: bool = False  # a batch-size probe reports it

    def show(self, value: float | None, unit: bool = False) -> str:
        """``value`` as a person reads it; ``unknown`` for a figure the device does not report."""
        if value is None:
            return "unknown"
        text = format(value, self.fmt)
        return f"{text} {self.unit}" if unit and self.unit else text

    @property
    def probe_metric(self) -> str:
        """MLflow's name for this figure of a batch-size probe (``probe/allocator_peak_mb``)."""
        return PROBE_SECTION + self.mlflow.rsplit("/", 1)[-1]

    @property
    def axis(self) -> str:
        return self.label or self.name + (f" ({self.unit})" if self.unit else "")


PEAK_MEMORY = Figure(
    "peak_memory_mb", "memory/allocator_peak_mb",
    "TensorFlow's allocator peak on the training device since the run started, training and validation included",
    fmt=",.1f", unit="MB", label="allocator peak (MB)", objective=True, sweep_table=True, probe=True)
REAL_TOKENS = Figure(
    "tokens_per_s", "speed/real_tokens_per_s",
    f"real tokens per second: the median over steady-state windows of at least {WINDOW_S} s, each closed by one "
    "host sync, the first execution (compilation) left out",
    fmt=",.0f", unit="tokens/s", label="real tokens/s", higher_is_better=True, objective=True,
    sweep_table=True, probe=True)
REAL_TOKENS_SPREAD = Figure(
    "tokens_per_s_spread", "speed/real_tokens_per_s_iqr",
    "the interquartile range of those windows' real-token rates (absent with a single window)",
    fmt=",.0f", unit="tokens/s", probe=True)
GOODPUT = Figure(
    "goodput", "batch/goodput_tokens_per_s",
    "real tokens per second times their statistical efficiency against trainer.reference_batch_size, "
    "(B_noise + B_ref) / (B_noise + B): training progress per second, in tokens of the reference batch",
    fmt=",.0f", unit="tokens/s", label="goodput (reference tokens/s)", higher_is_better=True)
NOISE_SCALE = Figure(
    "gradient_noise_scale", "optim/gradient_noise_scale",
    "the gradient noise scale B_noise = tr(Σ)/|G|² in streams (McCandlish et al. 2018): the ratio of exponential "
    "averages of two-batch estimates from the halves of a batch's rows, every trainer.noise_scale_every steps "
    "(engine=graph); about the critical batch at this point of training, growing as the loss falls",
    fmt=",.1f", unit="streams")
VAL_LOSS = Figure(
    "val_loss", "loss/val", "the loss per weighted validation step, state carried as in training: "
    "cross-entropy (nats) for classes, squared error of standardised targets for regression",
    fmt=".4f", objective=True, sweep_table=True)
TRAINING_TIME = Figure(
    "training_time_s", "time/training_s", "the run's training wall time, every epoch's (validation left out)",
    fmt=".1f", unit="s")
TOKENS_TRAINED = Figure(
    "tokens_trained", "time/real_tokens_trained", "the real tokens the run trained on, over every epoch",
    fmt=",.0f", unit="tokens")
OVER_BUDGET = Figure(
    "peak_memory_over_budget_mb", "memory/over_budget_mb",
    "the allocator peak less device.memory_budget_mb (negative: within the budget)", fmt=",.1f", unit="MB")

EPOCH_TIME = Figure(
    "epoch_time_s", "speed/epoch_time_s", "the epoch's training wall time (layout and validation left out)",
    fmt=".1f", unit="s", objective=True)
COMPILE_TIME = Figure(
    "compile_time_s", "speed/compile_time_s", "the run's first execution: tracing and compilation", fmt=".1f", unit="s")
VAL_ACCURACY = Figure(
    "val_accuracy", "loss/val_accuracy",
    "the share of weighted validation steps whose most likely class is the target (classification)",
    fmt=".4f", higher_is_better=True, objective=True, sweep_table=True)
PEAK_RSS = Figure(
    "peak_rss_mb", "memory/process_rss_peak_mb",
    "the process's resident-set high-water mark since the run started", fmt=",.0f", unit="MB")
MAX_BATCH = Figure(
    "max_batch_size", "batch/max",
    "the largest batch size that fits, verified: the next size up was probed and is too big "
    "(0: not even the smallest fits)", fmt="d", higher_is_better=True)
RECOMMENDED_BATCH = Figure(
    "recommended_batch_size", "batch/recommended",
    "the largest probed batch size whose peak leaves batch_finder.headroom of the budget free",
    fmt="d", higher_is_better=True)
CRITICAL_BATCH = Figure(
    "critical_batch_size", "batch/critical",
    "the gradient noise scale, rounded: about the critical batch in streams, past which a larger batch "
    "buys tokens/s but hardly fewer steps", fmt="d")
USEFUL_BATCH = Figure(
    "useful_batch_size", "batch/useful",
    "the probed batch size of highest goodput, never above the largest that fits: the largest batch that "
    "trains well (0: unknown, no noise scale)", fmt="d", higher_is_better=True)

FIGURES: dict[str, Figure] = {f.name: f for f in (
    VAL_LOSS,
    Figure("train_loss", "loss/train", "the loss per weighted step of the epoch's training batches",
           fmt=".4f", objective=True, sweep_table=True),
    Figure("val_bits_per_char", "loss/val_bits_per_char", "the validation loss in bits per character (text)",
           fmt=".3f", unit="bits/char"),
    VAL_ACCURACY,
    Figure("val_rmse", "loss/val_rmse", "root mean squared error of the validation targets, in their own units "
           "(regression)", fmt=".4g", objective=True, sweep_table=True),
    Figure("val_mae", "loss/val_mae", "mean absolute error of the validation targets, in their own units "
           "(regression)", fmt=".4g", objective=True),
    Figure("baseline_accuracy", "reference/val_accuracy", "val_accuracy of always predicting the training "
           "targets' majority class: what a model that learned nothing scores", fmt=".4f", higher_is_better=True),
    Figure("baseline_rmse", "reference/val_rmse", "val_rmse of the better naive guess: the training mean, or the "
           "previous step's target", fmt=".4g"),
    Figure("baseline_mae", "reference/val_mae", "val_mae of that same naive guess", fmt=".4g"),
    REAL_TOKENS,
    REAL_TOKENS_SPREAD,
    Figure("padded_tokens_per_s", "speed/all_tokens_per_s",
           "all timesteps computed per second, real and padding (never below tokens_per_s)",
           fmt=",.0f", unit="tokens/s", higher_is_better=True, probe=True),
    PEAK_MEMORY,
    PEAK_RSS,
    EPOCH_TIME,
    Figure("first_execution_s", "speed/first_execution_s", "the epoch's first execution, timed on its own",
           fmt=".1f", unit="s"),
    Figure("validation_time_s", "speed/validation_time_s", "the epoch's validation pass, timed on its own",
           fmt=".1f", unit="s"),
    NOISE_SCALE,
    Figure("steps", "optim/steps", "the optimizer steps (batches) the epoch trained: fewer as the batch grows",
           fmt=",.0f"),
    TRAINING_TIME,
    TOKENS_TRAINED,
    Figure("time_to_target_s", "time/to_target_s", "training time until the first validation at or below "
           "trainer.target_val_loss (absent: not reached)", fmt=".1f", unit="s"),
    Figure("tokens_to_target", "time/real_tokens_to_target", "real tokens trained until that validation",
           fmt=",.0f", unit="tokens"),
    COMPILE_TIME,
    Figure("padding_waste", "padding/waste", "the padded share of all timesteps computed",
           fmt=".1%", sweep_table=True),
    Figure("num_params", "model/num_params", "the model's parameter count", fmt=",.0f"),
    Figure("tracking_overhead_s", "tracking/overhead_s", "seconds spent recording metrics to MLflow", fmt=".2f",
           unit="s"),
    OVER_BUDGET,
    MAX_BATCH,
    RECOMMENDED_BATCH,
    CRITICAL_BATCH,
    USEFUL_BATCH,
    GOODPUT,
    Figure("probes", "batch/probes", "the probe runs the search took", fmt="d"),
)}
OBJECTIVES = tuple(f.name for f in FIGURES.values() if f.objective)
PROBE_FIGURES = tuple(f for f in FIGURES.values() if f.probe)
SWEEP_TABLE = tuple(f for f in FIGURES.values() if f.sweep_table)
# What the noise scale's warm-up reports: the scale and the point of training it was measured at.
WARMUP_FIGURES = (NOISE_SCALE, VAL_LOSS, REAL_TOKENS, REAL_TOKENS_SPREAD, TRAINING_TIME, TOKENS_TRAINED)


def mlflow_names(figures: dict[str, float | None]) -> dict[str, float | None]:
    """Figures by field name -> by MLflow name; a name the registry lacks is an error."""
    return {FIGURES[name].mlflow: value for name, value in figures.items()}


def rate_text(rate: float | None, spread: float | None) -> str:
    """Real tokens per second with their noise, ``32,812 ± 562``: ± half the interquartile
    range of the windows (nothing with a single window)."""
    noise = "" if spread is None else f" ± {REAL_TOKENS_SPREAD.show(spread / 2)}"
    return REAL_TOKENS.show(rate) + noise


def over_budget_mb(record, budget_mb: float | None) -> float | None:
    """The peak memory of ``record`` (an epoch's or a probe's figures) above ``budget_mb``;
    negative: within it. None without a budget, or where the device reports no peak."""
    peak = record.peak_memory_mb
    return None if budget_mb is None or peak is None else peak - budget_mb


def training_device() -> str:
    """The device TensorFlow places training on: the first GPU, else the CPU."""
    import tensorflow as tf

    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


def device_description() -> dict[str, str]:
    """Name and memory of the training device, for tags and fingerprints.

    GPU memory is the card's total from NVML (``nvidia-ml-py``, in the ``gpu`` extra);
    on a CPU it is the host's memory.
    """
    import tensorflow as tf

    device = training_device()
    if not device.startswith("GPU"):
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
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats(device)
    except (ValueError, tf.errors.InvalidArgumentError):
        pass  # an allocator without stats: peak_memory_mb() then reports None


CPU_REGION_BUDGETS = 2  # the CPU allocator's first region, in budgets: the peak a budget is checked against fits in it


def steady_cpu_peak(budget_mb: float | None, device: str) -> None:
    """On a CPU with a memory budget, give TensorFlow's allocator one region of twice the
    budget before the model is built. Its BFC allocator otherwise grows region by region as
    the first execution runs, and how the pieces fall depends on timing: the finder's largest
    size at a 300 MB budget ranged 288-320 over seven runs, 328-352 over six with the region
    (B=328 read 277-285 MB; ``benchmarks/RESULTS.md``). The region is reserved, not
    written, so resident memory does not grow by it; it is at most half the host's memory. A
    GPU's allocator is left as it is."""
    if budget_mb is None or not device.startswith("CPU"):
        return
    import tensorflow as tf

    region_mb = min(CPU_REGION_BUDGETS * budget_mb, psutil.virtual_memory().total / MB / 2)
    try:
        with tf.device(device):
            tf.raw_ops.Empty(shape=[int(region_mb), MB // 4], dtype=tf.float32, init=False)  # a MB a row: int32 dims
    except tf.errors.ResourceExhaustedError:
        pass  # the host would not reserve it: the allocator grows as it would have


def peak_memory_mb(device: str, floor_mb: float = 0.0) -> float | None:
    """Peak bytes TensorFlow's allocator held on ``device`` since the last reset, in MiB;
    None when the allocator keeps no statistics, or reports less than ``floor_mb`` (memory
    the run certainly held: its weights). TensorFlow's oneDNN CPU allocator counts no
    allocation under 4 KB, so a small model's peak reads 0.0 or a fraction of its weights:
    not measured, and never a figure that passes a budget."""
    peak = allocator_peak_mb(device)
    return peak if peak is not None and peak > 0 and peak >= floor_mb else None


def allocator_peak_mb(device: str) -> float | None:
    """The allocator's peak as it reads (0.0 included); None when it keeps no statistics."""
    import tensorflow as tf

    try:
        return tf.config.experimental.get_memory_info(device)["peak"] / MB
    except (ValueError, tf.errors.InvalidArgumentError):
        return None


def peak_over(budget_mb: float | None, device: str) -> float | None:
    """The allocator's peak so far where it is over ``budget_mb``, else None (within it, no
    budget, or a device that reports no peak)."""
    peak = peak_memory_mb(device)
    return peak if budget_mb is not None and peak is not None and peak > budget_mb else None


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


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite at ``batch`` (counted from 1 through the epoch;
    ``exact``: that batch itself, else the first check that saw it)."""

    def __init__(self, loss: float, batch: int, exact: bool = True):
        super().__init__(f"the training loss became {loss} {'at' if exact else 'by'} batch {batch}")
        self.loss, self.batch, self.exact = loss, batch, exact


class Diverged(ArithmeticError):
    """The training diverged: the run failed, and none of its figures is a result (one line:
    where, and what usually helps; ``train.diverged``)."""


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

    def over(self, steady_s: float | None, wall_s: float | None) -> bool:
        """At the last mark: ``steady_s`` of steady state measured, or ``wall_s`` spent."""
        return (steady_s is not None and self.steady_s >= steady_s) or (wall_s is not None and self.wall_s >= wall_s)

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
    for (t0, b0), (t1, b1) in itertools.pairwise(marks):
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
