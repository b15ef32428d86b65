"""One batch-size probe, run as ``python -m tbptt_exp.core.probe`` in a fresh process.

TensorFlow keeps GPU memory after an out-of-memory error until its process exits, so
every probe gets a process of its own. A probe *is* the real thing, shortened: the
user's data, layout, engine and resets, optimizer steps, a validation pass, measured by
``core.measure`` as every run is. It prints one JSON line: the outcome, the allocator's
peak memory and tokens/s with their spread. The parent classifies crashes and time-outs.

Input (stdin, JSON): ``config`` (``core.config.to_dict`` of the experiment to run: the
batch size to try, one epoch; checked once, as it is built on arrival) and ``seconds``
(steady-state time to measure per epoch);
``{"describe": true}`` reports the device (and checks a model of your own). A setting
that cannot work is answered as ``refused`` with the setting, its value and what is
allowed. A probe imports the core only: neither Hydra nor MLflow.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
import traceback

from tbptt_exp.core import measure
from tbptt_exp.core.config import ConfigError, ExperimentConfig, from_dict
from tbptt_exp.core.device import configure_device, prepare_tensorflow
from tbptt_exp.core.measure import PROBE_FIGURES, over_budget_mb
from tbptt_exp.core.train import build, prepare, train

MARKER = "TBPTT_PROBE_RESULT "
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies

OOM_PATTERNS = re.compile(
    r"ResourceExhausted|RESOURCE_EXHAUSTED|out of memory|OOM when allocating|"
    r"Dst tensor is not initialized|CUDNN_STATUS_EXECUTION_FAILED|CUDNN_STATUS_ALLOC_FAILED|"
    r"failed to allocate memory",
    re.IGNORECASE,
)


def classify_error(error: BaseException) -> str:
    """``oom`` for every form TensorFlow reports running out of device memory, else ``error``."""
    text = f"{type(error).__name__}: {error}"
    return "oom" if OOM_PATTERNS.search(text) else "error"


def describe(cfg: ExperimentConfig) -> dict:
    """The device and TensorFlow's version; for a model of your own, first its check: the
    factory loaded and its model built once, so a refused model stops the search before
    any probe."""
    import tensorflow as tf  # after configure_device: TensorFlow takes device settings only before it starts

    if cfg.model.factory is not None:
        build(cfg, prepare(cfg))
    return {"outcome": "describe", "device": measure.device_description(), "tensorflow": tf.__version__}


def run_probe(cfg: ExperimentConfig, seconds: float) -> dict:
    """``cfg``'s real training, each epoch cut after ``seconds`` of steady state, then the
    validation pass: the same layout, engine, resets and measurements as a training run,
    so its peak memory is the peak a real run reaches. The finder sends one epoch."""
    result = train(cfg, epoch_seconds=seconds)
    answer = {f.name: result.value(f.name) for f in PROBE_FIGURES}
    budget = cfg.device.memory_budget_mb
    over = over_budget_mb(result.final, budget)
    if budget is not None and over is None:
        device = result.device.get("device")
        return answer | {"outcome": "unknown", "error": f"TensorFlow's allocator on {device} reports no peak "
                         "memory, so device.memory_budget_mb cannot be checked"}
    return answer | {"outcome": "budget" if over is not None and over > 0 else "ok"}


def answer(request: dict) -> dict:
    """The probe's answer to one request; any failure is reported and classified."""
    try:
        prepare_tensorflow()
        cfg = from_dict(request["config"])
        configure_device(cfg.device, say=lambda line: print(line, file=sys.stderr))  # before TensorFlow starts
        if request.get("describe"):
            return describe(cfg)
        return run_probe(cfg, request["seconds"])
    except ConfigError as refused:  # a setting that cannot work: the parent says so in one line
        return {"outcome": "refused", "error": str(refused), "setting": refused.setting, "value": refused.value,
                "allowed": refused.allowed}
    except Exception as error:  # the parent decides what it means
        return {
            "outcome": classify_error(error),
            "error": f"{type(error).__name__}: {error}".strip()[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }


def die_with_finder() -> None:
    """A probe is part of its finder: when the finder is killed outright (``kill -9``), the
    kernel ends the probe too (Linux), instead of it training on with nobody to answer."""
    finder = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the probe ends by itself
        return
    if os.getppid() != finder:  # the finder died before the line above took effect
        os._exit(1)


def main() -> None:
    die_with_finder()
    print(MARKER + json.dumps(answer(json.loads(sys.stdin.read()))), flush=True)


if __name__ == "__main__":
    main()
