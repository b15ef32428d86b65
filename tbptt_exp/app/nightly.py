"""Nightly benchmark: a fixed matrix measured in rounds, judged against the last good night.

``sweep=nightly`` runs the whole matrix ``nightly.rounds`` times, round after round, so a
machine that slows down during the night slows every entry alike; each job hands its
sweep one sample of every figure. ``report`` groups the samples by entry and judges each
figure against the baseline's samples:

- the change is the ratio of the medians; a bootstrap interval on it (``nightly.confidence``)
  says whether it is real;
- regressed (or improved): worse (better) beyond the figure's threshold, and the interval
  excludes no change; inconclusive: beyond the threshold, but inside the noise (the interval
  holds no change, or the threshold widened by the samples' spread, at most
  ``max_widening`` times, covers it); ok otherwise;
- gaps are red too: a baseline entry missing tonight, an entry the baseline lacks (renamed
  or added), a figure that is NaN, infinite or not positive.

The baseline is the last night judged good on this device (first, ok, improved or
accepted), or a pinned results file (``nightly.baseline=PATH``; with ``nightly.advance=true`` each
good night rewrites it), never a median that a lasting regression would join: a
regression stays red until it is fixed or accepted with ``nightly.accept=true``. ``report`` writes
``nightly_results.json`` (every sample), ``nightly_report.md`` and ``.html`` with trend
plots, logs them to MLflow and returns the exit code.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tbptt_exp.core.config import NightlyConfig

RESULTS_FILE = "nightly_results.json"
# +1: higher is better; -1: lower is better.
FIGURES = {"tokens_per_s": +1, "peak_memory_mb": -1, "val_loss": -1, "compile_time_s": -1, "epoch_time_s": -1}
EXIT_REGRESSED = 4  # a figure regressed, or the matrix has a gap
EXIT_NO_BASELINE = 2


class BaselineError(Exception):
    """The baseline cannot be used for this run (e.g. another device)."""


def entry_name(task_overrides: list[str], ignore: tuple[str, ...] = ("tracking.", "nightly.", "hydra.", "sweep=")) -> str:
    """A stable name for a matrix entry: its own overrides, sorted."""
    kept = sorted(o.lstrip("+~") for o in task_overrides if not o.lstrip("+~").startswith(ignore))
    return " ".join(kept) or "default"


def device_fingerprint(device: dict[str, str], tensorflow: str) -> str:
    return f"{device.get('device_name')} | {device.get('device_memory_mb')} MB | TensorFlow {tensorflow}"


RED = ("regressed", "missing", "added", "invalid")
GOOD_NIGHTS = ("first", "ok", "improved", "accepted")  # nights that may serve as a baseline


@dataclass
class Comparison:
    entry: str
    figure: str
    baseline: float | None  # median of the baseline's samples
    now: float | None  # median of tonight's samples
    change: float | None  # relative, signed: now / baseline - 1
    interval: tuple[float, float] | None  # bootstrap interval of the change
    threshold: float  # the threshold applied (widened by noise, capped)
    verdict: str  # ok, improved, regressed, inconclusive, new, added, missing, invalid
    samples: tuple[int, int] = (0, 0)  # (baseline, tonight)


def group_samples(entries: list[dict]) -> dict[str, dict[str, list[float | None]]]:
    """Entries of every round -> {entry name: {figure: [one sample per round]}}."""
    grouped: dict[str, dict[str, list]] = {}
    for e in entries:
        figures = grouped.setdefault(e["name"], {})
        for figure, value in e["figures"].items():
            figures.setdefault(figure, []).append(value)
    return grouped


def change_interval(now: list[float], base: list[float], confidence: float, draws: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap interval of median(now) / median(base) - 1 (seeded: a report is repeatable)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = np.median(rng.choice(np.asarray(now, float), (draws, len(now))), axis=1)
    b = np.median(rng.choice(np.asarray(base, float), (draws, len(base))), axis=1)
    low, high = np.quantile(a / b - 1, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def relative_spread(values: list[float]) -> float:
    """Robust sigma (1.4826 MAD) relative to the median."""
    median = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - median) for v in values) / abs(median)


def valid(values: list) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def judge(entry: str, figure: str, now: list[float], base: list[float], cfg: NightlyConfig) -> Comparison:
    """One figure of one entry, tonight's samples against the baseline's."""
    direction = FIGURES[figure]
    threshold = float(cfg.thresholds.get(figure, 0.1))
    counts = (len(base), len(now))
    if not valid(now) or not valid(base):
        return Comparison(entry, figure, None, None, None, None, threshold, "invalid", counts)
    m_now, m_base = statistics.median(now), statistics.median(base)
    change = m_now / m_base - 1
    interval = change_interval(now, base, cfg.confidence)
    noise = max(relative_spread(now), relative_spread(base))
    widened = min(max(threshold, cfg.noise_sigmas * noise), cfg.max_widening * threshold)
    gain = change * direction  # > 0: better
    real = interval[0] > 0 or interval[1] < 0  # the interval excludes no change
    if abs(gain) <= threshold:
        verdict = "ok"
    elif abs(gain) > widened and real and min(counts) >= 2:
        verdict = "improved" if gain > 0 else "regressed"
    else:
        verdict = "inconclusive"  # beyond the threshold, but inside the noise
    return Comparison(entry, figure, m_base, m_now, change, interval, widened, verdict, counts)


def compare(tonight: dict[str, dict[str, list]], baseline: dict[str, dict[str, list]], cfg: NightlyConfig) -> list[Comparison]:
    """Every figure of every entry of tonight and of the baseline, gaps included."""
    rows = []
    for name in sorted(set(tonight) | set(baseline)):
        if name not in tonight:
            rows.append(Comparison(name, "(entry)", None, None, None, None, 0.0, "missing"))
            continue
        for figure in (f for f in FIGURES if f in cfg.thresholds):  # the figures judged
            now = [v for v in tonight[name].get(figure, []) if v is not None]
            base = [v for v in baseline.get(name, {}).get(figure, []) if v is not None]
            threshold = float(cfg.thresholds.get(figure, 0.1))
            if not now and not base:
                continue  # a figure this device does not report (peak memory on some)
            if not base:
                verdict = "added" if baseline and name not in baseline else "new"
                if now and not valid(now):
                    verdict = "invalid"
                rows.append(Comparison(name, figure, None, statistics.median(now) if now else None, None, None,
                                       threshold, verdict, (0, len(now))))
            elif not now:
                rows.append(Comparison(name, figure, statistics.median(base), None, None, None, threshold,
                                       "missing", (len(base), 0)))
            else:
                rows.append(judge(name, figure, now, base, cfg))
    return rows


def night_verdict(rows: list[Comparison], has_baseline: bool) -> str:
    """first, ok, improved, inconclusive, regressed or gap: the night as a whole."""
    verdicts = {r.verdict for r in rows}
    if not has_baseline:
        return "gap" if "invalid" in verdicts else "first"
    if verdicts & {"missing", "added", "invalid"}:
        return "gap"
    for verdict in ("regressed", "inconclusive", "improved"):
        if verdict in verdicts:
            return verdict
    return "ok"


def samples_of(result: dict) -> dict[str, dict[str, list]]:
    """A results file's samples per entry (a file with one value per figure: one sample each)."""
    return {e["name"]: e.get("samples") or {f: [v] for f, v in e["figures"].items()} for e in result["entries"]}


