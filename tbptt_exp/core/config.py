"""The experiment's settings: chunks, streams, padding, resets, data, model, engine, trainer
and device, the single source of truth for each (what the app does with an experiment,
its task, tracking, batch finder and nightly, is ``app.settings``).

Plain dataclasses, so the core can be driven from Python and the same classes serve as
Hydra structured configs (the app registers them and the presets below). Each class
checks itself when it is built, in ``__post_init__``, which ``OmegaConf.to_object`` runs
as well: a choice is an enum (Hydra enforces it already when it composes), a field's own
rule sits in its metadata, and a rule that joins several fields is written once, in the
class that holds them. A bad value raises ``ConfigError``: one line that names the
setting, the value and what is allowed. ``to_dict``/``from_dict`` carry a config across a
process boundary (into a batch-size probe), where it checks itself again as it is built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, ClassVar

from tbptt_exp.core.measure import OBJECTIVES


class ConfigError(ValueError):
    """A setting has a value that cannot work; the message is one line and says the fix."""

    def __init__(self, setting: str, value: Any, allowed: str):
        shown = value.value if isinstance(value, Enum) else value
        text = " ".join(f"{setting}={shown!r} is not allowed: {allowed}".split())
        super().__init__(text)
        self.setting, self.value, self.allowed = setting, shown, allowed


# --- choices -------------------------------------------------------------------------------


class Padding(StrEnum):
    """How sequences fill the ``batch_size`` rows (``core/layout.py``)."""

    dummy = "dummy"
    drop = "drop"
    pack = "pack"
    stream = "stream"


class Reset(StrEnum):
    """When a row's state is zeroed: at each sequence start, before every chunk, or never."""

    sequence = "sequence"
    chunk = "chunk"
    never = "never"


class EngineName(StrEnum):
    """``graph``: per-row resets inside the compiled step; ``keras_fit``: the classic callback."""

    graph = "graph"
    keras_fit = "keras_fit"


class Precision(StrEnum):
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


class Optimizer(StrEnum):
    adam = "adam"
    adamw = "adamw"
    rmsprop = "rmsprop"
    sgd = "sgd"


class LrScaling(StrEnum):
    """How the learning rate follows the batch size, from ``trainer.reference_batch_size``:
    ``sqrt`` (the rule for Adam-like optimizers, Malladi et al. 2022), ``linear`` (the rule
    for SGD, Goyal et al. 2017) or ``none`` (the same rate at every size)."""

    sqrt = "sqrt"
    linear = "linear"
    none = "none"


class Cut(StrEnum):
    """What a text sequence is: fixed-length windows, or one document (file) each."""

    fixed = "fixed"
    documents = "documents"


class Cell(StrEnum):
    """The built-in stack's recurrent layer: an LSTM (two states per row) or a GRU (one)."""

    lstm = "lstm"
    gru = "gru"


class Activation(StrEnum):
    tanh = "tanh"
    relu = "relu"
    sigmoid = "sigmoid"
    elu = "elu"
    selu = "selu"
    softsign = "softsign"
    linear = "linear"


class DataTask(StrEnum):
    """What a numeric dataset's targets ask for; ``auto``: integers are classes, floats values."""

    auto = "auto"
    classification = "classification"
    regression = "regression"


class TargetLevel(StrEnum):
    """A table's targets: one per timestep, or one per sequence (its last row's)."""

    step = "step"
    sequence = "sequence"


# --- field rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What a field accepts, and the fix to say when it does not."""

    accepts: Callable[[Any], bool]
    allowed: str


def rule(accepts: Callable[[Any], bool], allowed: str) -> dict:
    """A field's ``metadata``: ``field(default=3, metadata=rule(...))``."""
    return {"rule": Rule(accepts, allowed)}


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite number: NaN and infinity pass no comparison a rule could make sense of."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


