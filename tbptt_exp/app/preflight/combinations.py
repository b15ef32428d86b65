"""Every combination of a discrete sweep (command line and a sweep preset's
``hydra.sweeper.params``), composed and validated before any job starts."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from tbptt_exp.app.preflight.did_you_mean import to_experiment
from tbptt_exp.app.preflight.hydra_errors import composition_error
from tbptt_exp.app.settings import PRESETS
from tbptt_exp.core.config import ConfigError
from tbptt_exp.core.data import load_dataset
from tbptt_exp.paths import sweeps_dir

GROUPS = tuple(PRESETS)
MAX_COMBINATIONS = 256


def group_options(group: str) -> list[str]:
    """The options of a config group: a preset of the schema's, or a sweep preset in sweeps/."""
    if group == "sweep":
        return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))
    return sorted(PRESETS[group])


def sweep_choices(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Per override line, the lines to try: one per value of a discrete sweep."""
    choices = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_hydra_override():
            if not o.is_sweep_override():
                choices.append([o.input_line])  # Hydra's own settings (e.g. the sweeper's): as given
            continue
        if o.is_sweep_override():
            if not multirun:
                raise ConfigError(o.key_or_group, o.input_line.split("=", 1)[1], "a list of values is a sweep: add -m")
            if not o.is_discrete_sweep():
                continue  # a continuous search space: the sweeper samples it
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if not values:
                raise ConfigError(o.key_or_group, o.input_line.split("=", 1)[1],
                                  "the sweep has no values: range(start, stop) counts up from start to below stop")
            choices.append(values)
        else:
            choices.append([o.input_line])
    return choices


def combinations_to_try(choices: list[list[str]]) -> Iterable[list[str]]:
    total = 1
    for c in choices:
        total *= len(c)
    if total <= MAX_COMBINATIONS:
        yield from (list(combo) for combo in itertools.product(*choices))
        return
    first = [c[0] for c in choices]  # too many: vary one override at a time
    for i, c in enumerate(choices):
        for line in c:
            yield first[:i] + [line] + first[i + 1:]


def check_combinations(config: DictConfig, overrides: list[str], read_data: bool = False) -> None:
    """Every combination of a discrete sweep, composed and validated (at most 256; beyond, one
    override varied at a time); with ``read_data`` (a sweep), each data the combinations name
    is also read once, so bad data is the one line a single run gives, before any job starts."""
    choices = sweep_choices(overrides, multirun=True)
    params = config.hydra.sweeper.get("params") or {}
    given = {line.split("=", 1)[0].lstrip("+~") for c in choices for line in c}
    choices += sweep_choices([f"{k}={v}" for k, v in params.items() if k not in given], multirun=True)
    data: dict[str, Any] = {}
    for combo in combinations_to_try(choices):
        try:
            experiment = to_experiment(compose("config", overrides=combo))
        except (HydraException, OmegaConfBaseException) as error:
            raise composition_error(error, combo) from None
        data.setdefault(repr(experiment.data), experiment)
    if read_data:
        for experiment in data.values():
            load_dataset(experiment.data, experiment.seed)
