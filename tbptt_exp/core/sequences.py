"""Your own numeric sequences: arrays (``.npz`` or ``.npy`` files) and tables (CSV, Parquet).

Both readers give the same ``Sequences`` (features per sequence, targets per step or per
sequence); from there one path serves both: the validation split (the last
``val_fraction`` of the sequences in file order, one long sequence's tail, or
``val_path``), the task (integer targets are classes, float targets values, unless
``data.task`` says), the class checks, standardisation with *training* statistics only,
and the corpora, whose loss weights put a per-sequence target on each sequence's last
step only and give a missing (NaN) target no weight. Every bad input is one
``ConfigError`` that names the file, what is wrong and where.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tbptt_exp.core.config import ArraysDataConfig, ConfigError, DataTask, TableDataConfig, TargetLevel
from tbptt_exp.core.dataset import Dataset, ModelIO
from tbptt_exp.core.layout import Corpus

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class Sequences:
    """What a file holds: each sequence's inputs and targets, as read."""

    inputs: list[np.ndarray]  # per sequence: (T, F) float features, or (T,) int token ids
    targets: list[np.ndarray]  # per step: (T,) or (T, D) per sequence; per sequence: (1,) or (1, D) each
    per_sequence: bool  # one target per sequence (trained and judged at its last step)
    source: str  # the file, for messages
    setting: str = "data.path"  # the setting that named the file
    feature_names: list[str] | None = None  # a table's feature columns; None: features by index
    rows: list[np.ndarray] | None = None  # a table's data row (0-based) of each step, per sequence

    def __len__(self) -> int:
        return len(self.inputs)

    def fail(self, what: str) -> ConfigError:
        return ConfigError(self.setting, self.source, what)

    def select(self, idx) -> Sequences:
        idx = list(idx)
        rows = None if self.rows is None else [self.rows[i] for i in idx]
        return replace(self, inputs=[self.inputs[i] for i in idx], targets=[self.targets[i] for i in idx], rows=rows)


