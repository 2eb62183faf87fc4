"""The Grain loader: deterministic, checkpointable, and strict about the layout its state belongs to."""

import numpy as np
import pytest
from conftest import write_dataset

from llm.data import loader


def _iterator(path, **overrides):
    args = dict(seq_len=32, batch_size=4, seed=0)
    args.update(overrides)
    return loader.TrainIterator(str(path / "train"), **args)


def test_same_seed_same_batches_and_state_resumes_the_stream(tmp_path):
    write_dataset(tmp_path)
    first = _iterator(tmp_path)
    for _ in range(3):
        next(first)
    state = first.get_state()
    expected = [next(first)["tokens"] for _ in range(3)]
    resumed = _iterator(tmp_path)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], want)


def test_batches_have_every_field_and_repeat_past_one_epoch(tmp_path):
    write_dataset(tmp_path, train_rows=8)
    iterator = _iterator(tmp_path)
    epochs = [np.concatenate([next(iterator)["tokens"] for _ in range(2)]) for _ in range(2)]
    batch = next(iterator)
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == np.int32
    # Each epoch sees every row once, in a new order.
    assert sorted(map(tuple, epochs[0])) == sorted(map(tuple, epochs[1]))
    assert not np.array_equal(epochs[0], epochs[1])


def test_processes_read_disjoint_rows(tmp_path):
    write_dataset(tmp_path, train_rows=16)
    rows = [
        {tuple(r) for _ in range(2) for r in next(it)["tokens"]}
        for it in (_iterator(tmp_path, process_index=i, process_count=2) for i in range(2))
    ]
    assert not rows[0] & rows[1]


def test_state_from_another_worker_count_is_refused(tmp_path):
    write_dataset(tmp_path)
    state = _iterator(tmp_path).get_state()
    state["layout"]["num_workers"] = 2
    with pytest.raises(ValueError, match="num_workers"):
        _iterator(tmp_path).set_state(state)


def test_wrong_sequence_length_names_the_shard(tmp_path):
    write_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"data-00000-of-00002.array_record.*have length 32.*seq_len is 64"):
        _iterator(tmp_path, seq_len=64)


def test_missing_split_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader.validation_batches(str(tmp_path / "validation"), 32, 4, 2)
