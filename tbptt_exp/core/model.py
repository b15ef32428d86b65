"""The Keras model: a stateful LSTM with a fixed batch size, and the head that judges it.

Stateful RNN layers keep one state per batch row in non-trainable variables
(``layer.states``). That is what carries a stream from chunk to chunk, and also why
gradients stop at chunk boundaries by themselves: the next chunk reads the state as a
variable, not as a tensor connected to the previous chunk's graph.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tbptt_exp.core.config import Cell, ConfigError, DataTask, ModelConfig, TrainerConfig
from tbptt_exp.core.dataset import ModelIO, error_figures, token_io
from tbptt_exp.core.factories import load_factory


def resolve_unroll(setting) -> bool:
    """``model.unroll`` as built. ``auto`` keeps Keras's symbolic loop everywhere:

    - on a GPU, unrolling would give up cuDNN's fused kernel;
    - on a CPU, an unrolled chunk measured 0.82-1.04x of the loop (k=25 and 50, default
      and seed models, benchmarks/RESULTS.md) and held 35-137% more memory: with oneDNN the
      step is bound by the LSTM's matmuls, not by the loop's control flow.
      ``model.unroll=true`` is there to measure it on other machines.
    """
    return setting is True


def build_model(
    cfg: ModelConfig,
    io: ModelIO | int,
    batch_size: int,
    k: int | None,
    stateful: bool = True,
    unroll: bool = False,
    precision: str = "float32",
) -> keras.Model:
    """[Embedding ->] Dropout -> [LSTM or GRU -> Dropout] x layers -> TimeDistributed(Dense).

    ``io`` says what goes in and out (an int: a vocabulary of token ids, predicting one of
    them): token ids go through an embedding, float features straight into the LSTM; the
    head gives a logit per class (probabilities with ``softmax_output``) or a value per
    regression target. With ``model=seed`` on text this is the original question's model
    layer for layer. A Keras mask (``mask_zero``) can leave a dummy row entirely masked,
    which cuDNN's kernel rejects on GPU, so masked models take the generic LSTM kernel.

    ``precision`` is a Keras dtype policy given to every layer but the output layer, which
    stays float32 (so do the loss and the softmax): outputs rounded to 16 bits would cost
    the loss its precision. Weights and the LSTM state variables are float32 under every
    policy, so a chunk's state is carried to the next without rounding.
    """
    io = token_io(io) if isinstance(io, int) else io
    if io.tokens:
        inputs = keras.Input(batch_shape=(batch_size, k), dtype="int32", name="tokens")
        x = keras.layers.Embedding(io.vocab_size, cfg.embedding_dim, mask_zero=cfg.mask_zero, dtype=precision)(inputs)
    else:
        x = inputs = keras.Input(batch_shape=(batch_size, k, io.num_features), dtype="float32", name="features")
    x = keras.layers.Dropout(cfg.dropout, dtype=precision)(x)
    recurrent = keras.layers.GRU if cfg.cell == Cell.gru else keras.layers.LSTM
    for i in range(cfg.layers):
        x = recurrent(
            cfg.units,
            activation=cfg.activation,
            recurrent_activation=cfg.recurrent_activation,
            return_sequences=True,
            stateful=stateful,
            unroll=unroll,
            use_cudnn=False if cfg.mask_zero and io.tokens else "auto",
            dtype=precision,
            name=f"{cfg.cell}_{i}",
        )(x)
        x = keras.layers.Dropout(cfg.dropout, dtype=precision)(x)
    softmax = cfg.softmax_output and io.task == DataTask.classification
    out = keras.layers.TimeDistributed(
        keras.layers.Dense(io.num_outputs, activation="softmax" if softmax else None, dtype="float32"),
        dtype="float32",
        name="head",
    )(x)
    return keras.Model(inputs, out, name=f"tbptt_{cfg.preset}")


def make_model(cfg: ModelConfig, io: ModelIO, batch_size: int, k: int, unroll: bool = False,
               precision: str = "float32") -> keras.Model:
    """The model ``cfg`` asks for: the built-in stack, or what ``cfg.factory`` builds with
    ``cfg.params`` (the contract: ``core/factories.py``), checked before anything trains."""
    if cfg.factory is None:
        return build_model(cfg, io, batch_size, k, unroll=unroll, precision=precision)
    factory = load_factory(cfg.factory)
    try:
        model = factory(batch_size=batch_size, k=k, vocab_size=io.vocab_size, num_features=io.num_features,
                        num_outputs=io.num_outputs, task=str(io.task), precision=precision, stateful=True,
                        **cfg.params)
    except Exception as error:  # the factory is the user's code: whatever it raises is reported, one line
        raise ConfigError("model.factory", cfg.factory, f"raised {type(error).__name__}: {error}") from None
    check_model(model, io, batch_size, k, cfg.factory)
    return model


def check_model(model: Any, io: ModelIO, batch_size: int, k: int, factory: str) -> None:
    """Refuse, in one line, a model the harness cannot train with TBPTT: not a keras.Model,
    inputs or outputs that do not fit the data, no stateful recurrent layer, one that is not
    stateful or is bidirectional or keeps state for another batch size, or per-row state kept
    where the harness cannot reset it."""
    def refuse(what: str) -> ConfigError:
        return ConfigError("model.factory", factory, what)

    if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
        raise refuse(f"returned {type(model).__name__}; return a keras.Model built on keras.Input(batch_shape=...)")
    want_in = (batch_size, k) if io.tokens else (batch_size, k, io.num_features)
    want_out = (batch_size, k, io.num_outputs)
    shapes = {"input": [tuple(t.shape) for t in model.inputs], "output": [tuple(t.shape) for t in model.outputs]}
    for side, want in (("input", want_in), ("output", want_out)):
        if shapes[side] != [want]:
            raise refuse(f"its {side} shape is {', '.join(map(str, shapes[side]))}; the data and batch_size need one "
                         f"{side} of {want} ({_what(io, side)})")
    bidirectional = [layer.name for layer in sublayers(model) if isinstance(layer, keras.layers.Bidirectional)]
    if bidirectional:
        raise refuse(f"layer '{bidirectional[0]}' is bidirectional: its backward pass needs the whole sequence, and "
                     "TBPTT gives it chunks of k steps")
    recurrent = [layer for layer in sublayers(model) if isinstance(layer, keras.layers.RNN)]
    if not recurrent:
        raise refuse("has no recurrent layer: TBPTT carries state in a stateful one (LSTM, GRU, SimpleRNN, "
                     "ConvLSTM or keras.layers.RNN around a cell)")
    for layer in recurrent:
        if not layer.stateful:
            raise refuse(f"layer '{layer.name}' is not stateful: build it with stateful=True (the factory gets stateful)")
        rows = {int(state.shape[0]) for state in layer.states}
        if rows != {batch_size}:
            raise refuse(f"layer '{layer.name}' keeps state for {sorted(rows)} rows, not batch_size={batch_size}")
    states = {id(state) for layer in recurrent for state in layer.states}
    hidden = [v for v in model.non_trainable_variables
              if id(v) not in states and len(v.shape) >= 2 and v.shape[0] == batch_size]
    if hidden:
        raise refuse(f"variable '{hidden[0].path}' keeps a state per row that the harness cannot reset at a sequence "
                     "start; keep recurrent state in a stateful recurrent layer")


def _what(io: ModelIO, side: str) -> str:
    if side == "output":
        return "a logit per class" if io.task == DataTask.classification else "a value per target"
    return "token ids" if io.tokens else "features per step"


class Head:
    """How a model's outputs are judged: the loss it trains on, and what validation reports.

    Classification: sparse cross-entropy per step (from logits, or from probabilities with
    ``softmax_output``), and the share of weighted steps whose most likely class is the
    target. Regression: mean squared error per step of the standardised targets, and RMSE
    and MAE back in the targets' own units (``target_scale``: their standard deviations).
    Every sum is weighted by the sample weights, and every loss is divided by their sum, so
    padding and dummy rows count nothing (Keras's default reduction would divide by every
    element, padding included, and dilute loss and gradient).
    """

    def __init__(self, io: ModelIO, from_logits: bool = True, target_scale: np.ndarray | None = None):
        self.classification = io.task == DataTask.classification
        self.outputs, self.from_logits = io.num_outputs, from_logits
        self.scale = np.ones(io.num_outputs, np.float32) if target_scale is None else np.asarray(target_scale, np.float32)

    @property
    def size(self) -> int:
        """How many sums ``sums`` gives."""
        return 3 if self.classification else 2 + 2 * self.outputs

    def loss(self, reduction: str = "mean_with_sample_weight", name: str | None = None) -> keras.losses.Loss:
        if self.classification:
            return keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits, reduction=reduction, name=name)
        return keras.losses.MeanSquaredError(reduction=reduction, name=name)

    def metric(self) -> keras.metrics.Metric:
        """The per-step loss as a weighted metric (``model.fit``'s epoch loss)."""
        if self.classification:
            return keras.metrics.SparseCategoricalCrossentropy(name="step_loss", from_logits=self.from_logits)
        return keras.metrics.MeanSquaredError(name="step_loss")

    def target_spec(self, batch_size: int, k: int) -> tf.TensorSpec:
        if self.classification:
            return tf.TensorSpec((None, batch_size, k), tf.int32)
        return tf.TensorSpec((None, batch_size, k, self.outputs), tf.float32)

    def sums(self, targets, outputs, weights, step_loss: keras.losses.Loss):
        """One batch's weighted sums: loss, weight, then correct predictions (classification)
        or squared and absolute errors per target value (regression)."""
        totals = [ops.sum(step_loss(targets, outputs) * weights), ops.sum(weights)]
        if self.classification:
            hits = ops.cast(ops.equal(ops.argmax(outputs, axis=-1), ops.cast(targets, "int64")), "float32")
            return ops.stack([*totals, ops.sum(hits * weights)])
        error, weight = ops.cast(outputs, "float32") - targets, ops.expand_dims(weights, -1)
        squared = ops.sum(weight * ops.square(error), axis=(0, 1))
        absolute = ops.sum(weight * ops.abs(error), axis=(0, 1))
        return ops.concatenate([ops.stack(totals), squared, absolute])

    def figures(self, sums: np.ndarray) -> dict[str, float]:
        """Summed ``sums`` -> ``loss`` per weighted step, and ``accuracy`` or ``rmse`` and ``mae``."""
        loss, weight = float(sums[0]), float(sums[1])
        if self.classification:
            return {"loss": loss / weight, "accuracy": float(sums[2]) / weight}
        squared, absolute = sums[2:2 + self.outputs], sums[2 + self.outputs:]
        return {"loss": loss / weight, **error_figures(squared, absolute, weight, self.scale)}


def make_optimizer(cfg: TrainerConfig, batch_size: int | None = None) -> keras.optimizers.Optimizer:
    """The optimizer at the learning rate for ``batch_size`` streams (``trainer.lr_scaling``;
    None: the rate as set); under ``mixed_float16`` wrapped in dynamic loss scaling, since
    float16 gradients of a per-token mean loss underflow (bfloat16 has float32's range)."""
    kinds = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "rmsprop": keras.optimizers.RMSprop,
        "sgd": keras.optimizers.SGD,
    }
    rate = cfg.learning_rate if batch_size is None else cfg.learning_rate_for(batch_size)
    optimizer = kinds[cfg.optimizer](learning_rate=rate, clipnorm=cfg.clipnorm)
    if cfg.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def sublayers(layer: keras.layers.Layer):
    """Every layer inside ``layer``, nested models included (depth first)."""
    for inner in getattr(layer, "layers", []):
        yield inner
        yield from sublayers(inner)


