"""A composed config becomes the one config object; a key no settings class has is refused
with the setting it was probably meant to be (OmegaConf would drop it without a word)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tbptt_exp.app.settings import RunConfig
from tbptt_exp.core.config import ConfigError


def to_experiment(config: DictConfig) -> RunConfig:
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
