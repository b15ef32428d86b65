"""Optuna studies for sweeps: the study's loop, and the job's side of a trial.

The Hydra sweeper (``hydra/sweeper=optuna``, a thin adapter) calls ``run_study``, which
asks the study for trials and launches one job per trial; the job finds its trial through
the study's storage (``job_trial``: pruning and constraints work in worker processes
too), reports its objective each epoch and sets its memory constraint. Nothing here
trains.

``n_trials`` is the study's target: trials that ended COMPLETE or PRUNED, plus those
running now. Re-running a command continues the study up to that total; failed trials
do not count (they are retried, up to ``max_failure_rate``).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from tbptt_exp.app.console import Stopped, say
from tbptt_exp.app.settings import TrackingConfig
from tbptt_exp.app.signals import deferred
from tbptt_exp.app.study.report import COST_FIGURES, EPOCHS_ATTR, RUN_ATTR, log_study_summary
from tbptt_exp.app.study.search_space import StudySettings, make_pruner, make_sampler, search_space
from tbptt_exp.app.study.trials import (
    TrialLocks,
    counted_trials,
    end_trial,
    fail_orphaned_trials,
    make_storage,
    study_lock,
)
from tbptt_exp.app.sweep.sweep import SweepLink, job_error, section
from tbptt_exp.app.tracking.provenance import environment_tags
from tbptt_exp.app.tracking.run import KILLED, Ending, TrackedRun, ending_of, make_tracker
from tbptt_exp.app.tracking.stores import default_storage_url, mask_credentials
from tbptt_exp.core.measure import OVER_BUDGET


def show_params(params: dict[str, Any]) -> str:
    """``k=25 trainer.learning_rate=0.001855``: floats to four significant digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

STARTS_KEY = "tbptt_exp_starts"  # the study's user attr counting the workers that started on it
PARENT_RUN_KEY = "mlflow_parent_run_id"  # the study's user attr naming its MLflow parent run


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


Launch = Callable[[list[list[str]]], Sequence[Any]]  # job overrides -> Hydra JobReturns


def run_study(settings: StudySettings, config, arguments: list[str], launch: Launch) -> optuna.Study:
    """Ask the study for trials, launch a job per trial, tell it the results, until the
    study holds ``n_trials``; ``config`` is the sweep's composed config (tracking, objective)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    space, fixed = search_space([f"{k}={v}" for k, v in settings.params.items()] + list(arguments))
    storage_url = settings.storage or default_storage_url()
    storage = make_storage(storage_url)
    study, locks = open_study(settings, storage, space)
    n_trials = trial_target(settings, study)
    tracker = make_tracker(section(config, "tracking", TrackingConfig))
    with study_parent(tracker, study, storage, settings) as parent:
        say(f"study '{settings.study_name}' at {mask_credentials(storage_url)}: "
            f"{counted_trials(study)}/{n_trials} trials so far, sampler={settings.sampler}, pruner={settings.pruner}")
        while run_batch(study, storage, locks, settings.n_jobs, n_trials, space, fixed, parent.run_id, launch):
            check_failure_rate(study, settings)
        if not study_done(study, n_trials):
            parent.leave_running()  # other workers are still running trials
        elif parent.run_id:
            log_study_summary(parent, study)
    report(study)
    parent.announce(say, "the study (its trials are beneath it)")
    return study


def open_study(settings: StudySettings, storage, space) -> tuple[optuna.Study, TrialLocks]:
    """The study, created or loaded; trials of dead workers failed; this start counted and
    given its own sampler seed."""
    study = optuna.create_study(
        study_name=settings.study_name, storage=storage, directions=settings.directions, load_if_exists=True,
        pruner=make_pruner(settings.pruner, settings.pruner_warmup_epochs, settings.pruner_startup_trials),
    )
    locks = TrialLocks(storage, settings.study_name)
    with study_lock(storage, settings.study_name):
        orphans = fail_orphaned_trials(study, locks)  # trials left RUNNING by a worker that died
        start = study.user_attrs.get(STARTS_KEY, 0)
        study.set_user_attr(STARTS_KEY, start + 1)
    if orphans:
        say(f"trial(s) {', '.join(map(str, orphans))} had no live worker: marked FAIL, not counted")
    seed = sampler_seed(settings.seed, start)
    study.sampler = make_sampler(settings.sampler, seed, space)
    if settings.seed is not None and start:
        say(f"sampler seed {seed} (start {start + 1} of this study, derived from seed={settings.seed})")
    return study, locks


def trial_target(settings: StudySettings, study: optuna.Study) -> int:
    """``n_trials``, or the grid's size when a grid sampler has fewer points."""
    grid_size = getattr(study.sampler, "grid_size", None)
    if grid_size is not None and grid_size < settings.n_trials:
        say(f"the grid has {grid_size} points: n_trials={settings.n_trials} lowered to {grid_size}")
        return grid_size
    return settings.n_trials


