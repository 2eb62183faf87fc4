"""Packing documents into rows, the deterministic train/validation split, and the written shards."""

import numpy as np
import pytest

from llm.data import packing, records


def _rows(docs, seq_len, **kwargs):
    return [{k: v.tolist() for k, v in row.items()} for row in packing.pack_documents(docs, seq_len, **kwargs)]


def test_hand_example_segments_positions_and_masks():
    rows = _rows([[11, 12, 13], [21, 22], [31, 32, 33, 34]], seq_len=6, bos_id=2, eos_id=3, pad_id=0)
    # Wrapped: [2 11 12 13 3] (5), [2 21 22 3] (4), [2 31 32 33 34 3] (6). The second does not fit in the one
    # free slot of row 1, so row 1 is padded; the third does not fit after it, so row 2 is padded too.
    assert rows == [
        {
            "tokens": [2, 11, 12, 13, 3, 0],
            "segment_ids": [1, 1, 1, 1, 1, 0],
            "positions": [0, 1, 2, 3, 4, 0],
            "loss_mask": [0, 1, 1, 1, 1, 0],
        },
        {
            "tokens": [2, 21, 22, 3, 0, 0],
            "segment_ids": [1, 1, 1, 1, 0, 0],
            "positions": [0, 1, 2, 3, 0, 0],
            "loss_mask": [0, 1, 1, 1, 0, 0],
        },
        {
            "tokens": [2, 31, 32, 33, 34, 3],
            "segment_ids": [1, 1, 1, 1, 1, 1],
            "positions": [0, 1, 2, 3, 4, 5],
            "loss_mask": [0, 1, 1, 1, 1, 1],
        },
    ]


def test_short_documents_share_a_row():
    rows = _rows([[5, 6], [7], [8, 9, 10]], seq_len=8, pad_id=-1)
    assert rows == [
        {
            "tokens": [5, 6, 7, 8, 9, 10, -1, -1],
            "segment_ids": [1, 1, 2, 3, 3, 3, 0, 0],
            "positions": [0, 1, 0, 0, 1, 2, 0, 0],
            "loss_mask": [0, 1, 0, 0, 1, 1, 0, 0],
        },
    ]


def test_long_document_fills_the_row_and_continues_in_new_segments():
    rows = _rows([[1, 2, 3], list(range(100, 110))], seq_len=4)
    assert [r["tokens"] for r in rows] == [[1, 2, 3, 100], [101, 102, 103, 104], [105, 106, 107, 108], [109, 0, 0, 0]]
    assert [r["segment_ids"] for r in rows] == [[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    # Positions restart in every piece, and the first token of a piece is no target.
    assert [r["positions"] for r in rows] == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 2, 3], [0, 0, 0, 0]]
    assert [r["loss_mask"] for r in rows] == [[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]


def test_no_token_is_lost_and_order_is_kept():
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 1000, size=int(n)).tolist() for n in rng.integers(0, 300, size=200)]
    rows = list(packing.pack_documents(docs, 128, bos_id=2, eos_id=3))
    tokens = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows]).tolist()
    expected = [t for doc in docs for t in [2, *doc, 3]]
    assert tokens == expected
    for row in rows:
        assert all(len(row[field]) == 128 and row[field].dtype == np.int32 for field in records.FIELDS)
        # Padding is at the end only, and masks follow segments.
        real = row["segment_ids"] > 0
        assert not np.any(real[np.argmin(real) :]) or real.all()
        starts = np.r_[True, row["segment_ids"][1:] != row["segment_ids"][:-1]] & real
        assert np.all(row["loss_mask"][starts] == 0) and np.all(row["loss_mask"][real & ~starts] == 1)
        assert np.all(row["positions"][starts] == 0)
    again = list(packing.pack_documents(docs, 128, bos_id=2, eos_id=3))
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(rows, again, strict=True))


