"""A Hydra sweeper for Optuna 5: pruning, constraints, shared storage and resume.

Select it with ``hydra/sweeper=optuna`` (the presets in ``sweeps/`` do). Search spaces
use the syntax of hydra-optuna-sweeper: ``choice(...)``, ``range(a,b,step)`` (b excluded),
``interval(a,b)``, ``tag(log, interval(a,b))``, ``int(...)`` and plain values. Hydra
only instantiates sweepers from the ``hydra_plugins`` package, hence this module's home;
the Optuna logic itself is in ``tbptt_exp.study``.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)
TARGET = "hydra_plugins.tbptt_exp_plugins.optuna_sweeper.OptunaSweeper"


@dataclass
class OptunaSweeperConf:
    _target_: str = TARGET
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
    heartbeat_interval_s: int = 30  # running trials of a killed worker turn FAIL after
    heartbeat_grace_s: int = 90  # this long without a heartbeat
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="tbptt_exp")


def official_plugin_installed() -> bool:
    return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = OptunaSweeperConf(**settings)
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: List[str]) -> Any:
        from tbptt_exp.study import (
            counted_trials,
            default_storage_url,
            make_pruner,
            make_sampler,
            make_storage,
            search_space,
            study_lock,
        )
        from tbptt_exp.tracking import mask_credentials

        import optuna

        s = self.settings
        if official_plugin_installed():
            print(
                "tbptt-exp: hydra-optuna-sweeper is installed too and also registers "
                "hydra/sweeper=optuna; tbptt-exp's sweeper is used. To silence this: "
                "pip uninstall hydra-optuna-sweeper",
                file=sys.stderr,
            )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Heartbeats are recorded by this sweeper (tbptt_exp.study.Heartbeat), not by optimize().
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        directions = list(s.direction) if isinstance(s.direction, (list, ListConfig)) else [s.direction]
        objectives = [n.strip() for n in str(self.config.objective).split(",")]
        if len(objectives) != len(directions):
            raise ValueError(
                f"objective={self.config.objective!r} names {len(objectives)} value(s) but "
                f"hydra.sweeper.direction has {len(directions)}: give one direction per objective"
            )
        space, fixed = search_space([f"{k}={v}" for k, v in s.params.items()] + list(arguments))
        storage_url = s.storage or default_storage_url()
        storage = make_storage(storage_url, s.heartbeat_interval_s, s.heartbeat_grace_s)
        study = optuna.create_study(
            study_name=s.study_name,
            storage=storage,
            sampler=make_sampler(s.sampler, s.seed, space),
            pruner=make_pruner(s.pruner, s.pruner_warmup_epochs, s.pruner_startup_trials),
            directions=directions,
            load_if_exists=True,
        )
        optuna.storages.fail_stale_trials(study)  # trials left RUNNING by a killed worker
        n_trials = s.n_trials
        grid_size = getattr(study.sampler, "grid_size", None)
        if grid_size is not None and grid_size < n_trials:
            print(f"[tbptt-exp] the grid has {grid_size} points: n_trials={n_trials} lowered to {grid_size}", flush=True)
            n_trials = grid_size
        parent = StudyParentRun.open(self.config, study, storage, s)
        print(
            f"[tbptt-exp] study '{s.study_name}' at {mask_credentials(storage_url)}: "
            f"{counted_trials(study)}/{n_trials} trials so far, sampler={s.sampler}, pruner={s.pruner}",
            flush=True,
        )
        try:
            while True:
                with study_lock(storage, s.study_name):
                    room = n_trials - counted_trials(study)
                    if room <= 0:
                        break
                    trials = [study.ask(space) for _ in range(min(s.n_jobs, room))]
                    for trial in trials:
                        storage.record_heartbeat(trial._trial_id)
                self._run_batch(study, storage, trials, fixed, parent)
                self._check_failure_rate(study)
        except BaseException as error:
            if parent is not None:
                parent.tracker.end(parent.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        if parent is not None:
            parent.finish_if_study_done(study, n_trials)
        report(study)
        return study

    def _run_batch(self, study, storage, trials, fixed, parent) -> None:
        import optuna

        from tbptt_exp.study import Heartbeat, trial_env
        from tbptt_exp.tracking import PARENT_RUN_ENV

        batch = []
        for trial in trials:
            env = trial_env(trial)
            if parent is not None:
                env[PARENT_RUN_ENV] = parent.run_id
            batch.append(
                [*fixed, *(f"{k}={v}" for k, v in trial.params.items())]
                + [f"++hydra.job.env_set.{k}={v}" for k, v in env.items()]
            )
        self.validate_batch_is_legal(batch)
        with Heartbeat(storage, [t._trial_id for t in trials], self.settings.heartbeat_interval_s):
            returns: Sequence[JobReturn] = self.launcher.launch(batch, initial_job_idx=self.job_idx)
        self.job_idx += len(batch)
        for trial, ret in zip(trials, returns):
            if ret.status == JobStatus.COMPLETED:
                values = ret.return_value
                study.tell(trial, values if isinstance(values, (list, tuple)) else [values])
            elif isinstance(ret._return_value, optuna.TrialPruned):
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                error = ret._return_value
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                print(f"[tbptt-exp] trial {trial.number} failed: {reason}", flush=True)

    def _check_failure_rate(self, study) -> None:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        failed = [t for t in trials if t.state == TrialState.FAIL]
        if len(failed) >= 2 and len(failed) / len(trials) > self.settings.max_failure_rate:
            last = failed[-1].user_attrs.get("fail_reason", "no reason recorded")
            raise RuntimeError(
                f"stopping study '{self.settings.study_name}': {len(failed)} of {len(trials)} trials failed "
                f"(hydra.sweeper.max_failure_rate={self.settings.max_failure_rate}); last: {last}"
            )


def report(study) -> None:
    """Print the best trial, or the Pareto front of a multi-objective study."""
    from optuna.trial import TrialState

    states = {state: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    counts = ", ".join(f"{n} {state.name}" for state, n in states.items() if n)
    print(f"[tbptt-exp] study '{study.study_name}': {counts}", flush=True)
    if not states[TrialState.COMPLETE]:
        return
    if len(study.directions) == 1:
        try:
            best = study.best_trial
        except ValueError:
            print("[tbptt-exp] no feasible trial: every complete trial broke a constraint", flush=True)
            return
        print(f"[tbptt-exp] best trial {best.number}: value {best.value:.4f} params {best.params}", flush=True)
    else:
        print("[tbptt-exp] Pareto front:", flush=True)
        for t in study.best_trials:
            print(f"[tbptt-exp]   trial {t.number}: values {t.values} params {t.params}", flush=True)


class StudyParentRun:
    """The study's MLflow parent run, shared by every worker through the study's user attrs."""

    KEY = "mlflow_parent_run_id"

    def __init__(self, tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    @classmethod
    def open(cls, config: DictConfig, study, storage, settings: OptunaSweeperConf) -> "StudyParentRun | None":
        from tbptt_exp.config import TrackingConfig
        from tbptt_exp.study import study_lock
        from tbptt_exp.tracking import Tracker, environment_tags

        tracking = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrackingConfig), config.tracking))
        if not tracking.enabled:
            return None
        tracker = Tracker(tracking)
        with study_lock(storage, settings.study_name):
            run_id = study.user_attrs.get(cls.KEY)
            if run_id is None:
                run_id = tracker.start_run(
                    name=f"study {settings.study_name}",
                    params={f"sweeper.{k}": v for k, v in OmegaConf.to_container(config.hydra.sweeper).items()
                            if k not in ("_target_", "storage", "params")}
                    | {f"search.{k}": v for k, v in settings.params.items()},
                    tags={**environment_tags(), "tbptt_exp.kind": "study", "optuna.study": settings.study_name,
                          "optuna.storage": settings.storage or "default"},
                )
                study.set_user_attr(cls.KEY, run_id)
            else:
                tracker.client.update_run(run_id, status="RUNNING")  # resumed, or another worker
        print(f"[tbptt-exp] study tracked as parent {tracker.run_link(run_id)}", flush=True)
        parent = cls(tracker, run_id)
        parent.end_runs_of_failed_trials(study)
        return parent

    def end_runs_of_failed_trials(self, study) -> None:
        """Child runs left RUNNING by a killed worker end KILLED once their trial is FAIL."""
        from optuna.trial import TrialState

        failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        runs = self.tracker.client.search_runs(
            [self.tracker.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'",
        )
        for run in runs:
            if int(run.data.tags.get("optuna.trial", -1)) in failed:
                self.tracker.set_tags(run.info.run_id, {"optuna.state": "FAIL", "fail_reason": "its worker stopped"})
                self.tracker.end(run.info.run_id, "KILLED")

    def finish_if_study_done(self, study, n_trials: int) -> None:
        """The worker that sees the study complete writes the summary and ends the parent."""
        from optuna.trial import TrialState

        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if len(done) < n_trials or running:
            return
        from tbptt_exp.study_report import log_study_summary

        log_study_summary(self.tracker, self.run_id, study)
        self.tracker.end(self.run_id, "FINISHED")
