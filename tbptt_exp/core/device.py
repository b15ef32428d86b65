"""The training device's settings, which TensorFlow accepts only before it initialises.

Called first by every process that trains (a job, a batch-size probe), before anything
else touches TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from tbptt_exp.core.config import ConfigError, DeviceConfig


def prepare_tensorflow() -> None:
    """Settings TensorFlow reads once, when it loads; no effect once it has loaded.

    - oneDNN on: its CPU allocator keeps the statistics that ``get_memory_info('CPU:0')``
      reports, so a CPU run's peak memory is measured the way a GPU run's is (TensorFlow
      leaves oneDNN off by default on some x86 CPUs, and then has no CPU peak to give).
    - TensorFlow's C++ start-up chatter hidden.
    """
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _native_stderr_held():
    """Hold what native code writes to file descriptor 2 while the block runs; drop it if
    the block succeeds, write it out if it fails (so a failed load still explains itself)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_tensorflow(find_devices: bool = True):
    """Import TensorFlow and Keras and find the devices, quietly when asked; ``find_devices``
    false leaves every device untouched (the probes' fork server: a process that initialised
    CUDA cannot hand it on to the processes it forks).

    TensorFlow 2.21 logs through absl before absl is initialised, and such lines (oneDNN
    and CUDA notices, ``cuInit`` failures on a machine without a GPU) ignore
    ``TF_CPP_MIN_LOG_LEVEL``; with the level at 3 (the harness's default console) they are
    held back here. Later errors still surface as Python exceptions.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        import tensorflow as tf

        return tf
    with _native_stderr_held():
        import keras  # noqa: F401  (loads a second native library that logs the same notices)
        import tensorflow as tf

        if find_devices:
            tf.config.list_physical_devices()  # CUDA's start-up lines come here
    return tf


def configure_device(cfg: DeviceConfig, say: Callable[[str], None] = print) -> None:
    """GPU memory cap or growth, as ``cfg`` asks; ``say`` explains what had no effect."""
    tf = load_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        if cfg.memory_limit_mb is not None:
            say(f"device.memory_limit_mb={cfg.memory_limit_mb} has no effect: there is no GPU")
        return
    try:
        if cfg.memory_limit_mb is not None:
            tf.config.set_logical_device_configuration(
                gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=cfg.memory_limit_mb)]
            )
        elif cfg.memory_growth:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        # A later job of an in-process sweep: the GPU kept the first job's settings.
        say("device settings unchanged: the GPU was initialised by an earlier job in this process "
            "(use hydra/launcher=joblib for a process per job)")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, without starting TensorFlow: ``CUDA_VISIBLE_DEVICES``
    when a scheduler (Slurm) or the user set it, else every GPU NVML or ``nvidia-smi`` lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVML library or no driver
        pass
    try:
        out = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, text=True, timeout=10)
        return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]
    except (OSError, subprocess.TimeoutExpired):
        return []


_claimed: dict = {}  # this process's slot: {"gpus": [...], "locks": [FileLock]}; held until it exits


def default_slots_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"tbptt-exp-gpu-slots-{os.getuid()}"


def claim_gpus(gpus: list[str], per_job: int, slots_dir: Path) -> list[str]:
    """Give this worker process ``per_job`` GPUs of ``gpus`` that no other worker holds.

    The host's GPUs form ``len(gpus) // per_job`` slots; the process takes the first slot
    whose GPUs' lock files in ``slots_dir`` it can all lock exclusively, and holds them
    until it exits, which releases them however it ends. A process claims once: a launcher
    that reuses worker processes (joblib) keeps each worker on its GPUs, and TensorFlow,
    once started, could not move anyway. Sets ``CUDA_VISIBLE_DEVICES``, so it must run before TensorFlow loads.
    """
    if _claimed:
        return _claimed["gpus"]
    slots = len(gpus) // per_job
    if slots == 0:
        raise ConfigError("device.gpus_per_job", per_job,
                          f"this machine shows {len(gpus)} GPU(s) ({','.join(gpus) or 'none'}); "
                          "use at most that many, or null to use every visible GPU")
    slots_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(slots):
        mine = gpus[slot * per_job:(slot + 1) * per_job]
        held = []
        for gpu in mine:  # a lock per GPU, so claims of different sizes never overlap
            lock = FileLock(slots_dir / f"gpu-{gpu}.lock", preserve_lock_file=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                break
            held.append(lock)
        if len(held) == len(mine):
            _claimed.update(gpus=mine, locks=held)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
            return mine
        for lock in held:
            lock.release()
    raise ConfigError("device.gpus_per_job", per_job,
                      f"all {slots} slot(s) of {per_job} GPU(s) on this host are held by other workers; "
                      f"run at most {slots} worker(s) at once (hydra.launcher.n_jobs={slots}) or lower device.gpus_per_job")