def stateful_layers(model: keras.Model) -> list[keras.layers.RNN]:
    """The model's stateful recurrent layers (LSTM, GRU, SimpleRNN, ConvLSTM, an RNN around a
    custom cell), nested models included: the state TBPTT carries and resets."""
    return [layer for layer in sublayers(model) if isinstance(layer, keras.layers.RNN) and layer.stateful]


def reset_rows(layers: list[keras.layers.RNN], reset) -> None:
    """Zero the state of the rows where ``reset`` is True; other rows stay bit-identical.

    Keras has no per-row reset, so assign through the state variables (works in a graph).
    Inside a graph, a batch where no row resets (most batches of a long stream) skips the
    assignments altogether.
    """

    def zero_rows():
        for layer in layers:
            for state in layer.states:  # (batch, units), or (batch, rows, cols, filters) for ConvLSTM
                rows = ops.reshape(reset, (-1,) + (1,) * (len(state.shape) - 1))
                state.assign(ops.where(rows, ops.zeros_like(state), state))

    ops.cond(ops.any(reset), zero_rows, lambda: None)


def get_states(layers: list[keras.layers.RNN]) -> list[np.ndarray]:
    return [np.array(state) for layer in layers for state in layer.states]


def set_states(layers: list[keras.layers.RNN], values: list[np.ndarray]) -> None:
    states = [state for layer in layers for state in layer.states]
    for state, value in zip(states, values, strict=True):
        state.assign(value)
