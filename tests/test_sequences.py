"""Your own sequences: arrays and tables read into the same corpora, targets weighted where
they belong, standardised by training data only, bad data stopped in one line."""

import numpy as np
import pandas as pd
import pytest
from test_cli import cli, runs

from tbptt_exp.core.config import ArraysDataConfig, ConfigError, DataTask, TableDataConfig
from tbptt_exp.core.data import load_dataset
from tbptt_exp.core.dataset import baselines
from tbptt_exp.core.layout import build_layout

RNG = np.random.default_rng(5)
LENGTHS = [7, 12, 9, 15, 11, 8]


def ragged(lengths=LENGTHS, features=3):
    """Sequences of float features and float per-step targets, each step's values unique."""
    x = [RNG.normal(size=(n, features)).astype(np.float32) for n in lengths]
    y = [RNG.normal(size=n) for n in lengths]
    return x, y


def assert_same_corpus(a, b):
    assert len(a) == len(b)
    for name in ("inputs", "targets"):
        for u, v in zip(getattr(a, name), getattr(b, name)):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)
    for i in range(len(a)):
        np.testing.assert_array_equal(a.weight(i), b.weight(i))


def test_a_3d_x_a_ragged_x_with_lengths_and_a_table_give_the_same_sequences(tmp_path):
    x, y = ragged(lengths=[10] * 6)
    np.savez(tmp_path / "cube.npz", x=np.stack(x), y=np.stack(y))
    np.savez(tmp_path / "flat.npz", x=np.concatenate(x), y=np.concatenate(y), lengths=[10] * 6)
    rows = [{"id": f"s{i}", "t": t, "a": f[0], "b": f[1], "c": f[2], "target": v}
            for i, (seq, ys) in enumerate(zip(x, y)) for t, (f, v) in enumerate(zip(seq, ys))]
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=1)  # rows shuffled: the time column orders them
    frame = frame.sort_values("id", kind="stable")  # ...and sequences keep their order of first appearance
    frame.to_csv(tmp_path / "table.csv", index=False)
    frame.to_parquet(tmp_path / "table.parquet", index=False)
    cube = load_dataset(ArraysDataConfig(path=str(tmp_path / "cube.npz")), 0)
    flat = load_dataset(ArraysDataConfig(path=str(tmp_path / "flat.npz")), 0)
    for name in ("table.csv", "table.parquet"):
        table = load_dataset(TableDataConfig(path=str(tmp_path / name), sequence_column="id", time_column="t",
                                             target_column="target"), 0)
        for other in (cube, flat):
            assert_same_corpus(table.train, other.train)
            assert_same_corpus(table.val, other.val)
    assert cube.io.task == DataTask.regression and cube.io.num_features == 3 and len(cube.val) == 1
    # A ragged 3-D x: sequences padded to the longest, their lengths given.
    x, y = ragged()
    cube = np.zeros((6, max(LENGTHS), 3), np.float32)
    targets = np.zeros((6, max(LENGTHS)))
    for i, (seq, ys) in enumerate(zip(x, y)):
        cube[i, :len(seq)], targets[i, :len(seq)] = seq, ys
    np.savez(tmp_path / "padded.npz", x=cube, y=targets, lengths=LENGTHS)
    np.savez(tmp_path / "ragged.npz", x=np.concatenate(x), y=np.concatenate(y), lengths=LENGTHS)
    padded = load_dataset(ArraysDataConfig(path=str(tmp_path / "padded.npz")), 0)
    assert_same_corpus(padded.train, load_dataset(ArraysDataConfig(path=str(tmp_path / "ragged.npz")), 0).train)
    assert padded.train.lengths.tolist() == LENGTHS[:5]


def labelled_by_sequence(tmp_path, n=9):
    """n sequences, each labelled with its own class (label = index), one label per sequence."""
    x, _ = ragged(lengths=RNG.integers(3, 23, n).tolist())
    np.savez(tmp_path / "seq.npz", x=np.concatenate(x), y=np.arange(n), lengths=[len(s) for s in x])
    return load_dataset(ArraysDataConfig(path=str(tmp_path / "seq.npz"), val_fraction=0.2, num_classes=n), 0)


