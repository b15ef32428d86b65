"""Where the Hydra configs, sweep presets and the default MLflow store live.

In a clone, ``conf/``, ``sweeps/`` and ``mlruns/`` sit at the top of the repository.
A plain ``pip install .`` copies ``conf/`` and ``sweeps/`` into the package, so both
layouts are looked for, the installed copy first.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def _resource_dir(name: str) -> Path:
    for candidate in (PACKAGE_DIR / name, REPO_DIR / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"tbptt-exp cannot find its {name}/ folder: reinstall the package")


def conf_dir() -> Path:
    return _resource_dir("conf")


def sweeps_dir() -> Path:
    return _resource_dir("sweeps")


def in_clone() -> bool:
    """True when running from a checkout (editable install), not an installed copy."""
    return (REPO_DIR / "pyproject.toml").is_file() and (REPO_DIR / "conf").is_dir()


def default_store_dir(cwd: Path | None = None) -> Path:
    """The clone's top-level mlruns/, else mlruns/ in the directory the job started in."""
    return REPO_DIR / "mlruns" if in_clone() else (cwd or Path.cwd()).resolve() / "mlruns"
