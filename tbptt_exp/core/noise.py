"""The gradient noise scale and what it says about a batch size.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", Appendix A): the
squared norm of a gradient averaged over b samples has expectation |G|² + tr(Σ)/b, with G
the true gradient and Σ the covariance of one sample's gradient. Two batch sizes measured
on the same step give unbiased estimates of both, and their ratio B_noise = tr(Σ)/|G|² is
about the critical batch: below it a larger batch buys almost proportionally fewer steps,
above it hardly any. In a stateful TBPTT batch the sample is a row (a stream): the chunks
of one stream are correlated, its rows are not, so B_noise is counted in streams.

The arithmetic here is plain operators, so it runs on floats, NumPy arrays and tensors
inside a compiled train step alike (``engines.GraphEngine``).
"""

from __future__ import annotations

import math

EMA_DECAY = 0.9  # per measurement: with one every 50 steps, about the last 500 steps count


def two_batch_estimates(small_sq, big_sq, inv_small, inv_big):
    """Unbiased (|G|², tr(Σ)) from ``small_sq`` = |G_small|² and ``big_sq`` = |G_big|²,
    measured at 1/b = ``inv_small`` and ``inv_big`` samples (1/b, so that the mean of two
    small halves of unequal sizes enters as the mean of their 1/b).

    tr(Σ) = (|G_small|² − |G_big|²) / (1/b_small − 1/b_big) and |G|² = |G_big|² − tr(Σ)/b_big,
    which is McCandlish's (b_big·|G_big|² − b_small·|G_small|²) / (b_big − b_small).
    Either can come out negative on one step: only their averages mean something.
    """
    trace = (small_sq - big_sq) / (inv_small - inv_big)
    return big_sq - trace * inv_big, trace


def noise_scale(ema_sq: float, ema_trace: float) -> float | None:
    """B_noise = EMA(tr(Σ)) / EMA(|G|²): the ratio of the averages, not the average of the
    ratios (which one noisy step with |G|² near 0 would swamp). None while the averaged
    |G|² is not positive: no signal above the noise yet. (An EMA's start-up bias is the same
    factor in both, so it cancels in the ratio.)"""
    if not ema_sq > 0 or math.isnan(ema_trace):
        return None
    return max(0.0, ema_trace / ema_sq)


def statistical_efficiency(batch_size: float, b_noise: float, reference: float) -> float:
    """The useful share of each sample at ``batch_size`` against ``reference`` (1 there):
    (B_noise + B_ref) / (B_noise + B), Pollux's gain over scale. Steps to a result scale as
    1 + B_noise/B (McCandlish eq. 2.11), so samples to a result as B + B_noise."""
    return (b_noise + reference) / (b_noise + batch_size)


def goodput(tokens_per_s: float, batch_size: float, b_noise: float, reference: float) -> float:
    """Real tokens per second times their statistical efficiency: progress per second,
    in tokens of the reference batch size."""
    return tokens_per_s * statistical_efficiency(batch_size, b_noise, reference)
