import numpy as np
import pytest

from tbptt_exp.core.config import CharsDataConfig, KeyRecallDataConfig
from tbptt_exp.core.data import (
    FIRST_CHAR_ID,
    UNK_ID,
    chars,
    cut_text,
    embedded_text_files,
    encode,
    key_recall,
    split_tail,
)


def decode(ids, vocabulary):
    return "".join(vocabulary[i - FIRST_CHAR_ID] if i >= FIRST_CHAR_ID else "\ufffd" for i in ids)


def test_embedded_corpus_is_deterministic_and_capped():
    files = embedded_text_files()
    assert files and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    cfg = CharsDataConfig(max_chars=50_000, sequence_length=100)
    a, b = chars(cfg, seed=0), chars(cfg, seed=0)
    assert a.fingerprint == b.fingerprint and a.vocabulary == b.vocabulary
    n_val = round(50_000 * 0.1)  # the validation tail; each side in whole windows of 100 steps
    assert a.train.num_tokens == (50_000 - n_val - 1) // 100 * 100 and a.val.num_tokens == (n_val - 1) // 100 * 100
    assert "embedded" in a.source


def test_fixed_cut_targets_are_the_next_character(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "t.txt").write_text(text)
    ds = chars(CharsDataConfig(path=str(tmp_path / "t.txt"), sequence_length=30, val_fraction=0.2), seed=1)
    assert set(ds.train.lengths) == {30}
    for x, y in zip(ds.train.inputs, ds.train.targets):
        assert np.array_equal(x[1:], y[:-1])
        assert decode(x, ds.vocabulary) in text
    assert len(ds.val) == (round(len(text) * 0.2) - 1) // 30  # windows of the last 20% of the text
    assert ds.vocab_size == len(set(text)) + FIRST_CHAR_ID


def test_documents_cut_gives_one_sequence_per_file_and_the_tail_file_validates(tmp_path):
    docs = {"a.txt": "alpha " * 10, "b.md": "beta " * 30, "c.txt": "gamma " * 5, "skip.bin": "zzz"}
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    ds = chars(CharsDataConfig(path=str(tmp_path), cut="documents", val_fraction=0.15), seed=0)
    # Files in path order a, b, c (240 characters): the last 36 are b's last 6 and all of c.
    assert ds.train.lengths.tolist() == [59, 143] and ds.val.lengths.tolist() == [5, 29]
    assert "z" not in ds.vocabulary


def test_one_file_with_cut_documents_trains_on_its_head_and_validates_on_its_tail(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(1000))  # every character unique
    train, val = split_tail([text], 0.1)
    assert train == [text[:900]] and val == [text[900:]]  # one contiguous block each, in order
    (tmp_path / "novel.txt").write_text("abc " * 250)
    ds = chars(CharsDataConfig(path=str(tmp_path / "novel.txt"), cut="documents"), seed=0)
    assert ds.train.lengths.tolist() == [899] and ds.val.lengths.tolist() == [99]


@pytest.mark.parametrize("cut", ["fixed", "documents"])
def test_validation_text_never_overlaps_or_interleaves_with_training_text(cut):
    text = "".join(chr(0x4E00 + i) for i in range(3000))  # every character unique: positions are known
    documents = [text[:1200], text[1200:2100], text[2100:]]
    cfg = CharsDataConfig(cut=cut, sequence_length=50, max_sequence_length=None if cut == "fixed" else 400)
    train_docs, val_docs = split_tail(documents, 0.25)
    train, val = cut_text(train_docs, cfg, "training"), cut_text(val_docs, cfg, "validation")
    position = {c: i for i, c in enumerate(text)}
    train_at = [position[c] for piece in train for c in piece[:-1]]  # each piece's steps (its last: a target)
    val_at = [position[c] for piece in val for c in piece]
    assert max(train_at) < min(val_at) == 2250  # the last quarter, one block after all training text
    assert len(set(train_at)) == len(train_at)  # no character trained twice


def test_long_documents_are_cut_at_max_sequence_length(tmp_path):
    (tmp_path / "long.txt").write_text("x" * 1001)
    (tmp_path / "short.txt").write_text("y" * 11)
    ds = chars(CharsDataConfig(path=str(tmp_path), cut="documents", max_sequence_length=300, val_fraction=0.01), seed=0)
    assert ds.train.lengths.tolist() == [300, 300, 300, 100] and ds.val.lengths.tolist() == [9]  # the last 10 characters: 9 steps


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
