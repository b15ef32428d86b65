"""The batch frontier: the largest and the useful batch per k, as a table, files and plots.

Each ``task=max_batch`` job hands its sweep its frontier row (``JobResult``); ``report``
writes them as ``batch_frontier.csv``/``.json`` and three plots in the sweep folder,
prints the table and attaches everything to the sweep's MLflow parent run.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tbptt_exp.app import tables
from tbptt_exp.app.batch.finder import Frontier, Probe
from tbptt_exp.app.console import say
from tbptt_exp.app.tracking import metrics
from tbptt_exp.core.measure import GOODPUT, PEAK_MEMORY, REAL_TOKENS, REAL_TOKENS_SPREAD


@dataclass
class FrontierRow(Frontier):
    """One k's answer as a row of the sweep's frontier: its ``Frontier`` and what its job set apart."""

    job: str = ""  # the job's folder in the sweep
    model: str = ""  # preset (shape)
    precision: str = ""
    unroll: str = ""
    headroom: float = 0.0  # batch_finder.headroom: the recommended size leaves this share of the budget free

    @classmethod
    def of(cls, found: Frontier, **job) -> FrontierRow:
        return cls(**{f.name: getattr(found, f.name) for f in fields(Frontier)}, **job)


# The table's columns: the ``Frontier`` (its probe log and fingerprint aside) and what the job set apart.
COLUMNS = ("k", "precision", "unroll",
           *(f.name for f in fields(Frontier) if f.name not in ("k", "probe_log", "fingerprint")), "model", "job")


FRONTIER_METRICS = ("max_batch_size", "recommended_batch_size", "useful_batch_size", "critical_batch_size",
                    REAL_TOKENS.name, PEAK_MEMORY.name)


def note(rows: list[FrontierRow]) -> str:
    """The sweep parent's description: the answer per k, then where the detail is."""
    budget = next((r.budget_mb for r in rows if r.budget_mb), None)
    within = f"within a budget of {budget:g} MB" if budget else "by real out-of-memory (no budget)"
    lines = [f"- {r.answer()}" for r in sorted(rows, key=lambda r: r.k)]
    return (f"**Largest and useful batch per k, {within}:**\n\n" + "\n".join(lines)
            + "\n\nSizes are probed by real training runs, one process each. The largest fits; the useful one "
            "trains best per second: the probed size of highest goodput, tokens/s times the statistical efficiency "
            "(B_noise + B_ref) / (B_noise + B) that the gradient noise scale B_noise gives. "
            f"`{metrics.frontier('*')}` metrics are "
            "charted against k (step), each k's probes are in its run beneath this one, and `batch_memory.png`, "
            "`batch_throughput.png`, `batch_goodput.png` draw them all.")


def table(rows: list[FrontierRow]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}"
        return "" if v is None else str(v)

    return tables.markdown(list(COLUMNS), [[cell(getattr(r, c)) for c in COLUMNS] for r in rows], align="r" * len(COLUMNS))


def line_label(row: FrontierRow, rows: list[FrontierRow]) -> str:
    """``k=25``, with the model, precision or unroll setting when the sweep varies them, else the job."""
    label = f"k={row.k}"
    for setting in ("model", "precision", "unroll"):
        if len({getattr(r, setting) for r in rows}) > 1:
            label += f" {setting}={getattr(row, setting)}"
    if row.job and len(rows) > len({label_key(r) for r in rows}):
        label += f" (job {row.job})"
    return label


def label_key(row: FrontierRow) -> tuple:
    return row.k, row.model, row.precision, row.unroll


