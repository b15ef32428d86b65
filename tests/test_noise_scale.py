"""The gradient noise scale: the two-batch estimator on a model whose noise is known, the
engine's in-graph measurement against gradients taken by hand, and that measuring it
changes nothing about training."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tbptt_exp.core.config import TrainerConfig
from tbptt_exp.core.layout import build_layout
from tbptt_exp.core.model import get_states, reset_rows, set_states
from tbptt_exp.core.noise import EMA_DECAY, goodput, noise_scale, statistical_efficiency, two_batch_estimates
from tests.test_tbptt import SMALL, K, make_engine, variable_corpus


def linear_regression_gradients(rng, n, delta, sigma):
    """Per-row gradients of ½(x·w − y)² at w = w* + delta, x ~ N(0, I), y = x·w* + N(0, σ²):
    g = x (x·delta − ε). Exactly: G = delta, tr(Σ) = (d + 1)|delta|² + d σ²."""
    x = rng.standard_normal((n, delta.size))
    noise = sigma * rng.standard_normal(n)
    return x * (x @ delta - noise)[:, None]


def test_two_batch_estimator_recovers_the_known_gradient_noise_of_linear_regression():
    rng = np.random.default_rng(0)
    d, sigma, rows, draws = 8, 2.0, 64, 4000
    delta = rng.standard_normal(d) * 0.5
    true_sq = float(delta @ delta)
    true_trace = (d + 1) * true_sq + d * sigma**2
    estimates, naive = [], []
    for _ in range(draws):
        g = linear_regression_gradients(rng, rows, delta, sigma)
        first, second, whole = g[: rows // 2].mean(0), g[rows // 2:].mean(0), g.mean(0)
        small_sq = (first @ first + second @ second) / 2
        estimates.append(two_batch_estimates(small_sq, whole @ whole, 2 / rows, 1 / rows))
        naive.append(whole @ whole)
    estimates = np.array(estimates)
    means, errors = estimates.mean(0), estimates.std(0) / np.sqrt(draws)
    assert abs(means[0] - true_sq) < 4 * errors[0], (means[0], true_sq, errors[0])
    assert abs(means[1] - true_trace) < 4 * errors[1], (means[1], true_trace, errors[1])
    # the ratio of the averages is the noise scale
    assert noise_scale(*means) == pytest.approx(true_trace / true_sq, rel=0.1)
    # the test is sharp: a batch's own |g|² is off by tr(Σ)/B, far beyond the sampling error
    assert np.mean(naive) - true_sq == pytest.approx(true_trace / rows, rel=0.1)
    assert np.mean(naive) - true_sq > 10 * errors[0]


def test_noise_scale_is_unknown_until_the_gradient_rises_above_the_noise():
    assert noise_scale(0.0, 5.0) is None and noise_scale(-1.0, 5.0) is None
    assert noise_scale(2.0, 10.0) == 5.0


def test_statistical_efficiency_and_goodput_against_the_reference_batch():
    assert statistical_efficiency(32, 100, 32) == 1.0
    # far below the noise scale a larger batch is almost free; far above it, each sample is wasted
    assert statistical_efficiency(64, 10_000, 32) > 0.99
    assert statistical_efficiency(3200, 0.0, 32) == pytest.approx(0.01)
    assert goodput(1000.0, 64, 32, 32) == pytest.approx(1000.0 * 64 / 96)


def by_hand(engine, inputs, targets, weights):
    """|g_first|², |g_second|², |g|² of one batch, each half's gradient from its own tape, the
    state put back between passes (dropout is 0)."""
    model, layers = engine.model, engine.layers
    saved = get_states(layers)
    half = inputs.shape[0] // 2
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    norms = []
    for rows in (slice(0, half), slice(half, None), slice(None)):
        set_states(layers, saved)
        with tf.GradientTape() as tape:
            out = model(inputs, training=True)
            loss = tf.reduce_sum(loss_fn(targets[rows], out[rows]) * weights[rows]) / tf.reduce_sum(weights[rows])
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
        norms.append(sum(float(tf.reduce_sum(g * g)) for g in grads))
    set_states(layers, saved)
    return norms


def test_the_engine_measures_the_halves_of_its_rows_as_gradients_taken_by_hand():
    corpus = variable_corpus(8, seed=3)
    layout = build_layout(corpus, K, 4, "dummy")
    engine = make_engine("graph", 4, TrainerConfig(learning_rate=0.01, noise_scale_every=1))
    first_sq, second_sq, whole_sq = by_hand(engine, layout.inputs[0], layout.targets[0], layout.sample_weights[0])
    real = (layout.sample_weights[0].sum(axis=1) > 0)
    rows_a, rows_b = real[:2].sum(), real[2:].sum()
    assert rows_a == rows_b == 2
    want = two_batch_estimates((first_sq + second_sq) / 2, whole_sq, (1 / rows_a + 1 / rows_b) / 2, 1 / 4)
    engine._measuring_execution(*(a[:1] for a in (layout.inputs, layout.targets, layout.sample_weights, layout.reset)))
    ema_sq, ema_trace, measured = (float(v.numpy()) for v in engine._noise)
    assert measured == 1
    np.testing.assert_allclose([ema_sq, ema_trace], [(1 - EMA_DECAY) * w for w in want], rtol=1e-4)


def test_a_restarted_noise_scale_holds_only_what_was_measured_after_it():
    """The warm-up restarts the averages halfway: nothing of an earlier measurement may stay."""
    corpus = variable_corpus(8, seed=3)
    layout = build_layout(corpus, K, 4, "dummy")
    engine = make_engine("graph", 4, TrainerConfig(learning_rate=0.01, noise_scale_every=1))
    arrays = [a[:1] for a in (layout.inputs, layout.targets, layout.sample_weights, layout.reset)]
    engine._measuring_execution(*arrays)
    assert float(engine._noise[2].numpy()) == 1 and float(engine._noise[1].numpy()) != 0
    engine.restart_noise_scale()
    assert engine.gradient_noise_scale() is None and [float(v.numpy()) for v in engine._noise] == [0.0, 0.0, 0.0]
    reset_rows(engine.layers, layout.reset[0])  # as the execution starts: the chunk's rows reset
    first_sq, second_sq, whole_sq = by_hand(engine, layout.inputs[0], layout.targets[0], layout.sample_weights[0])
    want = two_batch_estimates((first_sq + second_sq) / 2, whole_sq, 1 / 2, 1 / 4)
    engine._measuring_execution(*arrays)  # at the weights the first step left
    ema_sq, ema_trace, measured = (float(v.numpy()) for v in engine._noise)
    assert measured == 1
    np.testing.assert_allclose([ema_sq, ema_trace], [(1 - EMA_DECAY) * w for w in want], rtol=1e-4)


def test_measuring_the_noise_scale_trains_exactly_as_not_measuring_it():
    """The measuring step rolls back its extra pass (state, dropout seeds): weights, loss and
    carried state end as without it, with dropout on, so the rollback is sharp."""
    corpus = variable_corpus(12, seed=5)
    layout = build_layout(corpus, K, 4, "pack")
    model = dataclasses.replace(SMALL, dropout=0.3)
    off = make_engine("graph", 4, TrainerConfig(learning_rate=0.01, noise_scale_every=0), model_cfg=model)
    on = make_engine("graph", 4, TrainerConfig(learning_rate=0.01, noise_scale_every=2), model_cfg=model)
    on.model.set_weights(off.model.get_weights())
    for engine in (off, on):
        engine.train_epoch(layout)
    assert off.gradient_noise_scale() is None and on._noise[2].numpy() == -(-layout.n_batches // 2)
    for a, b in zip(off.model.get_weights(), on.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(get_states(off.layers), get_states(on.layers)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_without_a_rollback_of_the_carried_state_training_would_differ():
    """The guard above is sharp: a measuring pass that leaves its state behind changes training."""
    corpus = variable_corpus(12, seed=5)
    layout = build_layout(corpus, K, 4, "pack")
    off = make_engine("graph", 4, TrainerConfig(learning_rate=0.01, noise_scale_every=0))
    on = make_engine("graph", 4, TrainerConfig(learning_rate=0.01, noise_scale_every=2))
    on._carried = []  # nothing rolled back
    on.model.set_weights(off.model.get_weights())
    for engine in (off, on):
        engine.train_epoch(layout)
    assert not all(np.allclose(a, b, atol=1e-4) for a, b in zip(off.model.get_weights(), on.model.get_weights()))


def test_the_classic_recipe_does_not_measure_it():
    corpus = variable_corpus(8, seed=3)
    engine = make_engine("keras_fit", 4, TrainerConfig(learning_rate=0.01))
    assert engine.train_epoch(build_layout(corpus, K, 4, "dummy")).gradient_noise_scale is None

