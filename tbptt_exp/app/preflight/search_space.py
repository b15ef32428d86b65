"""An Optuna sweep's settings and search space, checked against the experiment before a
trial starts: one direction per objective, and every end of every parameter accepted."""

from __future__ import annotations

from hydra import compose
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import CategoricalDistribution

from tbptt_exp.app.preflight.did_you_mean import to_experiment
from tbptt_exp.app.preflight.hydra_errors import composition_error
from tbptt_exp.app.study.search_space import StudySettings, distribution
from tbptt_exp.core.config import ConfigError, objective_names


def is_optuna(config: DictConfig) -> bool:
    return str(config.hydra.sweeper.get("_target_", "")).endswith("OptunaSweeper")


def check_optuna_sweeper(config: DictConfig) -> None:
    """The Optuna sweeper's settings check themselves; here, what joins them to the experiment:
    one direction per objective."""
    settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudySettings), config.hydra.sweeper))
    if len(settings.directions) != len(objective_names(config.objective)):
        raise ConfigError("hydra.sweeper.direction", settings.directions,
                          f"give one direction per objective ({config.objective})")


def check_search_space(config: DictConfig, overrides: list[str]) -> None:
    """A search space that can only fail is refused before a trial starts: each parameter is
    a distribution the sampler can use, and its ends (each choice) are settings the
    experiment accepts, composed with the fixed overrides."""
    sampler = str(config.hydra.sweeper.get("sampler"))
    params = config.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    space = {}
    for line in lines:
        key, value = line.split("=", 1)
        try:
            space[line] = distribution(line)
        except (ValueError, OverrideParseException) as bad:
            raise ConfigError(key.lstrip("+~"), value, str(bad).splitlines()[0]) from None
    fixed = [line for line, dist in space.items() if isinstance(dist, str)]
    for line, dist in space.items():
        if isinstance(dist, str):
            continue
        key = line.split("=", 1)[0]
        if sampler == "grid" and not isinstance(dist, CategoricalDistribution):
            raise ConfigError("hydra.sweeper.sampler", sampler, f"a grid needs choice(...) for every parameter, and "
                                                                f"{line} is not: use choice(...) or another sampler")
        ends = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
        for end in ends:
            combo = [*fixed, f"{key}={end}"]
            try:
                to_experiment(compose("config", overrides=combo))
            except (HydraException, OmegaConfBaseException) as error:
                raise composition_error(error, combo) from None