def regime_series(lengths: np.ndarray, num_features: int, num_regimes: int, switch_probability: float,
                  noise: float, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(features, regimes) per sequence: each regime has a level per feature; a sequence starts
    in a random regime and switches to another with ``switch_probability`` per step; every
    step shows its regime's level under noise of standard deviation ``noise``."""
    levels = rng.normal(0.0, 1.0, (num_regimes, num_features))
    features, regimes = [], []
    for length in lengths:
        jumps = rng.integers(1, num_regimes, length) * (rng.random(length) < switch_probability)
        jumps[0] = rng.integers(num_regimes)
        regime = (np.cumsum(jumps) % num_regimes).astype(np.int32)
        features.append((levels[regime] + noise * rng.normal(size=(length, num_features))).astype(np.float32))
        regimes.append(regime)
    return features, regimes


# --- reading ---------------------------------------------------------------------------------------


def _numeric(array: np.ndarray, name: str, fail) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise fail(f"its '{name}' array holds {array.dtype} values; use numbers")
    return array


def read_npz(path: str, setting: str) -> dict[str, np.ndarray]:
    """The ``x``, ``y`` (and ``lengths``) arrays of a ``.npz`` or of a folder of ``.npy`` files; no pickle."""
    file = Path(path).expanduser()
    try:
        if file.is_dir():
            arrays = {p.stem: np.load(p, allow_pickle=False) for p in file.glob("*.npy") if p.stem in ("x", "y", "lengths")}
        else:
            with np.load(file, allow_pickle=False) as loaded:
                arrays = {name: loaded[name] for name in loaded.files}
    except (ValueError, OSError, EOFError) as error:
        raise ConfigError(setting, path, f"it cannot be read as NumPy arrays without pickle ({error}); "
                                         "save numeric arrays with numpy.savez") from None
    for name in ("x", "y"):
        if name not in arrays:
            raise ConfigError(setting, path, f"it holds no '{name}' array (found: {', '.join(sorted(arrays)) or 'none'}); "
                                             "use x (features or token ids), y (targets) and optionally lengths")
    return arrays


def read_arrays(path: str, setting: str = "data.path", arrays: dict | None = None) -> Sequences:
    """Arrays -> Sequences. ``x``: (steps,) token ids or values, (steps, F) features, or (N, T, F)
    for N sequences of T steps; ``lengths``: steps per sequence (for (N, T, F), at most T
    each); ``y``: one target per step or one per sequence, told apart by its count."""
    arrays = arrays if arrays is not None else read_npz(path, setting)
    fail = lambda what: ConfigError(setting, path, what)
    x, y = _numeric(arrays["x"], "x", fail), _numeric(arrays["y"], "y", fail)
    if x.size == 0:
        raise fail("its 'x' array is empty")
    lengths = _lengths(arrays.get("lengths"), x, fail)
    if x.ndim == 3:
        inputs = [x[i, :n] for i, n in enumerate(lengths)]
    else:
        x = x if x.ndim == 2 or np.issubdtype(x.dtype, np.integer) else x[:, None]
        inputs = np.split(x, np.cumsum(lengths)[:-1])
    steps, n = int(sum(lengths)), len(lengths)
    if x.ndim == 3 and y.shape[:2] == x.shape[:2]:
        targets, per_sequence = [y[i, :m] for i, m in enumerate(lengths)], False
    elif x.ndim < 3 and len(y) == steps:
        targets, per_sequence = np.split(y, np.cumsum(lengths)[:-1]), False
    elif len(y) == n:
        targets, per_sequence = [y[i:i + 1] for i in range(n)], True
    else:
        raise fail(f"its 'y' holds {len(y):,} targets, which fits neither its {steps:,} steps nor its {n:,} "
                   "sequences; give one target per step or one per sequence")
    return Sequences(list(inputs), list(targets), per_sequence, str(path), setting)


def _lengths(lengths: np.ndarray | None, x: np.ndarray, fail) -> list[int]:
    if x.ndim > 3:
        raise fail(f"its 'x' has shape {x.shape}; use (steps,), (steps, features) or (sequences, steps, features)")
    if lengths is None:
        return [x.shape[1]] * x.shape[0] if x.ndim == 3 else [len(x)]
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer) or len(lengths) == 0 or lengths.min() < 1:
        raise fail("its 'lengths' must be positive whole numbers, one per sequence")
    if x.ndim == 3 and (len(lengths) != x.shape[0] or lengths.max() > x.shape[1]):
        raise fail(f"its 'lengths' must give each of the {x.shape[0]} sequences of 'x' at most {x.shape[1]} steps")
    if x.ndim < 3 and lengths.sum() != len(x):
        raise fail(f"its 'lengths' sum to {lengths.sum():,} steps but 'x' has {len(x):,}; they must agree")
    return [int(n) for n in lengths]


@dataclass(frozen=True)
class Columns:
    """Which columns of a table are what."""

    targets: list[str]
    sequence: str | None = None
    time: str | None = None
    features: list[str] | None = None  # None: every other numeric column
    level: TargetLevel = TargetLevel.step

    @classmethod
    def of(cls, cfg: TableDataConfig) -> Columns:
        return cls(cfg.target_columns, cfg.sequence_column, cfg.time_column, cfg.feature_columns, cfg.target_level)


