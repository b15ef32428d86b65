"""A grid sweep (``-m k=10,25,50``) and what its parent run shows.

``tracked_sweep`` is the sweep side: one MLflow parent run around the launches, then the
report that fits the task (a batch frontier, a nightly verdict, or the grid's own). The
parent is named after what was swept, holds the swept and fixed settings as params, the
jobs as a table, the best job as metrics, and plots of each figure against each swept
setting: the MLflow UI lists it above its children, and it alone answers "what was
compared, and what won". Jobs are (overrides, ``JobResult`` or None) pairs; the figures
shown and which way is better come from ``measure.FIGURES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from tbptt_exp.app import tables
from tbptt_exp.app.batch import frontier
from tbptt_exp.app.console import error, say
from tbptt_exp.app.settings import NightlyConfig, TrackingConfig
from tbptt_exp.app.sweep.sweep import JobEvents, JobResult, SweepLink, section
from tbptt_exp.app.tracking import metrics as names
from tbptt_exp.app.tracking.provenance import environment_tags
from tbptt_exp.app.tracking.run import make_tracker
from tbptt_exp.core.config import DeviceConfig, objective_names
from tbptt_exp.core.measure import FIGURES, PEAK_MEMORY, REAL_TOKENS, SWEEP_TABLE


def settings(task_overrides: list[str], sweeper_params: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(swept, fixed): the settings a sweep varies (command line and preset) and the ones it
    sets once. As in Hydra's sweeper, the command line wins over a preset's params: with
    ``sweep=max_batch k=25`` the sweep is ``k=25``, not the preset's ``k=10,25,50``. Where runs
    are recorded (``tracking.*``) and the sweep's own links are left out."""
    swept = {str(k): str(v) for k, v in (sweeper_params or {}).items()}
    fixed: dict[str, str] = {}
    for o in OverridesParser.create().parse_overrides(task_overrides):
        if o.is_hydra_override() or o.key_or_group.startswith("tracking."):  # the sweep's links are hydra.*
            continue
        value = "(deleted)" if o.is_delete() else o.input_line.split("=", 1)[1]
        (swept if o.is_sweep_override() or o.key_or_group in swept else fixed)[o.key_or_group] = value
    return swept, fixed


def name(swept: dict[str, str], fixed: dict[str, str], task: str, budget_mb: float | None) -> str:
    """``k=10,25,50``; ``max_batch k=10,25 budget 300 MB``; ``nightly engine=... k=25,50``."""
    text = " ".join(f"{k}={v}" for k, v in swept.items()) or "sweep"
    kind = fixed.get("sweep") or (task if task != "train" else "")
    if kind:
        text = f"{kind} {text}"
    if task == "max_batch" and budget_mb:
        text += f" budget {budget_mb:g} MB"
    return text


def label(overrides: list[str], swept: dict[str, str]) -> str:
    """A job by its swept values only (``k=25 padding=pack``)."""
    picked = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    return " ".join(picked) or " ".join(o for o in overrides if not o.lstrip("+").startswith("hydra."))


def results_table(jobs: list[tuple[list[str], JobResult | None]], swept: dict[str, str] | None = None) -> str:
    """The jobs of a sweep as a Markdown table: their swept values, status and final figures."""
    rows = []
    for overrides, result in jobs:
        figures = result.summary if result else {}
        cells = [f.show(figures[f.name]) if figures.get(f.name) is not None else "" for f in SWEEP_TABLE]
        rows.append([label(overrides, swept or {}), "FINISHED" if result else "FAILED", *cells])
    return tables.markdown(["run", "status", *(f.name for f in SWEEP_TABLE)], rows, align="ll" + "r" * len(SWEEP_TABLE))


def best(jobs: list[tuple[list[str], JobResult | None]], objective: str) -> tuple[list[str], JobResult] | None:
    """The job with the best first objective, in the direction ``measure.FIGURES`` gives it."""
    scored = [(o, result) for o, result in jobs if result is not None and result.values
              and not math.isnan(result.values[0])]
    if not scored:
        return None
    sign = -1 if FIGURES[objective].higher_is_better else 1
    return min(scored, key=lambda job: sign * job[1].values[0])