@pytest.mark.parametrize("padding", ["dummy", "drop", "pack", "stream"])
def test_per_sequence_targets_weigh_only_at_each_sequences_last_step_in_every_padding(tmp_path, padding):
    dataset = labelled_by_sequence(tmp_path)
    assert dataset.targets_per_sequence and dataset.io.task == DataTask.classification
    corpus = dataset.train
    lay = build_layout(corpus, 4, 3, padding, "sequence")
    kept = {int(lay.sequences.targets[s][0]) for s in lay.placements[:, 0]}  # drop leaves some out
    # Each row's steps in order; a stream's rows continue one another, so they are read as one.
    labels = lay.targets.transpose(1, 0, 2).reshape(lay.batch_size, -1)
    weights = lay.sample_weights.transpose(1, 0, 2).reshape(lay.batch_size, -1)
    real = lay.real.transpose(1, 0, 2).reshape(lay.batch_size, -1)
    streams = [(labels.reshape(-1), weights.reshape(-1), real.reshape(-1))] if padding == "stream" else \
        list(zip(labels, weights, real))
    weighted = {}
    for label, weight, is_real in streams:
        for label_value in np.unique(label[is_real]):
            steps = np.flatnonzero(is_real & (label == label_value))
            assert weight[steps[:-1]].sum() == 0  # no earlier step of the sequence weighs anything
            weighted[int(label_value)] = weighted.get(int(label_value), 0) + weight[steps[-1]]
    assert set(weighted) == kept and all(w == 1.0 for w in weighted.values())
    assert lay.sample_weights.sum() == len(kept)  # one weighted step per sequence, padding none


