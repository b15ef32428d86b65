"""Core benchmark: engine throughput and padding waste, measured side by side in one run.

    python benchmarks/core.py            # prints a Markdown table; figures go in RESULTS.md

1. Real tokens/s of ``graph`` (steps_per_execution 1 and 8) vs ``keras_fit``, on the
   ``seed`` model and the default model, same data and seed. Configurations run in
   interleaved rounds (A B C A B C ...) and each figure is the median over rounds of the
   last epoch's steady-state throughput, so a noisy neighbour hits all of them alike.
2. Padding waste of ``dummy`` vs ``pack`` (and ``drop``'s lost sequences) on whole-document
   ``chars`` (one stdlib file per sequence) for a few batch sizes; layout only, no training.
"""

from __future__ import annotations

import argparse
import statistics

from tbptt_exp.core.config import (
    CharsDataConfig,
    EngineConfig,
    ExperimentConfig,
    ModelConfig,
    TrainerConfig,
    seed_model,
)
from tbptt_exp.core.data import chars
from tbptt_exp.core.layout import build_layout


def engine_throughput(rounds: int, max_chars: int, k: int, batch_size: int) -> list[str]:
    import keras

    from tbptt_exp.core.train import train

    data = CharsDataConfig(max_chars=max_chars, sequence_length=200)
    variants = {
        "keras_fit": (EngineConfig("keras_fit"), 1),
        "graph": (EngineConfig("graph"), 1),
        "graph, steps_per_execution=8": (EngineConfig("graph"), 8),
    }
    models = {"seed": seed_model(), "default (lstm)": ModelConfig()}
    figures: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for model_name, model in models.items():
            for variant, (engine, spe) in variants.items():
                cfg = ExperimentConfig(
                    k=k, batch_size=batch_size, data=data, model=model, engine=engine,
                    trainer=TrainerConfig(epochs=2, steps_per_execution=spe),
                )
                keras.backend.clear_session()
                result = train(cfg)
                figures.setdefault((model_name, variant), []).append(result.final.tokens_per_s)
                print(f"  {model_name:15s} {variant:30s} {result.final.tokens_per_s:9.0f} tokens/s", flush=True)

    lines = [
        f"| model | engine | real tokens/s (median of {rounds}) | vs keras_fit |",
        "|---|---|---:|---:|",
    ]
    for model_name in models:
        base = statistics.median(figures[(model_name, "keras_fit")])
        for variant in variants:
            value = statistics.median(figures[(model_name, variant)])
            lines.append(f"| {model_name} | {variant} | {value:,.0f} | {value / base:.2f}x |")
    return lines


def padding_waste(max_chars: int, k: int, batch_sizes: list[int]) -> list[str]:
    ds = chars(CharsDataConfig(cut="documents", max_chars=max_chars), seed=0)
    corpus = ds.train
    lines = [
        (f"Whole-document chars: {len(corpus)} training documents, {corpus.num_tokens:,} real tokens, "
        f"lengths {corpus.lengths.min()}..{corpus.lengths.max()} (median {int(statistics.median(corpus.lengths))}), k={k}."),
        "",
        "| batch size | dummy: waste | dummy: batches | pack: waste | pack: batches | drop: sequences lost |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b in batch_sizes:
        dummy = build_layout(corpus, k, b, "dummy")
        pack = build_layout(corpus, k, b, "pack")
        drop = build_layout(corpus, k, b, "drop") if len(corpus) >= b else None
        lost = f"{drop.dropped_sequences}" if drop else "all"
        lines.append(
            f"| {b} | {dummy.padding_waste:.1%} | {dummy.n_batches} | {pack.padding_waste:.1%} | "
            f"{pack.n_batches} | {lost} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-chars", type=int, default=60_000, help="text for the throughput runs")
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--doc-chars", type=int, default=3_000_000, help="text for the padding table")
    args = parser.parse_args()

    print("## Padding waste\n")
    print("\n".join(padding_waste(args.doc_chars, args.k, [8, 32, 128])), flush=True)
    print("\n## Engine throughput\n", flush=True)
    table = engine_throughput(args.rounds, args.max_chars, args.k, args.batch_size)
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
