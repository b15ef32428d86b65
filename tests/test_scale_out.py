"""Scaling out on existing engines: a GPU slot per worker, Slurm through submitit, and a
team's MLflow tracking server on PostgreSQL."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_cli import TINY, cli, free_port, runs
from test_optuna_cli import postgres_url

from tbptt_exp.app.preflight.gpus import check_gpus
from tbptt_exp.core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FOUR_GPUS = ["0", "1", "2", "3"]


def worker(slots_dir: Path, per_job: int, gpus=FOUR_GPUS) -> subprocess.Popen:
    """A worker process that claims its GPUs, prints them, and holds them until stdin closes."""
    code = textwrap.dedent(f"""
        import json, os, sys
        from pathlib import Path
        from tbptt_exp.core.config import ConfigError
        from tbptt_exp.core.device import claim_gpus
        try:
            mine = claim_gpus({gpus!r}, {per_job}, Path({str(slots_dir)!r}))
            again = claim_gpus({gpus!r}, {per_job}, Path({str(slots_dir)!r}))
            print(json.dumps({{"gpus": mine, "again": again, "env": os.environ["CUDA_VISIBLE_DEVICES"]}}), flush=True)
        except ConfigError as error:
            print(json.dumps({{"error": str(error)}}), flush=True)
        sys.stdin.read()
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def answer(proc: subprocess.Popen) -> dict:
    return json.loads(proc.stdout.readline())


def test_parallel_workers_each_get_gpus_of_their_own_and_one_too_many_is_refused(tmp_path):
    first, second = worker(tmp_path, 2), worker(tmp_path, 2)
    a, b = answer(first), answer(second)
    assert sorted([a["gpus"], b["gpus"]]) == [["0", "1"], ["2", "3"]]
    for got in (a, b):
        assert got["again"] == got["gpus"] and got["env"] == ",".join(got["gpus"])  # claimed once per process
    third = worker(tmp_path, 2)
    refused = answer(third)["error"]
    assert refused.startswith("device.gpus_per_job=2 is not allowed: all 2 slot(s)") and "\n" not in refused
    assert "hydra.launcher.n_jobs=2" in refused
    # A single-GPU worker fits in neither slot while both are held ...
    assert "error" in answer(worker(tmp_path, 1))
    first.communicate("")  # ... and takes a freed GPU once a worker exits
    freed = answer(worker(tmp_path, 1))
    assert freed["gpus"] == [a["gpus"][0]]
    for proc in (second, third):
        proc.communicate("")


def test_more_gpus_per_job_than_the_machine_has_is_one_line():
    from tbptt_exp.core.device import claim_gpus

    with pytest.raises(ConfigError, match=r"^device.gpus_per_job=2 is not allowed: this machine shows 1 GPU"):
        claim_gpus(["0"], 2, Path("/nonexistent"))


def launch_config(per_job, launcher, n_jobs=None):
    return OmegaConf.create({"device": {"gpus_per_job": per_job},
                             "hydra": {"launcher": {"_target_": launcher, "n_jobs": n_jobs}}})


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def test_a_parallel_sweep_asking_for_more_gpus_than_the_host_has_stops_before_it_starts():
    check_gpus(launch_config(1, JOBLIB, 4), multirun=True, gpus=FOUR_GPUS)
    check_gpus(launch_config(2, JOBLIB, 2), multirun=True, gpus=FOUR_GPUS)
    with pytest.raises(ConfigError, match="4 worker.* x 2 GPU.* need 8, and this machine shows 4; set hydra.launcher.n_jobs=2"):
        check_gpus(launch_config(2, JOBLIB, 4), multirun=True, gpus=FOUR_GPUS)
    with pytest.raises(ConfigError, match="this machine shows 0"):
        check_gpus(launch_config(1, "hydra._internal.core_plugins.basic_launcher.BasicLauncher"), False, gpus=[])
    check_gpus(launch_config(None, JOBLIB, 16), multirun=True, gpus=[])  # not asked: nothing to check
    check_gpus(launch_config(1, SLURM), multirun=True, gpus=[])  # Slurm's tasks run on other hosts


