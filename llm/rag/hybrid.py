"""Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009) of ranked lists, such as BM25's and the
vector index's results for one query.

An item's fused score is the sum over the lists that hold it of 1 / (k + rank), ranks counted from 1; k = 60
is the paper's constant, which damps the weight of the very first ranks so that no single list dominates.
Fusion needs only ranks, not scores, so BM25 scores and cosines need no common scale. Ties (equal fused
scores) are broken deterministically: the better best rank in any list first, then the earlier list in which
that best rank occurs (which settles every tie: one list holds one item per rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

RRF_K = 60


@dataclasses.dataclass(frozen=True)
class Fused:
    """One item of the fused ranking: its fused score and its rank (from 1) in each list, None where absent."""

    item: Hashable
    score: float
    ranks: tuple[int | None, ...]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k: int = RRF_K) -> list[Fused]:
    """All items of `rankings` (each list best first, without repeats), best fused score first."""
    if k < 0:
        raise ValueError(f"the RRF constant k must be >= 0, got {k}")
    ranks: dict[Hashable, list[int | None]] = {}
    for list_index, ranking in enumerate(rankings):
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"ranked list {list_index} holds an item twice")
        for rank, item in enumerate(ranking, start=1):
            ranks.setdefault(item, [None] * len(rankings))[list_index] = rank
    # Summed over sorted ranks: the same ranks in other lists give a bit-identical score, a true tie.
    fused = [
        Fused(item, sum(1.0 / (k + r) for r in sorted(filter(None, found))), tuple(found))
        for item, found in ranks.items()
    ]

    def tie_break(entry: Fused) -> tuple:
        best = min(r for r in entry.ranks if r is not None)
        return (-entry.score, best, entry.ranks.index(best))

    return sorted(fused, key=tie_break)
