"""One run lifecycle: every way a block can end maps to one MLflow state, in one place;
and a grid sweep, in process, goes through the sweeper, the job protocol and MLflow."""

import contextlib
import signal
import sys
from pathlib import Path

import optuna
import pytest

from tbptt_exp.app.settings import TrackingConfig
from tbptt_exp.app.signals import Terminated
from tbptt_exp.app.sweep.sweep import JobResult, SweepLink
from tbptt_exp.app.tracking.run import FAILED, FINISHED, KILLED, Tracker, ending_of


@pytest.mark.parametrize(
    "error, status, trial_state",
    [
        (None, FINISHED, "COMPLETE"),
        (optuna.TrialPruned("pruned at epoch 2"), FINISHED, "PRUNED"),
        (KeyboardInterrupt(), KILLED, "FAIL"),
        (Terminated("terminated by SIGTERM"), KILLED, "FAIL"),
        (SystemExit(0), FINISHED, "COMPLETE"),
        (SystemExit(3), FAILED, "FAIL"),
        (RuntimeError("boom\nsecond line"), FAILED, "FAIL"),
    ],
)
def test_every_ending_maps_to_one_state(error, status, trial_state):
    ending = ending_of(error)
    assert (ending.status, ending.trial_state) == (status, trial_state)
    if status == FAILED:
        assert "\n" not in ending.reason and type(error).__name__ in ending.reason


@pytest.fixture
def tracker(tmp_path):
    return Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))


def ended(tracker, raise_, **tags):
    run_id = None
    with (
        pytest.raises(type(raise_)) if raise_ else contextlib.nullcontext(),
        tracker.run("r", params={"k": 10}, tags=tags) as run,
    ):
        run_id = run.run_id
        run.log_metrics({"loss": 1.5}, step=1)
        if raise_:
            raise raise_
    return tracker.client.get_run(run_id)


def test_the_context_manager_ends_runs_as_outcome_of_says(tracker):
    ok = ended(tracker, None)
    assert ok.info.status == "FINISHED" and ok.data.params == {"k": "10"} and ok.data.metrics == {"loss": 1.5}
    failed = ended(tracker, RuntimeError("planted"))
    assert failed.info.status == "FAILED" and failed.data.tags["fail_reason"] == "RuntimeError: planted"
    assert ended(tracker, KeyboardInterrupt()).info.status == "KILLED"
    pruned = ended(tracker, optuna.TrialPruned("pruned after epoch 1 (val_loss 2.5000)"),
                   **{"optuna.trial": 3, "mlflow.note.content": "Trained for 4 epochs."})
    assert pruned.info.status == "FINISHED" and pruned.data.tags["optuna.state"] == "PRUNED"
    assert pruned.info.run_name == "r (pruned)"  # a run that stopped early says so where it is listed
    assert pruned.data.tags["mlflow.note.content"].startswith("**Pruned after epoch 1 (val_loss 2.5000)**")
    assert pruned.data.tags["mlflow.note.content"].endswith("Trained for 4 epochs.")
    with tracker.run("open") as run:
        run.leave_running()  # a study's parent, still used by other workers
    assert tracker.client.get_run(run.run_id).info.status == "RUNNING"
    with tracker.run(run_id=run.run_id):
        pass
    assert tracker.client.get_run(run.run_id).info.status == "FINISHED"


def test_the_sweep_link_survives_the_trip_through_hydra_overrides():
    link = SweepLink(parent_run_id="abc123", trial_number=7, returns_result=True)
    env_set = dict(line.split("hydra.job.env_set.", 1)[1].split("=", 1) for line in link.overrides())
    assert SweepLink.from_env_set(env_set) == link
    assert SweepLink.from_env_set({}) == SweepLink()
    assert JobResult(values=[1.0, 2.0]).objective == [1.0, 2.0] and JobResult(values=[0.5]).objective == 0.5


def test_a_launcher_tells_its_events_of_each_start_and_failure_and_keeps_the_failed_job():
    from hydra.core.utils import JobReturn, JobStatus

    from tbptt_exp.app.sweep.sweep import KeepFailures

    class Launcher:
        def launch(self, job_overrides, initial_job_idx):
            returns = []
            for overrides in job_overrides:
                ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=JobResult([1.0]))
                if overrides == ["k=25"]:
                    ret.status, ret._return_value = JobStatus.FAILED, ValueError("boom")
                returns.append(ret)
            return returns

    class Events:
        def __init__(self):
            self.said = []

        def started(self, index, total, overrides):
            self.said.append(("started", index, total, overrides))

        def failed(self, overrides, error):
            self.said.append(("failed", overrides, str(error)))

    events = Events()
    returns = KeepFailures(Launcher(), events, total=lambda: 4, sequential=True).launch([["k=10"], ["k=25"]], initial_job_idx=2)
    assert events.said == [("started", 2, 4, ["k=10"]), ("started", 3, 4, ["k=25"]), ("failed", ["k=25"], "boom")]
    assert [r.status for r in returns] == [JobStatus.COMPLETED] * 2 and returns[1].return_value is None


def test_a_grid_sweep_in_process_tracks_a_parent_and_its_children(tmp_path, monkeypatch, capfd):
    from hydra.core.global_hydra import GlobalHydra
    from mlflow import MlflowClient

    from tbptt_exp.app.cli import main

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(sys, "argv", [
        "tbptt_exp", "-m", "k=5,10", "data=key_recall", "data.num_sequences=24", "data.sequence_length=10",
        "batch_size=8", "model.units=8", "model.embedding_dim=4", "trainer.epochs=1",
        f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "hydra/job_logging=none", "hydra/hydra_logging=none",  # Hydra's handlers would outlive pytest's capture
    ])
    monkeypatch.chdir(tmp_path)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        main()
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        GlobalHydra.instance().clear()
    out = capfd.readouterr().out
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("tbptt-exp").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tbptt_exp.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(runs) == 3
    assert sorted(r.data.params["k"] for r in children) == ["10", "5"]
    assert {r.info.status for r in children} == {"FINISHED"}
    table = Path(client.download_artifacts(parent.info.run_id, "sweep_results.md", str(tmp_path))).read_text()
    rows = [line for line in table.splitlines()[2:]]
    assert [row.split()[1] for row in rows] == ["k=5", "k=10"]  # labelled by the job's overrides
    assert all("| FINISHED |" in row for row in rows) and "env_set" not in table
    assert "sweep results" in out and parent.info.run_id in out


def test_each_experiment_gets_the_answer_view_once_and_opens_in_the_training_view(tracker):
    import base64
    import json
    import zlib

    from tbptt_exp.app.tracking.ui import VIEW_TAG

    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow's GenAI view
    tracker.save_view("max_batch")
    envelope = json.loads(tracker.client.get_experiment(tracker.experiment_id).tags[VIEW_TAG])
    state = json.loads(zlib.decompress(base64.b64decode(envelope["state"].removeprefix("deflate;"))))
    assert state["selectedColumns"][:2] == ["metrics.`batch/max`", "metrics.`batch/recommended`"]
    tracker.client.set_experiment_tag(tracker.experiment_id, VIEW_TAG, "edited in the UI")
    again = Tracker(TrackingConfig(uri=tracker.uri, experiment=tracker.experiment_name))
    again.save_view("experiment")
    assert tracker.client.get_experiment(tracker.experiment_id).tags[VIEW_TAG] == "edited in the UI"  # kept