def test_the_slurm_preset_composes_with_gpus_time_limit_and_partition():
    from hydra import compose, initialize_config_dir

    from tbptt_exp.app.hydra_app import register_configs
    from tbptt_exp.paths import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "k=10"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM
    assert (launcher.gpus_per_task, launcher.timeout_min, launcher.partition) == (1, 120, "gpu")
    assert cfg.device.gpus_per_job is None  # Slurm assigns the GPUs


@pytest.mark.slow
def test_the_submitit_local_executor_runs_a_tracked_sweep(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cli(["-m", "k=5,10", "hydra/launcher=submitit_local", *[a for a in TINY if not a.startswith("k=")],
               "trainer.epochs=1", f"tracking.uri={store}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    all_runs = runs(store)
    (parent,) = [r for r in all_runs if r.data.tags.get("tbptt_exp.kind") == "sweep"]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.params["k"]) for r in children) == [5, 10]
    assert {r.info.status for r in [parent, *children]} == {"FINISHED"}
    assert list(tmp_path.glob("multirun/*/*/.submitit/*/*_result.pkl"))  # submitit ran them as its jobs
    assert "best val_loss" in out.stdout


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.time() < deadline, f"{url} did not answer"
            time.sleep(1)


@pytest.mark.slow
def test_the_team_tracking_server_on_postgresql_takes_runs_children_artifacts_and_the_frontier(tmp_path):
    import psycopg

    base = postgres_url()  # skips on a machine without PostgreSQL, unless CI requires it
    database = f"tbptt_mlflow_{uuid.uuid4().hex[:10]}"
    admin = base.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(ROOT / "scripts" / "tracking_server.sh"), base.rsplit("/", 1)[0] + f"/{database}",
         str(tmp_path / "artifacts"), "127.0.0.1", str(port), "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health")
        train = cli(["-m", "k=5,10", *[a for a in TINY if not a.startswith("k=")], "trainer.epochs=1",
                     f"tracking.uri={uri}"], cwd=tmp_path)
        assert train.returncode == 0, train.stderr[-3000:]
        finder = cli(["-m", "sweep=max_batch", "k=10", "data=key_recall", "data.num_sequences=64",
                      "data.sequence_length=20", "model.units=16", "model.embedding_dim=8",
                      "batch_finder.max_batch_size=32", "batch_finder.probe_seconds=0.5", "batch_finder.noise_warmup_s=2",
                      f"batch_finder.cache_dir={tmp_path / 'cache'}", f"tracking.uri={uri}"], cwd=tmp_path)
        assert finder.returncode == 0, finder.stderr[-3000:]

        from mlflow import MlflowClient

        client = MlflowClient(uri)
        trained = runs(uri)
        (parent,) = [r for r in trained if r.data.tags.get("tbptt_exp.kind") == "sweep"]
        children = [r for r in trained if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
        for child in children:  # artifacts went through the server to its root
            assert "config.yaml" in {a.path for a in client.list_artifacts(child.info.run_id)}
        assert list((tmp_path / "artifacts").rglob("config.yaml"))

        experiment = client.get_experiment_by_name("tbptt-exp-max-batch")
        (sweep,) = client.search_runs([experiment.experiment_id], "tags.`tbptt_exp.kind` = 'sweep'")
        assert {"batch_frontier.csv", "batch_memory.png"} <= {a.path for a in client.list_artifacts(sweep.info.run_id)}
        (per_k,) = client.search_runs([experiment.experiment_id], "tags.`tbptt_exp.kind` = 'max_batch'")
        assert per_k.data.metrics["batch/max"] >= 8 and client.get_metric_history(per_k.info.run_id, "probe/fits")

        with psycopg.connect(admin.rsplit("/", 1)[0] + f"/{database}") as conn:  # stored in PostgreSQL itself
            (count,) = conn.execute("SELECT count(*) FROM runs").fetchone()
        assert count == len(trained) + 2  # + the batch finder's parent and its k=10 run
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
