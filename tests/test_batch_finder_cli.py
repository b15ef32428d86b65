"""End to end: the batch-size finder through the CLI on a CPU, with a memory budget."""

import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from planted_probe import planted

from tbptt_exp.app.batch.finder import GOODPUT_TIE, ProbeError, find_max_batch, max_probes
from tbptt_exp.app.jobs import EXIT_PROBE_ERROR, JobContext, max_batch_job
from tbptt_exp.app.settings import BatchFinderConfig, RunConfig, TrackingConfig
from tbptt_exp.core.config import DeviceConfig, EngineConfig, KeyRecallDataConfig, ModelConfig
from tbptt_exp.core.noise import goodput

pytestmark = pytest.mark.slow

# The CPU peak of one size scatters between identical processes (TensorFlow 2.21's optimised
# graph differs by process, benchmarks/RESULTS.md): B=144 at k=10 read 40.4 and 49.9 MB in two
# one-epoch runs. So a real run at the largest size, whose probe sits just under the budget, may
# land just over it; the recommended size, which leaves the headroom free, must hold.
BUDGET_MB = 50
SMALL = [
    "data=key_recall", "data.num_sequences=256", "data.sequence_length=40", "data.num_noise_tokens=2000", "model.units=64", "model.embedding_dim=16",
    "batch_finder.max_batch_size=224", "batch_finder.probe_seconds=1.5", f"device.memory_budget_mb={BUDGET_MB}",
    "batch_finder.noise_warmup_s=3",
]


