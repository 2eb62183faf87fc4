"""Accounting of the corpus pipeline and the `report.json` that `scripts/prepare_data.py` writes.

Every document that enters the pipeline leaves every stage either kept or dropped with a reason, so for
each stage `documents_in == documents_out + sum(dropped)`, each stage takes in what the previous one let
out, and overall `documents_in == kept + sum(all drops)`. `Accounts` is mergeable: workers (processes or
Beam bundles) count their share and the totals are the merge, whatever the split.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from llm.corpus.document import Document, Dropped

_MB = 1e6
DECONTAMINATE = "decontaminate"  # the decontaminate step's accounting stage


class AccountingError(AssertionError):
    """The counts do not add up: some document was neither kept nor dropped with a reason."""


def word_count(text: str) -> int:
    """Whitespace-separated words: the unit of the report's word counts."""
    return len(text.split())


@dataclasses.dataclass
class StageCount:
    """What went in and out of one stage. `seconds` is CPU time summed over workers (varies run to run)."""

    documents_in: int = 0
    documents_out: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bytes_out: int = 0
    words_out: int = 0
    seconds: float = 0.0

    def merge(self, other: StageCount) -> None:
        self.documents_in += other.documents_in
        self.documents_out += other.documents_out
        self.dropped.update(other.dropped)
        self.bytes_out += other.bytes_out
        self.words_out += other.words_out
        self.seconds += other.seconds


class Accounts:
    """Per-stage counts of documents, drop reasons, sizes and PII replacements, in pipeline order."""

    def __init__(self, stage_names: Sequence[str]):
        if len(set(stage_names)) != len(stage_names):
            raise ValueError(f"Stage names must be unique, got {list(stage_names)}.")
        self.stages: dict[str, StageCount] = {name: StageCount() for name in stage_names}
        self.pii: collections.Counter = collections.Counter()

    def record(self, stage: str, result: Document | Dropped, seconds: float = 0.0) -> None:
        """Counts one document going through `stage` with `result` (the document it let out, or the drop)."""
        count = self.stages[stage]
        count.documents_in += 1
        count.seconds += seconds
        if isinstance(result, Dropped):
            count.dropped[result.reason] += 1
        else:
            count.documents_out += 1
            count.bytes_out += len(result.text.encode("utf-8"))
            count.words_out += word_count(result.text)

    def add_pii(self, counts: Mapping[str, int]) -> None:
        self.pii.update(counts)

    def merge(self, other: Accounts) -> Accounts:
        if list(other.stages) != list(self.stages):
            raise ValueError(f"Cannot merge accounts of stages {list(other.stages)} into {list(self.stages)}.")
        for name, count in other.stages.items():
            self.stages[name].merge(count)
        self.pii.update(other.pii)
        return self

    def extend(self, other: Accounts) -> Accounts:
        """Appends the stages of a later pipeline step (e.g. dedup after the per-document stages)."""
        overlap = set(self.stages) & set(other.stages)
        if overlap:
            raise ValueError(f"Stages {sorted(overlap)} are counted twice.")
        merged = Accounts([*self.stages, *other.stages])
        for name, count in [*self.stages.items(), *other.stages.items()]:
            merged.stages[name].merge(count)
        merged.pii.update(self.pii)
        merged.pii.update(other.pii)
        return merged

    @property
    def documents_in(self) -> int:
        return next(iter(self.stages.values())).documents_in if self.stages else 0

    @property
    def documents_kept(self) -> int:
        return next(reversed(self.stages.values())).documents_out if self.stages else 0

    @property
    def documents_dropped(self) -> int:
        return sum(sum(count.dropped.values()) for count in self.stages.values())

    def check(self) -> None:
        """Raises AccountingError unless every document is kept or dropped with a reason."""
        previous_name, previous_out = None, None
        for name, count in self.stages.items():
            dropped = sum(count.dropped.values())
            if count.documents_in != count.documents_out + dropped:
                raise AccountingError(
                    f"Stage {name!r}: {count.documents_in} documents in, but {count.documents_out} out "
                    f"+ {dropped} dropped."
                )
            if previous_out is not None and count.documents_in != previous_out:
                raise AccountingError(
                    f"Stage {name!r} took in {count.documents_in} documents but stage {previous_name!r} "
                    f"let out {previous_out}."
                )
            previous_name, previous_out = name, count.documents_out
        if self.documents_in != self.documents_kept + self.documents_dropped:
            raise AccountingError(
                f"{self.documents_in} documents in != {self.documents_kept} kept + {self.documents_dropped} dropped."
            )

    def counts(self) -> dict[str, Any]:
        """The deterministic part (no timings): what two runs on the same input must agree on."""
        return {
            "stages": {
                name: {
                    "documents_in": count.documents_in,
                    "documents_out": count.documents_out,
                    "dropped": dict(sorted(count.dropped.items())),
                    "bytes_out": count.bytes_out,
                    "words_out": count.words_out,
                }
                for name, count in self.stages.items()
            },
            "pii": dict(sorted(self.pii.items())),
        }

    def to_json(self) -> dict[str, Any]:
        data = self.counts()
        for name, count in self.stages.items():
            data["stages"][name]["seconds"] = count.seconds
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Accounts:
        accounts = cls(list(data["stages"]))
        for name, fields in data["stages"].items():
            count = accounts.stages[name]
            count.documents_in = fields["documents_in"]
            count.documents_out = fields["documents_out"]
            count.dropped = collections.Counter(fields["dropped"])
            count.bytes_out = fields["bytes_out"]
            count.words_out = fields["words_out"]
            count.seconds = fields.get("seconds", 0.0)
        accounts.pii = collections.Counter(data["pii"])
        return accounts