POSITIVE = rule(lambda v: is_whole(v) and v > 0, "use a positive whole number")
FRACTION = rule(lambda v: is_number(v) and 0 <= v < 1, "use a number from 0 up to (not including) 1")
VAL_FRACTION = rule(lambda v: is_number(v) and 0 < v < 1,
                    "use a fraction above 0 and below 1: the figures are measured on held-out sequences")
SECONDS = rule(lambda v: is_number(v) and v > 0, "use a positive number of seconds")
BOOL = rule(lambda v: isinstance(v, bool), "use true or false")


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """A settings class's field types, resolved (its annotations are strings here)."""
    return typing.get_type_hints(cls)


def enum_of(hint: Any) -> type[Enum] | None:
    """The enum a field takes its choices from (``Padding``, or ``Padding | None``), if any."""
    return next((t for t in (hint, *typing.get_args(hint)) if isinstance(t, type) and issubclass(t, Enum)), None)


def check_fields(obj: Any, prefix: str) -> None:
    """Each field of the dataclass ``obj`` against its type's choices (an enum: the value
    becomes its member) and its metadata rule; None passes where the field is Optional."""
    hints = field_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, setting, hint = getattr(obj, f.name), prefix + f.name, hints[f.name]
        if value is None and type(None) in typing.get_args(hint):
            continue
        choices = enum_of(hint)
        if choices is not None:
            if value not in list(choices):
                raise ConfigError(setting, value, f"use one of {', '.join(choices)}")
            setattr(obj, f.name, choices(value))
        elif "rule" in f.metadata and not f.metadata["rule"].accepts(value):
            raise ConfigError(setting, value, f.metadata["rule"].allowed)


# --- the settings ------------------------------------------------------------------------------


@dataclass
class CharsDataConfig:
    """Character-level language modelling on real text (default: embedded stdlib sources)."""

    name: str = "chars"
    path: str | None = None  # a text file or folder; None = the embedded corpus
    cut: Cut = Cut.fixed  # fixed: sequences of sequence_length; documents: one file each
    sequence_length: int = field(default=200, metadata=POSITIVE)  # timesteps per sequence when cut=fixed
    # cut=documents: longer documents are cut (state resets at a cut)
    max_sequence_length: int | None = field(default=None, metadata=POSITIVE)
    # a cap on the number of sequences, training and validation each
    max_sequences: int | None = field(default=None, metadata=POSITIVE)
    max_chars: int = field(default=400_000, metadata=POSITIVE)  # cap on the characters read
    max_vocab: int = field(default=200, metadata=POSITIVE)  # most frequent characters kept; the rest: one unknown id
    val_fraction: float = field(default=0.1, metadata=VAL_FRACTION)

    def __post_init__(self) -> None:
        check_data_kind(self)
        check_fields(self, "data.")
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ConfigError("data.path", self.path,
                              "use an existing text file or folder, or null for the embedded corpus")
        if self.max_sequence_length is not None and self.cut != Cut.documents:
            raise ConfigError("data.max_sequence_length", self.max_sequence_length,
                              "applies to data.cut=documents only (cut=fixed has data.sequence_length)")

    @property
    def fixed_length(self) -> int | None:
        """Every sequence's length, where the data fixes it (k may not exceed it)."""
        return self.sequence_length if self.cut == Cut.fixed else None


@dataclass
class KeyRecallDataConfig:
    """Synthetic: a key opens each sequence and is every target; needs carried state."""

    name: str = "key_recall"
    # Sized to show the point in about 30 s per run on 2 CPU cores with the default model:
    # after 3 epochs val_loss is ~0.001 with reset=sequence and ~1.05 with reset=chunk.
    num_sequences: int = field(default=2048, metadata=rule(lambda v: is_whole(v) and v >= 2,
                                                           "use 2 or more (one at least for validation)"))
    sequence_length: int = field(default=100, metadata=POSITIVE)
    num_keys: int = field(default=4, metadata=POSITIVE)
    num_noise_tokens: int = field(default=8, metadata=POSITIVE)
    val_fraction: float = field(default=0.25, metadata=VAL_FRACTION)

    def __post_init__(self) -> None:
        check_data_kind(self)
        check_fields(self, "data.")

    @property
    def fixed_length(self) -> int:
        return self.sequence_length


