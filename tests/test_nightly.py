"""Nightly benchmark: comparison logic (fast) and the CLI end to end (slow)."""

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from tbptt_exp.app.nightly.baseline import BaselineError, baseline_from_file, last_good, samples_of
from tbptt_exp.app.nightly.nightly import EXIT_REGRESSED, NightlyEntry, compare, entry_name, night_verdict
from tbptt_exp.app.settings import NightlyConfig


def test_entry_names_are_stable_and_leave_out_tracking_and_hydra():
    a = entry_name(["k=25", "engine=graph", "tracking.uri=sqlite:///x", "sweep=nightly", "hydra.job.num=3"])
    b = entry_name(["engine=graph", "sweep=nightly", "k=25", "tracking.uri=sqlite:///y"])
    assert a == b == "engine=graph k=25"


def samples(median, spread, n=5, seed=1):
    """n samples around ``median`` with a relative spread (deterministic)."""
    rng = np.random.default_rng(seed)
    return list(median * (1 + spread * rng.uniform(-1, 1, n)))


def judged(now, base, figure="tokens_per_s", **cfg):
    (row,) = compare({"e": {figure: now}}, {"e": {figure: base}}, NightlyConfig(**cfg))
    return row


def test_a_20_percent_slowdown_with_low_noise_is_flagged():
    row = judged(samples(800, 0.02, seed=2), samples(1000, 0.02))
    assert row.verdict == "regressed" and -0.23 < row.change < -0.17
    assert row.interval[1] < 0  # the interval excludes no change


def test_the_same_slowdown_inside_wide_noise_is_inconclusive_not_ok():
    row = judged(samples(800, 0.6, seed=2), samples(1000, 0.6))
    assert row.verdict == "inconclusive" and row.interval[0] < 0 < row.interval[1]
    widened = judged(samples(800, 0.6, seed=2), samples(1000, 0.6), noise_sigmas=3.0)
    assert widened.threshold == pytest.approx(2 * 0.15)  # widened by the noise, but capped (max_widening)


def test_identical_distributions_are_ok_and_directions_are_per_figure():
    assert judged(samples(1000, 0.05), samples(1000, 0.05)).verdict == "ok"
    assert judged(samples(80, 0.01, seed=3), samples(100, 0.01), figure="peak_memory_mb").verdict == "improved"
    assert judged([2.2] * 3, [2.0] * 3, figure="val_loss").verdict == "regressed"  # deterministic: no spread
    assert judged([800.0], [1000.0]).verdict == "inconclusive"  # one sample each: no interval to trust


def test_missing_renamed_and_invalid_entries_are_gaps():
    base = {"a": {"val_loss": [1.0, 1.0]}, "b": {"val_loss": [1.0, 1.0]}}
    tonight = {"a": {"val_loss": [1.0, 1.0]}, "b renamed": {"val_loss": [1.0, 1.0]}}
    rows = compare(tonight, base, NightlyConfig())
    assert {(r.entry, r.verdict) for r in rows} == {("a", "ok"), ("b", "missing"), ("b renamed", "added")}
    assert night_verdict(rows, True) == "gap"
    for bad in ([float("nan"), 1.0], [0.0, 0.0]):
        rows = compare({"a": {"val_loss": bad}}, {"a": {"val_loss": [1.0, 1.0]}}, NightlyConfig())
        assert rows[0].verdict == "invalid" and night_verdict(rows, True) == "gap"
    assert night_verdict(compare(tonight, {}, NightlyConfig()), False) == "first"  # the first night sets the baseline


def test_a_lasting_regression_stays_flagged_against_the_last_good_night():
    good = {"entries": [{"name": "e", "figures": {}, "samples": {"tokens_per_s": samples(1000, 0.02)}}]}
    slow = {"entries": [{"name": "e", "figures": {}, "samples": {"tokens_per_s": samples(750, 0.02)}}]}
    nights = [({"nightly.verdict": "regressed"}, lambda: slow)] * 4 + [({"nightly.verdict": "ok"}, lambda: good)]
    index, baseline = last_good(nights)  # newest first: four red nights, then the good one
    assert index == 4 and baseline is good
    rows = compare({"e": {"tokens_per_s": samples(750, 0.02, seed=9)}}, samples_of(baseline), NightlyConfig())
    assert rows[0].verdict == "regressed"  # the fifth slow night is still red
    assert last_good([({"nightly.verdict": "accepted"}, lambda: slow), *nights])[1] is slow  # until accepted


