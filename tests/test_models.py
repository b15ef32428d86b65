"""Your own model: every stateful recurrent layer Keras has carries and resets exactly as the
built-in LSTM does, a model the harness cannot train is refused in one line, and the
batch-finder cache tells models apart."""

import dataclasses
from pathlib import Path

import keras
import model_factories
import numpy as np
import pytest
import tensorflow as tf
from test_cli import cli, runs
from test_tbptt import assert_chunked_equals_full

from tbptt_exp.app.settings import RunConfig
from tbptt_exp.core.config import Cell, ConfigError, DataTask, ModelConfig, TrainerConfig
from tbptt_exp.core.dataset import ModelIO
from tbptt_exp.core.engines import ENGINES
from tbptt_exp.core.layout import Corpus, build_layout
from tbptt_exp.core.model import (
    Head,
    build_model,
    get_states,
    make_model,
    make_optimizer,
    reset_rows,
    set_states,
    stateful_layers,
)

B, K, F = 4, 5, 3
IO = ModelIO(DataTask.classification, 4, num_features=F)
KINDS = ["lstm", "gru", "simple", "cell", "lstm+gru"]  # the last: two layers of different kinds
FACTORIES = Path(__file__).with_name("model_factories.py")


def model_of(kind, stateful=True, k=K, batch=B):
    if kind == "conv":
        return model_factories.conv_lstm(batch_size=batch, k=k, vocab_size=None, num_features=F, num_outputs=4,
                                         task="classification", precision="float32", stateful=stateful)
    return model_factories.stack(batch_size=batch, k=k, vocab_size=None, num_features=F, num_outputs=4,
                                 task="classification", precision="float32", stateful=stateful, cells=kind)


def features(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(*shape, F)).astype("float32")


@pytest.mark.parametrize("kind", [*KINDS, "conv"])
def test_chunked_forward_equals_the_full_sequence(kind):
    keras.utils.set_random_seed(0)
    assert_chunked_equals_full(model_of(kind), model_of(kind, stateful=False, k=None, batch=None),
                               features((B, 4 * K)), K)


@pytest.mark.parametrize("kind", [*KINDS, "conv"])
def test_per_row_reset_makes_fresh_rows_and_leaves_the_others_bit_identical(kind):
    keras.utils.set_random_seed(2)
    model, fresh = model_of(kind), model_of(kind)
    fresh.set_weights(model.get_weights())
    model(features((B, K), seed=2), training=False)
    layers = stateful_layers(model)
    assert len(layers) == len(kind.split("+"))  # every recurrent layer found, nested in a stack or not
    before = get_states(layers)
    reset = np.array([True, False, False, True])
    tf.function(lambda r: reset_rows(layers, r))(tf.constant(reset))
    for old, new in zip(before, get_states(layers)):
        assert np.array_equal(old[~reset], new[~reset]) and np.all(new[reset] == 0) and np.any(old[reset] != 0)
    nxt = features((B, K), seed=3)
    out, out_fresh = np.asarray(model(nxt, training=False)), np.asarray(fresh(nxt, training=False))
    np.testing.assert_allclose(out[reset], out_fresh[reset], atol=1e-6)
    assert not np.allclose(out[~reset], out_fresh[~reset], atol=1e-3)


