"""The batch frontier: largest workable batch per k, as a table, files and plots.

Each ``task=max_batch`` job hands its sweep its frontier row (``JobOutcome``); ``report``
writes them as ``batch_frontier.csv``/``.json`` and two plots in the sweep folder,
prints the table and attaches everything to the sweep's MLflow parent run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


COLUMNS = ("k", "max_batch_size", "recommended_batch_size", "peak_memory_mb", "tokens_per_s", "probes",
           "budget_mb", "cached", "job")


def table(rows: list[dict]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


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
    """Peak memory vs batch (budget line, fitted model) and tokens/s vs batch, a line per k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_m, ax_m = plt.subplots(figsize=(7, 4.5))
    fig_t, ax_t = plt.subplots(figsize=(7, 4.5))
    budgets = set()
    for row in sorted(rows, key=lambda r: r["k"]):
        label = f"k={row['k']}" + (f" {row['job']}" if row.get("job") and len(rows) > len({r['k'] for r in rows}) else "")
        probes = sorted(row["probe_log"], key=lambda p: p["batch_size"])
        ok = [p for p in probes if p["outcome"] == "ok"]
        bad = [p for p in probes if p["outcome"] != "ok"]
        line = ax_m.plot([p["batch_size"] for p in ok], [p["peak_memory_mb"] for p in ok], "o", label=label)[0]
        if bad:
            ax_m.plot([p["batch_size"] for p in bad], [p.get("peak_memory_mb") or float("nan") for p in bad],
                      "x", color=line.get_color())
            for p in bad:
                ax_m.axvline(p["batch_size"], color=line.get_color(), alpha=0.15)
        model = row.get("memory_model") or {}
        if model:
            xs = [0, max(p["batch_size"] for p in probes)]
            ax_m.plot(xs, [model["fixed_mb"] + model["per_row_mb"] * x for x in xs], "--", color=line.get_color(), alpha=0.6)
        if ok:
            ax_t.plot([p["batch_size"] for p in ok], [p["tokens_per_s"] for p in ok], "o-", label=label)
        if row.get("budget_mb"):
            budgets.add(row["budget_mb"])
    for budget in budgets:
        ax_m.axhline(budget, color="red", linewidth=1, label=f"budget {budget:,.0f} MB")
    ax_m.set(xlabel="batch size", ylabel="peak memory (MB)", title="Peak memory per probe (x: too big, --: fitted)")
    ax_t.set(xlabel="batch size", ylabel="real tokens / s", title="Throughput of the probes that fit")
    paths = []
    for fig, ax, name in ((fig_m, ax_m, "batch_memory.png"), (fig_t, ax_t, "batch_throughput.png")):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        paths.append(folder / name)
    return paths


def report(rows: list[dict], sweep_dir: Path, parent) -> None:
    """The sweep's frontier: files and plots in the sweep folder, a table, the parent run."""
    from tbptt_exp.app.console import say

    rows = sorted(rows, key=lambda r: int(r["job"]) if str(r.get("job", "")).isdigit() else 0)
    files = write_files(rows, sweep_dir)
    say("largest workable batch per k:\n" + table(rows))
    say(f"frontier written to {files[0]} (also .json, batch_memory.png, batch_throughput.png)")
    parent.log_text(table(rows), "batch_frontier.md")
    for f in files:
        parent.log_file(f)
