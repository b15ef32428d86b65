"""The experiment app: Hydra composes the config, the job trains, MLflow records it.

``python -m tbptt_exp`` runs one experiment; ``-m`` runs a sweep, one job per
combination, each job returning its objective so any Hydra sweeper can optimise it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tbptt_exp.config import (
    CharsDataConfig,
    ConfigError,
    DeviceConfig,
    ExperimentConfig,
    ExperimentSchema,
    KeyRecallDataConfig,
    objective_names,
    validate,
)
from tbptt_exp.paths import conf_dir
from tbptt_exp.tracking import mask_credentials_in_logs

PREFIX = "[tbptt-exp]"


def register_configs() -> None:
    """The schema behind conf/ and the source of sweep presets, registered with Hydra.

    Hydra finds plugins by scanning ``hydra_plugins``, which an editable install's
    import hook does not let it list, so the presets source is registered explicitly.
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.tbptt_exp_plugins.optuna_sweeper import OptunaSweeper
    from hydra_plugins.tbptt_exp_plugins.sweep_presets import SweepPresetsConfigSource

    Plugins.instance().register(SweepPresetsConfigSource)
    Plugins.instance().register(OptunaSweeper)
    mask_credentials_in_logs()
    cs = ConfigStore.instance()
    cs.store(name="experiment_schema", node=ExperimentSchema)
    cs.store(group="data", name="schema_chars", node=CharsDataConfig)
    cs.store(group="data", name="schema_key_recall", node=KeyRecallDataConfig)


register_configs()


def to_experiment(cfg: DictConfig) -> ExperimentConfig:
    """Composed Hydra config (without its ``hydra`` node) -> validated dataclasses."""
    experiment = OmegaConf.to_object(cfg)
    validate(experiment)
    return experiment


def say(line: str) -> None:
    print(f"{PREFIX} {line}", flush=True)