def baseline_from_file(path: Path, fingerprint: str, allow_other_device: bool) -> tuple[dict, str]:
    data = json.loads(path.read_text())
    theirs = data.get("device_fingerprint")
    if theirs != fingerprint and not allow_other_device:
        raise BaselineError(
            f"nightly.baseline={path} was measured on '{theirs}', this run is on '{fingerprint}': "
            "use a baseline from this device, or set nightly.allow_other_device=true to compare anyway"
        )
    note = f"pinned file {path} ({data.get('date', 'undated')})" + (
        f", from another device: {theirs}" if theirs != fingerprint else "")
    return samples_of(data), note


def last_good(nights: list[tuple[dict, Callable[[], dict | None]]]) -> tuple[int | None, dict | None]:
    """Newest first, (tags, load its results) per night -> (index, results) of the last good night."""
    for index, (tags, load) in enumerate(nights):
        if tags.get("nightly.verdict") in GOOD_NIGHTS:
            result = load()
            if result is not None:
                return index, result
    return None, None


def baseline_from_history(tracker, fingerprint: str, exclude_run: str | None, runs: int) -> tuple[dict, str, list]:
    """The last good nightly run on this device (its results file), and the recent nights for the plots."""
    previous = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string="tags.tbptt_exp.kind = 'nightly' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=500,
    )
    same = [r for r in previous if r.info.run_id != exclude_run and r.data.tags.get("device.fingerprint") == fingerprint]
    others = len([r for r in previous if r.info.run_id != exclude_run]) - len(same)

    def loader(run_id: str) -> Callable[[], dict | None]:
        def load() -> dict | None:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    return json.loads(Path(tracker.client.download_artifacts(run_id, RESULTS_FILE, tmp)).read_text())
                except Exception:  # a run without its results file cannot serve as a baseline
                    return None
        return load

    nights = [(r.data.tags, loader(r.info.run_id)) for r in same]
    index, good = last_good(nights)
    history = [result for _, load in nights[:runs] if (result := load()) is not None]
    if good is None:
        baseline, note = {}, "no good night on this device yet"
    else:
        tags = nights[index][0]
        baseline = samples_of(good)
        note = f"the last good night, {tags.get('nightly.date', '?')} ({tags.get('nightly.verdict')})"
        if index:
            note += f"; the {index} night(s) since were not good"
    if others:
        note += f" ({others} night(s) on other devices ignored)"
    return baseline, note, list(reversed(history))


