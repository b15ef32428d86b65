"""Optuna studies for sweeps: search space, samplers, pruners, storage and trial hand-off.

The Hydra sweeper (``hydra/sweeper=optuna``, a thin adapter) calls ``run_study``, which
asks the study for trials and launches one job per trial; the job finds its trial through
the study's storage (so pruning and constraints work in worker processes too), reports
validation loss each epoch and sets its memory constraint. Nothing here trains.

``n_trials`` is the study's target: trials that ended COMPLETE or PRUNED, plus those
running now. Re-running a command continues the study up to that total; failed trials
do not count (they are retried, up to ``max_failure_rate``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

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


def default_storage_url(create: bool = True) -> str:
    from tbptt_exp.paths import default_store_dir

    store = default_store_dir()
    if create:
        store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'optuna.db'}"


def make_storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url)


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


def _study_key(study_name: str) -> int:
    return int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:4], "big", signed=True)


class TrialLocks:
    """A lock per running trial, held by the worker that runs it, visible to every worker.

    PostgreSQL: a session advisory lock on (study, trial id), on a connection this worker
    keeps open; SQLite: an exclusive ``flock`` on a file beside the database. The operating
    system or the database drops the lock the moment the worker dies, however it dies, so
    a RUNNING trial whose lock can be taken has no worker: ``fail_orphaned_trials`` fails
    it at once, with no heartbeat grace period to wait out.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str):
        self.storage, self.study_name = storage, study_name
        self.url = str(storage.url) if hasattr(storage, "url") else ""
        self.held: dict[int, Any] = {}

    def _path(self, trial_id: int) -> Path:
        db = Path(self.url[len("sqlite:///"):])
        return db.with_name(f"{db.name}.{hashlib.sha1(self.study_name.encode()).hexdigest()[:8]}.trial-{trial_id}.lock")

    def acquire(self, trial_id: int) -> None:
        if self.url.startswith("postgresql"):
            from sqlalchemy import text

            conn = self.storage.engine.connect()
            conn.execute(text("SELECT pg_advisory_lock(:s, :t)"), {"s": _study_key(self.study_name), "t": trial_id})
            conn.commit()
            self.held[trial_id] = conn
        else:
            handle = open(self._path(trial_id), "a")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held[trial_id] = handle

    def release(self, trial_id: int) -> None:
        holder = self.held.pop(trial_id, None)
        if holder is None:
            return
        if self.url.startswith("postgresql"):
            from sqlalchemy import text

            holder.execute(text("SELECT pg_advisory_unlock(:s, :t)"), {"s": _study_key(self.study_name), "t": trial_id})
            holder.commit()
            holder.close()
        else:
            with contextlib.suppress(OSError):
                self._path(trial_id).unlink()
            holder.close()  # unlocks

    def release_all(self) -> None:
        for trial_id in list(self.held):
            self.release(trial_id)

    def orphaned(self, trial_id: int) -> bool:
        """True when no live worker holds this trial's lock (checked by taking it briefly)."""
        if trial_id in self.held:
            return False
        if self.url.startswith("postgresql"):
            from sqlalchemy import text

            key = {"s": _study_key(self.study_name), "t": trial_id}
            with self.storage.engine.connect() as conn:
                free = conn.execute(text("SELECT pg_try_advisory_lock(:s, :t)"), key).scalar()
                if free:
                    conn.execute(text("SELECT pg_advisory_unlock(:s, :t)"), key)
                conn.commit()
            return bool(free)
        path = self._path(trial_id)
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            with contextlib.suppress(OSError):
                path.unlink()
            return True


