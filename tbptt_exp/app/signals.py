"""SIGTERM ends a job the way Ctrl-C does, so its MLflow run ends KILLED, not RUNNING.

Both raise in the main thread wherever it is, except inside a store write: an exception
raised half-way through a SQLite transaction leaves this process holding the database's
write lock, and the writes that end the run and its trial then wait on it (MLflow's busy
timeout is 20 s per statement) and fail. Store calls run inside ``deferred()`` (the
tracking client is wrapped in ``Deferring``), so the interrupt is raised when the write
is done.

Raised at an arbitrary point, an interrupt can also be lost: Python drops what a finaliser
raises (a ``__del__``, a weakref callback run by the garbage collector), and some libraries
swallow it with a bare ``except`` or turn it into another error (an import left half-done).
So an interrupt, once received, is kept: ``check()`` raises it again wherever the harness
passes a safe point (start-up done, a job starting, each progress window of training, each
probe of the batch finder), and the command reports any error raised after it as the
interrupt.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

_terminated = False
_depth = 0  # how many deferred() blocks the main thread is in
_pending: KeyboardInterrupt | None = None
_received: KeyboardInterrupt | None = None  # the first interrupt, kept until the process exits


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _interrupt(error: KeyboardInterrupt) -> None:
    global _pending, _received
    _received = _received or error
    if _depth:
        _pending = _pending or error
        return
    raise error


def _on_sigterm(signum, frame):
    global _terminated
    _terminated = True
    _interrupt(Terminated("terminated by SIGTERM"))


def _on_sigint(signum, frame):
    _interrupt(KeyboardInterrupt())


def _unraisable(unraisable) -> None:
    """An interrupt that landed in a finaliser is dropped by Python with an "Exception ignored"
    report; it is kept (``_received``) and raised at the next ``check()``, so say nothing."""
    if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _received is not None):
        sys.__unraisablehook__(unraisable)


def install() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable


def ignore() -> None:
    """From here on Ctrl-C and SIGTERM change nothing (the process is exiting with its code)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def terminated() -> bool:
    return _terminated


def received() -> bool:
    """Whether a Ctrl-C or SIGTERM has arrived: the process is stopping, whatever it raises."""
    return _received is not None


def check() -> None:
    """Raise the interrupt received if it was lost on its way (see the module's docstring); a
    safe point, outside ``deferred()`` blocks."""
    if _received is not None and not _depth:
        raise type(_received)(*_received.args)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A Ctrl-C or SIGTERM that arrives inside the block is raised when the block ends. Signals
    are handled in the main thread only, so a block in another thread (the heartbeat's store
    writes) defers nothing: its end must not take the main thread's interrupt."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            error, _pending = _pending, None
            raise error


class Deferring:
    """``target`` with every method call made inside ``deferred()`` (an MLflow client)."""

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args, **kwargs):
            with deferred():
                return value(*args, **kwargs)

        return call
