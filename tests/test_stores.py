"""The tracking store and a study's storage: a store that cannot work is one line before
TensorFlow loads, stores are made whole or not at all, and a store that fails mid-run costs
no figure."""

import base64
import contextlib
import http.server
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from test_cli import TINY, cli
from test_optuna_cli import postgres_url, start_mlflow_server

from tbptt_exp.app.settings import TrackingConfig
from tbptt_exp.app.tracking.run import Tracker
from tbptt_exp.core.config import ConfigError


def truncated_sqlite(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x TEXT)")
    db.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 2000)
    db.commit()
    db.close()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("make_args, setting, says", [
    (lambda p: ["tracking.uri=garbage://x"], "tracking.uri=", "use sqlite:////path/mlflow.db"),
    (lambda p: ["tracking.uri=http://127.0.0.1:9"], "tracking.uri=", "no MLflow server answers"),
    (lambda p: [f"tracking.uri=sqlite:///{p / 'a-file' / 'mlflow.db'}"], "tracking.uri=", "cannot be written"),
    (lambda p: [f"tracking.uri=sqlite:///{p / 'broken.db'}"], "tracking.uri=", "not a usable SQLite database"),
    (lambda p: ["-m", "hydra/sweeper=optuna", "hydra.sweeper.storage=postgresql+psycopg://root:pw@127.0.0.1:1/x",
                f"tracking.uri=sqlite:///{p / 'mlflow.db'}"], "hydra.sweeper.storage=", "does not answer"),
    (lambda p: ["-m", "hydra/sweeper=optuna", "hydra.sweeper.storage=redis://127.0.0.1/0",
                f"tracking.uri=sqlite:///{p / 'mlflow.db'}"], "hydra.sweeper.storage=", "postgresql"),
])
def test_a_store_that_cannot_work_is_one_line_before_tensorflow_loads(tmp_path, make_args, setting, says):
    (tmp_path / "a-file").write_text("not a folder")
    truncated_sqlite(tmp_path / "broken.db")
    started = time.monotonic()
    out = cli([*make_args(tmp_path), "trainer.epochs=1"], premade_store=False, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"tbptt-exp: error: {setting}") and says in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "pw@" not in out.stderr
    assert time.monotonic() - started < 60  # a short timeout, not MLflow's minutes of retries
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "outputs").exists()


