"""A test-only probe entry point: the real probe, with a fault planted at a batch size.

    find_max_batch(cfg, probe_entry=planted("hang:32"))     KIND: error | hang | oom, from batch size AT up

The batch-size finder runs it in each probe process in place of ``probe.answer``, so
production code carries no fault hooks.
"""

import functools
import time

from tbptt_exp.core.probes import probe


def planted(spec: str):
    """A probe entry with ``spec``'s fault planted (picklable: each probe process runs it)."""
    return functools.partial(planted_answer, spec)


def planted_answer(spec: str, request: dict) -> dict:
    kind, _, at = spec.partition(":")
    real_run_probe = probe.run_probe

    def planted_run_probe(cfg, *args, **kwargs):
        if cfg.batch_size >= int(at or 0):
            if kind == "hang":
                time.sleep(3600)
            if kind == "oom":
                import tensorflow as tf

                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (planted)")
            if kind == "error":
                raise RuntimeError(f"planted failure at batch_size={cfg.batch_size}")
        return real_run_probe(cfg, *args, **kwargs)

    probe.run_probe = planted_run_probe  # this probe process only: it ends after one answer
    return probe.answer(request)