def summary_metrics(jobs: list[tuple[list[str], JobResult | None]], objective: str, swept: dict[str, str]) -> tuple[dict, dict]:
    """(metrics, tags) for the parent: the best objective and that job's figures and settings."""
    top = best(jobs, objective)
    if top is None:
        return {}, {}
    overrides, result = top
    found = {names.best(objective): result.values[0]}
    found |= {names.best(k): v for k, v in result.summary.items() if v is not None and k != objective}
    found[names.SWEEP_JOBS] = len(jobs)
    found[names.SWEEP_FAILED_JOBS] = sum(result is None for _, result in jobs)
    return found, {"best.settings": label(overrides, swept), "best.run_id": result.run_id}


def grid_report(jobs: list[tuple[list[str], JobResult | None]], swept: dict[str, str], objective: str,
           folder: Path, parent) -> None:
    """The grid's report: the table printed and on the parent, the best job, the plots."""
    table = results_table(jobs, swept)
    say("sweep results:\n" + table)
    parent.log_text(table, "sweep_results.md")
    metrics, tags = summary_metrics(jobs, objective, swept)
    parent.log_metrics(metrics)
    parent.set_tags(tags | {"mlflow.note.content": grid_note(jobs, swept, objective, metrics, tags)})
    for step, values in by_swept_value(jobs, swept).items():  # the chart view draws them against the value
        parent.log_metrics(values, step=step)
    if tags:
        say(f"best {objective}: {FIGURES[objective].show(metrics[names.best(objective)])} with {tags['best.settings']}")
    for path in plots(jobs, swept, objective, folder):
        parent.log_file(path)


def grid_note(jobs, swept: dict[str, str], objective: str, metrics: dict, tags: dict) -> str:
    """The parent run's description: the answer first, with what it cost."""
    failed = sum(result is None for _, result in jobs)
    count = f"{len(jobs)} jobs" + (f", {failed} failed" if failed else "")
    if not tags:
        return f"No job of this sweep finished ({count})."
    cost = ", ".join(f.show(metrics[names.best(f.name)], unit=True) for f in (REAL_TOKENS, PEAK_MEMORY)
                     if metrics.get(names.best(f.name)) is not None)
    return (f"**Best {objective} {FIGURES[objective].show(metrics[names.best(objective)])} with {tags['best.settings']}**"
            + (f" ({cost})" if cost else "") + f" of {count}, sweeping {' '.join(f'{k}={v}' for k, v in swept.items())}."
            "\n\nEach job is a run beneath this one; `sweep_results.md` compares them all and "
            "`sweep_<setting>.png` draws every job against each swept setting.")


def by_swept_value(jobs, swept: dict[str, str]) -> dict[int, dict[str, float]]:
    """Each job's table figures as ``by_k/val_loss`` at step = its value of the one swept
    setting, where that is an integer (``k``, ``batch_size``): MLflow charts a metric
    against its step, so the parent's chart view draws the sweep's curve."""
    if len(swept) != 1:
        return {}
    (key,) = swept
    points: dict[int, dict[str, float]] = {}
    for overrides, result in jobs:
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "")
        if result is None or not value.lstrip("-").isdigit():
            continue
        points[int(value)] = {names.by_value(key, name): v for name, v in result.summary.items() if v is not None}
    return points


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plots(jobs: list[tuple[list[str], JobResult | None]], swept: dict[str, str], objective: str, folder: Path) -> list[Path]:
    """One picture per swept setting: the objective, real tokens/s and allocator peak of every
    job against that setting's value (markers, no lines: each point is one run)."""
    import matplotlib  # only a sweep's report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [(o, result) for o, result in jobs if result is not None]
    paths = []
    for key in swept if done else ():  # every job failed: nothing to draw
        values = [next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "?")
                  for overrides, _ in done]
        numbers = _numeric(values)
        categories = sorted(set(values), key=lambda v: (numbers is None, v))
        xs = numbers if numbers is not None else [categories.index(v) for v in values]
        panels = {objective: [result.values[0] for _, result in done]}
        panels |= {f.axis: [result.summary.get(f.name) for _, result in done] for f in (REAL_TOKENS, PEAK_MEMORY)}
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, (title, ys) in zip(axes, panels.items()):
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o", markersize=7, alpha=0.8)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(key)
            ax.grid(alpha=0.3)
            if numbers is None:
                ax.set_xticks(range(len(categories)), categories, rotation=20)
            elif min(numbers) > 0 and max(numbers) / min(numbers) >= 4:
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted(set(numbers)), [f"{n:g}" for n in sorted(set(numbers))])
        fig.suptitle(f"every run of the sweep against {key}", fontsize=11)
        fig.tight_layout()
        path = folder / f"sweep_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        paths.append(path)
    return paths


