"""The tasks a Hydra job runs: train one experiment, find the largest and the useful batch, or
close what dead processes left open.

Each task gets one validated ``RunConfig`` and a ``JobContext`` (everything it
needs from Hydra and its sweep, as values), builds, runs the core inside one tracked run
(``tracked_run``: the lifecycle, opened the same way for every task) and returns a
``JobResult`` for its sweep. Console lines come from reporter objects handed to the core;
no task reads Hydra's globals or the environment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tbptt_exp.app import signals
from tbptt_exp.app.batch import frontier
from tbptt_exp.app.batch.finder import (
    Frontier,
    NoiseScale,
    Probe,
    ProbeError,
    describe_device,
    find_max_batch,
    max_probes,
)
from tbptt_exp.app.batch.frontier import FrontierRow
from tbptt_exp.app.console import TrainingConsole, error, say
from tbptt_exp.app.settings import RunConfig, Task, settings_read
from tbptt_exp.app.signals import deferred
from tbptt_exp.app.study.study import job_trial
from tbptt_exp.app.study.trials import fail_orphans_in_storage
from tbptt_exp.app.sweep.sweep import JobContext, JobResult
from tbptt_exp.app.tracking import metrics
from tbptt_exp.app.tracking.provenance import environment_tags
from tbptt_exp.app.tracking.run import StoreFailed, TrackedRun, Tracker, make_tracker
from tbptt_exp.app.tracking.stores import default_storage_url, sqlite_path
from tbptt_exp.core import measure
from tbptt_exp.core.config import ConfigError, experiment_dict, objective_names
from tbptt_exp.core.device import claim_gpus, configure_device, default_slots_dir, visible_gpus
from tbptt_exp.core.measure import (
    CRITICAL_BATCH,
    FIGURES,
    GOODPUT,
    MAX_BATCH,
    PEAK_MEMORY,
    PEAK_RSS,
    REAL_TOKENS,
    RECOMMENDED_BATCH,
    SWEEP_TABLE,
    USEFUL_BATCH,
    Diverged,
    over_budget_mb,
)
from tbptt_exp.core.probes.probe import classify_error
from tbptt_exp.core.train import RunResult, build, model_size, prepare, train

if TYPE_CHECKING:  # the nightly's statistics (SciPy) load for a nightly only
    from tbptt_exp.app.nightly.nightly import NightlyEntry

EXIT_PROBE_ERROR = 3


def run_params(experiment: RunConfig) -> dict:
    """A run's params: the settings its task reads (``config.settings_read``); a training run's
    also the learning rate it trains at (``trainer.lr_scaling`` applied to its batch size)."""
    params = settings_read(experiment)
    if experiment.task == Task.train:
        params["trainer.scaled_learning_rate"] = experiment.trainer.learning_rate_for(experiment.batch_size)
    return params


@contextlib.contextmanager
def tracked_run(experiment: RunConfig, ctx: JobContext, kind: str, name: str, tags: dict[str, Any],
                system_metrics: float | None = None) -> Iterator[TrackedRun]:
    """The task's one MLflow run, opened the same way for every task: its params are the
    settings the task reads, its tags say what ran where, its parent is the sweep's."""
    tracker = make_tracker(experiment.tracking)
    tracker.save_view(kind)
    with tracker.run(
        name=experiment.tracking.run_name or name,
        params=run_params(experiment),
        tags={**environment_tags(), "tbptt_exp.kind": kind, "hydra.overrides": " ".join(ctx.overrides), **tags},
        parent_run_id=ctx.link.parent_run_id,
        system_metrics=system_metrics,
        figures_dir=ctx.output_dir,
    ) as run:
        yield run


def claim_devices(experiment: RunConfig) -> str | None:
    """``device.gpus_per_job``: this worker's own GPUs, claimed before TensorFlow starts."""
    if experiment.device.gpus_per_job is None:
        return None
    mine = ",".join(claim_gpus(visible_gpus(), experiment.device.gpus_per_job, default_slots_dir()))
    say(f"this worker's GPUs: {mine} (CUDA_VISIBLE_DEVICES)")
    return mine


