"""The batch frontier: largest workable batch per k, as a table, files and plots.

Each ``task=max_batch`` job hands its sweep its frontier row (``JobResult``); ``report``
writes them as ``batch_frontier.csv``/``.json`` and two plots in the sweep folder,
prints the table and attaches everything to the sweep's MLflow parent run.
"""

from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from tbptt_exp.app import tables
from tbptt_exp.app.batch_finder import Frontier
from tbptt_exp.app.console import say
from tbptt_exp.core.measure import PEAK_MEMORY, REAL_TOKENS, REAL_TOKENS_SPREAD

# A row is a ``Frontier`` (its probe log and fingerprint aside) and what the job set apart.
COLUMNS = ("k", "precision", "unroll",
           *(f.name for f in fields(Frontier) if f.name not in ("k", "probe_log", "fingerprint")), "model", "job")


FRONTIER_METRICS = ("max_batch_size", "recommended_batch_size", REAL_TOKENS.name, PEAK_MEMORY.name)


def answer(row: dict) -> str:
    """One k's answer in words (``Frontier.answer``)."""
    known = {f.name for f in fields(Frontier)}
    return Frontier(**{k: v for k, v in row.items() if k in known}).answer()


def note(rows: list[dict]) -> str:
    """The sweep parent's description: the answer per k, then where the detail is."""
    budget = next((r["budget_mb"] for r in rows if r.get("budget_mb")), None)
    within = f"within a budget of {budget:g} MB" if budget else "by real out-of-memory (no budget)"
    lines = [f"- {answer(r)}" for r in sorted(rows, key=lambda r: r["k"])]
    return (f"**Largest workable batch per k, {within}:**\n\n" + "\n".join(lines)
            + "\n\nSizes are probed by real training runs, one process each; `frontier/*` metrics are charted "
            "against k (step), each k's probes are in its run beneath this one, and `batch_memory.png`, "
            "`batch_throughput.png` draw them all.")


def table(rows: list[dict]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}"
        return "" if v is None else str(v)

    return tables.markdown(list(COLUMNS), [[cell(r.get(c)) for c in COLUMNS] for r in rows], align="r" * len(COLUMNS))


def line_label(row: dict, rows: list[dict]) -> str:
    """``k=25``, with the model, precision or unroll setting when the sweep varies them, else the job."""
    label = f"k={row['k']}"
    for setting in ("model", "precision", "unroll"):
        if len({r.get(setting) for r in rows}) > 1:
            label += f" {setting}={row.get(setting)}"
    if row.get("job") and len(rows) > len({label_key(r) for r in rows}):
        label += f" (job {row['job']})"
    return label


def label_key(row: dict) -> tuple:
    return row["k"], row.get("model"), row.get("precision"), row.get("unroll")


def write_files(rows: list[dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / "batch_frontier.csv", folder / "batch_frontier.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1, default=str))
    return [csv_path, json_path, *plot(rows, folder)]


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """Peak memory vs batch (budget, max and recommended marked) and tokens/s vs batch with
    each probe's spread, a colour per k; log-scaled batch axis, no lines between probes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig_m, ax_m = plt.subplots(figsize=(7.5, 4.8))
    fig_t, ax_t = plt.subplots(figsize=(7.5, 4.8))
    budgets = set()
    for row in sorted(rows, key=lambda r: r["k"]):
        label = line_label(row, rows)
        probes = sorted(row["probe_log"], key=lambda p: p["batch_size"])
        ok = [p for p in probes if p["outcome"] == "ok" and p.get(PEAK_MEMORY.name) is not None]
        bad = [p for p in probes if p["outcome"] != "ok"]
        colour = ax_m.plot([p["batch_size"] for p in ok], [p[PEAK_MEMORY.name] for p in ok], "o", label=label)[0].get_color()
        ax_m.plot([p["batch_size"] for p in bad], [p.get(PEAK_MEMORY.name) or float("nan") for p in bad], "x",
                  color=colour, markersize=9)
        if row["max_batch_size"]:
            ax_m.axvline(row["max_batch_size"], color=colour, linestyle="-", alpha=0.5)
        if row["recommended_batch_size"]:
            ax_m.axvline(row["recommended_batch_size"], color=colour, linestyle=":", alpha=0.8)
        timed = [p for p in ok if p.get(REAL_TOKENS.name)]
        ax_t.errorbar([p["batch_size"] for p in timed], [p[REAL_TOKENS.name] for p in timed],
                      yerr=[(p.get(REAL_TOKENS_SPREAD.name) or 0) / 2 for p in timed], fmt="o", capsize=3, label=label)
        if row.get("budget_mb"):
            budgets.add((row["budget_mb"], row.get("headroom") or 0.0))
    handles, _ = ax_m.get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", linestyle="", color="grey", label="fits"),
                Line2D([], [], marker="x", linestyle="", color="grey", label="too big (its peak when it stopped)"),
                Line2D([], [], color="grey", alpha=0.5, label="largest that fits"),
                Line2D([], [], color="grey", linestyle=":", label="recommended")]
    for budget, headroom in sorted(budgets):
        handles.append(ax_m.axhline(budget, color="red", linewidth=1, label=f"budget {budget:,.0f} MB"))
        if headroom:
            handles.append(ax_m.axhline(budget * (1 - headroom), color="red", linewidth=1, linestyle="--",
                                        label=f"budget less {headroom:.0%} headroom (recommended below)"))
    ax_m.legend(handles=handles, fontsize=8)
    ax_t.legend(fontsize=8)
    ax_m.set(xlabel="batch size", ylabel="peak memory (MB)", title="Peak memory per probe")
    ax_t.set(xlabel="batch size", ylabel="real tokens / s (median, ± half IQR)", title="Throughput of the probes that fit")
    paths = []
    for fig, ax, name in ((fig_m, ax_m, "batch_memory.png"), (fig_t, ax_t, "batch_throughput.png")):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=150)
        plt.close(fig)
        paths.append(folder / name)
    return paths


def report(rows: list[dict], sweep_dir: Path, parent) -> None:
    """The sweep's frontier: files and plots in the sweep folder, a table, the parent run."""
    rows = sorted(rows, key=lambda r: int(r["job"]) if str(r.get("job", "")).isdigit() else 0)
    files = write_files(rows, sweep_dir)
    say("largest workable batch per k:\n" + table(rows))
    for row in rows:
        if row.get("max_is_ceiling"):
            say(answer(row))
    say(f"frontier written to {files[0]} (also .json, batch_memory.png, batch_throughput.png)")
    parent.log_text(table(rows), "batch_frontier.md")
    for f in files:
        parent.log_file(f)
    parent.set_tags({"mlflow.note.content": note(rows)})
    for row in rows:  # step = k: the parent's chart view draws the frontier against k
        parent.log_metrics({f"frontier/{name}": row.get(name) for name in FRONTIER_METRICS}, step=int(row["k"]))