def write_files(rows: list[FrontierRow], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / "batch_frontier.csv", folder / "batch_frontier.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    return [csv_path, json_path, *plot(rows, folder)]


def plot(rows: list[FrontierRow], folder: Path) -> list[Path]:
    """Peak memory, tokens/s and goodput against batch size, a colour per k (the same colour
    in each plot); log-scaled batch axis, no lines between probes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ordered = sorted(rows, key=lambda r: r.k)
    for draw, name in ((draw_memory, "batch_memory.png"), (draw_throughput, "batch_throughput.png"),
                       (draw_goodput, "batch_goodput.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for colour, row in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(ordered), ordered):
            draw(ax, row, line_label(row, rows), colour)
        legend(ax, draw, rows)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=150)
        plt.close(fig)
        paths.append(folder / name)
    return paths


def fitted(row: FrontierRow) -> list[Probe]:
    return [p for p in sorted(row.probe_log, key=lambda p: p.batch_size)
            if p.outcome == "ok" and getattr(p, PEAK_MEMORY.name) is not None]


def draw_memory(ax, row: FrontierRow, label: str, colour: str) -> None:
    """Each probe's peak (x: too big, at its peak when it stopped); the largest and recommended sizes."""
    ok, bad = fitted(row), [p for p in row.probe_log if p.outcome != "ok"]
    ax.plot([p.batch_size for p in ok], [getattr(p, PEAK_MEMORY.name) for p in ok], "o", color=colour, label=label)
    ax.plot([p.batch_size for p in bad], [getattr(p, PEAK_MEMORY.name) or float("nan") for p in bad], "x",
            color=colour, markersize=9)
    if row.max_batch_size:
        ax.axvline(row.max_batch_size, color=colour, linestyle="-", alpha=0.5)
    if row.recommended_batch_size:
        ax.axvline(row.recommended_batch_size, color=colour, linestyle=":", alpha=0.8)
    ax.set(xlabel="batch size", ylabel="peak memory (MB)", title="Peak memory per probe")


def draw_throughput(ax, row: FrontierRow, label: str, colour: str) -> None:
    """Each fitting probe's median tokens/s, ± half its interquartile range."""
    timed = [p for p in fitted(row) if getattr(p, REAL_TOKENS.name)]
    ax.errorbar([p.batch_size for p in timed], [getattr(p, REAL_TOKENS.name) for p in timed],
                yerr=[(getattr(p, REAL_TOKENS_SPREAD.name) or 0) / 2 for p in timed], fmt="o", capsize=3, color=colour,
                label=label)
    ax.set(xlabel="batch size", ylabel="real tokens / s (median, ± half IQR)", title="Throughput of the probes that fit")


def draw_goodput(ax, row: FrontierRow, label: str, colour: str) -> None:
    """Each scored probe's goodput, the batch the noise scale was measured at (a square around
    its probe) and the useful batch (a star)."""
    scored = [p for p in fitted(row) if getattr(p, GOODPUT.name) is not None]
    if not scored:
        return
    ax.plot([p.batch_size for p in scored], [getattr(p, GOODPUT.name) for p in scored], "o", color=colour,
            label=f"{label} (critical batch ≈ {row.critical_batch_size})")
    measured_at = [getattr(p, GOODPUT.name) for p in scored if p.batch_size == row.noise_batch_size]
    if measured_at:  # a ring on the scored point: the warm-up's own tokens/s include its compiling
        ax.plot([row.noise_batch_size], measured_at, "s", markersize=12, markerfacecolor="none", color=colour)
    if row.useful_batch_size:
        ax.axvline(row.useful_batch_size, color=colour, linestyle="--", alpha=0.8)
        ax.plot([row.useful_batch_size], [getattr(row, GOODPUT.name)], "*", color=colour, markersize=14)
    ax.set(xlabel="batch size", ylabel=GOODPUT.axis,
           title="Goodput: tokens/s × statistical efficiency from the gradient noise scale")


def legend(ax, draw, rows: list[FrontierRow]) -> None:
    """Each plot's legend: its k's, and what its marks mean (the memory plot: the budgets)."""
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    if draw is draw_memory:
        handles += [Line2D([], [], marker="o", linestyle="", color="grey", label="fits"),
                    Line2D([], [], marker="x", linestyle="", color="grey", label="too big (its peak when it stopped)"),
                    Line2D([], [], color="grey", alpha=0.5, label="largest that fits"),
                    Line2D([], [], color="grey", linestyle=":", label="recommended")]
        for budget, headroom in sorted({(r.budget_mb, r.headroom or 0.0) for r in rows if r.budget_mb}):
            handles.append(ax.axhline(budget, color="red", linewidth=1, label=f"budget {budget:,.0f} MB"))
            if headroom:
                handles.append(ax.axhline(budget * (1 - headroom), color="red", linewidth=1, linestyle="--",
                                          label=f"budget less {headroom:.0%} headroom (recommended below)"))
    elif draw is draw_goodput:
        handles += [Line2D([], [], color="grey", linestyle="--", marker="*", markersize=10, label="useful: highest goodput"),
                    Line2D([], [], marker="s", linestyle="", color="grey", markerfacecolor="none",
                           label="the batch the noise scale was measured at")]
    ax.legend(handles=handles, fontsize=8)


def report(rows: list[FrontierRow], sweep_dir: Path, parent) -> None:
    """The sweep's frontier: files and plots in the sweep folder, a table, the parent run."""
    rows = sorted(rows, key=lambda r: int(r.job) if r.job.isdigit() else 0)
    files = write_files(rows, sweep_dir)
    say("largest and useful batch per k:\n" + table(rows))
    for row in rows:
        if row.max_is_ceiling:
            say(row.answer())
    say(f"frontier written to {files[0]} (also .json, batch_memory.png, batch_throughput.png, batch_goodput.png)")
    parent.log_text(table(rows), "batch_frontier.md")
    for f in files:
        parent.log_file(f)
    parent.set_tags({"mlflow.note.content": note(rows)})
    for row in rows:  # step = k: the parent's chart view draws the frontier against k
        parent.log_metrics({metrics.frontier(name): getattr(row, name) for name in FRONTIER_METRICS}, step=row.k)
