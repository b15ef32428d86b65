"""The nightly report: tonight's results file, the verdict against the baseline, a Markdown
and an HTML report with trend plots, all logged to the night's MLflow parent run."""

from __future__ import annotations

import datetime as dt
import html
import json
import statistics
from pathlib import Path

from tbptt_exp.app import tables
from tbptt_exp.app.console import error, say
from tbptt_exp.app.nightly.baseline import RESULTS_FILE, BaselineError, choose_baseline, samples_of
from tbptt_exp.app.nightly.nightly import (
    EXIT_REGRESSED,
    GOOD_NIGHTS,
    RED,
    Comparison,
    NightlyEntry,
    compare,
    group_samples,
    night_verdict,
)
from tbptt_exp.app.settings import NIGHTLY_THRESHOLDS, NightlyConfig
from tbptt_exp.app.tracking import metrics
from tbptt_exp.app.tracking.provenance import git_commit

EXIT_NO_BASELINE = 2
COLOURS = {"regressed": "#fdd", "missing": "#fdd", "added": "#fdd", "invalid": "#fdd", "improved": "#dfd",
           "inconclusive": "#ffd", "new": "#eef"}


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
        tables.markdown(table_headers(confidence), [table_row(r) for r in rows], align="llrrrrrrl"),
        "",
        ("How to read it: *regressed* is worse beyond the threshold with an interval that excludes no "
        "change; *inconclusive* is beyond the threshold but inside the noise; *missing*, *added* and "
        "*invalid* are gaps in the matrix. Samples: baseline/tonight."),
    ]
    return "\n".join(lines) + "\n"


def table_headers(confidence: float) -> list[str]:
    return ["entry", "figure", "baseline", "now", "change", f"{confidence:.0%} interval", "threshold", "samples", "verdict"]


def table_row(r: Comparison) -> list[str]:
    return [r.entry, r.figure, "" if r.baseline is None else number(r.baseline), "" if r.now is None else number(r.now),
            "" if r.change is None else f"{r.change:+.1%}", interval_text(r), f"±{r.threshold:.0%}" if r.threshold else "",
            f"{r.samples[0]}/{r.samples[1]}", r.verdict]


def trend_plots(history: list[dict], results: dict, folder: Path) -> list[Path]:
    """One plot per figure: each entry's median and sample range over the recent nights and now."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nights = [*history, results]
    paths = []
    for figure in NIGHTLY_THRESHOLDS:
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


def report_html(markdown: str, rows: list[Comparison], plots: list[Path], confidence: float) -> str:
    head = markdown.partition("\n| entry |")[0]
    items = "".join(f"<li>{html.escape(line[2:])}</li>" for line in head.splitlines() if line.startswith("- "))
    table = tables.html(table_headers(confidence), [table_row(r) for r in rows], [r.verdict for r in rows])
    images = "".join(f"<img src='{p.name}' alt='{p.stem}'>" for p in plots)
    title = html.escape(markdown.splitlines()[0].lstrip("# "))
    style = "".join(f"tr.{verdict}{{background:{colour}}}" for verdict, colour in COLOURS.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>body{{font-family:sans-serif}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}{style}</style>"
            f"</head><body><h1>{title}</h1><ul>{items}</ul>{table}{images}</body></html>")


def results_record(entries: list[NightlyEntry], rounds: int) -> dict:
    """Tonight's results file: every sample of every entry, and each figure's median."""
    tonight = group_samples(entries)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device_fingerprint": entries[0].device_fingerprint,
        "rounds": rounds,
        "entries": [{"name": name, "figures": {f: statistics.median([v for v in vs if v is not None])
                                               if any(v is not None for v in vs) else None for f, vs in figures.items()},
                     "samples": figures} for name, figures in tonight.items()],
    }


def report(entries: list[NightlyEntry], sweep_dir: Path, cfg: NightlyConfig, tracker, parent,
           failed: list[str] | None = None) -> int:
    """Judge tonight's samples against the baseline, write the report; the exit code.

    0: no regression and no gap (inconclusive included: noise is not a failure, but such
    a night never becomes a baseline), or accepted; ``EXIT_REGRESSED``: a figure regressed
    or the matrix has a gap (``failed``: jobs of the matrix that failed, a gap even on a
    first night); ``EXIT_NO_BASELINE``: the baseline cannot be used.
    """
    if not entries:
        error("no entry of the nightly matrix finished: nothing to judge (each failure is said above)")
        return EXIT_REGRESSED
    results = results_record(entries, cfg.rounds)
    (sweep_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    try:
        baseline, note, history = choose_baseline(cfg, {e.device_fingerprint for e in entries}, tracker,
                                                  parent.run_id)
    except BaselineError as failure:
        error(str(failure))
        return EXIT_NO_BASELINE
    rows = compare(samples_of(results), baseline, cfg)
    verdict = "accepted" if cfg.accept else night_verdict(rows, bool(baseline))
    if failed and verdict != "accepted":
        verdict, note = "gap", f"{note}; failed tonight (a gap): {', '.join(failed)}"
    markdown = report_markdown(results, rows, note, verdict, cfg.confidence)
    plots = trend_plots(history, results, sweep_dir)
    files = {"nightly_report.md": markdown, "nightly_report.html": report_html(markdown, rows, plots, cfg.confidence)}
    for name, text in files.items():
        (sweep_dir / name).write_text(text)
    print(markdown, flush=True)
    say(f"nightly report: {sweep_dir / 'nightly_report.html'}")
    advance_baseline(cfg, results, verdict)
    red = sorted({f"{r.entry} / {r.figure} ({r.verdict})" for r in rows if r.verdict in RED})
    parent.set_tags({"tbptt_exp.kind": "nightly", "device.fingerprint": results["device_fingerprint"],
                     "nightly.date": results["date"], "nightly.verdict": verdict,
                     "mlflow.note.content": (
                         f"**Nightly {results['date']}: {VERDICT_LINES[verdict]}**"
                         + (f": {', '.join(red)}" if red else "") + f"\n\nBaseline: {note}. "
                         f"{len(results['entries'])} entries, {cfg.rounds} round(s) each; the whole report is "
                         "`nightly_report.html`.")})
    parent.log_metrics({metrics.NIGHTLY_ENTRIES: len(results["entries"]), metrics.NIGHTLY_RED_FIGURES: len(red),
                        metrics.NIGHTLY_GREEN: float(verdict not in ("regressed", "gap"))})
    for path in [sweep_dir / RESULTS_FILE, *(sweep_dir / name for name in files), *plots]:
        parent.log_file(path)
    return EXIT_REGRESSED if verdict in ("regressed", "gap") else 0


def advance_baseline(cfg: NightlyConfig, results: dict, verdict: str) -> None:
    """A pinned baseline file is written when tonight is accepted, and after a good night
    when it does not exist yet or with ``nightly.advance``; a red night never writes it."""
    pinned = Path(cfg.baseline).expanduser() if cfg.baseline else None
    if pinned is not None and (verdict == "accepted" or (
            verdict in GOOD_NIGHTS and (cfg.advance or not pinned.is_file()))):
        pinned.parent.mkdir(parents=True, exist_ok=True)
        pinned.write_text(json.dumps(results, indent=1))
        say(f"baseline written to {pinned}")