def each(*calls: Callable[[Any], None]) -> Callable[[Any], None]:
    """One callback that calls each of ``calls`` in turn (an epoch's console, run and trial)."""

    def call_each(value: Any) -> None:
        for call in calls:
            call(value)

    return call_each


def checked(progress: Callable[[int, int, int], None]) -> Callable[[int, int, int], None]:
    """``progress`` that first raises an interrupt lost on its way (``signals.check``): each
    progress window of training is a safe point."""

    def report(epoch: int, done: int, n_batches: int) -> None:
        signals.check()
        progress(epoch, done, n_batches)

    return report


def train_job(experiment: RunConfig, ctx: JobContext) -> JobResult:
    """Train one experiment and track it; each epoch goes to the console, the run and the job's trial."""
    objectives = objective_names(experiment.objective)
    budget = experiment.device.memory_budget_mb
    with TrainingConsole(experiment) as console:
        dataset = prepare(experiment)  # settings only the data can check fail here, before anything starts
        console.starting(dataset)
        trial = job_trial(ctx.sweeper, ctx.link.trial_number, objectives[0])
        gpus = claim_devices(experiment)
        # TensorFlow loads here, once the settings are known good. A Ctrl-C or SIGTERM waits for
        # the import to end: raised inside it, Keras's probe for optree (a bare except) turns it
        # into an ImportError and a traceback.
        with deferred():
            configure_device(experiment.device, say)
        with out_of_memory_is_one_line(experiment, dataset, "building the model"):
            engine = build(experiment, dataset)  # a model refused here stops in one line, before a run is recorded
        device = measure.device_description()
        console.device(device)
        tags = {**device, "data.fingerprint": dataset.fingerprint, "device.gpus": gpus,
                "mlflow.note.content": run_note(experiment, dataset), **trial.tags()}
        with tracked_run(experiment, ctx, "experiment", run_name(experiment), tags,
                         experiment.tracking.system_metrics_interval_s) as run:
            trial.attach(run.run_id)
            log_inputs(run, ctx, dataset)
            log_model(run, engine.model)
            with out_of_memory_is_one_line(experiment, dataset, "training", engine.model.count_params()):
                result = train(experiment, dataset=dataset, engine=engine, progress=checked(console.progress),
                               on_epoch=each(console.on_epoch, run.log_epoch, trial.report))  # a pruned trial raises here
            over = over_budget_mb(result.final, budget)
            console.done(result, over)
            trial.constrain(budget, over)
            log_result(run, result, over)
    if not ctx.multirun:  # a sweep prints one link, its parent's
        run.announce(say)
    return JobResult(
        values=[result.objective(name) for name in objectives], run_id=run.run_id,
        summary={f.name: result.value(f.name) for f in SWEEP_TABLE},
        nightly_entry=nightly_entry(result, ctx) if experiment.nightly.record else None,
    )


@contextlib.contextmanager
def out_of_memory_is_one_line(experiment: RunConfig, dataset, doing: str,
                              built: int | None = None) -> Iterator[None]:
    """Out of device memory while ``doing`` (a model that fits the host but not the GPU, a
    batch too large): a ``ConfigError`` naming what to lower and the model's size, instead of
    TensorFlow's traceback. The host-memory check before building catches what it can."""
    try:
        yield
    except (ConfigError, Diverged, StoreFailed):
        raise
    except Exception as error:
        if classify_error(error) != "oom":
            raise
        size = model_size(experiment, dataset, built)
        where = f"out of memory on {measure.training_device()} while {doing}" + (f"; {size}" if size else "")
        if doing == "training":
            raise ConfigError("batch_size", experiment.batch_size, f"{where}; lower batch_size or k (python -m "
                              f"tbptt_exp -m sweep=max_batch k={experiment.k} finds the largest batch that fits), "
                              "or use a smaller model") from None
        setting = "model.factory" if experiment.model.factory else "model.units"
        raise ConfigError(setting, experiment.model.factory or experiment.model.units,
                          f"{where}; use a smaller model (model.units, model.layers)") from None


