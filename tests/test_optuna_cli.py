"""End to end: Optuna studies through the CLI, in subprocesses, on SQLite and PostgreSQL."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

TINY = [
    "data=key_recall", "data.num_sequences=64", "data.sequence_length=20", "k=10", "batch_size=8",
    "model.units=16", "model.embedding_dim=8", "trainer.epochs=3",
]
PG_URL = "postgresql+psycopg://root:{password}@127.0.0.1:5432/test"


def env():
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def cli(args, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "tbptt_exp", "-m", *args], cwd=cwd, env=env(),
        capture_output=True, text=True, timeout=timeout,
    )


def study_args(tmp_path, name, storage=None, *more):
    storage = storage or f"sqlite:///{tmp_path / 'optuna.db'}"
    return [
        "hydra/sweeper=optuna", f"hydra.sweeper.study_name={name}", f"hydra.sweeper.storage={storage}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *TINY, *more,
    ]


def load(name, storage):
    return optuna.load_study(study_name=name, storage=storage)


def mlflow_runs(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tbptt-exp")
    return client, client.search_runs([experiment.experiment_id])


def test_tpe_study_with_pruning_prunes_a_trial_and_tracks_every_trial(tmp_path):
    out = cli(study_args(
        tmp_path, "prune", None,
        "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler=tpe", "hydra.sweeper.seed=6",
        "hydra.sweeper.pruner=median", "hydra.sweeper.pruner_startup_trials=1",
        "hydra.sweeper.pruner_warmup_epochs=0", "trainer.epochs=4",
        "trainer.learning_rate=choice(0.03, 0.00001)",
    ), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    study = load("prune", f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == 4 and TrialState.PRUNED in states and TrialState.COMPLETE in states
    for t in study.trials:
        assert t.intermediate_values  # the job reported to its trial through the storage

    client, runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("tbptt_exp.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == list(range(4))
    assert {r.data.tags["optuna.state"] for r in children} == {"COMPLETE", "PRUNED"}
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.md", "optimization_history.png"} <= artifacts
    assert "best_value" in parent.data.metrics and "best.trial" in parent.data.tags

    # The answer at a glance: the parent's description, each trial's run and cost on the trial.
    best = study.best_trial
    assert parent.data.tags["mlflow.note.content"].startswith(f"**Best: trial {best.number}, value ")
    assert parent.data.metrics["best/tokens_per_s"] == best.user_attrs["tokens_per_s"]
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    for t in study.trials:
        assert t.user_attrs["mlflow_run_id"] == by_trial[t.number].info.run_id
        assert t.user_attrs["tokens_per_s"] > 0 and t.user_attrs["epochs_run"] == len(t.intermediate_values)
        pruned = t.state == TrialState.PRUNED
        assert by_trial[t.number].info.run_name.endswith("(pruned)") == pruned
        assert by_trial[t.number].data.tags["mlflow.note.content"].startswith("**Pruned after epoch") == pruned
    table = Path(client.download_artifacts(parent.info.run_id, "trials.md", str(tmp_path))).read_text()
    assert "real tokens/s" in table and by_trial[0].info.run_id in table
    assert "param_importances.txt" in artifacts  # 4 trials: too few for importances to mean anything
    # A console a person reads: a line per trial, one link, no launcher internals.
    assert "trial 0: trainer.learning_rate=" in out.stdout and "Launching" not in out.stdout + out.stderr
    assert out.stdout.count("in MLflow: http") == 1 and "open the run" not in out.stdout


def test_memory_budget_makes_large_batches_infeasible(tmp_path):
    out = cli(study_args(
        tmp_path, "budget", None,
        "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler=grid",
        "batch_size=choice(32, 128)",
        "data.num_sequences=320", "data.sequence_length=50", "data.num_noise_tokens=200", "k=25",
        "model.units=128", "model.embedding_dim=32", "trainer.epochs=1", "device.memory_budget_mb=30",
    ), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    study = load("budget", f"sqlite:///{tmp_path / 'optuna.db'}")
    by_batch = {t.params["batch_size"]: t for t in study.trials}
    assert by_batch[32].constraints["peak_memory_over_budget_mb"] <= 0
    assert by_batch[128].constraints["peak_memory_over_budget_mb"] > 0
    assert study.best_trial.params["batch_size"] == 32  # the infeasible trial cannot be best


def test_failing_trials_are_recorded_with_their_reason_until_the_failure_rate_stops_the_study(tmp_path):
    out = cli(study_args(
        tmp_path, "failing", None, "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler=random",
        "hydra.sweeper.max_failure_rate=0.5", "model.activation=relu",
        "trainer.learning_rate=interval(1e29, 1e30)",  # every trial diverges
    ), cwd=tmp_path)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tbptt-exp: error: stopping study 'failing': 2 of 2 trials failed") and "Traceback" not in out.stderr
    study = load("failing", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    for t in study.trials:
        assert t.user_attrs["fail_reason"].startswith("Diverged: training diverged: the training loss became")
    _, runs = mlflow_runs(tmp_path)
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_killed_study_rerun_at_once_reaches_exactly_n_trials_without_repeats(tmp_path, how):
    """No grace period: the dead worker's trial lock is gone, so its trial fails at once;
    the resumed sampler gets a seed of its own, so no point is proposed twice."""
    args = study_args(
        tmp_path, "resume", None, "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=0", "trainer.learning_rate=interval(0.001, 0.01)", "trainer.epochs=6",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tbptt_exp", "-m", *args], cwd=tmp_path, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    finished = 0
    for line in proc.stdout:
        finished += "done in" in line
        if finished == 1 and "epoch 2/6" in line:  # well into the second trial
            proc.send_signal(how)
            break
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == (-9 if how == signal.SIGKILL else 143), rest
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    left = TrialState.RUNNING if how == signal.SIGKILL else TrialState.FAIL  # SIGTERM fails its trial itself
    assert [t.state for t in load("resume", storage).trials] == [TrialState.COMPLETE, left]

    out = cli(args, cwd=tmp_path)  # at once: no heartbeat grace to wait out
    assert out.returncode == 0, out.stderr[-3000:]
    trials = load("resume", storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["fail_reason"]
    rates = [t.params["trainer.learning_rate"] for t in trials]
    assert len(set(rates)) == 4, rates  # the resumed start does not replay the first start's points
    again = cli(args, cwd=tmp_path)  # at the target already: nothing more runs
    assert again.returncode == 0 and len(load("resume", storage).trials) == 4
    _, runs = mlflow_runs(tmp_path)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4 + ["KILLED"]  # parent + 3, killed one
    (killed,) = [r for r in runs if r.info.status == "KILLED"]
    assert killed.data.tags["optuna.trial"] == "1" and killed.data.tags["optuna.state"] == "FAIL"


def postgres_available():
    try:
        import psycopg

        psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=root", connect_timeout=3).close()
        return True
    except Exception:
        return False


def postgres_url():
    """The shared PostgreSQL database; skips the test where there is none, unless CI requires it."""
    if not postgres_available() and not os.environ.get("TBPTT_EXP_REQUIRE_POSTGRES"):
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (database test, user root)")
    return "postgresql+psycopg://root@127.0.0.1:5432/test"


needs_postgres = pytest.mark.skipif(
    not postgres_available() and not os.environ.get("TBPTT_EXP_REQUIRE_POSTGRES"),
    reason="PostgreSQL is not reachable on 127.0.0.1:5432 (database test, user root)",
)


@needs_postgres
def test_concurrent_workers_on_postgresql_share_one_study_exactly(tmp_path):
    name = f"workers-{uuid.uuid4().hex[:8]}"
    secret = "s3cr3t-pw"
    args = study_args(
        tmp_path, name, PG_URL.format(password=secret), "hydra.sweeper.n_trials=5",
        "hydra.sweeper.sampler=random", "batch_size=choice(4, 8)",
        "trainer.epochs=1",
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tbptt_exp", "-m", *args], cwd=tmp_path, env=env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for _ in range(3)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], logs
    study = load(name, PG_URL.format(password=secret))
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)

    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("tbptt_exp.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [0, 1, 2, 3, 4]

    # The password never reaches logs, params, tags or artifacts.
    assert all(secret not in log for log in logs)
    for run in runs:
        assert secret not in repr(run.data.params) + repr(run.data.tags)
        for artifact in client.list_artifacts(run.info.run_id):
            if not artifact.is_dir and artifact.path.endswith((".yaml", ".json", ".md", ".txt")):
                path = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))
                assert secret not in Path(path).read_text()


def test_joblib_launched_trials_find_their_trial_through_the_storage(tmp_path):
    out = cli(study_args(
        tmp_path, "joblib", None, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler=random",
        "batch_size=choice(4, 8)", "trainer.epochs=2",
    ), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    study = load("joblib", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:
        assert sorted(t.intermediate_values) == [1, 2]  # reported from the worker processes
    _, runs = mlflow_runs(tmp_path)
    assert sum(1 for r in runs if r.data.tags.get("optuna.trial") is not None) == 2


def test_two_objectives_give_a_pareto_front(tmp_path):
    out = cli(study_args(
        tmp_path, "pareto", None, "objective='val_loss,tokens_per_s'",
        "hydra.sweeper.direction=[minimize,maximize]", "hydra.sweeper.sampler=nsgaii",
        "hydra.sweeper.n_trials=3", "batch_size=choice(4, 16)", "trainer.epochs=1",
    ), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Pareto front:" in out.stdout
    study = load("pareto", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.directions) == 2 and all(len(t.values) == 2 for t in study.trials)
    client, runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("tbptt_exp.kind") == "study"]
    assert {"pareto_front.md", "pareto_front.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def start_mlflow_server(tmp_path, *options, env=None):
    """A real ``mlflow server`` on a free port, with its own SQLite store and artifact root."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "server" / "artifacts"), *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=tmp_path / "server", env=env,
    )
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server, port
        except OSError:
            assert time.time() < deadline, "mlflow server did not start"
            time.sleep(1)


