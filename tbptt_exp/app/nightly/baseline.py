"""Which night a nightly benchmark is judged against.

The baseline is the last night judged good on this device (first, ok, improved or
accepted), or a pinned results file (``nightly.baseline=PATH``; with
``nightly.advance=true`` each good night rewrites it), never a median that a lasting
regression would join: a regression stays red until it is fixed or accepted with
``nightly.accept=true``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from tbptt_exp.app.nightly.nightly import GOOD_NIGHTS

RESULTS_FILE = "nightly_results.json"


class BaselineError(Exception):
    """The baseline cannot be used for this run (e.g. another device)."""


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


def choose_baseline(cfg, fingerprints: set[str], tracker, parent_run_id: str | None) -> tuple[dict, str, list[dict]]:
    """(baseline samples, where they come from, recent nights for the plots) for tonight:
    the pinned file if there is one, else the last good night in the tracking store.
    Raises BaselineError when the baseline cannot serve (another device, several devices)."""
    if len(fingerprints) > 1:
        raise BaselineError(f"the matrix ran on several devices: {sorted(fingerprints)}")
    (fingerprint,) = fingerprints
    pinned = Path(cfg.baseline).expanduser() if cfg.baseline else None
    if pinned is not None and pinned.is_file():
        baseline, note = baseline_from_file(pinned, fingerprint, cfg.allow_other_device)
        history = baseline_from_history(tracker, fingerprint, parent_run_id, cfg.history_runs)[2] if parent_run_id else []
        return baseline, note, history
    if pinned is not None:
        return {}, f"no pinned file yet: {pinned} is written", []
    if parent_run_id is not None:
        return baseline_from_history(tracker, fingerprint, parent_run_id, cfg.history_runs)
    return {}, "no baseline: tracking is off and no nightly.baseline file was given", []
