"""Ctrl-C and SIGTERM: one line, never a traceback; an interrupt waits for the store write that
ends a run, is never lost in a finaliser, and leaves no run or trial running."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from test_cli import TINY

from tbptt_exp.app import signals
from tbptt_exp.core.config import ConfigError


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
