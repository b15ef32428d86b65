"""What a person reads on the console: one prefix, one line per event, throttled progress."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

PREFIX = "[tbptt-exp]"


def say(line: str) -> None:
    print(f"{PREFIX} {line}", flush=True)


def error(line: str) -> None:
    """A one-line error for the user, on stderr."""
    print(f"tbptt-exp: error: {line}", file=sys.stderr, flush=True)


def throttled(every_s: float, fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` at most once every ``every_s`` seconds (progress inside an epoch)."""
    last = [time.perf_counter()]

    def call(*args: Any) -> None:
        now = time.perf_counter()
        if now - last[0] >= every_s:
            last[0] = now
            fn(*args)

    return call


def mb(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,.1f} MB"


def spread_text(spread: float | None) -> str:
    """A rate's interquartile range as ± half of it; nothing for a single window."""
    return "" if spread is None else f" ± {spread / 2:,.0f}"


def epoch_line(m, epochs: int) -> str:
    bpc = f" ({m.val_bits_per_char:.3f} bits/char)" if m.val_bits_per_char is not None else ""
    return (
        f"epoch {m.epoch}/{epochs}  train_loss {m.train_loss:.4f}  val_loss {m.val_loss:.4f}{bpc}  "
        f"{m.tokens_per_s:,.0f}{spread_text(m.tokens_per_s_spread)} tokens/s  peak {mb(m.peak_memory_mb)}  "
        f"{m.epoch_time_s:.1f} s"
    )