def nightly_entry(result: RunResult, ctx: JobContext) -> NightlyEntry:
    from tbptt_exp.app.nightly import nightly  # its statistics (SciPy) load for a nightly only

    return nightly.entry(result, ctx.overrides)


def model_name(model) -> str:
    """``a 1x256 LSTM (lstm)``, or ``the model of my.models:build (custom)``."""
    return f"{'the model of ' if model.factory else 'a '}{model.shape} ({model.preset})"


def run_name(experiment: RunConfig) -> str:
    model = experiment.model
    return (f"k={experiment.k} B={experiment.batch_size} {experiment.padding}/{experiment.reset} "
            f"{experiment.engine.name} {model.preset}")


def run_note(experiment: RunConfig, dataset) -> str:
    """A training run's MLflow description: what ran, then what each figure means."""
    model, trainer = experiment.model, experiment.trainer
    steps = "" if dataset.is_text else f" A {dataset.step_name[:-1]} here is one timestep of the data."
    what = (f"Trained {model_name(model)} on {dataset.source} "
            f"({dataset.io.describe()}) with TBPTT: chunks of k={experiment.k}, "
            f"{experiment.batch_size} streams per batch, padding={experiment.padding}, reset={experiment.reset}, "
            f"engine={experiment.engine.name}, {trainer.precision}, {trainer.epochs} epochs. "
            f"`{PEAK_MEMORY.mlflow}` is TensorFlow's "
            "allocator peak on the training device (the tensors: what decides the largest batch); "
            f"`{PEAK_RSS.mlflow}` is the whole process (runtime, libraries, data), far larger on a CPU.{steps}")
    return what + "\n\n" + "\n".join(f"- `{f.mlflow}`: {f.definition}" for f in FIGURES.values())


def log_inputs(run: TrackedRun, ctx: JobContext, dataset) -> None:
    """What a training run read: its resolved config and, for text, its vocabulary."""
    if ctx.config_yaml:
        run.log_text(ctx.config_yaml, "config.yaml")
    if dataset.vocabulary:
        run.log_dict({"vocabulary": dataset.vocabulary, "padding_id": 0, "unknown_id": 1}, "vocabulary.json")
    if dataset.normalization:  # to map predictions back: value = standardised * std + mean
        run.log_dict(dataset.normalization, "normalization.json")


def log_model(run: TrackedRun, model) -> None:
    """What ran, layer by layer: the model's summary as an artifact (``model_summary.txt``)."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    run.log_text("\n".join(lines), "model_summary.txt")


def log_result(run: TrackedRun, result: RunResult, over_budget: float | None) -> None:
    """The run's own figures, the whole result and how the model was built."""
    run.log_figures(result.figures() | {"tracking_overhead_s": run.logging_s,
                                        measure.OVER_BUDGET.name: over_budget})
    run.log_dict(result.to_dict(), "result.json")
    run.set_tags({"unroll": str(result.unroll).lower(), "jit_compile": str(result.jit_compile).lower(),  # as built
                  **({"stopped": result.stopped} if result.stopped else {}),
                  **({"target_reached": str(result.time_to_target_s is not None).lower()}
                     if result.target_val_loss is not None else {})})


