"""One experiment: config -> data -> layout -> engine -> measurements, as plain data.

This is the function every driver calls (the CLI, sweeps, the batch-size finder);
none of them re-implements training. ``on_epoch`` receives each epoch's figures as they
are measured (progress, tracking, pruning).
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from tbptt_exp.core.config import ConfigError, ExperimentConfig, validate
from tbptt_exp.core.data import Dataset, load_dataset
from tbptt_exp.core.layout import build_layout, epoch_order


@dataclass
class EpochMetrics:
    """One epoch's figures, each defined in ``measure`` (a new field is logged as a new metric)."""

    epoch: int
    train_loss: float
    val_loss: float
    tokens_per_s: float  # real tokens per second: median of steady-state windows
    padded_tokens_per_s: float  # all timesteps computed per second (real + padding), median
    tokens_per_s_spread: Optional[float]  # interquartile range of the windows' real-token rates
    peak_memory_mb: Optional[float]  # allocator peak on the training device since the run started; None: unknown
    peak_rss_mb: float  # process resident-set high-water mark since the run started
    epoch_time_s: float  # wall time of the epoch's training (layout and validation excluded)
    first_execution_s: float  # the first execution, timed on its own
    val_bits_per_char: Optional[float] = None


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
    vocab_size: int
    num_params: int
    device: dict[str, str] = field(default_factory=dict)
    jit_compile: bool = False
    unroll: bool = False  # model.unroll as built (auto resolved for the device and k)

    @property
    def final(self) -> EpochMetrics:
        return self.epochs[-1]

    def objective(self, name: str = "val_loss") -> float:
        return float(getattr(self.final, name))

    def to_dict(self) -> dict:
        return asdict(self)


MAX_LAYOUT_BYTES = 4 * 2**30  # a laid-out corpus larger than this is refused before it is built


def check_dataset(cfg: ExperimentConfig, dataset: Dataset) -> None:
    """Settings that can only be checked against the data, before any training or allocation."""
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
    if cfg.padding == "stream":
        chunks = int((-(-dataset.train.lengths // cfg.k)).sum())
        if chunks < cfg.batch_size:
            raise ConfigError("batch_size", cfg.batch_size,
                              f"padding=stream cuts the training text into batch_size rows, and it makes only "
                              f"{chunks} chunks of k={cfg.k}; use batch_size up to {chunks}, or a smaller k")
        if cfg.engine.name == "keras_fit" and cfg.reset == "sequence" and len(dataset.train) > 1:
            raise ConfigError("padding", "stream",
                              "engine=keras_fit resets all rows at once, and streams reset each row where its "
                              "document starts; use engine=graph (or one text, or reset=never)")
    if cfg.padding == "drop" and len(dataset.train) < cfg.batch_size:
        raise ConfigError(
            "batch_size", cfg.batch_size,
            f"padding=drop keeps only whole batches of the {len(dataset.train)} training sequences; "
            "use a smaller batch_size or padding=dummy/pack",
        )


def layout_bytes(corpus, k: int, batch_size: int, padding: str) -> int:
    """Bytes ``build_layout`` would allocate for ``corpus`` (inputs, targets, weights and
    their batched copies), from the placements alone."""
    from tbptt_exp.core.layout import planned_batches

    return planned_batches(corpus, k, batch_size, padding) * batch_size * k * 12 * 2


def train(
    cfg: ExperimentConfig,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    dataset: Dataset | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    epoch_seconds: float | None = None,
) -> RunResult:
    """Train ``cfg``; ``progress(epoch, batches_done, n_batches)`` reports within epochs.

    ``epoch_seconds`` ends each epoch once that much steady-state time is measured: a
    batch-size probe is this same run, shortened.
    """
    validate(cfg)
    dataset = dataset or load_dataset(cfg.data, cfg.seed)
    check_dataset(cfg, dataset)

    from tbptt_exp.core.device import load_tensorflow, prepare_tensorflow

    prepare_tensorflow()
    load_tensorflow()  # TensorFlow loads here, after the config and data are known to be good
    import keras

    from tbptt_exp.core import measure
    from tbptt_exp.core.engines import ENGINES
    from tbptt_exp.core.model import build_model, make_optimizer, resolve_unroll

    # Free what an earlier experiment in this process left (sweeps run jobs in one
    # process), so that its tensors do not count in this one's peak memory.
    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(cfg.seed)
    device = measure.training_device()
    measure.reset_peak_memory(device)  # this run's peak: the model, training and validation
    measure.reset_peak_rss()
    unroll = resolve_unroll(cfg.model.unroll)
    model = build_model(cfg.model, dataset.vocab_size, cfg.batch_size, cfg.k,
                        unroll=unroll, precision=cfg.trainer.precision)
    engine = ENGINES[cfg.engine.name](
        model, cfg.trainer, from_logits=not cfg.model.softmax_output, optimizer=make_optimizer(cfg.trainer)
    )
    # Validation sees every sequence: ``drop`` would silently lose some, so it pads instead.
    val_layout = build_layout(
        dataset.val, cfg.k, cfg.batch_size, "dummy" if cfg.padding == "drop" else cfg.padding, cfg.reset
    )
    epochs: list[EpochMetrics] = []
    first_layout = None
    compile_time_s = 0.0
    for epoch in range(cfg.trainer.epochs):
        order = epoch_order(len(dataset.train), cfg.seed, epoch, cfg.trainer.shuffle)
        layout = build_layout(dataset.train, cfg.k, cfg.batch_size, cfg.padding, cfg.reset, order)
        first_layout = first_layout or layout
        report = None
        if progress is not None:
            report = lambda done, e=epoch + 1, n=layout.n_batches: progress(e, done, n)  # noqa: E731
        result = engine.train_epoch(layout, report, stop_after_s=epoch_seconds)
        val_loss = engine.evaluate(val_layout)
        t = result.timing
        speed = measure.throughput(t, layout.real_tokens_per_batch, layout.batch_size * layout.k)
        if epoch == 0:
            compile_time_s = t.first_execution_s
        metrics = EpochMetrics(
            epoch=epoch + 1,
            train_loss=result.loss,
            val_loss=val_loss,
            tokens_per_s=speed.tokens_per_s,
            padded_tokens_per_s=speed.padded_tokens_per_s,
            tokens_per_s_spread=speed.tokens_per_s_spread,
            peak_memory_mb=measure.peak_memory_mb(device),
            peak_rss_mb=measure.peak_rss_mb(),
            epoch_time_s=t.wall_s,
            first_execution_s=t.first_execution_s,
            val_bits_per_char=val_loss / math.log(2) if dataset.is_text else None,
        )
        epochs.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)

    return RunResult(
        epochs=epochs,
        compile_time_s=compile_time_s,
        padding_waste=first_layout.padding_waste,
        real_tokens_per_epoch=first_layout.real_tokens,
        padded_tokens_per_epoch=first_layout.padded_tokens,
        dropped_sequences=first_layout.dropped_sequences,
        dummy_rows=first_layout.dummy_rows,
        n_batches=first_layout.n_batches,
        vocab_size=dataset.vocab_size,
        num_params=int(model.count_params()),
        device=measure.device_description(),
        jit_compile=engine.jit_compile,
        unroll=unroll,
    )
