"""Store passwords out of sight: a password in a store URL (the command line, ``$MLFLOW_TRACKING_URI``,
a config file) moves to the environment variable its client reads, before anything shows the URL."""

from __future__ import annotations

import os

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from tbptt_exp.app.preflight.search_space import is_optuna
from tbptt_exp.app.tracking.stores import take_secrets

SECRET_SETTINGS = ("tracking.uri", "hydra.sweeper.storage")


def take_command_line_secrets(argv: list[str]) -> list[str]:
    """``argv`` with each store URL's password moved to the environment (``stores.take_secrets``),
    so the password given on the command line never reaches Hydra."""
    parser = OverridesParser.create()
    cleaned = []
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in SECRET_SETTINGS and "=" in arg:
            try:
                value = parser.parse_override(arg).value()
            except HydraException:
                value = None  # Hydra reports the bad override itself
            if isinstance(value, str) and (clean := take_secrets({key: value}).get(key)):
                arg = f"{arg.split('=', 1)[0]}='{clean}'"
        cleaned.append(arg)
    return cleaned


def take_environment_secrets(environ: dict | None = None) -> None:
    """A password in ``$MLFLOW_TRACKING_URI`` moves to ``MLFLOW_TRACKING_PASSWORD`` (which MLflow
    reads anyway), so MLflow's own lines ("View run ... at: URL"), this process's and every
    worker's, show the URL without it."""
    environ = os.environ if environ is None else environ
    url = environ.get("MLFLOW_TRACKING_URI")
    if url and (clean := take_secrets({"MLFLOW_TRACKING_URI": url}, environ).get("MLFLOW_TRACKING_URI")):
        environ["MLFLOW_TRACKING_URI"] = clean


def take_config_secrets(config: DictConfig) -> None:
    """A password in a store URL that a config file gave moves to the environment; the config,
    and every job a sweep composes from it, gets the URL without it."""
    urls = {"tracking.uri": config.tracking.uri}
    if is_optuna(config):
        urls["hydra.sweeper.storage"] = config.hydra.sweeper.get("storage")
    for key, url in take_secrets(urls).items():
        with read_write(config), open_dict(config):
            OmegaConf.update(config, key, url)
            overrides = config.hydra.overrides.hydra if key.startswith("hydra.") else config.hydra.overrides.task
            overrides.append(f"{key}='{url}'")
