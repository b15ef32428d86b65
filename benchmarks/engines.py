"""Engine speed: the classic recipe, a minimal hand-written loop and ``graph``, side by side.

    python benchmarks/engines.py              # prints Markdown tables; figures go in RESULTS.md
    python benchmarks/engines.py --rounds 3 --k 25 --models default

Contenders, on the same data, model and batch shapes:

- **classic recipe**: the published stateful-LSTM recipe — ``model.fit(shuffle=False)``,
  dummy rows with zero sample weights, a callback that resets state between groups of
  sequences; no unrolling, float32 (``engine=keras_fit model.unroll=false``).
- **minimal loop**: what one would write by hand — one ``tf.function`` train step (mean
  loss, no resets, no sample weights) called once per batch; no unrolling, float32.
- **graph** with its defaults (``model.unroll=auto``: not unrolled; float32), and with one
  option changed at a time.

Every contender trains two epochs and is measured on the second exactly as a run is
(``tbptt_exp.core.measure``: median real tokens/s over steady-state windows). Contenders
run interleaved (A B C ... A B C ...) in one process and each figure is the median over
rounds, so a noisy neighbour hits all of them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable

from tbptt_exp.core.config import (
    CharsDataConfig,
    EngineConfig,
    ExperimentConfig,
    ModelConfig,
    TrainerConfig,
    seed_model,
)
from tbptt_exp.core.data import load_dataset
from tbptt_exp.core.device import prepare_tensorflow

MODELS = {"default": ModelConfig, "seed": seed_model}


@dataclasses.dataclass
class Figures:
    tokens_per_s: float
    peak_memory_mb: float | None


def run_engine(cfg: ExperimentConfig, dataset) -> Figures:
    from tbptt_exp.core.train import train

    result = train(cfg, dataset=dataset)
    return Figures(result.final.tokens_per_s, result.final.peak_memory_mb)


def run_minimal_loop(cfg: ExperimentConfig, dataset) -> Figures:
    """The hand-written baseline: build the same model, then a plain per-batch loop."""
    import gc

    import keras
    import tensorflow as tf

    from tbptt_exp.core import measure
    from tbptt_exp.core.layout import build_layout
    from tbptt_exp.core.model import build_model, make_optimizer

    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(cfg.seed)
    device = measure.training_device()
    measure.reset_peak_memory(device)
    model = build_model(cfg.model, dataset.vocab_size, cfg.batch_size, cfg.k, unroll=False)
    optimizer = make_optimizer(cfg.trainer)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=not cfg.model.softmax_output)
    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    layout = build_layout(dataset.train, cfg.k, cfg.batch_size, cfg.padding, cfg.reset)
    for _ in range(cfg.trainer.epochs):
        timing = measure.EpochTiming()
        for i in range(layout.n_batches):
            loss = train_step(layout.inputs[i], layout.targets[i])
            if timing.due():
                float(loss)
                timing.mark(i + 1)
        float(loss)
        timing.finish(layout.n_batches)
    speed = measure.throughput(timing, layout.real_tokens_per_batch, layout.batch_size * layout.k)
    return Figures(speed.tokens_per_s, measure.peak_memory_mb(device))


def contenders(model: ModelConfig, k: int, batch_size: int, data: CharsDataConfig, precisions: list[str],
               extra: dict[str, dict]) -> dict[str, tuple[Callable, ExperimentConfig]]:
    def config(engine="graph", unroll="auto", **trainer) -> ExperimentConfig:
        return ExperimentConfig(
            k=k, batch_size=batch_size, data=data,
            model=dataclasses.replace(model, unroll=unroll), engine=EngineConfig(engine),
            trainer=TrainerConfig(epochs=2, **trainer),
        )

    runs = {
        "classic recipe (keras_fit)": (run_engine, config("keras_fit", unroll=False)),
        "minimal loop": (run_minimal_loop, config(unroll=False)),
        "graph (defaults)": (run_engine, config()),
        "graph, unroll=true": (run_engine, config(unroll=True)),
    }
    for precision in precisions:
        if precision != "float32":
            runs[f"graph, {precision}"] = (run_engine, config(precision=precision))
    for name, settings in extra.items():
        runs[name] = (run_engine, config(**settings))
    return runs


def parse_extra(items: list[str]) -> dict[str, dict]:
    """``--extra "spe=8:steps_per_execution=8"`` -> {"graph, spe=8": {"steps_per_execution": 8}}."""
    import yaml

    extra = {}
    for item in items:
        label, _, settings = item.partition(":")
        extra[f"graph, {label}"] = {
            key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in settings.split(","))
        }
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--models", nargs="+", default=["default", "seed"], choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-chars", type=int, default=100_000, help="text per run (90%% trains)")
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--extra", action="append", default=[],
                        help='another graph contender, "label:setting=value,..." (trainer or model.unroll)')
    args = parser.parse_args()
    prepare_tensorflow()

    data = CharsDataConfig(max_chars=args.max_chars, sequence_length=200)
    dataset = load_dataset(data, 0)
    extra = parse_extra(args.extra)
    tables = {}
    for model_name in args.models:
        for k in args.k:
            tables[(model_name, k)] = contenders(MODELS[model_name](), k, args.batch_size, data, args.precisions, extra)
    figures: dict[tuple, list[Figures]] = {}
    for r in range(args.rounds):
        for (model_name, k), runs in tables.items():
            for name, (run, cfg) in runs.items():
                f = run(cfg, dataset)
                figures.setdefault((model_name, k, name), []).append(f)
                print(f"round {r + 1} {model_name:7s} k={k:<3d} {name:30s} {f.tokens_per_s:9,.0f} tokens/s", flush=True)

    print()
    for (model_name, k), runs in tables.items():
        classic = statistics.median(f.tokens_per_s for f in figures[(model_name, k, "classic recipe (keras_fit)")])
        minimal = statistics.median(f.tokens_per_s for f in figures[(model_name, k, "minimal loop")])
        print(f"\n{model_name} model, k={k}, batch {args.batch_size}, median of {args.rounds} rounds\n")
        print("| contender | real tokens/s | (min-max) | vs classic | vs minimal loop | peak memory MB |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in runs:
            samples = figures[(model_name, k, name)]
            speeds = [f.tokens_per_s for f in samples]
            value = statistics.median(speeds)
            peaks = [f.peak_memory_mb for f in samples if f.peak_memory_mb is not None]
            peak = f"{statistics.median(peaks):,.1f}" if peaks else "unknown"
            print(f"| {name} | {value:,.0f} | {min(speeds):,.0f}-{max(speeds):,.0f} | {value / classic:.2f}x | "
                  f"{value / minimal:.2f}x | {peak} |")


if __name__ == "__main__":
    main()
