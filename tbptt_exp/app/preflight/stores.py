"""The tracking store and a study's storage, opened once before TensorFlow loads (and made,
whole or not at all, where they are not there yet)."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from tbptt_exp.app.preflight.search_space import is_optuna
from tbptt_exp.app.tracking.stores import (
    check_storage_url,
    check_tracking_uri,
    create_store,
    default_storage_url,
    mask_credentials,
    resolve_uri,
    same_database,
)
from tbptt_exp.core.config import ConfigError


def check_stores(config: DictConfig, multirun: bool) -> None:
    """Open the tracking store (and a study's storage) once, before TensorFlow loads: the
    same URLs the jobs will open (``stores.resolve_uri``, ``stores.default_storage_url``);
    a store that is not there yet is made now, whole or not at all (``stores.create_store``)."""
    if config.tracking.enabled:
        uri = config.tracking.uri
        setting = "tracking.uri" if uri or not os.environ.get("MLFLOW_TRACKING_URI") else "MLFLOW_TRACKING_URI"
        check_tracking_uri(resolve_uri(uri), setting)
    if multirun and is_optuna(config):
        storage = config.hydra.sweeper.get("storage") or default_storage_url(create=False)
        if config.tracking.enabled and same_database(storage, resolve_uri(config.tracking.uri)):
            raise ConfigError("hydra.sweeper.storage", mask_credentials(storage), "it is tracking.uri's database: "
                              "MLflow and Optuna each need a database of their own (null: mlruns/optuna.db)")
        check_storage_url(storage)
        create_store(storage, "hydra.sweeper.storage", "optuna")
    if config.tracking.enabled:
        create_store(resolve_uri(config.tracking.uri), setting, "mlflow")
