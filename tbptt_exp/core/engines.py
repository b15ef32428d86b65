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
evaluation, which restores the training state afterwards. Both stop at the first
host sync that sees a training loss that is NaN or infinite (``NonFiniteLoss``): once
the weights hold NaN every later figure is meaningless.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tbptt_exp.core.config import TrainerConfig
from tbptt_exp.core.dataset import token_io
from tbptt_exp.core.layout import Layout
from tbptt_exp.core.measure import EpochTiming, NonFiniteLoss
from tbptt_exp.core.model import Head, get_states, reset_rows, set_states, stateful_layers

Progress = Callable[[int], None]


@dataclass
class EpochResult:
    loss: float  # the loss per weighted step (cross-entropy in nats, or squared error), over the batches trained
    timing: EpochTiming  # marks: the first execution, then throughput windows (measure.py)


class Engine:
    """Shared by both engines: compile, per-step evaluation, state snapshots.

    ``head`` says how outputs are judged (``model.Head``); without one, as a language model:
    a class per output unit, from logits unless ``from_logits`` is false.
    """

    name = ""
    unroll = False  # the model's recurrent loop as built (``train.build`` records it)

    def __init__(self, model: keras.Model, cfg: TrainerConfig, from_logits: bool = True, optimizer=None,
                 head: Head | None = None):
        self.model, self.cfg = model, cfg
        self.head = head or Head(token_io(model.outputs[0].shape[-1]), from_logits)
        self.layers = stateful_layers(model)
        self.step_losses = self.head.loss(reduction="none")
        model.compile(
            optimizer=optimizer,
            loss=self.head.loss(),
            weighted_metrics=[self.head.metric()],
            jit_compile="auto" if cfg.jit_compile is None else cfg.jit_compile,
        )
        model.optimizer.build(model.trainable_variables)
        self.jit_compile = bool(model.jit_compile)  # Keras resolves "auto" per model and device
        batch, k = model.inputs[0].shape[:2]
        spec = [
            tf.TensorSpec((None, *model.inputs[0].shape), tf.as_dtype(model.inputs[0].dtype)),
            self.head.target_spec(batch, k),
            tf.TensorSpec((None, batch, k), tf.float32),
            tf.TensorSpec((None, batch), tf.bool),
        ]
        self._evaluate_execution = tf.function(
            self._evaluate_steps, input_signature=spec, jit_compile=self.jit_compile
        )

    def train_epoch(self, layout: Layout, progress: Progress | None = None, stop_after_s: float | None = None) -> EpochResult:
        """One pass over ``layout``; ``progress(batches_done)`` is called at each window.

        ``stop_after_s``: train until this much steady-state time is measured, ending
        mid-layout or going round it again (a batch-size probe: training exactly like an
        epoch, for a set time). Batches are counted across rounds.
        """
        raise NotImplementedError

    def _weighted_sums(self, targets, y_pred, weights):
        """(sum of loss x weight, sum of weights) for one batch."""
        per_step = self.step_losses(targets, y_pred)
        return tf.reduce_sum(per_step * weights), tf.reduce_sum(weights)

    def _evaluate_steps(self, inputs, targets, weights, resets):
        totals = tf.zeros([self.head.size])
        for s in tf.range(tf.shape(inputs)[0]):
            reset_rows(self.layers, resets[s])
            totals += self.head.sums(targets[s], self.model(inputs[s], training=False), weights[s], self.step_losses)
        return totals

    def validate(self, layout: Layout, limit: int | None = None) -> dict[str, float]:
        """The head's figures over ``layout`` (``loss`` per weighted step, ``accuracy`` or
        ``rmse`` and ``mae``), over its first ``limit`` executions only where given (a probe:
        the first reaches the peak); the training state is left as it was."""
        saved = get_states(self.layers)
        sums = [self._evaluate_execution(*arrays)
                for arrays in itertools.islice(executions(layout, self.cfg.steps_per_execution), limit)]
        set_states(self.layers, saved)
        return self.head.figures(np.sum([np.asarray(s) for s in sums], axis=0))

    def evaluate(self, layout: Layout) -> float:
        """Loss per weighted step over ``layout``; the training state is left as it was."""
        return self.validate(layout)["loss"]


