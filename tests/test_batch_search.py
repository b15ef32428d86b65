"""The batch-size search on simulated devices: fast, no TensorFlow."""

import math
from dataclasses import replace

import pytest

from tbptt_exp.app.batch.finder import Probe, ProbeError, max_probes, search
from tbptt_exp.app.settings import BatchFinderConfig
from tbptt_exp.core.config import ConfigError
from tbptt_exp.core.probes.probe import classify_error

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


MEMORIES = {
    "linear": lambda b: 40 + 0.25 * b,
    "quadratic": lambda b: 40 + 0.1 * b + 0.0004 * b * b,  # activations growing faster than linear
    "jump": lambda b: 40 + 0.3 * b + (120 if b > 300 else 0),  # a new kernel workspace
    "flat": lambda b: 300 + 0.01 * b,  # nearly flat: the top of the range fits
}


def test_the_bound_is_the_issues_eleven_for_8_to_4096():
    assert max_probes(CFG) == 11 == math.ceil(math.log2(4096 / 8)) + 2


@pytest.mark.parametrize("memory", MEMORIES.values(), ids=MEMORIES.keys())
@pytest.mark.parametrize("budget", [100, 500, 900])
def test_finds_the_largest_size_that_fits_and_the_next_one_up_does_not(memory, budget):
    probe, calls = device(memory, budget, small_tensor_blindness=0.7)
    found = search(probe, CFG, budget)
    best = found.max_batch_size
    assert best == truth(memory, budget, 0.7)
    outcomes = {p.batch_size: p.fits for p in found.probes}
    assert outcomes[best] if best else True
    if best and best < 4096:
        assert outcomes[best + 8] is False  # verified, not assumed
    assert len(calls) == len(set(calls))  # no size probed twice
    assert len(calls) <= max_probes(CFG)


@pytest.mark.parametrize("memory", MEMORIES.values(), ids=MEMORIES.keys())
@pytest.mark.parametrize("budget", [100, 500, 900])
def test_the_recommended_size_is_probed_and_leaves_the_headroom(memory, budget):
    probe, _calls = device(memory, budget)
    found = search(probe, CFG, budget)
    rec = found.recommended_batch_size
    peaks = {p.batch_size: p.peak_memory_mb for p in found.probes}
    if rec:
        assert rec in peaks and peaks[rec] <= budget * (1 - CFG.headroom)  # measured, not predicted
        assert rec <= found.max_batch_size
    below_line = [b for b in range(8, 4097, 8) if memory(b) <= budget * (1 - CFG.headroom)]
    if below_line:
        assert rec >= 0.8 * max(below_line) - 8  # close to the best a perfect predictor could do
    assert found.memory_monotone


def test_without_a_budget_it_bisects_on_real_out_of_memory():
    def probe(b):
        return Probe(b, "ok" if b <= 1000 else "oom", None, None)

    found = search(probe, CFG, None)
    assert found.max_batch_size == 1000 // 8 * 8
    assert found.recommended_batch_size == int(1000 // 8 * 8 * 0.9) // 8 * 8
    assert len(found.probes) <= max_probes(CFG)


def test_nothing_fits():
    found = search(lambda b: Probe(b, "oom"), CFG, 100)
    assert (found.max_batch_size, found.recommended_batch_size, len(found.probes)) == (0, 0, 1)


def test_a_non_memory_error_stops_the_search():
    def probe(b):
        return Probe(b, "error" if b >= 64 else "ok", 10.0 + b, 1.0, error="ValueError: bug")

    with pytest.raises(ProbeError, match="batch_size=.*ValueError: bug"):
        search(probe, CFG, 10_000)


def test_an_unmeasured_peak_never_fits_and_stops_the_search_as_the_budget_refused():
    refused = {"outcome": "refused", "setting": "device.memory_budget_mb", "value": 500.0, "error": "...",
               "allowed": "TensorFlow's allocator on CPU:0 counts no allocation under 4 KB and read 0.00 MB"}
    probed = []

    def probe(b):
        probed.append(b)
        return Probe.from_answer(b, refused)

    with pytest.raises(ConfigError, match=r"^device.memory_budget_mb=500.0 is not allowed: .*under 4 KB"):
        search(probe, CFG, 500)
    assert len(probed) == 1  # the first probe's refusal ends the search: nothing counted as fitting


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


def test_non_monotone_memory_still_gives_a_verified_answer_and_says_so():
    """Kernels and allocators change with shapes, so memory can dip at a larger batch; the
    answer is still a size that fits with the next size up measured as too big."""
    memory = lambda b: 40 + 0.25 * b - (30 if b % 64 == 56 else 0)
    probe, _calls = device(memory, 500)
    found = search(probe, CFG, 500)
    outcomes = {p.batch_size: p.fits for p in found.probes}
    assert outcomes[found.max_batch_size] and outcomes[found.max_batch_size + 8] is False
    assert abs(found.max_batch_size - 1840) <= 64
    small_sizes_misreported = lambda b: 18 if b < 32 else 9.4 + 0.001 * b
    probe, _ = device(small_sizes_misreported, 500)
    assert search(probe, CFG, 500).memory_monotone is False


def test_a_probe_line_gives_its_phases_and_an_answer_what_it_took():
    from tbptt_exp.app.batch.finder import Frontier

    probe = Probe(64, "ok", peak_memory_mb=40.0, seconds=5.5,
                  phases={"start": 0.1, "build": 0.6, "compile": 1.2, "training": 3.2, "validation": 0.4})
    assert probe.describe(25).endswith("[5.5 s, start 0.1, build 0.6, compile 1.2, training 3.2, validation 0.4]")
    assert probe.measuring_s == pytest.approx(4.8)
    found = Frontier(25, 64, 56, 40.0, None, None, probes=9, budget_mb=50.0, search_s=41.2, measuring_s=27.4)
    assert found.cost().startswith("9 probes in 41 s, 27 s of it training and validating")
    assert replace(found, cached=True).cost() == "9 probes, cached"


def test_a_probe_over_the_budget_says_the_budget_and_the_peak_it_reached():
    probe = Probe(72, "budget", peak_memory_mb=51.3, seconds=2.0, phases={"start": 0.1, "build": 0.6, "compile": 1.3})
    assert probe.describe(25, 50.0) == ("k=25 batch_size=72: over the budget of 50 MB at a peak of 51.3 MB "
                                        "[2.0 s, start 0.1, build 0.6, compile 1.3]")