def test_standardisation_uses_training_rows_only(tmp_path):
    x, y = ragged(lengths=[20] * 10)
    x[-1][5, 1] = 1e6  # a planted outlier in the last sequence: validation
    np.savez(tmp_path / "d.npz", x=np.concatenate(x), y=np.concatenate(y), lengths=[20] * 10)
    dataset = load_dataset(ArraysDataConfig(path=str(tmp_path / "d.npz"), val_fraction=0.1), 0)
    training = np.concatenate(x[:9])
    np.testing.assert_allclose(dataset.normalization["feature_mean"], training.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(dataset.normalization["feature_std"], training.std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(dataset.normalization["target_mean"], [np.concatenate(y[:9]).mean()], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(dataset.train.inputs).mean(axis=0), 0, atol=1e-5)
    assert np.abs(dataset.val.inputs[0]).max() > 1e4  # the outlier is still there, standardised like the rest


def test_nan_targets_weigh_nothing_and_are_counted(tmp_path):
    x, y = ragged(lengths=[10] * 4)
    y[0][[2, 7]] = np.nan
    np.savez(tmp_path / "d.npz", x=np.concatenate(x), y=np.concatenate(y), lengths=[10] * 4)
    dataset = load_dataset(ArraysDataConfig(path=str(tmp_path / "d.npz")), 0)
    assert dataset.train.weight(0).tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 1, 1]
    assert np.isfinite(np.concatenate(dataset.train.targets)).all()
    assert "2 missing (NaN) target(s): weight 0" in dataset.source


def test_accuracy_rmse_and_mae_against_hand_computed_values():
    from tbptt_exp.core.dataset import ModelIO
    from tbptt_exp.core.model import Head

    classes = Head(ModelIO(DataTask.classification, 3))
    logits = np.array([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)  # predicts 0, 1, 2
    sums = np.asarray(classes.sums(np.array([[0, 2, 2]]), logits, np.array([[1.0, 1.0, 0.0]], np.float32),
                                   classes.loss(reduction="none")))
    assert sums[1] == 2 and sums[2] == 1  # weight 2 (the third step weighs nothing), one of them right
    assert classes.figures(sums)["accuracy"] == 0.5
    values = Head(ModelIO(DataTask.regression, 2), target_scale=np.array([2.0, 10.0]))
    predicted = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
    targets = np.array([[[0.0, 1.0], [0.0, 0.5]]], np.float32)
    sums = np.asarray(values.sums(targets, predicted, np.array([[1.0, 1.0]], np.float32), values.loss(reduction="none")))
    figures = values.figures(sums)
    # Errors in the targets' units: (2, -10) and (0, -5) -> squared 4, 100, 0, 25 over 4 values.
    assert figures["rmse"] == pytest.approx(np.sqrt((4 + 100 + 0 + 25) / 4))
    assert figures["mae"] == pytest.approx((2 + 10 + 0 + 5) / 4)
    assert figures["loss"] == pytest.approx(((1 + 1) / 2 + (0 + 0.25) / 2) / 2)  # standardised MSE per step


def test_baselines_are_the_majority_class_and_the_better_naive_regression_guess(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((12, 1), np.float32), y=[0, 1, 1, 1, 2, 1, 0, 0, 1, 2, 2, 1],
             lengths=[4, 4, 4])
    classes = load_dataset(ArraysDataConfig(path=str(tmp_path / "c.npz"), val_fraction=0.3), 0)
    assert baselines(classes) == {"accuracy": 0.5, "kind": "majority class"}  # class 1 in training; validation 1,2,2,1
    steps = np.array([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # a ramp: the previous step is off by 1, the mean by more
    np.savez(tmp_path / "r.npz", x=np.zeros((10, 1), np.float32), y=steps)
    ramp = load_dataset(ArraysDataConfig(path=str(tmp_path / "r.npz"), val_fraction=0.2, normalize=False), 0)
    scores = baselines(ramp)  # validation: the tail 8, 9; training mean 3.5; previous steps (none before 8), 8
    assert scores["kind"] == "previous step"
    assert scores["rmse"] == pytest.approx(np.sqrt(((8 - 3.5) ** 2 + 1) / 2)) and scores["mae"] == pytest.approx((4.5 + 1) / 2)


BAD = {
    "nan feature": (lambda p: np.savez(p / "d.npz", x=np.where(np.arange(40)[:, None] == 17, np.nan, 1.0) * np.ones((40, 3)),
                                       y=np.zeros(40)), [],
                    ["feature 0 holds 1 NaN or infinite value(s), the first at sequence 0, step 17"]),
    "inf in a column": (lambda p: pd.DataFrame({"a": [1.0, np.inf, 2, 3, 4], "y": [0, 1, 0, 1, 0]}).to_csv(p / "d.csv"),
                        ["data=table", "data.target_column=y"], ["column 'a' holds 1 NaN or infinite value(s)"]),
    "missing column": (lambda p: pd.DataFrame({"a": [1.0] * 5, "y": [0] * 5}).to_csv(p / "d.csv"),
                       ["data=table", "data.target_column=label"], ["data.target_column='label'", "its columns"]),
    "text feature": (lambda p: pd.DataFrame({"a": ["x"] * 5, "y": [0] * 5}).to_csv(p / "d.csv"),
                     ["data=table", "data.target_column=y", "data.feature_columns=[a]"], ["'a'", "is not numeric"]),
    "lengths": (lambda p: np.savez(p / "d.npz", x=np.ones((40, 2)), y=np.zeros(40), lengths=[20, 10]), [],
                ["'lengths' sum to 30 steps but 'x' has 40"]),
    "target count": (lambda p: np.savez(p / "d.npz", x=np.ones((40, 2)), y=np.zeros(7), lengths=[20, 20]), [],
                     ["holds 7 targets, which fits neither its 40 steps nor its 2 sequences"]),
    "negative class": (lambda p: np.savez(p / "d.npz", x=np.ones((40, 2)), y=np.array([0, -1] * 20)), [],
                       ["class id -1 is negative or not whole"]),
    "fractional class": (lambda p: np.savez(p / "d.npz", x=np.ones((40, 2)), y=np.array([0.0, 1.5] * 20)),
                         ["data.task=classification"], ["class id 1.5 is negative or not whole"]),
    "one sequence, one label": (lambda p: np.savez(p / "d.npz", x=np.ones((40, 2)), y=[1]), [],
                                ["a validation split needs 2 sequences or more"]),
    "empty table": (lambda p: (p / "d.csv").write_text("a,y\n"), ["data=table", "data.target_column=y"],
                    ["the table has no rows"]),
    "empty arrays": (lambda p: np.savez(p / "d.npz", x=np.zeros((0, 2)), y=np.zeros(0)), [], ["'x' array is empty"]),
    "pickled": (lambda p: np.savez(p / "d.npz", x=np.array([object()] * 4), y=np.zeros(4)), [],
                ["without pickle"]),
    # Bad targets blame the data, not a setting they would surface in later (no NumPy warning either).
    "infinite target": (lambda p: np.savez(p / "d.npz", x=RNG.normal(size=(40, 2)),
                                           y=np.where(np.arange(40) == 17, np.inf, RNG.normal(size=40))), [],
                        ["its targets hold 1 infinite value(s), the first at sequence 0, step 17", "NaN marks a missing"]),
    "infinite target in a column": (lambda p: pd.DataFrame({"a": RNG.normal(size=6), "y": [0.5, 1, -np.inf, 2, 3, 1]})
                                    .to_csv(p / "d.csv", index=False),
                                    ["data=table", "data.target_column=y"], ["infinite value(s), the first at data row 3"]),
    "stray class id": (lambda p: np.savez(p / "d.npz", x=RNG.normal(size=(40, 2)), lengths=[20, 20],
                                          y=np.where(np.arange(40) == 25, 1_000_000_000, np.arange(40) % 2)), [],
                       ["class id 1,000,000,000 at sequence 1, step 5 would make 1,000,000,001 classes",
                        "only 3 distinct id(s) appear"]),
    "one class": (lambda p: np.savez(p / "d.npz", x=RNG.normal(size=(40, 2)), y=np.zeros(40, np.int64)), [],
                  ["its training targets hold one class only (id 0): a classifier has nothing to learn"]),
    "every validation target missing": (lambda p: np.savez(p / "d.npz", x=RNG.normal(size=(40, 2)), lengths=[20, 20],
                                                           y=np.where(np.arange(40) < 20, RNG.normal(size=40), np.nan)),
                                        ["data.val_fraction=0.5"], ["its validation sequences hold no known target"]),
}


def bad_data_args(tmp_path, case) -> list[str]:
    """The command-line settings of a ``BAD`` case, its file written in ``tmp_path``."""
    make, args, _ = BAD[case]
    make(tmp_path)
    data = [a for a in args if a.startswith("data=")] or ["data=arrays"]
    path = tmp_path / ("d.csv" if data == ["data=table"] else "d.npz")
    return [*data, f"data.path={path}", *[a for a in args if not a.startswith("data=")], "k=5"]


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_data_is_refused_in_one_line_that_names_it_with_no_warning(tmp_path, case):
    """The job's own data check (``train.prepare``, before a run is recorded) on the settings
    Hydra composes from the command line, warnings made errors: a NumPy warning fails it."""
    import warnings

    from hydra import compose, initialize_config_dir

    from tbptt_exp.app.preflight.did_you_mean import to_experiment
    from tbptt_exp.core.train import prepare
    from tbptt_exp.paths import conf_dir

    args = bad_data_args(tmp_path, case)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        composed = compose("config", overrides=args)
    with warnings.catch_warnings(), pytest.raises(ConfigError) as refused:
        warnings.simplefilter("error")
        prepare(to_experiment(composed))  # some settings check the file as they are built
    line = str(refused.value)
    assert line.startswith("data.") and "\n" not in line
    for text in BAD[case][2]:
        assert text in line, line


# The command on three of them (arrays, a table, bad targets that NumPy would warn about):
# a data error is exit 2, one line on stderr, and no run recorded.
@pytest.mark.parametrize("case", ["nan feature", "inf in a column", "infinite target"])
def test_bad_data_is_one_line_exit_2_and_no_run(tmp_path, case):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    out = cli([*bad_data_args(tmp_path, case), f"tracking.uri={store}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("tbptt-exp: error: data.")
    for text in BAD[case][2]:
        assert text in out.stderr, out.stderr
    assert runs(store) == []


def test_the_embedded_examples_load_and_say_what_they_are():
    arrays = load_dataset(ArraysDataConfig(), 0)
    assert not arrays.targets_per_sequence and arrays.io.num_features == 4 and arrays.io.num_outputs == 3
    table = load_dataset(TableDataConfig(), 0)
    assert table.targets_per_sequence and "embedded example" in table.source
    with pytest.raises(ConfigError, match=r"^data.target_column='label' is not allowed: names a column of your own"):
        TableDataConfig(target_column="label")


def test_integer_ids_of_one_value_per_step_are_tokens_for_an_embedding(tmp_path):
    ids = RNG.integers(0, 50, 400)
    np.savez(tmp_path / "t.npz", x=ids, y=(ids % 3), lengths=[100] * 4)
    dataset = load_dataset(ArraysDataConfig(path=str(tmp_path / "t.npz")), 0)
    assert dataset.io.tokens and dataset.io.vocab_size == ids.max() + 2 and dataset.io.num_outputs == 3
    np.testing.assert_array_equal(np.concatenate(dataset.train.inputs), ids[:300] + 1)  # id 0 is padding
    assert dataset.step_name == "tokens" and not dataset.normalization


def test_a_data_file_that_is_not_there_says_so(tmp_path):
    for cls, name in ((TableDataConfig, "d.parquet"), (ArraysDataConfig, "d.npz")):
        with pytest.raises(ConfigError, match=r"is not allowed: there is no such file or folder; use the path of"):
            cls(path=str(tmp_path / name), **({"target_column": "y"} if cls is TableDataConfig else {}))


def test_class_ids_numbered_densely_past_the_sparse_limit_still_load(tmp_path):
    ids = np.arange(3000) % 1500  # 1,500 classes, each present: a vocabulary, not a stray id
    np.savez(tmp_path / "v.npz", x=RNG.normal(size=(3000, 2)), y=ids, lengths=[1500, 1500])
    assert load_dataset(ArraysDataConfig(path=str(tmp_path / "v.npz"), val_fraction=0.5), 0).io.num_outputs == 1500
