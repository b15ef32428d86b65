"""Model factories for the tests: every kind of stateful recurrent layer Keras has, and models
the harness must refuse. Each follows the contract of ``tbptt_exp/core/factories.py``."""

import keras


def _inputs(batch_size, k, vocab_size, num_features):
    if vocab_size is not None:
        tokens = keras.Input(batch_shape=(batch_size, k), dtype="int32")
        return tokens, keras.layers.Embedding(vocab_size, 8)(tokens)
    features = keras.Input(batch_shape=(batch_size, k, num_features))
    return features, features


class MinimalCell(keras.layers.Layer):
    """A custom recurrent cell (Keras's own example): one state of ``units`` per row."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.state_size = units, units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform")
        self.recurrent = self.add_weight(shape=(self.units, self.units), initializer="orthogonal")

    def call(self, inputs, states):
        output = keras.ops.tanh(keras.ops.matmul(inputs, self.kernel) + keras.ops.matmul(states[0], self.recurrent))
        return output, [output]


def recurrent(kind, units, stateful):
    if kind == "cell":
        return keras.layers.RNN(MinimalCell(units), return_sequences=True, stateful=stateful)
    layer = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "simple": keras.layers.SimpleRNN}[kind]
    return layer(units, return_sequences=True, stateful=stateful)


def stack(*, batch_size, k, vocab_size, num_features, num_outputs, task, precision, stateful, cells="lstm", units=16):
    """Recurrent layers named by ``cells`` ("lstm", "gru", "simple", "cell", joined by "+")."""
    inputs, x = _inputs(batch_size, k, vocab_size, num_features)
    for kind in cells.split("+"):
        x = recurrent(kind, units, stateful)(x)
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(x))


def conv_lstm(*, batch_size, k, vocab_size, num_features, num_outputs, task, precision, stateful, filters=4):
    """A ConvLSTM1D over the features of each step: its state is (rows, width, filters)."""
    inputs = keras.Input(batch_shape=(batch_size, k, num_features))
    x = keras.layers.Reshape((k if k else -1, num_features, 1))(inputs)
    x = keras.layers.ConvLSTM1D(filters, 3, padding="same", return_sequences=True, stateful=stateful)(x)
    x = keras.layers.Reshape((k if k else -1, num_features * filters))(x)
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(x))


def no_recurrence(*, batch_size, k, vocab_size, num_features, num_outputs, **_):
    inputs, x = _inputs(batch_size, k, vocab_size, num_features)
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(x))


def not_stateful(*, batch_size, k, vocab_size, num_features, num_outputs, **_):
    inputs, x = _inputs(batch_size, k, vocab_size, num_features)
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(keras.layers.GRU(8, return_sequences=True)(x)))


def bidirectional(*, batch_size, k, vocab_size, num_features, num_outputs, **_):
    inputs, x = _inputs(batch_size, k, vocab_size, num_features)
    x = keras.layers.Bidirectional(keras.layers.GRU(8, return_sequences=True, stateful=True))(x)
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(x))


def wrong_output(*, batch_size, k, vocab_size, num_features, num_outputs, **_):
    inputs, x = _inputs(batch_size, k, vocab_size, num_features)
    x = keras.layers.GRU(8, stateful=True)(x)  # one output per sequence, not per step
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(x))


def wrong_batch(*, batch_size, k, vocab_size, num_features, num_outputs, **_):
    inputs = keras.Input(batch_shape=(batch_size * 2, k, num_features))
    x = keras.layers.GRU(8, return_sequences=True, stateful=True)(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(x))


class RunningSum(keras.layers.Layer):
    """Keeps a per-row running sum in a variable of its own: state the harness cannot reset."""

    def build(self, input_shape):
        self.total = self.add_weight(shape=(input_shape[0], input_shape[-1]), initializer="zeros", trainable=False)

    def call(self, inputs):
        self.total.assign(self.total + keras.ops.sum(inputs, axis=1))
        return inputs + keras.ops.expand_dims(self.total, 1)


def hidden_state(*, batch_size, k, vocab_size, num_features, num_outputs, **_):
    inputs, x = _inputs(batch_size, k, vocab_size, num_features)
    x = RunningSum()(keras.layers.GRU(8, return_sequences=True, stateful=True)(x))
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(x))


def raises(**_):
    raise RuntimeError("the team's model is not finished")
