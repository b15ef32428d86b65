"""Datasets: text, synthetic tasks or your own sequences, split train/validation.

No network is ever used. ``chars`` reads real text — by default a deterministic,
size-capped selection of the Python standard library's own source files, which every
Python install carries; ``key_recall`` (tokens) and ``series`` (numeric features) are
seeded synthetic tasks that only state carried across chunk boundaries can solve;
``arrays`` and ``table`` read your own numeric sequences (``core/sequences.py``).

Every dataset says what it gives a model and asks of it (``ModelIO``): token ids or float
features in, class ids or values out. Token id 0 is padding and, for text, id 1 stands for
characters outside the vocabulary, so every real token is >= 1 (see ``layout.PAD_ID``).
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

from tbptt_exp.core import sequences
from tbptt_exp.core.config import (
    ArraysDataConfig,
    CharsDataConfig,
    ConfigError,
    DataConfig,
    DataTask,
    KeyRecallDataConfig,
    SeriesDataConfig,
    TableDataConfig,
)
from tbptt_exp.core.dataset import Dataset, ModelIO, token_io
from tbptt_exp.core.layout import Corpus
from tbptt_exp.core.sequences import regime_series

UNK_ID = 1
FIRST_CHAR_ID = 2
TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".text")


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    if isinstance(cfg, (ArraysDataConfig, TableDataConfig)):
        return sequences.load(cfg)
    return {CharsDataConfig: chars, KeyRecallDataConfig: key_recall, SeriesDataConfig: series}[type(cfg)](cfg, seed)


# --- chars -------------------------------------------------------------------------------


def embedded_text_files() -> list[Path]:
    """The embedded default corpus: the standard library's .py files, sorted by path.

    Tests, site-packages and vendored trees are left out; the selection is the same on
    every run of the same Python.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [
        p
        for p in root.rglob("*.py")
        if not skip.intersection(p.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_documents(path: str | None, max_chars: int) -> tuple[list[str], str]:
    """Read text documents (one per file) until ``max_chars`` characters are collected."""
    if path is None:
        files, source = embedded_text_files(), "embedded: Python standard library sources"
    else:
        p = Path(path).expanduser()
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        else:
            raise ConfigError("data.path", path, "use an existing text file or folder")
        source = str(p.resolve())
    documents, total = [], 0
    skipped: list[str] = []  # files that are not text or cannot be read
    replaced = 0  # files read with invalid UTF-8 bytes replaced
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as error:
            skipped.append(f"{f.name} ({error.strerror or error})")
            continue
        if b"\x00" in raw[:8192]:
            skipped.append(f"{f.name} (binary)")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            if text.count("\ufffd") > 0.01 * len(text):  # mostly not UTF-8: another encoding or binary
                skipped.append(f"{f.name} (not UTF-8)")
                continue
            replaced += 1  # a stray bad byte in real text: keep the text
        if len(text) < 2:
            continue
        text = text[: max_chars - total]
        documents.append(text)
        total += len(text)
        if total >= max_chars:
            break
    notes = []
    if path is not None and total >= max_chars:
        size = sum(f.stat().st_size for f in files if f.is_file())
        notes.append(f"first {total:,} characters of about {size:,} bytes (data.max_chars)")
    if skipped:
        notes.append(f"{len(skipped)} file(s) skipped: {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}")
    if replaced:
        notes.append(f"{replaced} file(s) with invalid UTF-8 bytes, read with U+FFFD in their place")
    if total < 2:
        raise ConfigError(
            "data.path", path,
            f"it holds no readable UTF-8 text{' (' + '; '.join(notes) + ')' if notes else ''}; "
            f"use files ending in {', '.join(TEXT_SUFFIXES)}",
        )
    return documents, source + (f" ({'; '.join(notes)})" if notes else "")


def build_vocabulary(texts: list[str], max_vocab: int) -> list[str]:
    """Characters by descending frequency (ties by code point), at most ``max_vocab``."""
    counts = Counter()
    for t in texts:
        counts.update(t)
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    return ranked[:max_vocab]


def encode(text: str, vocabulary: list[str]) -> np.ndarray:
    table = {c: i + FIRST_CHAR_ID for i, c in enumerate(vocabulary)}
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lut_size = max(map(ord, vocabulary), default=0) + 1
    lut = np.full(lut_size, UNK_ID, dtype=np.int32)
    for c, i in table.items():
        lut[ord(c)] = i
    ids = np.full(len(codes), UNK_ID, dtype=np.int32)
    known = codes < lut_size
    ids[known] = lut[codes[known]]
    return ids


def split_tail(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The last ``val_fraction`` of the text (documents in order) as validation: one
    contiguous block, so no validation character sits between training characters. The
    document the cut falls in is split there."""
    total = sum(map(len, documents))
    cut = total - max(2, round(total * val_fraction))
    train, val, seen = [], [], 0
    for d in documents:
        if seen + len(d) <= cut:
            train.append(d)
        elif seen >= cut:
            val.append(d)
        else:
            train.append(d[: cut - seen])
            val.append(d[cut - seen :])
        seen += len(d)
    return [d for d in train if len(d) >= 2], [d for d in val if len(d) >= 2]


def cut_text(documents: list[str], cfg: CharsDataConfig, side: str) -> list[str]:
    """Documents -> sequences of characters (each one longer than its training steps: its
    last character is only a target). Pieces overlap by one character, so every character
    but a sequence's first is a target exactly once."""
    if cfg.cut == "fixed":
        text, step = "".join(documents), cfg.sequence_length
        pieces = [text[i * step : i * step + step + 1] for i in range((len(text) - 1) // step)]
        if not pieces:
            longest = max(1, len(text) - 1)
            raise ConfigError(
                "data.sequence_length", step,
                f"the {side} text has {len(text):,} characters, too few for one sequence of this length; "
                f"use at most {longest}, a different data.val_fraction, or more text",
            )
        return pieces
    step = cfg.max_sequence_length
    pieces = []
    for d in documents:
        if step is None or len(d) <= step + 1:
            pieces.append(d)
        else:  # a long document in pieces of at most ``step`` steps; state resets at each cut
            pieces += [d[i : i + step + 1] for i in range(0, len(d) - 1, step) if len(d[i : i + step + 1]) >= 2]
    return pieces


def chars(cfg: CharsDataConfig, seed: int) -> Dataset:
    """Character-level language modelling: predict character t+1 from characters ≤ t.

    Validation is the last ``val_fraction`` of the text, cut the same way as training.
    """
    documents, source = read_documents(cfg.path, cfg.max_chars)
    fingerprint = hashlib.sha256("\x00".join(documents).encode("utf-8")).hexdigest()
    train_docs, val_docs = split_tail(documents, cfg.val_fraction)
    if not train_docs or not val_docs:
        raise ConfigError("data.val_fraction", cfg.val_fraction,
                          f"the text ({sum(map(len, documents)):,} characters) leaves no training or no validation "
                          "text; use a fraction that leaves both, or more text")
    train_pieces, val_pieces = cut_text(train_docs, cfg, "training"), cut_text(val_docs, cfg, "validation")
    if cfg.max_sequences is not None:
        train_pieces, val_pieces = train_pieces[: cfg.max_sequences], val_pieces[: cfg.max_sequences]
    vocabulary = build_vocabulary(train_pieces, cfg.max_vocab)

    def corpus(pieces: list[str]) -> Corpus:
        encoded = [encode(p, vocabulary) for p in pieces]
        return Corpus([e[:-1] for e in encoded], [e[1:] for e in encoded])

    return Dataset(
        train=corpus(train_pieces),
        val=corpus(val_pieces),
        io=token_io(len(vocabulary) + FIRST_CHAR_ID),
        vocabulary=vocabulary,
        source=source,
        fingerprint=fingerprint,
    )


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split by sequence (never inside one): at least one sequence on each side."""
    if n < 2:
        raise ValueError(f"the corpus has {n} sequence(s): train/validation split needs 2 or more")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --- key_recall --------------------------------------------------------------------------


def key_recall(cfg: KeyRecallDataConfig, seed: int) -> Dataset:
    """Each sequence opens with a key; every target is that key.

    Tokens: 1..num_keys are keys, the next num_noise_tokens ids are noise. The first
    input is the key and the rest is noise, so after the first chunk the only way to
    predict the target is to have carried the key in the LSTM state: TBPTT with
    ``reset=sequence`` reaches a near-zero loss, ``reset=chunk`` stays near log(num_keys).
    """
    rng = np.random.default_rng([seed, 7])
    n, t = cfg.num_sequences, cfg.sequence_length
    keys = rng.integers(1, cfg.num_keys + 1, size=n)
    noise = rng.integers(
        cfg.num_keys + 1, cfg.num_keys + cfg.num_noise_tokens + 1, size=(n, t)
    ).astype(np.int32)
    noise[:, 0] = keys
    targets = np.repeat(keys[:, None], t, axis=1).astype(np.int32)
    train_idx, val_idx = split_indices(n, cfg.val_fraction, seed)

    def corpus(idx: np.ndarray) -> Corpus:
        return Corpus([noise[i] for i in idx], [targets[i] for i in idx])

    return Dataset(
        train=corpus(train_idx),
        val=corpus(val_idx),
        io=token_io(cfg.num_keys + cfg.num_noise_tokens + 1),
        source=f"key_recall: {n} sequences of {t} steps, {cfg.num_keys} keys",
        fingerprint=hashlib.sha256(noise.tobytes()).hexdigest(),
    )


# --- series ----------------------------------------------------------------------------------


def series(cfg: SeriesDataConfig, seed: int) -> Dataset:
    """A hidden regime per step, to be told from noisy features.

    One step's features say little about the regime (the noise is larger than the gap
    between levels); a model that carries what it has seen along the sequence gets it
    right, one that starts every chunk from zero state (``reset=chunk``) guesses at each
    chunk's start.
    """
    rng = np.random.default_rng([seed, 11])
    lengths = np.full(cfg.num_sequences, cfg.sequence_length)
    features, regimes = regime_series(lengths, cfg.num_features, cfg.num_regimes, cfg.switch_probability,
                                      cfg.noise, rng)
    train_idx, val_idx = split_indices(cfg.num_sequences, cfg.val_fraction, seed)

    def corpus(idx: np.ndarray) -> Corpus:
        return Corpus([features[i] for i in idx], [regimes[i] for i in idx])

    return Dataset(
        train=corpus(train_idx),
        val=corpus(val_idx),
        io=ModelIO(DataTask.classification, cfg.num_regimes, num_features=cfg.num_features),
        source=(f"series: {cfg.num_sequences} sequences of {cfg.sequence_length} steps, {cfg.num_features} noisy "
                f"features, {cfg.num_regimes} hidden regimes"),
        fingerprint=hashlib.sha256(np.concatenate(features).tobytes()).hexdigest(),
    )
