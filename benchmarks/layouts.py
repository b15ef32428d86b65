"""Layouts on heavy-tailed real text: what each buys after the same wall time.

    python benchmarks/layouts.py --seconds 60     # prints a Markdown table; figures go in RESULTS.md

Whole documents of the embedded corpus (the standard library's sources, 37 to 229,201
characters) trained with the default model for the same steady-state wall time in each
layout: ``dummy`` (the classic recipe), ``pack``, ``stream``, and documents cut at a
maximum length (packed). Each variant trains for SECONDS after its first execution, then is
validated on the same held-out text: the last 10% of the corpus. Variants run one after the
other in this one process, and ``--rounds 2`` repeats the sequence, so load from a noisy
neighbour hits every variant alike.
"""

from __future__ import annotations

import argparse
import statistics

from tbptt_exp.core.config import CharsDataConfig, ExperimentConfig, TrainerConfig

VARIANTS = {
    "dummy (classic recipe)": ("dummy", None),
    "pack": ("pack", None),
    "stream": ("stream", None),
    "documents cut at 2,000, pack": ("pack", 2000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="steady-state training seconds per variant")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-chars", type=int, default=400_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=25)
    args = parser.parse_args()

    import keras

    from tbptt_exp.core.data import chars
    from tbptt_exp.core.layout import build_layout
    from tbptt_exp.core.train import train

    figures: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(args.rounds):
        for name, (padding, max_length) in VARIANTS.items():
            data = CharsDataConfig(cut="documents", max_chars=args.max_chars, max_sequence_length=max_length)
            cfg = ExperimentConfig(k=args.k, batch_size=args.batch_size, padding=padding, data=data,
                                   trainer=TrainerConfig(epochs=1))
            dataset = chars(data, cfg.seed)
            waste = build_layout(dataset.train, cfg.k, cfg.batch_size, padding).padding_waste
            keras.backend.clear_session()
            result = train(cfg, dataset=dataset, epoch_seconds=args.seconds)
            final = result.final
            figures.setdefault(name, []).append((final.tokens_per_s, final.val_bits_per_char, waste))
            print(f"  {name:30s} {final.tokens_per_s:9,.0f} real tokens/s  val {final.val_bits_per_char:.3f} "
                  f"bits/char  waste {waste:.1%}", flush=True)

    base = statistics.median(t for t, _, _ in figures["dummy (classic recipe)"])
    print(f"\n{args.max_chars:,} characters of whole documents, k={args.k}, batch_size={args.batch_size}, "
          f"{args.seconds:g} s of training each, {args.rounds} round(s)\n")
    print("| layout | padding waste | real tokens/s | vs classic | val bits/char after the same time |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in figures.items():
        tokens = statistics.median(t for t, _, _ in rows)
        bpc = statistics.median(b for _, b, _ in rows)
        print(f"| {name} | {rows[0][2]:.1%} | {tokens:,.0f} | {tokens / base:.1f}x | {bpc:.3f} |")


if __name__ == "__main__":
    main()
