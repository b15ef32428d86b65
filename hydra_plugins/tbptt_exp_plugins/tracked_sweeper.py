"""Hydra adapter: the grid sweeper behind ``-m k=10,25,50``.

It takes the place of Hydra's basic sweeper (``hydra/sweeper=basic``, the default): the
same sweeper with the same settings, whose jobs run under one MLflow parent run and hand
their results to ``tbptt_exp.app.sweep.summary.tracked_sweep``. It is stored under Hydra's name
rather than selected by an ``override`` in conf/config.yaml because a primary config's
override would win over the sweep presets' ``override /hydra/sweeper: optuna``; and it is
stored by ``store_config()`` after Hydra's plugin scan, since that scan re-executes
Hydra's own basic sweeper module, which stores Hydra's ``basic`` again (and defines a new
``BasicSweeper`` class, hence this module is imported after the scan too). No
``from __future__ import annotations`` here: the scan executes this module before it is
in ``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Hydra ships its basic (grid) sweeper only under hydra._internal; extending it keeps Hydra's
# own grid expansion, batching and settings instead of writing them again.
# Hydra's basic launcher, likewise only under hydra._internal: it runs jobs one after another,
# so the sweep says each job as it starts (no public flag says whether a launcher is sequential).
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore

from tbptt_exp.app.sweep.summary import tracked_sweep
from tbptt_exp.app.sweep.sweep import JobEvents, KeepFailures


@dataclass
class TrackedSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.tbptt_exp_plugins.tracked_sweeper.TrackedSweeper"


def store_config() -> None:
    ConfigStore.instance().store(group="hydra/sweeper", name="basic", node=TrackedSweeperConf, provider="tbptt_exp")


class TrackedSweeper(BasicSweeper):
    """Hydra's basic sweeper, repeated ``rounds`` times round after round (a nightly's repeats),
    each job carrying its sweep's link."""

    link_overrides: Sequence[str] = ()  # the sweep's link, set as it starts
    rounds: int = 1

    def get_job_batch(self) -> list[list[str]]:
        batch = self.overrides[self.batch_index % len(self.overrides)]
        self.batch_index += 1
        return [[*job, *self.link_overrides] for job in batch]

    def is_done(self) -> bool:
        return self.batch_index >= len(self.overrides) * self.rounds

    def sweep(self, arguments: list[str]) -> Any:
        basic_sweep = super().sweep

        def launch(link, rounds: int, events: JobEvents) -> list:
            self.link_overrides, self.rounds = link.overrides(), rounds
            # A failed job ends in the report, not the sweep.
            self.launcher = KeepFailures(self.launcher, events, total=lambda: sum(map(len, self.overrides)) * rounds,
                                         sequential=isinstance(self.launcher, BasicLauncher))
            return [ret for batch in basic_sweep(arguments) for ret in batch]

        return tracked_sweep(self.config, launch)
