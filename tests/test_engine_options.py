"""The engine's speed options keep TBPTT exact: ``model.unroll``, ``trainer.precision`` and
the per-row resets that skip batches where no row resets.

Each proof of ``test_tbptt.py`` that an option could break runs again here with the
option on, against the same independent references.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_tbptt import SMALL, B, K, V, chunked_forward, make_engine, small_experiment, tokens, variable_corpus

from tbptt_exp.core.config import EngineConfig, TrainerConfig
from tbptt_exp.core.layout import build_layout
from tbptt_exp.core.model import build_model, get_states, make_optimizer, reset_rows, resolve_unroll, stateful_layers
from tbptt_exp.core.train import train

# Tolerances against a float32 reference: bfloat16 keeps 8 significant bits, float16 11.
PRECISIONS = {"float32": 1e-5, "mixed_bfloat16": 5e-2, "mixed_float16": 5e-3}


def test_auto_keeps_the_symbolic_loop_and_true_unrolls():
    assert resolve_unroll("auto") is False and resolve_unroll(False) is False
    assert resolve_unroll(True) is True
    model = build_model(SMALL, V, B, K, unroll=True)
    assert all(layer.unroll for layer in stateful_layers(model))


@pytest.mark.parametrize("unroll, precision", [(True, "float32"), (False, "mixed_bfloat16"),
                                               (False, "mixed_float16"), (True, "mixed_bfloat16")])
def test_chunked_forward_equals_the_full_sequence_with_each_option(unroll, precision):
    """The state carried between chunks is exact: chunk by chunk equals one pass over the
    whole sequence computed at the same precision."""
    keras.utils.set_random_seed(0)
    stateful = build_model(SMALL, V, B, K, unroll=unroll, precision=precision)
    full = build_model(SMALL, V, B, None, stateful=False, precision=precision)
    full.set_weights(stateful.get_weights())
    x = tokens((B, 4 * K))

    expected = np.asarray(full(x, training=False))
    scale = np.abs(expected).max()  # an untrained model's logits are small: compare relative to them
    got = chunked_forward(stateful, x, K)
    # Tighter than one 16-bit rounding (bfloat16: 4e-3): a carried state rounded on its way
    # to the next chunk would show.
    assert np.abs(got - expected).max() / scale < 1e-4
    no_carry = chunked_forward(stateful, x, K, reset_between=True)
    assert np.abs(no_carry[:, K:] - expected[:, K:]).max() / scale > 0.1  # the comparison is sharp


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_state_weights_and_output_in_float32(precision):
    model = build_model(SMALL, V, B, K, precision=precision)
    lstm = model.get_layer("lstm_0")
    assert lstm.compute_dtype == precision.removeprefix("mixed_")
    assert all(state.dtype == "float32" for layer in stateful_layers(model) for state in layer.states)
    assert all(w.dtype == "float32" for w in model.weights)
    assert model(tokens((B, K)), training=False).dtype == "float32"  # logits and loss in float32


def test_float16_scales_the_loss_and_bfloat16_does_not():
    assert isinstance(make_optimizer(TrainerConfig(precision="mixed_float16")), keras.optimizers.LossScaleOptimizer)
    for precision in ("float32", "mixed_bfloat16"):
        assert not isinstance(make_optimizer(TrainerConfig(precision=precision)), keras.optimizers.LossScaleOptimizer)


def test_loss_scaling_is_undone_before_the_update():
    """One float16 step moves the weights as float32 does: the scaled gradient is unscaled."""
    corpus = variable_corpus(4, seed=11)
    lay = build_layout(corpus, K, B, "dummy")
    moves = {}
    for precision in ("float32", "mixed_float16"):
        engine = make_engine("graph", B, TrainerConfig(learning_rate=0.01, optimizer="sgd", precision=precision), seed=4)
        before = [w.copy() for w in engine.model.get_weights()]
        engine.train_epoch(lay)
        moves[precision] = [a - b for a, b in zip(engine.model.get_weights(), before)]
        if precision == "mixed_float16":
            assert float(engine.model.optimizer.dynamic_scale) > 1  # a scale was in use
    for a, b in zip(moves["float32"], moves["mixed_float16"]):
        np.testing.assert_allclose(b, a, atol=1e-3 * max(1e-3, np.abs(a).max()) + 1e-5)
    assert max(np.abs(m).max() for m in moves["mixed_float16"]) > 1e-4  # it did move


@pytest.mark.parametrize("unroll", [False, True])
def test_gradients_stop_at_chunk_boundaries_when_unrolled(unroll):
    """An unrolled chunk's gradient equals that of the chunk alone from a constant state."""
    keras.utils.set_random_seed(3)
    cfg = dataclasses.replace(SMALL, layers=1)
    model = build_model(cfg, V, B, K, unroll=unroll)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = tokens((B, 2 * K), seed=4), tokens((B, 2 * K), seed=5)
    model(x[:, :K], training=False)
    state = [tf.constant(s) for s in get_states(stateful_layers(model))]
    with tf.GradientTape() as tape:
        loss = loss_fn(y[:, K:], model(x[:, K:], training=True))
    grads = tape.gradient(loss, model.trainable_variables)

    alone = build_model(cfg, V, B, K, unroll=False)
    alone.set_weights(model.get_weights())
    for variable, value in zip(stateful_layers(alone)[0].states, state):
        variable.assign(value)
    with tf.GradientTape() as tape:
        ref = loss_fn(y[:, K:], alone(x[:, K:], training=True))
    ref_grads = tape.gradient(ref, alone.trainable_variables)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(g), tf.convert_to_tensor(r), atol=1e-6)

    full = build_model(cfg, V, B, None, stateful=False)  # the truncation is real
    full.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        full_loss = loss_fn(y[:, K:], full(x, training=True)[:, K:])
    full_grad = tf.convert_to_tensor(tape.gradient(full_loss, full.trainable_variables)[0])
    assert not np.allclose(full_grad, tf.convert_to_tensor(grads[0]), atol=1e-6)


