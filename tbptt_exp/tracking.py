"""MLflow tracking: one run per experiment, nested under one parent run per sweep.

Runs go through ``MlflowClient`` with explicit run ids (no global "active run"), so a
job, a sweep callback and worker processes can each address the right run.

The default store is a SQLite database plus an artifact folder under ``mlruns/``,
addressed by absolute paths so that runs land in one place whatever the working
directory (MLflow >= 3.13 refuses the old ``./mlruns`` file store).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tbptt_exp.config import TrackingConfig
from tbptt_exp.paths import REPO_DIR, default_store_dir, in_clone

PARENT_RUN_ENV = "TBPTT_EXP_PARENT_RUN_ID"
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


def mask_credentials(text: str) -> str:
    """Hide passwords in URLs (``scheme://user:secret@host`` -> ``scheme://user:***@host``)."""
    return re.sub(r"(\w[\w+.-]*://[^:/@\s]*):[^@\s]+@", r"\1:***@", text)


def mask_credentials_in_logs() -> None:
    """Mask passwords in every log record (Hydra logs each job's overrides, URLs included)."""
    import logging

    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "masks_credentials", False):
        return

    def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = mask_credentials(message), ()
        return record

    masked_record.masks_credentials = True
    logging.setLogRecordFactory(masked_record)


def resolve_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = default_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


@contextlib.contextmanager
def local_store_lock(uri: str):
    """Serialise creating a SQLite store and its experiment: MLflow's schema migration
    and experiment creation race when several processes start on a new database."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside it; a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {mask_credentials(uri)} in a browser"
    return f"mlflow ui --backend-store-uri {mask_credentials(uri)}"


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model.units": 256, ...}: every leaf one MLflow param."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit() -> str | None:
    if not in_clone():
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


class Tracker:
    """An MLflow experiment and the runs logged to it."""

    def __init__(self, cfg: TrackingConfig):
        from mlflow import MlflowClient

        self.uri = resolve_uri(cfg)
        with local_store_lock(self.uri):  # workers starting together on a new SQLite store
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                self.experiment_id = self.client.create_experiment(
                    cfg.experiment, artifact_location=artifact_location(self.uri)
                )
            else:
                self.experiment_id = experiment.experiment_id
        self.experiment_name = cfg.experiment

    def start_run(
        self, name: str | None, params: dict[str, Any], tags: dict[str, str], parent_run_id: str | None = None
    ) -> str:
        from mlflow.entities import Param

        all_tags = {k: mask_credentials(str(v)) for k, v in tags.items() if v is not None}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        items = [Param(k, mask_credentials(str(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=items[start : start + 100])
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float | None], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(run_id, metrics=batch, synchronous=True)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, mask_credentials(text), path)

    def log_dict(self, run_id: str, data: dict, path: str) -> None:
        self.client.log_dict(run_id, json.loads(mask_credentials(json.dumps(data, default=str))), path)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, mask_credentials(str(v)))

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def run_link(self, run_id: str) -> str:
        return f"run {run_id} in experiment '{self.experiment_name}' at {mask_credentials(self.uri)}"


def environment_tags() -> dict[str, str | None]:
    """Versions and commit; device tags are added once TensorFlow is up."""
    import importlib.metadata as md

    return {
        "tensorflow.version": md.version("tensorflow"),
        "keras.version": md.version("keras"),
        "python.version": platform.python_version(),
        "git.commit": git_commit(),
        "host": platform.node(),
        "command": mask_credentials(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
    }


def experiment_params(cfg_dict: dict) -> dict[str, Any]:
    return flatten(cfg_dict)


class SweepParentRun(Callback):
    """Hydra callback: a multirun becomes one MLflow parent run with a child per job.

    The parent's id reaches the jobs through an environment variable, which works for the
    in-process launcher and for launchers that start worker processes afterwards.
    """

    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.hydra.sweeper.get("_target_", "")).endswith("OptunaSweeper"):
            return  # the Optuna sweeper keeps one parent per study, shared by its workers
        tracking = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrackingConfig), config.tracking))
        if not tracking.enabled:
            return
        self.tracker = Tracker(tracking)
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = list(config.hydra.overrides.task)
        self.run_id = self.tracker.start_run(
            name=tracking.run_name or f"sweep {sweep_dir.parent.name} {sweep_dir.name}",
            params={},
            tags={
                **environment_tags(),
                "tbptt_exp.kind": "sweep",
                "hydra.overrides": " ".join(overrides),
                "hydra.sweep_dir": str(sweep_dir.resolve()),
                "hydra.sweeper": config.hydra.sweeper.get("_target_", ""),
            },
        )
        os.environ[PARENT_RUN_ENV] = self.run_id
        atexit.register(self._end_if_open, FAILED)
        print(f"[tbptt-exp] sweep tracked as parent {self.tracker.run_link(self.run_id)}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.tracker is not None and self.run_id is not None and config.get("task") != "max_batch":
            table = sweep_table(self.tracker, self.run_id)
            if table:
                print("[tbptt-exp] sweep results:\n" + table, flush=True)
                self.tracker.log_text(self.run_id, table, "sweep_results.md")
        self._end_if_open(FINISHED)
        if self.tracker is not None:
            print(f"[tbptt-exp] compare the runs side by side: {ui_command(self.tracker.uri)}", flush=True)

    def _end_if_open(self, status: str) -> None:
        from tbptt_exp import signals

        if self.tracker is None or self.run_id is None:
            return
        if status != FINISHED and signals.terminated():
            status = KILLED
        self.tracker.end(self.run_id, status)
        os.environ.pop(PARENT_RUN_ENV, None)
        self.run_id = None


SUMMARY_METRICS = {
    "val_loss": "{:.4f}",
    "train_loss": "{:.4f}",
    "tokens_per_s": "{:,.0f}",
    "peak_memory_mb": "{:,.1f}",
    "padding_waste": "{:.1%}",
}


def sweep_table(tracker: Tracker, parent_run_id: str) -> str:
    """The children of a sweep as a Markdown table: overrides and final figures."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    if not runs:
        return ""
    lines = ["| run | status | " + " | ".join(SUMMARY_METRICS) + " |", "|---|---|" + "---:|" * len(SUMMARY_METRICS)]
    for run in runs:
        metrics = run.data.metrics
        cells = [fmt.format(metrics[m]) if m in metrics else "" for m, fmt in SUMMARY_METRICS.items()]
        overrides = run.data.tags.get("hydra.overrides", "") or run.info.run_name
        lines.append(f"| {overrides} | {run.info.status} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def result_record(result) -> dict:
    record = asdict(result)
    return json.loads(json.dumps(record, default=str))
