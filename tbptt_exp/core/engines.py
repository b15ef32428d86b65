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
import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from tbptt_exp.core.config import TrainerConfig
from tbptt_exp.core.dataset import token_io
from tbptt_exp.core.layout import Layout
from tbptt_exp.core.measure import MB, EpochTiming, NonFiniteLoss
from tbptt_exp.core.model import Head, get_states, reset_rows, set_states, stateful_layers
from tbptt_exp.core.noise import EMA_DECAY, noise_scale, two_batch_estimates

Progress = Callable[[int], None]


@dataclass
class EpochResult:
    loss: float | None  # the loss per weighted step (cross-entropy in nats, or squared error), over the batches
    # trained; None where none of them carried weight
    timing: EpochTiming  # marks: the first execution, then throughput windows (measure.py)
    gradient_noise_scale: float | None = None  # streams; the run's average so far (GraphEngine)


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

    @property
    def weights_mb(self) -> float:
        """The model's weights in MiB: a floor of any training run's peak memory."""
        return sum(math.prod(w.shape) * np.dtype(w.dtype).itemsize for w in self.model.weights) / MB

    def train_epoch(self, layout: Layout, progress: Progress | None = None, stop_after_s: float | None = None,
                    time_left_s: float | None = None) -> EpochResult:
        """One pass over ``layout``; ``progress(batches_done)`` is called at each window.

        ``stop_after_s``: train until this much steady-state time is measured, ending
        mid-layout or going round it again (a batch-size probe: training exactly like an
        epoch, for a set time). Batches are counted across rounds. ``time_left_s``: end the
        pass early, at the first window that closes this long after the epoch started
        (``trainer.max_time_s``).
        """
        raise NotImplementedError

    def gradient_noise_scale(self) -> float | None:
        """The gradient noise scale measured so far, in streams; None where it is not measured."""
        return None

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
        chosen = executions(layout, self.cfg.steps_per_execution)
        if limit is not None:  # executions that carry weight: labels only at sequence ends leave most without
            chosen = itertools.islice((arrays for arrays in chosen if arrays[2].any()), limit)
        sums = [self._evaluate_execution(*arrays) for arrays in chosen]
        set_states(self.layers, saved)
        return self.head.figures(np.sum([np.asarray(s) for s in sums], axis=0))

    def evaluate(self, layout: Layout) -> float:
        """Loss per weighted step over ``layout``; the training state is left as it was."""
        return self.validate(layout)["loss"]


def per_token_loss(sums) -> float | None:
    """Executions' (loss x weight sum, weight sum) pairs -> mean loss per weighted step; None
    where no step carried weight (a run cut short before its first label)."""
    loss_sum, weight_sum = np.sum([[float(a), float(b)] for a, b in sums], axis=0)
    if weight_sum == 0 and loss_sum == 0:
        return None
    return float(loss_sum / weight_sum) if weight_sum > 0 else float("nan")


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


def squared_norm(gradients) -> tf.Tensor:
    """|g|² over every variable's gradient (an embedding's sparse one included)."""
    return tf.add_n([tf.reduce_sum(tf.square(tf.convert_to_tensor(g))) for g in gradients])