def test_in_graph_reset_skips_batches_without_resets_and_zeroes_exactly_the_reset_rows():
    model = build_model(SMALL, V, B, K)
    model(tokens((B, K)), training=False)
    layers = stateful_layers(model)
    apply = tf.function(lambda reset: reset_rows(layers, reset))
    before = get_states(layers)

    apply(tf.constant([False] * B))
    for old, new in zip(before, get_states(layers)):
        assert np.array_equal(old, new)  # bit-identical: no row reset, nothing written
    reset = np.array([False, False, True, False])
    apply(tf.constant(reset))
    for old, new in zip(before, get_states(layers)):
        assert np.all(new[reset] == 0) and np.any(old[reset] != 0)
        assert np.array_equal(old[~reset], new[~reset])


@pytest.mark.parametrize("engine", ["graph", "keras_fit"])
def test_losses_with_unroll_equal_losses_without(engine):
    results = [train(small_experiment(engine=EngineConfig(engine), model=dataclasses.replace(SMALL, unroll=u)))
               for u in (False, True)]
    assert results[1].unroll and not results[0].unroll
    for a, b in zip(results[0].epochs, results[1].epochs):
        np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=1e-5)
        np.testing.assert_allclose(b.val_loss, a.val_loss, rtol=1e-5)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("engine", ["graph", "keras_fit"])
def test_mixed_precision_trains_to_the_float32_losses(engine, precision):
    runs = {p: train(small_experiment(engine=EngineConfig(engine), padding="dummy",
                                      trainer=TrainerConfig(epochs=2, learning_rate=0.01, precision=p)))
            for p in ("float32", precision)}
    for a, b in zip(runs["float32"].epochs, runs[precision].epochs):
        assert np.isfinite(b.train_loss) and np.isfinite(b.val_loss)
        np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=PRECISIONS[precision])
        np.testing.assert_allclose(b.val_loss, a.val_loss, rtol=PRECISIONS[precision])


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_dummy_rows_change_nothing_in_mixed_precision(precision):
    """3 sequences with B=4 (one dummy row) train like the same 3 with B=3, in 16 bits too."""
    corpus = variable_corpus(3, seed=6)
    trainer = TrainerConfig(learning_rate=0.01, precision=precision)
    with_dummy = make_engine("graph", 4, trainer)
    without = make_engine("graph", 3, trainer)
    without.model.set_weights(with_dummy.model.get_weights())
    loss4 = with_dummy.train_epoch(build_layout(corpus, K, 4, "dummy")).loss
    loss3 = without.train_epoch(build_layout(corpus, K, 3, "dummy")).loss
    np.testing.assert_allclose(loss4, loss3, rtol=PRECISIONS[precision])
    for w4, w3 in zip(with_dummy.model.get_weights(), without.model.get_weights()):
        np.testing.assert_allclose(w4, w3, atol=PRECISIONS[precision])