@dataclass
class SeriesDataConfig:
    """Synthetic numeric sequences (the embedded default for ``data=series``): noisy features
    whose level follows a hidden regime that switches at random; the target is each step's
    regime. One step tells little, so a model has to carry what it saw across chunks."""

    name: str = "series"
    # Sized to show the point in about 15 s per run on 2 CPU cores with the default model:
    # after 3 epochs val_accuracy is ~0.87 with reset=sequence and ~0.71 with reset=chunk
    # (k=25; the majority class scores ~0.35).
    num_sequences: int = field(default=256, metadata=rule(lambda v: is_whole(v) and v >= 2,
                                                          "use 2 or more (one at least for validation)"))
    sequence_length: int = field(default=400, metadata=POSITIVE)
    num_features: int = field(default=4, metadata=POSITIVE)
    num_regimes: int = field(default=3, metadata=rule(lambda v: is_whole(v) and v >= 2, "use 2 or more"))
    switch_probability: float = field(default=0.005, metadata=FRACTION)  # per step
    noise: float = field(default=4.0, metadata=rule(lambda v: is_number(v) and v > 0, "use a positive number"))
    val_fraction: float = field(default=0.25, metadata=VAL_FRACTION)

    def __post_init__(self) -> None:
        check_data_kind(self)
        check_fields(self, "data.")

    @property
    def fixed_length(self) -> int:
        return self.sequence_length


def _existing(path: str | None, setting: str, what: str) -> None:
    if path is not None and not Path(path).expanduser().exists():
        raise ConfigError(setting, path, f"there is no such file or folder; use the path of {what}")


@dataclass
class OwnSequencesConfig:
    """What your arrays and your tables share: where the data is, its task and its split."""

    name: str = ""
    path: str | None = None
    val_path: str | None = None  # validation in the same format; None: the last val_fraction of sequences
    task: DataTask = DataTask.auto
    num_classes: int | None = field(default=None, metadata=rule(lambda v: is_whole(v) and v >= 2,
                                                                   "use 2 or more, or null"))
    normalize: bool = field(default=True, metadata=BOOL)  # float features and regression targets, by training steps
    val_fraction: float = field(default=0.1, metadata=VAL_FRACTION)

    FILES: ClassVar[str] = ""  # what data.path names, in the line that says there is no such file
    fixed_length = None  # sequences are as long as the data makes them

    def __post_init__(self) -> None:
        check_data_kind(self)
        check_fields(self, "data.")
        _existing(self.path, "data.path", self.FILES + ", or null for the embedded example")
        _existing(self.val_path, "data.val_path", self.FILES + ", or null for the last data.val_fraction")


@dataclass
class ArraysDataConfig(OwnSequencesConfig):
    """Your sequences as NumPy arrays: a ``.npz`` (or a folder of ``.npy`` files) holding ``x``
    (features or token ids per step; ``(N, T, F)`` for N sequences of length T), ``y`` (targets
    per step or per sequence) and optionally ``lengths`` (steps per sequence). No path: an
    embedded example (ragged sequences of 4 features, a label per step)."""

    name: str = "arrays"
    path: str | None = None  # a .npz, or a folder holding x.npy, y.npy and optionally lengths.npy

    FILES: ClassVar[str] = "a .npz file or of a folder with x.npy and y.npy (numeric arrays, no pickle)"


