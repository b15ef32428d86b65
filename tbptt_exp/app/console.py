"""What a person reads on the console: one prefix, one line per event, a progress bar on a
terminal (a line every few seconds in a log file), and none of the libraries' start-up chatter."""

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


class Progress:
    """Batches done in the current epoch: a tqdm bar on a terminal, else a line every 10 s.

    Called as ``progress(epoch, batches_done, n_batches)``; ``close()`` at the end of an
    epoch, before its summary line is printed.
    """

    def __init__(self, stream=None, every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.bar = None
        self.line = throttled(every_s, lambda epoch, done, total: say(f"epoch {epoch}: {done}/{total} batches"))

    def __call__(self, epoch: int, done: int, total: int) -> None:
        if not self.stream.isatty():
            self.line(epoch, done, total)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{PREFIX} epoch {epoch}", unit="batch", leave=False,
                            file=self.stream, dynamic_ncols=True)
        self.bar.update(min(done, total) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def verbose_requested(argv: list[str]) -> bool:
    """``verbose=true`` on the command line (the last one wins), before Hydra composes."""
    verbose = False
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "verbose":
            verbose = value.strip().lower() in ("true", "yes", "1", "on")
    return verbose


def quiet_libraries(verbose: bool) -> None:
    """Keep TensorFlow's C++ start-up lines, absl, MLflow's and alembic's INFO lines and
    matplotlib's font-cache note off the console, unless ``verbose``.

    TensorFlow reads its log level once, when it loads, so this runs before it does; the
    environment carries the level to probe and worker processes. Errors still surface as
    Python exceptions with their messages.
    """
    import logging
    import os

    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO"
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"  # read when MLflow configures its loggers
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in ("mlflow", "alembic", "absl", "tensorflow", "h5py", "numexpr"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # "building the font cache" is a warning


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