def cli(args, cwd, extra_env=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (extra_env or {})
    return subprocess.run([sys.executable, "-m", "tbptt_exp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def store_args(tmp_path):
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"batch_finder.cache_dir={tmp_path / 'cache'}"]


def sweep_dir(cwd: Path) -> Path:
    (frontier,) = cwd.glob("multirun/*/*/batch_frontier.csv")
    return frontier.parent


def small(k: int, tmp_path: Path, max_batch_size: int = 224, **finder) -> RunConfig:
    """``SMALL`` as a config object."""
    return RunConfig(
        k=k, data=KeyRecallDataConfig(num_sequences=256, sequence_length=40, num_noise_tokens=2000), model=ModelConfig(units=64, embedding_dim=16),
        batch_finder=BatchFinderConfig(max_batch_size=max_batch_size, probe_seconds=1.5,
                                       cache_dir=str(tmp_path / "cache"), **({"noise_warmup_s": 3.0} | finder)),
        device=DeviceConfig(memory_budget_mb=BUDGET_MB),
        tracking=TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"),
    )


def real_run(k: int, batch_size: int, cwd: Path) -> float:
    """An independent one-epoch training run; how far its peak is over the budget, in MB
    (negative: within it)."""
    out = cli([f"k={k}", f"batch_size={batch_size}", "trainer.epochs=1", "tracking=none",
               *[a for a in SMALL if not a.startswith("batch_finder.")]], cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [line for line in out.stdout.splitlines() if f"the memory budget of {BUDGET_MB} MB" in line]
    verdict, by = re.search(r"(within|over) the memory budget of \d+ MB by ([\d.]+) MB", line).groups()
    return float(by) * (1 if verdict == "over" else -1)


def test_sweep_over_k_finds_a_frontier_that_holds_in_real_training_and_a_repeat_comes_from_the_cache(tmp_path):
    args = ["-m", "sweep=max_batch", "k=10,25", *SMALL, *store_args(tmp_path)]
    out = cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = sweep_dir(tmp_path)
    rows = list(csv.DictReader((folder / "batch_frontier.csv").read_text().splitlines()))
    assert [r["k"] for r in rows] == ["10", "25"]
    for column in ("k", "max_batch_size", "recommended_batch_size", "peak_memory_mb", "tokens_per_s",
                   "tokens_per_s_spread", "probes", "memory_monotone", "useful_batch_size", "critical_batch_size",
                   "noise_scale", "noise_measured", "noise_batch_size", "noise_tokens_per_s", "goodput"):
        assert column in rows[0]
    assert (folder / "batch_frontier.json").is_file()
    for plot in ("batch_memory.png", "batch_throughput.png", "batch_goodput.png"):
        assert (folder / plot).stat().st_size > 0
    assert "largest and useful batch per k" in out.stdout

    bound = max_probes(BatchFinderConfig(max_batch_size=224))
    for row in json.loads((folder / "batch_frontier.json").read_text()):
        k, best, rec = row["k"], row["max_batch_size"], row["recommended_batch_size"]
        assert 8 <= rec <= best < 224 and best % 8 == 0, row
        assert row["probes"] <= bound == 7
        probed = {p["batch_size"]: p for p in row["probe_log"]}
        assert probed[best]["outcome"] == "ok" and probed[best + 8]["outcome"] == "budget"
        assert rec in probed and probed[rec]["peak_memory_mb"] <= BUDGET_MB * 0.9
        # Probes that fit are timed (several windows each); a probe over the budget stops there, untimed.
        assert all((p["tokens_per_s_spread"] is not None) == (p["outcome"] == "ok") for p in probed.values())
        assert all(set(p["phases"]) >= {"start", "build", "compile"} for p in probed.values())
        # The answer holds in real training: independent one-epoch runs. The recommended size is
        # within the budget; the largest is within it or over by less than the headroom.
        assert real_run(k, rec, tmp_path) < 0, row
        assert real_run(k, best, tmp_path) < BUDGET_MB * BatchFinderConfig().headroom, row
        assert row["budget_mb"] == BUDGET_MB
        # The useful batch: of highest goodput among the probes that fit and the warm-up's batch, by a
        # noise scale measured after the warm-up's training at the recommended size.
        assert row["noise_scale"] > 0 and row["critical_batch_size"] == round(row["noise_scale"])
        warmup = re.match(rf"after (\d+) s of training at batch {rec} \(", row["noise_measured"])
        assert row["noise_batch_size"] == rec and warmup and int(warmup[1]) >= 3, row["noise_measured"]
        scored = {p["batch_size"]: p["goodput"] for p in row["probe_log"] if p["outcome"] == "ok"}
        assert all(g is not None for g in scored.values())
        scored.setdefault(rec, goodput(row["noise_tokens_per_s"], rec, row["noise_scale"], 32))
        tied = [b for b, g in scored.items() if g >= (1 - GOODPUT_TIE) * max(scored.values())]
        assert row["useful_batch_size"] == max(tied) <= best and row["goodput"] == scored[max(tied)]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment_by_name("tbptt-exp") is None  # training runs' charts stay uncrowded
    runs = client.search_runs([client.get_experiment_by_name("tbptt-exp-max-batch").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tbptt_exp.kind") == "sweep"]
    assert parent.info.run_name == f"max_batch k=10,25 budget {BUDGET_MB} MB"
    assert parent.data.params["swept.k"] == "10,25" and parent.data.params["device.memory_budget_mb"] == str(BUDGET_MB)
    assert {"batch_frontier.csv", "batch_memory.png", "batch_throughput.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert not [r for r in runs if r.data.tags.get("tbptt_exp.kind") == "probe"]  # probes are steps, not runs
    per_k = {int(r.data.params["k"]): r for r in runs if r.data.tags.get("tbptt_exp.kind") == "max_batch"}
    for row in json.loads((folder / "batch_frontier.json").read_text()):
        run_id = per_k[row["k"]].info.run_id
        fits = {m.step: m.value for m in client.get_metric_history(run_id, "probe/fits")}
        assert fits == {p["batch_size"]: float(p["outcome"] == "ok") for p in row["probe_log"]}
        assert per_k[row["k"]].data.metrics["batch/max"] == row["max_batch_size"]
        assert "batch_size" not in per_k[row["k"]].data.params  # a setting this task does not read
        # Each k's run opens on its answer, and its name says the budget.
        note = per_k[row["k"]].data.tags["mlflow.note.content"]
        assert note.startswith(f"**k={row['k']}: largest {row['max_batch_size']}, recommended {row['recommended_batch_size']}"), note
        assert per_k[row["k"]].info.run_name.endswith(f"budget {BUDGET_MB} MB")
        assert row["max_is_ceiling"] is False
    # The parent answers: the frontier per k in its description and as metrics charted against k.
    note = parent.data.tags["mlflow.note.content"]
    assert f"within a budget of {BUDGET_MB} MB" in note and "- k=10: largest" in note and "- k=25: largest" in note
    history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "frontier/max_batch_size")}
    assert history == {r["k"]: r["max_batch_size"] for r in json.loads((folder / "batch_frontier.json").read_text())}
    useful = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "frontier/useful_batch_size")}
    assert useful == {r["k"]: r["useful_batch_size"] for r in json.loads((folder / "batch_frontier.json").read_text())}
    assert "- k=10: largest" in note and ", useful " in note and "batch_goodput.png" in note
    assert out.stdout.count("in MLflow: http") == 1 and "open the run" not in out.stdout
    assert "env_set" not in out.stdout + out.stderr and "job 2/2: k=25" in out.stdout

    # One k of the preset's list: the sweep is named after what ran, and comes from the cache.
    again = cli(["-m", "sweep=max_batch", "k=25", *SMALL, *store_args(tmp_path)], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cached result" in again.stdout and "batch_size=" not in again.stdout  # no probe ran
    names = {r.info.run_name for r in client.search_runs([client.get_experiment_by_name("tbptt-exp-max-batch").experiment_id])
             if r.data.tags.get("tbptt_exp.kind") == "sweep"}
    assert f"max_batch k=25 budget {BUDGET_MB} MB" in names


def test_keras_fit_probes_train_with_its_own_layout(tmp_path):
    """The classic recipe's engine: probes use its dummy-row layout and callback resets."""
    frontier = find_max_batch(replace(small(25, tmp_path, max_batch_size=48), engine=EngineConfig("keras_fit")))
    assert 8 <= frontier.max_batch_size <= 48 and frontier.probes <= max_probes(BatchFinderConfig(max_batch_size=48))
    assert {p.outcome for p in frontier.probe_log} <= {"ok", "budget"}


def test_a_planted_non_memory_error_stops_the_search_and_is_shown(tmp_path, monkeypatch, capsys):
    from tbptt_exp.app.batch import finder as batch_finder

    monkeypatch.setattr(batch_finder, "PROBE_ENTRY", planted("error:16"))
    with pytest.raises(SystemExit) as stopped:
        max_batch_job(small(10, tmp_path), JobContext(output_dir=tmp_path))
    assert stopped.value.code == EXIT_PROBE_ERROR
    err = capsys.readouterr().err
    assert "not out-of-memory: batch_size=" in err and "planted failure" in err
    assert not list((tmp_path / "cache").glob("*.json"))  # nothing cached from a broken search
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("tbptt-exp").experiment_id])
              if r.data.tags.get("tbptt_exp.kind") == "max_batch"]
    assert run.info.status == "FAILED" and "planted failure" in run.data.tags["error"]