@dataclass
class TableDataConfig(OwnSequencesConfig):
    """Your sequences as a table, one row per timestep: a CSV or Parquet file. No path: an
    embedded example (sequences of 4 features, one label per sequence, on its last row)."""

    name: str = "table"
    path: str | None = None  # a .csv, .parquet or .pq file
    sequence_column: str | None = None  # the rows of one sequence share it; None: one long sequence
    time_column: str | None = None  # the order within a sequence (not a feature); None: file order
    target_column: Any = None  # a column name, or a list of them (several target values per step)
    feature_columns: list[str] | None = None  # None: every other numeric column
    target_level: TargetLevel = TargetLevel.step  # sequence: each sequence's last row holds its target

    FILES: ClassVar[str] = "a CSV or Parquet file (.csv, .parquet, .pq), one row per timestep"

    def __post_init__(self) -> None:
        super().__post_init__()
        columns = {"sequence_column": self.sequence_column, "time_column": self.time_column,
                   "target_column": self.target_column, "feature_columns": self.feature_columns}
        if self.path is None:
            for name, value in columns.items():
                if value is not None:
                    raise ConfigError(f"data.{name}", value, "names a column of your own table: set data.path too")
            return
        if self.feature_columns is not None and not self.feature_columns:
            raise ConfigError("data.feature_columns", self.feature_columns,
                              "name one column or more, or null for every other numeric column")
        targets = self.target_columns
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError("data.target_column", self.target_column,
                              "name the target column of data.path, or a list of them")

    @property
    def target_columns(self) -> list[str]:
        value = self.target_column
        return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


DATA_KINDS: dict[str, type] = {"chars": CharsDataConfig, "key_recall": KeyRecallDataConfig,
                               "series": SeriesDataConfig, "arrays": ArraysDataConfig, "table": TableDataConfig}
DataConfig = CharsDataConfig | KeyRecallDataConfig | SeriesDataConfig | ArraysDataConfig | TableDataConfig


def check_data_kind(data: Any) -> None:
    """``data`` is one of the data kinds, and its ``name`` says which."""
    kind = getattr(data, "name", type(data).__name__)
    if DATA_KINDS.get(kind) is not type(data):
        raise ConfigError("data", kind, f"use one of {', '.join(DATA_KINDS)}")


@dataclass
class ModelConfig:
    """Embedding -> Dropout -> [stateful LSTM or GRU -> Dropout] x layers -> per-step Dense;
    or your own model, built by ``factory`` with ``params`` (``core/model.py``: the contract)."""

    preset: str = "lstm"
    embedding_dim: int = field(default=64, metadata=POSITIVE)
    units: int = field(default=256, metadata=POSITIVE)
    layers: int = field(default=1, metadata=POSITIVE)
    dropout: float = field(default=0.0, metadata=FRACTION)
    activation: Activation = Activation.tanh
    recurrent_activation: Activation = Activation.sigmoid
    # a Keras mask on padding; sample weights already keep padding out of the loss
    mask_zero: bool = field(default=False, metadata=BOOL)
    # true: softmax probabilities (the seed model); false: logits
    softmax_output: bool = field(default=False, metadata=BOOL)
    # true: each chunk's timesteps unrolled into one straight graph (more memory, no cuDNN);
    # auto: the symbolic loop, which measured as fast on a CPU and keeps cuDNN on a GPU.
    unroll: Any = field(default="auto", metadata=rule(lambda v: v is True or v is False or v == "auto",
                                                      "use auto, true or false"))  # 1 == True: not allowed
    cell: Cell = Cell.lstm
    # Your own model: "module.path:function" or "path/to/file.py:function", called with the
    # harness's arguments and ``params``; it returns an uncompiled keras.Model.
    factory: str | None = field(default=None, metadata=rule(
        lambda v: isinstance(v, str) and all(part.strip() for part in v.rpartition(":")[::2]) and ":" in v,
        "use module.path:function or path/to/file.py:function"))
    params: dict[str, Any] = field(default_factory=dict)  # the factory's own keyword arguments

    def __post_init__(self) -> None:
        check_fields(self, "model.")
        if self.params and self.factory is None:
            raise ConfigError("model.params", dict(self.params), "they are a model factory's arguments: set "
                                                                 "model.factory (model=custom), or the built-in "
                                                                 "model's own settings (model.units...)")

    def num_params(self, io) -> int | None:
        """The built-in stack's parameter count for ``io`` (a ``dataset.ModelIO``), as Keras
        counts it, without building anything (None for a model of your own): an LSTM layer
        has 4 gates, a GRU 3 with two biases each (Keras's reset_after), each gate a kernel,
        a recurrent kernel and a bias."""
        if self.factory is not None:
            return None
        width = self.embedding_dim if io.tokens else io.num_features
        total = io.vocab_size * self.embedding_dim if io.tokens else 0
        gates, biases = (4, 1) if self.cell == Cell.lstm else (3, 2)
        for _ in range(self.layers):
            total += gates * (self.units * (width + self.units) + biases * self.units)
            width = self.units
        return total + (width + 1) * io.num_outputs

    @property
    def shape(self) -> str:
        """``1x256 LSTM``, or the factory that builds the model."""
        return self.factory or f"{self.layers}x{self.units} {str(self.cell).upper()}"