@dataclass
class SaidJobEvents:
    """A grid sweep's ``JobEvents``: one line as each job starts, one as each fails."""

    swept: dict[str, str]

    def started(self, index: int, total: int, overrides: list[str]) -> None:
        say(f"job {index + 1}/{total}: {label(overrides, self.swept)}")

    def failed(self, overrides: list[str], why: BaseException) -> None:
        error(f"job {label(overrides, self.swept)} failed: {why}")


def tracked_sweep(config, launch: Callable[[SweepLink, int, JobEvents], list]) -> list:
    """Run a grid sweep under one MLflow parent run and report on its jobs.

    ``config`` is the sweep's composed config (with its ``hydra`` node); ``launch(link,
    rounds, events)`` starts every job with the given link, the whole grid ``rounds`` times
    (a nightly's repeats; else once), tells ``events`` (``JobEvents``) of each job it starts
    and each that failed, and returns Hydra's ``JobReturn``s, a failed job's with the value
    None. Raises ``SystemExit`` with the nightly verdict's code when that is not 0, else 1
    when a job failed.
    """
    tracking = section(config, "tracking", TrackingConfig)
    tracker = make_tracker(tracking)
    overrides = list(config.hydra.overrides.task)
    preset = config.hydra.sweeper.get("params")
    swept, fixed = settings(overrides, OmegaConf.to_container(preset) if preset else {})
    budget = section(config, "device", DeviceConfig).memory_budget_mb
    nightly = section(config, "nightly", NightlyConfig)
    sweep_dir = Path(config.hydra.sweep.dir)
    with tracker.run(
        name=tracking.run_name or name(swept, fixed, str(config.task), budget),
        params={f"swept.{k}": v for k, v in swept.items()} | fixed,
        tags={**environment_tags(), "tbptt_exp.kind": "sweep", "hydra.overrides": " ".join(overrides),
              "hydra.sweep_dir": str(sweep_dir.resolve())},
    ) as parent:
        if parent.run_id:
            say(f"sweep tracked as parent {parent.where}")
        rounds = nightly.rounds if nightly.record else 1
        if rounds > 1:
            say(f"nightly: the matrix runs {rounds} times, round after round")
        returns = launch(SweepLink(parent_run_id=parent.run_id, returns_result=True), rounds, SaidJobEvents(swept))
        exit_code = report(returns, swept, str(config.objective), sweep_dir, parent, tracker, nightly)
    parent.announce(say, "the sweep (its runs are beneath it)")
    if exit_code:
        raise SystemExit(exit_code)
    return returns


def report(returns: list, swept: dict[str, str], objective: str, sweep_dir: Path, parent, tracker,
           nightly: NightlyConfig) -> int:
    """The report that fits the jobs: a batch frontier, a nightly verdict (its exit code), or
    the grid's results table, best job and plots."""
    results = [r.return_value if r.status == JobStatus.COMPLETED else None for r in returns]
    done = [result for result in results if result is not None]
    failed = len(results) - len(done)  # each said in one line as it failed (``sweep.KeepFailures``)
    rows = [result.frontier_row for result in done if result.frontier_row is not None]
    entries = [result.nightly_entry for result in done if result.nightly_entry is not None]
    if nightly.record:
        # The nightly's statistics (SciPy) load for a nightly only; a failed entry is a gap.
        from tbptt_exp.app.nightly import report as nightly_report

        failures = [label(list(r.overrides), swept) for r, result in zip(returns, results) if result is None]
        return nightly_report.report(entries, sweep_dir, nightly, tracker, parent, list(dict.fromkeys(failures)))
    if rows:
        frontier.report(rows, sweep_dir, parent)
    else:
        jobs = [(list(r.overrides), result) for r, result in zip(returns, results)]
        grid_report(jobs, swept, objective_names(objective)[0], sweep_dir, parent)
    if failed:
        error(f"{failed} of {len(results)} jobs failed (each said above)")
    return 1 if failed else 0
