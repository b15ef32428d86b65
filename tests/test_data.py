import numpy as np
import pytest

from tbptt_exp.core.config import CharsDataConfig, KeyRecallDataConfig
from tbptt_exp.core.data import FIRST_CHAR_ID, UNK_ID, chars, embedded_text_files, encode, key_recall


def decode(ids, vocabulary):
    return "".join(vocabulary[i - FIRST_CHAR_ID] if i >= FIRST_CHAR_ID else "\ufffd" for i in ids)


def test_embedded_corpus_is_deterministic_and_capped():
    files = embedded_text_files()
    assert files and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    cfg = CharsDataConfig(max_chars=50_000, sequence_length=100)
    a, b = chars(cfg, seed=0), chars(cfg, seed=0)
    assert a.fingerprint == b.fingerprint and a.vocabulary == b.vocabulary
    assert a.train.num_tokens + a.val.num_tokens == (50_000 - 1) // 100 * 100
    assert "embedded" in a.source


def test_fixed_cut_targets_are_the_next_character(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "t.txt").write_text(text)
    ds = chars(CharsDataConfig(path=str(tmp_path / "t.txt"), sequence_length=30, val_fraction=0.2), seed=1)
    assert set(ds.train.lengths) == {30}
    for x, y in zip(ds.train.inputs, ds.train.targets):
        assert np.array_equal(x[1:], y[:-1])
        assert decode(x, ds.vocabulary) in text
    assert len(ds.val) == round((len(text) - 1) // 30 * 0.2)
    assert ds.vocab_size == len(set(text)) + FIRST_CHAR_ID


def test_documents_cut_gives_one_sequence_per_file(tmp_path):
    docs = {"a.txt": "alpha " * 10, "b.md": "beta " * 30, "c.txt": "gamma " * 5, "skip.bin": "zzz"}
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    ds = chars(CharsDataConfig(path=str(tmp_path), cut="documents", val_fraction=0.34), seed=0)
    lengths = sorted(np.concatenate([ds.train.lengths, ds.val.lengths]).tolist())
    assert lengths == sorted(len(t) - 1 for n, t in docs.items() if not n.endswith(".bin"))
    assert "z" not in ds.vocabulary


def test_characters_outside_the_vocabulary_map_to_unknown():
    ids = encode("abca\u00e9", ["a", "b"])
    assert ids.tolist() == [2, 3, UNK_ID, 2, UNK_ID]


@pytest.mark.parametrize("setup, message", [
    (lambda p: str(p / "missing"), "use an existing text file or folder"),
    (lambda p: (p / "e.txt").write_bytes(b"\xff\xfe\xfa") and str(p), "holds no readable UTF-8 text"),
])
def test_bad_paths_say_what_is_wrong(tmp_path, setup, message):
    with pytest.raises(ValueError, match=message):
        chars(CharsDataConfig(path=setup(tmp_path)), seed=0)


def test_key_recall_targets_are_the_opening_key():
    cfg = KeyRecallDataConfig(num_sequences=40, sequence_length=12, num_keys=3, num_noise_tokens=5)
    ds = key_recall(cfg, seed=3)
    for x, y in zip(ds.train.inputs + ds.val.inputs, ds.train.targets + ds.val.targets):
        assert 1 <= x[0] <= 3 and np.all(y == x[0])
        assert np.all((x[1:] > 3) & (x[1:] < ds.vocab_size))
    assert len(ds.val) == 10
    assert key_recall(cfg, seed=3).fingerprint == ds.fingerprint != key_recall(cfg, seed=4).fingerprint
