"""A run that diverges says so: a NaN or infinite loss stops training, names where it
appeared, and the run is a failure, never a result."""

import dataclasses

import numpy as np
import pytest
from test_cli import cli, runs

from tbptt_exp.core.config import EngineConfig, ExperimentConfig, SeriesDataConfig, TrainerConfig
from tbptt_exp.core.layout import build_layout
from tbptt_exp.core.measure import Diverged, NonFiniteLoss
from tbptt_exp.core.train import build, diverged, prepare

SMALL = ExperimentConfig(k=5, batch_size=4, data=SeriesDataConfig(num_sequences=16, sequence_length=40),
                         trainer=TrainerConfig(epochs=1))


def poisoned_epoch(cfg, bad_batch):
    """One epoch whose batch ``bad_batch`` (0-based) has NaN features: its loss is the first NaN."""
    dataset = prepare(cfg)
    engine = build(cfg, dataset)
    layout = build_layout(dataset.train, cfg.k, cfg.batch_size, cfg.padding, cfg.reset)
    layout = dataclasses.replace(layout, inputs=layout.inputs.copy())
    layout.inputs[bad_batch] = np.nan
    assert layout.n_batches > bad_batch + 3
    return engine, layout


@pytest.mark.parametrize("steps", [1, 2])
def test_the_graph_engine_names_the_batch_where_the_loss_stopped_being_finite(steps):
    cfg = dataclasses.replace(SMALL, trainer=TrainerConfig(epochs=1, steps_per_execution=steps))
    engine, layout = poisoned_epoch(cfg, bad_batch=6)
    with pytest.raises(NonFiniteLoss) as stopped:
        engine.train_epoch(layout)
    assert np.isnan(stopped.value.loss)
    if steps == 1:
        assert (stopped.value.batch, stopped.value.exact) == (7, True)
        assert str(stopped.value) == "the training loss became nan at batch 7"
    else:  # batches 7 and 8 run as one execution: the line says the later one, as "by"
        assert (stopped.value.batch, stopped.value.exact) == (8, False)


def test_keras_fit_stops_on_a_non_finite_loss_too():
    engine, layout = poisoned_epoch(dataclasses.replace(SMALL, engine=EngineConfig("keras_fit")), bad_batch=6)
    with pytest.raises(NonFiniteLoss) as stopped:
        engine.train_epoch(layout)
    assert stopped.value.batch >= 7 and not stopped.value.exact  # keras_fit's loss is a running mean


def test_the_line_says_what_usually_helps():
    line = str(diverged(SMALL, 2, "the training loss became nan at batch 7"))
    assert line.startswith("training diverged: the training loss became nan at batch 7 of epoch 2; ")
    assert "set trainer.clipnorm" in line and "trainer.learning_rate (now 0.003)" in line and "relu" not in line
    relu = ExperimentConfig(model=dataclasses.replace(SMALL.model, activation="relu"),
                            trainer=TrainerConfig(clipnorm=1.0))
    line = str(diverged(relu, 1, "the validation loss became inf"))
    assert "lower trainer.clipnorm (now 1)" in line and "relu activation is unbounded" in line
    assert isinstance(diverged(SMALL, 1, ""), Diverged)


@pytest.mark.parametrize("setting", ["trainer.learning_rate", "trainer.clipnorm", "device.memory_budget_mb",
                                     "tracking.system_metrics_interval_s", "batch_finder.probe_seconds"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_float_setting_must_be_finite(tmp_path, setting, value):
    out = cli([f"{setting}={value}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith(f"tbptt-exp: error: {setting}={value} is not allowed")
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_diverging_run_is_one_line_exit_1_and_a_failed_run(tmp_path):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    out = cli(["data=series", "data.num_sequences=16", "data.sequence_length=40", "k=5", "batch_size=4",
               "trainer.epochs=2", "model.units=8", "model.activation=relu", "trainer.learning_rate=1e30",
               f"tracking.uri={store}"], cwd=tmp_path, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("tbptt-exp: error: training diverged: the training loss became ") and "of epoch 1" in line
    assert "epoch 1/2" not in out.stdout  # no figures of the diverged epoch are reported
    (run,) = runs(store)
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"].startswith("Diverged: training diverged")
    assert "train_loss" not in run.data.metrics


@pytest.mark.slow
def test_a_sweep_goes_on_past_a_diverged_job_and_reports_it(tmp_path):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    out = cli(["-m", "data=series", "data.num_sequences=16", "data.sequence_length=40", "k=5", "batch_size=4",
               "trainer.epochs=1", "model.units=8", "model.activation=relu", "trainer.learning_rate=1e30,0.003",
               f"tracking.uri={store}"], cwd=tmp_path, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "job trainer.learning_rate=1e+30 failed: training diverged: the training loss became" in out.stderr
    assert "1 of 2 jobs failed" in out.stderr and "Traceback" not in out.stderr
    assert "| trainer.learning_rate=1e+30 | FAILED" in out.stdout and "| trainer.learning_rate=0.003 | FINISHED" in out.stdout
    statuses = sorted((r.data.tags.get("tbptt_exp.kind"), r.info.status) for r in runs(store))
    assert statuses == [("experiment", "FAILED"), ("experiment", "FINISHED"), ("sweep", "FINISHED")]
