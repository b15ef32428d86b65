"""What a sweep's parent run shows: named after what was swept, the swept and fixed settings
as params, the best job as metrics, and plots of each figure against each swept setting.

The MLflow UI lists a sweep's parent above its children; with this, the parent alone
answers "what was compared, and what won".
"""

from __future__ import annotations

import math
from pathlib import Path

# Jobs are (overrides, JobOutcome or None) pairs, JobOutcome from app/sweep.py (which
# imports this module, so this one does not import it back).

MAXIMISED = ("tokens_per_s",)  # every other objective is minimised
PLOTTED = {"objective": None, "tokens_per_s": "real tokens/s", "peak_memory_mb": "allocator peak (MB)"}


def settings(task_overrides: list[str], sweeper_params: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(swept, fixed): the settings a sweep varies (command line and preset) and the ones it
    sets once. Where runs are recorded (``tracking.*``) and the sweep's own links are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = {str(k): str(v) for k, v in (sweeper_params or {}).items()}
    fixed: dict[str, str] = {}
    for o in OverridesParser.create().parse_overrides(task_overrides):
        if o.is_hydra_override() or o.key_or_group.startswith("tracking."):  # the sweep's links are hydra.*
            continue
        value = "(deleted)" if o.is_delete() else o.input_line.split("=", 1)[1]
        (swept if o.is_sweep_override() else fixed)[o.key_or_group] = value
    for key in swept:
        fixed.pop(key, None)
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
    keys = set(swept)
    picked = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys]
    return " ".join(picked) or " ".join(o for o in overrides if not o.lstrip("+").startswith("hydra."))


def best(jobs: list[tuple[list[str], "JobOutcome | None"]], objective: str) -> tuple[list[str], "JobOutcome"] | None:
    """The job with the best first objective (highest tokens/s, lowest anything else)."""
    scored = [(o, out) for o, out in jobs if out is not None and out.values and not math.isnan(out.values[0])]
    if not scored:
        return None
    sign = -1 if objective in MAXIMISED else 1
    return min(scored, key=lambda job: sign * job[1].values[0])


def summary_metrics(jobs: list[tuple[list[str], "JobOutcome | None"]], objective: str, swept: dict[str, str]) -> tuple[dict, dict]:
    """(metrics, tags) for the parent: the best objective and that job's figures and settings."""
    top = best(jobs, objective)
    if top is None:
        return {}, {}
    overrides, outcome = top
    metrics = {f"best/{objective}": outcome.values[0]}
    metrics |= {f"best/{k}": v for k, v in outcome.summary.items() if v is not None and k != objective}
    metrics["sweep/jobs"] = len(jobs)
    metrics["sweep/failed_jobs"] = sum(out is None for _, out in jobs)
    return metrics, {"best.settings": label(overrides, swept), "best.run_id": outcome.run_id}


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plots(jobs: list[tuple[list[str], "JobOutcome | None"]], swept: dict[str, str], objective: str, folder: Path) -> list[Path]:
    """One picture per swept setting: the objective, real tokens/s and allocator peak of every
    job against that setting's value (markers, no lines: each point is one run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [(o, out) for o, out in jobs if out is not None]
    paths = []
    for key in swept:
        values = [next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "?")
                  for overrides, _ in done]
        numbers = _numeric(values)
        categories = sorted(set(values), key=lambda v: (numbers is None, v))
        xs = numbers if numbers is not None else [categories.index(v) for v in values]
        figures = {"objective": [out.values[0] for _, out in done]}
        for figure in ("tokens_per_s", "peak_memory_mb"):
            figures[figure] = [out.summary.get(figure) for _, out in done]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, (figure, ys) in zip(axes, figures.items()):
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o", markersize=7, alpha=0.8)
            ax.set_title(objective if figure == "objective" else PLOTTED[figure], fontsize=10)
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
