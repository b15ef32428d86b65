"""The trials of an Optuna study: who holds each running trial, and how each one ends.

- ``study_lock`` serialises "count the trials, then ask for one" across every worker.
- ``TrialLocks``: a lock per running trial, held by the worker that runs it; a RUNNING
  trial whose lock can be taken has no worker (``fail_orphaned_trials``).
- ``end_trial`` is the one place a trial's state is written, through Optuna's public API.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
from filelock import FileLock, Timeout
from optuna.trial import TrialState
from sqlalchemy import text

from tbptt_exp.app.signals import deferred
from tbptt_exp.app.tracking.stores import sqlite_path

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)  # toward n_trials; failed ones are retried


def make_storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url)


def counted_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def _key(study_name: str, size: int) -> int:
    return int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:size], "big", signed=True)


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Serialise "count the trials, then ask for one" across every worker of a study.

    PostgreSQL: an advisory lock; SQLite: a lock file beside the database. That is what
    makes N workers stop at exactly n_trials instead of overshooting.
    """
    url = str(storage.url)
    if url.startswith("postgresql"):
        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _key(study_name, 8)})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _key(study_name, 8)})
                conn.commit()
    elif (path := sqlite_path(url)) is not None:
        suffix = f".{hashlib.sha1(study_name.encode()).hexdigest()[:8]}.lock"
        with FileLock(path.with_suffix(suffix), preserve_lock_file=True):
            yield
    else:
        raise ValueError(f"storage {url!r}: use a sqlite:/// or postgresql:// URL")


class TrialLocks:
    """A lock per running trial, held by the worker that runs it, visible to every worker.

    PostgreSQL: a session advisory lock on (study, trial number), on a connection this
    worker keeps open; SQLite: an exclusive file lock beside the database. The operating
    system or the database drops the lock the moment the worker dies, however it dies, so
    a RUNNING trial whose lock can be taken has no worker: ``fail_orphaned_trials`` fails
    it at once, with no heartbeat grace period to wait out.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str):
        self.storage, self.study_name = storage, study_name
        self.postgres = str(storage.url).startswith("postgresql")
        self.held: dict[int, Any] = {}  # trial number -> its open connection or FileLock

    def _lock_file(self, number: int) -> FileLock:
        db = sqlite_path(str(self.storage.url))
        name = f"{db.name}.{hashlib.sha1(self.study_name.encode()).hexdigest()[:8]}.trial-{number}.lock"
        return FileLock(db.with_name(name))

    def _params(self, number: int) -> dict[str, int]:
        return {"s": _key(self.study_name, 4), "t": number}

    def acquire(self, number: int) -> None:
        if self.postgres:
            conn = self.storage.engine.connect()
            conn.execute(text("SELECT pg_advisory_lock(:s, :t)"), self._params(number))
            conn.commit()
            self.held[number] = conn
        else:
            lock = self._lock_file(number)
            lock.acquire(timeout=0)
            self.held[number] = lock

    def release(self, number: int) -> None:
        holder = self.held.pop(number, None)
        if holder is None:
            return
        if self.postgres:
            holder.execute(text("SELECT pg_advisory_unlock(:s, :t)"), self._params(number))
            holder.commit()
            holder.close()
        else:
            holder.release()

    def release_all(self) -> None:
        for number in list(self.held):
            self.release(number)

    def orphaned(self, number: int) -> bool:
        """True when no live worker holds this trial's lock (checked by taking it briefly)."""
        if number in self.held:
            return False
        if self.postgres:
            with self.storage.engine.connect() as conn:
                free = conn.execute(text("SELECT pg_try_advisory_lock(:s, :t)"), self._params(number)).scalar()
                if free:
                    conn.execute(text("SELECT pg_advisory_unlock(:s, :t)"), self._params(number))
                conn.commit()
            return bool(free)
        try:
            with self._lock_file(number).acquire(timeout=0):
                return True
        except Timeout:
            return False


def end_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int, state: TrialState,
              values: Sequence[float] | None = None, reason: str = "") -> None:
    """The one place a trial's state is written: COMPLETE with its values, PRUNED, or FAIL
    with its reason (a failed job, an interrupt, a worker that died). A trial already
    finished (by another worker) is left as it is."""
    with deferred():  # an interrupt half-way would leave this process holding the storage's lock
        if reason:
            # Optuna sets a user attribute only through a Trial object or the storage; the
            # trial may be another worker's, so the storage's public API addresses it by id.
            study_id = storage.get_study_id_from_name(study.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        study.tell(number, values, state=state, skip_if_finished=True)


def fail_orphaned_trials(study: optuna.Study, locks: TrialLocks) -> list[int]:
    """Fail RUNNING trials that no live worker holds (call under ``study_lock``); their numbers."""
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if locks.orphaned(t.number)]
    for number in orphans:
        end_trial(study, locks.storage, number, TrialState.FAIL, reason="its worker stopped")
    return orphans


def fail_orphans_in_storage(url: str) -> dict[str, list[int]]:
    """``fail_orphaned_trials`` for every study in a storage: {study name: trial numbers}."""
    storage = make_storage(url)
    failed = {}
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        with study_lock(storage, summary.study_name):
            numbers = fail_orphaned_trials(study, TrialLocks(storage, summary.study_name))
        if numbers:
            failed[summary.study_name] = numbers
    return failed
