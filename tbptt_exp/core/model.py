"""The Keras model: a stateful LSTM language model with a fixed batch size.

Stateful RNN layers keep one state per batch row in non-trainable variables
(``layer.states``). That is what carries a stream from chunk to chunk, and also why
gradients stop at chunk boundaries by themselves: the next chunk reads the state as a
variable, not as a tensor connected to the previous chunk's graph.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tbptt_exp.core.config import ModelConfig, TrainerConfig


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
    vocab_size: int,
    batch_size: int,
    k: int | None,
    stateful: bool = True,
    unroll: bool = False,
    precision: str = "float32",
) -> keras.Model:
    """Embedding -> Dropout -> [LSTM -> Dropout] x layers -> TimeDistributed(Dense).

    With ``model.preset=seed`` this is the original question's model layer for layer.
    A Keras mask (``mask_zero``) can leave a dummy row entirely masked, which cuDNN's
    kernel rejects on GPU, so masked models take the generic LSTM kernel.

    ``precision`` is a Keras dtype policy given to every layer but the output layer, which
    stays float32 (so do the loss and the softmax): logits rounded to 16 bits would cost
    the loss its precision. Weights and the LSTM state variables are float32 under every
    policy, so a chunk's state is carried to the next without rounding.
    """
    tokens = keras.Input(batch_shape=(batch_size, k), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, cfg.embedding_dim, mask_zero=cfg.mask_zero, dtype=precision)(tokens)
    x = keras.layers.Dropout(cfg.dropout, dtype=precision)(x)
    for i in range(cfg.layers):
        x = keras.layers.LSTM(
            cfg.units,
            activation=cfg.activation,
            recurrent_activation=cfg.recurrent_activation,
            return_sequences=True,
            stateful=stateful,
            unroll=unroll,
            use_cudnn=False if cfg.mask_zero else "auto",
            dtype=precision,
            name=f"lstm_{i}",
        )(x)
        x = keras.layers.Dropout(cfg.dropout, dtype=precision)(x)
    out = keras.layers.TimeDistributed(
        keras.layers.Dense(vocab_size, activation="softmax" if cfg.softmax_output else None, dtype="float32"),
        dtype="float32",
        name="next_token",
    )(x)
    return keras.Model(tokens, out, name=f"tbptt_{cfg.preset}")


def make_optimizer(cfg: TrainerConfig) -> keras.optimizers.Optimizer:
    """The optimizer; under ``mixed_float16`` wrapped in dynamic loss scaling, since
    float16 gradients of a per-token mean loss underflow (bfloat16 has float32's range)."""
    kinds = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "rmsprop": keras.optimizers.RMSprop,
        "sgd": keras.optimizers.SGD,
    }
    optimizer = kinds[cfg.optimizer](learning_rate=cfg.learning_rate, clipnorm=cfg.clipnorm)
    if cfg.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def token_loss(from_logits: bool, reduction: str = "mean_with_sample_weight") -> keras.losses.Loss:
    """Cross-entropy per token, divided by the *sum of sample weights*.

    Keras's default reduction divides by every element, padding included, so dummy rows
    and padded steps would dilute loss and gradient; this one counts only real tokens.
    """
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, reduction=reduction)


def stateful_layers(model: keras.Model) -> list[keras.layers.RNN]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.RNN) and layer.stateful]


def reset_rows(layers: list[keras.layers.RNN], reset) -> None:
    """Zero the state of the rows where ``reset`` is True; other rows stay bit-identical.

    Keras has no per-row reset, so assign through the state variables (works in a graph).
    Inside a graph, a batch where no row resets (most batches of a long stream) skips the
    assignments altogether.
    """

    def zero_rows():
        for layer in layers:
            for state in layer.states:
                state.assign(ops.where(ops.expand_dims(reset, -1), ops.zeros_like(state), state))

    ops.cond(ops.any(reset), zero_rows, lambda: None)


def get_states(layers: list[keras.layers.RNN]) -> list[np.ndarray]:
    return [np.array(state) for layer in layers for state in layer.states]


def set_states(layers: list[keras.layers.RNN], values: list[np.ndarray]) -> None:
    states = [state for layer in layers for state in layer.states]
    for state, value in zip(states, values, strict=True):
        state.assign(value)