def number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


VERDICT_LINES = {
    "first": "no baseline yet: tonight becomes the baseline",
    "ok": "no regression",
    "improved": "improved, no regression",
    "inconclusive": "INCONCLUSIVE: a change beyond its threshold, but inside the noise; not a baseline",
    "regressed": "REGRESSED",
    "gap": "GAP in the matrix: an entry is missing, added, renamed or invalid",
    "accepted": "ACCEPTED as the new baseline (nightly.accept=true)",
}


def interval_text(r: Comparison) -> str:
    return "" if r.interval is None else f"[{r.interval[0]:+.1%}, {r.interval[1]:+.1%}]"


def report_markdown(results: dict, rows: list[Comparison], note: str, verdict: str, confidence: float) -> str:
    red = sorted({f"{r.entry} / {r.figure} ({r.verdict})" for r in rows if r.verdict in RED})
    lines = [
        f"# Nightly benchmark {results['date']}",
        "",
        f"- device: {results['device_fingerprint']}",
        f"- commit: {results.get('git_commit') or 'unknown'}",
        f"- rounds: {results.get('rounds', 1)} (the matrix ran round after round; a figure is the median of its samples)",
        f"- baseline: {note}",
        f"- verdict: **{VERDICT_LINES[verdict]}**" + (f": {', '.join(red)}" if red else ""),
        "",
        f"| entry | figure | baseline | now | change | {confidence:.0%} interval | threshold | samples | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = "" if r.baseline is None else number(r.baseline)
        now = "" if r.now is None else number(r.now)
        change = "" if r.change is None else f"{r.change:+.1%}"
        threshold = f"±{r.threshold:.0%}" if r.threshold else ""
        lines.append(f"| {r.entry} | {r.figure} | {base} | {now} | {change} | {interval_text(r)} | {threshold} "
                     f"| {r.samples[0]}/{r.samples[1]} | {r.verdict} |")
    lines += ["", "How to read it: *regressed* is worse beyond the threshold with an interval that excludes no "
              "change; *inconclusive* is beyond the threshold but inside the noise; *missing*, *added* and "
              "*invalid* are gaps in the matrix. Samples: baseline/tonight."]
    return "\n".join(lines) + "\n"


def trend_plots(history: list[dict], results: dict, folder: Path) -> list[Path]:
    """One plot per figure: each entry's median and sample range over the recent nights and now."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nights = [*history, results]
    paths = []
    for figure in FIGURES:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for offset, entry in enumerate(results["entries"]):
            xs, ys, low, high = [], [], [], []
            for i, night in enumerate(nights):
                values = [v for v in samples_of(night).get(entry["name"], {}).get(figure, []) if v is not None]
                if values:
                    median = statistics.median(values)
                    xs.append(i + 0.04 * offset)
                    ys.append(median)
                    low.append(median - min(values))
                    high.append(max(values) - median)
            if xs:
                ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=3, label=entry["name"])
        ax.set(title=f"{figure} (median, range of the samples)", xlabel="nightly run (last = now)")
        ax.set_xticks(range(len(nights)), [n["date"][5:16] for n in nights], rotation=30, fontsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = folder / f"nightly_trend_{figure}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def report_html(markdown: str, rows: list[Comparison], plots: list[Path]) -> str:
    colour = {"regressed": "#fdd", "missing": "#fdd", "added": "#fdd", "invalid": "#fdd", "improved": "#dfd",
              "inconclusive": "#ffd", "ok": "", "new": "#eef"}
    head, _, _ = markdown.partition("| entry |")
    body = "".join(f"<li>{html.escape(line[2:])}</li>" for line in head.splitlines() if line.startswith("- "))
    table = "".join(
        f"<tr style='background:{colour[r.verdict]}'><td>{html.escape(r.entry)}</td><td>{r.figure}</td>"
        f"<td>{'' if r.baseline is None else number(r.baseline)}</td><td>{'' if r.now is None else number(r.now)}</td>"
        f"<td>{'' if r.change is None else f'{r.change:+.1%}'}</td><td>{interval_text(r)}</td>"
        f"<td>{f'±{r.threshold:.0%}' if r.threshold else ''}</td><td>{r.samples[0]}/{r.samples[1]}</td>"
        f"<td>{r.verdict}</td></tr>"
        for r in rows
    )
    images = "".join(f"<img src='{p.name}' alt='{p.stem}'>" for p in plots)
    title = html.escape(markdown.splitlines()[0].lstrip("# "))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style></head>"
            f"<body><h1>{title}</h1><ul>{body}</ul><table><tr><th>entry</th><th>figure</th><th>baseline</th>"
            "<th>now</th><th>change</th><th>interval</th><th>threshold</th><th>samples</th><th>verdict</th></tr>"
            f"{table}</table>{images}</body></html>")


def report(entries: list[dict], sweep_dir: Path, cfg: NightlyConfig, tracker, parent) -> int:
    """Judge tonight's samples against the baseline, write the report; the exit code.

    0: no regression and no gap (inconclusive included: noise is not a failure, but such
    a night never becomes a baseline), or accepted; ``EXIT_REGRESSED``: a figure regressed
    or the matrix has a gap; ``EXIT_NO_BASELINE``: the baseline cannot be used.
    """
    from tbptt_exp.app.console import error, say
    from tbptt_exp.app.run import git_commit

    fingerprints = {e["device_fingerprint"] for e in entries}
    fingerprint = entries[0]["device_fingerprint"]
    tonight = group_samples(entries)
    results = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device_fingerprint": fingerprint,
        "rounds": cfg.rounds,
        "entries": [{"name": name, "figures": {f: statistics.median([v for v in vs if v is not None])
                                               if any(v is not None for v in vs) else None for f, vs in figures.items()},
                     "samples": figures} for name, figures in tonight.items()],
    }
    (sweep_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    tracked = parent.run_id is not None
    history: list[dict] = []
    pinned = Path(cfg.baseline).expanduser() if cfg.baseline else None
    try:
        if len(fingerprints) > 1:
            raise BaselineError(f"the matrix ran on several devices: {sorted(fingerprints)}")
        if pinned is not None and pinned.is_file():
            baseline, note = baseline_from_file(pinned, fingerprint, cfg.allow_other_device)
            if tracked:
                _, _, history = baseline_from_history(tracker, fingerprint, parent.run_id, cfg.history_runs)
        elif pinned is not None:
            baseline, note = {}, f"no pinned file yet: {pinned} is written"
        elif tracked:
            baseline, note, history = baseline_from_history(tracker, fingerprint, parent.run_id, cfg.history_runs)
        else:
            baseline, note = {}, "no baseline: tracking is off and no nightly.baseline file was given"
    except BaselineError as failure:
        error(str(failure))
        return EXIT_NO_BASELINE

    rows = compare(tonight, baseline, cfg)
    verdict = night_verdict(rows, bool(baseline))
    if cfg.accept:
        verdict = "accepted"
    markdown = report_markdown(results, rows, note, verdict, cfg.confidence)
    (sweep_dir / "nightly_report.md").write_text(markdown)
    plots = trend_plots(history, results, sweep_dir)
    (sweep_dir / "nightly_report.html").write_text(report_html(markdown, rows, plots))
    print(markdown, flush=True)
    say(f"nightly report: {sweep_dir / 'nightly_report.html'}")
    if pinned is not None and (verdict == "accepted" or not pinned.is_file()
                               or (cfg.advance and verdict in GOOD_NIGHTS)):
        pinned.parent.mkdir(parents=True, exist_ok=True)
        pinned.write_text(json.dumps(results, indent=1))
        say(f"baseline written to {pinned}")
    parent.set_tags({"tbptt_exp.kind": "nightly", "device.fingerprint": fingerprint,
                     "nightly.date": results["date"], "nightly.verdict": verdict})
    for path in [sweep_dir / RESULTS_FILE, sweep_dir / "nightly_report.md", sweep_dir / "nightly_report.html", *plots]:
        parent.log_file(path)
    return EXIT_REGRESSED if verdict in ("regressed", "gap") else 0
