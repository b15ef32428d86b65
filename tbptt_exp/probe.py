"""One batch-size probe, run as ``python -m tbptt_exp.probe`` in a fresh process.

TensorFlow keeps GPU memory after an out-of-memory error until its process exits, so
every probe gets a process of its own. It trains like the real thing — several
consecutive chunks with state carried and a per-row reset, optimizer steps (slots
allocated), a validation pass — and prints one JSON line: the outcome, the allocator's
peak memory and tokens/s. The parent classifies crashes and time-outs.

Input (stdin, JSON): the experiment config as a dict, ``batch_size``, ``vocab_size``,
``chunks``; ``{"describe": true}`` only reports the device.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback

MARKER = "TBPTT_PROBE_RESULT "
PLANT_ENV = "TBPTT_EXP_PROBE_PLANT"  # fault injection for tests: "error:64", "hang:64", "oom:64"

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


def emit(result: dict) -> None:
    print(MARKER + json.dumps(result), flush=True)


def planted(batch_size: int) -> None:
    spec = os.environ.get(PLANT_ENV)
    if not spec:
        return
    kind, _, at = spec.partition(":")
    if batch_size < int(at or 0):
        return
    if kind == "hang":
        time.sleep(3600)
    if kind == "oom":
        import tensorflow as tf

        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (planted)")
    if kind == "error":
        raise RuntimeError(f"planted failure at batch_size={batch_size}")


def run_probe(request: dict) -> dict:
    from omegaconf import OmegaConf

    from tbptt_exp.app import configure_device
    from tbptt_exp.config import ExperimentConfig, ExperimentSchema

    cfg: ExperimentConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentSchema), request["config"]))
    configure_device(cfg.device)  # before TensorFlow touches the GPU

    import numpy as np

    from tbptt_exp import measure
    from tbptt_exp.engines import ENGINES
    from tbptt_exp.layout import Corpus, build_layout
    from tbptt_exp.model import build_model, make_optimizer

    if request.get("describe"):
        import tensorflow as tf

        return {"outcome": "describe", "device": measure.device_description(), "tensorflow": tf.__version__}

    b, k, chunks, vocab = request["batch_size"], cfg.k, request["chunks"], request["vocab_size"]
    planted(b)
    device = measure.training_device()
    measure.reset_peak_memory(device)
    rng = np.random.default_rng(0)
    # B streams of `chunks` chunks, then a second sequence in every other row: state is
    # carried across chunks and reset per row, as in training.
    lengths = [chunks * k] * b + [k] * (b // 2)
    corpus = Corpus([rng.integers(1, vocab, n).astype("int32") for n in lengths],
                    [rng.integers(1, vocab, n).astype("int32") for n in lengths])
    layout = build_layout(corpus, k, b, "pack", "sequence")
    model = build_model(cfg.model, vocab, b, k)
    engine = ENGINES[cfg.engine.name](model, cfg.trainer, from_logits=not cfg.model.softmax_output,
                                      optimizer=make_optimizer(cfg.trainer))
    engine.train_epoch(layout)  # traces and compiles
    timed = engine.train_epoch(layout)  # steady state
    engine.evaluate(build_layout(Corpus(corpus.inputs[:b], corpus.targets[:b]), k, b, "dummy"))
    peak = measure.peak_memory_mb(device)
    real = layout.real_tokens
    tokens_per_s = real / timed.timing.wall_s if timed.timing.wall_s > 0 else float("nan")
    budget = cfg.device.memory_budget_mb
    outcome = "budget" if budget is not None and peak > budget else "ok"
    return {"outcome": outcome, "peak_memory_mb": peak, "tokens_per_s": tokens_per_s}


def main() -> None:
    request = json.loads(sys.stdin.read())
    try:
        result = run_probe(request)
    except Exception as error:  # reported, classified; the parent decides what it means
        result = {
            "outcome": classify_error(error),
            "error": f"{type(error).__name__}: {error}".strip()[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    emit(result)


if __name__ == "__main__":
    main()
