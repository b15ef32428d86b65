"""The jobs a Hydra run executes: train one experiment, or find the largest workable batch.

Each job gets one validated ``ExperimentConfig`` and a ``JobContext`` (everything it
needs from Hydra and its sweep, as values), runs the core inside one tracked run and
returns a ``JobOutcome`` for its sweep. Neither reads Hydra's globals or the environment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from tbptt_exp.app import metrics
from tbptt_exp.app.console import Progress, epoch_line, error, mb, say, spread_text
from tbptt_exp.app.sweep import JobOutcome, SweepLink
from tbptt_exp.core.config import ExperimentConfig, objective_names, to_dict

EXIT_PROBE_ERROR = 3


@dataclass
class JobContext:
    """What the Hydra entry point hands a job."""

    overrides: list[str] = field(default_factory=list)  # the job's own task overrides
    output_dir: Path = Path(".")
    multirun: bool = False
    link: SweepLink = field(default_factory=SweepLink)
    sweeper: dict = field(default_factory=dict)  # the job's hydra.sweeper settings (Optuna: study, storage, pruner)
    config_yaml: str = ""  # the resolved config, recorded as an artifact


# Settings a task does not read, left out of its run's params (MLflow's columns and
# comparisons are then about what made the runs differ). Tracking settings say where a
# run is recorded, not what ran; they stay in the config.yaml artifact.
NOT_READ_BY = {
    "train": ("task", "verbose", "tracking.", "batch_finder.", "nightly."),
    "max_batch": ("task", "verbose", "tracking.", "nightly.", "batch_size", "trainer.epochs", "objective"),
}


def run_params(experiment: ExperimentConfig) -> dict:
    """The settings this run's task reads, flattened (``model.units``...); a nightly entry
    keeps ``nightly.*``, which decide how it is judged."""
    from tbptt_exp.app.run import flatten

    skip = NOT_READ_BY[experiment.task]
    if experiment.nightly.record:
        skip = tuple(s for s in skip if s != "nightly.")
    return {k: v for k, v in flatten(to_dict(experiment)).items() if not k.startswith(skip)}


def run_note(e: ExperimentConfig, measure) -> str:
    """The run's MLflow description: what ran, then what each figure means."""
    what = (f"Trained a {e.model.layers}x{e.model.units} LSTM ({e.model.preset}) with TBPTT: chunks of k={e.k}, "
            f"{e.batch_size} streams per batch, padding={e.padding}, reset={e.reset}, engine={e.engine.name}, "
            f"{e.trainer.precision}, {e.trainer.epochs} epochs. `memory/allocator_peak_mb` is TensorFlow's "
            "allocator peak on the training device (the tensors: what decides the largest batch); "
            "`memory/process_rss_peak_mb` is the whole process (runtime, libraries, data), far larger on a CPU.")
    names = metrics.EPOCH | metrics.RUN
    return what + "\n\n" + "\n".join(f"- `{names.get(name, name)}`: {text}" for name, text in measure.DEFINITIONS.items())


def claim_devices(e: ExperimentConfig) -> str | None:
    """``device.gpus_per_job``: this worker's own GPUs, claimed before TensorFlow starts."""
    if e.device.gpus_per_job is None:
        return None
    from tbptt_exp.core.device import claim_gpus, default_slots_dir, visible_gpus

    mine = ",".join(claim_gpus(visible_gpus(), e.device.gpus_per_job, default_slots_dir()))
    say(f"this worker's GPUs: {mine} (CUDA_VISIBLE_DEVICES)")
    return mine


