"""The job <-> sweep protocol, in one place.

What Hydra hands each job (``JobContext``, built by ``hydra_app``): its overrides, output
folder and sweeper settings, and its ``SweepLink``. What a sweep hands each job (``SweepLink``): its MLflow parent run and, for an Optuna
study, the number of the trial the job runs as. A job may run in another process (a
joblib or Slurm launcher), so the link travels as Hydra ``hydra.job.env_set`` overrides —
the one place where a process boundary forces environment variables — and the job reads
it back as a value from its own Hydra config (``SweepLink.from_env_set``).

What a job hands its sweep (``JobResult``): its objective values, its run id, its final
figures and, for batch-finder and nightly jobs, the record the sweep reports on. It is
the task function's return value, which every launcher carries back to the sweeper.
Sweepers that are not tbptt-exp's get the plain objective instead.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

if TYPE_CHECKING:  # the finder loads the core: a sweeper that never finds a batch does without it
    from tbptt_exp.app.batch.frontier import FrontierRow
    from tbptt_exp.app.nightly.nightly import NightlyEntry

T = TypeVar("T")

PARENT_RUN_ENV = "TBPTT_EXP_PARENT_RUN_ID"
TRIAL_ENV = "TBPTT_EXP_OPTUNA_TRIAL"
RESULT_ENV = "TBPTT_EXP_RETURN_RESULT"  # the sweeper takes a JobResult, not a bare objective


@dataclass(frozen=True)
class SweepLink:
    """What a sweep hands each of its jobs."""

    parent_run_id: str | None = None
    trial_number: int | None = None  # the Optuna trial the job runs as, by its number in the study
    returns_result: bool = False  # the sweep is tbptt-exp's and reads JobResult

    def overrides(self) -> list[str]:
        """Hydra overrides that carry the link into the job, in whatever process it runs."""
        env = {RESULT_ENV: "1"} if self.returns_result else {}
        if self.parent_run_id:
            env[PARENT_RUN_ENV] = self.parent_run_id
        if self.trial_number is not None:
            env[TRIAL_ENV] = str(self.trial_number)
        return [f"++hydra.job.env_set.{k}={v}" for k, v in env.items()]

    @classmethod
    def from_env_set(cls, env_set: Mapping[str, Any]) -> SweepLink:
        trial = env_set.get(TRIAL_ENV)
        return cls(
            parent_run_id=env_set.get(PARENT_RUN_ENV) or None,
            trial_number=None if trial in (None, "") else int(trial),
            returns_result=str(env_set.get(RESULT_ENV, "")) == "1",
        )


@dataclass
class JobResult:
    """What a job hands its sweep."""

    values: list[float]  # the objective(s), in the order of ``objective``
    run_id: str | None = None
    summary: dict[str, float | None] = field(default_factory=dict)  # final figures, for the sweep's table
    frontier_row: FrontierRow | None = None  # task=max_batch: the batch frontier for this job's k
    nightly_entry: NightlyEntry | None = None  # nightly.record: a matrix entry and its figures

    @property
    def objective(self) -> float | list[float]:
        """What any Hydra sweeper optimises: one value, or a list for several objectives."""
        return self.values[0] if len(self.values) == 1 else self.values


@dataclass
class JobContext:
    """What the Hydra entry point hands a job."""

    overrides: list[str] = field(default_factory=list)  # the job's own task overrides
    output_dir: Path = Path(".")
    multirun: bool = False
    link: SweepLink = field(default_factory=SweepLink)
    sweeper: dict = field(default_factory=dict)  # the job's hydra.sweeper settings (Optuna: study, storage, pruner)
    config_yaml: str = ""  # the resolved config, recorded as an artifact


def job_error(job) -> BaseException | None:
    """What a failed job raised; None for a job that completed. Hydra's ``JobReturn`` gives
    it only by raising it from ``return_value``, with a line on stderr that the sweep's own
    report says better, so that line is held back."""
    if job.status == JobStatus.COMPLETED:
        return None
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            _ = job.return_value  # raises what the job raised
        except BaseException as error:  # every way a job ends is an answer here
            return error
    return None


class JobEvents(Protocol):
    """What a sweep is told as its jobs run, the one way every launcher tells it."""

    def started(self, index: int, total: int, overrides: list[str]) -> None:
        """Job ``index`` (from 0) of the sweep's ``total`` is launched."""

    def failed(self, overrides: list[str], why: BaseException) -> None:
        """The job ``overrides`` ran ended with ``why``."""


class KeepFailures:
    """A launcher whose failed jobs stay in the sweep. Hydra's basic sweeper raises the first
    failed job's error once its batch is done, which ends the sweep before its report; here
    ``events`` is told of each job as it is launched and of each failed job, which is handed
    on as a ``JobReturn`` whose value is None, so the report shows it FAILED (a nightly: a gap)."""

    def __init__(self, launcher, events: JobEvents, total: Callable[[], int], sequential: bool = False):
        self.launcher, self.events = launcher, events
        self.total = total  # the sweep's job count, known once the sweeper has expanded its grid
        self.sequential = sequential  # the launcher runs one job after another: each is said as it starts

    def launch(self, job_overrides, initial_job_idx):
        if self.sequential and len(job_overrides) > 1:
            return [ret for index, overrides in enumerate(job_overrides, start=initial_job_idx)
                    for ret in self.launch([overrides], index)]
        for index, overrides in enumerate(job_overrides, start=initial_job_idx):
            self.events.started(index, self.total(), list(overrides))
        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        for job in returns:
            error = job_error(job)
            if error is not None:
                self.events.failed(list(job.overrides), error)
                job.status, job.return_value = JobStatus.COMPLETED, None  # Hydra raises only on FAILED
        return returns


def section(config, key: str, schema: type[T]) -> T:
    """One settings group of a sweep's composed config (a sweep has no single experiment)."""
    node = config[key]
    if OmegaConf.get_type(node) is schema:  # typed by the schema already: keep deletions (~key.entry)
        return OmegaConf.to_object(node)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