def read_table(path: str, columns: Columns, setting: str = "data.path", frame=None) -> Sequences:
    """A table, one row per timestep -> Sequences: rows grouped by the sequence column (in the
    order sequences first appear), sorted by the time column within each."""
    import pandas as pd  # only a table needs pandas

    if frame is None:
        frame = _read_frame(path, setting)
    named = {"data.target_column": columns.targets, "data.sequence_column": [columns.sequence] if columns.sequence else [],
             "data.time_column": [columns.time] if columns.time else [], "data.feature_columns": columns.features or []}
    for where, names in named.items():
        for name in names:
            if name not in frame.columns:
                raise ConfigError(where, name, f"{path} has no such column; its columns: {', '.join(map(str, frame.columns))}")
    taken = {*columns.targets, columns.sequence, columns.time}
    features = columns.features or [c for c in frame.columns if c not in taken and pd.api.types.is_numeric_dtype(frame[c])]
    if not features:
        raise ConfigError("data.feature_columns", columns.features, f"{path} has no numeric column left for features")
    for name in [*features, *columns.targets]:
        if not (pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name])):
            raise ConfigError("data.feature_columns" if name in features else "data.target_column", name,
                              f"column '{name}' of {path} is not numeric ({frame[name].dtype}); use numeric columns")
    by_sequence = [] if columns.sequence is None else frame.groupby(columns.sequence, sort=False, dropna=False)
    groups = [g for _, g in by_sequence] or [frame]
    if columns.time is not None:
        groups = [g.sort_values(columns.time, kind="stable") for g in groups]
    inputs = [g[features].to_numpy(np.float32) for g in groups]
    per_sequence = columns.level == TargetLevel.sequence
    targets = [(g[columns.targets].iloc[-1:] if per_sequence else g[columns.targets]).to_numpy() for g in groups]
    if len(columns.targets) == 1:
        targets = [t[:, 0] for t in targets]
    rows = [g.index.to_numpy() for g in groups]
    return Sequences(inputs, targets, per_sequence, str(path), setting, [str(f) for f in features], rows)


def _read_frame(path: str, setting: str):
    import pandas as pd

    file = Path(path).expanduser()
    if file.suffix.lower() not in TABLE_SUFFIXES:
        raise ConfigError(setting, path, f"use a table file ending in {', '.join(TABLE_SUFFIXES)}")
    try:
        frame = pd.read_csv(file) if file.suffix.lower() == ".csv" else pd.read_parquet(file)
    except (ValueError, OSError, ImportError) as error:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise ConfigError(setting, path, f"it cannot be read as a table ({str(error).splitlines()[0]})") from None
    if frame.empty:
        raise ConfigError(setting, path, "the table has no rows")
    return frame


def example_arrays() -> dict[str, np.ndarray]:
    """The embedded example for ``data=arrays``: 200 ragged sequences of 4 noisy features, the
    hidden regime of each step as its label (``series``' generator)."""
    rng = np.random.default_rng(2024)
    lengths = rng.integers(150, 401, 200)
    features, regimes = regime_series(lengths, 4, 3, 0.01, 2.0, rng)
    return {"x": np.concatenate(features), "y": np.concatenate(regimes), "lengths": lengths}


def example_table():
    """The embedded example for ``data=table``: 300 sequences of 4 noisy features, each in one
    hidden regime from start to end, its label on every row and taken from the last."""
    import pandas as pd

    rng = np.random.default_rng(2025)
    lengths = rng.integers(60, 181, 300)
    features, regimes = regime_series(lengths, 4, 3, 0.0, 3.0, rng)
    frames = [pd.DataFrame({"sequence": i, "t": np.arange(len(f)), **{f"f{j}": f[:, j] for j in range(4)},
                            "label": r}) for i, (f, r) in enumerate(zip(features, regimes))]
    return pd.concat(frames, ignore_index=True)


EXAMPLE_COLUMNS = Columns(["label"], "sequence", "t", None, TargetLevel.sequence)


def read(cfg: ArraysDataConfig | TableDataConfig, path: str | None, setting: str) -> Sequences:
    """The file ``path`` names, read by the kind ``cfg`` is; no path: the kind's embedded example."""
    if isinstance(cfg, ArraysDataConfig):
        return read_arrays(path, setting) if path else read_arrays("embedded example", setting, example_arrays())
    if path:
        return read_table(path, Columns.of(cfg), setting)
    return read_table("embedded example", EXAMPLE_COLUMNS, setting, example_table())


# --- from what was read to a dataset -------------------------------------------------------------