def train_job(experiment: ExperimentConfig, ctx: JobContext) -> JobOutcome:
    """Train one experiment and track it; report each epoch to the job's Optuna trial."""
    from tbptt_exp.app.run import environment_tags, make_tracker, result_record
    from tbptt_exp.core.data import load_dataset
    from tbptt_exp.core.device import configure_device
    from tbptt_exp.core.train import check_dataset, train

    started = time.perf_counter()
    e = experiment
    dataset = load_dataset(e.data, e.seed)
    check_dataset(e, dataset)
    say(
        f"data: {dataset.source}: {len(dataset.train):,} train / {len(dataset.val):,} validation "
        f"sequences, {dataset.train.num_tokens:,} training tokens, vocabulary {dataset.vocab_size}"
    )
    say(
        f"k={e.k} batch_size={e.batch_size} padding={e.padding} reset={e.reset} "
        f"engine={e.engine.name} model={e.model.preset} ({e.model.layers}x{e.model.units} LSTM) "
        f"epochs={e.trainer.epochs}"
    )
    trial = None
    if ctx.link.trial_id is not None:
        from tbptt_exp.app.study import job_trial

        trial = job_trial(ctx.sweeper, ctx.link.trial_id)
    objectives = objective_names(e.objective)
    gpus = claim_devices(e)
    configure_device(e.device, say)  # TensorFlow loads here, once the settings are known good
    from tbptt_exp.core import measure

    say(f"training on {measure.training_device()} ({measure.device_description()['device_name']})")
    tracker = make_tracker(e.tracking)
    with tracker.run(
        name=e.tracking.run_name
        or f"k={e.k} B={e.batch_size} {e.padding}/{e.reset} {e.engine.name} {e.model.preset}",
        params=run_params(e),
        tags={
            **environment_tags(),
            **measure.device_description(),
            "tbptt_exp.kind": "experiment",
            "hydra.overrides": " ".join(ctx.overrides),
            "data.fingerprint": dataset.fingerprint,
            "device.gpus": gpus,
            "mlflow.note.content": run_note(e, measure),
            **({"optuna.study": trial.study.study_name, "optuna.trial": trial.trial.number} if trial else {}),
        },
        parent_run_id=ctx.link.parent_run_id,
        system_metrics=e.tracking.system_metrics_interval_s,
    ) as run:
        if ctx.config_yaml:
            run.log_text(ctx.config_yaml, "config.yaml")
        if dataset.vocabulary:
            run.log_dict({"vocabulary": dataset.vocabulary, "padding_id": 0, "unknown_id": 1}, "vocabulary.json")

        progress = Progress()

        def on_epoch(m) -> None:
            progress.close()
            say(epoch_line(m, e.trainer.epochs))
            run.log_metrics(metrics.epoch_metrics(m), step=m.epoch)
            if trial is not None:
                trial.report(getattr(m, objectives[0]), m.epoch)

        try:
            result = train(e, on_epoch=on_epoch, dataset=dataset, progress=progress)  # a pruned trial raises here
        finally:
            progress.close()

        final = result.final
        bpc = f" ({final.val_bits_per_char:.3f} bits/char)" if final.val_bits_per_char is not None else ""
        say(f"done in {time.perf_counter() - started:.1f} s")
        say(f"  val_loss {final.val_loss:.4f}{bpc}  train_loss {final.train_loss:.4f}")
        say(f"  real tokens/s {final.tokens_per_s:,.0f}{spread_text(final.tokens_per_s_spread)} "
            f"(all timesteps incl. padding {final.padded_tokens_per_s:,.0f}/s), "
            f"first execution (tracing+compile) {result.compile_time_s:.1f} s")
        say(f"  peak memory {mb(final.peak_memory_mb)} on {result.device.get('device')} "
            f"(TensorFlow allocator, this run), process RSS {final.peak_rss_mb:,.0f} MB")
        say(f"  padding waste {result.padding_waste:.1%} ({result.dummy_rows} dummy rows, "
            f"{result.dropped_sequences} sequences dropped, {result.n_batches} batches/epoch)")
        budget = e.device.memory_budget_mb
        over_budget = None
        if budget is not None and final.peak_memory_mb is None:
            say(f"  peak memory unknown on this device: the memory budget of {budget:,.0f} MB cannot be checked")
        elif budget is not None:
            over_budget = final.peak_memory_mb - budget
            verdict = "over" if over_budget > 0 else "within"
            say(f"  {verdict} the memory budget of {budget:,.0f} MB by {abs(over_budget):,.1f} MB")
        if trial is not None and budget is not None:  # unknown is never feasible
            trial.trial.set_constraint("peak_memory_over_budget_mb", budget if over_budget is None else over_budget)
        values = [result.objective(name) for name in objectives]
        run.log_metrics(metrics.named(metrics.RUN, {
            "compile_time_s": result.compile_time_s,
            "padding_waste": result.padding_waste,
            "num_params": result.num_params,
            "tracking_overhead_s": run.logging_s,
            "peak_memory_over_budget_mb": over_budget,
        }))
        run.log_dict(result_record(result), "result.json")
        run.set_tags({"unroll": str(result.unroll).lower(), "jit_compile": str(result.jit_compile).lower()})  # as built
    run.announce(say)
    return JobOutcome(
        values=values,
        run_id=run.run_id,
        summary={"val_loss": final.val_loss, "train_loss": final.train_loss, "tokens_per_s": final.tokens_per_s,
                 "peak_memory_mb": final.peak_memory_mb, "padding_waste": result.padding_waste},
        nightly_entry=nightly_entry(result, ctx.overrides) if e.nightly.record else None,
    )


