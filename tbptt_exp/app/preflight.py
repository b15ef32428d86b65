"""Check every run of a command before anything trains, with one-line errors.

Hydra reports a bad group option or a type error over several lines, and a sweep would
only fail at the job that holds the bad value, after the others trained. Here every
combination of a discrete sweep (command line and the sweep preset's
``hydra.sweeper.params``) is composed and validated first. Continuous search spaces
(``interval(...)``) are left to the sweeper.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Iterable

from tbptt_exp.core.config import ConfigError
from tbptt_exp.paths import conf_dir, sweeps_dir

GROUPS = ("data", "model", "engine", "trainer", "tracking", "device")
MAX_COMBINATIONS = 256


def group_options(group: str) -> list[str]:
    folder = sweeps_dir() if group == "sweep" else conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("schema_"))


def _parse(lines: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for line in lines:  # one at a time, to name the override that does not parse
        try:
            parser.parse_override(line)
        except HydraException as error:
            raise ConfigError("override", line, str(error).splitlines()[0]) from None
    return parser.parse_overrides(lines)


def _choices(overrides, multirun: bool) -> list[list[str]]:
    """Per override, the lines to try: one per value of a discrete sweep."""
    choices = []
    for o in overrides:
        if o.is_hydra_override():
            if not o.is_sweep_override():
                choices.append([o.input_line])  # Hydra's own settings (e.g. the sweeper's): as given
            continue
        key = o.get_key_element()
        if o.is_sweep_override():
            if not multirun:
                raise ConfigError(o.key_or_group, o.input_line.split("=", 1)[1], "a list of values is a sweep: add -m")
            if not o.is_discrete_sweep():
                continue  # a continuous search space: the sweeper samples it
            values = list(o.sweep_string_iterator())
        else:
            values = [o.get_value_element_as_str()]
        if o.key_or_group in (*GROUPS, "sweep") and not o.is_delete():
            allowed = group_options(o.key_or_group)
            for v in values:
                if v not in allowed and v != "null":
                    raise ConfigError(o.key_or_group, v, f"use one of {', '.join(allowed)}")
        choices.append([f"{key}={v}" for v in values])
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
            yield first[:i] + [line] + first[i + 1 :]


def _composition_error(error: Exception, overrides: list[str]) -> ConfigError:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = error
    while cause.__cause__ is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__
    message = str(cause).splitlines()[0]
    key = getattr(cause, "full_key", None)
    if not key:
        return ConfigError("overrides", " ".join(overrides), message)
    given = {line.split("=", 1)[0].lstrip("+~"): line.split("=", 1)[-1] for line in overrides}
    value = given.get(key, getattr(cause, "value", None))
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(cause.object_type):
        names = ", ".join(f.name for f in dataclasses.fields(cause.object_type))
        message += f"; use one of {names}"
    return ConfigError(key, value, message)


def check_optuna_sweeper(cfg) -> None:
    """The Optuna sweeper's own settings, when it is the sweeper."""
    sweeper = cfg.hydra.sweeper
    if not _is_optuna(cfg):
        return
    from omegaconf import ListConfig

    from tbptt_exp.core.config import objective_names
    from tbptt_exp.app.study import PRUNERS, SAMPLERS

    if sweeper.sampler not in SAMPLERS:
        raise ConfigError("hydra.sweeper.sampler", sweeper.sampler, f"use one of {', '.join(SAMPLERS)}")
    if sweeper.pruner not in PRUNERS:
        raise ConfigError("hydra.sweeper.pruner", sweeper.pruner, f"use one of {', '.join(PRUNERS)}")
    if not 0 <= sweeper.max_failure_rate < 1:
        raise ConfigError(
            "hydra.sweeper.max_failure_rate", sweeper.max_failure_rate,
            "use a fraction from 0 up to (not including) 1: failed trials are retried",
        )
    if not isinstance(sweeper.n_trials, int) or sweeper.n_trials <= 0:
        raise ConfigError("hydra.sweeper.n_trials", sweeper.n_trials, "use a positive whole number")
    directions = list(sweeper.direction) if isinstance(sweeper.direction, ListConfig) else [sweeper.direction]
    for d in directions:
        if d not in ("minimize", "maximize"):
            raise ConfigError("hydra.sweeper.direction", d, "use minimize or maximize (a list for several objectives)")
    if len(directions) != len(objective_names(cfg.objective)):
        raise ConfigError(
            "hydra.sweeper.direction", list(directions),
            f"give one direction per objective ({cfg.objective})",
        )


