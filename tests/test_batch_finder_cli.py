"""End to end: the batch-size finder through the CLI on a CPU, with a memory budget."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tbptt_exp.batch_finder import run_probe_process
from tbptt_exp.config import ExperimentSchema, KeyRecallDataConfig

pytestmark = pytest.mark.slow

# Measured on TensorFlow 2.21's CPU allocator: peak memory jumps between batch 160 and 192
# at k=25 (about 71 MB to 110 MB), so a 90 MB budget sits far from both sides of its
# answer and independent re-runs agree; at k=10 everything up to 224 stays under 60 MB.
SMALL = [
    "data=key_recall", "data.num_noise_tokens=2000", "model.units=64", "model.embedding_dim=16",
    "batch_finder.max_batch_size=224", "batch_finder.probe_chunks=2", "device.memory_budget_mb=90",
]
VOCAB = 2005


def cli(args, cwd, extra_env=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (extra_env or {})
    return subprocess.run([sys.executable, "-m", "tbptt_exp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def store_args(tmp_path):
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"batch_finder.cache_dir={tmp_path / 'cache'}"]


def sweep_dir(cwd: Path) -> Path:
    (frontier,) = cwd.glob("multirun/*/*/batch_frontier.csv")
    return frontier.parent


def probe_config(k, overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentSchema), {"data": OmegaConf.structured(KeyRecallDataConfig)},
                          OmegaConf.from_dotlist([o for o in overrides if not o.startswith("data=")] + [f"k={k}"]))
    return OmegaConf.to_container(cfg, resolve=True)


def test_sweep_over_k_finds_a_verified_frontier_and_a_repeat_comes_from_the_cache(tmp_path):
    args = ["-m", "sweep=max_batch", "k=10,25", *SMALL, *store_args(tmp_path)]
    out = cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = sweep_dir(tmp_path)
    rows = list(csv.DictReader(open(folder / "batch_frontier.csv")))
    assert [r["k"] for r in rows] == ["10", "25"]
    for column in ("k", "max_batch_size", "recommended_batch_size", "peak_memory_mb", "tokens_per_s", "probes"):
        assert column in rows[0]
    assert (folder / "batch_frontier.json").is_file()
    assert (folder / "batch_memory.png").stat().st_size > 0 and (folder / "batch_throughput.png").stat().st_size > 0
    assert "largest workable batch per k" in out.stdout

    frontier = {row["k"]: row for row in json.loads((folder / "batch_frontier.json").read_text())}
    assert frontier[10]["max_batch_size"] == 224  # the whole range fits
    best = frontier[25]["max_batch_size"]
    assert 160 <= best < 192 and best % 8 == 0
    for row in frontier.values():
        assert row["recommended_batch_size"] <= row["max_batch_size"]
        assert row["probes"] <= math.log2(224 / 8) + 4
    # Independent runs: the answer fits and the next size up does not.
    config = probe_config(25, SMALL)
    at = run_probe_process({"config": config, "batch_size": best, "vocab_size": VOCAB, "chunks": 2}, 300)
    above = run_probe_process({"config": config, "batch_size": best + 8, "vocab_size": VOCAB, "chunks": 2}, 300)
    assert at["outcome"] == "ok" and above["outcome"] == "budget", (at, above)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tbptt-exp").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tbptt_exp.kind") == "sweep"]
    assert {"batch_frontier.csv", "batch_memory.png", "batch_throughput.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    probes = [r for r in runs if r.data.tags.get("tbptt_exp.kind") == "probe"]
    assert len(probes) == sum(r["probes"] for r in json.loads((folder / "batch_frontier.json").read_text()))
    assert {p.data.tags["outcome"] for p in probes} == {"ok", "budget"}
    assert frontier[25]["budget_mb"] == 90

    again = cli(["task=max_batch", "k=25", *SMALL, *store_args(tmp_path)], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cached result" in again.stdout and "batch_size=" not in again.stdout  # no probe ran


def test_a_planted_non_memory_error_stops_the_search_and_is_shown(tmp_path):
    out = cli(["task=max_batch", "k=10", *SMALL, *store_args(tmp_path)], cwd=tmp_path,
              extra_env={"TBPTT_EXP_PROBE_PLANT": "error:16"})
    assert out.returncode == 3
    assert "not out-of-memory: batch_size=" in out.stderr and "planted failure" in out.stderr
    assert not list((tmp_path / "cache").glob("*.json"))  # nothing cached from a broken search


def test_a_hanging_probe_is_timed_out_and_counts_as_too_big(tmp_path):
    out = cli(["task=max_batch", "k=10", *SMALL, "batch_finder.max_batch_size=40",
               "batch_finder.probe_timeout_s=45", *store_args(tmp_path)], cwd=tmp_path,
              extra_env={"TBPTT_EXP_PROBE_PLANT": "hang:32"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch_size=32: timeout" in out.stdout
    assert "largest workable batch 24" in out.stdout


def test_a_planted_out_of_memory_is_classified_as_too_big(tmp_path):
    out = cli(["task=max_batch", "k=10", *SMALL, "batch_finder.max_batch_size=64", *store_args(tmp_path)],
              cwd=tmp_path, extra_env={"TBPTT_EXP_PROBE_PLANT": "oom:40"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch_size=40: oom" in out.stdout and "largest workable batch 32" in out.stdout