@contextlib.contextmanager
def study_parent(tracker, study: optuna.Study, storage, settings: StudySettings) -> Iterator[TrackedRun]:
    """The study's one MLflow parent run, created by whichever worker comes first and taken
    up by the others; runs of trials that failed while no one watched end KILLED."""
    with study_lock(storage, settings.study_name):
        parent_id = study.user_attrs.get(PARENT_RUN_KEY) if tracker.uri else None
        if tracker.uri and parent_id is None:
            params = {f"sweeper.{k}": v for k, v in asdict(settings).items() if k not in ("_target_", "storage", "params")}
            tags = {**environment_tags(), "tbptt_exp.kind": "study", "optuna.study": settings.study_name,
                    "optuna.storage": settings.storage or "default"}
            with tracker.run(name=f"study {settings.study_name}", tags=tags,
                             params=params | {f"search.{k}": v for k, v in settings.params.items()}) as created:
                created.leave_running()
            parent_id = created.run_id
            study.set_user_attr(PARENT_RUN_KEY, parent_id)
    with tracker.run(run_id=parent_id) if parent_id else tracker.run() as parent:
        if parent.run_id:
            say(f"study tracked as parent {parent.where}")
            end_runs_of_failed_trials(parent, study)
        yield parent


def run_batch(study: optuna.Study, storage, locks: TrialLocks, n_jobs: int, n_trials: int, space, fixed: list[str],
              parent_run_id: str | None, launch: Launch) -> bool:
    """Ask for up to ``n_jobs`` trials, run them, tell their results; False when the study
    needs no more. However this ends, no trial it asked for is left RUNNING: on Ctrl-C or
    SIGTERM (one that arrived while the trials were asked included) each fails with the reason
    before the interrupt goes on, and a second Ctrl-C waits until they are ended."""
    trials: list[optuna.Trial] = []
    try:
        ask(study, storage, locks, n_jobs, n_trials, space, trials)
        if not trials:
            return False
        run_trials(study, storage, trials, fixed, parent_run_id, launch)
        return True
    except BaseException as error:
        with deferred():
            for trial in trials:  # those already told are left as they are
                end_trial(study, storage, trial.number, TrialState.FAIL, reason=ending_of(error).reason)
        raise
    finally:
        locks.release_all()


def ask(study: optuna.Study, storage, locks: TrialLocks, n_jobs: int, n_trials: int, space,
        trials: list[optuna.Trial]) -> None:
    """Append up to ``n_jobs`` new trials to ``trials`` while the study is short of ``n_trials``
    (counted under the study lock, so workers together stop at exactly n_trials), each locked
    by this worker before the study lock goes (so no other worker sees it orphaned)."""
    with study_lock(storage, study.study_name), deferred():
        fail_orphaned_trials(study, locks)
        room = n_trials - counted_trials(study)
        for _ in range(min(n_jobs, max(room, 0))):
            trials.append(study.ask(space))
            locks.acquire(trials[-1].number)


def run_trials(study: optuna.Study, storage, trials: list[optuna.Trial], fixed: list[str],
               parent_run_id: str | None, launch: Launch) -> None:
    """Launch one job per trial and end each trial as its job ended."""
    batch = [[*fixed, *(f"{k}={v}" for k, v in trial.params.items()),
              *SweepLink(parent_run_id=parent_run_id, trial_number=trial.number, returns_result=True).overrides()]
             for trial in trials]
    for trial in trials:
        say(f"trial {trial.number}: {show_params(trial.params)}")
    returns = launch(batch)
    for trial, job in zip(trials, returns):
        error = job_error(job)
        if error is None:
            end_trial(study, storage, trial.number, TrialState.COMPLETE, job.return_value.values)
            continue
        ending = ending_of(error)
        state = TrialState[ending.trial_state]
        end_trial(study, storage, trial.number, state, reason="" if state == TrialState.PRUNED else ending.reason)
        if state == TrialState.FAIL:
            say(f"trial {trial.number} failed: {ending.reason}")


def check_failure_rate(study: optuna.Study, settings: StudySettings) -> None:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if len(failed) >= 2 and len(failed) / len(trials) > settings.max_failure_rate:
        last = failed[-1].user_attrs.get("fail_reason", "no reason recorded")
        raise Stopped(
            f"stopping study '{settings.study_name}': {len(failed)} of {len(trials)} trials failed "
            f"(hydra.sweeper.max_failure_rate={settings.max_failure_rate}); last: {last}"
        )