def fail_orphaned_trials(study: optuna.Study, locks: TrialLocks) -> list[int]:
    """Fail RUNNING trials that no live worker holds (call under ``study_lock``); their numbers."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not locks.orphaned(trial._trial_id):
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "its worker stopped")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            failed.append(trial.number)
    return failed


def fail_orphans_in_storage(url: str) -> dict[str, list[int]]:
    """``fail_orphaned_trials`` for every study in a storage: {study name: trial numbers}."""
    storage = make_storage(url)
    failed = {}
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        with study_lock(storage, summary.study_name):
            numbers = fail_orphaned_trials(study, TrialLocks(storage, summary.study_name))
        if numbers:
            failed[summary.study_name] = numbers
    return failed


def sampler_seed(seed: int | None, start: int) -> int | None:
    """The sampler's seed for the ``start``-th start of a study (0 for the first).

    A sampler rebuilt with the same seed on a resumed study, or in N workers together,
    would propose the same points again; each start gets its own seed, derived from the
    study's, so one uninterrupted worker still reproduces its study exactly.
    """
    if seed is None:
        return None
    if start == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{start}".encode()).digest()[:4], "big")


STARTS_KEY = "tbptt_exp_starts"  # the study's user attr counting the workers that started on it


# --- the job's side ----------------------------------------------------------------------------


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
            from tbptt_exp.app.console import say

            pruned = optuna.TrialPruned(f"pruned at epoch {epoch} ({value:.4f})")
            say(f"trial {self.trial.number} {pruned}")
            raise pruned


def job_trial(sweeper: dict, trial_id: int) -> JobTrial:
    """The trial ``trial_id`` of the study named by ``sweeper`` (the job's ``hydra.sweeper``
    settings: study name, storage and pruner). The storage URL may hold a password, so it
    comes from the config, never from a command line."""
    settings = StudySettings(**sweeper)
    storage = optuna.storages.RDBStorage(settings.storage or default_storage_url())
    # The pruner decides inside the job, so the job needs the sweeper's pruner, not Optuna's default.
    pruner = make_pruner(settings.pruner, settings.pruner_warmup_epochs, settings.pruner_startup_trials)
    study = optuna.load_study(study_name=settings.study_name, storage=storage, pruner=pruner)
    return JobTrial(optuna.Trial(study, trial_id), study)


# --- the sweep's side ---------------------------------------------------------------------------


@dataclass
class StudySettings:
    """``hydra/sweeper=optuna``: the study's settings (``hydra.sweeper.*``)."""

    _target_: str = "hydra_plugins.tbptt_exp_plugins.optuna_sweeper.OptunaSweeper"
    study_name: str = "tbptt-exp"
    storage: Optional[str] = None  # None: SQLite under mlruns/; postgresql://... for many workers
    n_trials: int = 20  # the study's target: COMPLETE + PRUNED (+ running) trials
    n_jobs: int = 1  # trials launched together (a process launcher runs them in parallel)
    sampler: str = "tpe"  # tpe, random, cmaes, gp, nsgaii, grid
    seed: Optional[int] = None
    direction: Any = "minimize"  # or a list, one per objective: [minimize, maximize]
    pruner: str = "none"  # none, median, hyperband
    pruner_warmup_epochs: int = 1  # epochs before a trial may be pruned
    pruner_startup_trials: int = 2  # trials that finish before the median pruner prunes
    max_failure_rate: float = 0.5  # stop the study when more trials than this fail
    params: Dict[str, str] = field(default_factory=dict)


Launch = Callable[[list[list[str]]], Sequence[Any]]  # job overrides -> Hydra JobReturns


def run_study(settings: StudySettings, config, arguments: list[str], launch: Launch) -> optuna.Study:
    """Ask the study for trials, launch a job per trial, tell it the results, until the
    study holds ``n_trials``; ``config`` is the sweep's composed config (tracking, objective)."""
    from tbptt_exp.app.console import say
    from tbptt_exp.app.run import mask_credentials, make_tracker
    from tbptt_exp.app.sweep import section
    from tbptt_exp.core.config import TrackingConfig

    s = settings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    directions = list(s.direction) if isinstance(s.direction, (list, tuple)) else [s.direction]
    space, fixed = search_space([f"{k}={v}" for k, v in s.params.items()] + list(arguments))
    storage_url = s.storage or default_storage_url()
    storage = make_storage(storage_url)
    study = optuna.create_study(
        study_name=s.study_name,
        storage=storage,
        pruner=make_pruner(s.pruner, s.pruner_warmup_epochs, s.pruner_startup_trials),
        directions=directions,
        load_if_exists=True,
    )
    locks = TrialLocks(storage, s.study_name)
    with study_lock(storage, s.study_name):
        orphans = fail_orphaned_trials(study, locks)  # trials left RUNNING by a worker that died
        start = study.user_attrs.get(STARTS_KEY, 0)
        study.set_user_attr(STARTS_KEY, start + 1)
    if orphans:
        say(f"trial(s) {', '.join(map(str, orphans))} had no live worker: marked FAIL, not counted")
    seed = sampler_seed(s.seed, start)
    study.sampler = make_sampler(s.sampler, seed, space)
    if s.seed is not None and start:
        say(f"sampler seed {seed} (start {start + 1} of this study, derived from seed={s.seed})")
    n_trials = s.n_trials
    grid_size = getattr(study.sampler, "grid_size", None)
    if grid_size is not None and grid_size < n_trials:
        say(f"the grid has {grid_size} points: n_trials={n_trials} lowered to {grid_size}")
        n_trials = grid_size
    tracker = make_tracker(section(config, "tracking", TrackingConfig))
    with study_lock(storage, s.study_name):  # one parent run per study, whichever worker comes first
        parent_id = study.user_attrs.get(PARENT_RUN_KEY) if tracker.uri else None
        if tracker.uri and parent_id is None:
            with tracker.run(
                name=f"study {s.study_name}",
                params={f"sweeper.{k}": v for k, v in asdict(s).items() if k not in ("_target_", "storage", "params")}
                | {f"search.{k}": v for k, v in s.params.items()},
                tags=environment_tags_for_study(s),
            ) as created:
                created.leave_running()
            parent_id = created.run_id
            study.set_user_attr(PARENT_RUN_KEY, parent_id)
    with tracker.run(run_id=parent_id) if parent_id else tracker.run() as parent:
        if parent.run_id:
            say(f"study tracked as parent {parent.link}")
            end_runs_of_failed_trials(parent, study)
        say(f"study '{s.study_name}' at {mask_credentials(storage_url)}: "
            f"{counted_trials(study)}/{n_trials} trials so far, sampler={s.sampler}, pruner={s.pruner}")
        while True:
            with study_lock(storage, s.study_name):
                fail_orphaned_trials(study, locks)
                room = n_trials - counted_trials(study)
                if room <= 0:
                    break
                trials = [study.ask(space) for _ in range(min(s.n_jobs, room))]
                for trial in trials:
                    locks.acquire(trial._trial_id)  # before the study lock goes: never seen orphaned
            try:
                run_trials(study, trials, fixed, parent.run_id, launch)
            finally:
                locks.release_all()
            check_failure_rate(study, s)
        if not study_done(study, n_trials):
            parent.leave_running()  # other workers are still running trials
        elif parent.run_id:
            from tbptt_exp.app.study_report import log_study_summary

            log_study_summary(parent, study)
    report(study)
    parent.announce(say, "the study (its trials are beneath it)")
    return study


