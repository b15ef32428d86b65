"""TBPTT layout invariants, property-tested over random corpora, k, B, padding and reset.

Every real token is given a unique id, so each check can say exactly which token went where.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbptt_exp.core.config import Padding, Reset
from tbptt_exp.core.layout import Corpus, build_layout, epoch_order

PADDINGS, RESETS = list(Padding), list(Reset)


def unique_corpus(lengths):
    """Sequence i holds consecutive unique ids; its targets are the same ids + 1,000,000."""
    inputs, targets, next_id = [], [], 1
    for n in lengths:
        ids = np.arange(next_id, next_id + n, dtype=np.int32)
        inputs.append(ids)
        targets.append(ids + 1_000_000)
        next_id += n
    return Corpus(inputs, targets)


layouts = st.fixed_dictionaries(
    {
        "lengths": st.lists(st.integers(1, 60), min_size=1, max_size=25),
        "k": st.integers(1, 12),
        "batch_size": st.integers(1, 8),
        "padding": st.sampled_from(PADDINGS),
        "reset": st.sampled_from(RESETS),
        "seed": st.integers(0, 3),
    }
)


def make(case):
    corpus = unique_corpus(case["lengths"])
    order = epoch_order(len(corpus), case["seed"], epoch=1)
    if case["padding"] == "drop" and len(corpus) < case["batch_size"]:
        with pytest.raises(ValueError, match="no sequence fits"):
            build_layout(corpus, case["k"], case["batch_size"], "drop", case["reset"], order)
        return corpus, None
    return corpus, build_layout(corpus, case["k"], case["batch_size"], case["padding"], case["reset"], order)


@settings(max_examples=300, deadline=None)
@given(layouts)
def test_shapes_and_weights_mark_exactly_the_real_tokens(case):
    _corpus, lay = make(case)
    if lay is None:
        return
    n, b, k = lay.inputs.shape
    assert (b, k) == (case["batch_size"], case["k"])
    assert lay.targets.shape == lay.sample_weights.shape == (n, b, k)
    assert lay.reset.shape == (n, b)
    real = lay.sample_weights == 1
    assert np.all((lay.sample_weights == 0) | real)
    # Padded steps carry token 0 and weight 0; real steps are never 0.
    assert np.all((lay.inputs != 0) == real)
    assert np.all((lay.targets != 0) == real)
    assert lay.real_tokens + lay.padded_tokens == n * b * k


@settings(max_examples=300, deadline=None)
@given(layouts)
def test_every_real_token_trained_exactly_once_per_epoch(case):
    corpus, lay = make(case)
    if lay is None:
        return
    trained = lay.inputs[lay.sample_weights == 1]
    kept = [s for s, _, _ in lay.placements]
    expected = np.concatenate([lay.sequences.inputs[s] for s in kept])
    assert len(trained) == len(np.unique(trained)) == len(expected)
    assert set(trained.tolist()) == set(expected.tolist())
    # Inputs and targets stay paired.
    assert np.all(lay.targets[lay.sample_weights == 1] == lay.inputs[lay.sample_weights == 1] + 1_000_000)
    if case["padding"] == "drop":
        assert lay.dropped_sequences == len(corpus) % case["batch_size"]
    else:
        assert lay.dropped_sequences == 0 and len(trained) == corpus.num_tokens
        assert case["padding"] == "stream" or len(kept) == len(corpus)


@settings(max_examples=300, deadline=None)
@given(layouts)
def test_row_of_next_batch_continues_the_same_stream(case):
    """Each sequence (a piece, for streams) sits in one row, chunk after chunk, in consecutive batches."""
    _corpus, lay = make(case)
    if lay is None:
        return
    k = case["k"]
    for s, row, first in lay.placements:
        x = lay.sequences.inputs[s]
        n_chunks = -(-len(x) // k)
        stream = lay.inputs[first : first + n_chunks, row].reshape(-1)
        assert np.array_equal(stream[: len(x)], x)
        assert np.all(stream[len(x) :] == 0)  # the rest of the last chunk is padding


@settings(max_examples=300, deadline=None)
@given(layouts)
def test_reset_flags_sit_exactly_at_sequence_starts(case):
    _corpus, lay = make(case)
    if lay is None:
        return
    starts = np.zeros_like(lay.reset)
    starts[0, :] = True
    for _, row, first in lay.placements:
        if case["padding"] in ("pack", "stream"):
            starts[first, row] = True
        else:  # a group starts all its rows together, dummy rows included
            starts[first, :] = True
    if case["reset"] == "sequence":
        assert np.array_equal(lay.reset, starts)
    elif case["reset"] == "chunk":
        assert lay.reset.all()
    else:
        assert lay.reset[0].all() and not lay.reset[1:].any()


@settings(max_examples=200, deadline=None)
@given(layouts)
def test_no_row_is_overwritten(case):
    """Placements in one row never overlap: a stream holds one sequence at a time."""
    _corpus, lay = make(case)
    if lay is None:
        return
    k = case["k"]
    occupied = np.zeros(lay.reset.shape, dtype=int)
    for s, row, first in lay.placements:
        occupied[first : first + -(-len(lay.sequences.inputs[s]) // k), row] += 1
    assert occupied.max() <= 1


def test_dummy_is_the_classic_recipe():
    """N fixed-length sequences, B not dividing N: dummy rows fill the last group."""
    corpus = unique_corpus([100] * 10)
    lay = build_layout(corpus, k=25, batch_size=4, padding="dummy", reset="sequence")
    assert lay.n_batches == 3 * 4  # 3 groups of 4 chunks
    assert lay.dummy_rows == 2
    assert np.array_equal(np.flatnonzero(lay.reset.all(axis=1)), [0, 4, 8])
    assert lay.sample_weights[8:, 2:].sum() == 0  # the two dummy rows of the last group


def test_pack_needs_no_divisibility_and_pads_only_stream_ends():
    corpus = unique_corpus([50] * 10)  # k divides every length
    lay = build_layout(corpus, k=25, batch_size=4, padding="pack", reset="sequence")
    assert lay.n_batches == 6  # 10 sequences x 2 chunks over 4 streams: 3 streams of 3, ...
    assert lay.padded_tokens == 2 * 2 * 25  # two streams end two chunks early
    dummy = build_layout(corpus, k=25, batch_size=4, padding="dummy", reset="sequence")
    assert lay.padded_tokens == dummy.padded_tokens  # equal lengths: the same two row-ends


def test_pack_balances_variable_lengths_better_than_dummy():
    rng = np.random.default_rng(0)
    corpus = unique_corpus(rng.integers(5, 400, size=200).tolist())
    pack = build_layout(corpus, 20, 16, "pack")
    dummy = build_layout(corpus, 20, 16, "dummy")
    assert pack.real_tokens == dummy.real_tokens == corpus.num_tokens
    assert pack.padding_waste < dummy.padding_waste / 2


@settings(max_examples=300, deadline=None)
@given(layouts.filter(lambda case: case["padding"] == "stream") | st.fixed_dictionaries({
    "lengths": st.lists(st.integers(1, 60), min_size=1, max_size=25), "k": st.integers(1, 12),
    "batch_size": st.integers(1, 8), "padding": st.just("stream"), "reset": st.sampled_from(RESETS),
    "seed": st.integers(0, 3)}))
def test_streams_carry_the_text_in_order_row_after_row(case):
    """Row r of batch b+1 continues row r of batch b for the whole epoch: reading the rows
    one after the other gives back the text in epoch order; resets only where a document
    starts (reset=sequence) or at the epoch's start."""
    corpus, lay = make(case)
    order = epoch_order(len(corpus), case["seed"], epoch=1)
    text = np.concatenate([corpus.inputs[s] for s in order])
    rows = lay.inputs.transpose(1, 0, 2).reshape(lay.batch_size, -1)
    weights = lay.sample_weights.transpose(1, 0, 2).reshape(lay.batch_size, -1)
    assert np.array_equal(np.concatenate([row[w == 1] for row, w in zip(rows, weights)]), text)
    per_row = -(-sum(-(-n // case["k"]) for n in case["lengths"]) // case["batch_size"])
    assert lay.n_batches == per_row  # B equal parts
    if case["reset"] == "sequence":  # a reset where a document starts, or where a row starts
        doc_starts = {int(corpus.inputs[s][0]) for s in range(len(corpus))}
        for b in range(lay.n_batches):
            for r in range(lay.batch_size):
                first = lay.inputs[b, r, 0]
                assert lay.reset[b, r] == (b == 0 or (lay.sample_weights[b, r, 0] == 1 and int(first) in doc_starts))


def test_one_long_text_is_cut_into_batch_size_contiguous_streams_as_batchify_does():
    lay = build_layout(unique_corpus([1000]), k=10, batch_size=4, padding="stream", reset="sequence")
    assert lay.n_batches == 25 and lay.padded_tokens == 0
    assert lay.reset[0].all() and not lay.reset[1:].any()  # carried for the whole epoch
    assert [int(lay.inputs[0, r, 0]) for r in range(4)] == [1, 251, 501, 751]


def test_epoch_order_shuffles_between_epochs_and_is_reproducible():
    assert np.array_equal(epoch_order(50, 3, 0), epoch_order(50, 3, 0))
    assert not np.array_equal(epoch_order(50, 3, 0), epoch_order(50, 3, 1))
    assert np.array_equal(epoch_order(50, 3, 1, shuffle=False), np.arange(50))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be a positive"),
        ({"batch_size": -1}, "batch_size must be positive"),
        ({"padding": "zeros"}, "padding='zeros' is not one of dummy, drop, pack, stream"),
        ({"reset": "always"}, "reset='always' is not one of sequence, chunk, never"),
    ],
)
def test_bad_arguments_say_what_is_allowed(kwargs, message):
    args = {"k": 5, "batch_size": 2, "padding": "dummy", "reset": "sequence"} | kwargs
    with pytest.raises(ValueError, match=message):
        build_layout(unique_corpus([10, 10]), **args)
