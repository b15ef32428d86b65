"""TBPTT layout: sequences -> the ordered batches a stateful LSTM trains on.

Pure NumPy, no TensorFlow: this is where TBPTT's invariants live, so they can be
property-tested quickly.

A stateful LSTM with a fixed batch size B keeps one state per batch row, and row i of
batch b+1 continues row i of batch b. Each row is therefore a *stream*: a sequence of
chunks of k timesteps. The layout decides which sequence occupies which stream and
chunk, sets a per-row *reset flag* where a stream's state must be zeroed before a chunk,
and gives every timestep a *sample weight* (1 for a real step with a target, 0 for padding)
and a *real* flag (a step of a sequence, not padding).

Every sequence starts at a chunk boundary. That keeps resets per row and per chunk (one
flag per row, applied before the chunk) so the LSTM itself stays a plain, cuDNN-eligible
layer; the cost is that a sequence's last chunk is padded to k (fewer than k steps).

Padding strategies (what to do when B does not divide the number of sequences N):

- ``dummy``: the classic recipe. Consecutive groups of B sequences occupy the B rows side
  by side; the last group is filled with all-padding *dummy* rows of weight 0; every row of
  a group is padded to the group's longest sequence.
- ``drop``: like ``dummy``, but the N mod B sequences that do not fill a group are dropped
  (and counted in ``dropped_sequences``).
- ``pack``: B independent streams, each taking whole sequences back to back; a sequence
  goes to the stream that is shortest so far, and its row resets exactly where it starts.
  B need not divide N, and rows are not padded to their neighbours' lengths: padding is
  only the tail of each sequence's last chunk and the end of each stream.
- ``stream``: the canonical layout for long text (char-rnn's loader, PyTorch's
  word_language_model ``batchify``): the sequences, in order, are concatenated (each
  starting at a chunk boundary) and the whole is cut into B equal contiguous parts, one per
  row, so state is carried along each row for the whole epoch and resets only where a
  sequence (a document) starts. A sequence that crosses a part boundary is split: its
  continuation opens the next row, from a zero state, as in ``batchify``. One long text
  thus trains as B streams; padding is only each sequence's last-chunk tail and the end of
  the last row.

Reset policies (when a row's state is zeroed; every row starts the epoch from zero):

- ``sequence``: at every sequence start (correct TBPTT).
- ``chunk``: before every chunk (no state carried at all: the baseline).
- ``never``: carry state across sequence boundaries within the epoch.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tbptt_exp.core.config import Padding, Reset

PAD_ID = 0


@dataclass(frozen=True)
class Corpus:
    """Sequences to train on: sequence i is inputs[i] -> targets[i], step for step.

    Inputs are token ids, (T,) int (id 0 is reserved for padding, so real tokens are >= 1),
    or float features, (T, F). Targets are class ids, (T,) int, or values, (T, D) float.
    ``weights`` gives each step's weight in the loss (a per-sequence target weighs only at
    the sequence's last step, a missing target nothing); None: every step weighs 1.
    """

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    weights: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets) or (self.weights is not None and len(self.weights) != len(self.inputs)):
            raise ValueError("corpus: inputs, targets and weights hold different numbers of sequences")
        for i, (x, y) in enumerate(zip(self.inputs, self.targets)):
            if len(x) != len(y) or (self.weights is not None and len(self.weights[i]) != len(x)):
                raise ValueError(f"corpus: sequence {i} has {len(x)} inputs but {len(y)} targets or weights")
            if len(x) == 0:
                raise ValueError(f"corpus: sequence {i} is empty")

    def weight(self, i: int) -> np.ndarray:
        """The loss weight of each step of sequence ``i``."""
        return np.ones(len(self.inputs[i]), np.float32) if self.weights is None else self.weights[i]

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.inputs), dtype=np.int64, count=len(self.inputs))

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class Layout:
    """One epoch of TBPTT batches plus the accounting of real vs padded steps.

    Arrays are indexed [batch, row, step]; ``reset[b, r]`` means "zero row r's state
    before batch b". ``placements`` has one row per placed sequence:
    (sequence index, stream row, first batch) — the map from corpus to streams.
    """

    inputs: np.ndarray  # (n_batches, B, k) int32 token ids, or (n_batches, B, k, F) float32 features
    targets: np.ndarray  # (n_batches, B, k) int32 class ids, or (n_batches, B, k, D) float32 values
    sample_weights: np.ndarray  # (n_batches, B, k) float32: a step's loss weight, 0 on padding
    real: np.ndarray  # (n_batches, B, k) bool: a real step of a sequence, False on padding
    reset: np.ndarray  # (n_batches, B) bool
    placements: np.ndarray  # (n_placed, 3) int64: sequence, row, first batch
    dropped_sequences: int
    dummy_rows: int  # all-padding rows added to fill the last group (``dummy`` only)
    sequences: Corpus | None = None  # what placements index: the corpus, or its pieces (``stream``)

    @property
    def n_batches(self) -> int:
        return self.inputs.shape[0]

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[1]

    @property
    def k(self) -> int:
        return self.inputs.shape[2]

    @property
    def real_tokens(self) -> int:
        """Real steps (tokens of text, timesteps of numeric data), whatever their loss weight."""
        return int(self.real.sum())

    @property
    def total_tokens(self) -> int:
        return int(self.real.size)

    @property
    def padded_tokens(self) -> int:
        return self.total_tokens - self.real_tokens

    @property
    def padding_waste(self) -> float:
        """Fraction of computed timesteps that are padding (0 = none wasted)."""
        return self.padded_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def real_tokens_per_batch(self) -> np.ndarray:
        return self.real.sum(axis=(1, 2))

    def real_tokens_done(self, batches: int) -> int:
        """Real steps in the first ``batches`` batches (past ``n_batches``: round the layout again)."""
        per_batch = self.real_tokens_per_batch
        rounds, rest = divmod(batches, self.n_batches)
        return int(rounds * per_batch.sum() + per_batch[:rest].sum())


def build_layout(
    corpus: Corpus,
    k: int,
    batch_size: int,
    padding: str = "dummy",
    reset: str = "sequence",
    order: Sequence[int] | np.ndarray | None = None,
) -> Layout:
    """Lay out ``corpus`` as TBPTT batches of ``batch_size`` rows and ``k`` steps.

    ``order`` is the order in which sequences are placed (default: corpus order); pass
    ``epoch_order(...)`` to shuffle sequences between epochs — streams stay continuous.
    """
    if k <= 0:
        raise ValueError(f"k must be a positive number of timesteps, got {k}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if padding not in list(Padding):
        raise ValueError(f"padding={padding!r} is not one of {', '.join(Padding)}")
    if reset not in list(Reset):
        raise ValueError(f"reset={reset!r} is not one of {', '.join(Reset)}")
    order = np.arange(len(corpus)) if order is None else np.asarray(order, dtype=np.int64)
    if padding == "stream":  # sequences split at the row boundaries: the pieces are laid out
        corpus, order = stream_pieces(corpus, order, k, batch_size)
    n_chunks = -(-corpus.lengths // k)  # chunks each sequence occupies
    placements, dropped, dummy_rows = _place(order, n_chunks, batch_size, padding)
    if len(placements) == 0:
        raise ValueError(
            f"no sequence fits: {len(corpus)} sequences with batch_size={batch_size} "
            f"and padding='{padding}'; use a smaller batch_size or padding='dummy'/'pack'"
        )

    seqs, _, first = placements.T
    n_batches = int((first + n_chunks[seqs]).max())
    inputs, targets, weights, real = _streams(corpus, placements, batch_size, n_batches * k, k)
    flags = _reset_flags(n_batches, batch_size, placements, padding, reset)

    def to_batches(a: np.ndarray) -> np.ndarray:  # (rows, steps, ...) -> (batches, rows, k, ...)
        batched = a.reshape(batch_size, n_batches, k, *a.shape[2:])
        return np.ascontiguousarray(np.swapaxes(batched, 0, 1))

    return Layout(
        inputs=to_batches(inputs),
        targets=to_batches(targets),
        sample_weights=to_batches(weights),
        real=to_batches(real),
        reset=flags,
        placements=placements,
        dropped_sequences=dropped,
        dummy_rows=dummy_rows,
        sequences=corpus,
    )


def _streams(corpus: Corpus, placements: np.ndarray, batch_size: int, steps: int, k: int):
    """(inputs, targets, weights, real), each (rows, steps, ...): every sequence at its row
    and first batch, with its steps' weights; everything else padding (zeros, weight 0)."""
    x0, y0 = corpus.inputs[0], corpus.targets[0]
    inputs = np.zeros((batch_size, steps, *x0.shape[1:]), dtype=np.int32 if x0.ndim == 1 else np.float32)
    targets = np.zeros((batch_size, steps, *y0.shape[1:]), dtype=np.int32 if y0.ndim == 1 else np.float32)
    weights = np.zeros((batch_size, steps), dtype=np.float32)
    real = np.zeros((batch_size, steps), dtype=bool)
    for s, r, b in placements:
        start, x = b * k, corpus.inputs[s]
        inputs[r, start : start + len(x)] = x
        targets[r, start : start + len(x)] = corpus.targets[s]
        weights[r, start : start + len(x)] = corpus.weight(s)
        real[r, start : start + len(x)] = True
    return inputs, targets, weights, real


