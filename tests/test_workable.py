"""What makes a batch workable, not just fitting: the learning rate follows the batch,
training stops at a wall-time budget or a target, and the finder picks the size of highest
goodput by the gradient noise scale."""

from dataclasses import replace

import pytest

from tbptt_exp.app.batch.finder import Frontier, NoiseScale, Probe, useful_batch
from tbptt_exp.app.settings import RunConfig
from tbptt_exp.core.config import ConfigError, KeyRecallDataConfig, ModelConfig, TrainerConfig
from tbptt_exp.core.noise import goodput

QUICK = RunConfig(k=10, batch_size=16, data=KeyRecallDataConfig(num_sequences=256, sequence_length=40),
                         model=ModelConfig(units=32, embedding_dim=8))


@pytest.mark.parametrize("scaling, batch, rate", [("sqrt", 128, 0.006), ("linear", 128, 0.012),
                                                   ("none", 128, 0.003), ("sqrt", 8, 0.0015), ("sqrt", 32, 0.003)])
def test_the_learning_rate_follows_the_batch_from_the_reference(scaling, batch, rate):
    trainer = TrainerConfig(learning_rate=0.003, lr_scaling=scaling)
    assert trainer.learning_rate_for(batch) == pytest.approx(rate)


def test_the_optimizer_trains_at_the_scaled_rate():
    from tbptt_exp.core.model import make_optimizer

    optimizer = make_optimizer(TrainerConfig(learning_rate=0.002, reference_batch_size=16), 64)
    assert float(optimizer.learning_rate) == pytest.approx(0.004)
    assert float(make_optimizer(TrainerConfig(learning_rate=0.002), None).learning_rate) == pytest.approx(0.002)


def test_linear_scaling_with_adam_is_warned_of_but_not_with_sgd():
    assert "sqrt" in TrainerConfig(lr_scaling="linear").warnings()[0]
    assert TrainerConfig(lr_scaling="linear", optimizer="sgd").warnings() == []
    assert TrainerConfig().warnings() == []


@pytest.mark.parametrize("change, setting", [
    ({"noise_scale_every": -1}, "trainer.noise_scale_every"),
    ({"lr_scaling": "cubic"}, "trainer.lr_scaling"),
    ({"reference_batch_size": 0}, "trainer.reference_batch_size"),
    ({"max_time_s": 0}, "trainer.max_time_s"),
    ({"target_val_loss": float("nan")}, "trainer.target_val_loss"),
])
def test_bad_workable_settings_name_the_setting(change, setting):
    with pytest.raises(ConfigError, match=rf"^{setting}=.* is not allowed: use"):
        TrainerConfig(**change)


def test_a_wall_time_budget_stops_training_at_a_chunk_boundary_then_validates():
    from tbptt_exp.core.train import train

    result = train(replace(QUICK, trainer=TrainerConfig(epochs=1000, max_time_s=3.0)))
    assert result.stopped == "max_time_s"
    # the first window past the budget ends it: one window (0.5 s) and an execution at most
    assert 3.0 <= result.training_time_s < 3.0 + 1.5
    assert 0 < result.tokens_trained == sum(e.tokens_trained for e in result.epochs)
    assert result.final.steps > 0 and result.final.val_loss == result.final.val_loss  # validated, a number


def test_a_target_reached_stops_the_run_and_one_never_reached_is_said_not_failed():
    from tbptt_exp.core.train import train

    reached = train(replace(QUICK, trainer=TrainerConfig(epochs=5, target_val_loss=100.0)))
    assert len(reached.epochs) == 1 and reached.stopped == "target_val_loss"
    assert reached.time_to_target_s == pytest.approx(reached.epochs[0].epoch_time_s)
    assert reached.tokens_to_target == reached.epochs[0].tokens_trained > 0
    assert "reached after" in reached.summary()[-2] or "reached after" in reached.summary()[-1]
    missed = train(replace(QUICK, trainer=TrainerConfig(epochs=2, target_val_loss=-1.0)))
    assert len(missed.epochs) == 2 and missed.time_to_target_s is None and missed.stopped == ""
    assert any("target val_loss -1.0000 not reached in" in line for line in missed.summary())


def test_the_warm_up_measures_the_noise_scale_after_real_training():
    from tbptt_exp.core.probes.probe import warm_up
    from tbptt_exp.core.train import prepare

    found = warm_up(replace(QUICK, trainer=TrainerConfig(reference_batch_size=16)), 2.0, prepare(QUICK))
    assert found["outcome"] == "warmup" and found["batch_size"] == 16
    assert found["gradient_noise_scale"] > 0 and found["training_time_s"] >= 2.0 and found["tokens_trained"] > 0


def probes(*rates):
    return [Probe(b, "ok", tokens_per_s=r) for b, r in rates]