def max_batch_job(experiment: RunConfig, ctx: JobContext) -> JobResult:
    """Find the largest and the useful batch for this k; the job's value is that size (0: none)."""
    dataset = prepare(experiment)  # data errors as one line here, not in every probe
    gpus = claim_devices(experiment)  # probes inherit this worker's CUDA_VISIBLE_DEVICES
    # The probes' device, from a first probe process, which also refuses a model of your own
    # that cannot be trained: in one line, before a run is recorded.
    device = describe_device(experiment_dict(experiment), experiment.batch_finder.probe_timeout_s, dataset=dataset)
    noise = noise_from_run(experiment)  # a run that is not there is one line, before this one is recorded
    say(search_line(experiment))
    tags = {"device.gpus": gpus, "mlflow.note.content": search_note(experiment)}
    with tracked_run(experiment, ctx, "max_batch", search_name(experiment), tags) as run:
        def on_probe(probe: Probe) -> None:  # step = batch size: MLflow draws each figure against the batch
            run.log_metrics(probe.metrics(), step=probe.batch_size)
            signals.check()  # between probes: a safe point

        try:
            found = find_max_batch(experiment, on_probe, say, dataset=dataset, device=device, noise=noise)
        except ProbeError as failure:
            run.set_tags({"error": str(failure)[:500]})
            error(f"the search stopped on an error that is not out-of-memory: {failure}")
            raise SystemExit(EXIT_PROBE_ERROR) from None
        if found.cached:  # answered from the cache: its probes, as if just run
            for probe in found.probe_log:
                on_probe(probe)
        else:  # goodput is known once the noise scale is, after the probes
            for probe in found.probe_log:
                run.log_metrics({GOODPUT.probe_metric: probe.goodput}, step=probe.batch_size)
        row = frontier_row(found, experiment, ctx)
        say(f"{found.answer()} ({found.cost()})")
        if not ctx.multirun:
            say("\n" + frontier.table([row]))
            say(f"written to {frontier.write_files([row], ctx.output_dir)[0]}")
        run.log_figures(found.figures())
        run.set_tags({"probes": " ".join(f"B={p.batch_size}:{p.outcome}" for p in found.probe_log)[:5000],
                      "max_is_ceiling": str(found.max_is_ceiling).lower(),
                      "mlflow.note.content": f"**{found.answer()}**\n\n{search_note(experiment)}"})
        run.log_dict(asdict(row), "batch_frontier.json")
    if not ctx.multirun:
        run.announce(say)
    return JobResult(values=[float(found.max_batch_size)], run_id=run.run_id, frontier_row=row)


def noise_from_run(experiment: RunConfig) -> NoiseScale | None:
    """``batch_finder.noise_from``: the last ``optim/gradient_noise_scale`` of a training run
    in the tracking store. Measured at another k, it is converted by tokens: a stream of k
    steps carries k/k_run times the run's tokens, so B_noise in streams scales by k_run/k."""
    run_id = experiment.batch_finder.noise_from
    if run_id is None:
        return None
    setting = "batch_finder.noise_from"
    if not experiment.tracking.enabled:
        raise ConfigError(setting, run_id, "it is read from the tracking store, and tracking is off (tracking=none)")
    client = Tracker(experiment.tracking).client
    try:
        run = client.get_run(run_id)
    except StoreFailed as failure:
        raise ConfigError(setting, run_id, f"no such run in the tracking store ({failure})") from None
    history = client.get_metric_history(run_id, measure.NOISE_SCALE.mlflow)
    if not history:
        raise ConfigError(setting, run_id, f"that run logged no {measure.NOISE_SCALE.mlflow}: use a training run "
                                           "with engine=graph and trainer.noise_scale_every above 0")
    last = max(history, key=lambda m: m.step)
    k_run = int(run.data.params.get("k", experiment.k))
    value = last.value * k_run / experiment.k
    batch_size = run.data.params.get("batch_size", "")
    where = (f"from run {run_id[:8]} at epoch {last.step} (batch {batch_size or '?'}, "
             f"k={k_run}" + (f", {last.value:,.1f} streams converted by tokens" if k_run != experiment.k else "")
             + f", val_loss {run.data.metrics.get(measure.VAL_LOSS.mlflow, float('nan')):.4f})")
    return NoiseScale(value, where, int(batch_size) if batch_size.isdigit() else 0)


def search_name(experiment: RunConfig) -> str:
    budget = experiment.device.memory_budget_mb
    return (f"max_batch k={experiment.k} {experiment.model.preset} {experiment.engine.name} "
            f"{experiment.trainer.precision}" + (f" budget {budget:g} MB" if budget else ""))


