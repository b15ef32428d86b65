"""An Optuna study's settings: its search space, sampler and pruner by the names a config
gives them, and the settings of ``hydra/sweeper=optuna``, which check themselves.

The search space uses hydra-optuna-sweeper's syntax (``choice(..)``, ``range(..)``,
``interval(..)``, ``tag(log, ..)``, ``int(..)``), parsed by Hydra's own override parser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from tbptt_exp.core.config import ConfigError, check_fields, rule


class Sampler(StrEnum):
    tpe = "tpe"
    random = "random"
    cmaes = "cmaes"
    gp = "gp"
    nsgaii = "nsgaii"
    grid = "grid"


class Pruner(StrEnum):
    none = "none"
    median = "median"
    hyperband = "hyperband"


def _count(least: int) -> dict:
    return rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least,
                "use a positive whole number" if least else "use 0 or a positive whole number")


@dataclass
class StudySettings:
    """``hydra/sweeper=optuna``: the study's settings (``hydra.sweeper.*``); they check themselves."""

    _target_: str = "hydra_plugins.tbptt_exp_plugins.optuna_sweeper.OptunaSweeper"
    study_name: str = "tbptt-exp"
    storage: str | None = None  # None: SQLite under mlruns/; postgresql://... for many workers
    n_trials: int = field(default=20, metadata=_count(1))  # the study's target: COMPLETE + PRUNED (+ running)
    n_jobs: int = field(default=1, metadata=_count(1))  # trials launched together (a process launcher runs them in parallel)
    sampler: Sampler = Sampler.tpe
    seed: int | None = field(default=None, metadata=rule(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
        "use a whole number from 0 to 4294967295, or null"))
    direction: Any = "minimize"  # or a list, one per objective: [minimize, maximize]
    pruner: Pruner = Pruner.none
    pruner_warmup_epochs: int = field(default=1, metadata=_count(0))  # epochs before a trial may be pruned
    pruner_startup_trials: int = field(default=2, metadata=_count(0))  # trials that finish before the median pruner prunes
    # stop the study when more trials than this fail
    max_failure_rate: float = field(default=0.5, metadata=rule(
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
        "use a fraction from 0 up to (not including) 1: failed trials are retried"))
    params: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "hydra.sweeper.")
        for direction in self.directions:
            if direction not in ("minimize", "maximize"):
                raise ConfigError("hydra.sweeper.direction", direction,
                                  "use minimize or maximize (a list for several objectives)")

    @property
    def directions(self) -> list[str]:
        return [str(d) for d in self.direction] if isinstance(self.direction, (list, tuple)) else [str(self.direction)]


def distribution(line: str) -> BaseDistribution | str:
    """``key=choice(..)|range(..)|interval(..)|tag(log, ..)|int(..)`` -> an Optuna distribution.

    A plain value (no sweep) is returned as its string: the parameter is fixed.
    ``range(a, b, step)`` excludes b, as it does in Hydra.
    """
    override = OverridesParser.create().parse_override(line)
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator(transformer=Transformer.identity))
        if not values:
            raise ValueError(f"{line}: the range is empty")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ValueError(f"{line}: this sweep is not supported by the Optuna sweeper")


def search_space(lines: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Split override lines into a search space and fixed overrides for every trial."""
    space: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for line in lines:
        dist = distribution(line)
        if isinstance(dist, BaseDistribution):
            space[line.split("=", 1)[0]] = dist
        else:
            fixed.append(line)
    return space, fixed


def make_sampler(name: str, seed: int | None, space: dict[str, BaseDistribution]) -> optuna.samplers.BaseSampler:
    if name == Sampler.grid:
        grid = {}
        for key, dist in space.items():
            if not isinstance(dist, CategoricalDistribution):
                raise ValueError(f"sampler=grid needs choice(...) for every parameter; {key} is not")  # noqa: TRY004 - a bad setting, not a bad call
            grid[key] = list(dist.choices)
        return AskTellGridSampler(grid, seed=seed)
    kinds = {Sampler.tpe: optuna.samplers.TPESampler, Sampler.random: optuna.samplers.RandomSampler,
             Sampler.cmaes: optuna.samplers.CmaEsSampler, Sampler.gp: optuna.samplers.GPSampler,
             Sampler.nsgaii: optuna.samplers.NSGAIISampler}
    if name not in kinds:
        raise ValueError(f"sampler={name!r}: use one of {', '.join(Sampler)}")
    return kinds[name](seed=seed)


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler ends ``study.optimize`` when the grid is exhausted by calling
    ``study.stop()``, which raises under ask-and-tell; the sweeper stops by itself
    (it caps ``n_trials`` at the grid's size)."""

    def __init__(self, grid: dict[str, list], seed: int | None = None):
        super().__init__(grid, seed=seed)
        self.grid_size = math.prod(len(choices) for choices in grid.values())

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(name: str, warmup_epochs: int, startup_trials: int) -> optuna.pruners.BasePruner:
    if name == Pruner.none:
        return optuna.pruners.NopPruner()
    if name == Pruner.median:
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == Pruner.hyperband:
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs))
    raise ValueError(f"pruner={name!r}: use one of {', '.join(Pruner)}")
