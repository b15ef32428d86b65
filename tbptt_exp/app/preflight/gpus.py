"""GPUs per worker: each parallel worker on this host must get GPUs of its own."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from tbptt_exp.core.config import ConfigError
from tbptt_exp.core.device import visible_gpus


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