def loss_and_grads(model, x, y):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    return [np.asarray(g) for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_stop_at_chunk_boundaries(kind):
    """Chunk 2's gradient is that of chunk 2 alone from the carried state taken as a constant,
    and differs from full backpropagation through both chunks."""
    keras.utils.set_random_seed(3)
    model, alone = model_of(kind), model_of(kind)
    alone.set_weights(model.get_weights())
    x, y = features((B, 2 * K), seed=4), np.random.default_rng(5).integers(0, 4, (B, 2 * K))
    model(x[:, :K], training=False)  # chunk 1 sets the state
    set_states(stateful_layers(alone), get_states(stateful_layers(model)))
    grads = loss_and_grads(model, x[:, K:], y[:, K:])
    for g, r in zip(grads, loss_and_grads(alone, x[:, K:], y[:, K:])):
        np.testing.assert_allclose(g, r, atol=1e-6)
    full = model_of(kind, stateful=False, k=None, batch=None)
    full.set_weights(model.get_weights())
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        full_loss = loss_fn(y[:, K:], full(x, training=True)[:, K:])
    full_grads = [np.asarray(g) for g in tape.gradient(full_loss, full.trainable_variables)]
    assert any(not np.allclose(f, g, atol=1e-6) for f, g in zip(full_grads, grads))  # the truncation is real


def engine_for(kind, batch_size):
    keras.utils.set_random_seed(0)
    trainer = TrainerConfig(learning_rate=0.01)
    return ENGINES["graph"](model_of(kind, batch=batch_size), trainer, head=Head(IO), optimizer=make_optimizer(trainer))


@pytest.mark.parametrize("kind", KINDS)
def test_dummy_rows_change_neither_loss_nor_weights(kind):
    """3 sequences with B=4 (one dummy row) train exactly like the same 3 with B=3."""
    rng = np.random.default_rng(6)
    lengths = rng.integers(3, 4 * K, 3)
    corpus = Corpus([rng.normal(size=(n, F)).astype("float32") for n in lengths],
                    [rng.integers(0, 4, n).astype("int32") for n in lengths])
    with_dummy, without = engine_for(kind, 4), engine_for(kind, 3)
    without.model.set_weights(with_dummy.model.get_weights())
    np.testing.assert_allclose(with_dummy.train_epoch(build_layout(corpus, K, 4, "dummy")).loss,
                               without.train_epoch(build_layout(corpus, K, 3, "dummy")).loss, rtol=1e-5)
    for a, b in zip(with_dummy.model.get_weights(), without.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_built_in_stack_takes_a_gru_cell():
    model = build_model(ModelConfig(units=8, layers=2, cell=Cell.gru), IO, B, K)
    layers = stateful_layers(model)
    assert [type(layer).__name__ for layer in layers] == ["GRU", "GRU"]
    assert [len(layer.states) for layer in layers] == [1, 1]  # a GRU keeps one state per row, an LSTM two
    assert [len(layer.states) for layer in stateful_layers(build_model(ModelConfig(units=8), IO, B, K))] == [2]


def custom(name, **params):
    return ModelConfig(preset="custom", factory=f"{FACTORIES}:{name}", params=params)


@pytest.mark.parametrize("name, says", [
    ("no_recurrence", "has no recurrent layer"),
    ("not_stateful", "is not stateful: build it with stateful=True"),
    ("bidirectional", "is bidirectional: its backward pass needs the whole sequence"),
    ("wrong_output", "its output shape is (4, 4)"),
    ("wrong_batch", "its input shape is (8, 5, 3)"),
    ("hidden_state", "keeps a state per row that the harness cannot reset"),
    ("raises", "raised RuntimeError: the team's model is not finished"),
    ("missing", "cannot be loaded (AttributeError"),
])
def test_a_model_the_harness_cannot_train_is_refused_in_one_line(name, says):
    with pytest.raises(ConfigError) as refused:
        make_model(custom(name), IO, B, K)
    assert refused.value.setting == "model.factory" and says in str(refused.value) and "\n" not in str(refused.value)


def test_the_cache_tells_factories_and_their_arguments_apart(tmp_path):
    from tbptt_exp.app.batch.finder import fingerprint

    device = {"device": "CPU:0", "device_name": "CPU", "device_memory_mb": "1"}

    def key(model):
        return fingerprint(RunConfig(model=model), device, "2.21.0")

    keys = {key(ModelConfig()), key(custom("stack")), key(custom("stack", units=32)), key(custom("conv_lstm")),
            key(custom("stack", cells="gru"))}
    assert len(keys) == 5
    mine = tmp_path / "mine.py"
    mine.write_text(FACTORIES.read_text())
    spec = ModelConfig(preset="custom", factory=f"{mine}:stack")
    before = key(spec)
    mine.write_text(FACTORIES.read_text().replace("units=16", "units=17"))  # the model's code changed
    assert key(spec) != before


TINY = ["data=series", "data.num_sequences=32", "data.sequence_length=40", "k=10", "batch_size=8",
        "trainer.epochs=1"]


# Every refusal's words are make_model's (the test above); the command is run on one model
# refused as it loads and one refused once built, the two places a refusal comes from.
REFUSED = [("hidden_state", "cannot reset"), ("missing", "cannot be loaded")]


@pytest.mark.parametrize("name, says", REFUSED)
def test_a_refused_model_stops_the_command_in_one_line_with_no_run(tmp_path, name, says):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    out = cli([*TINY, "model=custom", f"model.factory={FACTORIES}:{name}", f"tracking.uri={store}"], cwd=tmp_path,
              timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("tbptt-exp: error: model.factory=") and says in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "epoch 1/1" not in out.stdout
    assert runs(store) == []


@pytest.mark.slow
def test_the_example_factory_trains_sweeps_and_is_sized(tmp_path):
    """model=custom (GRU + layer norm): a grid over one of its arguments, recorded as params
    with the model's summary; a study that tunes it; then the largest batch, probed at two sizes."""
    store = f"sqlite:///{tmp_path / 'm.db'}"
    out = cli(["-m", *TINY, "model=custom", "model.params.units=8,16", "model.params.layers=1",
               f"tracking.uri={store}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(store)
    children = [r for r in runs(store) if r.data.tags.get("tbptt_exp.kind") == "experiment"]
    assert sorted(r.data.params["model.params.units"] for r in children) == ["16", "8"]
    assert all(r.data.params["model.factory"] == "tbptt_exp.core.factories:gru_layer_norm" for r in children)
    assert not [p for r in children for p in r.data.params if p in ("model.units", "model.cell")]  # not read
    summary = Path(client.download_artifacts(children[0].info.run_id, "model_summary.txt", str(tmp_path))).read_text()
    assert "GRU" in summary and "LayerNormalization" in summary
    assert children[0].data.metrics["model/num_params"] > 0
    study = cli(["-m", *TINY, "model=custom", "model.params.layers=1", "hydra/sweeper=optuna",
                 "hydra.sweeper.study_name=mine", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
                 "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler=grid", "model.params.units=choice(8, 12)",
                 f"tracking.uri={store}"], cwd=tmp_path)
    assert study.returncode == 0, study.stderr[-3000:]
    import optuna

    trials = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert sorted(t.params["model.params.units"] for t in trials) == [8, 12]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    sized = cli([*TINY, "task=max_batch", "model=custom", "model.params.units=8", "batch_finder.max_batch_size=16",
                 "batch_finder.probe_seconds=0.5", f"batch_finder.cache_dir={tmp_path / 'cache'}",
                 f"tracking.uri={store}"], cwd=tmp_path)
    assert sized.returncode == 0, sized.stderr[-3000:]
    assert "k=10 batch_size=8: ok" in sized.stdout and "k=10 batch_size=16: ok" in sized.stdout
    assert "k=10: largest 16 (every probe fitted" in sized.stdout  # the range's ceiling, said so


def test_keras_fit_and_mixed_precision_train_a_model_of_your_own():
    from tbptt_exp.core.config import EngineConfig, KeyRecallDataConfig
    from tbptt_exp.core.train import train

    base = RunConfig(k=5, batch_size=8, data=KeyRecallDataConfig(num_sequences=32, sequence_length=20),
                            model=custom("stack", cells="gru+lstm"), trainer=TrainerConfig(epochs=1))
    for cfg in (dataclasses.replace(base, engine=EngineConfig("keras_fit")),
                dataclasses.replace(base, trainer=TrainerConfig(epochs=1, precision="mixed_bfloat16"))):
        result = train(cfg)
        assert np.isfinite(result.final.val_loss) and result.final.val_accuracy is not None and not result.unroll


@pytest.mark.parametrize("cell", [Cell.lstm, Cell.gru])
@pytest.mark.parametrize("io", [ModelIO(DataTask.classification, 30, vocab_size=30),
                                ModelIO(DataTask.regression, 2, num_features=5)], ids=["tokens", "features"])
def test_the_parameter_count_known_before_building_is_the_one_keras_counts(cell, io):
    """What the size check reads (``ModelConfig.num_params``) against the model as built."""
    cfg = ModelConfig(units=12, layers=2, embedding_dim=7, cell=cell)
    assert cfg.num_params(io) == build_model(cfg, io, batch_size=4, k=3).count_params()
    assert dataclasses.replace(cfg, factory="m:f").num_params(io) is None  # a model of your own: known once built
