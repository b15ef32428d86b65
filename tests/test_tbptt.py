"""Proofs that the stateful model and the engines do TBPTT exactly.

Each test compares against an independent reference (a non-stateful model on the whole
sequence, a fresh model, a batch without the dummy rows, the other engine) so that it
fails if carry, reset, truncation or weighting broke.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tbptt_exp.core.config import (
    DataTask,
    EngineConfig,
    ExperimentConfig,
    KeyRecallDataConfig,
    ModelConfig,
    SeriesDataConfig,
    TrainerConfig,
    seed_model,
)
from tbptt_exp.core.dataset import ModelIO
from tbptt_exp.core.engines import ENGINES
from tbptt_exp.core.layout import Corpus, build_layout
from tbptt_exp.core.model import Head, build_model, get_states, make_optimizer, reset_rows, stateful_layers
from tbptt_exp.core.train import train

V, B, K = 13, 4, 5
SMALL = ModelConfig(embedding_dim=8, units=16, layers=2, dropout=0.0)


def tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(1, V, size=shape).astype("int32")


def chunked_forward(model, x, k, reset_between=False):
    outs = []
    for start in range(0, x.shape[1], k):
        if reset_between:
            for layer in stateful_layers(model):
                layer.reset_state()
        outs.append(np.asarray(model(x[:, start : start + k], training=False)))
    return np.concatenate(outs, axis=1)


def assert_chunked_equals_full(stateful, full, x, k):
    """``stateful`` fed ``x`` in chunks of ``k`` (state carried) gives what ``full`` (the same
    weights, no state) gives on the whole sequence; without the carry it does not, so the
    comparison is sharp."""
    full.set_weights(stateful.get_weights())
    expected = np.asarray(full(x, training=False))
    np.testing.assert_allclose(chunked_forward(stateful, x, k), expected, atol=1e-5)
    no_carry = chunked_forward(stateful, x, k, reset_between=True)
    assert not np.allclose(no_carry[:, k:], expected[:, k:], atol=1e-3)


def test_chunked_stateful_forward_equals_full_sequence_forward():
    keras.utils.set_random_seed(0)
    stateful = build_model(SMALL, V, B, K)
    assert_chunked_equals_full(stateful, build_model(SMALL, V, B, None, stateful=False), tokens((B, 4 * K)), K)


def test_final_state_after_chunks_equals_full_sequence_state():
    keras.utils.set_random_seed(1)
    cfg = dataclasses.replace(SMALL, layers=1)
    stateful = build_model(cfg, V, B, K)
    x = tokens((B, 3 * K), seed=1)
    chunked_forward(stateful, x, K)
    h, c = get_states(stateful_layers(stateful))

    lstm = stateful.get_layer("lstm_0")
    reference = keras.layers.LSTM.from_config(
        lstm.get_config() | {"stateful": False, "return_state": True, "return_sequences": False}
    )
    embedded = stateful.layers[1](x)
    reference.build(embedded.shape)
    reference.set_weights(lstm.get_weights())
    _, h_ref, c_ref = reference(embedded)
    np.testing.assert_allclose(h, h_ref, atol=1e-5)
    np.testing.assert_allclose(c, c_ref, atol=1e-5)


def test_per_row_reset_makes_a_fresh_stream_and_leaves_other_rows_bit_identical():
    keras.utils.set_random_seed(2)
    model = build_model(SMALL, V, B, K)
    fresh = build_model(SMALL, V, B, K)
    fresh.set_weights(model.get_weights())
    a, b = tokens((B, K), seed=2), tokens((B, K), seed=3)
    model(a, training=False)
    layers = stateful_layers(model)
    before = get_states(layers)

    reset = np.array([False, True, False, False])
    reset_rows(layers, tf.constant(reset))
    after = get_states(layers)
    for old, new in zip(before, after):
        assert np.array_equal(old[~reset], new[~reset])  # bit-identical
        assert np.all(new[reset] == 0) and np.any(old[reset] != 0)

    out = np.asarray(model(b, training=False))
    out_fresh = np.asarray(fresh(b, training=False))
    np.testing.assert_allclose(out[1], out_fresh[1], atol=1e-6)
    assert not np.allclose(out[0], out_fresh[0], atol=1e-3)  # row 0 still carries chunk a


def test_gradients_stop_at_chunk_boundaries():
    """The gradient on chunk 2 is that of chunk 2 alone from a constant carried state."""
    keras.utils.set_random_seed(3)
    cfg = dataclasses.replace(SMALL, layers=1)
    model = build_model(cfg, V, B, K)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = tokens((B, 2 * K), seed=4), tokens((B, 2 * K), seed=5)

    model(x[:, :K], training=False)  # chunk 1 sets the state
    h0, c0 = [tf.constant(s) for s in get_states(stateful_layers(model))]
    with tf.GradientTape() as tape:
        loss = loss_fn(y[:, K:], model(x[:, K:], training=True))
    grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]

    # Reference: a non-stateful copy fed chunk 2 with the carried state as a constant.
    lstm = model.get_layer("lstm_0")
    ref = keras.layers.LSTM.from_config(lstm.get_config() | {"stateful": False})
    embedding, dense = model.layers[1], model.get_layer("head")

    def chunk2_loss():
        emb = embedding(x[:, K:])
        return loss_fn(y[:, K:], dense(ref(emb, initial_state=[h0, c0])))

    ref.build(embedding(x[:, K:]).shape)
    ref.set_weights(lstm.get_weights())
    variables = [embedding.embeddings, *ref.trainable_weights, *dense.trainable_weights]
    with tf.GradientTape() as tape:
        ref_loss = chunk2_loss()
    ref_grads = [tf.convert_to_tensor(g) for g in tape.gradient(ref_loss, variables)]
    by_name = dict(zip([v.path for v in model.trainable_variables], grads))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(by_name[embedding.embeddings.path], ref_grads[0], atol=1e-6)
    for g, r in zip([by_name[w.path] for w in lstm.trainable_weights], ref_grads[1:4]):
        np.testing.assert_allclose(g, r, atol=1e-6)

    # Full BPTT over both chunks gives a different gradient: the truncation is real.
    full = build_model(cfg, V, B, None, stateful=False)
    full.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        pred = full(x, training=True)
        full_loss = loss_fn(y[:, K:], pred[:, K:])
    full_grads = [tf.convert_to_tensor(g) for g in tape.gradient(full_loss, full.trainable_variables)]
    assert not np.allclose(full_grads[0], grads[0], atol=1e-6)


def variable_corpus(n, seed, lo=3, hi=4 * K):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, size=n)
    return Corpus(
        [rng.integers(1, V, size=m).astype("int32") for m in lengths],
        [rng.integers(1, V, size=m).astype("int32") for m in lengths],
    )


def make_engine(name, batch_size, trainer=None, model_cfg=SMALL, seed=0):
    trainer = trainer or TrainerConfig(learning_rate=0.01)
    keras.utils.set_random_seed(seed)
    model = build_model(model_cfg, V, batch_size, K, precision=trainer.precision)
    from_logits = not model_cfg.softmax_output
    return ENGINES[name](model, trainer, from_logits=from_logits, optimizer=make_optimizer(trainer))


@pytest.mark.parametrize("engine", ["graph", "keras_fit"])
def test_dummy_rows_change_neither_loss_nor_gradients(engine):
    """3 sequences with B=4 (one dummy row) train exactly like the same 3 with B=3."""
    corpus = variable_corpus(3, seed=6)
    with_dummy = make_engine(engine, 4)
    without = make_engine(engine, 3)
    without.model.set_weights(with_dummy.model.get_weights())
    lay4 = build_layout(corpus, K, 4, "dummy")
    lay3 = build_layout(corpus, K, 3, "dummy")
    assert lay4.dummy_rows == 1 and lay3.dummy_rows == 0 and lay4.padded_tokens > lay3.padded_tokens

    loss4 = with_dummy.train_epoch(lay4).loss
    loss3 = without.train_epoch(lay3).loss
    np.testing.assert_allclose(loss4, loss3, rtol=1e-5)
    for w4, w3 in zip(with_dummy.model.get_weights(), without.model.get_weights()):
        np.testing.assert_allclose(w4, w3, atol=1e-5)


def test_padded_steps_would_change_gradients_with_keras_default_reduction():
    """The guard above is sharp: Keras's default loss reduction lets padding dilute."""
    corpus = variable_corpus(3, seed=6)
    lay4, lay3 = build_layout(corpus, K, 4, "dummy"), build_layout(corpus, K, 3, "dummy")
    results = []
    for lay, b in ((lay4, 4), (lay3, 3)):
        keras.utils.set_random_seed(0)
        model = build_model(SMALL, V, b, K)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        if results:
            model.set_weights(results[0][1])
        start = [w.copy() for w in model.get_weights()]
        model.fit(lay.inputs.reshape(-1, K), lay.targets.reshape(-1, K), sample_weight=lay.sample_weights.reshape(-1, K),
                  batch_size=b, shuffle=False, verbose=0, epochs=1)
        results.append((model.get_weights(), start))
    assert not all(np.allclose(a, b, atol=1e-5) for a, b in zip(results[0][0], results[1][0]))