def entries_of(tokens_per_s: list[float], fingerprint="CPU | 1 MB | TensorFlow 2.21.0"):
    return [NightlyEntry("engine=graph", fingerprint, {"tokens_per_s": t, "val_loss": 1.5}) for t in tokens_per_s]


def test_a_pinned_baseline_stays_until_a_night_is_accepted(tmp_path):
    from tbptt_exp.app.nightly.report import report
    from tbptt_exp.app.tracking.run import _NoRun

    pinned = tmp_path / "baseline.json"
    cfg = NightlyConfig(record=True, baseline=str(pinned), accept=True)
    assert report(entries_of(samples(1000, 0.02, 3)), tmp_path, cfg, None, _NoRun()) == 0
    first = json.loads(pinned.read_text())
    assert first["rounds"] == 5 and len(first["entries"][0]["samples"]["tokens_per_s"]) == 3

    cfg = NightlyConfig(record=True, baseline=str(pinned))
    assert report(entries_of(samples(700, 0.02, 3, seed=5)), tmp_path, cfg, None, _NoRun()) == EXIT_REGRESSED
    assert json.loads(pinned.read_text()) == first  # a red night does not move the baseline
    text = (tmp_path / "nightly_report.md").read_text()
    assert "REGRESSED" in text and "| engine=graph | tokens_per_s |" in text and "interval" in text

    accepted = NightlyConfig(record=True, baseline=str(pinned), accept=True)
    assert report(entries_of(samples(700, 0.02, 3, seed=5)), tmp_path, accepted, None, _NoRun()) == 0
    assert json.loads(pinned.read_text()) != first and "ACCEPTED" in (tmp_path / "nightly_report.md").read_text()
    assert report(entries_of(samples(700, 0.02, 3, seed=6)), tmp_path, cfg, None, _NoRun()) == 0
    accepted_once = json.loads(pinned.read_text())
    advancing = NightlyConfig(record=True, baseline=str(pinned), advance=True)
    assert report(entries_of(samples(900, 0.02, 3, seed=7)), tmp_path, advancing, None, _NoRun()) == 0  # improved
    assert json.loads(pinned.read_text()) != accepted_once  # a good night becomes the baseline


def test_an_entry_that_failed_is_a_gap_even_on_a_first_night(tmp_path):
    from tbptt_exp.app.nightly.report import report
    from tbptt_exp.app.tracking.run import _NoRun

    pinned = tmp_path / "baseline.json"
    cfg = NightlyConfig(record=True, baseline=str(pinned), advance=True)  # written by the first good night
    assert report(entries_of(samples(1000, 0.02, 3)), tmp_path, cfg, None, _NoRun(), ["model=seed k=25"]) == EXIT_REGRESSED
    text = (tmp_path / "nightly_report.md").read_text()
    assert "GAP" in text and "failed tonight (a gap): model=seed k=25" in text
    assert not pinned.exists()  # a night with a failed entry never becomes the baseline
    assert report([], tmp_path, cfg, None, _NoRun(), ["model=lstm k=25", "model=seed k=25"]) == EXIT_REGRESSED
    assert report(entries_of(samples(1000, 0.02, 3)), tmp_path, cfg, None, _NoRun(), []) == 0  # none failed: first night
    assert pinned.exists()


def test_a_baseline_file_from_another_device_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"device_fingerprint": "GPU A100 | 81920 MB | TensorFlow 2.21.0",
                                "entries": [{"name": "e", "figures": {"val_loss": 1.0}}]}))
    with pytest.raises(BaselineError, match="measured on 'GPU A100.*allow_other_device"):
        baseline_from_file(path, "CPU x86_64 | 24106 MB | TensorFlow 2.21.0", False)
    baseline, note = baseline_from_file(path, "CPU x86_64 | 24106 MB | TensorFlow 2.21.0", True)
    assert baseline == {"e": {"val_loss": [1.0]}} and "another device" in note


# A CPU allocator peak of a few MB varies by tens of percent run to run (benchmarks/RESULTS.md):
# not judged here, as a device without a stable peak would drop it.
TINY = ["-m", "sweep=nightly", "engine=graph,keras_fit", "model=lstm", "k=10", "data.max_chars=60000",
        "data.sequence_length=40", "model.units=128", "~nightly.thresholds.peak_memory_mb"]