def test_the_useful_batch_is_the_size_of_highest_goodput_never_above_the_largest():
    noise = NoiseScale(50.0, "after 20 s", 32, tokens_per_s=20_000)
    found = probes((8, 8_000), (64, 30_000), (128, 40_000), (256, 60_000))
    scores = {b: goodput(r, b, 50.0, 32) for b, r in ((8, 8_000), (32, 20_000), (64, 30_000), (128, 40_000))}
    size, best = useful_batch(found, 128, noise, 32)  # 256 fits but is above the largest: not a candidate
    assert size == max(scores, key=scores.get) == 64 and best == pytest.approx(scores[64])
    assert scores[64] > 1.05 * scores[32]  # a clear win, not a tie
    # goodputs within 10% of the highest are tied, and the largest of them is taken
    tied = probes((64, 30_000), (128, 30_000 * 0.92 * 178 / 114))  # goodput 92% of 64's
    assert useful_batch(tied, 128, replace(noise, value=50.0, tokens_per_s=None), 32)[0] == 128
    behind = probes((64, 30_000), (128, 30_000 * 0.88 * 178 / 114))  # 88%: a real loss
    assert useful_batch(behind, 128, replace(noise, value=50.0, tokens_per_s=None), 32)[0] == 64
    # tokens/s enter as their non-decreasing trend: a probe reading below a smaller one is noise
    dip = probes((64, 30_000), (128, 20_000))
    assert useful_batch(dip, 128, replace(noise, value=10_000.0, tokens_per_s=None), 32)[0] == 128
    assert useful_batch(dip, 128, replace(noise, value=10_000.0, tokens_per_s=None), 32)[1] == pytest.approx(
        goodput(25_000, 128, 10_000.0, 32))
    # a large noise scale makes rows nearly free: the largest wins
    assert useful_batch(found, 256, replace(noise, value=10_000.0), 32)[0] == 256
    # a tiny one makes them nearly worthless: the smallest wins
    assert useful_batch(found, 256, replace(noise, value=1.0), 32)[0] == 8
    # the warm-up's batch, with tokens/s of its own, is a candidate too
    assert useful_batch(probes((8, 1_000), (64, 1_000)), 256, replace(noise, value=1.0), 32)[0] == 32
    assert useful_batch(found, 256, replace(noise, value=None), 32) == (None, None)
    assert useful_batch(found + [Probe(512, "budget", tokens_per_s=1e9)], 512, noise, 32)[0] == 64  # too big


def test_the_answer_line_says_the_useful_batch_and_where_its_noise_was_measured():
    found = Frontier(25, 184, 168, 147.2, 45_000.0, 500.0, probes=10, budget_mb=150.0, useful_batch_size=136,
                     critical_batch_size=91, goodput=23_161.0, noise_measured="after 20 s of training at batch 32")
    assert found.answer().startswith("k=25: largest 184, recommended 168, useful 136 (goodput 23,161 tokens/s; "
                                     "critical batch ≈ 91 streams, its noise scale after 20 s of training at batch 32)")
    unknown = replace(found, useful_batch_size=None, noise_measured="the warm-up at batch 32 ended without one: oom")
    assert "useful unknown (the warm-up at batch 32 ended without one: oom)" in unknown.answer()


def test_the_noise_scale_comes_from_a_run_of_yours_converted_by_tokens_at_another_k(tmp_path):
    from mlflow import MlflowClient

    from tbptt_exp.app.jobs import noise_from_run
    from tbptt_exp.app.settings import BatchFinderConfig, TrackingConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingConfig(uri=uri)
    experiment = lambda run_id, k=50: RunConfig(
        k=k, tracking=tracking, batch_finder=BatchFinderConfig(noise_from=run_id))
    assert noise_from_run(RunConfig()) is None
    with pytest.raises(ConfigError, match="^batch_finder.noise_from='nope' is not allowed: no such run"):
        noise_from_run(experiment("nope"))
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("runs")).info.run_id
    client.log_param(run, "k", "25")
    client.log_param(run, "batch_size", "32")
    with pytest.raises(ConfigError, match="logged no optim/gradient_noise_scale"):
        noise_from_run(experiment(run))
    for epoch, value in ((1, 40.0), (3, 90.0), (2, 60.0)):
        client.log_metric(run, "optim/gradient_noise_scale", value, step=epoch)
    found = noise_from_run(experiment(run))  # the last epoch's, in streams of k=50: half the k=25 streams
    assert found.value == pytest.approx(45.0) and found.batch_size == 32 and found.tokens_per_s is None
    assert found.where.startswith(f"from run {run[:8]} at epoch 3 (batch 32, k=25, 90.0 streams converted by tokens")
    assert noise_from_run(experiment(run, k=25)).value == pytest.approx(90.0)
    with pytest.raises(ConfigError, match="tracking is off"):
        noise_from_run(replace(experiment(run), tracking=TrackingConfig(enabled=False)))
