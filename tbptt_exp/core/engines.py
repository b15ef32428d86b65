"""Engines: two ways to train a stateful LSTM on a TBPTT layout.

- ``graph`` (default): the layout's per-row reset flags are applied inside the compiled
  train step, so no Python runs between steps. It handles ``pack`` (rows reset at
  different chunks) and ``steps_per_execution > 1`` (several steps per call).
- ``keras_fit``: the classic recipe — ``model.fit(shuffle=False)`` with temporal sample
  weights and a callback that resets every row's state where a new group of sequences
  starts. Keras calls callbacks once per execution, so it needs
  ``steps_per_execution=1``, and it can only reset all rows at once (no ``pack``).

Both divide the loss by the sum of sample weights, so padded steps and dummy rows
contribute nothing to loss or gradient, and both validate with the same in-graph
evaluation, which restores the training state afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tbptt_exp.core.config import TrainerConfig
from tbptt_exp.core.layout import Layout
from tbptt_exp.core.measure import EpochTiming
from tbptt_exp.core.model import get_states, reset_rows, set_states, stateful_layers, token_loss


Progress = Callable[[int], None]


@dataclass
class EpochResult:
    loss: float  # mean cross-entropy per real token (nats)
    timing: EpochTiming
    first_execution_batches: int  # batches inside the first (separately timed) execution


class Engine:
    """Shared by both engines: compile, per-token evaluation, state snapshots."""

    name = ""

    def __init__(self, model: keras.Model, cfg: TrainerConfig, from_logits: bool, optimizer):
        self.model, self.cfg = model, cfg
        self.layers = stateful_layers(model)
        self.token_losses = token_loss(from_logits, reduction="none")
        model.compile(
            optimizer=optimizer,
            loss=token_loss(from_logits),
            weighted_metrics=[
                keras.metrics.SparseCategoricalCrossentropy(name="token_loss", from_logits=from_logits)
            ],
            jit_compile="auto" if cfg.jit_compile is None else cfg.jit_compile,
        )
        model.optimizer.build(model.trainable_variables)
        self.jit_compile = bool(model.jit_compile)  # Keras resolves "auto" per model and device
        batch, k = model.inputs[0].shape
        spec = [
            tf.TensorSpec((None, batch, k), tf.int32),
            tf.TensorSpec((None, batch, k), tf.int32),
            tf.TensorSpec((None, batch, k), tf.float32),
            tf.TensorSpec((None, batch), tf.bool),
        ]
        self._evaluate_execution = tf.function(
            self._evaluate_steps, input_signature=spec, jit_compile=self.jit_compile
        )

    def train_epoch(self, layout: Layout, progress: Progress | None = None) -> EpochResult:
        """One pass over ``layout``; ``progress(batches_done)`` is called as it goes."""
        raise NotImplementedError

    def _weighted_sums(self, targets, y_pred, weights):
        """(sum of loss x weight, sum of weights) for one batch."""
        per_token = self.token_losses(targets, y_pred)
        return tf.reduce_sum(per_token * weights), tf.reduce_sum(weights)

    def _evaluate_steps(self, inputs, targets, weights, resets):
        loss_sum, weight_sum = tf.constant(0.0), tf.constant(0.0)
        for s in tf.range(tf.shape(inputs)[0]):
            reset_rows(self.layers, resets[s])
            y_pred = self.model(inputs[s], training=False)
            batch_loss, batch_weight = self._weighted_sums(targets[s], y_pred, weights[s])
            loss_sum += batch_loss
            weight_sum += batch_weight
        return loss_sum, weight_sum

    def evaluate(self, layout: Layout) -> float:
        """Per-real-token loss over ``layout``; the training state is left as it was."""
        saved = get_states(self.layers)
        sums = [self._evaluate_execution(*arrays) for arrays in executions(layout, self.cfg.steps_per_execution)]
        set_states(self.layers, saved)
        return per_token_loss(sums)


def per_token_loss(sums) -> float:
    """Executions' (loss x weight sum, weight sum) pairs -> mean loss per real token."""
    loss_sum, weight_sum = np.sum([[float(a), float(b)] for a, b in sums], axis=0)
    return float(loss_sum / weight_sum)