def test_a_hanging_probe_is_timed_out_and_counts_as_too_big(tmp_path):
    cfg = small(10, tmp_path, max_batch_size=40, probe_timeout_s=45)
    frontier = find_max_batch(cfg, probe_entry=planted("hang:32"))
    assert {p.batch_size: p.outcome for p in frontier.probe_log}[32] == "timeout"
    assert frontier.max_batch_size == 24


def test_a_planted_out_of_memory_is_classified_as_too_big(tmp_path):
    frontier = find_max_batch(small(10, tmp_path, max_batch_size=64), probe_entry=planted("oom:40"))
    assert {p.batch_size: p.outcome for p in frontier.probe_log}[40] == "oom"
    assert frontier.max_batch_size == 32
    with pytest.raises(ProbeError, match="planted failure"):
        find_max_batch(small(10, tmp_path, cache=False), probe_entry=planted("error:8"))


def test_the_frontier_of_arrays_and_table_datasets(tmp_path):
    """``-m sweep=max_batch`` on your own numeric sequences: probes load the same file."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(3000, 3)).astype("float32"), rng.integers(0, 3, 3000)
    np.savez(tmp_path / "d.npz", x=x, y=y, lengths=[100] * 30)
    pd.DataFrame({"s": np.repeat(np.arange(30), 100), "a": x[:, 0], "b": x[:, 1], "y": y}).to_csv(tmp_path / "d.csv")
    kinds = {"arrays": ["data=arrays", f"data.path={tmp_path / 'd.npz'}"],
             "table": ["data=table", f"data.path={tmp_path / 'd.csv'}", "data.sequence_column=s", "data.target_column=y"]}
    for kind, data in kinds.items():
        cwd = tmp_path / kind
        cwd.mkdir()
        out = cli(["-m", "sweep=max_batch", "k=10,20", *data, "model.units=16", "batch_finder.max_batch_size=32",
                   "batch_finder.probe_seconds=0.5", *store_args(tmp_path)], cwd=cwd)
        assert out.returncode == 0, out.stderr[-3000:]
        rows = json.loads((sweep_dir(cwd) / "batch_frontier.json").read_text())
        assert [r["k"] for r in rows] == [10, 20] and all(r["max_batch_size"] == 32 for r in rows), rows  # no budget
        assert all(p["outcome"] == "ok" and p["tokens_per_s"] for r in rows for p in r["probe_log"])
        # Every probe fitted: 32 is the range's ceiling, not a measured limit, and that is said.
        assert all(r["max_is_ceiling"] for r in rows)
        assert out.stdout.count("raise batch_finder.max_batch_size") >= 2, out.stdout[-2000:]


def test_the_default_model_gets_the_same_answer_twice(tmp_path):
    """The issue's command, twice: the largest sizes within 25%. Before a probe's first
    execution always measured, three runs gave 328, 360 and 584 (1.78); with it, 288 to 320
    in seven (1.11); with the CPU allocator given one region first, 328 to 352 in six (1.07,
    benchmarks/RESULTS.md), but this test's pair once read 320 and 360 (1.125), so 10% is
    not held yet."""
    answers = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        out = cli(["-m", "sweep=max_batch", "k=25", "device.memory_budget_mb=300", "batch_finder.cache=false",
                   "tracking=none", "batch_finder.noise_warmup_s=3"], cwd=tmp_path / run)
        assert out.returncode == 0, out.stderr[-2000:]
        with open(sweep_dir(tmp_path / run) / "batch_frontier.csv") as f:
            (row,) = list(csv.DictReader(f))
        answers.append(int(row["max_batch_size"]))
    assert max(answers) / min(answers) <= 1.25, answers
