"""Contrastive (sentence-embedder) data: (query, positive, negative?) triples -> one record per example
(records.encode_triple), from a pairs JSONL file or mined from a corpus without labels.

Each text becomes one row as the embedder encodes it (llm/rag/embeddings.py): BOS, the prefix
(`train.query_prefix` for queries, `train.passage_prefix` for passages) and the text, cut to `seq_len` keeping
its start; segment id 1 on its tokens, 0 on padding. The prefixes go into report.json, and training refuses a
run whose prefixes differ (llm/train/inputs.py).

Pairs JSONL: one `{"query": str, "positive": str, "negative": str (optional)}` per line. A bad line is an
error naming file, line and key (`on_error="raise"`) or a counted drop (`on_error="skip"`: `pairs.bad_json`,
`pairs.bad_pair`).

Besides the records, DIR/validation_pairs.jsonl holds the validation split's pairs as text, one
`{"id", "query", "positive", "negative"?}` per line, to measure a trained embedder on pairs it never trained on
(`scripts/evaluate.py --tasks=retrieval --retrieval_pairs=DIR/validation_pairs.jsonl`).

Mining (inverse cloze, Lee et al. 2019): in every paragraph of at least two sentences of the corpus
pipeline's JSONL shards (or text and Markdown files), one sentence, drawn with a seed, is the query and the
rest of the paragraph its positive; under a Markdown heading, the heading is also a query for its section.

Evaluation data are never trained on: a text overlapping the XQuAD-es contexts or questions
(`EvalOverlap`) drops its example when mining; in a pairs file it is an error unless `drop_eval_overlap`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from llm.data import decontamination, records
from llm.eval import tasks
from llm.finetune_data.sft import (
    Drops,
    check_output_dir,
    read_jsonl,
    split_ids,
    start_writing,
    write_jsonl,
    write_report,
)
from llm.io import SourceError
from llm.rag.documents import read_documents, sections
from llm.rag.sentences import sentence_spans
from llm.tokenizer import AnyTokenizer, load_tokenizer

NGRAM = decontamination.DEFAULT_NGRAM  # Words per n-gram of the overlap check (GPT-3's decontamination used 13).
MIN_SENTENCE_WORDS = 4  # Shorter sentences ("Sí.", a title) are too common to mark a text as evaluation data.
KEYS = ("query", "positive", "negative")
VALIDATION_PAIRS_FILE = "validation_pairs.jsonl"  # the held-out pairs as text: scripts/evaluate.py --retrieval_pairs
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n")  # As llm/rag/passages.py splits paragraphs.


@dataclasses.dataclass(frozen=True)
class Example:
    query: str
    positive: str
    negative: str | None = None


class EvalOverlap:
    """Whether a text contains a 13-word sequence of evaluation texts, or the whole of one of their short
    sentences or questions (4 to 12 words), compared as `decontamination.words` (NFC, case-folded, accents kept,
    punctuation ignored); the 13-grams are the corpus pipeline's and the SFT/DPO builders' `NgramIndex`.

    Exact checks are cheap (a set look-up per window of the text) and have no threshold to tune: what is
    refused is a copy of evaluation text, the contamination that inflates retrieval scores. The 13-grams
    (GPT-3's decontamination) catch a copied stretch wherever sentence boundaries fall; the short sentences
    catch what has no 13-gram, such as a question copied into a query. Paraphrases pass, as in any n-gram
    decontamination.
    """

    def __init__(self, texts: Iterable[str]):
        texts = list(texts)
        self.index = decontamination.NgramIndex({"xquad_es": texts}, NGRAM)
        self.short: set[tuple[str, ...]] = set()
        for text in texts:
            keys = {
                tuple(decontamination.words(text[start:end])) for start, end in [(0, len(text)), *sentence_spans(text)]
            }
            self.short.update(key for key in keys if MIN_SENTENCE_WORDS <= len(key) < NGRAM)
        self._short_lengths = sorted({len(key) for key in self.short})

    def overlaps(self, text: str) -> bool:
        if self.index.match(text) is not None:
            return True
        words = tuple(decontamination.words(text))
        return any(
            words[i : i + length] in self.short
            for length in self._short_lengths
            for i in range(len(words) - length + 1)
        )


@functools.cache
def xquad_overlap(data_dir: str = tasks.DEFAULT_DATA_DIR) -> EvalOverlap:
    """The overlap check against every XQuAD-es context and question (the retrieval and RAG evaluations)."""
    articles = tasks.read_xquad(tasks.data_file(data_dir, tasks.XQUAD_FILE))
    examples = [example for article in articles for example in article]
    return EvalOverlap({text for example in examples for text in (example.context, example.question)})


def read_pairs(path: str, drops: Drops) -> Iterator[tuple[str, str, Example]]:
    """("file name:line" id, "path:line" location, example) for every usable line of a pairs JSONL file."""
    for line, record in read_jsonl(path, drops, "pairs.bad_json"):
        where = f"{path}:{line}"
        bad = [key for key in KEYS if not _is_text(record.get(key), optional=key == "negative")]
        if bad:
            drops.reject(where, "pairs.bad_pair", f'"{bad[0]}" must be a non-empty string')
            continue
        negative = record.get("negative")
        yield f"{os.path.basename(path)}:{line}", where, Example(record["query"], record["positive"], negative)


def _is_text(value: Any, optional: bool) -> bool:
    return (optional and value is None) or (isinstance(value, str) and bool(value.strip()))


def mine_pairs(corpus: str, seed: int, drops: Drops) -> Iterator[tuple[str, str, Example]]:
    """(id, location, example): inverse-cloze pairs of every paragraph, and heading -> section pairs of
    Markdown; a paragraph of a single sentence gives none (`mine.single_sentence`)."""
    for document in read_documents(corpus):
        for section in sections(document):
            body = document.text[section.start : section.end].strip()
            if section.headings:
                yield f"{document.source}@{section.start}", document.source, Example(section.headings[-1], body)
            for index, paragraph in enumerate(p.strip() for p in _PARAGRAPH_BREAK.split(body)):
                where = f"{document.source}@{section.start}#{index}"
                spans = sentence_spans(paragraph)
                if len(spans) < 2:
                    drops.count(where, "mine.single_sentence")
                    continue
                # Seeded by the paragraph's place, so a pair does not depend on the order files are read in.
                start, end = random.Random(f"{seed}:{where}").choice(spans)
                rest = f"{paragraph[:start].rstrip()} {paragraph[end:].lstrip()}".strip()
                yield where, where, Example(paragraph[start:end], rest)


def encode_text(tokenizer: AnyTokenizer, prefix: str, text: str, seq_len: int) -> list[int]:
    """The ids the embedder reads for a text (Embedder.encode): BOS, prefix and text, cut to seq_len."""
    return ([tokenizer.bos_id] + tokenizer.encode(prefix + text))[:seq_len]


def text_row(ids: list[int], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One text as a row of the four records.FIELDS; no next-token loss (loss_mask 0)."""
    row = {name: np.zeros(seq_len, np.int32) for name in records.FIELDS}
    row["tokens"][:] = pad_id
    row["tokens"][: len(ids)] = ids
    row["segment_ids"][: len(ids)] = 1
    row["positions"][: len(ids)] = np.arange(len(ids))
    return row


Tokenized = tuple[list[int], list[int], list[int] | None]


def _tokenize(tokenizer: AnyTokenizer, example: Example, prefixes: Mapping[str, str], seq_len: int) -> Tokenized:
    query = encode_text(tokenizer, prefixes["query"], example.query, seq_len)
    positive = encode_text(tokenizer, prefixes["passage"], example.positive, seq_len)
    negative = None
    if example.negative is not None:
        negative = encode_text(tokenizer, prefixes["passage"], example.negative, seq_len)
    return query, positive, negative


def _overlapping_key(example: Example, overlap: EvalOverlap) -> str | None:
    return next((key for key in KEYS if getattr(example, key) and overlap.overlaps(getattr(example, key))), None)


def _collect(
    examples: Iterable[tuple[str, str, Example]], mined: bool, drop_eval_overlap: bool, drops: Drops
) -> list[tuple[str, Example]]:
    """The examples that do not overlap evaluation data; an overlap is counted (`eval_overlap`), or for a
    pairs file without `drop_eval_overlap` an error naming the line and the key."""
    overlap, kept = xquad_overlap(), []
    for example_id, where, example in examples:
        key = _overlapping_key(example, overlap)
        if key is None:
            kept.append((example_id, example))
        elif mined or drop_eval_overlap:
            drops.count(where, "eval_overlap")
        else:
            raise SourceError(
                f"{where}: the {key!r} text overlaps the XQuAD-es evaluation data (a shared sentence or "
                f"{NGRAM}-word sequence); evaluation data must not be trained on. Remove it, or pass "
                "--drop_eval_overlap to drop such pairs."
            )
    return kept


def prepare_pairs(
    source: str,
    tokenizer_path: str,
    output_dir: str,
    seq_len: int,
    *,
    mine: bool = False,
    seed: int = 0,
    query_prefix: str = "consulta: ",
    passage_prefix: str = "pasaje: ",
    drop_eval_overlap: bool = False,
    on_error: str = "raise",
    validation_fraction: float = 0.05,
    min_validation_pairs: int = 1,
    train_shards: int = 1,
    validation_shards: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes triple records to DIR/train/ and DIR/validation/, the tokenizer's files and DIR/report.json.

    `source` is a pairs JSONL file, or with `mine` a corpus file or directory. The validation split takes
    examples by a hash of their id, at least `min_validation_pairs` of them (set it to the batch size).
    """
    drops = Drops("skip" if mine else on_error)
    check_output_dir(output_dir, overwrite)
    tokenizer = load_tokenizer(tokenizer_path)
    examples = mine_pairs(source, seed, drops) if mine else read_pairs(source, drops)
    kept = _collect(examples, mine, drop_eval_overlap, drops)
    if not kept:
        raise ValueError(f"{source}: no usable pair (drops: {dict(drops.counts)}).")
    prefixes = {"query": query_prefix, "passage": passage_prefix}
    tokenized = {example_id: _tokenize(tokenizer, example, prefixes, seq_len) for example_id, example in kept}
    validation_ids = split_ids([(i, 1) for i in tokenized], 1, validation_fraction, min_validation_pairs, "pairs")
    members = {
        "train": [ids for i, ids in tokenized.items() if i not in validation_ids],
        "validation": [ids for i, ids in tokenized.items() if i in validation_ids],
    }
    if not members["train"]:
        raise ValueError(f"{source}: every one of the {len(kept)} pairs went to validation; lower the minimum.")
    tokenizer_copy = start_writing(output_dir, tokenizer_path)
    write_jsonl(
        [_pair_record(i, example) for i, example in kept if i in validation_ids],
        os.path.join(output_dir, VALIDATION_PAIRS_FILE),
    )
    splits = {}
    for split, shards in (("train", train_shards), ("validation", validation_shards)):
        paths = records.write_shards(
            members[split],
            os.path.join(output_dir, split),
            shards,
            encode=lambda ids: records.encode_triple(
                *(None if side is None else text_row(side, seq_len, tokenizer.pad_id) for side in ids)
            ),
        )
        splits[split] = {"pairs": len(members[split]), "shards": len(paths)}
    report = {
        "format": "contrastive",
        ("corpus" if mine else "input"): source,
        **({"seed": seed} if mine else {}),
        "tokenizer": tokenizer_copy,
        "seq_len": seq_len,
        "prefixes": prefixes,
        "pairs": _pair_counts(tokenized.values(), drops, seq_len),
        "drops": drops.as_dict(),
        "splits": splits,
        "validation_pairs": VALIDATION_PAIRS_FILE,
    }
    write_report(output_dir, report)
    return report


def _pair_record(example_id: str, example: Example) -> dict[str, str]:
    """A pair as text, before prefixes and tokenization, under the id its split was chosen by."""
    record = {"id": example_id, "query": example.query, "positive": example.positive}
    return record if example.negative is None else {**record, "negative": example.negative}


def _pair_counts(tokenized: Iterable[Tokenized], drops: Drops, seq_len: int) -> dict[str, Any]:
    tokenized = list(tokenized)
    lengths = {key: [len(ids[i]) for ids in tokenized if ids[i] is not None] for i, key in enumerate(KEYS)}
    return {
        "kept": len(tokenized),
        "with_negative": len(lengths["negative"]),
        # Texts that fill their row: cut to seq_len (their start kept), or exactly that long.
        "texts_at_seq_len": sum(length >= seq_len for values in lengths.values() for length in values),
        "eval_overlap_dropped": drops.counts["eval_overlap"],
        "mean_tokens": {key: round(float(np.mean(values)), 1) for key, values in lengths.items() if values},
    }