@needs_postgres
def test_passwords_in_urls_reach_no_file_store_or_stream(tmp_path):
    """Passwords in the tracking URI (Hydra-escaped) and the study storage move to the
    environment: none is in the outputs, Hydra's files, the server's store or the streams."""
    (tmp_path / "server").mkdir()
    server, port = start_mlflow_server(tmp_path)
    tracking_secret, storage_secret = "TrackPw-91x", "StorePw-47q"
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tbptt_exp", "-m", "hydra/sweeper=optuna",
             f"hydra.sweeper.study_name=secrets-{uuid.uuid4().hex[:8]}",
             f"hydra.sweeper.storage={PG_URL.format(password=storage_secret)}",
             f"tracking.uri=http\\://alice\\:{tracking_secret}@127.0.0.1\\:{port}",
             f"hydra.sweep.dir={tmp_path / 'multirun'}", "hydra.sweeper.n_trials=2",
             "hydra.sweeper.sampler=random", "batch_size=choice(4, 8)", *TINY[:-1], "trainer.epochs=1"],
            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        grid = subprocess.run(  # a grid sweep writes multirun.yaml and a results table too
            [sys.executable, "-m", "tbptt_exp", "-m", "k=5,10", f"hydra.sweep.dir={tmp_path / 'grid'}",
             f"tracking.uri=http://alice:{tracking_secret}@127.0.0.1:{port}",
             *[a for a in TINY if not a.startswith(("k=", "trainer.epochs"))], "trainer.epochs=1"],
            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600,
        )
        assert grid.returncode == 0, grid.stderr[-3000:]
        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name("tbptt-exp").experiment_id])
        assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    streams = out.stdout + out.stderr + grid.stdout + grid.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "multirun.yaml" for p in files) and any(p.name == "hydra.yaml" for p in files)
    assert any("artifacts" in p.parts for p in files)  # the server stored the runs' artifacts
    for secret in (tracking_secret, storage_secret):
        assert secret not in streams
        leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert leaks == []


