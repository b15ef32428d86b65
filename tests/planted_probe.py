"""A test-only probe entry point: the real probe, with a fault planted at a batch size.

    python tests/planted_probe.py KIND:AT      KIND: error | hang | oom, from batch size AT up

The batch-size finder runs it in place of ``python -m tbptt_exp.core.probe``
(``find_max_batch(..., probe_command=...)``), so production code carries no fault hooks.
"""

import sys
import time

from tbptt_exp.core import probe

KIND, _, AT = sys.argv[1].partition(":")
real_run_probe = probe.run_probe


def planted_run_probe(cfg, seconds):
    batch_size = cfg.batch_size
    if batch_size >= int(AT or 0):
        if KIND == "hang":
            time.sleep(3600)
        if KIND == "oom":
            import tensorflow as tf

            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (planted)")
        if KIND == "error":
            raise RuntimeError(f"planted failure at batch_size={batch_size}")
    return real_run_probe(cfg, seconds)


probe.run_probe = planted_run_probe

if __name__ == "__main__":
    probe.main()
