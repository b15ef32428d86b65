"""End to end: the real CLI in a subprocess, tracked in a temporary MLflow store."""

import atexit
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

TINY = [
    "data.max_chars=8000", "data.sequence_length=40", "k=10", "batch_size=8",
    "model.units=32", "model.embedding_dim=16", "trainer.epochs=2",
]
EPOCH_METRICS = {
    "loss/train", "loss/val", "loss/val_bits_per_char", "speed/real_tokens_per_s", "speed/all_tokens_per_s",
    "memory/process_rss_peak_mb", "speed/epoch_time_s",
}
# TINY's 32-unit model is too small for TensorFlow's CPU allocator to count (it counts no
# allocation under 4 KB): its peak is not measured, so it is never logged (a 0 would pass any budget).
UNMEASURED = "memory/allocator_peak_mb"
ONCE_METRICS = {"speed/compile_time_s", "padding/waste", "model/num_params", "tracking/overhead_s"}


@functools.cache
def empty_store() -> Path:
    """An MLflow store as a first start makes it (``stores.create_store``: MLflow's schema, no
    experiment), made once per test process: making one runs MLflow's migrations, about 3 s."""
    from tbptt_exp.app.tracking.stores import create_store

    folder = Path(tempfile.mkdtemp(prefix="tbptt-store-"))
    atexit.register(shutil.rmtree, folder, True)
    create_store(f"sqlite:///{folder / 'mlflow.db'}", "tracking.uri", "mlflow")
    return folder / "mlflow.db"


def cli(args, cwd, timeout=300, premade_store=True, **kwargs):
    """``python -m tbptt_exp args`` in ``cwd``; a new SQLite tracking store that ``args`` name
    starts as a copy of ``empty_store`` unless ``premade_store`` is false (what tests of making
    stores need)."""
    from tbptt_exp.app.tracking.stores import sqlite_path

    for arg in args:
        key, _, url = arg.partition("=")
        path = sqlite_path(url.strip("'\"")) if premade_store and key == "tracking.uri" else None
        if path and not path.exists() and path.parent.is_dir() and os.access(path.parent, os.W_OK):
            shutil.copyfile(empty_store(), path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "tbptt_exp", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=timeout, **kwargs,
    )


