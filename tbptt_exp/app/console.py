"""What a person reads on the console: one prefix, one line per event, a progress bar on a
terminal (a line every few seconds in a log file), and none of the libraries' start-up chatter."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Self

from tqdm import tqdm

PREFIX = "[tbptt-exp]"


def say(line: str) -> None:
    print(f"{PREFIX} {line}", flush=True)


class Stopped(Exception):
    """A command that stops on purpose (a study past its failure rate): its reason is one
    line on stderr, exit 1."""


def error(line: str) -> None:
    """A one-line error for the user, on stderr."""
    print(f"tbptt-exp: error: {line}", file=sys.stderr, flush=True)


def throttled(every_s: float, fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` at most once every ``every_s`` seconds (progress inside an epoch)."""
    last = [time.perf_counter()]

    def call(*args: Any) -> None:
        now = time.perf_counter()
        if now - last[0] >= every_s:
            last[0] = now
            fn(*args)

    return call


class Progress:
    """Batches done in the current epoch: a tqdm bar on a terminal, else a line every 10 s.

    Called as ``progress(epoch, batches_done, n_batches)``; ``close()`` at the end of an
    epoch, before its summary line is printed.
    """

    def __init__(self, stream=None, every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.bar = None
        self.line = throttled(every_s, lambda epoch, done, total: say(f"epoch {epoch}: {done}/{total} batches"))

    def __call__(self, epoch: int, done: int, total: int) -> None:
        if not self.stream.isatty():
            self.line(epoch, done, total)
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"{PREFIX} epoch {epoch}", unit="batch", leave=False,
                            file=self.stream, dynamic_ncols=True)
        self.bar.update(min(done, total) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def verbose_requested(argv: list[str]) -> bool:
    """``verbose=true`` on the command line (the last one wins), before Hydra composes."""
    verbose = False
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "verbose":
            verbose = value.strip().lower() in ("true", "yes", "1", "on")
    return verbose


# Hydra's launchers log each job's overrides, the sweep's links included; a sweep says
# ``job 2/3: k=25`` itself.
LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher",
                    "hydra_plugins.hydra_submitit_launcher")


def quiet_libraries(verbose: bool) -> None:
    """Keep TensorFlow's C++ start-up lines, absl, MLflow's and alembic's INFO lines, Hydra's
    launcher lines and matplotlib's font-cache note off the console, unless ``verbose``.

    TensorFlow reads its log level once, when it loads, so this runs before it does; the
    environment carries the level to probe and worker processes. Errors still surface as
    Python exceptions with their messages.
    """
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO"
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"  # read when MLflow configures its loggers
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a night reading its baseline drew three bars
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in ("mlflow", "alembic", "absl", "tensorflow", "h5py", "numexpr", *LAUNCHER_LOGGERS):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # "building the font cache" is a warning
    # A store's failure is logged by these with its traceback (and by the system-metrics thread
    # at each sample), then raised to the run, which reports it in one line with where its figures are.
    for name in ("mlflow.store.db.utils", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class TrainingConsole:
    """What a person reads while one experiment trains: the data and settings, a progress
    bar, a line per epoch, then the summary. ``on_epoch`` and ``progress`` are handed to
    the training loop; used as a context manager, it closes the bar however training ends."""

    def __init__(self, experiment) -> None:
        self.experiment = experiment
        self.progress = Progress()
        self.started = time.perf_counter()
        self.step_name = "tokens"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.close()

    def starting(self, dataset) -> None:
        experiment, model = self.experiment, self.experiment.model
        self.step_name = dataset.step_name
        say(f"data: {dataset.source}: {len(dataset.train):,} train / {len(dataset.val):,} validation "
            f"sequences, {dataset.train.num_tokens:,} training {dataset.step_name}, {dataset.io.describe()}")
        say(f"k={experiment.k} batch_size={experiment.batch_size} padding={experiment.padding} "
            f"reset={experiment.reset} engine={experiment.engine.name} model={model.preset} "
            f"({model.shape}) epochs={experiment.trainer.epochs}{budgets(experiment.trainer)}{learning_rate_text(experiment)}")
        for warning in experiment.trainer.warnings():
            say(f"warning: {warning}")

    def device(self, description: dict[str, str]) -> None:
        say(f"training on {description['device']} ({description['device_name']})")

    def on_epoch(self, metrics) -> None:
        self.progress.close()
        say(metrics.describe(self.experiment.trainer.epochs, self.step_name))

    def done(self, result, over_budget_mb: float | None) -> None:
        say(f"done in {time.perf_counter() - self.started:.1f} s")
        for line in result.summary():
            say(f"  {line}")
        budget = self.experiment.device.memory_budget_mb
        if budget is not None and over_budget_mb is None:
            say(f"  peak memory unknown on this device: the memory budget of {budget:,.0f} MB cannot be checked")
        elif budget is not None:
            verdict = "over" if over_budget_mb > 0 else "within"
            say(f"  {verdict} the memory budget of {budget:,.0f} MB by {abs(over_budget_mb):,.1f} MB")


def learning_rate_text(experiment) -> str:
    """`` learning_rate=0.006 (sqrt-scaled from 0.003 at batch 32)`` where scaling changed it."""
    trainer = experiment.trainer
    rate = trainer.learning_rate_for(experiment.batch_size)
    if rate == trainer.learning_rate:
        return ""
    return (f" learning_rate={rate:.4g} ({trainer.lr_scaling}-scaled from {trainer.learning_rate:g} at batch "
            f"{trainer.reference_batch_size})")


def budgets(trainer) -> str:
    """`` max_time_s=60 target_val_loss=1.5``: the stops set besides the epochs."""
    return "".join(f" {name}={getattr(trainer, name):g}" for name in ("max_time_s", "target_val_loss")
                   if getattr(trainer, name) is not None)