# The built-in stack's settings: a custom model (``model.factory``) reads none of them.
BUILT_IN_MODEL = ("embedding_dim", "units", "layers", "dropout", "activation", "recurrent_activation", "mask_zero",
                  "unroll", "cell")


def custom_model() -> ModelConfig:
    """``model=custom``: a model factory, by default the example in ``tbptt_exp/core/factories.py``
    (GRU layers with layer normalisation between them), with no arguments of its own until
    ``model.params.NAME=VALUE`` gives them (another factory takes other arguments)."""
    return ModelConfig(preset="custom", factory="tbptt_exp.core.factories:gru_layer_norm")


def seed_model() -> ModelConfig:
    """The model of the classic stateful-LSTM question, layer for layer (``model=seed``):
    Embedding(V, 200, mask_zero) -> Dropout(0.5) -> LSTM(512, relu, stateful) -> Dropout(0.5)
    -> TimeDistributed(Dense(V, softmax)). relu takes the generic (non-cuDNN) kernel."""
    return ModelConfig(preset="seed", embedding_dim=200, units=512, layers=1, dropout=0.5,
                       activation=Activation.relu, mask_zero=True, softmax_output=True)


@dataclass
class EngineConfig:
    name: EngineName = EngineName.graph

    def __post_init__(self) -> None:
        if self.name not in list(EngineName):  # chosen as engine=NAME, so named so
            raise ConfigError("engine", self.name, f"use one of {', '.join(EngineName)}")
        self.name = EngineName(self.name)


@dataclass
class TrainerConfig:
    epochs: int = field(default=3, metadata=POSITIVE)
    optimizer: Optimizer = Optimizer.adam
    learning_rate: float = field(default=0.003, metadata=rule(lambda v: is_number(v) and v > 0, "use a positive number"))
    clipnorm: float | None = field(default=None, metadata=rule(lambda v: is_number(v) and v > 0,
                                                                  "use a positive number or null"))
    steps_per_execution: int = field(default=1, metadata=POSITIVE)
    jit_compile: bool | None = None  # None = Keras's "auto" (XLA on GPU where it can)
    shuffle: bool = True  # new sequence order each epoch; streams always stay continuous
    # Keras mixed precision: mixed_* compute in 16 bits, keep weights, LSTM state, output
    # layer and loss in float32; mixed_float16 scales the loss so gradients do not underflow.
    precision: Precision = Precision.float32
    # The learning rate above is the rate at reference_batch_size streams; another batch size
    # trains at it times sqrt(B / reference) or B / reference (``learning_rate_for``), so that
    # batch sizes are compared fairly (sweeps, the batch finder).
    lr_scaling: LrScaling = LrScaling.sqrt
    reference_batch_size: int = field(default=32, metadata=POSITIVE)
    # Every this many optimizer steps, the gradient noise scale (the critical batch, in
    # streams) is measured from the two halves of the batch's rows (engine=graph); 0: off.
    noise_scale_every: int = field(default=50, metadata=rule(lambda v: is_whole(v) and v >= 0,
                                                             "use a whole number of steps, or 0 (off)"))
    # Stop training once this much training time is spent (validation not counted), at a
    # chunk boundary, then validate: batch sizes compared at equal wall time.
    max_time_s: float | None = field(default=None, metadata=rule(lambda v: is_number(v) and v > 0,
                                                                    "use a positive number of seconds, or null"))
    # Stop at the first validation whose val_loss is at or below this; the run logs the
    # training time and real tokens it took (one that never gets there says so).
    target_val_loss: float | None = field(default=None, metadata=rule(is_number, "use a number, or null"))

    def __post_init__(self) -> None:
        check_fields(self, "trainer.")

    def learning_rate_for(self, batch_size: int) -> float:
        """The rate a batch of ``batch_size`` streams trains at (``lr_scaling``)."""
        ratio = batch_size / self.reference_batch_size
        factor = {LrScaling.sqrt: math.sqrt(ratio), LrScaling.linear: ratio, LrScaling.none: 1.0}[self.lr_scaling]
        return self.learning_rate * factor

    def warnings(self) -> list[str]:
        """Settings that work but usually train badly, a line each."""
        if self.lr_scaling == LrScaling.linear and self.optimizer != Optimizer.sgd:
            return [(f"trainer.lr_scaling=linear with trainer.optimizer={self.optimizer}: linear scaling is the rule "
                    "for SGD; adaptive optimizers follow the square root (trainer.lr_scaling=sqrt), and a large "
                    "batch at a linearly scaled rate can diverge")]
        return []