@dataclasses.dataclass
class SourceTotals:
    """Size of one source's share of the final corpus (filled while tokenizing it)."""

    licence: str
    documents: int = 0
    bytes: int = 0
    words: int = 0
    tokens: int = 0


def source_table(totals: Mapping[str, SourceTotals]) -> list[dict[str, Any]]:
    """The report's `sources` list, one entry per source, sorted by name."""
    return [
        {
            "source": name,
            "licence": total.licence,
            "documents": total.documents,
            "mb": round(total.bytes / _MB, 3),
            "words": total.words,
            "tokens": total.tokens,
        }
        for name, total in sorted(totals.items())
    ]


def decontamination_summary(accounts: Accounts, result: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the corpus was decontaminated, against which sets (their n-gram counts) and the drops per set."""
    if not result["enabled"]:
        return {"enabled": False}
    dropped = accounts.stages[DECONTAMINATE].dropped
    eval_sets = {
        name: {"ngrams": ngrams, "dropped": dropped[f"{DECONTAMINATE}.{name}"]}
        for name, ngrams in result["eval_sets"].items()
    }
    return {"enabled": True, "ngram": result["ngram"], "dropped": sum(dropped.values()), "eval_sets": eval_sets}


def build_report(
    accounts: Accounts,
    *,
    tokenizer: Mapping[str, Any],
    packed: Mapping[str, Any],
    seq_len: int,
    corpus_shards: int,
    elapsed_seconds: Mapping[str, float],
    runner: str,
    decontamination: Mapping[str, Any],
    canaries: Mapping[str, Any],
) -> dict[str, Any]:
    """Assembles report.json from the corpus accounts and the tokenizer and pack steps' results.

    Checks the accounting first, so a report never hides a lost document.
    """
    accounts.check()
    stages = [
        {
            "name": name,
            "documents_in": count.documents_in,
            "documents_out": count.documents_out,
            "dropped": dict(sorted(count.dropped.items(), key=lambda item: (-item[1], item[0]))),
            "mb_out": round(count.bytes_out / _MB, 3),
            "words_out": count.words_out,
            "cpu_seconds": round(count.seconds, 3),
        }
        for name, count in accounts.stages.items()
    ]
    counts = list(accounts.stages.values())
    read, kept = counts[0], counts[-1]
    splits = packed["splits"]
    rows = sum(split["rows"] for split in splits.values())
    return {
        "documents": {
            "in": accounts.documents_in,
            "kept": accounts.documents_kept,
            "dropped": accounts.documents_dropped,
        },
        "mb": {"in": round(read.bytes_out / _MB, 3), "out": round(kept.bytes_out / _MB, 3)},
        "words": {"in": read.words_out, "out": kept.words_out},
        "stages": stages,
        "pii": dict(sorted(accounts.pii.items())),
        "corpus": {"documents": accounts.documents_kept, "tokens": packed["tokens"], "shards": corpus_shards},
        "tokenizer": dict(tokenizer),
        "packing": {
            "seq_len": seq_len,
            "vocab_size": tokenizer["vocab_size"],
            "rows": rows,
            "shards": sum(split["shards"] for split in splits.values()),
            "packing_efficiency": round(sum(split["tokens"] for split in splits.values()) / (rows * seq_len), 4),
            "splits": dict(splits),
        },
        "decontamination": decontamination_summary(accounts, decontamination),
        "canaries": dict(canaries),  # planted canaries (llm/corpus/canaries.py); they are not corpus documents
        "sources": list(packed["sources"]),
        "elapsed_seconds": {name: round(seconds, 2) for name, seconds in elapsed_seconds.items()},
        "runner": runner,
    }
