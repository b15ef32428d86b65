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
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import typing
from collections.abc import Iterable
from enum import Enum
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from optuna.distributions import CategoricalDistribution

from tbptt_exp.app.search_space import StudySettings, distribution
from tbptt_exp.app.stores import (
    check_storage_url,
    check_tracking_uri,
    create_store,
    default_storage_url,
    mask_credentials,
    resolve_uri,
    same_database,
    take_secrets,
)
from tbptt_exp.core.config import PRESETS, ConfigError, ExperimentConfig, objective_names
from tbptt_exp.core.data import load_dataset
from tbptt_exp.core.device import visible_gpus
from tbptt_exp.paths import conf_dir, sweeps_dir

GROUPS = tuple(PRESETS)
MAX_COMBINATIONS = 256
SECRET_SETTINGS = ("tracking.uri", "hydra.sweeper.storage")


def group_options(group: str) -> list[str]:
    """The options of a config group: a preset of the schema's, or a sweep preset in sweeps/."""
    if group == "sweep":
        return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))
    return sorted(PRESETS[group])


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


def composition_error(error: Exception, overrides: list[str]) -> ConfigError:
    """What Hydra raised while composing ``overrides``, as one line that names the setting."""
    if isinstance(error, OverrideParseException):
        return ConfigError("override", error.override, str(error).splitlines()[0])
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return ConfigError(group, option, f"use one of {', '.join(error.options)}")
    if "Ambiguous value for argument" in str(error):  # a list of values without -m
        sweep = next(o for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override())
        return ConfigError(sweep.key_or_group, sweep.input_line.split("=", 1)[1], "a list of values is a sweep: add -m")
    cause = error
    while cause.__cause__ is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    if not key:
        return ConfigError("overrides", " ".join(overrides), str(cause).splitlines()[0])
    given = {line.split("=", 1)[0].lstrip("+~"): line.split("=", 1)[-1] for line in overrides}
    value = given.get(key, getattr(cause, "value", None))
    return ConfigError(key, value, _allowed(cause))


def _allowed(cause: Exception) -> str:
    """What a field accepts: its schema's choices, or its keys for an unknown key."""
    owner, message = getattr(cause, "object_type", None), str(cause).splitlines()[0]
    if not dataclasses.is_dataclass(owner):
        return message
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return f"{message}; use one of {', '.join(f.name for f in dataclasses.fields(owner))}"
    hint = typing.get_type_hints(owner).get(str(getattr(cause, "key", "")))
    if isinstance(hint, type) and issubclass(hint, Enum):
        return f"use one of {', '.join(member.name for member in hint)}"
    return message


def _choices(overrides: list[str], multirun: bool) -> list[list[str]]:
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


def _combinations(choices: list[list[str]]) -> Iterable[list[str]]:
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


def to_experiment(config: DictConfig) -> ExperimentConfig:
    """A composed config (its ``hydra`` node aside) -> the one config object, which checks
    itself as it is built (``OmegaConf.to_object`` runs each class's ``__post_init__``).
    A key that no settings class has (``+trainer.lr=0.5``) would be dropped without a word,
    so it is refused, with the setting it was probably meant to be."""
    for setting, value, known in unknown_settings(config):
        close = closest(setting, known)
        raise ConfigError(setting, value, "there is no such setting" + (f"; did you mean {close[0]}?" if close else "")
                          + " (python -m tbptt_exp --cfg job shows them all)")
    return OmegaConf.to_object(config)


def closest(setting: str, known: list[str]) -> list[str]:
    """The setting probably meant: by its initials (``lr``: ``learning_rate``), else by spelling."""
    leaf = setting.rsplit(".", 1)[-1]
    initials = [k for k in known if "".join(w[:1] for w in k.rsplit(".", 1)[-1].split("_")) == leaf]
    return (initials or difflib.get_close_matches(setting, known, n=1, cutoff=0.75))[:1]


def unknown_settings(node: DictConfig, prefix: str = "") -> Iterable[tuple[str, Any, list[str]]]:
    """(setting, value, the settings there are) for each key of ``node`` that its settings
    class does not have; free-form nodes (``model.params``) have none."""
    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind):
        return
    known = [f.name for f in dataclasses.fields(kind)]
    for key, value in node.items_ex(resolve=False):
        if not prefix and key == "hydra":
            continue
        if key not in known:
            yield prefix + str(key), value, [prefix + name for name in known]
        elif isinstance(value, DictConfig):
            yield from unknown_settings(value, f"{prefix}{key}.")


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


def check_combinations(config: DictConfig, overrides: list[str], read_data: bool = False) -> None:
    """Every combination of a discrete sweep, composed and validated (at most 256; beyond, one
    override varied at a time); with ``read_data`` (a sweep), each data the combinations name
    is also read once, so bad data is the one line a single run gives, before any job starts."""
    choices = _choices(overrides, multirun=True)
    params = config.hydra.sweeper.get("params") or {}
    given = {line.split("=", 1)[0].lstrip("+~") for c in choices for line in c}
    choices += _choices([f"{k}={v}" for k, v in params.items() if k not in given], multirun=True)
    data: dict[str, Any] = {}
    for combo in _combinations(choices):
        try:
            experiment = to_experiment(compose("config", overrides=combo))
        except (HydraException, OmegaConfBaseException) as error:
            raise composition_error(error, combo) from None
        data.setdefault(repr(experiment.data), experiment)
    if read_data:
        for experiment in data.values():
            load_dataset(experiment.data, experiment.seed)


def check_gpus(config: DictConfig, multirun: bool, gpus: list[str] | None = None) -> None:
    """``device.gpus_per_job`` with a process launcher on this host: every parallel worker
    must get GPUs of its own. (A Slurm launcher's jobs run on other hosts: not checked here.)"""
    per_job = config.device.get("gpus_per_job")
    launcher = str(config.hydra.launcher.get("_target_", ""))
    if per_job is None or "submitit" in launcher:
        return
    gpus = visible_gpus() if gpus is None else gpus
    workers = 1
    if multirun and "joblib" in launcher:
        workers = config.hydra.launcher.get("n_jobs") or 1
        if workers < 1:  # joblib's -1: one worker per CPU core
            workers = os.cpu_count() or 1
    if workers * per_job > len(gpus):
        raise ConfigError(
            "device.gpus_per_job", per_job,
            f"{workers} worker(s) x {per_job} GPU(s) need {workers * per_job}, and this machine shows "
            f"{len(gpus)}; set hydra.launcher.n_jobs={max(len(gpus) // per_job, 1)} or fewer, or lower device.gpus_per_job",
        )


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
            first = [c[0] for c in _choices(overrides, multirun)]
            config = compose("config", overrides=first, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as error:
            raise composition_error(error, overrides) from None
        check(config, overrides, multirun)
        if not multirun:
            check_combinations(config, overrides)  # the one run; the CLI's job validates it as it starts
    return argv
