"""What ran, where and from which code: the tags every MLflow run carries."""

from __future__ import annotations

import getpass
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

from tbptt_exp.app.tracking.stores import mask_credentials
from tbptt_exp.paths import REPO_DIR, in_clone


def git_commit() -> str | None:
    if not in_clone():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=REPO_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def user() -> str | None:
    """The login name, or None where the process has no passwd entry (some containers)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def environment_tags() -> dict[str, str | None]:
    """Versions, commit, host and command; device tags are added once TensorFlow is up."""
    commit = git_commit()
    return {
        "tensorflow.version": importlib.metadata.version("tensorflow"),
        "keras.version": importlib.metadata.version("keras"),
        "python.version": platform.python_version(),
        "git.commit": commit,
        "host": platform.node(),
        "command": mask_credentials(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        # MLflow's own tags, which fill the UI's Source, Version and User columns
        "mlflow.source.name": "python -m tbptt_exp",
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        "mlflow.user": user(),
    }