def test_a_store_url_names_its_sqlite_file_one_way_everywhere(tmp_path):
    """One reading of ``sqlite:///PATH`` for every store check, lock and artifact folder:
    one database reached by two spellings of its path is still one database."""
    from tbptt_exp.app.tracking.run import artifact_location
    from tbptt_exp.app.tracking.stores import same_database, sqlite_path

    assert sqlite_path(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"
    assert sqlite_path("postgresql+psycopg://host/db") is None and sqlite_path("sqlite://a.db") is None
    assert same_database(f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/x/../a.db")
    assert not same_database(f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db")
    assert not same_database(f"sqlite:///{tmp_path}/a.db", "sqlite://a.db")  # not a file URL: no file to compare
    assert artifact_location(f"sqlite:///{tmp_path}/a.db") == (tmp_path / "artifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None


@pytest.mark.parametrize("case", ["one file for both", "a study storage as tracking.uri",
                                  "a tracking store as the study storage"])
def test_mlflow_and_optuna_never_share_a_database_and_the_store_still_works(tmp_path, case):
    """Their schemas collide (MLflow's migrations stop at Optuna's alembic revision): refused
    in one line before either writes, and the store that was there is left as it was."""
    import optuna
    from mlflow import MlflowClient

    study_db, tracking_db, fresh = tmp_path / "study.db", tmp_path / "tracking.db", tmp_path / "fresh.db"
    optuna.create_study(storage=f"sqlite:///{study_db}", study_name="kept")
    MlflowClient(f"sqlite:///{tracking_db}").create_experiment("kept")
    study = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1"]
    args, setting = {
        "one file for both": ([*study, f"hydra.sweeper.storage=sqlite:///{fresh}", f"tracking.uri=sqlite:///{fresh}"],
                              "hydra.sweeper.storage="),
        "a study storage as tracking.uri": ([f"tracking.uri=sqlite:///{study_db}"], "tracking.uri="),
        "a tracking store as the study storage": ([*study, f"hydra.sweeper.storage=sqlite:///{tracking_db}",
                                                   f"tracking.uri=sqlite:///{tmp_path / 'other.db'}"],
                                                  "hydra.sweeper.storage="),
    }[case]
    out = cli([*args, "trainer.epochs=1"], premade_store=False, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith(f"tbptt-exp: error: {setting}"), out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and "own" in out.stderr
    assert not fresh.exists()
    assert optuna.load_study(storage=f"sqlite:///{study_db}", study_name="kept").trials == []
    assert MlflowClient(f"sqlite:///{tracking_db}").get_experiment_by_name("kept") is not None


def test_a_locked_sqlite_store_is_told_apart_from_a_damaged_one_and_names_its_holder(tmp_path):
    from tbptt_exp.app.tracking.stores import check_tracking_uri

    path = tmp_path / "mlflow.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.execute("BEGIN EXCLUSIVE")  # a write in progress, held by this process
    try:
        with pytest.raises(ConfigError) as refused:
            check_tracking_uri(f"sqlite:///{path}")
    finally:
        db.rollback()
        db.close()
    assert f"is locked by process {os.getpid()} (" in str(refused.value) and "retry" in str(refused.value)
    assert "not a usable" not in str(refused.value)
    check_tracking_uri(f"sqlite:///{path}")  # released: the same file is fine


@contextlib.contextmanager
def web_server(handler):
    """A plain web server on a free port, in a thread: ``http://127.0.0.1:PORT``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class LoginRequired(Quiet):
    """Answers MLflow's JSON only to ``admin:right`` (as ``mlflow server --app-name basic-auth``)."""

    def do_GET(self):
        if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"admin:right").decode():
            self.send_response(401)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"experiments": []}')


def test_a_web_server_that_is_not_mlflow_is_one_line_before_tensorflow_loads(tmp_path):
    """``python -m http.server`` answers /health with its file listing; the MLflow API call does not pass."""
    with web_server(Quiet) as url:
        out = cli([f"tracking.uri={url}", "trainer.epochs=1"], premade_store=False, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"tbptt-exp: error: tracking.uri='{url}' is not allowed: not an MLflow tracking "
                                 "server: GET /api/2.0/mlflow/experiments/search answered HTTP 404")
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("user, password, says", [
    (None, None, "it needs a login (HTTP 401)"),
    ("admin", "wrong", "the credentials given were refused (HTTP 401)"),
    ("admin", "right", None),
])
def test_a_tracking_server_is_checked_with_the_credentials_the_client_will_send(monkeypatch, user, password, says):
    from tbptt_exp.app.tracking.stores import check_tracking_uri

    for variable, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        monkeypatch.delenv(variable, raising=False)
        if value:
            monkeypatch.setenv(variable, value)
    with web_server(LoginRequired) as url:
        if says is None:
            check_tracking_uri(url)
            return
        with pytest.raises(ConfigError) as refused:
            check_tracking_uri(url)
    assert says in str(refused.value) and "MLFLOW_TRACKING_PASSWORD" in str(refused.value)
    assert "wrong" not in str(refused.value)


@pytest.mark.slow
def test_wrong_credentials_for_a_real_login_server_are_one_line_and_right_ones_train(tmp_path):
    """``mlflow server --app-name basic-auth`` answers /health to anyone; the start-up check
    makes an API call with the credentials, so wrong ones stop before TensorFlow loads."""
    (tmp_path / "server").mkdir()
    admin = "Adm1n-s3cret"
    server_env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": admin, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key"}
    server, port = start_mlflow_server(tmp_path, "--app-name", "basic-auth", env=server_env)
    store = [*TINY[:-1], "trainer.epochs=1"]
    try:
        wrong = cli([f"tracking.uri=http://admin:Wr0ng-guess@127.0.0.1:{port}", *store], premade_store=False, cwd=tmp_path, timeout=120)
        right = cli([f"tracking.uri=http://admin:{admin}@127.0.0.1:{port}", *store], premade_store=False, cwd=tmp_path, timeout=300)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr[-2000:]
    assert "the credentials given were refused (HTTP 401)" in wrong.stderr and "Wr0ng" not in wrong.stderr
    assert right.returncode == 0, right.stderr[-3000:]
    assert admin not in right.stdout + right.stderr and "open the run in MLflow" in right.stdout


@pytest.mark.slow  # a whole command under a resource limit: 20-45 s here
def test_a_disk_that_fills_while_the_store_is_made_leaves_nothing_half_made(tmp_path):
    """The new SQLite store is built aside and moved into place: a write that fails (here a
    file-size limit, as a full disk) leaves no file, and the next run makes the store whole."""
    import resource

    from mlflow import MlflowClient

    from tbptt_exp.app.tracking.stores import create_store

    store = tmp_path / "mlflow.db"
    out = cli([f"tracking.uri=sqlite:///{store}", "trainer.epochs=1"], premade_store=False, cwd=tmp_path, timeout=120,
              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)))
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"tbptt-exp: error: tracking.uri='sqlite:///{store}' is not allowed: the new store "
                                 "could not be created (disk I/O error); nothing was left behind")
    assert len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db.lock"]
    create_store(f"sqlite:///{store}", "tracking.uri", "mlflow")  # space again: made whole
    assert MlflowClient(f"sqlite:///{store}").create_experiment("works")


