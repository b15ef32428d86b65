"""Nightly benchmark: a fixed matrix compared with a baseline, flagged when it regresses.

Each job of ``sweep=nightly`` hands its sweep a nightly entry (a stable name from its
overrides, its figures, the device fingerprint). ``report`` gathers them at the end of
the sweep into ``nightly_results.json``, compares every figure with a baseline — the
median of the previous nightly runs on the same device fingerprint, or a results file
(``nightly.baseline=PATH``) — writes ``nightly_report.md`` and ``nightly_report.html``
(with trend plots), logs them to MLflow and returns the exit code: non-zero when a figure regressed beyond
its threshold.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tbptt_exp.core.config import NightlyConfig

RESULTS_FILE = "nightly_results.json"
# +1: higher is better; -1: lower is better.
FIGURES = {"tokens_per_s": +1, "peak_memory_mb": -1, "val_loss": -1, "compile_time_s": -1, "epoch_time_s": -1}
EXIT_REGRESSED = 4
EXIT_NO_BASELINE = 2


class BaselineError(Exception):
    """The baseline cannot be used for this run (e.g. another device)."""


def entry_name(task_overrides: list[str], ignore: tuple[str, ...] = ("tracking.", "nightly.", "hydra.", "sweep=")) -> str:
    """A stable name for a matrix entry: its own overrides, sorted."""
    kept = sorted(o.lstrip("+~") for o in task_overrides if not o.lstrip("+~").startswith(ignore))
    return " ".join(kept) or "default"


def device_fingerprint(device: dict[str, str], tensorflow: str) -> str:
    return f"{device.get('device_name')} | {device.get('device_memory_mb')} MB | TensorFlow {tensorflow}"


@dataclass
class Comparison:
    entry: str
    figure: str
    baseline: float | None
    now: float
    change: float | None  # relative, signed: (now - baseline) / baseline
    threshold: float
    verdict: str  # ok, regressed, improved, new


def threshold_for(figure: str, cfg: NightlyConfig, history: list[float]) -> float:
    """The figure's threshold, widened to the baseline's own run-to-run noise."""
    base = float(cfg.thresholds.get(figure, 0.1))
    if len(history) >= 3:
        median = statistics.median(history)
        mad = statistics.median(abs(v - median) for v in history)
        if median:
            base = max(base, cfg.noise_sigmas * 1.4826 * mad / abs(median))
    return base


def compare(entries: dict[str, dict], baseline: dict[str, dict[str, list[float]]], cfg: NightlyConfig) -> list[Comparison]:
    rows = []
    for name, figures in sorted(entries.items()):
        for figure, direction in FIGURES.items():
            now = figures.get(figure)
            if now is None:
                continue
            history = [v for v in baseline.get(name, {}).get(figure, []) if v is not None]
            threshold = threshold_for(figure, cfg, history)
            if not history:
                rows.append(Comparison(name, figure, None, now, None, threshold, "new"))
                continue
            base = statistics.median(history)
            change = (now - base) / abs(base) if base else 0.0
            if change * direction < -threshold:
                verdict = "regressed"
            elif change * direction > threshold:
                verdict = "improved"
            else:
                verdict = "ok"
            rows.append(Comparison(name, figure, base, now, change, threshold, verdict))
    return rows


def baseline_from_file(path: Path, fingerprint: str, allow_other_device: bool) -> tuple[dict, str]:
    data = json.loads(path.read_text())
    theirs = data.get("device_fingerprint")
    if theirs != fingerprint and not allow_other_device:
        raise BaselineError(
            f"nightly.baseline={path} was measured on '{theirs}', this run is on '{fingerprint}': "
            "use a baseline from this device, or set nightly.allow_other_device=true to compare anyway"
        )
    note = f"baseline file {path}" + (f" (from another device: {theirs})" if theirs != fingerprint else "")
    return {e["name"]: {f: [v] for f, v in e["figures"].items()} for e in data["entries"]}, note


def baseline_from_history(tracker, fingerprint: str, exclude_run: str | None, runs: int) -> tuple[dict, str, list]:
    """Median of the previous nightly runs on this device fingerprint (their results files)."""
    previous = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string="tags.tbptt_exp.kind = 'nightly' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=200,
    )
    same = [r for r in previous if r.info.run_id != exclude_run and r.data.tags.get("device.fingerprint") == fingerprint]
    others = len([r for r in previous if r.info.run_id != exclude_run]) - len(same)
    results = []
    for run in same[:runs]:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = tracker.client.download_artifacts(run.info.run_id, RESULTS_FILE, tmp)
            except Exception:  # a run without its results file cannot serve as a baseline
                continue
            results.append(json.loads(Path(path).read_text()))
    baseline: dict[str, dict[str, list[float]]] = {}
    for result in results:
        for e in result["entries"]:
            for f, v in e["figures"].items():
                baseline.setdefault(e["name"], {}).setdefault(f, []).append(v)
    note = (f"median of the {len(results)} previous nightly run(s) on this device"
            if results else "no previous nightly run on this device")
    if others:
        note += f" ({others} run(s) on other devices ignored)"
    return baseline, note, list(reversed(results))


def number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def report_markdown(results: dict, rows: list[Comparison], note: str) -> str:
    regressed = [r for r in rows if r.verdict == "regressed"]
    lines = [
        f"# Nightly benchmark {results['date']}",
        "",
        f"- device: {results['device_fingerprint']}",
        f"- commit: {results.get('git_commit') or 'unknown'}",
        f"- baseline: {note}",
        f"- verdict: **{'REGRESSED: ' + ', '.join(sorted({f'{r.entry} / {r.figure}' for r in regressed})) if regressed else 'no regression'}**",
        "",
        "| entry | figure | baseline | now | change | threshold | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = "" if r.baseline is None else number(r.baseline)
        change = "" if r.change is None else f"{r.change:+.1%}"
        lines.append(f"| {r.entry} | {r.figure} | {base} | {number(r.now)} | {change} | ±{r.threshold:.0%} | {r.verdict} |")
    if all(r.verdict == "new" for r in rows):
        lines += ["", "No baseline to compare with: this run becomes the baseline for the next ones."]
    return "\n".join(lines) + "\n"


def trend_plots(history: list[dict], results: dict, folder: Path) -> list[Path]:
    """One plot per figure: each entry's value over the previous nightly runs and now."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [*history, results]
    paths = []
    for figure in FIGURES:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for entry in results["entries"]:
            ys = [next((e["figures"].get(figure) for e in r["entries"] if e["name"] == entry["name"]), None) for r in runs]
            ax.plot(range(len(runs)), [float("nan") if y is None else y for y in ys], "o-", label=entry["name"])
        ax.set(title=figure, xlabel="nightly run (last = now)")
        ax.set_xticks(range(len(runs)), [r["date"][5:16] for r in runs], rotation=30, fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = folder / f"nightly_trend_{figure}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def report_html(markdown: str, rows: list[Comparison], plots: list[Path]) -> str:
    colour = {"regressed": "#fdd", "improved": "#dfd", "ok": "", "new": "#eef"}
    head, _, _ = markdown.partition("| entry |")
    body = "".join(f"<li>{html.escape(line[2:])}</li>" for line in head.splitlines() if line.startswith("- "))
    table = "".join(
        f"<tr style='background:{colour[r.verdict]}'><td>{html.escape(r.entry)}</td><td>{r.figure}</td>"
        f"<td>{'' if r.baseline is None else number(r.baseline)}</td><td>{number(r.now)}</td>"
        f"<td>{'' if r.change is None else f'{r.change:+.1%}'}</td><td>±{r.threshold:.0%}</td><td>{r.verdict}</td></tr>"
        for r in rows
    )
    images = "".join(f"<img src='{p.name}' alt='{p.stem}'>" for p in plots)
    title = html.escape(markdown.splitlines()[0].lstrip("# "))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style></head>"
            f"<body><h1>{title}</h1><ul>{body}</ul><table><tr><th>entry</th><th>figure</th><th>baseline</th><th>now</th>"
            f"<th>change</th><th>threshold</th><th>verdict</th></tr>{table}</table>{images}</body></html>")