def search_line(experiment: RunConfig) -> str:
    model, finder = experiment.model, experiment.batch_finder
    return (f"largest and useful batch for k={experiment.k}, model={model.preset} ({model.shape}), "
            f"engine={experiment.engine.name}: sizes {finder.min_batch_size}..{finder.max_batch_size} in steps of "
            f"{finder.granularity}, at most {max_probes(finder)} probes, each a real training run in its own "
            f"process: stopped as soon as its peak passes the budget, else timed for {finder.probe_seconds:g} s "
            "of steady state (in brackets: its wall time and each phase's)")


def search_note(experiment: RunConfig) -> str:
    budget_mb = experiment.device.memory_budget_mb
    budget = f" and a budget of {budget_mb:g} MB" if budget_mb else ""
    return (f"The largest batch that trains k={experiment.k} chunks of {experiment.model.preset} with "
            f"{experiment.engine.name} ({experiment.trainer.precision}) within the device's memory{budget}. "
            "Each probe is a short real training run "
            f"in its own process, logged here with step = its batch size: `{PEAK_MEMORY.probe_metric}` (TensorFlow's "
            f"allocator peak; a probe stops once it passes the budget), `{REAL_TOKENS.probe_metric}` (probes that fit), "
            f"`{metrics.PROBE_FITS}` (1: fits, 0: too big), `{GOODPUT.probe_metric}` (tokens/s times the statistical "
            "efficiency the gradient noise scale gives). Their charts draw "
            f"every probe against the batch size; the single value beside a `{measure.PROBE_SECTION}` "
            "name is the largest size probed, not the answer, which is "
            f"`{MAX_BATCH.mlflow}`, `{RECOMMENDED_BATCH.mlflow}` and `{USEFUL_BATCH.mlflow}` (the size of "
            f"highest goodput; `{CRITICAL_BATCH.mlflow}` is the noise scale). The `probes` tag lists each "
            "size and its outcome.")


def frontier_row(found: Frontier, experiment: RunConfig, ctx: JobContext) -> FrontierRow:
    """The search's answer as a row of the sweep's frontier table."""
    return FrontierRow.of(found, job=ctx.output_dir.name, model=f"{experiment.model.preset} ({experiment.model.shape})",
                          precision=str(experiment.trainer.precision), unroll=str(experiment.model.unroll).lower(),
                          headroom=experiment.batch_finder.headroom)


def cleanup_job(experiment: RunConfig, ctx: JobContext) -> JobResult:
    """Close what dead processes left open: MLflow runs (KILLED) and Optuna trials (FAIL).

    Every start of the harness does this for the tracking store it opens; this task does
    it on demand, for the study storage too (``hydra/sweeper=optuna hydra.sweeper.storage=...``
    names a shared one; by default ``mlruns/optuna.db``).
    """
    closed: list = []
    if experiment.tracking.enabled:
        tracker = Tracker(experiment.tracking)  # opening the store closes the runs of dead processes
        closed = tracker.closed_runs
        for run_id, reason in closed:
            say(f"run {run_id}: KILLED ({reason})")
        say(f"MLflow: {len(closed)} run(s) of dead processes closed at {tracker.where}")
    storage = ctx.sweeper.get("storage") if "study_name" in ctx.sweeper else None
    url = storage or default_storage_url(create=False)
    if storage or ((path := sqlite_path(url)) is not None and path.exists()):
        failed = fail_orphans_in_storage(url)
        for study_name, numbers in failed.items():
            say(f"study '{study_name}': trial(s) {', '.join(map(str, numbers))} had no live worker, marked FAIL")
        say(f"Optuna: {sum(map(len, failed.values()))} trial(s) of dead workers failed")
    return JobResult(values=[float(len(closed))])


TASKS: dict[Task, Callable[[RunConfig, JobContext], JobResult]] = {
    Task.train: train_job, Task.max_batch: max_batch_job, Task.cleanup: cleanup_job,
}