FIRST_START = """
import sys, time
url, storage, at = sys.argv[1], sys.argv[2], float(sys.argv[3])
import optuna
from tbptt_exp.app.tracking.stores import create_store
from tbptt_exp.app.tracking.run import Tracker
from tbptt_exp.app.settings import TrackingConfig
time.sleep(max(at - time.time(), 0))  # all at once, imports done
create_store(storage, "hydra.sweeper.storage", "optuna")
create_store(url, "tracking.uri", "mlflow")
optuna.create_study(study_name="first", storage=storage, load_if_exists=True)
Tracker(TrackingConfig(uri=url, experiment="first"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_starting_together_on_new_stores_all_succeed(tmp_path, backend):
    """Without one creator at a time the second worker dies in the first one's schema
    creation (``UNIQUE constraint failed: alembic_version``, ``pg_type_typname_nsp_index``)."""
    import uuid

    if backend == "sqlite":
        url, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    else:
        postgres_url()  # skips where PostgreSQL is absent, unless CI requires it
        import psycopg

        names = [f"first_{uuid.uuid4().hex[:8]}" for _ in range(2)]
        with psycopg.connect("postgresql://root@127.0.0.1:5432/test", autocommit=True) as conn:
            for name in names:
                conn.execute(f"CREATE DATABASE {name}")
        url, storage = (f"postgresql+psycopg://root@127.0.0.1:5432/{name}" for name in names)
    try:
        at = time.time() + 12
        workers = [subprocess.Popen([sys.executable, "-c", FIRST_START, url, storage, str(at)], cwd=tmp_path,
                                    stderr=subprocess.PIPE, text=True) for _ in range(3)]
        errors = [worker.communicate(timeout=120)[1] for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0, 0], [e[-1500:] for e in errors]
        assert len(optuna.get_all_study_summaries(storage)) == 1
        from mlflow import MlflowClient

        client = MlflowClient(url)
        assert len(client.search_experiments(filter_string="name = 'first'")) == 1
    finally:
        if backend == "postgresql":
            with psycopg.connect("postgresql://root@127.0.0.1:5432/test", autocommit=True) as conn:
                for name in names:
                    conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.skipif(os.geteuid() != 0, reason="changes to another user to see a read-only file as one does")
def test_a_read_only_store_is_one_line():
    """A user who cannot write mlflow.db learns so before anything starts (root writes any file,
    so the check runs as user nobody)."""
    import tempfile

    from tbptt_exp.app.tracking.stores import check_tracking_uri

    shared = Path(tempfile.mkdtemp(prefix="tbptt-read-only-"))
    shared.chmod(0o777)
    store = shared / "mlflow.db"
    sqlite3.connect(store).execute("CREATE TABLE t (x)").connection.close()
    store.chmod(0o444)
    try:
        os.seteuid(65534)
        with pytest.raises(ConfigError) as refused:
            check_tracking_uri(f"sqlite:///{store}")
        os.seteuid(0)
        store.chmod(0o666)
        os.seteuid(65534)
        check_tracking_uri(f"sqlite:///{store}")
    finally:
        os.seteuid(0)
        shutil.rmtree(shared)
    assert f"mlflow.db is read-only for this user; make it writable (chmod u+w {store})" in str(refused.value)


def test_a_store_that_fails_mid_run_keeps_every_figure_in_the_job_folder(tmp_path):
    """The disk fills while a run logs (a file-size limit on this process, lifted as the error
    leaves the run's block): every figure is in the job folder before the error surfaces,
    the line says where, and the run is closed once the store takes writes again."""
    import json
    import resource

    from mlflow import MlflowClient

    from tbptt_exp.app.tracking.run import StoreFailed

    db = tmp_path / "mlflow.db"
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{db}", experiment="full-disk"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with pytest.raises(StoreFailed) as failed, tracker.run(name="filling", figures_dir=tmp_path / "job") as run:
        run.log_metrics({"loss/train": 2.5}, step=0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (db.stat().st_size, hard))
        try:
            for step in range(1, 2000):
                run.log_metrics({f"figure/{i}": step + i / 100 for i in range(25)}, step=step)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    kept = json.loads((tmp_path / "job" / "figures.json").read_text())
    message = str(failed.value)
    assert message.startswith("the tracking store failed (") and "disk I/O error" in message
    assert message.endswith(f"the {len(kept['metrics'])} figures measured so far are in {tmp_path / 'job' / 'figures.json'}")
    last = max(m["step"] for m in kept["metrics"])
    assert last > 1 and len(kept["metrics"]) == 1 + 25 * last  # the batch that failed is kept too
    client = MlflowClient(f"sqlite:///{db}")
    ended = client.get_run(kept["run_id"])
    assert ended.info.status == "FAILED" and "disk I/O error" in ended.data.tags["fail_reason"]
    stored = {(m.step, m.value) for m in client.get_metric_history(kept["run_id"], "figure/3")}
    assert stored < {(m["step"], m["value"]) for m in kept["metrics"] if m["name"] == "figure/3"}


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_run_costs_no_figure(tmp_path):
    """The server is killed after the first epoch: the run stops in one line that names the
    file in its job folder, which holds the epochs measured so far."""
    import json

    (tmp_path / "server").mkdir()
    server, port = start_mlflow_server(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    job = subprocess.Popen(
        [sys.executable, "-m", "tbptt_exp", f"tracking.uri=http://127.0.0.1:{port}", *TINY[:-1], "trainer.epochs=200",
         f"hydra.run.dir={tmp_path / 'job'}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in job.stdout:
            if "epoch 2/200" in line:
                break
        os.killpg(server.pid, signal.SIGKILL)
        out, err = job.communicate(timeout=180)
    finally:
        job.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    kept = tmp_path / "job" / "figures.json"
    assert job.returncode == 1, err[-3000:]
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]] and "Traceback" not in err, err[-3000:]
    assert err.startswith("tbptt-exp: error: the tracking store failed (") and err.strip().endswith(f"are in {kept}")
    epochs = {m["step"] for m in json.loads(kept.read_text())["metrics"] if m["name"] == "loss/train"}
    assert {1, 2} <= epochs and "epoch 200/200" not in out


@pytest.mark.slow
def test_a_store_locked_longer_than_sqlites_own_timeout_is_waited_out(tmp_path):
    """Another connection holds the database 24 s (SQLite's busy timeout in MLflow is 20 s): the
    write waits, then lands once; the run goes on and ends FINISHED with every figure."""
    from mlflow import MlflowClient

    url = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(uri=url, experiment="locked"))
    holder = sqlite3.connect(tmp_path / "mlflow.db", check_same_thread=False, isolation_level=None)
    with tracker.run(name="waits") as run:
        run.log_metrics({"loss/train": 1.0}, step=1)
        holder.execute("BEGIN EXCLUSIVE")
        release = threading.Timer(24, holder.execute, ["ROLLBACK"])
        release.start()
        started = time.monotonic()
        run.log_metrics({"loss/train": 0.5}, step=2)
        waited = time.monotonic() - started
    release.join()
    holder.close()
    client = MlflowClient(url)
    assert 23 < waited < 50
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss/train")] == [(1, 1.0), (2, 0.5)]
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_a_disk_full_at_the_first_write_is_one_line_that_says_nothing_was_measured(tmp_path):
    import resource

    from tbptt_exp.app.tracking.run import StoreFailed

    db = tmp_path / "mlflow.db"
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{db}", experiment="full-at-once"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (db.stat().st_size, hard))
    try:
        with pytest.raises(StoreFailed) as failed:
            for step in range(2000):  # the run starts in pages the store has free; its logging soon needs more
                with tracker.run(name=f"run {step}", params={f"p{i}": "x" * 200 for i in range(50)}):
                    pass
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(failed.value).startswith("the tracking store failed (") and "disk I/O error" in str(failed.value)
    assert str(failed.value).endswith("; nothing had been measured yet") and not list(tmp_path.glob("**/figures.json"))
