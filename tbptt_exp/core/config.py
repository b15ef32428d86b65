"""The configuration schema: the single source of truth for every setting.

Plain dataclasses, so the core can be driven from Python and the same classes serve as
Hydra structured configs (the app registers them). ``validate`` checks everything that
can be checked before any data is read or TensorFlow is imported, and raises
``ConfigError`` with a one-line message naming the setting, the bad value and what is
allowed. ``to_dict``/``from_dict`` carry one config across a process boundary (into a
batch-size probe) and validate it on arrival.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

PADDINGS = ("dummy", "drop", "pack", "stream")
RESETS = ("sequence", "chunk", "never")
ENGINES = ("graph", "keras_fit")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
CUTS = ("fixed", "documents")
ACTIVATIONS = ("tanh", "relu", "sigmoid", "elu", "selu", "softsign", "linear")
OBJECTIVES = ("val_loss", "train_loss", "tokens_per_s", "peak_memory_mb", "epoch_time_s")
NIGHTLY_FIGURES = ("tokens_per_s", "peak_memory_mb", "val_loss", "compile_time_s", "epoch_time_s")


class ConfigError(ValueError):
    """A setting has a value that cannot work; the message is one line and says the fix."""

    def __init__(self, setting: str, value: Any, allowed: str):
        text = " ".join(f"{setting}={value!r} is not allowed: {allowed}".split())
        super().__init__(text)
        self.setting, self.value, self.allowed = setting, value, allowed


@dataclass
class CharsDataConfig:
    """Character-level language modelling on real text (default: embedded stdlib sources)."""

    name: str = "chars"
    path: Optional[str] = None  # a text file or folder; None = the embedded corpus
    cut: str = "fixed"  # fixed: sequences of sequence_length; documents: one file each
    sequence_length: int = 200  # timesteps per sequence when cut=fixed
    max_sequence_length: Optional[int] = None  # cut=documents: longer documents are cut (state resets at a cut)
    max_sequences: Optional[int] = None  # cap on the number of sequences, training and validation each
    max_chars: int = 400_000  # cap on the characters read
    max_vocab: int = 200  # most frequent characters kept; the rest map to one unknown id
    val_fraction: float = 0.1


@dataclass
class KeyRecallDataConfig:
    """Synthetic: a key opens each sequence and is every target; needs carried state."""

    name: str = "key_recall"
    # Sized to show the point in about 30 s per run on 2 CPU cores with the default model:
    # after 3 epochs val_loss is ~0.001 with reset=sequence and ~1.05 with reset=chunk.
    num_sequences: int = 2048
    sequence_length: int = 100
    num_keys: int = 4
    num_noise_tokens: int = 8
    val_fraction: float = 0.25


@dataclass
class ModelConfig:
    """Embedding -> Dropout -> [stateful LSTM -> Dropout] x layers -> per-step Dense."""

    preset: str = "lstm"
    embedding_dim: int = 64
    units: int = 256
    layers: int = 1
    dropout: float = 0.0
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    mask_zero: bool = False  # Keras mask on padding; weights already zero it out of the loss
    softmax_output: bool = False  # True: softmax probabilities (the seed); False: logits
    # true: each chunk's timesteps unrolled into one straight graph (more memory, no cuDNN);
    # auto: the symbolic loop, which measured as fast on a CPU and keeps cuDNN on a GPU.
    unroll: Any = "auto"


@dataclass
class EngineConfig:
    name: str = "graph"  # graph: resets inside the train step; keras_fit: the classic callback


@dataclass
class TrainerConfig:
    epochs: int = 3
    optimizer: str = "adam"
    learning_rate: float = 0.003
    clipnorm: Optional[float] = None
    steps_per_execution: int = 1
    jit_compile: Optional[bool] = None  # None = Keras's "auto" (XLA on GPU where it can)
    shuffle: bool = True  # new sequence order each epoch; streams always stay continuous
    # Keras mixed precision: mixed_* compute in 16 bits, keep weights, LSTM state, output
    # layer and loss in float32; mixed_float16 scales the loss so gradients do not underflow.
    precision: str = "float32"


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else SQLite under mlruns/
    experiment: str = "tbptt-exp"
    run_name: Optional[str] = None
    # CPU, memory, disk, network (and GPU with nvidia-ml-py) sampled by MLflow's own system
    # metrics monitor every this many seconds during a training run; null: off.
    system_metrics_interval_s: Optional[float] = 5.0


@dataclass
class DeviceConfig:
    """GPU memory settings; applied before TensorFlow initialises the device."""

    preset: str = "auto"
    memory_limit_mb: Optional[int] = None  # cap the GPU, e.g. 4096 to emulate a 4 GB card
    memory_growth: bool = True  # allocate GPU memory as needed instead of all at start
    memory_budget_mb: Optional[float] = None  # peak memory above this makes a run infeasible
    # Each worker process claims this many of the host's GPUs for itself (a slot of its own,
    # set as CUDA_VISIBLE_DEVICES before TensorFlow starts); null: every visible GPU.
    gpus_per_job: Optional[int] = None


@dataclass
class BatchFinderConfig:
    """``task=max_batch``: how the largest workable batch size is searched."""

    granularity: int = 8  # batch sizes are multiples of this
    min_batch_size: int = 8
    max_batch_size: int = 4096
    headroom: float = 0.1  # the recommended size leaves this fraction of the budget free
    probe_seconds: float = 3.0  # steady-state seconds a probe trains (its throughput windows)
    probe_timeout_s: float = 300.0  # a probe that takes longer counts as too big
    cache: bool = True  # remember results by fingerprint (model, k, device, TF version)
    cache_dir: Optional[str] = None  # None: mlruns/batch_cache


@dataclass
class NightlyConfig:
    """``sweep=nightly``: repeats, the baseline a night is judged against, and the verdict's rules."""

    record: bool = False  # set by sweep=nightly: each job records its figures for the report
    rounds: int = 5  # the whole matrix runs this often, round after round, so drift hits every entry alike
    baseline: Optional[str] = None  # a pinned nightly_results.json; None: the last good night on this device
    accept: bool = False  # tonight becomes the baseline: a regression or a matrix change accepted on purpose
    advance: bool = False  # a good night rewrites the baseline file, which then holds the last good night
    history_runs: int = 7  # previous nights drawn in the trend plots
    thresholds: Dict[str, float] = field(default_factory=lambda: {
        "tokens_per_s": 0.15, "peak_memory_mb": 0.10, "val_loss": 0.05,
        "compile_time_s": 0.50, "epoch_time_s": 0.20,
    })  # the figures judged, and the relative change beyond which each regresses
    # The interval already carries the noise; a threshold may also widen to this many robust
    # sigmas of the samples' spread (0: never), to at most max_widening times itself.
    noise_sigmas: float = 0.0
    max_widening: float = 2.0
    confidence: float = 0.9  # a regression's bootstrap interval on the change, at this level, excludes no change
    allow_other_device: bool = False  # compare with a baseline file from another device


