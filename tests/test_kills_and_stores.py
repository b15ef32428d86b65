"""Nothing lost, nothing leaked: runs and trials of dead processes are closed at once,
resumed samplers do not replay, bad stores fail in one line, passwords leave the URLs."""

import base64
import contextlib
import http.server
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_cli import TINY, cli, runs
from test_optuna_cli import postgres_available, start_mlflow_server

from tbptt_exp.app import signals
from tbptt_exp.app.study.study import sampler_seed
from tbptt_exp.app.study.trials import TrialLocks, fail_orphaned_trials, study_lock
from tbptt_exp.app.tracking.liveness import STALE_AFTER_S, Holder, dead_reason, this_process
from tbptt_exp.app.tracking.run import Tracker
from tbptt_exp.app.tracking.stores import mask_credentials, take_secrets
from tbptt_exp.core.config import ConfigError, TrackingConfig


def dead_holder() -> Holder:
    """A holder naming a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    me = this_process()
    start = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    child.wait()
    return Holder(me.host, me.boot, child.pid, start)


def test_a_run_is_alive_while_any_holder_lives():
    now = time.time()
    me, dead = this_process(), dead_holder()
    assert dead_reason({me.key: str(now)}) is None
    assert f"pid {dead.pid}" in dead_reason({dead.key: str(now)})
    assert dead_reason({dead.key: str(now), me.key: str(now)}) is None  # a study parent another worker holds
    assert dead_reason({"mlflow.runName": "x"}) is None  # not opened by tbptt-exp: left alone
    # A reused pid is another process: same pid, other start time.
    assert dead_reason({Holder(me.host, me.boot, me.pid, "1").key: str(now)}) is not None
    remote = Holder("another-host", "b00t", 4242, "99")
    assert dead_reason({remote.key: str(now - 10)}) is None  # its heartbeat is fresh
    assert dead_reason({remote.key: str(now - STALE_AFTER_S - 1)}) is not None


def test_kill_9_leaves_a_running_run_that_the_next_start_closes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = textwrap.dedent(f"""
        import os, signal
        from tbptt_exp.app.tracking.run import Tracker
        from tbptt_exp.core.config import TrackingConfig
        with Tracker(TrackingConfig(uri={uri!r})).run("doomed") as run:
            print(run.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    tracker = Tracker(TrackingConfig(uri=uri))
    with tracker.run("alive") as alive:  # held by this live process: must stay open
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == -signal.SIGKILL
        run_id = out.stdout.split()[0]
        assert tracker.client.get_run(run_id).info.status == "RUNNING"  # what kill -9 leaves
        cleanup = cli(["task=cleanup", f"tracking.uri={uri}"], cwd=tmp_path, timeout=120)
        assert cleanup.returncode == 0, cleanup.stderr[-2000:]
        assert f"run {run_id}: KILLED" in cleanup.stdout and "1 run(s) of dead processes closed" in cleanup.stdout
        assert tracker.client.get_run(alive.run_id).info.status == "RUNNING"
    dead = tracker.client.get_run(run_id)
    assert dead.info.status == "KILLED" and "ended without closing the run" in dead.data.tags["fail_reason"]
    assert tracker.client.get_run(alive.run_id).info.status == "FINISHED"


def trial_lock_worker(storage_url: str, study: str) -> subprocess.Popen:
    """A worker that asks for a trial, holds its lock and waits to be killed."""
    script = textwrap.dedent(f"""
        import sys, time, optuna
        from tbptt_exp.app.study.trials import TrialLocks, make_storage, study_lock
        storage = make_storage({storage_url!r})
        study = optuna.load_study(study_name={study!r}, storage=storage)
        locks = TrialLocks(storage, {study!r})
        with study_lock(storage, {study!r}):
            trial = study.ask()
            locks.acquire(trial.number)
        print("holding", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def postgres_url():
    if not postgres_available() and not os.environ.get("TBPTT_EXP_REQUIRE_POSTGRES"):
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (database test, user root)")
    return "postgresql+psycopg://root@127.0.0.1:5432/test"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_trial_is_orphaned_exactly_when_its_worker_dies(tmp_path, backend):
    import uuid

    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else postgres_url()
    name = f"locks-{uuid.uuid4().hex[:8]}"
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name=name, storage=storage)
    worker = trial_lock_worker(url, name)
    locks = TrialLocks(storage, name)
    try:
        with study_lock(storage, name):
            assert fail_orphaned_trials(study, locks) == []  # its worker lives: still RUNNING
        assert [t.state for t in study.trials] == [TrialState.RUNNING]
    finally:
        worker.kill()
        worker.wait()
    with study_lock(storage, name):
        assert fail_orphaned_trials(study, locks) == [0]  # no grace period
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "its worker stopped"


def test_each_start_of_a_study_samples_with_its_own_seed():
    seeds = [sampler_seed(0, start) for start in range(20)]
    assert seeds[0] == 0 and len(set(seeds)) == 20  # one uninterrupted worker: the study's own seed
    assert sampler_seed(None, 3) is None
    assert [sampler_seed(7, s) for s in range(3)] == [sampler_seed(7, s) for s in range(3)]  # reproducible


@pytest.mark.parametrize("text, masked", [
    ("http://alice:pw@host:5000/x", "http://alice:***@host:5000/x"),
    ("tracking.uri=http\\://alice\\:pw@host\\:5000", "tracking.uri=http\\://alice:***@host\\:5000"),
    ("postgresql+psycopg://root:s3cret@db/optuna", "postgresql+psycopg://root:***@db/optuna"),
    ("http://host:5000 and sqlite:////a/b.db", "http://host:5000 and sqlite:////a/b.db"),
    # A raw @, : or / in a password: no part of it shows (the password runs to the URL's last @).
    ("postgresql+psycopg://root:Pg@Raw:pw/77zz@127.0.0.1/db", "postgresql+psycopg://root:***@127.0.0.1/db"),
    ("uri='http://a:x/y@h:1' done", "uri='http://a:***@h:1' done"),
])
def test_credentials_are_masked_in_plain_and_hydra_escaped_form(text, masked):
    assert mask_credentials(text) == masked


def test_passwords_move_from_urls_to_the_variables_their_clients_read():
    environ = {}
    cleaned = take_secrets({
        "tracking.uri": "http://alice:p%40ss@mlflow.example:5000",
        "hydra.sweeper.storage": "postgresql+psycopg://root:pg-pw@db:5432/optuna",
        "other": "sqlite:////tmp/x.db",
    }, environ)
    assert cleaned == {"tracking.uri": "http://mlflow.example:5000",
                       "hydra.sweeper.storage": "postgresql+psycopg://root@db:5432/optuna"}
    assert environ == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p@ss",
                       "PGPASSWORD": "pg-pw"}
    with pytest.raises(ConfigError, match="second, different password for PGPASSWORD"):
        take_secrets({"tracking.uri": "postgresql://a:one@db/m", "hydra.sweeper.storage": "postgresql://a:two@db/o"}, {})


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://root:Pg@Raw:pw/77zz@127.0.0.1/db", "postgresql+psycopg://root:***@127.0.0.1/db"),
    ("http://alice:a/b@host:5000", "http://alice:***@host:5000"),
    ("http://alice:a#b@host:5000", "http://alice:***@host:5000"),
    ("postgresql://root:a:b@db/x", "postgresql://root:***@db/x"),
])
def test_a_password_with_raw_special_characters_is_refused_masked_with_how_to_encode_it(url, shown):
    with pytest.raises(ConfigError) as refused:
        take_secrets({"tracking.uri": url}, {})
    assert str(refused.value).startswith(f"tracking.uri='{shown}' is not allowed: percent-encode special characters")
    assert "%40" in str(refused.value)


def test_a_password_in_the_environments_tracking_uri_moves_to_mlflows_password_variable():
    from tbptt_exp.app.preflight.passwords import take_environment_secrets

    environ = {"MLFLOW_TRACKING_URI": "http://alice:S3cret@mlflow.example:5000"}
    take_environment_secrets(environ)
    assert environ == {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000", "MLFLOW_TRACKING_USERNAME": "alice",
                       "MLFLOW_TRACKING_PASSWORD": "S3cret"}


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
    out = cli([*make_args(tmp_path), "trainer.epochs=1"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"tbptt-exp: error: {setting}") and says in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "pw@" not in out.stderr
    assert time.monotonic() - started < 60  # a short timeout, not MLflow's minutes of retries
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, setting", [
    (["seed=-1"], "seed="),
    (["seed=99999999999999999999"], "seed="),
    (["data.cut=documents", "k=1000000000", "batch_size=2"], "k="),
    (["data.cut=documents", "k=200000", "batch_size=4096"], "batch_size="),
    (["data.path=short.txt"], "data.sequence_length="),
    (["data.path=short.txt", "data.cut=documents", "k=1000"], "k="),  # one file works, but not with k past its length
    (["data=key_recall", "data.num_sequences=1"], "data.num_sequences="),
    (["data.val_fraction=0"], "data.val_fraction=0.0 is not allowed: use a fraction above 0"),
    (["+trainer.lr=0.5"], "trainer.lr=0.5 is not allowed: there is no such setting; did you mean trainer.learning_rate?"),
    (["+foo=1"], "foo=1 is not allowed: there is no such setting"),
])
def test_bounds_and_tiny_data_are_one_line_before_allocating(tmp_path, args, setting):
    (tmp_path / "short.txt").write_text("a short text. " * 21)  # about 300 characters
    out = cli([*args, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"tbptt-exp: error: {setting}")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert runs(f"sqlite:///{tmp_path / 'mlflow.db'}") == []


@pytest.mark.parametrize("args, says", [
    (["k=int(interval(5,1))"], "k='int(interval(5,1))' is not allowed: `low <= high` must hold"),
    (["trainer.learning_rate=tag(log,interval(0,0.1))"], "trainer.learning_rate='tag(log,interval(0,0.1))' is not"),
    (["k=int(interval(-5,0))"], "k=-5 is not allowed: use a positive whole number"),  # every point is invalid
    (["k=choice(10,500)"], "k=500 is not allowed: use a chunk length up to data.sequence_length=200"),
    (["hydra.sweeper.sampler=grid", "k=int(interval(5,10))"], "hydra.sweeper.sampler='grid' is not allowed: a grid"),
    (["k=range(10,1)"], "k='range(10,1)' is not allowed"),
])
def test_a_search_space_that_can_only_fail_is_one_line_before_a_trial(tmp_path, args, says):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cli(["-m", "hydra/sweeper=optuna", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", *args,
               f"tracking.uri={store}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"tbptt-exp: error: {says}")
    assert len(out.stderr.strip().splitlines()) == 1 and runs(store) == [] and not (tmp_path / "optuna.db").exists()


def test_an_empty_grid_sweep_is_one_line(tmp_path):
    out = cli(["-m", "k=range(10,1)", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("tbptt-exp: error: k='range(10,1)' is not allowed: the sweep "
                                                         "has no values"), out.stderr[-2000:]


def test_files_that_cannot_be_read_are_reported_not_dropped(tmp_path):
    from tbptt_exp.core.data import read_documents

    (tmp_path / "a.txt").write_text("plain text that reads well\n" * 3)
    (tmp_path / "b.txt").write_bytes(b"text with one bad byte \xff in the middle\n" + b"and plenty more of it\n" * 9)
    (tmp_path / "c.txt").write_bytes(b"\x00\x01\x02 a binary blob")
    documents, source = read_documents(str(tmp_path), 10_000)
    assert len(documents) == 2 and "\ufffd" in documents[1]
    assert "1 file(s) skipped: c.txt (binary)" in source and "1 file(s) with invalid UTF-8 bytes" in source
    _, capped = read_documents(str(tmp_path), 50)
    assert "first 50 characters of about" in capped  # a cap says so


@pytest.mark.parametrize("after_s", [0.5, 1.5, 3.0])
def test_sigterm_during_start_up_is_one_line_not_a_traceback(tmp_path, after_s):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tbptt_exp", "trainer.epochs=1", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    time.sleep(after_s)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (143, -signal.SIGTERM), err  # -15: before Python ran any of tbptt-exp
    assert "Traceback" not in err
    if proc.returncode == 143:
        assert err.strip().splitlines()[-1].startswith("tbptt-exp: stopped by SIGTERM")


@pytest.fixture
def interrupt_handlers(monkeypatch):
    """The CLI's SIGTERM and Ctrl-C handlers, for one test."""
    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for name, value in [("_terminated", False), ("_received", None), ("_pending", None)]:
        monkeypatch.setattr(signals, name, value)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # install() sets it; restored after
    signals.install()
    yield
    signal.signal(signal.SIGTERM, saved[0])
    signal.signal(signal.SIGINT, saved[1])


class Store:
    """A SQLite write that a signal interrupts half-way: the transaction is open when it arrives."""

    def __init__(self, path):
        self.path = path
        sqlite3.connect(path).execute("CREATE TABLE IF NOT EXISTS t (v)").connection.commit()

    def write(self, how):
        connection = sqlite3.connect(self.path, timeout=0.1, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("INSERT INTO t VALUES (1)")
        os.kill(os.getpid(), how)
        connection.execute("COMMIT")
        connection.close()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_waits_for_a_store_write_so_the_writes_that_end_the_run_go_through(
        tmp_path, interrupt_handlers, how):
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # the hazard: cut half-way, the lock stays
        try:
            Store(tmp_path / "cut.db").write(how)
        except KeyboardInterrupt:
            sqlite3.connect(tmp_path / "cut.db", timeout=0.1).execute("INSERT INTO t VALUES (2)").connection.commit()

    store = Store(tmp_path / "store.db")
    with pytest.raises(KeyboardInterrupt) as stopped:
        signals.Deferring(store).write(how)
    sqlite3.connect(tmp_path / "store.db", timeout=0.1).execute("INSERT INTO t VALUES (3)").connection.commit()
    assert [v for (v,) in sqlite3.connect(tmp_path / "store.db").execute("SELECT v FROM t")] == [1, 3]
    assert isinstance(stopped.value, signals.Terminated) == (how == signal.SIGTERM) == signals.terminated()


def test_an_interrupt_outside_a_store_write_is_raised_at_once(interrupt_handlers):
    done = []
    with pytest.raises(signals.Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("after")
    assert done == []
    with pytest.raises(KeyboardInterrupt), signals.deferred(), signals.deferred():  # nested: raised at the outer end
        os.kill(os.getpid(), signal.SIGINT)
        done.append("inner")
    assert done == ["inner"]


class SignalsInFinaliser:
    """An object whose finaliser is where the signal lands (as when the garbage collector runs
    a weakref callback at that moment): Python drops what a finaliser raises."""

    def __init__(self, how):
        self.how = how

    def __del__(self):
        os.kill(os.getpid(), self.how)
        sum(range(10))  # the handler runs here, inside the finaliser


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_lost_in_a_finaliser_is_kept_and_raised_at_the_next_check(interrupt_handlers, capfd, how):
    finaliser = SignalsInFinaliser(how)
    del finaliser  # the interrupt is raised in __del__, and Python drops it
    assert capfd.readouterr().err == ""  # no "Exception ignored in ..." report
    with signals.deferred():
        signals.check()  # inside a store write: not a safe point
    with pytest.raises(KeyboardInterrupt) as stopped:
        signals.check()
    assert isinstance(stopped.value, signals.Terminated) == (how == signal.SIGTERM)


def test_without_an_interrupt_a_check_and_a_checked_progress_change_nothing(interrupt_handlers):
    from tbptt_exp.app.jobs import checked

    seen = []
    signals.check()
    checked(lambda *a: seen.append(a))(1, 5, 10)
    assert seen == [(1, 5, 10)]


def test_a_lost_interrupt_stops_training_at_the_next_progress_window(interrupt_handlers):
    from tbptt_exp.app.jobs import checked

    seen = []
    finaliser = SignalsInFinaliser(signal.SIGTERM)
    del finaliser
    with pytest.raises(signals.Terminated):
        checked(lambda *a: seen.append(a))(1, 5, 10)
    assert seen == []


@pytest.mark.parametrize("lost_how", ["in a finaliser", "by a bare except", "into another error"])
def test_a_command_whose_interrupt_was_lost_still_ends_as_stopped(interrupt_handlers, monkeypatch, capfd, lost_how):
    """The command's own exit: 143 and its one line, never 0 (the interrupt dropped) or a
    traceback (an import the interrupt left half-done raising later)."""
    from tbptt_exp.app import cli

    def run(argv):
        if lost_how == "in a finaliser":
            finaliser = SignalsInFinaliser(signal.SIGTERM)
            del finaliser
        else:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(10))
            except:  # noqa: E722 - the library code that swallows it
                pass
            if lost_how == "into another error":
                raise AttributeError("partially initialized module 'mlflow' has no attribute 'version'")

    monkeypatch.setattr(cli, "run", run)
    monkeypatch.setattr(signals, "install", lambda: None)  # the fixture's handlers stay
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 143
    assert capfd.readouterr().err == "tbptt-exp: stopped by SIGTERM; open MLflow runs were marked KILLED\n"


def swallowed_sigterm() -> None:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10))
    except KeyboardInterrupt:  # the library code that drops it
        pass


def test_a_refusal_caused_by_an_interrupt_is_reported_as_the_interrupt(interrupt_handlers, monkeypatch, capfd):
    """A store build cut short raises SQLAlchemy's errors, which became "the new store could not
    be created", exit 2: after an interrupt, the command stops as interrupted instead."""
    from tbptt_exp.app import cli
    from tbptt_exp.core.config import ConfigError

    def hydra_main():
        swallowed_sigterm()
        raise ConfigError("tracking.uri", "sqlite:///x.db", "the new store could not be created (Can't reconnect)")

    monkeypatch.setattr(cli, "hydra_main", hydra_main)
    monkeypatch.setattr(signals, "install", lambda: None)
    monkeypatch.setattr(sys, "argv", ["tbptt_exp", "trainer.epochs=1"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 143
    assert capfd.readouterr().err == "tbptt-exp: stopped by SIGTERM; open MLflow runs were marked KILLED\n"


def test_any_error_after_an_interrupt_ends_the_run_killed(interrupt_handlers):
    from tbptt_exp.app.tracking.run import KILLED, ending_of

    assert ending_of(AttributeError("x")).status != KILLED
    swallowed_sigterm()
    assert ending_of(AttributeError("partially initialized module")).status == KILLED


@pytest.mark.slow
def test_a_finder_killed_outright_takes_its_probe_with_it(tmp_path):
    import psutil

    finder = subprocess.Popen(
        [sys.executable, "-m", "tbptt_exp", "task=max_batch", "data=key_recall", "batch_finder.probe_seconds=60",
         "batch_finder.cache=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    def probes() -> list:
        """The probes: the processes the finder's fork server forked (not the server itself)."""
        found = []
        for child in psutil.Process(finder.pid).children():
            try:
                if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                    servers.add(child)
                    found += child.children()
            except psutil.Error:  # it ended between being listed and read: not a probe to kill
                continue
        return found

    def age(process) -> float:
        try:
            return time.time() - process.create_time()
        except psutil.Error:  # it ended (the describe probe)
            return 0.0

    deadline, probe, servers = time.monotonic() + 180, None, set()
    while probe is None and time.monotonic() < deadline:  # a training probe: the first only describes the device,
        time.sleep(0.5)                                    # in well under a second
        probe = next((p for p in probes() if age(p) > 5), None)
    assert probe is not None, "no training probe started"
    finder.kill()
    finder.wait()
    gone, alive = psutil.wait_procs([probe, *servers], timeout=15)
    assert probe in gone and servers and not alive  # the probe, and the fork server it came from


@pytest.mark.slow
def test_a_killed_joblib_worker_ends_the_sweep_in_one_line(tmp_path):
    import psutil

    sweep = subprocess.Popen(
        [sys.executable, "-m", "tbptt_exp", "-m", "k=5,10", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "data=key_recall", "trainer.epochs=50", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    deadline, worker = time.monotonic() + 180, None
    while worker is None and time.monotonic() < deadline:
        time.sleep(1)
        workers = [c for c in psutil.Process(sweep.pid).children() if "popen_loky_posix" in " ".join(c.cmdline())]
        worker = workers[0] if workers and time.monotonic() > deadline - 160 else None  # well into training
    assert worker is not None, "no joblib worker started"
    worker.kill()
    _, err = sweep.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("tbptt-exp:")]
    assert sweep.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert lines == [lines[-1]] and "joblib worker process died" in lines[-1] and "SIGKILL" in lines[-1], lines


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
    out = cli([*args, "trainer.epochs=1"], cwd=tmp_path, timeout=120)
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
        out = cli([f"tracking.uri={url}", "trainer.epochs=1"], cwd=tmp_path, timeout=120)
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
        wrong = cli([f"tracking.uri=http://admin:Wr0ng-guess@127.0.0.1:{port}", *store], cwd=tmp_path, timeout=120)
        right = cli([f"tracking.uri=http://admin:{admin}@127.0.0.1:{port}", *store], cwd=tmp_path, timeout=300)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr[-2000:]
    assert "the credentials given were refused (HTTP 401)" in wrong.stderr and "Wr0ng" not in wrong.stderr
    assert right.returncode == 0, right.stderr[-3000:]
    assert admin not in right.stdout + right.stderr and "open the run in MLflow" in right.stdout


def test_a_disk_that_fills_while_the_store_is_made_leaves_nothing_half_made(tmp_path):
    """The new SQLite store is built aside and moved into place: a write that fails (here a
    file-size limit, as a full disk) leaves no file, and the next run makes the store whole."""
    import resource

    from mlflow import MlflowClient

    from tbptt_exp.app.tracking.stores import create_store

    store = tmp_path / "mlflow.db"
    out = cli([f"tracking.uri=sqlite:///{store}", "trainer.epochs=1"], cwd=tmp_path, timeout=120,
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
from tbptt_exp.core.config import TrackingConfig
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


@pytest.mark.parametrize("when", ["a Ctrl-C while the trials are asked", "a second Ctrl-C while they are ended"])
def test_no_interrupt_leaves_a_trial_running(tmp_path, interrupt_handlers, monkeypatch, when):
    """Every trial a worker asked for ends FAIL with the reason before the interrupt goes on,
    wherever the interrupt lands (a real SIGINT to this process, from inside the study's calls)."""
    from omegaconf import OmegaConf

    from tbptt_exp.app.study.search_space import StudySettings
    from tbptt_exp.app.study.study import run_study

    def interrupting(method):
        sent = []

        def call(self, *args, **kwargs):
            if not sent:
                sent.append(os.kill(os.getpid(), signal.SIGINT))
            return method(self, *args, **kwargs)

        return call

    def launch(batch):
        if when.startswith("a Ctrl-C"):
            pytest.fail("a job was launched after the interrupt")
        raise KeyboardInterrupt  # the first Ctrl-C, inside the jobs

    patched = "ask" if when.startswith("a Ctrl-C") else "tell"
    monkeypatch.setattr(optuna.Study, patched, interrupting(getattr(optuna.Study, patched)))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    settings = StudySettings(study_name="interrupted", storage=storage, n_trials=4, n_jobs=2)
    with pytest.raises(KeyboardInterrupt):
        run_study(settings, OmegaConf.create({"tracking": {"enabled": False}}), ["k=choice(5,10)"], launch)
    monkeypatch.undo()
    trials = optuna.load_study(study_name="interrupted", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert all(t.user_attrs["fail_reason"].startswith("KeyboardInterrupt") for t in trials)


def test_a_model_that_fits_the_host_but_not_the_device_is_one_line(tmp_path):
    """The host-memory check passes (9 GB of 24), the device runs out while building: here the
    CPU allocator under a 4 GB address-space limit stands in for a GPU's memory."""
    import resource

    limit = 4 * 2**30
    out = cli(["model.units=12000", "trainer.epochs=1", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
              cwd=tmp_path, timeout=180, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert out.returncode == 2, out.stderr[-2000:]
    said = re.match(r"tbptt-exp: error: model.units=12000 is not allowed: out of memory on CPU:0 while building the "
                    r"model; the model has ([\d,]+) parameters, about ([\d,]+) MiB .*use a smaller model", out.stderr)
    params, mib = (int(said.group(i).replace(",", "")) for i in (1, 2))
    assert 4 * 12000 * 12000 < params < 4 * 12000 * 12100 and abs(mib - params * 16 / 2**20) < 1
    assert len(out.stderr.strip().splitlines()) == 1 and runs(f"sqlite:///{tmp_path / 'mlflow.db'}") == []


def test_out_of_memory_while_training_names_the_batch_and_how_to_find_one_that_fits():
    import tensorflow as tf

    from tbptt_exp.app.jobs import out_of_memory_is_one_line
    from tbptt_exp.core.config import ExperimentConfig

    experiment = ExperimentConfig(k=50, batch_size=4096)
    with pytest.raises(ConfigError) as refused, out_of_memory_is_one_line(experiment, None, "training", built=1_000_000):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[4096,50,256]")
    assert str(refused.value).startswith("batch_size=4096 is not allowed: out of memory on ")
    assert "while training; the model has 1,000,000 parameters, about 15 MiB" in str(refused.value)
    assert "python -m tbptt_exp -m sweep=max_batch k=50 finds the largest batch that fits" in str(refused.value)
    # any other TensorFlow error is left as it is
    with pytest.raises(tf.errors.InvalidArgumentError), out_of_memory_is_one_line(experiment, None, "training", built=1_000_000):
        raise tf.errors.InvalidArgumentError(None, None, "shapes do not match")


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


def test_a_store_write_in_another_thread_neither_defers_nor_swallows_a_ctrl_c(interrupt_handlers):
    """The heartbeat thread writes to the store inside ``deferred()`` too; a Ctrl-C that arrives
    meanwhile is the main thread's, raised there at once, not at the end of the thread's block."""
    inside, leave = threading.Event(), threading.Event()
    ended = []

    def heartbeat():
        try:
            with signals.deferred():
                inside.set()
                leave.wait(10)
            ended.append("cleanly")
        except BaseException as error:  # what the thread would lose
            ended.append(type(error).__name__)

    thread = threading.Thread(target=heartbeat)
    thread.start()
    inside.wait(10)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # the handler runs in the main thread between bytecodes
    leave.set()
    thread.join(10)
    assert ended == ["cleanly"]


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


@pytest.mark.slow
def test_two_ctrl_c_during_a_study_fail_its_trial_kill_its_runs_and_exit_130(tmp_path):
    """A person presses Ctrl-C twice, 0.3 s apart, while a trial trains: the second waits for
    the store writes that end the trial and runs, then the command exits 130 (not by SIGINT)."""
    from mlflow import MlflowClient

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    study = subprocess.Popen(
        [sys.executable, "-m", "tbptt_exp", "-m", "hydra/sweeper=optuna", f"hydra.sweeper.storage={storage}",
         "hydra.sweeper.n_trials=3", "batch_size=choice(4,8)", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
         *TINY[:-1], "trainer.epochs=30"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for line in study.stdout:
        if "epoch 1/30" in line:
            break
    study.send_signal(signal.SIGINT)
    time.sleep(0.3)
    study.send_signal(signal.SIGINT)
    _, err = study.communicate(timeout=300)
    assert study.returncode == 130 and err.strip().splitlines()[-1].startswith("tbptt-exp: stopped by Ctrl-C"), err
    assert [t.state for t in optuna.load_study(study_name="tbptt-exp", storage=storage).trials] == [TrialState.FAIL]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.info.status for r in runs} == {"KILLED"}