def test_empty_documents_are_skipped_and_bad_seq_len_rejected():
    assert _rows([[], [], [4]], seq_len=2) == [
        {"tokens": [4, 0], "segment_ids": [1, 0], "positions": [0, 0], "loss_mask": [0, 0]}
    ]
    assert _rows([], seq_len=4) == []
    with pytest.raises(ValueError, match="seq_len"):
        list(packing.pack_documents([[1]], seq_len=1))


def test_split_is_deterministic_by_id_and_respects_the_fraction():
    docs = [(f"doc-{i}", 50) for i in range(20_000)]
    validation = packing.split_train_validation(docs, seq_len=100, validation_fraction=0.01, min_validation_rows=1)
    assert 150 < len(validation) < 250
    # Same ids in another order, plus unrelated documents: the same decision for every id.
    shuffled = docs[::-1] + [(f"other-{i}", 50) for i in range(1000)]
    again = packing.split_train_validation(shuffled, seq_len=100, validation_fraction=0.01, min_validation_rows=1)
    assert {d for d in again if d.startswith("doc-")} == validation


def test_split_takes_more_documents_to_reach_the_minimum_rows():
    docs = [(f"doc-{i}", 30) for i in range(100)]
    validation = packing.split_train_validation(docs, seq_len=100, validation_fraction=0.0, min_validation_rows=2)
    assert len(validation) == 7  # 7 * 30 >= 2 * 100 tokens
    # The extra documents are those with the lowest hash: a re-run with more documents keeps them unless
    # a new lower-hash one arrives.
    assert validation == packing.split_train_validation(docs[::-1], 100, 0.0, 2)
    with pytest.raises(ValueError, match="min_validation_rows"):
        packing.split_train_validation(docs[:3], seq_len=100, validation_fraction=0.0, min_validation_rows=2)


def test_write_packed_splits_writes_both_splits_and_reports_efficiency(tmp_path):
    rng = np.random.default_rng(1)
    docs = [(f"d{i}", rng.integers(8, 500, size=int(rng.integers(1, 60))).tolist()) for i in range(300)]
    validation = packing.split_train_validation(((i, len(t)) for i, t in docs), 32, 0.05, min_validation_rows=4)
    stats = packing.write_packed_splits(
        iter(docs), str(tmp_path), 32, validation, bos_id=2, eos_id=3, train_shards=3, validation_shards=1
    )
    read = {}
    for split in ("train", "validation"):
        rows = [row for path in records.shard_paths(str(tmp_path / split)) for row in records.iterate_shard(path)]
        read[split] = rows
        assert stats[split].rows == len(rows) and len(stats[split].shards) == (3 if split == "train" else 1)
        assert stats[split].tokens == sum(int((r["segment_ids"] > 0).sum()) for r in rows)
        assert stats[split].efficiency == pytest.approx(stats[split].tokens / (32 * len(rows)))
        assert 0.5 < stats[split].efficiency <= 1.0
        assert stats[split].as_dict()["packing_efficiency"] == stats[split].efficiency
    assert stats["validation"].documents == len(validation) and stats["validation"].rows >= 4
    assert stats["train"].documents + stats["validation"].documents == len(docs)
    # Every token of every document landed in its split (documents <= 59 tokens + bos/eos fit a row).
    total = sum(len(t) + 2 for _, t in docs)
    assert stats["train"].tokens + stats["validation"].tokens == total
    valid_tokens = sorted(t for i, d in docs if i in validation for t in d)
    got = sorted(t for r in read["validation"] for t in r["tokens"][r["segment_ids"] > 0] if t > 3)
    assert got == valid_tokens


def test_write_packed_splits_refuses_an_empty_split_before_writing(tmp_path):
    with pytest.raises(ValueError, match="validation"):
        packing.write_packed_splits(iter([("a", [5, 6, 7])]), str(tmp_path), 8, validation_ids=set())
    assert not (tmp_path / "validation").exists()