def _reset_flags(n_batches: int, batch_size: int, placements: np.ndarray, padding: str, reset: str) -> np.ndarray:
    """(batches, rows) flags: zero a row's state before that batch."""
    _, rows, first = placements.T
    flags = np.zeros((n_batches, batch_size), dtype=bool)
    flags[0, :] = True  # every epoch starts every stream from a zero state
    if reset == Reset.sequence:
        # A group (dummy/drop) starts all its rows together, dummy rows included, so a
        # whole-batch reset (the classic callback) and per-row flags agree.
        flags[first, rows if padding in (Padding.pack, Padding.stream) else slice(None)] = True
    elif reset == Reset.chunk:
        flags[:] = True
    return flags


def _place(order: np.ndarray, n_chunks: np.ndarray, batch_size: int, padding: str):
    """(placements: rows of (sequence, row, first batch), dropped sequences, dummy rows)."""
    if padding == "pack":
        return _pack(order, n_chunks, batch_size), 0, 0
    if padding == "stream":
        return _rows_in_order(order, n_chunks, batch_size), 0, 0
    return _groups(order, n_chunks, batch_size, padding)


def stream_chunks(corpus: Corpus, k: int, batch_size: int) -> int:
    """Chunks per row of the ``stream`` layout: all sequences' chunks over B rows, rounded up."""
    return max(1, -(-int((-(-corpus.lengths // k)).sum()) // batch_size))


def stream_pieces(corpus: Corpus, order: np.ndarray, k: int, batch_size: int) -> tuple[Corpus, np.ndarray]:
    """The sequences in ``order`` cut where the B equal rows of the ``stream`` layout end.

    Pieces keep the order; each is a view of its sequence (no copy). A sequence's pieces
    start at chunk boundaries of it, so every real token lands exactly once.
    """
    per_row = stream_chunks(corpus, k, batch_size)
    inputs, targets, weights = [], [], []
    used = 0  # chunks filled in the current row
    for s in order:
        x, y, w = corpus.inputs[s], corpus.targets[s], corpus.weight(s)
        start = 0
        while start < len(x):
            take = min(-(-(len(x) - start) // k), per_row - used)  # chunks of this piece
            end = min(len(x), start + take * k)
            inputs.append(x[start:end])
            targets.append(y[start:end])
            weights.append(w[start:end])
            start, used = end, (used + take) % per_row
    return Corpus(inputs, targets, weights), np.arange(len(inputs))


def _rows_in_order(order: np.ndarray, n_chunks: np.ndarray, batch_size: int) -> np.ndarray:
    """``stream``: pieces fill row 0, then row 1, ..., each row the same number of chunks."""
    per_row = -(-int(n_chunks[order].sum()) // batch_size)
    placements = np.empty((len(order), 3), dtype=np.int64)
    row = used = 0
    for i, s in enumerate(order):
        if used >= per_row:
            row, used = row + 1, 0
        placements[i] = (s, row, used)
        used += int(n_chunks[s])
    return placements


def planned_batches(corpus: Corpus, k: int, batch_size: int, padding: str) -> int:
    """Batches ``build_layout`` would make (in corpus order), computed without allocating them."""
    if padding == "stream":
        return stream_chunks(corpus, k, batch_size)
    n_chunks = -(-corpus.lengths // k)
    placements, _, _ = _place(np.arange(len(corpus)), n_chunks, batch_size, padding)
    if len(placements) == 0:
        return 0
    seqs, _, first = placements.T
    return int((first + n_chunks[seqs]).max())


def epoch_order(num_sequences: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order sequences are placed in for one epoch: a fresh permutation per epoch."""
    if not shuffle:
        return np.arange(num_sequences)
    return np.random.default_rng([seed, epoch]).permutation(num_sequences)


def _groups(
    order: np.ndarray, n_chunks: np.ndarray, batch_size: int, padding: str
) -> tuple[np.ndarray, int, int]:
    """``dummy``/``drop``: groups of B sequences side by side, each group as long as its longest."""
    remainder = len(order) % batch_size
    dropped = remainder if padding == "drop" else 0
    dummy_rows = (batch_size - remainder) % batch_size if padding == "dummy" else 0
    order = order[: len(order) - dropped]
    placements = np.empty((len(order), 3), dtype=np.int64)
    first_batch = 0
    for g in range(0, len(order), batch_size):
        group = order[g : g + batch_size]
        placements[g : g + len(group), 0] = group
        placements[g : g + len(group), 1] = np.arange(len(group))
        placements[g : g + len(group), 2] = first_batch
        first_batch += int(n_chunks[group].max())
    return placements, dropped, dummy_rows


def _pack(order: np.ndarray, n_chunks: np.ndarray, batch_size: int) -> np.ndarray:
    """``pack``: each sequence goes to the stream that is shortest so far (ties: lowest row)."""
    free = [(0, row) for row in range(batch_size)]  # (first free batch, row)
    placements = np.empty((len(order), 3), dtype=np.int64)
    for i, s in enumerate(order):
        first_batch, row = heapq.heappop(free)
        placements[i] = (s, row, first_batch)
        heapq.heappush(free, (first_batch + int(n_chunks[s]), row))
    return placements
