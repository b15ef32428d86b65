"""The Hydra entry point: the schema and presets Hydra composes from, the check before any
job runs, and the task function that validates its config once and runs the task it asks for.

``python -m tbptt_exp`` runs one experiment; ``-m`` runs a sweep, one job per
combination. This is the only module that reads Hydra's job state (``HydraConfig``):
it turns it into a ``JobContext`` of plain values for the jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf

from tbptt_exp.app import signals
from tbptt_exp.app.console import error, quiet_libraries
from tbptt_exp.app.preflight import preflight
from tbptt_exp.app.preflight.did_you_mean import to_experiment
from tbptt_exp.app.settings import PRESETS, RunConfig
from tbptt_exp.app.sweep.sweep import JobContext, SweepLink
from tbptt_exp.app.tracking.run import StoreFailed
from tbptt_exp.app.tracking.stores import mask_credentials_in_logs
from tbptt_exp.core.config import ConfigError
from tbptt_exp.core.measure import Diverged
from tbptt_exp.paths import conf_dir


@dataclass
class ExperimentSchema(RunConfig):
    """The Hydra root schema: ``data`` is filled by the data group (chars or key_recall)."""

    data: Any = MISSING


def register_configs() -> None:
    """The schema and presets behind conf/, the sweepers and the source of sweep presets, for Hydra.

    Hydra finds plugins by scanning ``hydra_plugins``, which an editable install's
    import hook does not let it list, so tbptt-exp's plugins are registered explicitly.
    Called once by the entry point (and by tests that compose configs), never on import.
    """
    Plugins.instance()  # Hydra's plugin scan first: it re-executes the plugin modules it finds
    # After the scan (see tracked_sweeper), so these are the classes Hydra keeps.
    from hydra_plugins.tbptt_exp_plugins import tracked_sweeper
    from hydra_plugins.tbptt_exp_plugins.optuna_sweeper import OptunaSweeper
    from hydra_plugins.tbptt_exp_plugins.sweep_presets import SweepPresetsConfigSource

    for plugin in (SweepPresetsConfigSource, OptunaSweeper, tracked_sweeper.TrackedSweeper):
        Plugins.instance().register(plugin)
    tracked_sweeper.store_config()  # after the scan, which stores Hydra's own "basic" again
    mask_credentials_in_logs()
    store = ConfigStore.instance()
    store.store(name="experiment_schema", node=ExperimentSchema)
    for group, presets in PRESETS.items():
        for name, preset in presets.items():
            node = OmegaConf.structured(preset())
            if group == "model":  # a factory's own arguments are its own: model.params.units=512 needs no "+"
                OmegaConf.set_struct(node.params, False)
            store.store(group=group, name=name, node=node, provider="tbptt_exp")


class PreflightCallback(Callback):
    """Hydra calls this on the composed config before it writes a file or runs a job
    (``conf/config.yaml``: ``hydra.callbacks``); a bad setting stops the command in one line.
    Hydra turns a callback's exceptions into warnings, hence the exit here."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, multirun=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, multirun=True)

    @staticmethod
    def _check(config: DictConfig, multirun: bool) -> None:
        try:
            preflight.check(config, list(config.hydra.overrides.task), multirun)
        except ConfigError as bad:
            signals.check()  # a store build that a Ctrl-C or SIGTERM cut short: stopped, not refused
            error(str(bad))
            raise SystemExit(2) from None


def job_context(cfg: DictConfig) -> JobContext:
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
    """One job. A tbptt-exp sweeper gets the whole ``JobResult``, any other the objective."""
    quiet_libraries(bool(cfg.get("verbose", False)))  # before TensorFlow or MLflow load
    from tbptt_exp.app.jobs import TASKS  # the tasks and the core they drive load at job time, not at start-up
    signals.check()  # a SIGTERM lost during the imports above stops the job before it starts

    ctx = job_context(cfg)
    try:
        experiment = to_experiment(cfg)  # the one validation of this job's settings
        result = TASKS[experiment.task](experiment, ctx)  # settings that only the data can check raise here
    except (ConfigError, Diverged, StoreFailed) as bad:
        if ctx.multirun:
            raise  # one job of a sweep: the sweeper records it (an Optuna trial fails with it)
        signals.check()  # after a Ctrl-C or SIGTERM this is its doing: stopped, not refused
        error(str(bad))  # the run, if one was recorded, ended FAILED with this reason
        raise SystemExit(2 if isinstance(bad, ConfigError) else 1) from None
    return result if ctx.link.returns_result else result.objective
