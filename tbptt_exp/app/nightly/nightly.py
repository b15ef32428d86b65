"""Nightly benchmark: the verdict on a night, figure by figure, against a baseline.

``sweep=nightly`` runs the whole matrix ``nightly.rounds`` times, round after round, so a
machine that slows down during the night slows every entry alike; each job hands its
sweep one sample of every figure (``entry``). ``compare`` groups the samples by entry and
judges each figure against the baseline's samples:

- the change is the ratio of the medians; a bootstrap interval on it (``nightly.confidence``)
  says whether it is real;
- regressed (or improved): worse (better) beyond the figure's threshold, and the interval
  excludes no change; inconclusive: beyond the threshold, but inside the noise (the interval
  holds no change, or the threshold widened by the samples' spread, at most
  ``max_widening`` times, covers it); ok otherwise;
- gaps are red too: a baseline entry missing tonight, an entry the baseline lacks (renamed
  or added), a figure that is NaN, infinite or not positive.

Which way is better for each figure comes from ``measure.FIGURES``. Where the baseline
comes from is ``baseline``; the report and its plots are ``report``.
"""

from __future__ import annotations

import importlib.metadata
import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats

from tbptt_exp.app.settings import NIGHTLY_THRESHOLDS, NightlyConfig
from tbptt_exp.core.measure import FIGURES

EXIT_REGRESSED = 4  # a figure regressed, or the matrix has a gap
RED = ("regressed", "missing", "added", "invalid")
GOOD_NIGHTS = ("first", "ok", "improved", "accepted")  # nights that may serve as a baseline


def entry_name(task_overrides: list[str], ignore: tuple[str, ...] = ("tracking.", "nightly.", "hydra.", "sweep=")) -> str:
    """A stable name for a matrix entry: its own overrides, sorted."""
    kept = sorted(o.lstrip("+~") for o in task_overrides if not o.lstrip("+~").startswith(ignore))
    return " ".join(kept) or "default"


def device_fingerprint(device: dict[str, str], tensorflow: str) -> str:
    return f"{device.get('device_name')} | {device.get('device_memory_mb')} MB | TensorFlow {tensorflow}"


@dataclass
class NightlyEntry:
    """One sample of a matrix entry: what a nightly job hands its sweep."""

    name: str  # ``entry_name``: the entry's own overrides
    device_fingerprint: str
    figures: dict[str, float | None]  # one sample of every figure the nightly judges


def entry(result, task_overrides: list[str]) -> NightlyEntry:
    """A nightly matrix entry from a training run (``RunResult``): a stable name and one
    sample of every figure the nightly judges."""
    return NightlyEntry(entry_name(task_overrides),
                        device_fingerprint(result.device, importlib.metadata.version("tensorflow")),
                        {name: result.value(name) for name in NIGHTLY_THRESHOLDS})


@dataclass
class Comparison:
    entry: str
    figure: str
    baseline: float | None  # median of the baseline's samples
    now: float | None  # median of tonight's samples
    change: float | None  # relative, signed: now / baseline - 1
    interval: tuple[float, float] | None  # bootstrap interval of the change (None: too few samples)
    threshold: float  # the threshold applied (widened by noise, capped)
    verdict: str  # ok, improved, regressed, inconclusive, new, added, missing, invalid
    samples: tuple[int, int] = (0, 0)  # (baseline, tonight)


def group_samples(entries: list[NightlyEntry]) -> dict[str, dict[str, list[float | None]]]:
    """Entries of every round -> {entry name: {figure: [one sample per round]}}."""
    grouped: dict[str, dict[str, list]] = {}
    for entry in entries:
        figures = grouped.setdefault(entry.name, {})
        for figure, value in entry.figures.items():
            figures.setdefault(figure, []).append(value)
    return grouped


def change_interval(now: list[float], base: list[float], confidence: float, draws: int = 2000) -> tuple[float, float] | None:
    """Percentile bootstrap interval of median(now) / median(base) - 1 (seeded: a report is
    repeatable); None with fewer than two samples on a side."""
    if min(len(now), len(base)) < 2:
        return None
    interval = stats.bootstrap(
        (np.asarray(now, float), np.asarray(base, float)),
        lambda a, b, axis: np.median(a, axis=axis) / np.median(b, axis=axis) - 1,
        n_resamples=draws, confidence_level=confidence, method="percentile", vectorized=True,
        rng=np.random.default_rng(0),
    ).confidence_interval
    return float(interval.low), float(interval.high)


def relative_spread(values: list[float]) -> float:
    """Robust sigma (the normal-scaled median absolute deviation) relative to the median."""
    return float(stats.median_abs_deviation(values, scale="normal")) / abs(statistics.median(values))


def valid(values: list) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def judge(entry: str, figure: str, now: list[float], base: list[float], cfg: NightlyConfig) -> Comparison:
    """One figure of one entry, tonight's samples against the baseline's."""
    direction = 1 if FIGURES[figure].higher_is_better else -1
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
    real = interval is not None and (interval[0] > 0 or interval[1] < 0)  # the interval excludes no change
    if abs(gain) <= threshold:
        verdict = "ok"
    elif abs(gain) > widened and real:
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
        for figure in (f for f in FIGURES if f in cfg.thresholds):  # the figures judged, in the registry's order
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
