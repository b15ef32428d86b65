"""What Hydra raises while composing (a bad override, an unknown option or key, a value of the
wrong type), as the one-line ``ConfigError`` every other check gives."""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from tbptt_exp.core.config import ConfigError


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