def report(entries: list[dict], sweep_dir: Path, cfg: NightlyConfig, tracker, parent) -> int:
    """Compare tonight's entries with the baseline, write the report; the exit code.

    0: no regression; ``EXIT_REGRESSED``: a figure regressed beyond its threshold;
    ``EXIT_NO_BASELINE``: the baseline cannot be used (another device, say).
    """
    from tbptt_exp.app.console import error, say
    from tbptt_exp.app.run import git_commit

    fingerprints = {e["device_fingerprint"] for e in entries}
    fingerprint = entries[0]["device_fingerprint"]
    results = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device_fingerprint": fingerprint,
        "entries": [{"name": e["name"], "figures": e["figures"]} for e in entries],
    }
    (sweep_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    tracked = parent.run_id is not None
    history: list[dict] = []
    try:
        if len(fingerprints) > 1:
            raise BaselineError(f"the matrix ran on several devices: {sorted(fingerprints)}")
        if cfg.baseline:
            baseline, note = baseline_from_file(Path(cfg.baseline).expanduser(), fingerprint, cfg.allow_other_device)
            if tracked:
                _, _, history = baseline_from_history(tracker, fingerprint, parent.run_id, cfg.history_runs)
        elif tracked:
            baseline, note, history = baseline_from_history(tracker, fingerprint, parent.run_id, cfg.history_runs)
        else:
            baseline, note = {}, "no baseline: tracking is off and no nightly.baseline file was given"
    except BaselineError as failure:
        error(str(failure))
        return EXIT_NO_BASELINE

    rows = compare({e["name"]: e["figures"] for e in entries}, baseline, cfg)
    markdown = report_markdown(results, rows, note)
    (sweep_dir / "nightly_report.md").write_text(markdown)
    plots = trend_plots(history, results, sweep_dir)
    (sweep_dir / "nightly_report.html").write_text(report_html(markdown, rows, plots))
    print(markdown, flush=True)
    say(f"nightly report: {sweep_dir / 'nightly_report.html'}")
    regressed = [r for r in rows if r.verdict == "regressed"]
    parent.set_tags({"tbptt_exp.kind": "nightly", "device.fingerprint": fingerprint,
                     "nightly.date": results["date"], "nightly.verdict": "regressed" if regressed else "ok"})
    for path in [sweep_dir / RESULTS_FILE, sweep_dir / "nightly_report.md", sweep_dir / "nightly_report.html", *plots]:
        parent.log_file(path)
    return EXIT_REGRESSED if regressed else 0