def load(cfg: ArraysDataConfig | TableDataConfig) -> Dataset:
    """The dataset ``cfg`` names: read, checked, split, standardised by training statistics."""
    data = check(read(cfg, cfg.path, "data.path"), cfg.task)
    if cfg.val_path is not None:
        train, val = data, check(read(cfg, cfg.val_path, "data.val_path"), cfg.task)
    else:
        train, val = split(data, cfg.val_fraction)
    task = cfg.task if cfg.task != DataTask.auto else infer_task(train)
    if task == DataTask.classification:
        train_targets, val_targets, io, target_stats = _classes(train, val, cfg.num_classes)
    else:
        train_targets, val_targets, io, target_stats = _values(train, val, cfg.normalize)
    train_inputs, val_inputs, io, feature_stats = _inputs(train, val, io, cfg.normalize)
    (train_corpus, train_missing), (val_corpus, val_missing) = (_corpus(train, train_inputs, train_targets),
                                                                _corpus(val, val_inputs, val_targets))
    for part, corpus, name in ((train, train_corpus, "training"), (val, val_corpus, "validation")):
        if not any(w.any() for w in corpus.weights):  # nothing to learn from, or a loss of 0/0
            raise part.fail(f"its {name} sequences hold no known target (every one is NaN); give targets, "
                            "or another data.val_fraction or data.val_path")
    missing = train_missing + val_missing
    return Dataset(
        train=train_corpus,
        val=val_corpus,
        io=io,
        source=f"{cfg.name} {data.source}" + (f" ({missing:,} missing (NaN) target(s): weight 0)" if missing else ""),
        fingerprint=_fingerprint(train, val),
        normalization=feature_stats | target_stats,
        targets_per_sequence=data.per_sequence,
    )


def check_features(data: Sequences) -> None:
    """NaN or infinite features stop here, with the feature, how many and where the first is."""
    for i, x in enumerate(data.inputs):
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            break
    else:
        return
    values = [x.reshape(len(x), -1) for x in data.inputs]
    bad = [~np.isfinite(v) for v in values]
    feature = int(np.flatnonzero(np.logical_or.reduce([b.any(axis=0) for b in bad]))[0])
    count = sum(int(b[:, feature].sum()) for b in bad)
    seq = next(j for j, b in enumerate(bad) if b[:, feature].any())
    step = int(np.flatnonzero(bad[seq][:, feature])[0])
    name = f"column '{data.feature_names[feature]}'" if data.feature_names else f"feature {feature}"
    where = f"data row {int(data.rows[seq][step]) + 1}" if data.rows is not None else f"sequence {seq}, step {step}"
    raise data.fail(f"{name} holds {count:,} NaN or infinite value(s), the first at {where}; "
                    "fill or drop them before training")


def _where(data: Sequences, seq: int, step: int) -> str:
    """Where a step sits, as the user can find it: a table's data row, else sequence and step
    (a per-sequence target: its sequence)."""
    if data.rows is not None:
        return f"data row {int(data.rows[seq][-1 if data.per_sequence else step]) + 1}"
    return f"sequence {seq}" + ("" if data.per_sequence else f", step {step}")


def check(data: Sequences, task: DataTask) -> Sequences:
    """``data`` once its features, targets and class ids are checked (each refusal names the file)."""
    check_features(data)
    check_targets(data)
    check_class_ids(data, task)
    return data


def check_targets(data: Sequences) -> None:
    """An infinite target stops here, with how many and where the first is: NaN marks a
    missing target (weight 0), but infinity is no target at all, and would otherwise surface
    as a diverged run that blames the learning rate."""
    bad = [np.isinf(np.asarray(t, np.float64)).reshape(len(t), -1).any(axis=1) for t in data.targets]
    count = sum(int(b.sum()) for b in bad)
    if count:
        seq = next(i for i, b in enumerate(bad) if b.any())
        raise data.fail(f"its targets hold {count:,} infinite value(s), the first at "
                        f"{_where(data, seq, int(np.flatnonzero(bad[seq])[0]))}; use finite targets (NaN marks a "
                        "missing one)")