# What libraries print unasked: TensorFlow's C++ log lines (absl format: I0000 ...), CUDA and
# oneDNN notices, MLflow/alembic INFO records, matplotlib's font cache.
NOISE = re.compile(r"^[IWEF]\d{4} |oneDNN|cuInit|cuda|absl|\bINFO\b|alembic|Matplotlib|font cache", re.MULTILINE)


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE.search(line)]


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def runs(uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tbptt-exp")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_single_run_is_tracked_with_params_metrics_tags_and_config(tmp_path, store):
    out = cli([*TINY, f"tracking.uri={store}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "epoch 2/2" in out.stdout and "tokens/s" in out.stdout
    assert f"mlflow ui --backend-store-uri {store}" in out.stdout
    assert not noise(out.stdout + out.stderr), noise(out.stdout + out.stderr)
    (run,) = runs(store)
    assert f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in out.stdout
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["k"], params["batch_size"], params["padding"], params["reset"]) == ("10", "8", "dummy", "sequence")
    assert params["model.units"] == "32" and params["data.name"] == "chars"
    # Only what training reads: where it is recorded, the batch finder and nightly are not params.
    assert not [p for p in params if p.startswith(("tracking.", "batch_finder.", "nightly.", "task", "verbose"))]
    assert not [p for p in params if p.startswith(("model.factory", "model.params"))]  # the built-in model's: not read
    # Bounded so the run page reads at a glance; the learning-rate rule, noise measurement and time
    # and target stops (trainer.*) are read by training, so they are params too.
    assert len(params) <= 50 and float(params["trainer.scaled_learning_rate"]) == pytest.approx(0.003 * (8 / 32) ** 0.5)
    assert run.data.tags["mlflow.source.name"] == "python -m tbptt_exp" and run.data.tags["mlflow.user"]
    assert "allocator peak" in run.data.tags["mlflow.note.content"]
    assert not [m for m in run.data.metrics if m.startswith("objective.")]  # no duplicate of loss/val
    assert (params["model.unroll"], params["trainer.precision"]) == ("auto", "float32")
    assert EPOCH_METRICS | ONCE_METRICS <= set(run.data.metrics) and UNMEASURED not in run.data.metrics
    assert "peak unknown" in out.stdout
    from mlflow import MlflowClient

    client = MlflowClient(store)
    history = client.get_metric_history(run.info.run_id, "loss/val")
    assert [m.step for m in history] == [1, 2]
    tags = run.data.tags
    for tag in ("tensorflow.version", "keras.version", "git.commit", "device_name", "device_memory_mb"):
        assert tags.get(tag), tag
    assert "k=10" in tags["hydra.overrides"]
    assert (tags["unroll"], tags["jit_compile"]) == ("false", "false")  # auto as built on a CPU
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "result.json", "vocabulary.json"} <= artifacts


@pytest.mark.slow
def test_multirun_gives_one_parent_with_a_finished_child_per_k(tmp_path, store):
    out = cli(["-m", "k=10,25,50", *[a for a in TINY if not a.startswith(("k=", "data.sequence_length"))],
               "data.sequence_length=50", "trainer.epochs=1", f"tracking.uri={store}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    all_runs = runs(store)
    parents = [r for r in all_runs if r.data.tags.get("tbptt_exp.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.params["k"]) for r in children) == [10, 25, 50]
    for child in children:
        assert child.info.status == "FINISHED"
        assert EPOCH_METRICS | ONCE_METRICS <= set(child.data.metrics) and UNMEASURED not in child.data.metrics
    assert "sweep results" in out.stdout


@pytest.mark.parametrize(
    "args, setting",
    [
        (["k=0"], "k="),
        (["batch_size=-2"], "batch_size="),
        (["padding=zeros"], "padding="),
        (["reset=sometimes"], "reset="),
        (["engine=torch"], "engine="),
        (["k=500"], "k="),
        (["data.path=/no/such/folder"], "data.path="),
        (["engine=keras_fit", "padding=pack"], "padding="),
        (["engine=keras_fit", "trainer.steps_per_execution=4"], "trainer.steps_per_execution="),
        (["engine=keras_fit", "padding=stream", "data.cut=documents"], "padding="),
        (["data.max_sequence_length=100"], "data.max_sequence_length="),
        (["padding=stream", "batch_size=4096", "data.max_chars=20000"], "batch_size="),
        (["model.units=100000000000"], "model.units="),  # 4e22 parameters: refused before TensorFlow allocates
        (["model.embedding_dim=100000000000000"], "model.embedding_dim="),
        (["-m", "k=5,10", "--cfg", "job"], "command line="),  # Hydra's ValueError traceback otherwise
    ],
)
def test_bad_values_exit_2_with_one_line_and_leave_no_run(tmp_path, store, args, setting):
    out = cli([*args, f"tracking.uri={store}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(f"tbptt-exp: error: {setting}")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert runs(store) == []


def test_bad_data_inside_a_sweep_is_the_single_runs_one_line_before_any_job(tmp_path, store):
    (tmp_path / "empty.txt").write_text("")
    out = cli(["-m", "k=5,10", f"data.path={tmp_path / 'empty.txt'}", f"tracking.uri={store}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "data.path=" in out.stderr
    assert runs(store) == []  # no parent, no job


def test_a_folder_without_text_fails_before_any_run(tmp_path, store):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blob.txt").write_bytes(b"\xff\xfe\x00\x81")
    out = cli([f"data.path={tmp_path / 'data'}", f"tracking.uri={store}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "data.path=" in out.stderr and "no readable UTF-8 text" in out.stderr
    assert "Traceback" not in out.stderr
    assert runs(store) == []


@pytest.mark.slow
def test_sigterm_mid_training_ends_the_run_killed(tmp_path, store):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tbptt_exp", *TINY, "trainer.epochs=500", f"tracking.uri={store}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    try:
        for line in proc.stdout:
            if "epoch 1/500" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143, rest
    (run,) = runs(store)
    assert run.info.status == "KILLED"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_sweep_through_a_real_mlflow_server_reads_well_in_its_ui(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(1)
        # 128 units: a model whose peak the CPU allocator counts, so the memory column has figures.
        args = ["-m", "k=5,10", *[a for a in TINY if not a.startswith(("k=", "model.units"))], "model.units=128",
                "trainer.epochs=1", f"tracking.uri={uri}", "tracking.system_metrics_interval_s=0.5"]
        out = cli(args, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        all_runs = runs(uri)
        (parent,) = [r for r in all_runs if r.data.tags.get("tbptt_exp.kind") == "sweep"]
        children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)

        # The parent says what was swept and what won.
        assert parent.info.run_name == "k=5,10"
        assert parent.data.params["swept.k"] == "5,10" and parent.data.params["trainer.epochs"] == "1"
        assert not [p for p in parent.data.params if p.startswith("tracking.")]
        best = min(children, key=lambda r: r.data.metrics["loss/val"])
        assert parent.data.metrics["best/val_loss"] == pytest.approx(best.data.metrics["loss/val"])
        assert parent.data.tags["best.settings"] == f"k={best.data.params['k']}"
        assert parent.data.tags["mlflow.note.content"].startswith(f"**Best val_loss {best.data.metrics['loss/val']:.4f} "
                                                                  f"with k={best.data.params['k']}**")
        by_k = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "by_k/val_loss")}
        assert by_k == {int(r.data.params["k"]): r.data.metrics["loss/val"] for r in children}  # charted against k
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"sweep_k.png", "sweep_results.md"} <= artifacts
        table = Path(client.download_artifacts(parent.info.run_id, "sweep_results.md", str(tmp_path))).read_text()
        assert "| k=5 |" in table and "tracking.uri" not in table

        # Children: the settings training reads, MLflow's system metrics, figures in sections.
        for child in children:
            assert 20 < len(child.data.params) <= 50 and "trainer.scaled_learning_rate" in child.data.params
            assert any(m.startswith("system/cpu_utilization") for m in child.data.metrics), child.data.metrics
            assert {"loss/train", "loss/val", "speed/real_tokens_per_s", "memory/allocator_peak_mb"} <= set(child.data.metrics)
            weights_mb = child.data.metrics["model/num_params"] * 4 / 2**20  # float32
            assert child.data.metrics["memory/allocator_peak_mb"] > weights_mb, child.data.metrics
            assert "config.yaml" in {a.path for a in client.list_artifacts(child.info.run_id)}

        # The printed link opens the parent run in this server's UI.
        # One link, the parent's, in the UI's model-training view (not its GenAI view).
        links = re.findall(rf"{re.escape(uri)}/#/experiments/(\w+)/runs/(\w+)\?workflowType=machine_learning", out.stdout)
        assert links == [(parent.info.experiment_id, parent.info.run_id)], out.stdout[-2000:]
        experiment = client.get_experiment(links[-1][0])
        assert experiment.name == "tbptt-exp" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        assert "env_set" not in out.stdout + out.stderr and "job 2/2: k=10" in out.stdout
        assert urllib.request.urlopen(uri, timeout=10).status == 200

        # The server in $MLFLOW_TRACKING_URI with a password: MLflow's own "View run ... at:"
        # lines (one per job) and the harness's show the URL without it.
        env = os.environ | {"MLFLOW_TRACKING_URI": f"http://alice:S3cretPw@127.0.0.1:{port}"}
        again = subprocess.run([sys.executable, "-m", "tbptt_exp", "-m", "k=5,10", *[a for a in TINY if not a.startswith("k=")],
                                "trainer.epochs=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "View run" in again.stdout + again.stderr and "S3cretPw" not in again.stdout + again.stderr
        assert len(runs(uri)) == len(all_runs) + 3  # a parent and its two jobs
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_plain_install_finds_its_configs_and_sweep_presets_from_any_directory(tmp_path):
    """``pip install .`` (not editable) carries conf/ and sweeps/ inside the package."""
    repo = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(repo)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import tbptt_exp.paths as p; print(p.conf_dir(), p.sweeps_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.split() == [str(site / "tbptt_exp" / "conf"), str(site / "tbptt_exp" / "sweeps")]
    shown = subprocess.run([sys.executable, "-m", "tbptt_exp", "sweep=tune", "--cfg", "hydra"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "OptunaSweeper" in shown.stdout and "trainer.learning_rate" in shown.stdout
    bad = subprocess.run([sys.executable, "-m", "tbptt_exp", "-m", "sweep=k_batch", "k=500"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "k=500 is not allowed" in bad.stderr


@pytest.mark.parametrize("args, sweeper", [([], "TrackedSweeper"), (["sweep=max_batch"], "TrackedSweeper"),
                                           (["sweep=tune"], "OptunaSweeper")])
def test_sweeps_run_on_tbptt_exps_sweepers(tmp_path, args, sweeper):
    """Grids get the tracked grid sweeper (Hydra's name ``basic``), Optuna presets their own."""
    out = cli([*args, "--cfg", "hydra"], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"_target_: hydra_plugins.tbptt_exp_plugins.{sweeper.lower().replace('sweeper', '_sweeper')}.{sweeper}" \
        in out.stdout


def test_a_grid_sweep_starts_its_sweeper_in_a_fresh_process(tmp_path):
    """The sweeper as a user's process builds it (Hydra's plugin scan included), tracking off."""
    out = cli(["-m", "k=5,10", "data=key_recall", "data.num_sequences=24", "data.sequence_length=10",
               "batch_size=8", "model.units=8", "model.embedding_dim=4", "trainer.epochs=1", "tracking=none"],
              cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| k=")]
    assert [row.split()[1] for row in rows] == ["k=5", "k=10"] and all("| FINISHED |" in r for r in rows)


@pytest.mark.slow
def test_kill_9_of_a_sweep_then_any_start_leaves_no_running_run(tmp_path, store):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tbptt_exp", "-m", "k=5,10", *[a for a in TINY if not a.startswith(("k=", "trainer."))],
         "trainer.epochs=500", f"tracking.uri={store}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    try:
        for line in proc.stdout:
            if "epoch 1/500" in line:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert sorted(r.info.status for r in runs(store)) == ["RUNNING", "RUNNING"]  # the parent and the first job
    out = cli([*TINY, "trainer.epochs=1", f"tracking.uri={store}"], cwd=tmp_path)  # any start against the store
    assert out.returncode == 0, out.stderr[-2000:]
    statuses = {r.data.tags.get("tbptt_exp.kind"): r.info.status for r in runs(store) if r.info.status != "FINISHED"}
    assert statuses == {"sweep": "KILLED", "experiment": "KILLED"}
    for run in runs(store):
        if run.info.status == "KILLED":
            assert f"pid {proc.pid} on" in run.data.tags["fail_reason"]
