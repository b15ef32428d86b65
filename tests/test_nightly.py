"""Nightly benchmark: comparison logic (fast) and the CLI end to end (slow)."""

import json
import os
import subprocess
import sys

import pytest

from tbptt_exp.core.config import NightlyConfig
from tbptt_exp.app.nightly import BaselineError, baseline_from_file, compare, entry_name, threshold_for


def test_entry_names_are_stable_and_leave_out_tracking_and_hydra():
    a = entry_name(["k=25", "engine=graph", "tracking.uri=sqlite:///x", "sweep=nightly", "hydra.job.num=3"])
    b = entry_name(["engine=graph", "sweep=nightly", "k=25", "tracking.uri=sqlite:///y"])
    assert a == b == "engine=graph k=25"


def test_verdicts_follow_each_figures_direction():
    cfg = NightlyConfig()
    baseline = {"e": {"tokens_per_s": [1000.0], "peak_memory_mb": [100.0], "val_loss": [2.0]}}
    rows = {r.figure: r for r in compare({"e": {"tokens_per_s": 800.0, "peak_memory_mb": 80.0, "val_loss": 2.01}}, baseline, cfg)}
    assert rows["tokens_per_s"].verdict == "regressed"  # -20% throughput, threshold 15%
    assert rows["peak_memory_mb"].verdict == "improved"  # -20% memory
    assert rows["val_loss"].verdict == "ok"
    assert compare({"new entry": {"val_loss": 1.0}}, baseline, cfg)[0].verdict == "new"


def test_thresholds_widen_with_the_baselines_noise():
    cfg = NightlyConfig()
    assert threshold_for("tokens_per_s", cfg, [1000.0]) == 0.15
    noisy = [1000.0, 1300.0, 700.0, 1200.0, 800.0]
    assert threshold_for("tokens_per_s", cfg, noisy) > 0.5
    rows = compare({"e": {"tokens_per_s": 750.0}}, {"e": {"tokens_per_s": noisy}}, cfg)
    assert rows[0].verdict == "ok"  # -25% is within this baseline's own spread


def test_a_baseline_file_from_another_device_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"device_fingerprint": "GPU A100 | 81920 MB | TensorFlow 2.21.0",
                                "entries": [{"name": "e", "figures": {"val_loss": 1.0}}]}))
    with pytest.raises(BaselineError, match="measured on 'GPU A100.*allow_other_device"):
        baseline_from_file(path, "CPU x86_64 | 24106 MB | TensorFlow 2.21.0", False)
    baseline, note = baseline_from_file(path, "CPU x86_64 | 24106 MB | TensorFlow 2.21.0", True)
    assert baseline == {"e": {"val_loss": [1.0]}} and "another device" in note


TINY = ["-m", "sweep=nightly", "engine=graph,keras_fit", "model=lstm", "k=10", "data.max_chars=8000",
        "data.sequence_length=40", "model.units=32", "nightly.thresholds.tokens_per_s=0.95",
        "nightly.thresholds.epoch_time_s=0.95", "nightly.thresholds.compile_time_s=0.95"]


def nightly(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "tbptt_exp", *TINY, f"tracking.uri=sqlite:///{tmp_path / 'ml.db'}", *extra],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    reports = sorted(tmp_path.glob("multirun/*/*/nightly_report.md"), key=lambda p: p.stat().st_mtime)
    return out, reports[-1] if reports else None


@pytest.mark.slow
def test_nightly_first_run_passes_then_compares_then_flags_planted_regressions(tmp_path):
    first, report = nightly(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    text = report.read_text()
    assert "no previous nightly run on this device" in text and "becomes the baseline" in text
    results = json.loads((report.parent / "nightly_results.json").read_text())
    names = [e["name"] for e in results["entries"]]
    assert len(names) == 2 and all("engine=" in n for n in names)
    for e in results["entries"]:
        assert {"tokens_per_s", "peak_memory_mb", "val_loss", "compile_time_s"} <= set(e["figures"])
    assert (report.parent / "nightly_report.html").is_file()
    assert (report.parent / "nightly_trend_tokens_per_s.png").is_file()

    second, report2 = nightly(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:]
    text2 = report2.read_text()
    assert "median of the 1 previous nightly run(s) on this device" in text2
    assert "| new |" not in text2  # every figure compared with the first night

    planted = dict(results)
    planted["entries"] = [
        {"name": e["name"], "figures": {**e["figures"], "tokens_per_s": e["figures"]["tokens_per_s"] * 100,
                                        "val_loss": e["figures"]["val_loss"] / 2}}
        for e in results["entries"]
    ]
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(planted))
    third, report3 = nightly(tmp_path, f"nightly.baseline={baseline}")
    assert third.returncode == 4
    text3 = report3.read_text()
    assert "REGRESSED" in text3
    for name in names:
        assert f"| {name} | tokens_per_s |" in text3 and f"| {name} | val_loss |" in text3
    regressed_lines = [line for line in text3.splitlines() if line.endswith("| regressed |")]
    assert {line.split(" | ")[1] for line in regressed_lines} == {"tokens_per_s", "val_loss"}

    other = dict(results, device_fingerprint="GPU NVIDIA H100 | 81559 MB | TensorFlow 2.21.0")
    (tmp_path / "other.json").write_text(json.dumps(other))
    fourth, _ = nightly(tmp_path, f"nightly.baseline={tmp_path / 'other.json'}")
    assert fourth.returncode == 2
    assert "was measured on 'GPU NVIDIA H100" in fourth.stdout + fourth.stderr
