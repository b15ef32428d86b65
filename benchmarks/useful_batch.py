"""Does the useful batch train well? The finder's answer checked at equal wall time.

    python benchmarks/useful_batch.py --k 25 --budget-mb 150 --seconds 60 --extra 64,96

1. ``find_max_batch`` for k within the budget (no cache): the largest batch that fits, and
   the useful one (highest goodput by the gradient noise scale of its warm-up).
2. The same model trained from scratch for the same ``--seconds`` of training time
   (``trainer.max_time_s``) at batch 32, the useful size, the largest size and any
   ``--extra`` sizes, each at the harness's own learning-rate scaling
   (``trainer.lr_scaling=sqrt``), in one process, one after another.
3. A Markdown table: val_loss per size, the optimizer steps and tokens each took in that
   time, and whether the useful size is within 2% of the better of 32 and the largest.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from tbptt_exp.app.settings import BatchFinderConfig, RunConfig
from tbptt_exp.core.config import DeviceConfig


def check(k: int, budget_mb: float, seconds: float, extra: list[int], say=print) -> tuple[dict, list[str]]:
    from tbptt_exp.app.batch.finder import find_max_batch
    from tbptt_exp.core.train import train

    cfg = RunConfig(k=k, device=DeviceConfig(memory_budget_mb=budget_mb),
                           batch_finder=BatchFinderConfig(cache=False))
    frontier = find_max_batch(cfg, say=say)
    say(frontier.answer())
    sizes = {32: "batch 32", frontier.useful_batch_size: "useful", frontier.max_batch_size: "largest that fits"}
    for size in extra:
        sizes.setdefault(size, "")
    trained = {}
    for size in sorted(sizes):
        run = replace(cfg, batch_size=size, trainer=replace(cfg.trainer, epochs=1_000_000, max_time_s=seconds))
        result = train(run)
        trained[size] = result
        say(f"B={size}: val_loss {result.final.val_loss:.4f} after {result.training_time_s:.1f} s, "
            f"{result.tokens_trained:,} tokens, lr {result.learning_rate:.4g}, "
            f"noise scale {result.final.gradient_noise_scale}")
    best_reference = min(trained[32].final.val_loss, trained[frontier.max_batch_size].final.val_loss)
    useful_loss = trained[frontier.useful_batch_size].final.val_loss
    lines = [
        (f"| batch size | which | learning rate (sqrt) | val_loss after {seconds:g} s | steps | real tokens | "
         "probe tokens/s | probe goodput | noise scale at the end |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    probes = {p.batch_size: p for p in frontier.probe_log}
    for size, result in trained.items():
        steps = sum(e.steps for e in result.epochs)
        probe = probes.get(size)
        rate, good = (probe.tokens_per_s, probe.goodput) if probe else (None, None)
        noise = result.final.gradient_noise_scale
        lines.append(f"| {size} | {sizes[size]} | {result.learning_rate:.4g} | {result.final.val_loss:.4f} | "
                     f"{steps:,} | {result.tokens_trained:,} | {'' if rate is None else f'{rate:,.0f}'} | "
                     f"{'' if good is None else f'{good:,.0f}'} | {'' if noise is None else f'{noise:,.0f}'} |")
    verdict = {"useful": frontier.useful_batch_size, "largest": frontier.max_batch_size,
               "critical": frontier.critical_batch_size, "useful_val_loss": useful_loss,
               "best_of_32_and_largest": best_reference, "within": useful_loss <= 1.02 * best_reference}
    lines.append(f"\nuseful {verdict['useful']} (critical ≈ {verdict['critical']}; noise scale "
                 f"{frontier.noise_measured}): val_loss {useful_loss:.4f} vs the better of 32 and {verdict['largest']}: "
                 f"{best_reference:.4f} ({useful_loss / best_reference - 1:+.1%}; within 2%: {verdict['within']})")
    return verdict, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--budget-mb", type=float, default=150.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--extra", default="", help="more batch sizes to train, comma-separated")
    args = parser.parse_args()
    extra = [int(b) for b in args.extra.split(",") if b]
    _, lines = check(args.k, args.budget_mb, args.seconds, extra)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