def nightly_entry(result, overrides: list[str]) -> dict:
    """A nightly matrix entry: a stable name and its figures, for the sweep's report."""
    import importlib.metadata

    from tbptt_exp.app.nightly import device_fingerprint, entry_name

    final = result.final
    return {
        "name": entry_name(overrides),
        "device_fingerprint": device_fingerprint(result.device, importlib.metadata.version("tensorflow")),
        "figures": {
            "tokens_per_s": final.tokens_per_s,
            "peak_memory_mb": final.peak_memory_mb,
            "val_loss": final.val_loss,
            "compile_time_s": result.compile_time_s,
            "epoch_time_s": final.epoch_time_s,
        },
    }


def max_batch_job(experiment: ExperimentConfig, ctx: JobContext) -> JobOutcome:
    """Find the largest workable batch for this k; its outcome's value is that size (0: none)."""
    from tbptt_exp.app.batch_finder import ProbeError, find_max_batch, max_probes
    from tbptt_exp.app.frontier import table, write_files
    from tbptt_exp.app.run import environment_tags, make_tracker
    from tbptt_exp.core.data import load_dataset

    e = experiment
    load_dataset(e.data, e.seed)  # data errors as one line here, not in every probe
    gpus = claim_devices(e)  # probes inherit this worker's CUDA_VISIBLE_DEVICES
    f = e.batch_finder
    say(f"largest workable batch for k={e.k}, model={e.model.preset} ({e.model.layers}x{e.model.units}), "
        f"engine={e.engine.name}: sizes {f.min_batch_size}..{f.max_batch_size} in steps of {f.granularity}, "
        f"each probe a {f.probe_seconds:g} s training run in its own process (at most {max_probes(f)} probes)")
    tracker = make_tracker(e.tracking)
    with tracker.run(
        name=e.tracking.run_name or f"max_batch k={e.k} {e.model.preset} {e.engine.name} {e.trainer.precision}",
        params=run_params(e),
        tags={**environment_tags(), "tbptt_exp.kind": "max_batch", "hydra.overrides": " ".join(ctx.overrides),
              "device.gpus": gpus,
              "mlflow.note.content": (
                  f"The largest batch that trains k={e.k} chunks of {e.model.preset} with {e.engine.name} "
                  f"({e.trainer.precision}) within the device's memory"
                  + (f" and a budget of {e.device.memory_budget_mb:g} MB" if e.device.memory_budget_mb else "")
                  + ". Each probe is a short real training run in its own process, logged here with step = its "
                  "batch size: `probe/allocator_peak_mb` (TensorFlow's allocator peak), `probe/real_tokens_per_s`, "
                  "`probe/fits` (1: fits, 0: too big); the `probes` tag lists each size and its outcome.")},
        parent_run_id=ctx.link.parent_run_id,
    ) as run:

        def on_probe(p) -> None:
            # On this run, step = batch size: MLflow draws memory and tokens/s against the batch.
            run.log_metrics(metrics.named(metrics.PROBE, {
                "peak_memory_mb": p.peak_memory_mb, "tokens_per_s": p.tokens_per_s,
                "tokens_per_s_spread": p.tokens_per_s_spread, "fits": float(p.outcome == "ok"), "seconds": p.seconds,
            }), step=p.batch_size)

        try:
            frontier = find_max_batch(e, on_probe, say)
        except ProbeError as failure:
            run.set_tags({"error": str(failure)[:500]})
            error(f"the search stopped on an error that is not out-of-memory: {failure}")
            raise SystemExit(EXIT_PROBE_ERROR) from None
        if frontier.cached:  # answered from the cache: its probes, as if just run
            for probe in frontier.probe_log:
                on_probe(SimpleNamespace(**probe))
        row = frontier.to_dict() | {"job": ctx.output_dir.name, "precision": e.trainer.precision,
                                    "unroll": str(e.model.unroll).lower(), "headroom": f.headroom}
        say(f"k={e.k}: largest workable batch {frontier.max_batch_size}, recommended {frontier.recommended_batch_size} "
            f"({frontier.probes} probes{', cached' if frontier.cached else ''})")
        if not ctx.multirun:
            files = write_files([row], ctx.output_dir)
            say("\n" + table([row]))
            say(f"written to {files[0]}")
        run.log_metrics(metrics.named(metrics.FRONTIER, {
            "max_batch_size": frontier.max_batch_size,
            "recommended_batch_size": frontier.recommended_batch_size,
            "peak_memory_mb": frontier.peak_memory_mb,
            "tokens_per_s": frontier.tokens_per_s,
            "tokens_per_s_spread": frontier.tokens_per_s_spread,
            "probes": frontier.probes,
        }))
        run.set_tags({"probes": " ".join(f"B={p['batch_size']}:{p['outcome']}" for p in row["probe_log"])[:5000]})
        run.log_dict(row, "batch_frontier.json")
    if not ctx.multirun:
        run.announce(say)
    return JobOutcome(values=[float(frontier.max_batch_size)], run_id=run.run_id, frontier_row=row)


