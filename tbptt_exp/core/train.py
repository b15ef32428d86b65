"""One experiment: config -> data -> layout -> engine -> measurements, as plain data.

This is the function every driver calls (the CLI, sweeps, the batch-size finder);
none of them re-implements training. ``on_epoch`` receives each epoch's figures as they
are measured (progress, tracking, pruning). The records here carry the figures that
``measure.FIGURES`` defines, and say themselves how they read on a console.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psutil

from tbptt_exp.core import measure
from tbptt_exp.core.config import Activation, ConfigError, DataTask, ExperimentConfig, Padding, objective_names
from tbptt_exp.core.data import load_dataset
from tbptt_exp.core.dataset import Dataset, baselines
from tbptt_exp.core.device import load_tensorflow, prepare_tensorflow
from tbptt_exp.core.layout import Layout, build_layout, epoch_order, planned_batches
from tbptt_exp.core.measure import FIGURES, NOISE_SCALE, PEAK_MEMORY, Diverged, NonFiniteLoss, rate_text


@dataclass
class EpochMetrics:
    """One epoch's figures, each defined in ``measure.FIGURES`` (a new field is logged as a new metric)."""

    epoch: int
    train_loss: float | None  # None: no step trained carried weight (cut short before a label)
    val_loss: float
    tokens_per_s: float  # real tokens per second: median of steady-state windows
    padded_tokens_per_s: float  # all timesteps computed per second (real + padding), median
    tokens_per_s_spread: float | None  # interquartile range of the windows' real-token rates
    peak_memory_mb: float | None  # allocator peak on the training device since the run started; None: unknown
    peak_rss_mb: float  # process resident-set high-water mark since the run started
    epoch_time_s: float  # wall time of the epoch's training (layout and validation excluded)
    first_execution_s: float  # the first execution, timed on its own
    validation_time_s: float  # wall time of the epoch's validation pass
    val_bits_per_char: float | None = None  # text
    val_accuracy: float | None = None  # classification
    val_rmse: float | None = None  # regression, in the targets' units
    val_mae: float | None = None  # regression, in the targets' units
    gradient_noise_scale: float | None = None  # streams, the run's average so far; None: not measured
    tokens_trained: int = 0  # real tokens of the batches this epoch trained (fewer where max_time_s cut it)
    steps: int = 0  # optimizer steps (batches) this epoch trained

    def figures(self) -> dict[str, float | None]:
        """Every figure of the epoch by name."""
        return {name: value for name, value in asdict(self).items() if name in FIGURES}

    @property
    def validation_text(self) -> str:
        """``val_loss 1.7188 (2.480 bits/char)  val_accuracy 0.4512``, with the figures the data has."""
        bits = self.val_bits_per_char
        text = f"val_loss {FIGURES['val_loss'].show(self.val_loss)}"
        text += "" if bits is None else f" ({FIGURES['val_bits_per_char'].show(bits, unit=True)})"
        for name in ("val_accuracy", "val_rmse", "val_mae"):
            if getattr(self, name) is not None:
                text += f"  {name} {FIGURES[name].show(getattr(self, name))}"
        return text

    def describe(self, epochs: int, step_name: str = "tokens") -> str:
        """The epoch as one console line."""
        return (f"epoch {self.epoch}/{epochs}  train_loss {FIGURES['train_loss'].show(self.train_loss)}  "
                f"{self.validation_text}  {rate_text(self.tokens_per_s, self.tokens_per_s_spread)} {step_name}/s  "
                f"peak {PEAK_MEMORY.show(self.peak_memory_mb, unit=True)}  "
                f"{FIGURES['epoch_time_s'].show(self.epoch_time_s, unit=True)}")


