"""A Hydra config source that serves the top-level ``sweeps/`` folder as the group ``sweep``.

Sweep presets live beside ``conf/`` rather than inside it, yet users select them as
``sweep=NAME``. Hydra names a group after its folder, so this source maps the group
``sweep`` onto ``sweeps/``. ``conf/config.yaml`` adds it to the search path as
``tbptt-sweeps://presets``. Hydra only loads plugins from the ``hydra_plugins`` package.
"""

from __future__ import annotations

import builtins
import os

from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from omegaconf import OmegaConf

from tbptt_exp.paths import sweeps_dir

GROUP = "sweep"


class SweepPresetsConfigSource(ConfigSource):
    @staticmethod
    def scheme() -> str:
        return "tbptt-sweeps"

    def _folder(self) -> str:
        return str(sweeps_dir())

    def _real_path(self, config_path: str) -> str | None:
        """``sweep`` -> sweeps/, ``sweep/x.yaml`` -> sweeps/x.yaml, anything else -> None."""
        parts = config_path.strip("/").split("/", 1)
        if parts[0] != GROUP:
            return None
        return os.path.join(self._folder(), *parts[1:])

    def load_config(self, config_path: str) -> ConfigResult:
        path = self._real_path(self._normalize_file_name(config_path))
        if path is None or not os.path.isfile(path):
            raise ConfigLoadError(f"Config not found : {config_path}")
        with open(path, encoding="utf-8") as f:
            # A preset's ``# @package _global_`` header decides where it merges. Hydra's own
            # file source reads it with this helper of the ConfigSource base class; there is
            # no public one, and a second parser of the header would drift from Hydra's.
            header = ConfigSource._get_header_dict(f.read(512))
            f.seek(0)
            cfg = OmegaConf.load(f)
        return ConfigResult(config=cfg, path=self.full_path(), provider=self.provider, header=header)

    def available(self) -> bool:
        return os.path.isdir(self._folder())

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return True
        path = self._real_path(config_path)
        return path is not None and os.path.isdir(path)

    def is_config(self, config_path: str) -> bool:
        path = self._real_path(self._normalize_file_name(config_path))
        return path is not None and os.path.isfile(path)

    def list(self, config_path: str, results_filter: ObjectType | None) -> builtins.list[str]:
        if config_path.strip("/") == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        path = self._real_path(config_path)
        files: list[str] = []
        if path is None or not os.path.isdir(path):
            return files
        for name in os.listdir(path):
            self._list_add_result(files, f"{config_path}/{name}", name, results_filter)
        return sorted(set(files))
