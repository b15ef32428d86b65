"""Optuna studies for sweeps: search space, samplers, pruners, storage and trial hand-off.

The Hydra sweeper (``hydra/sweeper=optuna``) asks the study for trials and launches one
job per trial; the job finds its trial through the study's storage (so pruning and
constraints work in worker processes too), reports validation loss each epoch and sets
its memory constraint. Everything here is plain Optuna; nothing trains.

``n_trials`` is the study's target: trials that ended COMPLETE or PRUNED, plus those
running now. Re-running a command continues the study up to that total; failed trials
do not count (they are retried, up to ``max_failure_rate``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

TRIAL_ENV = "TBPTT_EXP_OPTUNA_TRIAL_ID"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
SAMPLERS = ("tpe", "random", "cmaes", "gp", "nsgaii", "grid")
PRUNERS = ("none", "median", "hyperband")


# --- search space ------------------------------------------------------------------------


def distribution(line: str) -> BaseDistribution | str:
    """``key=choice(..)|range(..)|interval(..)|tag(log, ..)|int(..)`` -> an Optuna distribution.

    A plain value (no sweep) is returned as its string: the parameter is fixed.
    ``range(a, b, step)`` excludes b, as it does in Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer

    override = OverridesParser.create().parse_override(line)
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator(transformer=Transformer.identity))
        if not values:
            raise ValueError(f"{line}: the range is empty")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ValueError(f"{line}: this sweep is not supported by the Optuna sweeper")


def search_space(lines: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Split override lines into a search space and fixed overrides for every trial."""
    space: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for line in lines:
        key = line.split("=", 1)[0]
        dist = distribution(line)
        if isinstance(dist, BaseDistribution):
            space[key] = dist
        else:
            fixed.append(line)
    return space, fixed


# --- samplers and pruners: plug-ins by name ------------------------------------------------


def make_sampler(name: str, seed: int | None, space: dict[str, BaseDistribution]) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "grid":
        grid = {}
        for key, dist in space.items():
            if not isinstance(dist, CategoricalDistribution):
                raise ValueError(f"sampler=grid needs choice(...) for every parameter; {key} is not")
            grid[key] = list(dist.choices)
        return AskTellGridSampler(grid, seed=seed)
    raise ValueError(f"sampler={name!r}: use one of {', '.join(SAMPLERS)}")


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler ends ``study.optimize`` when the grid is exhausted by calling
    ``study.stop()``, which raises under ask-and-tell; the sweeper stops by itself
    (it caps ``n_trials`` at the grid's size)."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001
        pass

    @property
    def grid_size(self) -> int:
        return len(self._all_grids)


def make_pruner(name: str, warmup_epochs: int, startup_trials: int) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs))
    raise ValueError(f"pruner={name!r}: use one of {', '.join(PRUNERS)}")


# --- storage and the study lock --------------------------------------------------------------


def default_storage_url() -> str:
    from tbptt_exp.paths import default_store_dir

    store = default_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'optuna.db'}"


def make_storage(url: str, heartbeat_s: int, grace_s: int) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so trials of a killed worker can be told apart."""
    return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s)


@contextlib.contextmanager
def study_lock(storage: optuna.storages.BaseStorage, study_name: str) -> Iterator[None]:
    """Serialise "count the trials, then ask for one" across every worker of a study.

    PostgreSQL: an advisory lock; SQLite: a lock file beside the database. That is what
    makes N workers stop at exactly n_trials instead of overshooting.
    """
    url = getattr(storage, "url", "")
    if url.startswith("postgresql"):
        from sqlalchemy import text

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    elif url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :]).with_suffix(f".{hashlib.sha1(study_name.encode()).hexdigest()[:8]}.lock")
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        raise ValueError(f"storage {url!r}: use a sqlite:/// or postgresql:// URL")


def counted_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


class Heartbeat:
    """Records a heartbeat for the trials this worker is running, from a thread."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_ids: list[int], interval_s: int):
        self.storage, self.trial_ids, self.interval_s = storage, trial_ids, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            for trial_id in self.trial_ids:
                self.storage.record_heartbeat(trial_id)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# --- the job's side ----------------------------------------------------------------------------


def trial_env(trial: optuna.Trial) -> dict[str, str]:
    """The job's environment that names its trial; the storage comes from the sweeper config.

    (The storage URL may hold a password, so it never travels on a command line.)
    """
    return {TRIAL_ENV: str(trial._trial_id)}


@dataclass
class JobTrial:
    """The trial a job runs as, loaded from the study's storage."""

    trial: optuna.Trial
    study: optuna.Study

    @property
    def multi_objective(self) -> bool:
        return len(self.study.directions) > 1

    def report(self, value: float, epoch: int) -> None:
        """Report an epoch's value; raise TrialPruned when the pruner rejects the trial."""
        if self.multi_objective:
            return  # Optuna prunes single-objective studies only
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({value:.4f})")


def job_trial(sweeper_cfg: Any) -> JobTrial | None:
    """The current job's trial, when the Optuna sweeper launched it (``sweeper_cfg``:
    the job's ``hydra.sweeper`` node, which names the study and its storage)."""
    trial_id = os.environ.get(TRIAL_ENV)
    if not trial_id:
        return None
    storage = optuna.storages.RDBStorage(sweeper_cfg.storage or default_storage_url())
    # The pruner decides inside the job, so the job needs the sweeper's pruner, not Optuna's default.
    pruner = make_pruner(sweeper_cfg.pruner, sweeper_cfg.pruner_warmup_epochs, sweeper_cfg.pruner_startup_trials)
    study = optuna.load_study(study_name=sweeper_cfg.study_name, storage=storage, pruner=pruner)
    return JobTrial(optuna.Trial(study, int(trial_id)), study)
