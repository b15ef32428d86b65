"""What measuring the gradient noise scale costs: tokens/s with and without, side by side.

    python benchmarks/noise_scale.py --rounds 7     # a Markdown table; figures go in RESULTS.md

One graph engine (one model, one compiled graph) trained epoch after epoch, measuring every
``trainer.noise_scale_every`` steps (default 50) in one epoch and not at all in the next
(0: off), in ABBA order, so the machine's drift hits both alike. Two engines built side by
side were tried first: which of them ran faster changed from one run to the next by more
than the cost measured here. Each figure is the steady-state real tokens/s of one epoch
(``core.measure``), the first round (compilation) left out; the ratio is the median of the
per-round ratios. The peak memory is the allocator's over each kind of epoch.
"""

from __future__ import annotations

import argparse
import statistics

from tbptt_exp.core.config import CharsDataConfig, ExperimentConfig, TrainerConfig


def overhead(rounds: int, batch_size: int, k: int, every: int, max_chars: int) -> list[str]:
    from tbptt_exp.core import measure
    from tbptt_exp.core.layout import build_layout, epoch_order
    from tbptt_exp.core.train import build, prepare

    cfg = ExperimentConfig(k=k, batch_size=batch_size, data=CharsDataConfig(max_chars=max_chars),
                           trainer=TrainerConfig(noise_scale_every=every))
    dataset = prepare(cfg)
    engine = build(cfg, dataset)
    rates: dict[str, list[float]] = {"on": [], "off": []}
    peaks: dict[str, float] = {}
    for round_ in range(rounds + 1):
        for i, name in enumerate(("on", "off") if round_ % 2 else ("off", "on")):  # ABBA: drift hits both alike
            engine.noise_every = every if name == "on" else 0
            layout = build_layout(dataset.train, k, batch_size, cfg.padding, cfg.reset,
                                  epoch_order(len(dataset.train), cfg.seed, 2 * round_ + i, True))
            measure.reset_peak_memory(measure.training_device())
            result = engine.train_epoch(layout)
            speed = measure.throughput(result.timing, layout.real_tokens_per_batch, batch_size * k)
            peaks[name] = max(peaks.get(name, 0.0), measure.peak_memory_mb(measure.training_device()) or 0.0)
            if round_:  # round 0 compiles
                rates[name].append(speed.tokens_per_s)
            print(f"  round {round_} noise {name:3s} {speed.tokens_per_s:9.0f} tokens/s"
                  f"  noise scale {result.gradient_noise_scale}", flush=True)
    ratios = [a / b for a, b in zip(rates["on"], rates["off"])]
    return [
        (f"| B | k | noise_scale_every | tokens/s on (median) | tokens/s off (median) | on/off (median of {rounds} "
         "rounds, min-max) | peak MB on | peak MB off |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        (f"| {batch_size} | {k} | {every} | {statistics.median(rates['on']):,.0f} | "
         f"{statistics.median(rates['off']):,.0f} | {statistics.median(ratios):.3f} ({min(ratios):.3f}-"
         f"{max(ratios):.3f}) | {peaks['on']:.1f} | {peaks['off']:.1f} |"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--max-chars", type=int, default=150_000)
    args = parser.parse_args()
    print("\n".join(overhead(args.rounds, args.batch_size, args.k, args.every, args.max_chars)))


if __name__ == "__main__":
    main()
