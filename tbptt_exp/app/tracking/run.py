"""The one run lifecycle: every MLflow run this harness records starts and ends here.

``Tracker.run(...)`` is a context manager for plain runs, sweep parents and children,
Optuna trials, batch-finder runs and nightly entries alike: it starts the run with its
params and tags, hands out a ``TrackedRun`` to log metrics and artifacts, and on the way
out maps how the block ended to the run's final state in one place (``ending_of``). A new
run state or a new kind of failure is added there and nowhere else. With tracking off,
``NO_TRACKING.run(...)`` gives the same interface and records nothing, so callers never
branch on it.

Runs go through ``MlflowClient`` with explicit run ids (no global "active run"), so a
job, a sweep and worker processes can each address the right run.

The default store is a SQLite database plus an artifact folder under ``mlruns/``,
addressed by absolute paths so that runs land in one place whatever the working
directory (MLflow >= 3.13 refuses the old ``./mlruns`` file store).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbptt_exp.app import signals
from tbptt_exp.app.settings import TrackingConfig
from tbptt_exp.app.signals import Deferring, deferred
from tbptt_exp.app.tracking.liveness import HEARTBEATS, close_dead_runs, this_process
from tbptt_exp.app.tracking.stores import creation_lock, holders, mask_credentials, resolve_uri, sqlite_path
from tbptt_exp.app.tracking.ui import EXPERIMENT_KIND, VIEW_COLUMNS, VIEW_TAG, run_url, saved_view, ui_command
from tbptt_exp.core.measure import mlflow_names

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
FIGURES_FILE = "figures.json"  # a run's figures, kept in its job folder when the store fails


class StoreFailed(Exception):
    """A call to the tracking store failed (full disk, a lock held too long, a server gone)."""


def store_error(error: Exception) -> str:
    """A store failure's cause in a line: the database's own message, or for a server that does
    not answer, the address and the system's reason (not the HTTP library's nested repr)."""
    text = str(getattr(error, "orig", None) or getattr(error, "message", None) or error)
    request, errno = re.match(r"API request to (\S+) failed", text), re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    if request and errno:
        text = f"{request.group(1)}: {errno.group(0)}"
    return mask_credentials(text).strip().splitlines()[0][:300]


LOCK_WAIT_S = 120  # how long a run waits out a SQLite store that another process keeps locked


class Guarded(Deferring):
    """The MLflow client, each call made inside ``deferred()`` and any failure raised as
    ``StoreFailed`` with its one-line cause, so a run can tell the store's failures from its own.
    A SQLite store locked by another process (a long write, a backup) is waited out for up
    to ``LOCK_WAIT_S``; a Ctrl-C is taken between attempts. A failed write is rolled back,
    so trying it again records it once."""

    def __init__(self, client: Any, uri: str):
        super().__init__(client)
        self._uri = uri

    def __getattr__(self, name: str) -> Any:
        call = super().__getattr__(name)
        if not callable(call):
            return call

        def guarded(*args, **kwargs):
            give_up = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    return call(*args, **kwargs)
                except Exception as error:
                    locked = "database is locked" in str(error)
                    if locked and time.monotonic() < give_up:
                        time.sleep(1)  # each attempt already waited out SQLite's busy timeout
                        continue
                    cause = store_error(error)
                    if locked and (path := sqlite_path(self._uri)) is not None:
                        cause += f" for {LOCK_WAIT_S} s by {holders(path)}"
                    raise StoreFailed(f"the tracking store failed ({cause})") from error

        return guarded


@dataclass(frozen=True)
class Ending:
    """How a run ended: its MLflow status, the Optuna trial state it maps to, and why."""

    status: str  # FINISHED | FAILED | KILLED
    trial_state: str  # COMPLETE | PRUNED | FAIL
    reason: str = ""


def ending_of(error: BaseException | None) -> Ending:
    """The single mapping from how a block ended to a run's final state.

    No exception: FINISHED. A pruned trial: FINISHED (it ran correctly), state PRUNED.
    Ctrl-C or SIGTERM (``KeyboardInterrupt``, or any error once one has arrived): KILLED.
    ``SystemExit(0)``: FINISHED.
    Anything else, a non-zero exit included: FAILED, with its one-line reason.
    """
    if error is None:
        return Ending(FINISHED, "COMPLETE")
    reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    if type(error).__name__ == "TrialPruned":  # optuna.TrialPruned, without importing Optuna
        return Ending(FINISHED, "PRUNED", str(error))
    if isinstance(error, KeyboardInterrupt) or signals.received():  # after an interrupt, whatever it raised
        return Ending(KILLED, "FAIL", reason)
    if isinstance(error, SystemExit) and error.code in (0, None):
        return Ending(FINISHED, "COMPLETE")
    return Ending(FAILED, "FAIL", reason)


_cleaned_stores: dict[str, list] = {}


def close_dead_runs_once(client, uri: str) -> list[tuple[str, str]]:
    """Close runs of dead processes the first time this process opens a store."""
    if uri not in _cleaned_stores:
        _cleaned_stores[uri] = close_dead_runs(client)
    return _cleaned_stores[uri]


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside it; a server decides for itself."""
    path = sqlite_path(uri)
    return None if path is None else (path.parent / "artifacts").as_uri()


