"""How often the nightly verdict cries wolf, and the smallest slowdown it still catches.

Reads the ``nightly_results.json`` of nights run back to back with unchanged code (every
file under FOLDER, oldest first) and judges them with the nightly's own rules:

- false alarms: each night against the night before it (red verdicts: regressed or gap);
- sensitivity: for each pair of nights, tonight's ``tokens_per_s`` samples slowed down by
  s (divided by 1 + s) — the share of entries judged *regressed*, per s.

    python -m tbptt_exp -m sweep=nightly ...   # N times, unchanged code
    python benchmarks/nightly_sensitivity.py multirun/ [--without peak_memory_mb]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from tbptt_exp.app.nightly.baseline import samples_of
from tbptt_exp.app.nightly.nightly import compare, night_verdict
from tbptt_exp.app.settings import NightlyConfig

SLOWDOWNS = (0.05, 0.10, 0.15, 0.175, 0.20, 0.25, 0.30, 0.40)


def slowed(samples: dict, s: float) -> dict:
    return {name: {**figures, "tokens_per_s": [v / (1 + s) for v in figures["tokens_per_s"]]}
            for name, figures in samples.items()}


def main(folder: str, without: list[str]) -> None:
    files = sorted(Path(folder).rglob("nightly_results.json"), key=lambda p: json.loads(p.read_text())["date"])
    nights = [samples_of(json.loads(p.read_text())) for p in files]
    cfg = NightlyConfig()
    cfg.thresholds = {f: t for f, t in cfg.thresholds.items() if f not in without}  # as ~nightly.thresholds.F
    pairs = list(itertools.pairwise(nights))
    print(f"{len(nights)} nights, {len(pairs)} back-to-back comparisons, "
          f"{len(nights[0])} entries, {len(next(iter(nights[0].values()))['tokens_per_s'])} rounds each\n")
    verdicts = [night_verdict(compare(now, base, cfg), True) for base, now in pairs]
    red = sum(v in ("regressed", "gap") for v in verdicts)
    print(f"false alarms (red nights, unchanged code): {red} of {len(pairs)}; verdicts: {', '.join(verdicts)}\n")
    print("| slowdown of tokens/s | entries judged regressed | inconclusive | ok |")
    print("|---:|---:|---:|---:|")
    for s in SLOWDOWNS:
        rows = [r for base, now in pairs for r in compare(slowed(now, s), base, cfg) if r.figure == "tokens_per_s"]
        count = {v: sum(r.verdict == v for r in rows) for v in ("regressed", "inconclusive", "ok")}
        print(f"| {s:.1%} | {count['regressed']}/{len(rows)} | {count['inconclusive']} | {count['ok']} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="multirun")
    parser.add_argument("--without", action="append", default=[], help="a figure not judged (repeatable)")
    args = parser.parse_args()
    main(args.folder, args.without)
