"""The app's settings: what a command does with an experiment (its task), where it is
recorded, how the batch finder searches and how a night is judged. ``RunConfig`` is the
core's ``ExperimentConfig`` with them: the one structured config Hydra composes and every
job validates, while the core (and a probe process) sees the experiment alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from tbptt_exp.core import config as core
from tbptt_exp.core.config import (
    BOOL,
    BUILT_IN_MODEL,
    FRACTION,
    POSITIVE,
    SECONDS,
    ConfigError,
    ExperimentConfig,
    check_fields,
    flatten,
    is_number,
    is_whole,
    rule,
    to_dict,
)
from tbptt_exp.core.measure import COMPILE_TIME, EPOCH_TIME, PEAK_MEMORY, REAL_TOKENS, VAL_LOSS

# The figures a night judges, and the relative change beyond which each regresses by default
# (nightly.thresholds; benchmarks/nightly_sensitivity.py measures what each one catches).
NIGHTLY_THRESHOLDS = {VAL_LOSS.name: 0.05, REAL_TOKENS.name: 0.15, PEAK_MEMORY.name: 0.10, EPOCH_TIME.name: 0.20,
                      COMPILE_TIME.name: 0.50}


class Task(StrEnum):
    """train: one experiment; max_batch: the largest and the useful batch; cleanup: close dead runs."""

    train = "train"
    max_batch = "max_batch"
    cleanup = "cleanup"


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else SQLite under mlruns/
    experiment: str = field(default="tbptt-exp", metadata=rule(bool, "use a non-empty name"))
    run_name: str | None = None
    # CPU, memory, disk, network (and GPU with nvidia-ml-py) sampled by MLflow's own system
    # metrics monitor every this many seconds during a training run; null: off.
    system_metrics_interval_s: float | None = field(
        default=5.0, metadata=rule(lambda v: is_number(v) and v > 0, "use a positive number of seconds, or null (off)"))

    def __post_init__(self) -> None:
        check_fields(self, "tracking.")


@dataclass
class BatchFinderConfig:
    """``task=max_batch``: how the largest and the useful batch size are searched."""

    granularity: int = field(default=8, metadata=POSITIVE)  # batch sizes are multiples of this
    min_batch_size: int = field(default=8, metadata=POSITIVE)
    max_batch_size: int = field(default=4096, metadata=POSITIVE)
    headroom: float = field(default=0.1, metadata=FRACTION)  # the recommended size leaves this share of the budget free
    probe_seconds: float = field(default=3.0, metadata=SECONDS)  # steady-state seconds a probe trains
    probe_timeout_s: float = field(default=300.0, metadata=SECONDS)  # a probe that takes longer counts as too big
    cache: bool = True  # remember results by fingerprint (model, k, device, TF version)
    cache_dir: str | None = None  # None: mlruns/batch_cache
    # The useful batch needs the gradient noise scale, which grows as the loss falls: it is
    # measured by a short training at the recommended size after the probes, for this many
    # seconds of training, in their second half (0: no warm-up and no useful batch, unless
    # noise_from) ...
    noise_warmup_s: float = field(default=20.0, metadata=rule(lambda v: is_number(v) and v >= 0,
                                                              "use a number of seconds, or 0 (no warm-up)"))
    # ... or taken from a longer training run of yours: its MLflow run id (its last
    # optim/gradient_noise_scale, converted by tokens when its k differs).
    noise_from: str | None = field(default=None, metadata=rule(
        lambda v: isinstance(v, str) and v.strip() != "", "use an MLflow run id, or null"))

    def __post_init__(self) -> None:
        check_fields(self, "batch_finder.")
        if self.max_batch_size < max(self.granularity, self.min_batch_size):
            raise ConfigError("batch_finder.max_batch_size", self.max_batch_size,
                              f"use at least batch_finder.granularity={self.granularity} "
                              f"and min_batch_size={self.min_batch_size}")


@dataclass
class NightlyConfig:
    """``sweep=nightly``: repeats, the baseline a night is judged against, and the verdict's rules."""

    record: bool = False  # set by sweep=nightly: each job records its figures for the report
    # the whole matrix runs this often, round after round, so drift hits every entry alike
    rounds: int = field(default=5, metadata=rule(lambda v: is_whole(v) and v >= 2,
                                                 "use 2 or more: a verdict needs the spread of repeated samples"))
    baseline: str | None = None  # a pinned nightly_results.json; None: the last good night on this device
    accept: bool = False  # tonight becomes the baseline: a regression or a matrix change accepted on purpose
    advance: bool = False  # a good night rewrites the baseline file, which then holds the last good night
    history_runs: int = field(default=7, metadata=POSITIVE)  # previous nights drawn in the trend plots
    # the figures judged, and the relative change beyond which each regresses
    thresholds: dict[str, float] = field(default_factory=lambda: dict(NIGHTLY_THRESHOLDS))
    # The interval already carries the noise; a threshold may also widen to this many robust
    # sigmas of the samples' spread (0: never), to at most max_widening times itself.
    noise_sigmas: float = field(default=0.0, metadata=rule(lambda v: is_number(v) and v >= 0,
                                                           "use 0 (no widening) or a positive number"))
    max_widening: float = field(default=2.0, metadata=rule(lambda v: is_number(v) and v >= 1, "use 1 (never widen) or more"))
    # a regression's bootstrap interval on the change, at this level, excludes no change
    confidence: float = field(default=0.9, metadata=rule(lambda v: is_number(v) and 0.5 <= v < 1,
                                                         "use a level from 0.5 up to (not including) 1, e.g. 0.9"))
    allow_other_device: bool = False  # compare with a baseline file from another device

    def __post_init__(self) -> None:
        check_fields(self, "nightly.")
        if self.baseline is not None and not Path(self.baseline).expanduser().is_file() and not (
                self.accept or self.advance):
            raise ConfigError("nightly.baseline", self.baseline, "use the path of a nightly_results.json, or null "
                                                                 "(with nightly.accept or nightly.advance it is written)")
        for figure, threshold in self.thresholds.items():
            if figure not in NIGHTLY_THRESHOLDS:
                raise ConfigError("nightly.thresholds", figure, f"use one of {', '.join(NIGHTLY_THRESHOLDS)}")
            if not is_number(threshold) or threshold < 0:
                raise ConfigError(f"nightly.thresholds.{figure}", threshold, "use a relative change such as 0.1 (10%)")