@dataclass
class DeviceConfig:
    """GPU memory settings; applied before TensorFlow initialises the device."""

    preset: str = "auto"
    # cap the GPU, e.g. 4096 to emulate a 4 GB card
    memory_limit_mb: int | None = field(default=None, metadata=POSITIVE)
    memory_growth: bool = True  # allocate GPU memory as needed instead of all at start
    # peak memory above this makes a run infeasible
    memory_budget_mb: float | None = field(default=None, metadata=rule(lambda v: is_number(v) and v > 0,
                                                                          "use a positive number of MiB or null"))
    # Each worker process claims this many of the host's GPUs for itself (a slot of its own,
    # set as CUDA_VISIBLE_DEVICES before TensorFlow starts); null: every visible GPU.
    gpus_per_job: int | None = field(default=None, metadata=POSITIVE)

    def __post_init__(self) -> None:
        check_fields(self, "device.")


def gpu_card(preset: str, memory_limit_mb: int) -> Callable[[], DeviceConfig]:
    """A device preset that caps the GPU at a smaller card's memory (before TensorFlow starts it)."""
    return lambda: DeviceConfig(preset=preset, memory_limit_mb=memory_limit_mb, memory_growth=False)


@dataclass
class ExperimentConfig:
    k: int = field(default=25, metadata=POSITIVE)  # chunk length: timesteps per TBPTT chunk
    batch_size: int = field(default=32, metadata=POSITIVE)  # streams trained side by side
    padding: Padding = Padding.dummy
    reset: Reset = Reset.sequence
    seed: int = field(default=0, metadata=rule(lambda v: is_whole(v) and 0 <= v < 2**32,
                                               "use a whole number from 0 to 4294967295 (NumPy's seed range)"))
    objective: str = "val_loss"  # returned to a sweeper (last epoch); "a,b" for several
    data: DataConfig = field(default_factory=CharsDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        check_fields(self, "")
        for name in objective_names(self.objective):
            if name not in OBJECTIVES:
                raise ConfigError("objective", name, f"use one of {', '.join(OBJECTIVES)}")
        check_data_kind(self.data)
        length = self.data.fixed_length
        if length is not None and self.k > length:  # whole documents may be shorter than k
            raise ConfigError("k", self.k, f"use a chunk length up to data.sequence_length={length}")
        self.check_engine()

    def check_engine(self, num_sequences: int | None = None) -> None:
        """``engine=keras_fit`` resets every row at once, from a callback Keras calls once per
        execution: its layout must reset whole batches, one step per execution. Checked when
        the config is built, and again once the number of training sequences is known
        (``padding=stream`` resets rows apart only where several documents meet)."""
        if self.engine.name != EngineName.keras_fit:
            return
        if self.padding == Padding.pack:
            raise ConfigError("padding", self.padding, "engine=keras_fit resets all rows at once from a callback; "
                                                       "use padding=dummy or drop, or engine=graph for pack")
        if self.trainer.steps_per_execution != 1:
            raise ConfigError("trainer.steps_per_execution", self.trainer.steps_per_execution,
                              "engine=keras_fit resets state from a callback that Keras calls once per execution; "
                              "use 1, or engine=graph")
        if self.padding == Padding.stream and self.reset == Reset.sequence and (num_sequences or 0) > 1:
            raise ConfigError("padding", self.padding,
                              "engine=keras_fit resets all rows at once, and streams reset each row where its "
                              "document starts; use engine=graph (or one text, or reset=never)")


# What Hydra offers as config group options (``model=seed``): name -> a fresh instance.
PRESETS: dict[str, dict[str, Callable[[], Any]]] = {
    "data": dict(DATA_KINDS),
    "model": {"lstm": ModelConfig, "seed": seed_model, "custom": custom_model},
    "engine": {"graph": EngineConfig, "keras_fit": lambda: EngineConfig(EngineName.keras_fit)},
    "trainer": {"default": TrainerConfig, "quick": lambda: TrainerConfig(epochs=1)},  # quick: one short epoch
    # auto: the first GPU if there is one, else the CPU; GPU memory grows as needed. The others
    # cap the GPU to emulate a smaller card: NVIDIA Quadro K2200 (4 GB, the classic question's
    # card), 16 GB (V100 16GB, T4), 24 GB (RTX 3090/4090, A10, L4), 80 GB (A100/H100 80GB).
    "device": {"auto": DeviceConfig, "k2200": gpu_card("k2200", 4096), "gpu16": gpu_card("gpu16", 16384),
               "gpu24": gpu_card("gpu24", 24576), "gpu80": gpu_card("gpu80", 81920)},
}


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings -> {"model.units": 256, ...}: every leaf one entry."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def validate(cfg: ExperimentConfig) -> None:
    """Check a config again, one changed in place after it was built (building one checks it)."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            section.__post_init__()
    cfg.__post_init__()


def objective_names(objective: str) -> list[str]:
    """``"val_loss"`` -> ["val_loss"]; ``"val_loss,tokens_per_s"`` -> both (multi-objective)."""
    return [name.strip() for name in str(objective).split(",")]


def to_dict(cfg: ExperimentConfig) -> dict:
    """The config as plain JSON-able data (what crosses a process boundary); choices as their names."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: v.value if isinstance(v, Enum) else v
                                                               for k, v in items})


