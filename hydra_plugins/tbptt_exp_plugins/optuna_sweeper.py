"""Hydra adapter for tbptt-exp's Optuna 5 sweeper (``hydra/sweeper=optuna``).

Hydra only instantiates sweepers from the ``hydra_plugins`` package, hence this module's
home; the study itself is run by ``tbptt_exp.app.study.study.run_study``, its settings are
``tbptt_exp.app.study.search_space.StudySettings``.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from tbptt_exp.app.study.search_space import StudySettings

ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=StudySettings, provider="tbptt_exp")


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudySettings), settings))
        self.hydra_context: HydraContext | None = None  # validate_batch_is_legal reads it
        self.config: DictConfig | None = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from tbptt_exp.app.study.study import run_study  # the study's storage and tracking load when a study runs

        if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
            print("tbptt-exp: hydra-optuna-sweeper is installed too and also registers hydra/sweeper=optuna; "
                  "tbptt-exp's sweeper is used. To silence this: pip uninstall hydra-optuna-sweeper", file=sys.stderr)
        return run_study(self.settings, self.config, arguments, self._launch)

    def _launch(self, batch: list[list[str]]) -> Any:
        self.validate_batch_is_legal(batch)
        returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
        self.job_idx += len(batch)
        return returns