def per_token_loss(sums) -> float:
    """Executions' (loss x weight sum, weight sum) pairs -> mean loss per weighted step."""
    loss_sum, weight_sum = np.sum([[float(a), float(b)] for a, b in sums], axis=0)
    return float(loss_sum / weight_sum)


def first_non_finite(sums, ends: list[int]) -> NonFiniteLoss:
    """The first execution whose loss sum is not finite, as the batch it ended with (exact
    with one step per execution); its losses are on the host already, so this costs no sync."""
    first = next(i for i, (loss, _) in enumerate(sums) if not np.isfinite(float(loss)))
    batches = ends[first] - (ends[first - 1] if first else 0)
    return NonFiniteLoss(float(sums[first][0]), ends[first], exact=batches == 1)


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
                scaled = self.model.optimizer.scale_loss(loss)  # mixed_float16: loss scaling; else as is
            self.model.optimizer.apply(tape.gradient(scaled, variables), variables)
            loss_sum += batch_loss
            weight_sum += batch_weight
        return loss_sum, weight_sum

    def train_epoch(self, layout: Layout, progress: Progress | None = None, stop_after_s: float | None = None) -> EpochResult:
        steps = self.cfg.steps_per_execution
        timing = EpochTiming()
        sums, ends, done = [], [], 0  # ends[i]: batches done after execution i
        while True:
            for arrays in executions(layout, steps):
                sums.append(self._train_execution(*arrays))
                done += min(steps, layout.n_batches - done % layout.n_batches)
                ends.append(done)
                if timing.due():  # the one host sync: a window closes (the first one: compilation)
                    if not np.isfinite(float(sums[-1][0])):  # NaN weights: every later loss is NaN too
                        raise first_non_finite(sums, ends)
                    timing.mark(done)
                    if progress is not None:
                        progress(done)
                    if stop_after_s is not None and timing.steady_s >= stop_after_s:
                        break
            else:
                if stop_after_s is not None:
                    continue  # not measured long enough yet: once more round the layout
            break
        loss = per_token_loss(sums)  # waits for the last execution
        if not np.isfinite(loss):
            raise first_non_finite(sums, ends)
        timing.finish(done)
        return EpochResult(loss, timing)


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

    def __init__(self, timing: EpochTiming, progress: Progress | None, stop_after_s: float | None):
        super().__init__()
        self.timing, self.progress, self.stop_after_s = timing, progress, stop_after_s
        self.done = 0  # batches, counted across rounds

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.timing.due():  # the one host sync: a window closes (the first one: compilation)
            loss = float(logs["loss"])  # the epoch's running mean: not finite once any batch was not
            if not np.isfinite(loss):
                raise NonFiniteLoss(loss, self.done, exact=False)
            self.timing.mark(self.done)
            if self.progress is not None:
                self.progress(self.done)
            if self.stop_after_s is not None and self.timing.steady_s >= self.stop_after_s:
                self.model.stop_training = True


class KerasFitEngine(Engine):
    """``model.fit`` on the flattened layout, one epoch per call, resets from a callback."""

    name = "keras_fit"

    def train_epoch(self, layout: Layout, progress: Progress | None = None, stop_after_s: float | None = None) -> EpochResult:
        k = layout.k
        timing = EpochTiming()
        clock = _TimeAndReport(timing, progress, stop_after_s)
        history = self.model.fit(
            layout.inputs.reshape(-1, k, *layout.inputs.shape[3:]),
            layout.targets.reshape(-1, k, *layout.targets.shape[3:]),
            sample_weight=layout.sample_weights.reshape(-1, k),
            batch_size=layout.batch_size,
            epochs=1 if stop_after_s is None else 1_000_000,  # a timed run ends from the callback
            shuffle=False,
            verbose=0,
            callbacks=[ResetStatesOnNewGroup(layout.reset, self.layers), clock],
        )
        loss = float(history.history["step_loss"][-1])
        if not np.isfinite(loss):
            raise NonFiniteLoss(loss, clock.done, exact=False)
        timing.finish(clock.done)
        return EpochResult(loss, timing)


ENGINES = {engine.name: engine for engine in (GraphEngine, KerasFitEngine)}