class Tracker:
    """An MLflow experiment and the runs logged to it."""

    def __init__(self, cfg: TrackingConfig):
        from mlflow import (
            MlflowClient,  # MLflow loads when a run is first recorded, not at start-up
        )

        self.uri = resolve_uri(cfg.uri)
        with creation_lock(self.uri):  # workers starting together on a new store: one makes the experiment
            # An interrupt waits for a write in progress, so the writes that end the run can go through.
            self.client = Guarded(MlflowClient(tracking_uri=self.uri), self.uri)
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                self.experiment_id = self.client.create_experiment(
                    cfg.experiment, artifact_location=artifact_location(self.uri), tags=EXPERIMENT_KIND
                )
                self.experiment_tags = dict(EXPERIMENT_KIND)
            else:
                self.experiment_id = experiment.experiment_id
                self.experiment_tags = dict(experiment.tags)
                for key, value in EXPERIMENT_KIND.items():  # an experiment made before the tag was set
                    if key not in experiment.tags:
                        self.client.set_experiment_tag(self.experiment_id, key, value)
        self.experiment_name = cfg.experiment
        self.closed_runs = close_dead_runs_once(self.client, self.uri)

    def save_view(self, kind: str) -> None:
        """The runs table's saved view for runs of ``kind`` (``ui.VIEW_COLUMNS``), written once
        per experiment; a view someone edited in the UI is kept."""
        if kind in VIEW_COLUMNS and VIEW_TAG not in self.experiment_tags:
            self.experiment_tags[VIEW_TAG] = saved_view(VIEW_COLUMNS[kind])
            self.client.set_experiment_tag(self.experiment_id, VIEW_TAG, self.experiment_tags[VIEW_TAG])

    @contextlib.contextmanager
    def run(
        self, name: str | None = None, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
        parent_run_id: str | None = None, run_id: str | None = None, system_metrics: float | None = None,
        figures_dir: Path | None = None,
    ) -> Iterator[TrackedRun]:
        """Start a run (or take up ``run_id`` again), yield it, end it as ``ending_of`` says.

        The block may call ``run.leave_running()`` when the run outlives it (a study's
        parent run that other workers still use); an exception always ends the run.
        ``system_metrics``: sample MLflow's system metrics (``system/...``) every this many
        seconds while the run is open. ``figures_dir``: where the run's figures are written
        if the store fails while it is open (``TrackedRun.keep_figures``).
        """
        try:
            run = self._start(name, tags or {}, parent_run_id) if run_id is None else self._resume(run_id)
        except StoreFailed as failed:
            raise TrackedRun(self, None).keep_figures(failed) from failed.__cause__
        run.figures_dir = figures_dir
        try:
            run.log_params(params or {})
            if system_metrics:
                run.monitor_system(system_metrics)
            yield run
            if not run.left_running:
                run.end(ending_of(None))
        except StoreFailed as failed:
            raise run.keep_figures(failed) from failed.__cause__
        except BaseException as error:
            with deferred():  # a second Ctrl-C waits until the run is ended
                try:
                    run.end(ending_of(error))
                except StoreFailed as failed:
                    raise run.keep_figures(failed) from error
            raise

    def _start(self, name, tags, parent_run_id) -> TrackedRun:
        all_tags = {k: mask_credentials(str(v)) for k, v in tags.items() if v is not None}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        all_tags[this_process().key] = f"{time.time():.0f}"  # the run is alive while this process is
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        HEARTBEATS.hold(self.client, run_id)
        return TrackedRun(self, run_id, is_trial="optuna.trial" in all_tags)

    def _resume(self, run_id: str) -> TrackedRun:
        self.client.set_tag(run_id, this_process().key, f"{time.time():.0f}")  # before it is RUNNING again
        self.client.update_run(run_id, status="RUNNING")
        HEARTBEATS.hold(self.client, run_id)
        return TrackedRun(self, run_id)

    @property
    def where(self) -> str:
        """The experiment and store, for a person (credentials masked)."""
        return f"experiment '{self.experiment_name}' store {mask_credentials(self.uri)}"


