"""Model factories: how your own model comes in, and an example (``model=custom``).

A factory is a function the harness calls with what it knows, by keyword:

- ``batch_size``: rows per batch, fixed (a stateful layer keeps one state per row);
- ``k``: timesteps per chunk;
- ``vocab_size``: token ids come in (id 0 is padding), or None when float features do;
- ``num_features``: float features per step, or None for token ids;
- ``num_outputs``: classes (a logit each), or target values per step;
- ``task``: ``"classification"`` or ``"regression"``;
- ``precision``: a Keras dtype policy name (``float32``, ``mixed_bfloat16``...) for every
  layer but the output layer, which should stay ``float32``;
- ``stateful``: True: every recurrent layer must be stateful;

plus its own arguments, ``model.params``. It returns an uncompiled ``keras.Model`` with one
input of ``batch_shape=(batch_size, k)`` (token ids) or ``(batch_size, k, num_features)``
and one output of shape ``(batch_size, k, num_outputs)``: logits for classes
(probabilities with ``model.softmax_output=true``), values for regression. The harness
compiles it with its loss and optimizer, lays the data out, resets each row's state where
its sequence starts (any stateful Keras recurrent layer: LSTM, GRU, SimpleRNN, ConvLSTM, an
RNN around a custom cell) and measures it, exactly as it does the built-in model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from tbptt_exp.core.config import ConfigError


def load_factory(spec: str) -> Callable:
    """``module.path:function`` or ``path/to/file.py:function`` -> the function (a file is
    loaded as a module of its own, so the same file in every probe process is the same code)."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            module_name = f"tbptt_exp_factory_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
            module = sys.modules.get(module_name)
            if module is None:
                spec_ = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec_)
                spec_.loader.exec_module(module)
                sys.modules[module_name] = module
        else:
            module = importlib.import_module(target)
        factory = getattr(module, name)
    except Exception as error:  # an import runs the user's code: whatever it raises is reported, one line
        raise ConfigError("model.factory", spec, f"cannot be loaded ({type(error).__name__}: {error})") from None
    if not callable(factory):
        raise ConfigError("model.factory", spec, f"names a {type(factory).__name__}, not a function")
    return factory


def factory_source(spec: str) -> str:
    """The sha256 of the file that defines a factory (found without running it), so that a
    cached answer is never given for a model whose code changed; empty when it cannot be found."""
    target = spec.rpartition(":")[0]
    try:
        path = Path(target).expanduser() if target.endswith(".py") else Path(importlib.util.find_spec(target).origin)
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (ImportError, AttributeError, TypeError, ValueError, OSError):
        return ""



def gru_layer_norm(*, batch_size: int, k: int, vocab_size: int | None, num_features: int | None,
                   num_outputs: int, task: str, precision: str, stateful: bool,
                   units: int = 256, layers: int = 2, dropout: float = 0.0, embedding_dim: int = 64):
    """Stateful GRU layers with layer normalisation between them, a linear head per step."""
    import keras  # only when a model is built: this module is also read where TensorFlow must not load

    if vocab_size is not None:
        inputs = keras.Input(batch_shape=(batch_size, k), dtype="int32")
        x = keras.layers.Embedding(vocab_size, embedding_dim, dtype=precision)(inputs)
    else:
        x = inputs = keras.Input(batch_shape=(batch_size, k, num_features))
    for _ in range(layers):
        x = keras.layers.GRU(units, return_sequences=True, stateful=stateful, dtype=precision)(x)
        x = keras.layers.LayerNormalization(dtype=precision)(x)
        x = keras.layers.Dropout(dropout, dtype=precision)(x)
    return keras.Model(inputs, keras.layers.Dense(num_outputs, dtype="float32")(x))
