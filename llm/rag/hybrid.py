"""Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009) of ranked lists, such as BM25's and the
vector index's results for one query.

An item's fused score is the sum over the lists that hold it of weight / (k + rank), ranks counted from 1; k = 60
is the paper's constant, which damps the weight of the very first ranks so that no single list dominates. The
weights are 1 in the paper; a list known to be weaker gets less (llm/rag/calibration.py measures how much).
Fusion needs only ranks, not scores, so BM25 scores and cosines need no common scale. Ties (equal fused
scores) are broken deterministically: the better best rank in any list first, then the earlier list in which
that best rank occurs (which settles every tie: one list holds one item per rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

RRF_K = 60
# Candidates each method contributes to a hybrid search (at least k): deep enough that a passage ranked well by
# one method and modestly by the other still gets both contributions.
HYBRID_DEPTH = 100


@dataclasses.dataclass(frozen=True)
class Fused:
    """One item of the fused ranking: its fused score and its rank (from 1) in each list, None where absent."""

    item: Hashable
    score: float
    ranks: tuple[int | None, ...]


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Hashable]], k: int = RRF_K, weights: Sequence[float] | None = None
) -> list[Fused]:
    """All items of `rankings` (each list best first, without repeats), best fused score first; `weights` (one
    per list, default 1) scale each list's contributions."""
    if k < 0:
        raise ValueError(f"the RRF constant k must be >= 0, got {k}")
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings) or any(weight < 0 for weight in weights):
        raise ValueError(f"need one weight >= 0 per ranked list ({len(rankings)}), got {weights}")
    ranks: dict[Hashable, list[int | None]] = {}
    for list_index, ranking in enumerate(rankings):
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"ranked list {list_index} holds an item twice")
        for rank, item in enumerate(ranking, start=1):
            ranks.setdefault(item, [None] * len(rankings))[list_index] = rank
    # Summed in a fixed order (largest first): the same contributions from other lists give a bit-identical
    # score, a true tie.
    fused = [
        Fused(
            item,
            sum(sorted((w / (k + r) for w, r in zip(weights, found) if r is not None), reverse=True)),
            tuple(found),
        )
        for item, found in ranks.items()
    ]

    def tie_break(entry: Fused) -> tuple:
        best = min(r for r in entry.ranks if r is not None)
        return (-entry.score, best, entry.ranks.index(best))

    return sorted(fused, key=tie_break)