@dataclass
class RunResult:
    epochs: list[EpochMetrics]
    compile_time_s: float  # first execution of the first epoch: tracing + compilation
    padding_waste: float  # padded / computed timesteps, first epoch's layout
    real_tokens_per_epoch: int
    padded_tokens_per_epoch: int
    dropped_sequences: int
    dummy_rows: int
    n_batches: int
    vocab_size: int | None  # token ids in: the embedding's size; None: float features
    num_params: int
    device: dict[str, str] = field(default_factory=dict)
    jit_compile: bool = False
    unroll: bool = False  # model.unroll as built (auto resolved for the device and k)
    step_name: str = "tokens"  # what a step is called: tokens of text and token ids, else timesteps
    # What a model that learned nothing scores on the same validation steps (``data.baselines``).
    baseline: str = ""  # which naive guess: majority class, training mean, previous step
    baseline_accuracy: float | None = None
    baseline_rmse: float | None = None
    baseline_mae: float | None = None
    batch_size: int = 0
    learning_rate: float = 0.0  # as trained: trainer.learning_rate scaled to the batch size (lr_scaling)
    training_time_s: float = 0.0  # every epoch's training wall time
    tokens_trained: int = 0  # real tokens trained, every epoch
    target_val_loss: float | None = None  # trainer.target_val_loss
    time_to_target_s: float | None = None  # training time to the first validation at or below it; None: not reached
    tokens_to_target: int | None = None
    stopped: str = ""  # why training ended before trainer.epochs: "max_time_s" or "target_val_loss"

    @property
    def final(self) -> EpochMetrics:
        return self.epochs[-1]

    def value(self, name: str) -> float | None:
        """A figure by name: the last epoch's, else the run's own (``compile_time_s``...)."""
        return getattr(self.final if hasattr(self.final, name) else self, name)

    def objective(self, name: str = "val_loss") -> float:
        return float(self.value(name))

    def figures(self) -> dict[str, float | None]:
        """The run's own figures by name (those of its epochs are in ``EpochMetrics.figures``)."""
        return {name: value for name, value in asdict(self).items() if name in FIGURES}

    def summary(self) -> list[str]:
        """What a person wants to know once the run is done, a line each."""
        final = self.final
        return [
            f"{final.validation_text}  train_loss {FIGURES['train_loss'].show(final.train_loss)}",
            *([self.baseline_text] if self.baseline else []),
            (f"real {self.step_name}/s {rate_text(final.tokens_per_s, final.tokens_per_s_spread)} (all timesteps incl. padding "
            f"{FIGURES['padded_tokens_per_s'].show(final.padded_tokens_per_s)}/s), first execution (tracing+compile) "
            f"{FIGURES['compile_time_s'].show(self.compile_time_s, unit=True)}"),
            (f"peak memory {PEAK_MEMORY.show(final.peak_memory_mb, unit=True)} on {self.device.get('device')} "
            f"(TensorFlow allocator, this run), process RSS {FIGURES['peak_rss_mb'].show(final.peak_rss_mb, unit=True)}"),
            (f"padding waste {FIGURES['padding_waste'].show(self.padding_waste)} ({self.dummy_rows} dummy rows, "
            f"{self.dropped_sequences} sequences dropped, {self.n_batches} batches/epoch)"),
            *([self.target_text] if self.target_val_loss is not None else []),
            *([self.noise_text] if final.gradient_noise_scale is not None else []),
        ]

    @property
    def target_text(self) -> str:
        """Whether the run reached ``trainer.target_val_loss``, and what it took."""
        target = FIGURES["val_loss"].show(self.target_val_loss)
        if self.time_to_target_s is None:
            return (f"target val_loss {target} not reached in {self.training_time_s:.1f} s of training "
                    f"({self.tokens_trained:,} {self.step_name}); best {min(e.val_loss for e in self.epochs):.4f}")
        return (f"target val_loss {target} reached after {self.time_to_target_s:.1f} s of training, "
                f"{self.tokens_to_target:,} {self.step_name}")

    @property
    def noise_text(self) -> str:
        """``gradient noise scale 41.2 streams at the end (learning rate 0.003 at batch 32)``."""
        return (f"gradient noise scale {NOISE_SCALE.show(self.final.gradient_noise_scale, unit=True)} at the end "
                f"(about the critical batch); learning rate {self.learning_rate:.4g} at batch_size "
                f"{self.batch_size}")

    @property
    def baseline_text(self) -> str:
        """``baseline (majority class): val_accuracy 0.1523``: what learning nothing would score."""
        figures = {"val_accuracy": self.baseline_accuracy, "val_rmse": self.baseline_rmse, "val_mae": self.baseline_mae}
        shown = "  ".join(f"{name} {FIGURES[name].show(value)}" for name, value in figures.items() if value is not None)
        return f"baseline ({self.baseline}): {shown}"

    def to_dict(self) -> dict:
        return asdict(self)