class TrackedRun:
    """One MLflow run while it is open: metrics, tags and artifacts, credentials masked."""

    def __init__(self, tracker: Tracker | None, run_id: str | None, is_trial: bool = False):
        self.tracker, self.run_id, self.is_trial = tracker, run_id, is_trial
        self.left_running = False
        self.logging_s = 0.0  # time spent recording, so its overhead can be reported
        self.monitor = None
        self.figures_dir: Path | None = None
        self.measured: list[dict[str, Any]] = []  # every metric logged, kept until the run ends

    @property
    def client(self):
        return self.tracker.client

    def log_metrics(self, metrics: dict[str, float | None], step: int = 0) -> None:
        """Metrics by MLflow name; None values (a figure the device does not report) are left out."""
        from mlflow.entities import Metric

        started = time.perf_counter()
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.measured += [{"name": m.key, "value": m.value, "step": step, "timestamp": now} for m in batch]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        self.logging_s += time.perf_counter() - started

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, mask_credentials(str(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_figures(self, figures: dict[str, float | None], step: int = 0) -> None:
        """Figures by field name (``measure.FIGURES``), under their MLflow names."""
        self.log_metrics(mlflow_names(figures), step=step)

    def log_epoch(self, metrics) -> None:
        """An epoch's figures (``EpochMetrics``), step = the epoch."""
        self.log_figures(metrics.figures(), step=metrics.epoch)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, mask_credentials(text), path)

    def log_dict(self, data: dict, path: str) -> None:
        self.client.log_dict(self.run_id, json.loads(mask_credentials(json.dumps(data, default=str))), path)

    def log_file(self, path: Path | str) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            if v is not None:
                self.client.set_tag(self.run_id, k, mask_credentials(str(v)))

    def monitor_system(self, interval_s: float) -> None:
        """MLflow's own system-metrics monitor on this run (a thread; stopped by ``end``)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, tracking_uri=self.tracker.uri)
        self.monitor.start()

    def leave_running(self) -> None:
        """The run outlives this block (other workers hold it); this process stops holding it."""
        self.left_running = True
        HEARTBEATS.release(self.run_id)

    def end(self, ending: Ending) -> None:
        if self.monitor is not None:
            self.monitor.finish()  # its last samples land before the run ends
            self.monitor = None
        HEARTBEATS.release(self.run_id)
        if ending.reason and ending.status != FINISHED:
            self.set_tags({"fail_reason": ending.reason})
        if self.is_trial:
            self.set_tags({"optuna.state": ending.trial_state})
        if ending.trial_state == "PRUNED":
            self.say_pruned(ending.reason)
        self.client.set_terminated(self.run_id, status=ending.status)

    def keep_figures(self, failed: StoreFailed) -> StoreFailed:
        """The store failed while this run was open: its figures go to ``figures_dir`` first
        (a JSON file, one entry per metric and step, as MLflow would have held them), then the
        run is ended FAILED as far as the store still takes writes; the error says where they are."""
        if not getattr(failed, "kept", False):  # else a run inside this one kept its figures already
            if self.measured:
                path = (self.figures_dir or Path.cwd()) / FIGURES_FILE
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"run_id": self.run_id, "metrics": self.measured}, indent=1))
                failed = StoreFailed(f"{failed}; the {len(self.measured)} figures measured so far are in {path}")
            else:
                failed = StoreFailed(f"{failed}; nothing had been measured yet")
            failed.kept = True
        if self.run_id is not None:
            with contextlib.suppress(StoreFailed):
                self.end(Ending(FAILED, "FAIL", str(failed)))
        return failed

    def say_pruned(self, reason: str) -> None:
        """A pruned trial's run FINISHED (it ran correctly) but stopped early: its name and
        description say so first, so it is not read as a full run."""
        run = self.client.get_run(self.run_id)
        self.client.update_run(self.run_id, name=f"{run.info.run_name} (pruned)")
        note = run.data.tags.get("mlflow.note.content", "")
        self.set_tags({"mlflow.note.content": f"**{reason[:1].upper()}{reason[1:]}** by the study's pruner: the "
                                              f"settings below asked for more epochs than it ran.\n\n{note}"})

    @property
    def where(self) -> str:
        """The run, its experiment and store, for a person (credentials masked)."""
        return f"run {self.run_id} in experiment '{self.tracker.experiment_name}' at {mask_credentials(self.tracker.uri)}"

    def announce(self, say: Callable[[str], None], what: str = "the run") -> None:
        """Print the URL that opens this run in the MLflow UI (and how to serve a local store)."""
        if self.run_id is None:
            return
        say(f"open {what} in MLflow: {run_url(self.tracker.uri, self.tracker.experiment_id, self.run_id)}")
        command = ui_command(self.tracker.uri)
        if command:
            say(f"  (serve the UI first: {command})")


class _NoRun(TrackedRun):
    """Tracking off: the same calls, nothing recorded."""

    def __init__(self) -> None:
        super().__init__(None, None)

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float | None], step: int = 0) -> None:
        pass

    def log_text(self, text: str, path: str) -> None:
        pass

    def log_dict(self, data: dict, path: str) -> None:
        pass

    def log_file(self, path: Path | str) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def end(self, ending: Ending) -> None:
        pass

    def announce(self, say: Callable[[str], None], what: str = "the run") -> None:
        pass


class _NoTracking:
    """Stands in for a ``Tracker`` when ``tracking.enabled`` is false."""

    uri = None

    def save_view(self, kind: str) -> None:
        pass

    @contextlib.contextmanager
    def run(self, *args: Any, **kwargs: Any) -> Iterator[TrackedRun]:
        yield _NoRun()


NO_TRACKING = _NoTracking()


def make_tracker(cfg: TrackingConfig) -> Tracker | _NoTracking:
    """The tracker a config asks for; ``NO_TRACKING`` when tracking is off."""
    return Tracker(cfg) if cfg.enabled else NO_TRACKING