def experiment_dict(cfg: ExperimentConfig) -> dict:
    """``to_dict`` of the experiment alone, a subclass's own settings (the app's: tracking, the
    batch finder...) left out: what a probe process builds its ``ExperimentConfig`` from."""
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return {name: value for name, value in to_dict(cfg).items() if name in names}


def from_dict(values: dict, kind: type = ExperimentConfig, prefix: str = "") -> Any:
    """``to_dict``'s inverse: each mapping is built into the dataclass its field's type names
    (of a union of data kinds, the one its ``name`` says); an unknown key is refused, and
    every class checks itself as it is built."""
    if not isinstance(values, dict):
        raise ConfigError(prefix.rstrip(".") or "config", values, "use a mapping of settings")
    hints = field_hints(kind)
    unknown = [key for key in values if key not in hints]
    if unknown:
        raise ConfigError(prefix + unknown[0], values[unknown[0]], f"use one of {', '.join(hints)}")
    return kind(**{name: _built(hints[name], value, f"{prefix}{name}.") for name, value in values.items()})


def _built(hint: Any, value: Any, prefix: str) -> Any:
    kinds = [t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
    if not kinds or not isinstance(value, dict):
        return value
    named = [t for t in kinds if any(f.name == "name" and f.default == value.get("name") for f in dataclasses.fields(t))]
    return from_dict(value, (named or kinds)[0], prefix)
