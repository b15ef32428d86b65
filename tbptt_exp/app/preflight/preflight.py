"""Check every run of a command before anything trains, with one-line errors.

Two moments, each on values at hand, no config composed twice:

- ``take_command_line_secrets`` (before Hydra sees ``argv``): a password in a store URL
  on the command line moves to the environment variable its client reads.
- ``check`` (on the config Hydra composed, from ``hydra_app``'s callback, before Hydra
  writes a file): passwords from config files, the Optuna sweeper's settings, every
  combination of a discrete sweep (command line and the sweep preset's
  ``hydra.sweeper.params``; continuous search spaces are left to the sweeper), the
  tracking store and a study's storage, and each worker's GPUs. A single run's settings
  are validated by its job, once.

``composition_error`` turns what Hydra raises while composing (a bad override, an unknown
option or key, a value of the wrong type) into the same one-line ``ConfigError``.
``preflight(argv)`` runs both moments through Hydra's compose API, as one function.
Each check lives in this folder's module named for what it checks.
"""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from tbptt_exp.app.preflight.combinations import check_combinations, sweep_choices
from tbptt_exp.app.preflight.gpus import check_gpus
from tbptt_exp.app.preflight.hydra_errors import composition_error
from tbptt_exp.app.preflight.passwords import take_command_line_secrets, take_config_secrets
from tbptt_exp.app.preflight.search_space import check_optuna_sweeper, check_search_space, is_optuna
from tbptt_exp.app.preflight.stores import check_stores
from tbptt_exp.paths import conf_dir


def check(config: DictConfig, overrides: list[str], multirun: bool) -> None:
    """Everything that can be checked on a composed config before any job runs (raises ConfigError)."""
    if multirun and is_optuna(config):
        check_optuna_sweeper(config)
        check_search_space(config, overrides)
    take_config_secrets(config)
    if multirun:
        check_combinations(config, overrides, read_data=True)
    check_stores(config, multirun)
    check_gpus(config, multirun)


def preflight(argv: list[str]) -> list[str]:
    """Both moments for ``argv`` through Hydra's compose API (the first combination of a sweep
    stands for its master config): raise ConfigError for the first run that cannot work;
    return ``argv`` with any store password taken out."""
    if any(arg.startswith("-") and arg not in ("-m", "--multirun") for arg in argv):
        return argv  # Hydra's own commands and custom config trees: Hydra checks those
    argv = take_command_line_secrets(argv)
    multirun = "-m" in argv or "--multirun" in argv
    overrides = [arg for arg in argv if not arg.startswith("-")]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="preflight"):
        try:
            first = [c[0] for c in sweep_choices(overrides, multirun)]
            config = compose("config", overrides=first, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as error:
            raise composition_error(error, overrides) from None
        check(config, overrides, multirun)
        if not multirun:
            check_combinations(config, overrides)  # the one run; the CLI's job validates it as it starts
    return argv
