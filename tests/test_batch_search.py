"""The batch-size search on simulated devices: fast, no TensorFlow."""

import math

import pytest

from tbptt_exp.app.batch_finder import Probe, ProbeError, recommended, search
from tbptt_exp.core.config import BatchFinderConfig
from tbptt_exp.core.probe import classify_error

CFG = BatchFinderConfig(granularity=8, min_batch_size=8, max_batch_size=4096)


def reported(memory, b, small_tensor_blindness):
    """Peak as measured: tiny sizes under-reported, like TensorFlow's CPU allocator."""
    return memory(b) * (1 - small_tensor_blindness if b < 32 else 1)


def device(memory, budget, small_tensor_blindness=0.0):
    """A fake probe: measured peak memory against a budget."""
    calls = []

    def probe(b):
        calls.append(b)
        peak = reported(memory, b, small_tensor_blindness)
        return Probe(b, "ok" if peak <= budget else "budget", peak, 1000.0 * b)

    return probe, calls


def truth(memory, budget, small_tensor_blindness=0.0):
    fits = [b for b in range(8, 4097, 8) if reported(memory, b, small_tensor_blindness) <= budget]
    return max(fits, default=0) if fits and fits[0] == 8 else 0


@pytest.mark.parametrize(
    "memory",
    [
        lambda b: 40 + 0.25 * b,  # linear
        lambda b: 40 + 0.1 * b + 0.0004 * b * b,  # activations growing faster than linear
        lambda b: 40 + 0.3 * b + (120 if b > 300 else 0),  # a jump (a new kernel workspace)
        lambda b: 300 + 0.01 * b,  # nearly flat: the top of the range fits
    ],
    ids=["linear", "quadratic", "jump", "flat"],
)
@pytest.mark.parametrize("budget", [100, 500, 900])
def test_finds_the_largest_size_that_fits_and_the_next_one_up_does_not(memory, budget):
    probe, calls = device(memory, budget, small_tensor_blindness=0.7)
    best, probes, _ = search(probe, CFG, budget)
    assert best == truth(memory, budget, 0.7)
    outcomes = {p.batch_size: p.fits for p in probes}
    assert outcomes[best] if best else True
    if best and best < 4096:
        assert outcomes[best + 8] is False  # verified, not assumed
    assert len(calls) == len(set(calls))  # no size probed twice
    assert len(calls) <= math.log2(4096 / 8) + 4


def test_a_linear_device_is_settled_in_a_handful_of_probes():
    probe, calls = device(lambda b: 40 + 0.25 * b, 500)
    best, _, model = search(probe, CFG, 500)
    assert best == 1840 and len(calls) <= 5
    assert model[1] == pytest.approx(0.25)


def test_without_a_budget_it_gallops_then_bisects_on_real_out_of_memory():
    def probe(b):
        return Probe(b, "ok" if b <= 1000 else "oom", None, None)

    best, probes, _ = search(probe, CFG, None)
    assert best == 1000 // 8 * 8
    assert len(probes) <= 2 * math.log2(4096 / 8) + 2


def test_nothing_fits():
    best, probes, _ = search(lambda b: Probe(b, "oom"), CFG, 100)
    assert best == 0 and len(probes) == 1


def test_a_non_memory_error_stops_the_search():
    def probe(b):
        return Probe(b, "error" if b >= 64 else "ok", 10.0 + b, 1.0, error="ValueError: bug")

    with pytest.raises(ProbeError, match="batch_size=.*ValueError: bug"):
        search(probe, CFG, 10_000)


@pytest.mark.parametrize(
    "message, kind",
    [
        ("ResourceExhaustedError: OOM when allocating tensor with shape[512,1000]", "oom"),
        ("InternalError: Dst tensor is not initialized.", "oom"),
        ("InternalError: CUDNN_STATUS_EXECUTION_FAILED in cudnn_rnn_ops", "oom"),
        ("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate", "oom"),
        ("ValueError: shapes (3,) and (4,) are incompatible", "error"),
    ],
)
def test_every_form_of_out_of_memory_is_recognised(message, kind):
    assert classify_error(RuntimeError(message)) == kind


def test_recommended_leaves_headroom():
    cfg = BatchFinderConfig(granularity=8, headroom=0.2)
    assert recommended(1840, (40.0, 0.25), 500.0, cfg) == 1440  # (0.8 * 500 - 40) / 0.25
    assert recommended(0, None, None, cfg) == 0


def test_non_monotone_memory_still_gives_a_verified_answer():
    """Kernels change with shapes, so memory can dip at a larger batch; the answer is still
    a size that fits with the next size up measured as too big."""
    memory = lambda b: 40 + 0.25 * b - (30 if b % 64 == 56 else 0)  # noqa: E731
    probe, calls = device(memory, 500)
    best, probes, _ = search(probe, CFG, 500)
    outcomes = {p.batch_size: p.fits for p in probes}
    assert outcomes[best] and outcomes[best + 8] is False
    assert abs(best - 1840) <= 64