@dataclass
class RunConfig(ExperimentConfig):
    """One command's settings: the experiment, and what the app does with it."""

    task: Task = Task.train
    # true: TensorFlow's C++ logs and MLflow's INFO lines on the console too
    verbose: bool = field(default=False, metadata=BOOL)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    batch_finder: BatchFinderConfig = field(default_factory=BatchFinderConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)


# What Hydra offers as config group options (``model=seed``, ``tracking=none``): the core's and the app's.
PRESETS: dict[str, dict[str, Any]] = core.PRESETS | {
    "tracking": {"mlflow": TrackingConfig, "none": lambda: TrackingConfig(enabled=False)},
}


# Settings a task does not read, left out of its run's params and its fingerprint (MLflow's
# columns and comparisons are then about what made runs differ). Tracking settings say where
# a run is recorded, not what ran.
NOT_READ_BY = {
    Task.train: ("task", "verbose", "tracking.", "batch_finder.", "nightly."),
    Task.max_batch: ("task", "verbose", "tracking.", "nightly.", "batch_size", "trainer.epochs", "objective",
                     "trainer.max_time_s", "trainer.target_val_loss"),
    Task.cleanup: ("task", "verbose", "tracking.", "batch_finder.", "nightly."),
}


def settings_read(cfg: RunConfig, task: Task | None = None) -> dict[str, Any]:
    """The settings ``task`` (default ``cfg.task``) reads, flattened (``model.units``...); a
    nightly entry keeps ``nightly.*``, which decide how it is judged."""
    skip = tuple(s for s in NOT_READ_BY[task or cfg.task] if not (cfg.nightly.record and s == "nightly."))
    unread = tuple(f"model.{name}" for name in BUILT_IN_MODEL) if cfg.model.factory else ("model.factory", "model.params")
    return {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith(skip + unread)}
