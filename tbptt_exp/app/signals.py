"""SIGTERM ends a job the way Ctrl-C does, so its MLflow run ends KILLED, not RUNNING."""

from __future__ import annotations

import signal

_terminated = False


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    global _terminated
    _terminated = True
    raise Terminated("terminated by SIGTERM")


def install() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def terminated() -> bool:
    return _terminated