def split(data: Sequences, fraction: float) -> tuple[Sequences, Sequences]:
    """Validation: the last ``fraction`` of the sequences in file order; a single sequence: its tail."""
    n = len(data)
    if n >= 2:
        n_val = min(max(1, round(n * fraction)), n - 1)
        return data.select(range(n - n_val)), data.select(range(n - n_val, n))
    if data.per_sequence:
        raise data.fail("it holds one sequence with one target: a validation split needs 2 sequences or more "
                        "(or give data.val_path)")
    steps = len(data.inputs[0])
    n_val = max(2, round(steps * fraction))
    if steps - n_val < 2:
        raise data.fail(f"its one sequence has {steps:,} steps, too few to hold out data.val_fraction={fraction} "
                        "and still train; use more steps, or data.val_path")
    cut = steps - n_val
    rows = data.rows

    def part(window: slice) -> Sequences:
        return replace(data, inputs=[data.inputs[0][window]], targets=[data.targets[0][window]],
                       rows=None if rows is None else [rows[0][window]])

    return part(slice(0, cut)), part(slice(cut, steps))


def infer_task(data: Sequences) -> DataTask:
    """Integer (or boolean) targets are classes; float targets are values."""
    whole = all(np.issubdtype(t.dtype, np.integer) for t in data.targets)
    return DataTask.classification if whole else DataTask.regression


def _classes(train: Sequences, val: Sequences, num_classes: int | None):
    """Class ids (NaN: missing, weight 0), checked whole and not negative; the classes are
    counted from the training targets unless ``data.num_classes`` says."""
    ids = []
    for part in (train, val):
        if any(t.ndim > 1 and t.shape[1] > 1 for t in part.targets):
            raise part.fail("classification takes one target per step or sequence (one column); "
                            "several target values are regression (data.task=regression)")
        values, known = _class_values(part)
        if known.size and ((known < 0).any() or (known != np.round(known)).any()):
            bad = known[(known < 0) | (known != np.round(known))][0]
            raise part.fail(f"class id {bad:g} is negative or not whole; class ids are 0, 1, 2, ...")
        ids.append((values, known))
    distinct = np.unique(ids[0][1])
    if distinct.size < 2:
        held = f"one class only (id {distinct[0]:g})" if distinct.size else "no known target"
        raise train.fail(f"its training targets hold {held}: a classifier has nothing to learn; use data with "
                         "2 classes or more (or data.task=regression for values)")
    seen = int(ids[0][1].max()) + 1 if ids[0][1].size else 0
    classes = num_classes or max(seen, 2)
    top = max((int(known.max()) for _, known in ids if known.size), default=0)
    if top >= classes:
        where = "the data holds" if num_classes else "the validation data holds, unseen in training,"
        raise ConfigError("data.num_classes", num_classes, f"{where} class id {top}, so there are at least "
                                                           f"{top + 1} classes; use that many or more")
    return ids[0][0], ids[1][0], ModelIO(DataTask.classification, classes), {}


def _class_values(part: Sequences) -> tuple[list[np.ndarray], np.ndarray]:
    """Each sequence's class ids as floats (NaN: missing), and every known id."""
    values = [np.asarray(t, np.float64).reshape(len(t)) for t in part.targets]
    known = np.concatenate(values)
    return values, known[np.isfinite(known)]


SPARSE_CLASSES = 1024  # past this many classes, ids that leave most of them unused are refused


def check_class_ids(part: Sequences, task: DataTask) -> None:
    """Class ids number the classes 0, 1, 2, ...: the output layer has one unit per id up to
    the largest, so a stray id (a mislabel, a raw code) would build a model of that many
    classes, most of which never appear. Refused with the id and where it sits in the file."""
    if task == DataTask.regression or (task == DataTask.auto and infer_task(part) != DataTask.classification):
        return
    if any(t.ndim > 1 and t.shape[1] > 1 for t in part.targets):
        return  # several values per step: refused as classification later, with its own line
    values, known = _class_values(part)
    if not known.size:
        return
    top, distinct = int(known.max()), np.unique(known).size
    if top + 1 <= SPARSE_CLASSES or distinct * 2 > top + 1:
        return
    seq = next(i for i, v in enumerate(values) if (v == top).any())
    step = int(np.flatnonzero(values[seq] == top)[0])
    raise part.fail(f"class id {top:,} at {_where(part, seq, step)} would make {top + 1:,} classes, but only "
                    f"{distinct:,} distinct id(s) appear; number the classes 0, 1, 2, ... (or set data.task=regression)")