def test_steps_per_execution_gives_the_same_losses_and_weights():
    corpus = variable_corpus(9, seed=7)
    lay = build_layout(corpus, K, B, "pack")
    assert lay.n_batches % 3 != 0  # the last execution is a partial one
    one = make_engine("graph", B, TrainerConfig(learning_rate=0.01, steps_per_execution=1))
    three = make_engine("graph", B, TrainerConfig(learning_rate=0.01, steps_per_execution=3))
    three.model.set_weights(one.model.get_weights())
    np.testing.assert_allclose(one.train_epoch(lay).loss, three.train_epoch(lay).loss, rtol=1e-6)
    np.testing.assert_allclose(one.evaluate(lay), three.evaluate(lay), rtol=1e-6)
    for a, b in zip(one.model.get_weights(), three.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_validation_leaves_the_training_state_as_it_was():
    engine = make_engine("graph", B)
    lay = build_layout(variable_corpus(8, seed=8), K, B, "pack")
    engine.train_epoch(lay)
    before = get_states(engine.layers)
    engine.evaluate(build_layout(variable_corpus(5, seed=9), K, B, "dummy"))
    for a, b in zip(before, get_states(engine.layers)):
        assert np.array_equal(a, b)


def test_pack_resets_each_row_where_its_sequence_starts():
    """Per-sequence losses under pack equal those of each sequence evaluated alone."""
    corpus = variable_corpus(9, seed=10)
    engine = make_engine("graph", B)
    packed = engine.evaluate(build_layout(corpus, K, B, "pack"))
    alone = [engine.evaluate(build_layout(Corpus([x], [y]), K, B, "dummy"))
             for x, y in zip(corpus.inputs, corpus.targets)]
    expected = np.average(alone, weights=corpus.lengths)
    np.testing.assert_allclose(packed, expected, rtol=1e-5)
    never = engine.evaluate(build_layout(corpus, K, B, "pack", reset="never"))
    assert abs(never - expected) > 1e-4  # carrying across sequences would show


def small_experiment(**overrides):
    data = KeyRecallDataConfig(num_sequences=24, sequence_length=3 * K, val_fraction=0.25)
    base = ExperimentConfig(
        k=K, batch_size=B, data=data, model=SMALL,
        trainer=TrainerConfig(epochs=2, learning_rate=0.01),
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize("model", [SMALL, dataclasses.replace(seed_model(), embedding_dim=8, units=16)],
                         ids=["default", "seed"])
def test_graph_and_keras_fit_engines_give_the_same_losses(model):
    results = {
        name: train(small_experiment(engine=EngineConfig(name), model=model))
        for name in ("graph", "keras_fit")
    }
    for a, b in zip(results["graph"].epochs, results["keras_fit"].epochs):
        np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-4)
        np.testing.assert_allclose(a.val_loss, b.val_loss, rtol=1e-4)


def test_run_reports_measurements():
    # 128 units: the oneDNN CPU allocator counts no tensor under 4 KB, so at 16 or 64 units
    # the peak reads 0.0 and is reported unknown (None), whatever ran before in the process
    result = train(small_experiment(padding="pack", model=dataclasses.replace(SMALL, units=128)))
    assert len(result.epochs) == 2
    for m in result.epochs:
        assert m.padded_tokens_per_s >= m.tokens_per_s > 0  # all timesteps, padding included
        assert m.peak_memory_mb > 0 and m.peak_rss_mb > 0  # a CPU peak is known
        assert m.epoch_time_s >= m.first_execution_s > 0
        assert m.val_bits_per_char is None  # not a text corpus
    assert result.compile_time_s == result.epochs[0].first_execution_s
    assert 0 <= result.padding_waste < 1
    assert result.real_tokens_per_epoch == 18 * 3 * K
    assert result.objective("val_loss") == result.final.val_loss


def test_peak_memory_grows_with_batch_size():
    data = KeyRecallDataConfig(num_sequences=256, sequence_length=50, num_noise_tokens=200)
    peaks = [
        train(ExperimentConfig(
            k=25, batch_size=b, data=data, model=ModelConfig(embedding_dim=32, units=128),
            trainer=TrainerConfig(epochs=1),
        )).final.peak_memory_mb
        for b in (32, 128)
    ]
    assert 0 < peaks[0] < peaks[1] / 2  # activations grow with the batch


def test_key_recall_needs_state_carried_across_chunks():
    """Only a model that carries the key across chunks can predict later targets."""
    data = KeyRecallDataConfig(num_sequences=256, sequence_length=4 * 10, num_keys=4)
    cfg = ExperimentConfig(
        k=10, batch_size=32, data=data,
        model=ModelConfig(embedding_dim=16, units=32),
        trainer=TrainerConfig(epochs=12, learning_rate=0.01),
    )
    carried = train(cfg).final.val_loss
    no_carry = train(dataclasses.replace(cfg, reset="chunk")).final.val_loss
    # No carry: 3 of 4 chunks cannot see the key, so loss >= 3/4 log(4) ~ 1.04 nats.
    assert no_carry > 0.9
    assert carried < 0.3 and carried < no_carry / 3


def test_streams_carry_the_key_in_training_and_in_evaluation():
    """With padding=stream each row is one stream for the whole epoch: the key opening a
    sequence is carried across its chunks in training and in the streamed validation."""
    data = KeyRecallDataConfig(num_sequences=256, sequence_length=4 * 10, num_keys=4)
    cfg = ExperimentConfig(
        k=10, batch_size=32, padding="stream", data=data,
        model=ModelConfig(embedding_dim=16, units=32),
        trainer=TrainerConfig(epochs=12, learning_rate=0.01),
    )
    carried = train(cfg).final.val_loss
    no_carry = train(dataclasses.replace(cfg, reset="chunk")).final.val_loss
    assert no_carry > 0.9  # 3 of 4 chunks cannot see the key: >= 3/4 log(4)
    assert carried < 0.3 and carried < no_carry / 3


def test_the_schema_lists_exactly_the_engines_that_exist():
    from tbptt_exp.core import config

    assert set(config.EngineName) == set(ENGINES)


# --- float features: the same proofs for numeric sequences ------------------------------------------

F = 3  # features per step
FEATURES_IO = ModelIO(DataTask.classification, 4, num_features=F)
REGRESSION_IO = ModelIO(DataTask.regression, 2, num_features=F)


def features(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(*shape, F)).astype("float32")


@pytest.mark.parametrize("io", [FEATURES_IO, REGRESSION_IO], ids=["classes", "values"])
def test_chunked_forward_equals_the_full_sequence_for_float_features(io):
    keras.utils.set_random_seed(0)
    stateful = build_model(SMALL, io, B, K)
    assert_chunked_equals_full(stateful, build_model(SMALL, io, B, None, stateful=False), features((B, 4 * K)), K)


def test_per_row_reset_is_bit_identical_for_float_features():
    keras.utils.set_random_seed(2)
    model, fresh = build_model(SMALL, FEATURES_IO, B, K), build_model(SMALL, FEATURES_IO, B, K)
    fresh.set_weights(model.get_weights())
    model(features((B, K), seed=2), training=False)
    layers = stateful_layers(model)
    before = get_states(layers)
    reset = np.array([False, True, False, True])
    reset_rows(layers, tf.constant(reset))
    for old, new in zip(before, get_states(layers)):
        assert np.array_equal(old[~reset], new[~reset]) and np.all(new[reset] == 0)
    b = features((B, K), seed=3)
    out, out_fresh = np.asarray(model(b, training=False)), np.asarray(fresh(b, training=False))
    np.testing.assert_allclose(out[reset], out_fresh[reset], atol=1e-6)
    assert not np.allclose(out[~reset], out_fresh[~reset], atol=1e-3)


def feature_corpus(n, seed, io):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 4 * K, size=n)
    targets = [rng.integers(0, io.num_outputs, m).astype("int32") if io.task == DataTask.classification
               else rng.normal(size=(m, io.num_outputs)).astype("float32") for m in lengths]
    return Corpus([rng.normal(size=(m, F)).astype("float32") for m in lengths], targets)