def check_gpus(cfg, multirun: bool, gpus: list[str] | None = None) -> None:
    """``device.gpus_per_job`` with a process launcher on this host: every parallel worker
    must get GPUs of its own. (A Slurm launcher's jobs run on other hosts: not checked here.)"""
    per_job = cfg.device.get("gpus_per_job")
    launcher = str(cfg.hydra.launcher.get("_target_", ""))
    if per_job is None or "submitit" in launcher:
        return
    from tbptt_exp.core.device import visible_gpus

    gpus = visible_gpus() if gpus is None else gpus
    workers = 1
    if multirun and "joblib" in launcher:
        workers = cfg.hydra.launcher.get("n_jobs") or 1
        if workers < 1:  # joblib's -1: one worker per CPU core
            workers = os.cpu_count() or 1
    if workers * per_job > len(gpus):
        raise ConfigError(
            "device.gpus_per_job", per_job,
            f"{workers} worker(s) x {per_job} GPU(s) need {workers * per_job}, and this machine shows "
            f"{len(gpus)}; set hydra.launcher.n_jobs={max(len(gpus) // per_job, 1)} or fewer, or lower device.gpus_per_job",
        )


def _take_secrets(first) -> dict[str, str]:
    """The composed store URLs' passwords moved to the environment (``stores.take_secrets``):
    {setting: URL without its password} for each setting that held one."""
    from tbptt_exp.app.stores import take_secrets

    urls = {"tracking.uri": first.tracking.uri}
    if _is_optuna(first):
        urls["hydra.sweeper.storage"] = first.hydra.sweeper.get("storage")
    return take_secrets(urls)


def _replace(lines: list[str], cleaned: dict[str, str]) -> list[str]:
    """Override lines with each cleaned setting given once, without its password, so the
    password given on the command line or in a config file never reaches Hydra."""
    kept = [a for a in lines if a.split("=", 1)[0].lstrip("+~") not in cleaned]
    return kept + [f"{key}='{url}'" for key, url in cleaned.items()]


def _is_optuna(cfg) -> bool:
    return str(cfg.hydra.sweeper.get("_target_", "")).endswith("OptunaSweeper")


def check_stores(cfg, multirun: bool) -> None:
    """Open the tracking store (and a study's storage) once, before TensorFlow loads: the
    same URLs the jobs will open (``run.resolve_uri``, ``study.default_storage_url``)."""
    import os

    from tbptt_exp.app.run import resolve_uri
    from tbptt_exp.app.stores import check_storage_url, check_tracking_uri
    from tbptt_exp.core.config import TrackingConfig

    if cfg.tracking.enabled:
        setting = "tracking.uri" if cfg.tracking.uri or not os.environ.get("MLFLOW_TRACKING_URI") else "MLFLOW_TRACKING_URI"
        check_tracking_uri(resolve_uri(TrackingConfig(uri=cfg.tracking.uri)), setting)
    if multirun and _is_optuna(cfg):
        from tbptt_exp.app.study import default_storage_url

        check_storage_url(cfg.hydra.sweeper.get("storage") or default_storage_url(create=False))


def preflight(argv: list[str]) -> list[str]:
    """Raise ConfigError for the first run of ``argv`` that cannot work; return ``argv``
    with any store password taken out (into the environment its client reads)."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if any([args.help, args.hydra_help, args.cfg, args.info, args.shell_completion,
            args.config_path, args.config_name, args.config_dir, args.experimental_rerun]):
        return argv  # Hydra's own commands and custom config trees: Hydra checks those
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tbptt_exp.app.hydra_app import to_experiment

    choices = _choices(_parse(args.overrides), args.multirun)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="preflight"):
        base = [c[0] for c in choices]
        try:
            first = compose("config", overrides=base, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as error:
            raise _composition_error(error, base) from None
        check_optuna_sweeper(first)
        cleaned = _take_secrets(first)
        if cleaned:
            argv = _replace(argv, cleaned)
            choices = _choices(_parse(_replace(list(args.overrides), cleaned)), args.multirun)
            base = [c[0] for c in choices]
            first = compose("config", overrides=base, return_hydra_config=True)
        params = first.hydra.sweeper.get("params") or {}
        if args.multirun and params:
            given = {line.split("=", 1)[0].lstrip("+~") for c in choices for line in c}
            extra = [f"{k}={v}" for k, v in params.items() if k not in given]
            choices += _choices(_parse(extra), multirun=True)
        for combo in _combinations(choices):
            try:
                cfg = compose("config", overrides=combo)
            except (HydraException, OmegaConfBaseException) as error:
                raise _composition_error(error, combo) from None
            to_experiment(cfg)
        check_stores(first, args.multirun)
        check_gpus(first, args.multirun)
    return argv
