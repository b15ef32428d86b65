"""The job <-> sweep protocol, in one place.

What a sweep hands each job (``SweepLink``): its MLflow parent run and, for an Optuna
study, the trial the job runs as. A job may run in another process (a joblib or Slurm
launcher), so the link travels as Hydra ``hydra.job.env_set`` overrides — the one place
where a process boundary forces environment variables — and the job reads it back as a
value from its own Hydra config (``SweepLink.from_env_set``).

What a job hands its sweep (``JobOutcome``): its objective values, its run id, its final
figures and, for batch-finder and nightly jobs, the record the sweep reports on. It is
the task function's return value, which every launcher carries back to the sweeper.
Sweepers that are not tbptt-exp's get the plain objective instead.

``tracked_sweep`` is the sweep side for grid sweeps (``-m k=10,25,50``): one parent run
around the launches, then the report that fits the task (table, batch frontier,
nightly verdict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")

PARENT_RUN_ENV = "TBPTT_EXP_PARENT_RUN_ID"
TRIAL_ENV = "TBPTT_EXP_OPTUNA_TRIAL_ID"
OUTCOME_ENV = "TBPTT_EXP_RETURN_OUTCOME"  # the sweeper takes a JobOutcome, not a bare objective


@dataclass(frozen=True)
class SweepLink:
    """What a sweep hands each of its jobs."""

    parent_run_id: str | None = None
    trial_id: int | None = None
    returns_outcome: bool = False  # the sweep is tbptt-exp's and reads JobOutcome

    def overrides(self) -> list[str]:
        """Hydra overrides that carry the link into the job, in whatever process it runs."""
        env = {OUTCOME_ENV: "1"} if self.returns_outcome else {}
        if self.parent_run_id:
            env[PARENT_RUN_ENV] = self.parent_run_id
        if self.trial_id is not None:
            env[TRIAL_ENV] = str(self.trial_id)
        return [f"++hydra.job.env_set.{k}={v}" for k, v in env.items()]

    @classmethod
    def from_env_set(cls, env_set: Mapping[str, Any]) -> "SweepLink":
        trial = env_set.get(TRIAL_ENV)
        return cls(
            parent_run_id=env_set.get(PARENT_RUN_ENV) or None,
            trial_id=None if trial in (None, "") else int(trial),
            returns_outcome=str(env_set.get(OUTCOME_ENV, "")) == "1",
        )


def is_link_override(line: str) -> bool:
    return line.lstrip("+").startswith("hydra.job.env_set.TBPTT_EXP_")


@dataclass
class JobOutcome:
    """What a job hands its sweep."""

    values: list[float]  # the objective(s), in the order of ``objective``
    run_id: str | None = None
    summary: dict[str, float] = field(default_factory=dict)  # final figures, for the sweep's table
    frontier_row: dict | None = None  # task=max_batch: the batch frontier for this job's k
    nightly_entry: dict | None = None  # nightly.record: a matrix entry and its figures

    @property
    def objective(self) -> float | list[float]:
        """What any Hydra sweeper optimises: one value, or a list for several objectives."""
        return self.values[0] if len(self.values) == 1 else self.values


SUMMARY_METRICS = {
    "val_loss": "{:.4f}",
    "train_loss": "{:.4f}",
    "tokens_per_s": "{:,.0f}",
    "peak_memory_mb": "{:,.1f}",
    "padding_waste": "{:.1%}",
}


def results_table(jobs: list[tuple[list[str], str, JobOutcome | None]], swept: dict[str, str] | None = None) -> str:
    """The jobs of a sweep as a Markdown table: their swept values, status and final figures."""
    from tbptt_exp.app.sweep_summary import label

    lines = ["| run | status | " + " | ".join(SUMMARY_METRICS) + " |", "|---|---|" + "---:|" * len(SUMMARY_METRICS)]
    for overrides, status, outcome in jobs:
        figures = outcome.summary if outcome else {}
        cells = [fmt.format(figures[m]) if figures.get(m) is not None else "" for m, fmt in SUMMARY_METRICS.items()]
        lines.append(f"| {label(overrides, swept or {})} | {status} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(config, key: str, schema: type[T]) -> T:
    """One settings group of a sweep's composed config (a sweep has no single experiment)."""
    from omegaconf import OmegaConf

    node = config[key]
    if OmegaConf.get_type(node) is schema:  # typed by the schema already: keep deletions (~key.entry)
        return OmegaConf.to_object(node)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def tracked_sweep(config, launch: Callable[[SweepLink, int], list]) -> list:
    """Run a grid sweep under one MLflow parent run and report on its jobs.

    ``config`` is the sweep's composed config (with its ``hydra`` node); ``launch(link,
    rounds)`` starts every job with the given link, the whole grid ``rounds`` times (a
    nightly's repeats; else once), and returns Hydra's ``JobReturn``s. Raises
    ``SystemExit`` with the nightly verdict's code when that is not 0.
    """
    from hydra.core.utils import JobStatus

    from omegaconf import OmegaConf

    from tbptt_exp.app import frontier, nightly, sweep_summary
    from tbptt_exp.app.console import say
    from tbptt_exp.app.run import environment_tags, make_tracker
    from tbptt_exp.core.config import DeviceConfig, NightlyConfig, TrackingConfig, objective_names

    tracking = section(config, "tracking", TrackingConfig)
    tracker = make_tracker(tracking)
    sweep_dir = Path(config.hydra.sweep.dir)
    overrides = list(config.hydra.overrides.task)
    preset = config.hydra.sweeper.get("params")
    swept, fixed = sweep_summary.settings(overrides, OmegaConf.to_container(preset) if preset else {})
    task = str(config.get("task", "train"))
    exit_code = 0
    with tracker.run(
        name=tracking.run_name or sweep_summary.name(swept, fixed, task, section(config, "device", DeviceConfig).memory_budget_mb),
        params={f"swept.{k}": v for k, v in swept.items()} | fixed,
        tags={
            **environment_tags(),
            "tbptt_exp.kind": "sweep",
            "hydra.overrides": " ".join(overrides),
            "hydra.sweep_dir": str(sweep_dir.resolve()),
        },
    ) as parent:
        if parent.run_id:
            say(f"sweep tracked as parent {parent.link}")
        nightly_cfg = section(config, "nightly", NightlyConfig)
        rounds = nightly_cfg.rounds if nightly_cfg.record else 1
        if rounds > 1:
            say(f"nightly: the matrix runs {rounds} times, round after round")
        returns = launch(SweepLink(parent_run_id=parent.run_id, returns_outcome=True), rounds)
        outcomes = [r.return_value if r.status == JobStatus.COMPLETED else None for r in returns]
        done = [o for o in outcomes if o is not None]
        rows = [o.frontier_row for o in done if o.frontier_row is not None]
        entries = [o.nightly_entry for o in done if o.nightly_entry is not None]
        if rows:
            frontier.report(rows, sweep_dir, parent)
        elif entries:
            exit_code = nightly.report(entries, sweep_dir, nightly_cfg, tracker, parent)
        else:
            jobs = [(list(r.overrides), "FINISHED" if o else "FAILED", o) for r, o in zip(returns, outcomes)]
            table = results_table(jobs, swept)
            say("sweep results:\n" + table)
            parent.log_text(table, "sweep_results.md")
            objective = objective_names(str(config.get("objective", "val_loss")))[0]
            finished = [(list(r.overrides), o) for r, o in zip(returns, outcomes)]
            metrics, tags = sweep_summary.summary_metrics(finished, objective, swept)
            parent.log_metrics(metrics)
            parent.set_tags(tags)
            if tags:
                say(f"best {objective}: {metrics[f'best/{objective}']:.4f} with {tags['best.settings']}")
            for path in sweep_summary.plots(finished, swept, objective, sweep_dir):
                parent.log_file(path)
    parent.announce(say, "the sweep (its runs are beneath it)")
    if exit_code:
        raise SystemExit(exit_code)
    return returns
