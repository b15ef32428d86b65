"""One batch-size probe, run as ``python -m tbptt_exp.core.probe`` in a fresh process.

TensorFlow keeps GPU memory after an out-of-memory error until its process exits, so
every probe gets a process of its own. It trains like the real thing — several
consecutive chunks with state carried and a per-row reset, optimizer steps (slots
allocated), a validation pass — and prints one JSON line: the outcome, the allocator's
peak memory and tokens/s. The parent classifies crashes and time-outs.

Input (stdin, JSON): ``config`` (``core.config.to_dict`` of the experiment, validated on
arrival), ``batch_size``, ``vocab_size``, ``chunks``; ``{"describe": true}`` only reports
the device. A probe imports the core only: neither Hydra nor MLflow.
"""

from __future__ import annotations

import json
import re
import sys
import traceback

from tbptt_exp.core.config import ExperimentConfig, from_dict

MARKER = "TBPTT_PROBE_RESULT "

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


def describe() -> dict:
    import tensorflow as tf

    from tbptt_exp.core import measure

    return {"outcome": "describe", "device": measure.device_description(), "tensorflow": tf.__version__}


def run_probe(cfg: ExperimentConfig, batch_size: int, vocab_size: int, chunks: int) -> dict:
    """Train ``chunks`` carried chunks per stream at ``batch_size``; outcome, peak, tokens/s."""
    import numpy as np

    from tbptt_exp.core import measure
    from tbptt_exp.core.engines import ENGINES
    from tbptt_exp.core.layout import Corpus, build_layout
    from tbptt_exp.core.model import build_model, make_optimizer

    b, k = batch_size, cfg.k
    device = measure.training_device()
    measure.reset_peak_memory(device)
    rng = np.random.default_rng(0)
    # B streams of `chunks` chunks, then a second sequence in every other row: state is
    # carried across chunks and reset per row, as in training.
    lengths = [chunks * k] * b + [k] * (b // 2)
    corpus = Corpus([rng.integers(1, vocab_size, n).astype("int32") for n in lengths],
                    [rng.integers(1, vocab_size, n).astype("int32") for n in lengths])
    layout = build_layout(corpus, k, b, "pack", "sequence")
    model = build_model(cfg.model, vocab_size, b, k)
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


def answer(request: dict) -> dict:
    """The probe's answer to one request; any failure is reported and classified."""
    from tbptt_exp.core.device import configure_device, prepare_tensorflow

    try:
        prepare_tensorflow()
        cfg = from_dict(request["config"])
        configure_device(cfg.device, say=lambda line: print(line, file=sys.stderr))  # before TensorFlow starts
        if request.get("describe"):
            return describe()
        return run_probe(cfg, request["batch_size"], request["vocab_size"], request["chunks"])
    except Exception as error:  # the parent decides what it means
        return {
            "outcome": classify_error(error),
            "error": f"{type(error).__name__}: {error}".strip()[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }


def main() -> None:
    print(MARKER + json.dumps(answer(json.loads(sys.stdin.read()))), flush=True)


if __name__ == "__main__":
    main()
