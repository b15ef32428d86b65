"""A batch-size probe works on every dataset a training run works on, and never reads an
unmeasured peak as "fits".

- Labels only at a sequence's end, on sequences much longer than k: most executions carry no
  weight, so a probe's one validation execution must be one that does (it divided by zero).
- Chunks whose targets are all missing (NaN) carry no weight either.
- A probe cut before its first label has trained no weighted step: its training loss is
  unknown, not NaN, and not a divergence.
- A model whose tensors are all under 4 KB reads a 0.0 MB peak on TensorFlow's oneDNN CPU
  allocator (it counts no smaller allocation): with a budget, the probe refuses to judge it.
"""

from dataclasses import replace

import numpy as np
import pytest

from tbptt_exp.core import measure
from tbptt_exp.core.config import ArraysDataConfig, DeviceConfig, ExperimentConfig, ModelConfig, to_dict
from tbptt_exp.core.engines import per_token_loss
from tbptt_exp.core.probes.probe import launch, run_probe

RNG = np.random.default_rng(11)
SMALL = ModelConfig(units=32)


def long_labelled(tmp_path, n=16, steps=1460):
    """``n`` recordings of ``steps`` steps, one class label each (per-sequence targets)."""
    x = RNG.normal(size=(n, steps, 3)).astype(np.float32)
    np.savez(tmp_path / "long.npz", x=x, y=(x[:, :, 0].mean(axis=1) > 0).astype(np.int64))
    return str(tmp_path / "long.npz")


def test_a_probe_validates_per_sequence_labels_on_sequences_far_longer_than_k(tmp_path):
    cfg = ExperimentConfig(k=50, batch_size=8, model=SMALL,
                           data=ArraysDataConfig(path=long_labelled(tmp_path), val_fraction=0.5))
    found = run_probe(cfg, 0.5)
    assert found["outcome"] == "ok", found
    assert found["tokens_per_s"] > 0  # it trained, then validated (there it divided by zero)


def test_a_probe_validates_data_whose_chunks_hold_only_missing_targets(tmp_path):
    y = RNG.normal(size=(8, 600)).astype(np.float32)
    y[:, :400] = np.nan  # the first 8 chunks of every sequence: no known target
    np.savez(tmp_path / "gaps.npz", x=RNG.normal(size=(8, 600, 2)).astype(np.float32), y=y)
    cfg = ExperimentConfig(k=50, batch_size=4, model=SMALL,
                           data=ArraysDataConfig(path=str(tmp_path / "gaps.npz"), val_fraction=0.5))
    found = run_probe(cfg, 0.5)
    assert found["outcome"] == "ok", found
    assert found["tokens_per_s"] > 0


def test_an_epoch_that_reached_no_label_has_no_training_loss_and_a_nan_one_is_still_nan():
    assert per_token_loss([(0.0, 0.0), (0.0, 0.0)]) is None
    assert per_token_loss([(2.0, 1.0), (4.0, 3.0)]) == pytest.approx(1.5)
    assert np.isnan(per_token_loss([(float("nan"), 0.0)]))  # NaN is a divergence, never "no label yet"


def test_a_model_too_small_for_the_cpu_allocator_to_count_is_refused_not_fitted():
    if not measure.training_device().startswith("CPU"):
        pytest.skip("TensorFlow's CPU allocator is the one that counts no allocation under 4 KB")
    tiny = ExperimentConfig(k=25, batch_size=8, model=ModelConfig(units=16, embedding_dim=4),
                            device=DeviceConfig(memory_budget_mb=1))
    cfg = to_dict(tiny)
    cfg["trainer"]["epochs"] = 1
    # In a process of its own, as the finder runs it: this one's allocator holds other tests' tensors.
    found = launch({"config": cfg, "seconds": 0.5}, timeout_s=300)
    assert found["outcome"] == "refused", found
    assert found["setting"] == "device.memory_budget_mb" and "under 4 KB" in found["allowed"]
    # The default model's peak is counted: the same probe measures it.
    found = launch({"config": to_dict(replace(tiny, model=ModelConfig(), device=DeviceConfig(memory_budget_mb=10_000)))
                    | {"trainer": cfg["trainer"]}, "seconds": 0.5}, timeout_s=300)
    assert found["outcome"] == "ok" and found["peak_memory_mb"] > 1, found