PARENT_RUN_KEY = "mlflow_parent_run_id"  # the study's user attr naming its MLflow parent run


def environment_tags_for_study(s: StudySettings) -> dict:
    from tbptt_exp.app.run import environment_tags

    return {**environment_tags(), "tbptt_exp.kind": "study", "optuna.study": s.study_name,
            "optuna.storage": s.storage or "default"}


def run_trials(study, trials, fixed, parent_run_id, launch: Launch) -> None:
    """Launch one job per trial and tell the study how each ended; on Ctrl-C or SIGTERM
    the trials fail with the reason before the interrupt goes on."""
    from hydra.core.utils import JobStatus

    from tbptt_exp.app.console import say
    from tbptt_exp.app.run import outcome_of
    from tbptt_exp.app.sweep import SweepLink

    batch = [
        [*fixed, *(f"{k}={v}" for k, v in trial.params.items()),
         *SweepLink(parent_run_id=parent_run_id, trial_id=trial._trial_id, returns_outcome=True).overrides()]
        for trial in trials
    ]
    try:
        returns = launch(batch)
    except BaseException as error:
        outcome = outcome_of(error)
        for trial in trials:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.set_user_attr("fail_reason", outcome.reason)
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    for trial, ret in zip(trials, returns):
        if ret.status == JobStatus.COMPLETED:
            study.tell(trial, ret.return_value.values)
            continue
        outcome = outcome_of(ret._return_value)
        if outcome.trial_state == "PRUNED":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("fail_reason", outcome.reason)
            study.tell(trial, state=TrialState.FAIL)
            say(f"trial {trial.number} failed: {outcome.reason}")


def check_failure_rate(study: optuna.Study, s: StudySettings) -> None:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if len(failed) >= 2 and len(failed) / len(trials) > s.max_failure_rate:
        last = failed[-1].user_attrs.get("fail_reason", "no reason recorded")
        raise RuntimeError(
            f"stopping study '{s.study_name}': {len(failed)} of {len(trials)} trials failed "
            f"(hydra.sweeper.max_failure_rate={s.max_failure_rate}); last: {last}"
        )


def study_done(study: optuna.Study, n_trials: int) -> bool:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len(done) >= n_trials and not running


def end_runs_of_failed_trials(parent, study: optuna.Study) -> None:
    """Child runs left RUNNING by a killed worker end KILLED once their trial is FAIL."""
    from tbptt_exp.app.run import KILLED, Outcome, TrackedRun

    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    runs = parent.client.search_runs(
        [parent.tracker.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        if int(run.data.tags.get("optuna.trial", -1)) in failed:
            TrackedRun(parent.tracker, run.info.run_id, is_trial=True).end(Outcome(KILLED, "FAIL", "its worker stopped"))


def report(study: optuna.Study) -> None:
    """Print the best trial, or the Pareto front of a multi-objective study."""
    from tbptt_exp.app.console import say

    states = {state: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    counts = ", ".join(f"{n} {state.name}" for state, n in states.items() if n)
    say(f"study '{study.study_name}': {counts}")
    if not states[TrialState.COMPLETE]:
        return
    if len(study.directions) == 1:
        try:
            best = study.best_trial
        except ValueError:
            say("no feasible trial: every complete trial broke a constraint")
            return
        say(f"best trial {best.number}: value {best.value:.4f} params {best.params}")
    else:
        say("Pareto front:")
        for t in study.best_trials:
            say(f"  trial {t.number}: values {t.values} params {t.params}")