def executions(layout: Layout, steps: int):
    """The layout's arrays cut into consecutive runs of ``steps`` batches."""
    for start in range(0, layout.n_batches, steps):
        end = start + steps
        yield (
            layout.inputs[start:end],
            layout.targets[start:end],
            layout.sample_weights[start:end],
            layout.reset[start:end],
        )


class GraphEngine(Engine):
    """Per-row resets and ``steps_per_execution`` steps inside one compiled function."""

    name = "graph"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._train_execution = tf.function(
            self._train_steps,
            input_signature=self._evaluate_execution.input_signature,
            jit_compile=self.jit_compile,
        )

    def _train_steps(self, inputs, targets, weights, resets):
        loss_sum, weight_sum = tf.constant(0.0), tf.constant(0.0)
        variables = self.model.trainable_variables
        for s in tf.range(tf.shape(inputs)[0]):
            reset_rows(self.layers, resets[s])
            with tf.GradientTape() as tape:
                y_pred = self.model(inputs[s], training=True)
                batch_loss, batch_weight = self._weighted_sums(targets[s], y_pred, weights[s])
                loss = tf.math.divide_no_nan(batch_loss, batch_weight)
            self.model.optimizer.apply(tape.gradient(loss, variables), variables)
            loss_sum += batch_loss
            weight_sum += batch_weight
        return loss_sum, weight_sum

    def train_epoch(self, layout: Layout, progress: Progress | None = None) -> EpochResult:
        steps = self.cfg.steps_per_execution
        timing = EpochTiming(start=EpochTiming.now())
        sums = []
        for arrays in executions(layout, steps):
            sums.append(self._train_execution(*arrays))
            if len(sums) == 1:
                float(sums[0][0])  # wait for the first execution to finish
                timing.first_done = EpochTiming.now()
            if progress is not None:
                progress(min(len(sums) * steps, layout.n_batches))
        loss = per_token_loss(sums)  # waits for the last execution
        timing.end, timing.executions = EpochTiming.now(), len(sums)
        return EpochResult(loss, timing, min(steps, layout.n_batches))


class ResetStatesOnNewGroup(keras.callbacks.Callback):
    """The classic recipe's callback: zero every row's state where a new group starts."""

    _supports_tf_logs = True  # never needs logs as NumPy, so Keras does not sync for it

    def __init__(self, reset: np.ndarray, layers: list):
        super().__init__()
        self.reset_batch = reset.all(axis=1)
        if (reset.any(axis=1) != self.reset_batch).any():
            raise ValueError("engine=keras_fit can only reset all rows at once; use engine=graph")
        self.layers = layers

    def on_train_batch_begin(self, batch, logs=None):
        if self.reset_batch[batch]:
            for layer in self.layers:
                layer.reset_state()


class _TimeAndReport(keras.callbacks.Callback):
    _supports_tf_logs = True

    def __init__(self, timing: EpochTiming, progress: Progress | None):
        super().__init__()
        self.timing, self.progress = timing, progress

    def on_train_batch_end(self, batch, logs=None):
        self.timing.executions += 1
        if batch == 0:
            float(logs["loss"])  # wait for the first step to finish
            self.timing.first_done = EpochTiming.now()
        if self.progress is not None:
            self.progress(batch + 1)


class KerasFitEngine(Engine):
    """``model.fit`` on the flattened layout, one epoch per call, resets from a callback."""

    name = "keras_fit"

    def train_epoch(self, layout: Layout, progress: Progress | None = None) -> EpochResult:
        k = layout.k
        timing = EpochTiming(start=EpochTiming.now())
        history = self.model.fit(
            layout.inputs.reshape(-1, k),
            layout.targets.reshape(-1, k),
            sample_weight=layout.sample_weights.reshape(-1, k),
            batch_size=layout.batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[ResetStatesOnNewGroup(layout.reset, self.layers), _TimeAndReport(timing, progress)],
        )
        timing.end = EpochTiming.now()
        return EpochResult(float(history.history["token_loss"][0]), timing, 1)


ENGINES = {engine.name: engine for engine in (GraphEngine, KerasFitEngine)}
