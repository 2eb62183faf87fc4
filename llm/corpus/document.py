"""The unit every corpus stage passes along: a document, or the reason it was dropped."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of the corpus.

    `id` is unique and stable across runs (e.g. "fortunes-es:refranes:17"); `metadata` carries at least
    `source` (where it came from, e.g. the Debian package) and `licence`.
    """

    id: str
    text: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def replace(self, **changes: Any) -> Document:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Dropped:
    """A document removed by a stage; `reason` is a short stable key such as "quality.too_few_words"."""

    id: str
    reason: str


# A per-document stage: returns the (possibly rewritten) document, or Dropped with the reason.
DocumentStage = Callable[[Document], "Document | Dropped"]