TASKS = ("train", "max_batch", "cleanup")


@dataclass
class ExperimentConfig:
    k: int = 25  # chunk length: timesteps per TBPTT chunk
    batch_size: int = 32  # streams trained side by side
    padding: str = "dummy"
    reset: str = "sequence"
    seed: int = 0
    objective: str = "val_loss"  # returned to a sweeper (last epoch); "a,b" for several
    task: str = "train"  # train: one experiment; max_batch: the largest workable batch; cleanup: close dead runs
    verbose: bool = False  # True: TensorFlow's C++ logs and MLflow's INFO lines on the console too
    data: Any = field(default_factory=CharsDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    batch_finder: BatchFinderConfig = field(default_factory=BatchFinderConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)


DATA_CONFIGS = {"chars": CharsDataConfig, "key_recall": KeyRecallDataConfig}


def to_dict(cfg: ExperimentConfig) -> dict:
    """The config as plain JSON-able data (what crosses a process boundary)."""
    return dataclasses.asdict(cfg)


def _build(cls: type, values: dict, prefix: str) -> Any:
    """A dataclass from a dict, nested dataclasses included; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ConfigError(prefix.rstrip(".") or "config", values, "use a mapping of settings")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", values[unknown[0]], f"use one of {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        f = fields[name]
        if name == "data" and cls is ExperimentConfig:
            kind = value.get("name", "chars") if isinstance(value, dict) else value
            if kind not in DATA_CONFIGS:
                raise ConfigError("data", kind, f"use one of {', '.join(DATA_CONFIGS)}")
            kwargs[name] = _build(DATA_CONFIGS[kind], value, "data.")
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory) \
                and isinstance(value, dict):
            kwargs[name] = _build(f.default_factory, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def from_dict(values: dict) -> ExperimentConfig:
    """``to_dict``'s inverse, validated: a config that arrives from elsewhere is checked."""
    cfg = _build(ExperimentConfig, values, "")
    validate(cfg)
    return cfg


def model_preset(name: str) -> ModelConfig:
    """A model preset from ``conf/model/NAME.yaml`` (the presets live there only)."""
    import yaml

    from tbptt_exp.paths import conf_dir

    return ModelConfig(**yaml.safe_load((conf_dir() / "model" / f"{name}.yaml").read_text()))


def seed_model() -> ModelConfig:
    """The model from the original question, layer for layer (``model=seed``)."""
    return model_preset("seed")


def objective_names(objective: str) -> list[str]:
    """``"val_loss"`` -> ["val_loss"]; ``"val_loss,tokens_per_s"`` -> both (multi-objective)."""
    return [name.strip() for name in str(objective).split(",")]


def _one_of(setting: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(setting, value, f"use one of {', '.join(allowed)}")


def _positive(setting: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(setting, value, "use a positive whole number")


def _fraction(setting: str, value: Any, upper_open: bool = True) -> None:
    if not isinstance(value, (int, float)) or not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ConfigError(setting, value, "use a number from 0 up to (not including) 1")


def validate(cfg: ExperimentConfig) -> None:
    """Raise ConfigError for the first setting that cannot work."""
    _positive("k", cfg.k)
    _positive("batch_size", cfg.batch_size)
    _one_of("padding", cfg.padding, PADDINGS)
    _one_of("reset", cfg.reset, RESETS)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**32:
        raise ConfigError("seed", cfg.seed, "use a whole number from 0 to 4294967295 (NumPy's seed range)")
    for name in objective_names(cfg.objective):
        _one_of("objective", name, OBJECTIVES)
    _one_of("task", cfg.task, TASKS)
    n = cfg.nightly
    if n.baseline is not None and not Path(n.baseline).expanduser().is_file() and not (n.accept or n.advance):
        raise ConfigError("nightly.baseline", n.baseline, "use the path of a nightly_results.json, or null "
                                                          "(with nightly.accept or nightly.advance it is written)")
    _positive("nightly.history_runs", n.history_runs)
    if not isinstance(n.rounds, int) or isinstance(n.rounds, bool) or n.rounds < 2:
        raise ConfigError("nightly.rounds", n.rounds, "use 2 or more: a verdict needs the spread of repeated samples")
    if not isinstance(n.noise_sigmas, (int, float)) or n.noise_sigmas < 0:
        raise ConfigError("nightly.noise_sigmas", n.noise_sigmas, "use 0 (no widening) or a positive number")
    if not isinstance(n.max_widening, (int, float)) or n.max_widening < 1:
        raise ConfigError("nightly.max_widening", n.max_widening, "use 1 (never widen) or more")
    if not isinstance(n.confidence, (int, float)) or not 0.5 <= n.confidence < 1:
        raise ConfigError("nightly.confidence", n.confidence, "use a level from 0.5 up to (not including) 1, e.g. 0.9")
    for figure, value in n.thresholds.items():
        _one_of("nightly.thresholds", figure, NIGHTLY_FIGURES)
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"nightly.thresholds.{figure}", value, "use a relative change such as 0.1 (10%)")
    f = cfg.batch_finder
    for name in ("granularity", "min_batch_size", "max_batch_size"):
        _positive(f"batch_finder.{name}", getattr(f, name))
    if f.max_batch_size < max(f.granularity, f.min_batch_size):
        raise ConfigError("batch_finder.max_batch_size", f.max_batch_size,
                          f"use at least batch_finder.granularity={f.granularity} and min_batch_size={f.min_batch_size}")
    _fraction("batch_finder.headroom", f.headroom)
    for name in ("probe_timeout_s", "probe_seconds"):
        value = getattr(f, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"batch_finder.{name}", value, "use a positive number of seconds")

    d = cfg.data
    if isinstance(d, CharsDataConfig):
        if d.path is not None and not Path(d.path).expanduser().exists():
            raise ConfigError("data.path", d.path, "use an existing text file or folder, or null for the embedded corpus")
        _one_of("data.cut", d.cut, CUTS)
        _positive("data.sequence_length", d.sequence_length)
        _positive("data.max_chars", d.max_chars)
        _positive("data.max_vocab", d.max_vocab)
        if d.max_sequences is not None:
            _positive("data.max_sequences", d.max_sequences)
        if d.max_sequence_length is not None:
            _positive("data.max_sequence_length", d.max_sequence_length)
            if d.cut != "documents":
                raise ConfigError("data.max_sequence_length", d.max_sequence_length,
                                  "applies to data.cut=documents only (cut=fixed has data.sequence_length)")
    elif isinstance(d, KeyRecallDataConfig):
        for name in ("num_sequences", "sequence_length", "num_keys", "num_noise_tokens"):
            _positive(f"data.{name}", getattr(d, name))
        if d.num_sequences < 2:
            raise ConfigError("data.num_sequences", d.num_sequences, "use 2 or more (one at least for validation)")
    else:
        raise ConfigError("data", type(d).__name__, "use data=chars or data=key_recall")
    _fraction("data.val_fraction", d.val_fraction)
    fixed_length = isinstance(d, KeyRecallDataConfig) or d.cut == "fixed"
    if fixed_length and cfg.k > d.sequence_length:  # whole documents may be shorter than k
        raise ConfigError("k", cfg.k, f"use a chunk length up to data.sequence_length={d.sequence_length}")

    m = cfg.model
    for name in ("embedding_dim", "units", "layers"):
        _positive(f"model.{name}", getattr(m, name))
    _fraction("model.dropout", m.dropout)
    _one_of("model.activation", m.activation, ACTIVATIONS)
    _one_of("model.recurrent_activation", m.recurrent_activation, ACTIVATIONS)
    if not (m.unroll is True or m.unroll is False or m.unroll == "auto"):  # 1 == True: not allowed
        raise ConfigError("model.unroll", m.unroll, "use auto, true or false")

    t = cfg.trainer
    _positive("trainer.epochs", t.epochs)
    _one_of("trainer.optimizer", t.optimizer, OPTIMIZERS)
    if not isinstance(t.learning_rate, (int, float)) or t.learning_rate <= 0:
        raise ConfigError("trainer.learning_rate", t.learning_rate, "use a positive number")
    if t.clipnorm is not None and (not isinstance(t.clipnorm, (int, float)) or t.clipnorm <= 0):
        raise ConfigError("trainer.clipnorm", t.clipnorm, "use a positive number or null")
    _positive("trainer.steps_per_execution", t.steps_per_execution)
    _one_of("trainer.precision", t.precision, PRECISIONS)

    interval = cfg.tracking.system_metrics_interval_s
    if interval is not None and (not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0):
        raise ConfigError("tracking.system_metrics_interval_s", interval, "use a positive number of seconds, or null (off)")
    if not isinstance(cfg.verbose, bool):
        raise ConfigError("verbose", cfg.verbose, "use true or false")
    if not cfg.tracking.experiment:
        raise ConfigError("tracking.experiment", cfg.tracking.experiment, "use a non-empty name")
    if cfg.device.memory_limit_mb is not None:
        _positive("device.memory_limit_mb", cfg.device.memory_limit_mb)
    if cfg.device.gpus_per_job is not None:
        _positive("device.gpus_per_job", cfg.device.gpus_per_job)
    b = cfg.device.memory_budget_mb
    if b is not None and (not isinstance(b, (int, float)) or b <= 0):
        raise ConfigError("device.memory_budget_mb", b, "use a positive number of MiB or null")

    _one_of("engine", cfg.engine.name, ENGINES)
    if cfg.engine.name == "keras_fit":
        if cfg.padding == "pack":
            raise ConfigError(
                "padding", "pack",
                "engine=keras_fit resets all rows at once from a callback; use padding=dummy "
                "or drop, or engine=graph for pack",
            )
        if t.steps_per_execution != 1:
            raise ConfigError(
                "trainer.steps_per_execution", t.steps_per_execution,
                "engine=keras_fit resets state from a callback that Keras calls once per "
                "execution; use 1, or engine=graph",
            )
