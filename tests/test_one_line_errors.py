"""Settings and data that cannot work are one line, exit 2, before anything is allocated;
so is a model too big for the device, and out-of-memory names the batch and how to find one."""

import re

import pytest
from test_cli import cli, runs

from tbptt_exp.core.config import ConfigError


@pytest.mark.parametrize("args, setting", [
    (["seed=-1"], "seed="),
    (["seed=99999999999999999999"], "seed="),
    (["data.cut=documents", "k=1000000000", "batch_size=2"], "k="),
    (["data.cut=documents", "k=200000", "batch_size=4096"], "batch_size="),
    (["data.path=short.txt"], "data.sequence_length="),
    (["data.path=short.txt", "data.cut=documents", "k=1000"], "k="),  # one file works, but not with k past its length
    (["data=key_recall", "data.num_sequences=1"], "data.num_sequences="),
    (["data.val_fraction=0"], "data.val_fraction=0.0 is not allowed: use a fraction above 0"),
    (["+trainer.lr=0.5"], "trainer.lr=0.5 is not allowed: there is no such setting; did you mean trainer.learning_rate?"),
    (["+foo=1"], "foo=1 is not allowed: there is no such setting"),
])
def test_bounds_and_tiny_data_are_one_line_before_allocating(tmp_path, args, setting):
    (tmp_path / "short.txt").write_text("a short text. " * 21)  # about 300 characters
    out = cli([*args, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"tbptt-exp: error: {setting}")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert runs(f"sqlite:///{tmp_path / 'mlflow.db'}") == []


@pytest.mark.parametrize("args, says", [
    (["k=int(interval(5,1))"], "k='int(interval(5,1))' is not allowed: `low <= high` must hold"),
    (["trainer.learning_rate=tag(log,interval(0,0.1))"], "trainer.learning_rate='tag(log,interval(0,0.1))' is not"),
    (["k=int(interval(-5,0))"], "k=-5 is not allowed: use a positive whole number"),  # every point is invalid
    (["k=choice(10,500)"], "k=500 is not allowed: use a chunk length up to data.sequence_length=200"),
    (["hydra.sweeper.sampler=grid", "k=int(interval(5,10))"], "hydra.sweeper.sampler='grid' is not allowed: a grid"),
    (["k=range(10,1)"], "k='range(10,1)' is not allowed"),
])
def test_a_search_space_that_can_only_fail_is_one_line_before_a_trial(tmp_path, args, says):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cli(["-m", "hydra/sweeper=optuna", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", *args,
               f"tracking.uri={store}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"tbptt-exp: error: {says}")
    assert len(out.stderr.strip().splitlines()) == 1 and runs(store) == [] and not (tmp_path / "optuna.db").exists()


def test_an_empty_grid_sweep_is_one_line(tmp_path):
    out = cli(["-m", "k=range(10,1)", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("tbptt-exp: error: k='range(10,1)' is not allowed: the sweep "
                                                         "has no values"), out.stderr[-2000:]


def test_files_that_cannot_be_read_are_reported_not_dropped(tmp_path):
    from tbptt_exp.core.data import read_documents

    (tmp_path / "a.txt").write_text("plain text that reads well\n" * 3)
    (tmp_path / "b.txt").write_bytes(b"text with one bad byte \xff in the middle\n" + b"and plenty more of it\n" * 9)
    (tmp_path / "c.txt").write_bytes(b"\x00\x01\x02 a binary blob")
    documents, source = read_documents(str(tmp_path), 10_000)
    assert len(documents) == 2 and "\ufffd" in documents[1]
    assert "1 file(s) skipped: c.txt (binary)" in source and "1 file(s) with invalid UTF-8 bytes" in source
    _, capped = read_documents(str(tmp_path), 50)
    assert "first 50 characters of about" in capped  # a cap says so


@pytest.mark.slow  # a whole command under a resource limit: 20-45 s here
def test_a_model_that_fits_the_host_but_not_the_device_is_one_line(tmp_path):
    """The host-memory check passes (9 GB of 24), the device runs out while building: here the
    CPU allocator under a 4 GB address-space limit stands in for a GPU's memory."""
    import resource

    limit = 4 * 2**30
    out = cli(["model.units=12000", "trainer.epochs=1", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
              cwd=tmp_path, timeout=180, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert out.returncode == 2, out.stderr[-2000:]
    said = re.match(r"tbptt-exp: error: model.units=12000 is not allowed: out of memory on CPU:0 while building the "
                    r"model; the model has ([\d,]+) parameters, about ([\d,]+) MiB .*use a smaller model", out.stderr)
    params, mib = (int(said.group(i).replace(",", "")) for i in (1, 2))
    assert 4 * 12000 * 12000 < params < 4 * 12000 * 12100 and abs(mib - params * 16 / 2**20) < 1
    assert len(out.stderr.strip().splitlines()) == 1 and runs(f"sqlite:///{tmp_path / 'mlflow.db'}") == []


def test_out_of_memory_while_training_names_the_batch_and_how_to_find_one_that_fits():
    import tensorflow as tf

    from tbptt_exp.app.jobs import out_of_memory_is_one_line
    from tbptt_exp.app.settings import RunConfig

    experiment = RunConfig(k=50, batch_size=4096)
    with pytest.raises(ConfigError) as refused, out_of_memory_is_one_line(experiment, None, "training", built=1_000_000):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[4096,50,256]")
    assert str(refused.value).startswith("batch_size=4096 is not allowed: out of memory on ")
    assert "while training; the model has 1,000,000 parameters, about 15 MiB" in str(refused.value)
    assert "python -m tbptt_exp -m sweep=max_batch k=50 finds the largest batch that fits" in str(refused.value)
    # any other TensorFlow error is left as it is
    with pytest.raises(tf.errors.InvalidArgumentError), out_of_memory_is_one_line(experiment, None, "training", built=1_000_000):
        raise tf.errors.InvalidArgumentError(None, None, "shapes do not match")