MAX_LAYOUT_BYTES = 4 * 2**30  # a laid-out corpus larger than this is refused before it is built
BYTES_PER_PARAM = 16  # float32 weight, its gradient, Adam's two slots


def prepare(cfg: ExperimentConfig) -> Dataset:
    """The data ``cfg`` trains on, loaded and checked against its settings (before TensorFlow loads)."""
    dataset = load_dataset(cfg.data, cfg.seed)
    check_dataset(cfg, dataset)
    return dataset


def check_dataset(cfg: ExperimentConfig, dataset: Dataset) -> None:
    """Settings that can only be checked against the data, before any training or allocation."""
    task_figures = ("val_accuracy",) if dataset.io.task == DataTask.classification else ("val_rmse", "val_mae")
    for name in objective_names(cfg.objective):
        if name in ("val_accuracy", "val_rmse", "val_mae") and name not in task_figures:
            raise ConfigError("objective", name, f"this data is {dataset.io.task}, whose figures are "
                                                 f"{', '.join(task_figures)}; use one of them or another figure")
    longest = int(max(dataset.train.lengths.max(), dataset.val.lengths.max()))
    if cfg.k > longest:
        raise ConfigError("k", cfg.k, f"use a chunk length up to the longest sequence ({longest:,} steps): "
                                      "longer chunks only add padding")
    size = max(layout_bytes(dataset.train, cfg.k, cfg.batch_size, cfg.padding),
               layout_bytes(dataset.val, cfg.k, cfg.batch_size, cfg.padding))
    if size > MAX_LAYOUT_BYTES:
        raise ConfigError(
            "batch_size", cfg.batch_size,
            f"with k={cfg.k} and padding={cfg.padding} the laid-out data would take {size / 2**30:,.1f} GiB "
            f"(limit {MAX_LAYOUT_BYTES / 2**30:.0f} GiB); lower batch_size or k, use padding=pack, "
            "or read less text (data.max_chars)",
        )
    if cfg.padding == Padding.stream:
        chunks = int((-(-dataset.train.lengths // cfg.k)).sum())
        if chunks < cfg.batch_size:
            raise ConfigError("batch_size", cfg.batch_size,
                              f"padding=stream cuts the training text into batch_size rows, and it makes only "
                              f"{chunks} chunks of k={cfg.k}; use batch_size up to {chunks}, or a smaller k")
    check_model_size(cfg, dataset)
    cfg.check_engine(len(dataset.train))
    if cfg.padding == Padding.drop and len(dataset.train) < cfg.batch_size:
        raise ConfigError(
            "batch_size", cfg.batch_size,
            f"padding=drop keeps only whole batches of the {len(dataset.train)} training sequences; "
            "use a smaller batch_size or padding=dummy/pack",
        )


def check_model_size(cfg: ExperimentConfig, dataset: Dataset) -> None:
    """A built-in model whose weights, gradients and Adam's two slots (16 bytes a parameter)
    would not fit in this machine's memory is refused before TensorFlow allocates it."""
    params = cfg.model.num_params(dataset.io)
    if params is None or params * BYTES_PER_PARAM <= psutil.virtual_memory().total:
        return
    wider = dataset.io.tokens and cfg.model.embedding_dim > cfg.model.units  # the larger of the two widths
    setting = "model.embedding_dim" if wider else "model.units"
    raise ConfigError(setting, getattr(cfg.model, setting.split(".")[1]),
                      f"the model would have {params:,.0f} parameters, {params * BYTES_PER_PARAM / 2**30:,.0f} GiB "
                      f"with gradients and optimizer state, more than this machine's "
                      f"{psutil.virtual_memory().total / 2**30:,.0f} GiB; use a smaller {setting} or model.layers")


def model_size(cfg: ExperimentConfig, dataset: Dataset | None, built: int | None = None) -> str:
    """``the model has N parameters, about X MiB with gradients and optimizer state``, from the
    built model's count (``built``) or the built-in stack's; empty for a model of your own not built yet."""
    params = built if built is not None else (cfg.model.num_params(dataset.io) if dataset is not None else None)
    if params is None:
        return ""
    return f"the model has {params:,} parameters, about {params * BYTES_PER_PARAM / 2**20:,.0f} MiB with gradients " \
           "and optimizer state"


def layout_bytes(corpus, k: int, batch_size: int, padding: str) -> int:
    """Bytes ``build_layout`` would allocate for ``corpus`` (inputs, targets, weights, real
    flags and their batched copies), from the placements alone."""
    per_step = 4 * (corpus.inputs[0][0].size + corpus.targets[0][0].size) + 4 + 1
    return planned_batches(corpus, k, batch_size, padding) * batch_size * k * per_step * 2


def train(
    cfg: ExperimentConfig,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    dataset: Dataset | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    epoch_seconds: float | None = None,
    engine=None,
    validation_executions: int | None = None,
) -> RunResult:
    """Train ``cfg`` (a config checks itself when it is built); ``dataset``: what
    ``prepare(cfg)`` gave, else it is prepared here; ``engine``: what ``build(cfg, dataset)``
    gave, else it is built here. ``progress(epoch, batches_done, n_batches)`` reports within
    epochs. ``epoch_seconds`` ends each epoch once that much steady-state time is measured: a
    batch-size probe is this same run, shortened, and validates on ``validation_executions``
    executions only (its peak memory is reached in the first; None: the whole pass).
    """
    dataset = dataset if dataset is not None else prepare(cfg)
    engine = engine if engine is not None else build(cfg, dataset)
    # Validation sees every sequence: ``drop`` would silently lose some, so it pads instead.
    val_padding = Padding.dummy if cfg.padding == Padding.drop else cfg.padding
    val_layout = build_layout(dataset.val, cfg.k, cfg.batch_size, val_padding, cfg.reset)
    trainer = cfg.trainer
    epochs: list[EpochMetrics] = []
    first_layout, target, stopped = None, {}, ""
    for epoch in range(1, trainer.epochs + 1):
        order = epoch_order(len(dataset.train), cfg.seed, epoch - 1, trainer.shuffle)
        layout = build_layout(dataset.train, cfg.k, cfg.batch_size, cfg.padding, cfg.reset, order)
        first_layout = first_layout or layout
        report = None if progress is None else (lambda done, e=epoch, n=layout.n_batches: progress(e, done, n))
        spent = sum(e.epoch_time_s for e in epochs)
        time_left = None if trainer.max_time_s is None else trainer.max_time_s - spent
        try:
            epochs.append(_epoch(engine, epoch, layout, val_layout, dataset.is_text, report, epoch_seconds,
                                 validation_executions, time_left))
        except NonFiniteLoss as loss:
            raise diverged(cfg, epoch, str(loss)) from None
        if not math.isfinite(epochs[-1].val_loss):
            raise diverged(cfg, epoch, f"the validation loss became {epochs[-1].val_loss}")
        if on_epoch is not None:
            on_epoch(epochs[-1])
        if trainer.target_val_loss is not None and epochs[-1].val_loss <= trainer.target_val_loss:
            target = {"time_to_target_s": spent + epochs[-1].epoch_time_s,
                      "tokens_to_target": sum(e.tokens_trained for e in epochs)}
            stopped = "target_val_loss" if epoch < trainer.epochs else ""
            break
        if trainer.max_time_s is not None and sum(e.epoch_time_s for e in epochs) >= trainer.max_time_s:
            stopped = "max_time_s" if epoch < trainer.epochs or epochs[-1].tokens_trained < layout.real_tokens else ""
            break
    return RunResult(
        epochs=epochs, compile_time_s=epochs[0].first_execution_s, padding_waste=first_layout.padding_waste,
        real_tokens_per_epoch=first_layout.real_tokens, padded_tokens_per_epoch=first_layout.padded_tokens,
        dropped_sequences=first_layout.dropped_sequences, dummy_rows=first_layout.dummy_rows,
        n_batches=first_layout.n_batches, vocab_size=dataset.vocab_size, num_params=int(engine.model.count_params()),
        device=measure.device_description(), jit_compile=engine.jit_compile, unroll=engine.unroll,
        step_name=dataset.step_name, **_baseline(dataset),
        batch_size=cfg.batch_size, learning_rate=trainer.learning_rate_for(cfg.batch_size),
        training_time_s=sum(e.epoch_time_s for e in epochs), tokens_trained=sum(e.tokens_trained for e in epochs),
        target_val_loss=trainer.target_val_loss, stopped=stopped, **target,
    )


def diverged(cfg: ExperimentConfig, epoch: int, where: str) -> Diverged:
    """One line: where the loss stopped being finite, and what usually helps."""
    trainer, model = cfg.trainer, cfg.model
    helps = ("set trainer.clipnorm (1.0 usually works)" if trainer.clipnorm is None
             else f"lower trainer.clipnorm (now {trainer.clipnorm:g})")
    helps += f" or lower trainer.learning_rate (now {trainer.learning_rate:g})"
    if model.factory is None and model.activation == Activation.relu:
        helps += ("; the LSTM's relu activation is unbounded, so its state can grow without limit: "
                  "clipping is what usually helps, or model.activation=tanh")
    return Diverged(f"training diverged: {where} of epoch {epoch}; {helps}")


def _baseline(dataset: Dataset) -> dict:
    """The naive guess's figures (``data.baselines``) as the run's ``baseline*`` fields."""
    scores = baselines(dataset)
    return {"baseline": scores.pop("kind"), **{f"baseline_{name}": value for name, value in scores.items()}}


def build(cfg: ExperimentConfig, dataset: Dataset):
    """The model ``cfg`` asks for, checked (``model.make_model``) and compiled in its engine, in
    a process cleared of earlier experiments, with this run's peaks reset (after a budget's
    CPU region is reserved: ``measure.steady_cpu_peak``). TensorFlow loads here, once the
    config and data are known to be good."""
    prepare_tensorflow()
    load_tensorflow()
    import keras

    from tbptt_exp.core.engines import ENGINES
    from tbptt_exp.core.model import Head, make_model, make_optimizer, resolve_unroll

    # Free what an earlier experiment in this process left (sweeps run jobs in one
    # process), so that its tensors do not count in this one's peak memory.
    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(cfg.seed)
    measure.steady_cpu_peak(cfg.device.memory_budget_mb, measure.training_device())
    measure.reset_peak_memory(measure.training_device())  # this run's peak: the model, training and validation
    measure.reset_peak_rss()
    unroll = resolve_unroll(cfg.model.unroll) and cfg.model.factory is None
    model = make_model(cfg.model, dataset.io, cfg.batch_size, cfg.k, unroll=unroll, precision=cfg.trainer.precision)
    head = Head(dataset.io, from_logits=not cfg.model.softmax_output, target_scale=dataset.target_scale)
    optimizer = make_optimizer(cfg.trainer, cfg.batch_size)
    engine = ENGINES[cfg.engine.name](model, cfg.trainer, head=head, optimizer=optimizer)
    engine.unroll = unroll  # as built: auto resolved for the device, never for a model of your own
    return engine


def _epoch(engine, epoch: int, layout: Layout, val_layout: Layout, is_text: bool,
           report: Callable[[int], None] | None, seconds: float | None,
           validation_executions: int | None = None, time_left_s: float | None = None) -> EpochMetrics:
    """Train one epoch (cut after ``time_left_s`` of training), validate, and measure both."""
    result = engine.train_epoch(layout, report, stop_after_s=seconds, time_left_s=time_left_s)
    started = time.perf_counter()
    validation = engine.validate(val_layout, validation_executions)
    validation_s = time.perf_counter() - started
    val_loss = validation["loss"]
    timing = result.timing
    speed = measure.throughput(timing, layout.real_tokens_per_batch, layout.batch_size * layout.k)
    return EpochMetrics(
        epoch=epoch,
        train_loss=result.loss,
        val_loss=val_loss,
        tokens_per_s=speed.tokens_per_s,
        padded_tokens_per_s=speed.padded_tokens_per_s,
        tokens_per_s_spread=speed.tokens_per_s_spread,
        peak_memory_mb=measure.peak_memory_mb(measure.training_device(), floor_mb=engine.weights_mb),
        peak_rss_mb=measure.peak_rss_mb(),
        epoch_time_s=timing.wall_s,
        first_execution_s=timing.first_execution_s,
        validation_time_s=validation_s,
        val_bits_per_char=val_loss / math.log(2) if is_text else None,
        val_accuracy=validation.get("accuracy"),
        val_rmse=validation.get("rmse"),
        val_mae=validation.get("mae"),
        gradient_noise_scale=result.gradient_noise_scale,
        tokens_trained=layout.real_tokens_done(timing.batches),
        steps=timing.batches,
    )