def cleanup_job(experiment: ExperimentConfig, ctx: JobContext) -> JobOutcome:
    """Close what dead processes left open: MLflow runs (KILLED) and Optuna trials (FAIL).

    Every start of the harness does this for the tracking store it opens; this task does
    it on demand, for the study storage too (``hydra/sweeper=optuna hydra.sweeper.storage=...``
    names a shared one; by default ``mlruns/optuna.db``).
    """
    import os

    from tbptt_exp.app.run import Tracker

    e = experiment
    closed: list = []
    if e.tracking.enabled:
        tracker = Tracker(e.tracking)  # opening the store closes the runs of dead processes
        closed = tracker.closed_runs
        for run_id, reason in closed:
            say(f"run {run_id}: KILLED ({reason})")
        say(f"MLflow: {len(closed)} run(s) of dead processes closed at {tracker.link_to_store}")
    storage = ctx.sweeper.get("storage") if "study_name" in ctx.sweeper else None
    from tbptt_exp.app.study import default_storage_url, fail_orphans_in_storage

    url = storage or default_storage_url(create=False)
    if storage or os.path.exists(url[len("sqlite:///"):]):
        failed = fail_orphans_in_storage(url)
        for study_name, numbers in failed.items():
            say(f"study '{study_name}': trial(s) {', '.join(map(str, numbers))} had no live worker, marked FAIL")
        say(f"Optuna: {sum(map(len, failed.values()))} trial(s) of dead workers failed")
    return JobOutcome(values=[float(len(closed))])