class GraphEngine(Engine):
    """Per-row resets and ``steps_per_execution`` steps inside one compiled function.

    Every ``trainer.noise_scale_every`` steps, from the first on, the step also measures the
    gradient noise scale (``core/noise.py``): the gradient of the whole batch (the one
    applied, as on every other step) and of the first half of its rows, so the second
    half's follows by subtraction. Rows are the samples; a row is real where any of its
    steps carries weight, and a step whose halves are not both real is not measured. The
    averages live in variables, updated inside the graph: no host sync.

    A measuring step runs in a compiled function of its own (one step; the execution's
    other steps run in the plain one), chosen on the host: a ``tf.cond`` between the two
    kinds of step inside one function cost 12% of tokens/s on every step
    (``benchmarks/RESULTS.md``). The run's first execution measures; it and the second are
    left out of the timing, as either may compile. So a batch-size probe's peak memory
    includes a measuring step.
    """

    name = "graph"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_every = self.cfg.noise_scale_every
        self._noise = [tf.Variable(0.0, trainable=False, name=name) for name in ("ema_sq", "ema_trace", "measured")]
        # What a forward pass changes: the carried state (not among the model's variables), the
        # dropout seeds and any moving statistics.
        carried = [state for layer in self.layers for state in layer.states]
        carried += [v for v in self.model.variables if not v.trainable and all(v is not c for c in carried)]
        self._carried = carried
        self._steps_done, self._next_measure = 0, 0
        self._compiled = 0  # how many of the train functions have run once
        signature = self._evaluate_execution.input_signature
        self._train_execution = tf.function(self._train_steps, input_signature=signature, jit_compile=self.jit_compile)
        self._measuring_execution = tf.function(self._measuring_first_step, input_signature=signature,
                                                jit_compile=self.jit_compile)

    def _train_steps(self, inputs, targets, weights, resets):
        """One execution's steps."""
        loss_sum, weight_sum = tf.constant(0.0), tf.constant(0.0)
        variables = self.model.trainable_variables
        for s in tf.range(tf.shape(inputs)[0]):
            reset_rows(self.layers, resets[s])
            gradients, batch_loss, batch_weight = self._step(inputs[s], targets[s], weights[s])
            self.model.optimizer.apply(gradients, variables)
            loss_sum += batch_loss
            weight_sum += batch_weight
        return loss_sum, weight_sum

    def _measuring_first_step(self, inputs, targets, weights, resets):
        """The first step of an execution, measuring the noise scale as it trains."""
        reset_rows(self.layers, resets[0])
        gradients, loss_sum, weight_sum = self._measuring_step(inputs[0], targets[0], weights[0])
        self.model.optimizer.apply(gradients, self.model.trainable_variables)
        return loss_sum, weight_sum

    def _execute(self, arrays, steps: int):
        """One execution of ``steps`` steps, measuring where a measurement is due: its first
        step in a function of its own (one step: it compiles two passes, not a loop of
        them as well), the rest in the plain one."""
        start, self._steps_done = self._steps_done, self._steps_done + steps
        if not (self.noise_every > 0 and start >= self._next_measure):
            return self._train_execution(*arrays)
        self._next_measure = start + self.noise_every
        loss_sum, weight_sum = self._measuring_execution(*(a[:1] for a in arrays))
        if steps == 1:
            return loss_sum, weight_sum
        rest_loss, rest_weight = self._train_execution(*(a[1:] for a in arrays))
        return loss_sum + rest_loss, weight_sum + rest_weight

    def _step(self, inputs, targets, weights):
        """One batch's gradient of its loss per weighted step, and its (loss, weight) sums."""
        with tf.GradientTape() as tape:
            y_pred = self.model(inputs, training=True)
            batch_loss, batch_weight = self._weighted_sums(targets, y_pred, weights)
            scaled = self.model.optimizer.scale_loss(tf.math.divide_no_nan(batch_loss, batch_weight))
        return tape.gradient(scaled, self.model.trainable_variables), batch_loss, batch_weight

    def _measuring_step(self, inputs, targets, weights):
        """``_step``, after measuring the gradient of the batch's first half of rows at the same
        weights, state and dropout masks: that pass's state is rolled back first (every
        non-trainable variable: the carried state, the dropout seeds), so the step trains
        exactly as an unmeasured one would. Two passes one after the other, not one tape
        for both: a second backward pass over one tape keeps the whole forward pass alive and
        more than doubled the step's peak memory."""
        variables, half = self.model.trainable_variables, inputs.shape[0] // 2
        saved = [tf.identity(v) for v in self._carried]
        with tf.GradientTape() as tape:
            y_pred = self.model(inputs, training=True)
            first_loss, first_weight = self._weighted_sums(targets[:half], y_pred[:half], weights[:half])
            first = self.model.optimizer.scale_loss(tf.math.divide_no_nan(first_loss, first_weight))
        first_half = [tf.convert_to_tensor(g) for g in tape.gradient(first, variables)]
        with tf.control_dependencies(first_half):
            rolled_back = [v.assign(value) for v, value in zip(self._carried, saved)]
        with tf.control_dependencies(rolled_back):
            gradients, batch_loss, batch_weight = self._step(inputs, targets, weights)
        real = tf.reduce_sum(weights, axis=1) > 0
        self._measure(gradients, first_half, real, batch_weight, first_weight, half)
        return gradients, batch_loss, batch_weight

    def _measure(self, whole, first, real, weight, first_weight, half) -> None:
        """Fold one step's two-batch estimates into the averages (``noise.two_batch_estimates``)."""
        whole = [tf.convert_to_tensor(g) for g in whole]
        first = [tf.convert_to_tensor(g) for g in first]
        second_weight = weight - first_weight
        # the second half's gradient: the whole is the halves' weighted mean
        second = [tf.math.divide_no_nan(weight * w - first_weight * f, second_weight) for w, f in zip(whole, first)]
        unscale = tf.square(self.model.optimizer.scale_loss(tf.constant(1.0)))  # mixed_float16's loss scale
        rows_a = tf.reduce_sum(tf.cast(real[:half], tf.float32))
        rows_b = tf.reduce_sum(tf.cast(real[half:], tf.float32))
        valid = (rows_a >= 1) & (rows_b >= 1)
        rows_a, rows_b = tf.maximum(rows_a, 1.0), tf.maximum(rows_b, 1.0)
        small_sq = (squared_norm(first) + squared_norm(second)) / (2 * unscale)
        sq, trace = two_batch_estimates(small_sq, squared_norm(whole) / unscale,
                                        (1 / rows_a + 1 / rows_b) / 2, 1 / (rows_a + rows_b))
        valid &= tf.math.is_finite(sq) & tf.math.is_finite(trace)
        for average, value in zip(self._noise[:2], (sq, trace)):
            average.assign(tf.where(valid, EMA_DECAY * average + (1 - EMA_DECAY) * value, average))
        self._noise[2].assign_add(tf.cast(valid, tf.float32))

    def restart_noise_scale(self) -> None:
        """Forget the measurements so far: early in training the gradient falls fast and its
        |G|², several times later values, would outweigh theirs in the averages for dozens of
        measurements, so a short run's noise scale would read several times too low."""
        for average in self._noise:
            average.assign(0.0)

    def gradient_noise_scale(self) -> float | None:
        """The noise scale so far, in streams (None: off, or nothing measured yet)."""
        ema_sq, ema_trace, measured = (float(v.numpy()) for v in self._noise)
        return noise_scale(ema_sq, ema_trace) if measured else None

    def train_epoch(self, layout: Layout, progress: Progress | None = None, stop_after_s: float | None = None,
                    time_left_s: float | None = None) -> EpochResult:
        steps = self.cfg.steps_per_execution
        timing = EpochTiming()
        sums, ends, done = [], [], 0  # ends[i]: batches done after execution i
        untimed = 2 if self.noise_every and self._compiled < 2 else 1  # compiling: the first, or both functions
        while True:
            for arrays in executions(layout, steps):
                sums.append(self._execute(arrays, min(steps, layout.n_batches - done % layout.n_batches)))
                done += min(steps, layout.n_batches - done % layout.n_batches)
                ends.append(done)
                if len(sums) < untimed:
                    continue
                self._compiled = 2
                if timing.due():  # the one host sync: a window closes (the first one: compilation)
                    if not np.isfinite(float(sums[-1][0])):  # NaN weights: every later loss is NaN too
                        raise first_non_finite(sums, ends)
                    timing.mark(done)
                    if progress is not None:
                        progress(done)
                    if timing.over(stop_after_s, time_left_s):
                        break
            else:
                if stop_after_s is not None:
                    continue  # not measured long enough yet: once more round the layout
            break
        loss = per_token_loss(sums)  # waits for the last execution
        if loss is not None and not np.isfinite(loss):
            raise first_non_finite(sums, ends)
        timing.finish(done)
        return EpochResult(loss, timing, self.gradient_noise_scale())


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

    def __init__(self, timing: EpochTiming, progress: Progress | None, stop_after_s: float | None,
                 time_left_s: float | None):
        super().__init__()
        self.timing, self.progress, self.stop_after_s, self.time_left_s = timing, progress, stop_after_s, time_left_s
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
            if self.timing.over(self.stop_after_s, self.time_left_s):
                self.model.stop_training = True


class KerasFitEngine(Engine):
    """``model.fit`` on the flattened layout, one epoch per call, resets from a callback."""

    name = "keras_fit"

    def train_epoch(self, layout: Layout, progress: Progress | None = None, stop_after_s: float | None = None,
                    time_left_s: float | None = None) -> EpochResult:
        k = layout.k
        timing = EpochTiming()
        clock = _TimeAndReport(timing, progress, stop_after_s, time_left_s)
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
