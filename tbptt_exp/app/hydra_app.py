"""The Hydra entry point: compose the config, validate it once, run the job it asks for.

``python -m tbptt_exp`` runs one experiment; ``-m`` runs a sweep, one job per
combination. This is the only module that reads Hydra's job state (``HydraConfig``):
it turns it into a ``JobContext`` of plain values for the jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf

from tbptt_exp.core.config import ExperimentConfig, validate
from tbptt_exp.paths import conf_dir

if TYPE_CHECKING:
    from tbptt_exp.app.jobs import JobContext


@dataclass
class ExperimentSchema(ExperimentConfig):
    """The Hydra root schema: ``data`` is filled by the data group (chars or key_recall)."""

    data: Any = MISSING


def register_configs() -> None:
    """The schema behind conf/, the sweepers and the source of sweep presets, for Hydra.

    Hydra finds plugins by scanning ``hydra_plugins``, which an editable install's
    import hook does not let it list, so tbptt-exp's plugins are registered explicitly.
    Called once by the entry point (and by tests that compose configs), never on import.
    """
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # Hydra's plugin scan first: it re-executes the plugin modules it finds
    from hydra_plugins.tbptt_exp_plugins import tracked_sweeper
    from hydra_plugins.tbptt_exp_plugins.optuna_sweeper import OptunaSweeper
    from hydra_plugins.tbptt_exp_plugins.sweep_presets import SweepPresetsConfigSource
    from tbptt_exp.app.run import mask_credentials_in_logs
    from tbptt_exp.core.config import CharsDataConfig, KeyRecallDataConfig

    for plugin in (SweepPresetsConfigSource, OptunaSweeper, tracked_sweeper.TrackedSweeper):
        Plugins.instance().register(plugin)
    tracked_sweeper.store_config()  # after the scan, which stores Hydra's own "basic" again
    mask_credentials_in_logs()
    cs = ConfigStore.instance()
    cs.store(name="experiment_schema", node=ExperimentSchema)
    cs.store(group="data", name="schema_chars", node=CharsDataConfig)
    cs.store(group="data", name="schema_key_recall", node=KeyRecallDataConfig)


def to_experiment(cfg: DictConfig) -> ExperimentConfig:
    """Composed Hydra config (without its ``hydra`` node) -> the one validated config object."""
    experiment = OmegaConf.to_object(cfg)
    validate(experiment)
    return experiment


def job_context(cfg: DictConfig) -> "JobContext":
    from tbptt_exp.app.jobs import JobContext
    from tbptt_exp.app.sweep import SweepLink

    hydra_cfg = HydraConfig.get()
    return JobContext(
        overrides=list(hydra_cfg.overrides.task),
        output_dir=Path(hydra_cfg.runtime.output_dir),
        multirun=hydra_cfg.mode == RunMode.MULTIRUN,
        link=SweepLink.from_env_set(hydra_cfg.job.env_set),
        sweeper=OmegaConf.to_container(hydra_cfg.sweeper, resolve=True),
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> Any:
    """One job. A tbptt-exp sweeper gets the whole ``JobOutcome``, any other the objective."""
    from tbptt_exp.app.console import error
    from tbptt_exp.app.jobs import cleanup_job, max_batch_job, train_job
    from tbptt_exp.core.config import ConfigError

    from tbptt_exp.app.console import quiet_libraries

    quiet_libraries(bool(cfg.get("verbose", False)))  # before TensorFlow or MLflow load
    ctx = job_context(cfg)
    try:
        experiment = to_experiment(cfg)
        job = {"max_batch": max_batch_job, "cleanup": cleanup_job}.get(experiment.task, train_job)
        outcome = job(experiment, ctx)  # settings that only the data can check raise here
    except ConfigError as bad:
        if ctx.multirun:
            raise  # one job of a sweep: the sweeper records it (an Optuna trial fails with it)
        error(str(bad))
        raise SystemExit(2) from None
    return outcome if ctx.link.returns_outcome else outcome.objective