def study_done(study: optuna.Study, n_trials: int) -> bool:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len(done) >= n_trials and not running


def end_runs_of_failed_trials(parent: TrackedRun, study: optuna.Study) -> None:
    """Child runs left RUNNING by a killed worker end KILLED once their trial is FAIL."""
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    runs = parent.client.search_runs(
        [parent.tracker.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        if int(run.data.tags.get("optuna.trial", -1)) in failed:
            TrackedRun(parent.tracker, run.info.run_id, is_trial=True).end(Ending(KILLED, "FAIL", "its worker stopped"))


def report(study: optuna.Study) -> None:
    """Print the best trial, or the Pareto front of a multi-objective study."""
    states = {state: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    say(f"study '{study.study_name}': " + ", ".join(f"{n} {state.name}" for state, n in states.items() if n))
    if not states[TrialState.COMPLETE]:
        return
    if len(study.directions) > 1:
        say("Pareto front:")
        for t in study.best_trials:
            say(f"  trial {t.number}: values {', '.join(f'{v:.4f}' for v in t.values)} with {show_params(t.params)}")
        return
    try:
        best = study.best_trial
    except ValueError:
        say("no feasible trial: every complete trial broke a constraint")
        return
    say(f"best trial {best.number}: value {best.value:.4f} with {show_params(best.params)}")


# --- the job's side ------------------------------------------------------------------------------


@dataclass
class JobTrial:
    """The trial a job runs as, loaded from the study's storage."""

    trial: optuna.Trial
    study: optuna.Study
    objective: str  # the figure reported to the pruner each epoch

    def attach(self, run_id: str | None) -> None:
        """The trial names its MLflow run (optuna-dashboard shows it; trials.md links it)."""
        if run_id:
            with deferred():
                self.trial.set_user_attr(RUN_ATTR, run_id)

    def report(self, metrics) -> None:
        """Record an epoch's cost on the trial and report its objective (``EpochMetrics``);
        raise TrialPruned when the pruner rejects the trial. Optuna prunes single-objective
        studies only."""
        figures = metrics.figures()
        with deferred():
            for figure in COST_FIGURES:
                if figures.get(figure.name) is not None:
                    self.trial.set_user_attr(figure.name, figures[figure.name])
            self.trial.set_user_attr(EPOCHS_ATTR, metrics.epoch)
        if len(self.study.directions) > 1:
            return
        value = figures[self.objective]
        with deferred():  # a write to the storage is not cut half-way
            self.trial.report(value, step=metrics.epoch)
            prune = self.trial.should_prune()
        if prune:
            pruned = optuna.TrialPruned(f"pruned after epoch {metrics.epoch} ({self.objective} {value:.4f})")
            say(f"trial {self.trial.number} {pruned}")
            raise pruned

    def constrain(self, budget_mb: float | None, over_budget_mb: float | None) -> None:
        """The memory constraint: feasible within the budget; an unknown peak never is."""
        if budget_mb is not None:
            with deferred():
                self.trial.set_constraint(OVER_BUDGET.name, budget_mb if over_budget_mb is None else over_budget_mb)

    def tags(self) -> dict[str, Any]:
        return {"optuna.study": self.study.study_name, "optuna.trial": self.trial.number}


class NoTrial:
    """A job that is not an Optuna trial: the same calls, nothing reported."""

    def attach(self, run_id: str | None) -> None:
        pass

    def report(self, metrics) -> None:
        pass

    def constrain(self, budget_mb: float | None, over_budget_mb: float | None) -> None:
        pass

    def tags(self) -> dict[str, Any]:
        return {}


NO_TRIAL = NoTrial()


def job_trial(sweeper: dict, number: int | None, objective: str) -> JobTrial | NoTrial:
    """Trial ``number`` of the study named by ``sweeper`` (the job's ``hydra.sweeper``
    settings: study name, storage and pruner); ``NO_TRIAL`` for a job outside a study.
    The storage URL may hold a password, so it comes from the config, never a command line."""
    if number is None:
        return NO_TRIAL
    settings = StudySettings(**sweeper)
    storage = make_storage(settings.storage or default_storage_url())
    # The pruner decides inside the job, so the job needs the sweeper's pruner, not Optuna's default.
    pruner = make_pruner(settings.pruner, settings.pruner_warmup_epochs, settings.pruner_startup_trials)
    study = optuna.load_study(study_name=settings.study_name, storage=storage, pruner=pruner)
    # A Trial object is built from the storage's trial id, which its public API gives by number.
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    return JobTrial(optuna.Trial(study, trial_id), study, objective)