def _values(train: Sequences, val: Sequences, normalize: bool):
    """Float targets (steps, D), standardised by the training targets' mean and spread."""
    shaped = [[np.asarray(t, np.float64).reshape(len(t), -1) for t in part.targets] for part in (train, val)]
    dims = {v.shape[1] for part in shaped for v in part}
    if len(dims) > 1:
        raise train.fail("its targets do not all have the same number of values")
    flat = np.concatenate(shaped[0])
    mean, std = (np.nanmean(flat, axis=0), np.nanstd(flat, axis=0)) if normalize else (0.0 * flat[0], 0.0 * flat[0] + 1)
    std = np.where((std > 0) & np.isfinite(std), std, 1.0)
    mean = np.nan_to_num(mean)
    scaled = [[(v - mean) / std for v in part] for part in shaped]
    stats = {"target_mean": mean.tolist(), "target_std": std.tolist()}
    return scaled[0], scaled[1], ModelIO(DataTask.regression, int(dims.pop())), stats


def _inputs(train: Sequences, val: Sequences, io: ModelIO, normalize: bool):
    """Token ids (moved up by one: 0 is padding) or float features, standardised by the
    training steps' mean and spread per feature."""
    if np.issubdtype(train.inputs[0].dtype, np.integer) and train.inputs[0].ndim == 1:
        for part in (train, val):
            if min(int(x.min()) for x in part.inputs) < 0:
                raise part.fail("its token ids (an integer 'x' of one value per step) must not be negative")
        top = max(int(x.max()) for x in train.inputs + val.inputs)
        moved = [[(x + 1).astype(np.int32) for x in part.inputs] for part in (train, val)]
        return moved[0], moved[1], replace(io, vocab_size=top + 2), {}
    features = [[np.asarray(x, np.float32).reshape(len(x), -1) for x in part.inputs] for part in (train, val)]
    width = {f.shape[1] for part in features for f in part}
    if len(width) > 1:
        raise train.fail(f"its sequences do not all have the same number of features ({sorted(width)})")
    flat = np.concatenate(features[0])
    mean, std = (flat.mean(axis=0), flat.std(axis=0)) if normalize else (np.zeros(flat.shape[1]), np.ones(flat.shape[1]))
    std = np.where(std > 0, std, 1.0)
    scaled = [[((f - mean) / std).astype(np.float32) for f in part] for part in features]
    stats = {"feature_mean": mean.tolist(), "feature_std": std.tolist()} if normalize else {}
    return scaled[0], scaled[1], replace(io, num_features=int(width.pop())), stats


def _corpus(data: Sequences, inputs: list[np.ndarray], targets: list[np.ndarray]) -> tuple[Corpus, int]:
    """(the corpus, its missing targets): targets per step and their loss weights, a
    per-sequence target at the last step only, a missing (NaN) target nowhere (its value 0)."""
    classification = targets[0].ndim == 1
    corpus_targets, weights, missing = [], [], 0
    for x, y in zip(inputs, targets):
        known = np.isfinite(y) if classification else np.isfinite(y).all(axis=1)
        missing += int((~known).sum())
        filled = np.where(np.isfinite(y), y, 0.0)
        weight = known.astype(np.float32)
        if data.per_sequence:
            filled = np.repeat(filled, len(x), axis=0)
            weight = np.concatenate([np.zeros(len(x) - 1, np.float32), weight])
        corpus_targets.append(filled.astype(np.int32) if classification else filled.astype(np.float32))
        weights.append(weight)
    return Corpus(inputs, corpus_targets, weights), missing


def _fingerprint(*parts: Sequences) -> str:
    digest = hashlib.sha256()
    for part in parts:
        for array in (*part.inputs, *part.targets):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
