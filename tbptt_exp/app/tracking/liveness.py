"""Whether the process that opened an MLflow run is still alive, so no run stays RUNNING
after ``kill -9``, an OOM kill or a lost node.

Every process that opens or takes up a run tags it with a holder key naming the process
exactly (host, boot, pid and the pid's start time, so a reused pid is not mistaken for
the old process) and refreshes that tag's value, a heartbeat, while the run is open.
A RUNNING run is alive while any of its holders is: on this host that is checked at once
against ``/proc``; a holder on another host counts as gone once its heartbeat is older
than ``STALE_AFTER_S``. A study's parent run has one holder per worker that took it up.

``close_dead_runs`` ends runs whose holders are all gone as KILLED, with the reason; it
runs on every start of the harness against a store and as ``task=cleanup``. Runs without
a holder tag (other tools, older versions) are left alone.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HOLDER_PREFIX = "tbptt_exp.holder/"
HEARTBEAT_S = 30.0  # a holder refreshes its tag this often
STALE_AFTER_S = 300.0  # a holder on another host whose heartbeat is older than this is gone


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "noboot"


def _start_ticks(pid: int) -> str | None:
    """The pid's start time in clock ticks since boot; None when no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "0"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


@dataclass(frozen=True)
class Holder:
    """One process on one host, as named in a holder tag."""

    host: str
    boot: str
    pid: int
    start: str

    @property
    def key(self) -> str:
        return f"{HOLDER_PREFIX}{self.host}/{self.boot}/{self.pid}/{self.start}"

    @classmethod
    def from_key(cls, key: str) -> Holder | None:
        parts = key[len(HOLDER_PREFIX):].split("/")
        if len(parts) != 4 or not parts[2].isdigit():
            return None
        return cls(parts[0], parts[1], int(parts[2]), parts[3])

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def this_process() -> Holder:
    host = re.sub(r"[^\w.-]", "_", socket.gethostname()) or "host"
    pid = os.getpid()
    start = _start_ticks(pid)
    return Holder(host, _boot_id(), pid, start if start is not None else "0")


def _local_alive(holder: Holder) -> bool:
    start = _start_ticks(holder.pid)
    if start is None:
        return False
    if start == "0" or holder.start == "0":  # no /proc: the pid exists, take it as alive
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return start == holder.start


def holder_alive(holder: Holder, heartbeat: float, now: float, me: Holder) -> bool:
    if holder.host == me.host and holder.boot == me.boot:
        return _local_alive(holder)
    return now - heartbeat < STALE_AFTER_S


def dead_reason(tags: dict[str, str], now: float | None = None) -> str | None:
    """Why a RUNNING run with these tags has no live holder; None when it has one or is not ours."""
    now = time.time() if now is None else now
    me = this_process()
    holders = []
    for key, value in tags.items():
        if key.startswith(HOLDER_PREFIX) and (holder := Holder.from_key(key)) is not None:
            try:
                beat = float(value)
            except ValueError:
                beat = 0.0
            holders.append((holder, beat))
    if not holders:
        return None
    if any(holder_alive(h, beat, now, me) for h, beat in holders):
        return None
    last = max(holders, key=lambda hb: hb[1])
    return (f"its process ({last[0].describe()}) ended without closing the run; "
            f"last heartbeat {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last[1]))}")


def close_dead_runs(client, experiment_ids: list[str] | None = None) -> list[tuple[str, str]]:
    """End RUNNING runs whose every holder is gone as KILLED; return (run_id, reason) pairs."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    closed = []
    for start in range(0, len(experiment_ids), 100):
        runs = client.search_runs(experiment_ids[start:start + 100], filter_string="attributes.status = 'RUNNING'",
                                  max_results=5000)
        for run in runs:
            reason = dead_reason(run.data.tags)
            if reason is None:
                continue
            client.set_tag(run.info.run_id, "fail_reason", reason)
            if "optuna.trial" in run.data.tags:
                client.set_tag(run.info.run_id, "optuna.state", "FAIL")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append((run.info.run_id, reason))
    return closed


class Heartbeats:
    """One daemon thread per process that refreshes this process's holder tag on its open runs."""

    def __init__(self) -> None:
        self._runs: dict[str, object] = {}  # run_id -> client
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, client, run_id: str) -> None:
        with self._lock:
            self._runs[run_id] = client
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="tbptt-exp heartbeats", daemon=True)
                self._thread.start()

    def release(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                runs = list(self._runs.items())
            key = this_process().key
            for run_id, client in runs:
                try:
                    client.set_tag(run_id, key, f"{time.time():.0f}")
                except Exception:  # a missed beat is retried; the run goes on
                    pass


HEARTBEATS = Heartbeats()
