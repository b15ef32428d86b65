"""Runs and trials of dead processes are closed at once, a resumed study does not replay its
sampler, and a killed finder or worker takes what it started with it."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_cli import cli
from test_optuna_cli import postgres_url

from tbptt_exp.app.settings import TrackingConfig
from tbptt_exp.app.study.study import sampler_seed
from tbptt_exp.app.study.trials import TrialLocks, fail_orphaned_trials, study_lock
from tbptt_exp.app.tracking.liveness import STALE_AFTER_S, Holder, dead_reason, this_process
from tbptt_exp.app.tracking.run import Tracker


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
        from tbptt_exp.app.settings import TrackingConfig
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