def configure_device(cfg: DeviceConfig) -> None:
    """GPU memory cap / growth; TensorFlow accepts them only before it initialises."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        if cfg.memory_limit_mb is not None:
            say(f"device.memory_limit_mb={cfg.memory_limit_mb} has no effect: there is no GPU")
        return
    try:
        if cfg.memory_limit_mb is not None:
            tf.config.set_logical_device_configuration(
                gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=cfg.memory_limit_mb)]
            )
        elif cfg.memory_growth:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        # A later job of an in-process sweep: the GPU kept the first job's settings.
        say("device settings unchanged: the GPU was initialised by an earlier job in this process "
            "(use hydra/launcher=joblib for a process per job)")


def throttled(every_s: float, fn: Callable[..., None]) -> Callable[..., None]:
    last = [time.perf_counter()]

    def call(*args: Any) -> None:
        now = time.perf_counter()
        if now - last[0] >= every_s:
            last[0] = now
            fn(*args)

    return call


def epoch_line(m, epochs: int) -> str:
    bpc = f" ({m.val_bits_per_char:.3f} bits/char)" if m.val_bits_per_char is not None else ""
    return (
        f"epoch {m.epoch}/{epochs}  train_loss {m.train_loss:.4f}  val_loss {m.val_loss:.4f}{bpc}  "
        f"{m.tokens_per_s:,.0f} tokens/s  peak {m.peak_memory_mb:,.0f} MB  {m.epoch_time_s:.1f} s"
    )


def run_job(experiment: ExperimentConfig, cfg: DictConfig, overrides: list[str]) -> float | list[float]:
    """Train one experiment and track it; returns the configured objective(s).

    Launched by the Optuna sweeper, the job reports each epoch to its trial (which may
    prune it) and sets its memory constraint.
    """
    from tbptt_exp.data import load_dataset
    from tbptt_exp.train import check_dataset, train

    started = time.perf_counter()
    dataset = load_dataset(experiment.data, experiment.seed)
    check_dataset(experiment, dataset)

    from tbptt_exp import measure  # TensorFlow loads here, once the settings are known good
    say(
        f"data: {dataset.source}: {len(dataset.train):,} train / {len(dataset.val):,} validation "
        f"sequences, {dataset.train.num_tokens:,} training tokens, vocabulary {dataset.vocab_size}"
    )
    e = experiment
    say(
        f"k={e.k} batch_size={e.batch_size} padding={e.padding} reset={e.reset} "
        f"engine={e.engine.name} model={e.model.preset} ({e.model.layers}x{e.model.units} LSTM) "
        f"epochs={e.trainer.epochs}"
    )
    from tbptt_exp.study import job_trial

    trial = job_trial(HydraConfig.get().sweeper) if HydraConfig.initialized() else None
    objectives = objective_names(experiment.objective)
    configure_device(experiment.device)
    say(f"training on {measure.training_device()} ({measure.device_description()['device_name']})")

    tracker = run_id = None
    tracking_s = 0.0
    if experiment.tracking.enabled:
        import os

        from tbptt_exp.tracking import PARENT_RUN_ENV, Tracker, environment_tags, experiment_params

        tracker = Tracker(experiment.tracking)
        run_id = tracker.start_run(
            name=experiment.tracking.run_name
            or f"k={e.k} B={e.batch_size} {e.padding}/{e.reset} {e.engine.name} {e.model.preset}",
            params=experiment_params(OmegaConf.to_container(cfg, resolve=True)),
            tags={
                **environment_tags(),
                **measure.device_description(),
                "tbptt_exp.kind": "experiment",
                "hydra.overrides": " ".join(overrides),
                "data.fingerprint": dataset.fingerprint,
                **({"optuna.study": trial.study.study_name, "optuna.trial": trial.trial.number} if trial else {}),
            },
            parent_run_id=os.environ.get(PARENT_RUN_ENV),
        )
        tracker.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        if dataset.vocabulary:
            tracker.log_dict(run_id, {"vocabulary": dataset.vocabulary, "padding_id": 0, "unknown_id": 1}, "vocabulary.json")

    progress = throttled(10.0, lambda epoch, done, total: say(f"epoch {epoch}: {done}/{total} batches"))

    def on_epoch(m) -> None:
        nonlocal tracking_s
        say(epoch_line(m, experiment.trainer.epochs))
        if tracker is not None:
            t0 = time.perf_counter()
            tracker.log_metrics(run_id, {
                "train_loss": m.train_loss,
                "val_loss": m.val_loss,
                "val_bits_per_char": m.val_bits_per_char,
                "tokens_per_s": m.tokens_per_s,
                "padded_tokens_per_s": m.padded_tokens_per_s,
                "peak_memory_mb": m.peak_memory_mb,
                "peak_rss_mb": m.peak_rss_mb,
                "epoch_time_s": m.epoch_time_s,
            }, step=m.epoch)
            tracking_s += time.perf_counter() - t0
        if trial is not None:
            trial.report(getattr(m, objectives[0]), m.epoch)

    import optuna

    def end(status: str, state: str, reason: str = "") -> None:
        if tracker is not None:
            if trial is not None:
                tracker.set_tags(run_id, {"optuna.state": state, **({"fail_reason": reason} if reason else {})})
            tracker.end(run_id, status)

    try:
        result = train(experiment, on_epoch=on_epoch, dataset=dataset, progress=progress)
    except optuna.TrialPruned as pruned:
        say(f"trial {trial.trial.number} {pruned}")
        end("FINISHED", "PRUNED")
        raise
    except KeyboardInterrupt:
        end("KILLED", "FAIL", "interrupted")
        raise
    except BaseException as error:
        end("FAILED", "FAIL", f"{type(error).__name__}: {error}".splitlines()[0][:500])
        raise

    final = result.final
    bpc = f" ({final.val_bits_per_char:.3f} bits/char)" if final.val_bits_per_char is not None else ""
    say(f"done in {time.perf_counter() - started:.1f} s")
    say(f"  val_loss {final.val_loss:.4f}{bpc}  train_loss {final.train_loss:.4f}")
    say(f"  real tokens/s {final.tokens_per_s:,.0f} (padded {final.padded_tokens_per_s:,.0f}/s), "
        f"first execution (tracing+compile) {result.compile_time_s:.1f} s")
    say(f"  peak memory {final.peak_memory_mb:,.1f} MB on {result.device.get('device')} "
        f"(TensorFlow allocator), process RSS {final.peak_rss_mb:,.0f} MB")
    say(f"  padding waste {result.padding_waste:.1%} ({result.dummy_rows} dummy rows, "
        f"{result.dropped_sequences} sequences dropped, {result.n_batches} batches/epoch)")
    budget = experiment.device.memory_budget_mb
    over_budget = None if budget is None else final.peak_memory_mb - budget
    if over_budget is not None:
        verdict = "over" if over_budget > 0 else "within"
        say(f"  {verdict} the memory budget of {budget:,.0f} MB by {abs(over_budget):,.1f} MB")
        if trial is not None:
            trial.trial.set_constraint("peak_memory_over_budget_mb", over_budget)
    values = [result.objective(name) for name in objectives]
    if experiment.nightly.record:
        record_nightly_entry(result, overrides)
    if tracker is not None:
        from tbptt_exp.tracking import result_record, ui_command

        tracker.log_metrics(run_id, {
            "compile_time_s": result.compile_time_s,
            "padding_waste": result.padding_waste,
            "num_params": result.num_params,
            "tracking_overhead_s": tracking_s,
            "peak_memory_over_budget_mb": over_budget,
            **{f"objective.{n}": v for n, v in zip(objectives, values)},
        }, step=0)
        tracker.log_dict(run_id, result_record(result), "result.json")
        end("FINISHED", "COMPLETE")
        say(f"  MLflow: {tracker.run_link(run_id)}")
        say(f"  see it: {ui_command(tracker.uri)}")
    return values[0] if len(values) == 1 else values


def record_nightly_entry(result, overrides: list[str]) -> None:
    """A nightly matrix entry: a stable name and its figures, for the sweep's report."""
    import importlib.metadata
    import json
    from pathlib import Path

    from tbptt_exp.nightly import ENTRY_FILE, device_fingerprint, entry_name

    final = result.final
    entry = {
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
    (Path(HydraConfig.get().runtime.output_dir) / ENTRY_FILE).write_text(json.dumps(entry, indent=1))


def run_max_batch_job(experiment: ExperimentConfig, cfg: DictConfig, overrides: list[str]) -> int:
    """Find the largest workable batch for this k; returns it (0: nothing fits)."""
    import json
    import os
    from pathlib import Path

    from tbptt_exp.batch_finder import ProbeError, find_max_batch
    from tbptt_exp.data import load_dataset
    from tbptt_exp.frontier import JOB_FILE, table, write_files
    from tbptt_exp.tracking import PARENT_RUN_ENV, Tracker, environment_tags, experiment_params

    e = experiment
    dataset = load_dataset(e.data, e.seed)
    f = e.batch_finder
    say(f"largest workable batch for k={e.k}, model={e.model.preset} ({e.model.layers}x{e.model.units}), "
        f"engine={e.engine.name}: sizes {f.min_batch_size}..{f.max_batch_size} in steps of {f.granularity}, "
        f"each probe in its own process")
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    tracker = run_id = None
    if e.tracking.enabled:
        tracker = Tracker(e.tracking)
        run_id = tracker.start_run(
            name=e.tracking.run_name or f"max_batch k={e.k} {e.model.preset} {e.engine.name}",
            params=experiment_params(config_dict),
            tags={**environment_tags(), "tbptt_exp.kind": "max_batch", "hydra.overrides": " ".join(overrides)},
            parent_run_id=os.environ.get(PARENT_RUN_ENV),
        )

    def on_probe(p) -> None:
        if tracker is None:
            return
        child = tracker.start_run(f"probe B={p.batch_size}", params={"batch_size": p.batch_size, "k": e.k},
                                  tags={"outcome": p.outcome, "tbptt_exp.kind": "probe",
                                        **({"error": p.error[:500]} if p.error else {})},
                                  parent_run_id=run_id)
        tracker.log_metrics(child, {"peak_memory_mb": p.peak_memory_mb, "tokens_per_s": p.tokens_per_s,
                                    "probe_seconds": p.seconds}, step=0)
        tracker.end(child, "FINISHED")

    try:
        frontier = find_max_batch(e, config_dict, dataset.vocab_size, on_probe, say)
    except ProbeError as error:
        if tracker is not None:
            tracker.set_tags(run_id, {"error": str(error)[:500]})
            tracker.end(run_id, "FAILED")
        print(f"tbptt-exp: error: the search stopped on an error that is not out-of-memory: {error}",
              file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    except BaseException:
        if tracker is not None:
            tracker.end(run_id, "KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise

    row = frontier.to_dict()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / JOB_FILE).write_text(json.dumps(row, indent=1, default=str))
    say(f"k={e.k}: largest workable batch {frontier.max_batch_size}, recommended {frontier.recommended_batch_size} "
        f"({frontier.probes} probes{', cached' if frontier.cached else ''})")
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        files = write_files([row], out_dir)
        say("\n" + table([row]))
        say(f"written to {files[0]}")
    if tracker is not None:
        tracker.log_metrics(run_id, {
            "max_batch_size": frontier.max_batch_size,
            "recommended_batch_size": frontier.recommended_batch_size,
            "peak_memory_mb": frontier.peak_memory_mb,
            "tokens_per_s": frontier.tokens_per_s,
            "probes": frontier.probes,
        }, step=0)
        tracker.log_dict(run_id, row, "batch_frontier.json")
        tracker.end(run_id, "FINISHED")
    return frontier.max_batch_size


def fail(error: ConfigError) -> None:
    print(f"tbptt-exp: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> float:
    overrides = list(HydraConfig.get().overrides.task)
    try:
        experiment = to_experiment(cfg)
        if experiment.task == "max_batch":
            return run_max_batch_job(experiment, cfg, overrides)
        return run_job(experiment, cfg, overrides)
    except ConfigError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # one job of a sweep: the sweeper records it (an Optuna trial fails with it)
        fail(error)
        raise  # unreachable: fail() exits
