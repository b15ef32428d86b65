"""The batch frontier: largest workable batch per k, as a table, files and plots.

Each ``task=max_batch`` job writes ``batch_frontier.json`` into its Hydra job folder;
``BatchFrontierReport`` (a Hydra callback set by ``sweep=max_batch``) gathers them at
the end of the sweep into ``batch_frontier.csv``/``.json`` and two plots in the sweep
folder, prints the table and attaches everything to the sweep's MLflow parent run.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = ("k", "max_batch_size", "recommended_batch_size", "peak_memory_mb", "tokens_per_s", "probes",
           "budget_mb", "cached", "job")
JOB_FILE = "batch_frontier.json"


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


class BatchFrontierReport(Callback):
    """Gathers the jobs' frontiers at the end of a ``task=max_batch`` sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for path in sorted(sweep_dir.glob(f"*/{JOB_FILE}"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0):
            row = json.loads(path.read_text())
            rows.append(row | {"job": path.parent.name})
        if not rows:
            return
        files = write_files(rows, sweep_dir)
        print("[tbptt-exp] largest workable batch per k:\n" + table(rows), flush=True)
        print(f"[tbptt-exp] frontier written to {files[0]} (also .json, batch_memory.png, batch_throughput.png)", flush=True)
        from tbptt_exp.tracking import PARENT_RUN_ENV, Tracker
        from tbptt_exp.config import TrackingConfig
        from omegaconf import OmegaConf

        parent = os.environ.get(PARENT_RUN_ENV)
        tracking = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrackingConfig), config.tracking))
        if parent and tracking.enabled:
            tracker = Tracker(tracking)
            tracker.log_text(parent, table(rows), "batch_frontier.md")
            for f in files:
                tracker.client.log_artifact(parent, str(f))