@needs_postgres
def test_a_password_written_in_a_config_file_reaches_no_file_or_stream(tmp_path):
    """A store URL with a password in a user's config file (``-cd DIR tracking=team``): the
    password moves to PGPASSWORD before Hydra writes a file, in a single run and in every job
    of a sweep, and the runs still land in the store."""
    import psycopg

    secret = "FilePw-83k"
    database = f"tbptt_mlflow_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=root", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    (tmp_path / "team" / "tracking").mkdir(parents=True)
    (tmp_path / "team" / "tracking" / "team.yaml").write_text(
        f"uri: postgresql+psycopg://root:{secret}@127.0.0.1:5432/{database}\n")
    base = ["-cd", str(tmp_path / "team"), "tracking=team", *[a for a in TINY if not a.startswith(("k=", "trainer."))],
            "trainer.epochs=1"]
    try:
        single = subprocess.run([sys.executable, "-m", "tbptt_exp", *base, "k=5"], cwd=tmp_path, env=env(),
                                capture_output=True, text=True, timeout=600)
        assert single.returncode == 0, single.stderr[-3000:]
        sweep = subprocess.run([sys.executable, "-m", "tbptt_exp", "-m", *base, "k=5,10"], cwd=tmp_path, env=env(),
                               capture_output=True, text=True, timeout=600)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        from mlflow import MlflowClient

        client = MlflowClient(f"postgresql+psycopg://root@127.0.0.1:5432/{database}")
        runs = client.search_runs([client.get_experiment_by_name("tbptt-exp").experiment_id])
        assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}  # a run, a parent and two jobs
        for run in runs:
            assert secret not in repr(run.data.params) + repr(run.data.tags)
    finally:
        with psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=root", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".md", ".log")
               and "team" not in p.parts]
    assert any(p.name == "config.yaml" and ".hydra" in p.parts for p in written)
    assert any(p.name == "multirun.yaml" for p in written)
    assert [str(p) for p in written if secret.encode() in p.read_bytes()] == []
    assert secret not in single.stdout + single.stderr + sweep.stdout + sweep.stderr