@pytest.mark.parametrize("io", [FEATURES_IO, REGRESSION_IO], ids=["classes", "values"])
@pytest.mark.parametrize("padding", ["dummy", "pack", "stream"])
def test_every_layout_of_float_features_equals_each_sequence_alone(io, padding):
    """State carried within a sequence and reset exactly at its start, padding weighing nothing:
    the loss over a layout equals the weighted mean of each sequence (or stream piece) alone."""
    keras.utils.set_random_seed(4)
    engine = ENGINES["graph"](build_model(SMALL, io, B, K), TrainerConfig(learning_rate=0.01), head=Head(io),
                              optimizer=make_optimizer(TrainerConfig()))
    corpus = feature_corpus(9, seed=10, io=io)
    lay = build_layout(corpus, K, B, padding)
    pieces = lay.sequences  # stream cuts sequences where rows end; each piece starts from zero state
    alone = [engine.evaluate(build_layout(Corpus([x], [y]), K, B, "dummy")) for x, y in zip(pieces.inputs, pieces.targets)]
    np.testing.assert_allclose(engine.evaluate(lay), np.average(alone, weights=pieces.lengths), rtol=1e-5)
    carried = engine.evaluate(build_layout(corpus, K, B, padding, reset="never"))
    assert abs(carried - np.average(alone, weights=pieces.lengths)) > 1e-4  # carrying across sequences would show


def test_the_numeric_demo_needs_state_carried_across_chunks():
    """data=series: the regime shows only through many noisy steps, so a model that starts
    every chunk from zero state (reset=chunk) is clearly worse than one that carries it."""
    data = SeriesDataConfig(num_sequences=128, sequence_length=200)
    cfg = ExperimentConfig(k=10, batch_size=32, data=data, model=ModelConfig(embedding_dim=8, units=32),
                           trainer=TrainerConfig(epochs=4, learning_rate=0.01))
    carried, no_carry = (train(dataclasses.replace(cfg, reset=r)).final.val_accuracy for r in ("sequence", "chunk"))
    assert carried > no_carry + 0.08, (carried, no_carry)