def nightly(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "tbptt_exp", *TINY, f"tracking.uri=sqlite:///{tmp_path / 'ml.db'}", *extra],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    reports = sorted(tmp_path.glob("multirun/*/*/nightly_report.md"), key=lambda p: p.stat().st_mtime)
    return out, reports[-1] if reports else None


# Back-to-back nights judged with a margin over the defaults (15%, 20%): nights on this
# shared machine drift by up to ~12% between processes; the defaults' own false-alarm rate
# is measured by benchmarks/nightly_sensitivity.py (0 of 8 here, benchmarks/RESULTS.md).
# Back to back on a shared runner: a loaded CI machine (at half this machine's tokens/s) once
# read a graph-engine speed figure beyond 25% with an interval clear of zero, on unchanged code.
MARGIN = ["nightly.thresholds.tokens_per_s=0.35", "nightly.thresholds.epoch_time_s=0.4"]


@pytest.mark.slow
def test_back_to_back_nights_pass_and_a_planted_faster_baseline_is_flagged(tmp_path):
    first, report = nightly(tmp_path, *MARGIN)
    assert first.returncode == 0, first.stderr[-3000:]
    text = report.read_text()
    assert "no good night on this device yet" in text and "tonight becomes the baseline" in text
    results = json.loads((report.parent / "nightly_results.json").read_text())
    names = [e["name"] for e in results["entries"]]
    assert len(names) == 2 and all("engine=" in n for n in names)
    for e in results["entries"]:
        assert {"tokens_per_s", "peak_memory_mb", "val_loss", "compile_time_s"} <= set(e["figures"])  # all recorded
        assert len(e["samples"]["tokens_per_s"]) == 5  # five rounds
    assert (report.parent / "nightly_report.html").is_file()
    assert (report.parent / "nightly_trend_tokens_per_s.png").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}")
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("tbptt-exp-nightly").experiment_id])
                 if r.data.tags.get("tbptt_exp.kind") == "nightly"]
    # The night's parent answers in its description and metrics.
    assert parent.data.tags["mlflow.note.content"].startswith(
        f"**Nightly {results['date']}: no baseline yet: tonight becomes the baseline**")
    assert parent.data.metrics["nightly/entries"] == 2 and parent.data.metrics["nightly/green"] == 1.0

    second, report2 = nightly(tmp_path, *MARGIN)  # the same code again, back to back: no false alarm
    assert second.returncode == 0, second.stdout[-3000:]
    assert "Downloading artifacts" not in second.stderr  # reading the baseline from the store draws no bar
    text2 = report2.read_text()
    assert "the last good night" in text2 and "| new |" not in text2 and "REGRESSED" not in text2

    second_results = json.loads((report2.parent / "nightly_results.json").read_text())
    seen = {e["name"]: e["samples"]["tokens_per_s"] for e in results["entries"]}
    for e in second_results["entries"]:
        seen[e["name"]] = seen[e["name"]] + e["samples"]["tokens_per_s"]

    def faster(values):
        """The samples moved so that their median is 1.3x the fastest sample seen so far:
        nights here drift by up to ~10% between processes, so 1.3x a typical night could
        be only 1.15x a fast one (benchmarks/RESULTS.md)."""
        scale = 1.3 * max(values) / statistics.median(values)
        return [v * scale for v in values]

    planted = dict(results, entries=[
        {**e, "samples": {**e["samples"], "tokens_per_s": faster(seen[e["name"]])}} for e in results["entries"]
    ])
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(planted))
    third, report3 = nightly(tmp_path, f"nightly.baseline={baseline}")
    assert third.returncode == 4, third.stdout[-3000:]
    text3 = report3.read_text()
    regressed = {(line.split(" | ")[0].lstrip("| "), line.split(" | ")[1])
                 for line in text3.splitlines() if line.endswith("| regressed |")}
    assert {(name, "tokens_per_s") for name in names} & regressed and "REGRESSED" in text3
    assert "val_loss" not in {figure for _, figure in regressed}  # unchanged by the plant, and deterministic

    other = dict(results, device_fingerprint="GPU NVIDIA H100 | 81559 MB | TensorFlow 2.21.0")
    (tmp_path / "other.json").write_text(json.dumps(other))
    fourth, _ = nightly(tmp_path, f"nightly.baseline={tmp_path / 'other.json'}", "nightly.rounds=2", "engine=graph")
    assert fourth.returncode == 2
    assert "was measured on 'GPU NVIDIA H100" in fourth.stdout + fourth.stderr
