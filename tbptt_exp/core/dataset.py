"""What a dataset is: train and validation corpora, what they give a model and ask of it
(``ModelIO``), and what a model that learned nothing would score on them (``baselines``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tbptt_exp.core.config import DataTask
from tbptt_exp.core.layout import Corpus


@dataclass(frozen=True)
class ModelIO:
    """What a dataset gives a model and asks of it, per step."""

    task: DataTask  # classification or regression
    num_outputs: int  # classes, or target values per step
    vocab_size: int | None = None  # token ids in (0 is padding): the embedding's size; None: features
    num_features: int | None = None  # float features in

    @property
    def tokens(self) -> bool:
        return self.vocab_size is not None

    def describe(self) -> str:
        given = f"vocabulary {self.vocab_size}" if self.tokens else f"{self.num_features} feature(s) per step"
        if self.task == DataTask.classification and self.num_outputs == self.vocab_size:
            return given  # a language model: the next token is one of the vocabulary
        if self.task == DataTask.classification:
            return f"{given}, {self.num_outputs} classes"
        return f"{given}, {self.num_outputs} target value(s) per step (regression)"


def token_io(vocab_size: int) -> ModelIO:
    """Token ids in, the next token (or a key) out: classification over the vocabulary."""
    return ModelIO(DataTask.classification, vocab_size, vocab_size=vocab_size)


@dataclass(frozen=True)
class Dataset:
    """Train and validation corpora plus what is needed to reproduce and interpret them."""

    train: Corpus
    val: Corpus
    io: ModelIO
    vocabulary: list[str] = field(default_factory=list)  # chars only: id i+2 -> vocabulary[i]
    source: str = ""  # where the data came from, one line
    fingerprint: str = ""  # sha256 of the data the corpora were built from
    # Training statistics the features (and regression targets) were standardised with:
    # {"feature_mean": [...], "feature_std": [...], "target_mean": [...], "target_std": [...]}.
    normalization: dict = field(default_factory=dict)
    targets_per_sequence: bool = False  # one target per sequence, weighted at its last step only

    @property
    def is_text(self) -> bool:
        return bool(self.vocabulary)

    @property
    def vocab_size(self) -> int | None:
        return self.io.vocab_size

    @property
    def step_name(self) -> str:
        """What one step is called where figures are shown: ``tokens``, else ``timesteps``."""
        return "tokens" if self.io.tokens else "timesteps"

    @property
    def target_scale(self) -> np.ndarray | None:
        """Regression targets' standard deviation per value: errors back in the target's own units."""
        scale = self.normalization.get("target_std")
        return None if scale is None else np.asarray(scale, np.float32)


def error_figures(squared: np.ndarray, absolute: np.ndarray, weight: float, scale: np.ndarray) -> dict[str, float]:
    """Weighted sums of squared and absolute errors per target value (standardised units) ->
    ``rmse`` and ``mae`` over every weighted step and value, in the targets' own units."""
    per_value = weight * len(scale)
    return {"rmse": float(np.sqrt(np.sum(scale**2 * squared) / per_value)),
            "mae": float(np.sum(scale * absolute) / per_value)}


def baselines(dataset: Dataset) -> dict[str, float | str]:
    """What a model that learned nothing scores on the same weighted validation steps.

    Classification: always the training targets' majority class (``accuracy``). Regression:
    the better (lower RMSE) of always the training mean and, for targets per step, the
    previous step's target (``rmse``, ``mae`` in the targets' own units). ``kind`` names it.
    """
    train, val = dataset.train, dataset.val
    weights = [val.weight(i) for i in range(len(val))]
    total = float(sum(w.sum() for w in weights))
    if dataset.io.task == DataTask.classification:
        counts = np.bincount(np.concatenate(train.targets), np.concatenate([train.weight(i) for i in range(len(train))]),
                             minlength=dataset.io.num_outputs)
        majority = int(np.argmax(counts))
        hits = sum(float((w * (y == majority)).sum()) for y, w in zip(val.targets, weights))
        return {"accuracy": hits / total, "kind": "majority class"}
    scale = dataset.target_scale if dataset.target_scale is not None else np.ones(dataset.io.num_outputs, np.float32)
    train_w = np.concatenate([train.weight(i) for i in range(len(train))])[:, None]
    mean = (np.concatenate(train.targets) * train_w).sum(axis=0) / train_w.sum()
    guesses = {"training mean": [np.broadcast_to(mean, y.shape) for y in val.targets]}
    if not dataset.targets_per_sequence:
        guesses["previous step"] = [np.concatenate([mean[None], np.where(w[:-1, None] > 0, y[:-1], mean)])
                                    for y, w in zip(val.targets, weights)]
    scored = {}
    for kind, guess in guesses.items():
        errors = [(y - g) * w[:, None] for y, g, w in zip(val.targets, guess, weights)]
        squared = sum(((y - g) ** 2 * w[:, None]).sum(axis=0) for y, g, w in zip(val.targets, guess, weights))
        scored[kind] = error_figures(squared, sum(np.abs(e).sum(axis=0) for e in errors), total, scale)
    kind = min(scored, key=lambda name: scored[name]["rmse"])
    return {**scored[kind], "kind": kind}
