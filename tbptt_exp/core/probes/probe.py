"""One batch-size probe: a real training run of the user's config at one batch size, in a
process of its own.

TensorFlow keeps GPU memory after an out-of-memory error until its process exits, so
every probe gets a process of its own. ``launch`` forks it from a server (multiprocessing's
``forkserver``) that imported TensorFlow once and touched no device (``probes.server``):
the probe starts in a fraction of a second, not the ~5 s a fresh interpreter takes to
import TensorFlow, and still initialises its device itself. The finder hands over the data
it already loaded and checked, so a probe does not read the corpus again.

A probe *is* the real thing, shortened: the user's data, layout, engine and resets,
optimizer steps and a validation execution, measured by ``core.measure`` as every run is.
It trains in a thread while the probe watches the allocator, and stops the moment the peak
passes the memory budget, mid-execution if need be: a peak only grows, so the verdict "too
big" is final there and no throughput is timed that nobody reads. A probe that fits trains
``seconds`` of steady state for its throughput, because its first execution is a floor of
the run's peak, not always the peak (``tests/test_probe_peak.py``); its validation runs one
execution, which reaches the whole pass's peak (the same test). The answer carries the
outcome, the figures and the time each phase took.

Request: ``config`` (``core.config.to_dict`` of the experiment: the batch size to try, one
epoch; checked once, as it is built on arrival), ``seconds`` (steady-state time to measure)
and ``dataset`` (optional: what ``train.prepare`` gave; read here if absent);
``{"describe": true}`` reports the device (and checks a model of your own);
``{"warmup": true}`` trains ``seconds`` at ``batch_size`` for the gradient noise scale
(``warm_up``). A setting that
cannot work is answered as ``refused`` with the setting, its value and what is allowed.
A probe imports the core only: neither Hydra nor MLflow.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tbptt_exp.core import measure
from tbptt_exp.core.config import ConfigError, EngineConfig, EngineName, ExperimentConfig, from_dict
from tbptt_exp.core.device import configure_device, prepare_tensorflow
from tbptt_exp.core.measure import (
    PEAK_MEMORY,
    PROBE_FIGURES,
    TOKENS_TRAINED,
    TRAINING_TIME,
    WARMUP_FIGURES,
    over_budget_mb,
)
from tbptt_exp.core.train import build, check_dataset, prepare, train

MARKER = "TBPTT_PROBE_RESULT "
PHASES = ("start", "imports", "data", "build", "compile", "training", "validation")
WATCH_S = 0.05  # how often a probe reads the allocator's peak while it trains
# A probe's first execution always measures the gradient noise scale (engine=graph), even
# where the run would not: a measuring step (a half-batch pass, then the whole batch) holds
# a plain step's buffers and more, so its peak mostly bounds a plain step's, whose peak on
# TensorFlow's CPU allocator scatters between processes: at B=312, 141-286 MB, where the
# measuring step's read 261-287 with ``measure.steady_cpu_peak``'s region
# (benchmarks/RESULTS.md). This many steps apart: once.
MEASURE_FIRST_ONLY = 1_000_000

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


class Phases:
    """Wall time per phase of a probe (``PHASES``; ``start`` is the launcher's: fork, hand-over, exit)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def describe(cfg: ExperimentConfig, dataset=None) -> dict:
    """The device and TensorFlow's version; for a model of your own, first its check: the
    factory loaded and its model built once, so a refused model stops the search before
    any probe."""
    import tensorflow as tf  # after configure_device: TensorFlow takes device settings only before it starts

    if cfg.model.factory is not None:
        build(cfg, dataset if dataset is not None else prepare(cfg))
    return {"outcome": "describe", "device": measure.device_description(), "tensorflow": tf.__version__}


def run_probe(cfg: ExperimentConfig, seconds: float, dataset=None, phases: Phases | None = None) -> dict:
    """``cfg``'s real training, cut after ``seconds`` of steady state, then one validation
    execution: the same layout, engine, resets and measurements as a training run, so its
    peak memory is the peak a real run reaches. It trains in a thread while this one watches
    the allocator: the moment the peak passes ``device.memory_budget_mb``, the answer is
    "budget" (the training thread ends with the probe's process)."""
    phases = phases or Phases()
    if dataset is None:
        dataset = prepare(cfg)
    else:
        check_dataset(cfg, dataset)  # what depends on the batch size: the layout's size, drop, stream
    phases.lap("data")
    if cfg.engine.name == EngineName.graph and cfg.trainer.noise_scale_every == 0:
        cfg = replace(cfg, trainer=replace(cfg.trainer, noise_scale_every=MEASURE_FIRST_ONLY))
    engine = build(cfg, dataset)
    phases.lap("build")
    budget, device = cfg.device.memory_budget_mb, measure.training_device()
    done: dict = {}

    def run() -> None:
        try:
            done["result"] = train(cfg, dataset=dataset, engine=engine, epoch_seconds=seconds, validation_executions=1)
        except BaseException as error:  # raised below, in the probe's own thread
            done["error"] = error

    training = threading.Thread(target=run, name="probe-training", daemon=True)
    training.start()
    while training.is_alive():
        training.join(WATCH_S)
        if (peak := measure.peak_over(budget, device)) is not None:  # a peak only grows: too big for good
            phases.lap("compile")
            return {PEAK_MEMORY.name: peak, "outcome": "budget"}
    if "error" in done:
        raise done["error"]
    result = done["result"]
    phases.lap("training")
    phases.seconds["compile"] = result.compile_time_s
    phases.seconds["validation"] = sum(epoch.validation_time_s for epoch in result.epochs)
    phases.seconds["training"] -= phases.seconds["compile"] + phases.seconds["validation"]
    answer = {f.name: result.value(f.name) for f in PROBE_FIGURES}
    over = over_budget_mb(result.final, budget)
    if budget is not None and over is None:
        raise unmeasured(budget, device, engine.weights_mb)
    return answer | {"outcome": "budget" if over is not None and over > 0 else "ok"}


def unmeasured(budget: float, device: str, weights_mb: float) -> ConfigError:
    """The budget refused where the device's allocator did not measure the run's peak: an
    unmeasured peak must never read as "fits"."""
    raw = measure.allocator_peak_mb(device)
    if raw is None:
        why = f"TensorFlow's allocator on {device} reports no peak memory"
    else:  # oneDNN's CPU allocator: allocations under 4 KB go uncounted
        why = (f"TensorFlow's allocator on {device} counts no allocation under 4 KB and read {raw:.2f} MB, less than "
               f"this model's weights ({weights_mb:.2f} MB): its tensors are too small to be counted")
    return ConfigError("device.memory_budget_mb", budget, f"{why}, so no batch can be checked against the budget; "
                       "set device.memory_budget_mb=null (the largest size that runs) or size a larger model")


WARMUP_NOISE_EVERY = 5  # the warm-up measures the noise scale this often: ten times the default's samples


def warm_up(cfg: ExperimentConfig, seconds: float, dataset=None, batch_size: int | None = None) -> dict:
    """The gradient noise scale after ``seconds`` of real training at ``batch_size`` (default
    ``trainer.reference_batch_size``; engine=graph, which measures it), with the figures that
    say which point of training it was measured at. The noise scale grows as the loss falls,
    so one measured on the untrained model of a 3-second probe would underrate the batch.

    It is measured in the second half only: in the first the loss falls fast, and its large
    gradients would drag the averages down (a third of the way into 20 s at batch 168 the
    noise scale read 11 streams, later 117-139; averaged from the start, 65)."""
    trainer = replace(cfg.trainer, epochs=1_000_000, max_time_s=seconds / 2, target_val_loss=None,
                      noise_scale_every=WARMUP_NOISE_EVERY)
    run = replace(cfg, batch_size=batch_size or cfg.trainer.reference_batch_size, trainer=trainer, engine=EngineConfig(),
                  device=replace(cfg.device, memory_budget_mb=None))
    dataset = dataset if dataset is not None else prepare(run)
    engine = build(run, dataset)
    first = train(run, dataset=dataset, engine=engine)
    engine.restart_noise_scale()
    result = train(run, dataset=dataset, engine=engine)  # the same model trains on
    figures = {f.name: result.value(f.name) for f in WARMUP_FIGURES}
    figures[TOKENS_TRAINED.name] = first.tokens_trained + result.tokens_trained  # the whole warm-up's
    figures[TRAINING_TIME.name] = first.training_time_s + result.training_time_s
    return figures | {"outcome": "warmup", "batch_size": run.batch_size}


def answer(request: dict) -> dict:
    """The probe's answer to one request, with its ``phases``; any failure is reported and classified."""
    phases = Phases()
    try:
        prepare_tensorflow()
        cfg = from_dict(request["config"])
        configure_device(cfg.device, say=lambda line: print(line, file=sys.stderr))  # before TensorFlow starts
        phases.lap("imports")
        if request.get("describe"):
            return describe(cfg, request.get("dataset"))
        if request.get("warmup"):
            return warm_up(cfg, request["seconds"], request.get("dataset"), request.get("batch_size"))
        return run_probe(cfg, request["seconds"], request.get("dataset"), phases) | {"phases": phases.seconds}
    except ConfigError as refused:  # a setting that cannot work: the parent says so in one line
        return {"outcome": "refused", "error": str(refused), "setting": refused.setting, "value": refused.value,
                "allowed": refused.allowed}
    except Exception as error:  # the parent decides what it means
        return {
            "outcome": classify_error(error),
            "error": f"{type(error).__name__}: {error}".strip()[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }


def die_with_finder(lifeline) -> None:
    """A probe is part of its finder: when the finder ends, even killed outright (``kill -9``),
    the kernel closes its end of ``lifeline``, and the probe ends too instead of training on
    with nobody to answer. (Its fork server cannot tell: every process it forks keeps it alive.)"""
    try:
        lifeline.recv()  # nothing is ever sent: this returns only when the finder's end closes
    except (EOFError, OSError):
        pass
    os._exit(1)


def serve(entry: Callable[[dict], dict], request: dict, answer_path: str, output_path: str, lifeline) -> None:
    """A forked probe's body: its output (TensorFlow's native logs included) into
    ``output_path``, ``entry(request)`` as JSON into ``answer_path``, written whole or not at all."""
    threading.Thread(target=die_with_finder, args=(lifeline,), name="probe-lifeline", daemon=True).start()
    output = os.open(output_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(output, 1)
    os.dup2(output, 2)
    found = json.dumps(entry(request))
    Path(answer_path + ".part").write_text(found)
    os.replace(answer_path + ".part", answer_path)


_server: multiprocessing.context.BaseContext | None = None


def probe_processes() -> multiprocessing.context.BaseContext:
    """Where probes start: the fork server with TensorFlow imported (``probes.server``); a fresh
    interpreter per probe on a platform without one."""
    global _server
    if _server is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _server = multiprocessing.get_context("forkserver")
            _server.set_forkserver_preload(["tbptt_exp.core.probes.server"])
        else:
            _server = multiprocessing.get_context("spawn")
    return _server


def launch(request: dict, timeout_s: float, entry: Callable[[dict], dict] = answer) -> dict:
    """Run ``entry(request)`` (``answer``: one probe) in a process of its own; its answer with
    ``seconds`` (its whole wall time) and the ``start`` phase, or how it died."""
    with tempfile.TemporaryDirectory(prefix="tbptt-probe-") as folder:
        answer_path, output_path = os.path.join(folder, "answer.json"), os.path.join(folder, "output.log")
        Path(output_path).touch()
        started = time.perf_counter()
        lifeline, held = probe_processes().Pipe(duplex=False)  # the probe reads; this process holds the other end
        process = probe_processes().Process(target=serve, args=(entry, request, answer_path, output_path, lifeline),
                                            daemon=True)
        process.start()
        lifeline.close()
        try:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join()
                return {"outcome": "timeout", "error": f"no answer within {timeout_s:.0f} s", "seconds": timeout_s}
        finally:
            held.close()
        seconds = time.perf_counter() - started
        if os.path.exists(answer_path):
            found = json.loads(Path(answer_path).read_text())
            if "phases" in found:
                found["phases"] = {"start": seconds - sum(found["phases"].values())} | found["phases"]
            return found | {"seconds": seconds}
        if process.exitcode == -signal.SIGKILL:  # the kernel's out-of-memory killer, most often
            return {"outcome": "killed", "error": "killed (host memory?)", "seconds": seconds}
        tail = Path(output_path).read_text(errors="replace").strip().splitlines()[-5:]
        return {"outcome": "error", "error": f"probe exited {process.exitcode}: " + " | ".join(tail),
                "seconds": seconds}


def main() -> None:
    """``python -m tbptt_exp.core.probes.probe < request.json``: one probe in this process, by hand."""
    print(MARKER + json.dumps(answer(json.loads(sys.stdin.read()))), flush=True)
    os._exit(0)  # as a forked probe ends: a training thread stopped over the budget goes with it


if __name__ == "__main__":
    main()
