"""MLflow metric names, grouped by what they measure (``loss/``, ``speed/``, ``memory/``...),
so the MLflow UI draws one chart section per group.

The figures keep their field names everywhere else (``EpochMetrics``, objectives, nightly
results files, sweep tables); only what MLflow records is named here, in one place.
"""

from __future__ import annotations

import dataclasses

EPOCH = {  # EpochMetrics field -> MLflow name, logged once per epoch (step = epoch)
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "val_bits_per_char": "loss/val_bits_per_char",
    "tokens_per_s": "speed/real_tokens_per_s",
    "padded_tokens_per_s": "speed/all_tokens_per_s",
    "tokens_per_s_spread": "speed/real_tokens_per_s_iqr",
    "epoch_time_s": "speed/epoch_time_s",
    "first_execution_s": "speed/first_execution_s",
    "peak_memory_mb": "memory/allocator_peak_mb",
    "peak_rss_mb": "memory/process_rss_peak_mb",
}
RUN = {  # once per run
    "compile_time_s": "speed/compile_time_s",
    "padding_waste": "data/padding_waste",
    "num_params": "model/num_params",
    "tracking_overhead_s": "tracking/overhead_s",
    "peak_memory_over_budget_mb": "memory/over_budget_mb",
}
PROBE = {  # a batch-size probe, logged on its max_batch run with step = the probe's batch size
    "peak_memory_mb": "probe/allocator_peak_mb",
    "tokens_per_s": "probe/real_tokens_per_s",
    "tokens_per_s_spread": "probe/real_tokens_per_s_iqr",
    "fits": "probe/fits",
    "seconds": "probe/seconds",
}
FRONTIER = {  # a max_batch run's answer
    "max_batch_size": "batch/max",
    "recommended_batch_size": "batch/recommended",
    "peak_memory_mb": "memory/allocator_peak_mb",
    "tokens_per_s": "speed/real_tokens_per_s",
    "tokens_per_s_spread": "speed/real_tokens_per_s_iqr",
    "probes": "batch/probes",
}


def named(names: dict[str, str], figures: dict[str, float | None]) -> dict[str, float | None]:
    """``figures`` by field name -> by MLflow name; a figure without a name is an error."""
    return {names[key]: value for key, value in figures.items()}


def epoch_metrics(m) -> dict[str, float | None]:
    """Every figure of an epoch (a new ``EpochMetrics`` field needs a name in ``EPOCH``)."""
    return named(EPOCH, {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name != "epoch"})
