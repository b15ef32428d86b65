"""The one measurement: throughput windows, their spread, per-run peaks."""

import numpy as np
import pytest

from tbptt_exp.core import measure
from tbptt_exp.core.measure import EpochTiming, throughput


def timing(marks, start=0.0):
    t = EpochTiming(start=start)
    t.marks = list(marks)
    return t


def test_rates_are_medians_of_the_windows_after_the_first_execution():
    # 10 batches of 4 rows x 5 steps (20 timesteps), 15 of them real; the first execution
    # (compilation) took 5 s and must not count.
    real = np.full(10, 15.0)
    t = timing([(5.0, 1), (6.0, 4), (7.0, 6), (9.0, 10)])
    speed = throughput(t, real, 20)
    windows = [3 * 15 / 1.0, 2 * 15 / 1.0, 4 * 15 / 2.0]  # 45, 30, 30 real tokens/s
    assert speed.tokens_per_s == pytest.approx(np.median(windows))
    assert speed.padded_tokens_per_s == pytest.approx(np.median([3 * 20, 2 * 20, 4 * 20 / 2.0]))
    assert speed.tokens_per_s_spread == pytest.approx(np.percentile(windows, 75) - np.percentile(windows, 25))
    assert speed.windows == 3


def test_all_timesteps_per_second_are_never_fewer_than_real_ones():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        real = rng.integers(0, 21, n).astype(float)  # some batches all padding
        times = np.cumsum(rng.uniform(0.1, 2.0, n))
        marks = [(float(t), i + 1) for i, t in enumerate(times)]
        speed = throughput(timing(marks), real, 20)
        assert speed.padded_tokens_per_s >= speed.tokens_per_s


def test_one_execution_is_one_window_without_a_spread():
    speed = throughput(timing([(2.0, 3)], start=0.0), np.array([10.0, 10.0, 5.0]), 10)
    assert speed.tokens_per_s == pytest.approx(25 / 2.0) and speed.padded_tokens_per_s == pytest.approx(30 / 2.0)
    assert speed.tokens_per_s_spread is None and speed.windows == 1


def test_peak_rss_is_per_run_not_per_process():
    block = np.ones(300 * 1024 * 1024 // 8)  # 300 MB resident
    high = measure.peak_rss_mb()
    del block
    measure.reset_peak_rss()
    assert measure.peak_rss_mb() < high - 200


def test_a_device_without_allocator_statistics_reports_unknown():
    assert measure.peak_memory_mb("CPU:99") is None


def test_a_timed_run_that_goes_round_the_layout_again_counts_every_batch():
    real = np.array([10.0, 20.0, 30.0])  # 60 real tokens a round
    speed = throughput(timing([(1.0, 1), (2.0, 7)]), real, 40)  # batches 1..6: 20+30+10+20+30+10
    assert speed.tokens_per_s == pytest.approx(120.0) and speed.padded_tokens_per_s == pytest.approx(240.0)


def test_a_cpu_budget_reserves_one_allocator_region_unwritten_and_outside_the_runs_peak():
    """The region is taken through the allocator whose peak is judged (so its peak shows it),
    is not written (the process's resident memory does not grow by it), is not taken
    without a budget or on a GPU, and ``build`` takes it before the run's peak starts."""
    from tbptt_exp.core.config import DeviceConfig, ExperimentConfig, ModelConfig
    from tbptt_exp.core.train import build, prepare

    if not measure.training_device().startswith("CPU"):
        pytest.skip("the region is for TensorFlow's CPU allocator; a GPU's is left as it is")
    for budget, device in ((None, "CPU:0"), (256, "GPU:0")):
        measure.reset_peak_memory("CPU:0")
        measure.steady_cpu_peak(budget, device)
        assert measure.allocator_peak_mb("CPU:0") < 256, (budget, device)
    measure.reset_peak_memory("CPU:0")
    measure.reset_peak_rss()
    before = measure.peak_rss_mb()
    measure.steady_cpu_peak(256, "CPU:0")
    assert measure.allocator_peak_mb("CPU:0") >= 2 * 256
    assert measure.peak_rss_mb() - before < 100  # 512 MB reserved; written, it would be resident
    cfg = ExperimentConfig(model=ModelConfig(units=64), device=DeviceConfig(memory_budget_mb=256))
    build(cfg, prepare(cfg))
    assert measure.allocator_peak_mb("CPU:0") < 256  # the model's own, not the region
