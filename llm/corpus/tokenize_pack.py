"""The tokenizer and pack steps of the corpus pipeline, on the dedup step's output (local files).

  tokenizer  SentencePiece trained on the cleaned corpus, or an existing tokenizer's files copied (a run's or a
             Hugging Face model's: config.tokenizer.path); measured on a CoNLL-U file when there is one
  pack       the corpus tokenized once into a scratch file of int32 ids, split train/validation by id hash,
             canaries planted into the training documents (llm/corpus/canaries.py; none by default), and
             packed into ArrayRecord rows (llm/data/packing.py)

`pipeline.prepare` runs them with the directories of its steps.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import tqdm

from llm import tokenizer as tokenizer_lib
from llm.corpus import canaries as canaries_lib
from llm.corpus.corpus_io import read_counts, read_documents
from llm.corpus.report import SourceTotals, source_table, word_count
from llm.data import packing
from llm.io import join, write_json

_TOKENIZE_BATCH = 256  # documents per SentencePiece batch call (which encodes on all cores)
SENTENCEPIECE_VOCAB = "tokenizer.vocab"  # The trained model's pieces and scores, for reading (published too).


def _corpus_bar(description: str, corpus_dir: str, progress: bool) -> tqdm.tqdm:
    """A progress bar over the cleaned corpus: documents, MB and ETA (its size is in the dedup counts)."""
    kept = read_counts(corpus_dir)
    total_bytes = kept.stages[next(reversed(kept.stages))].bytes_out if kept.stages else None
    return tqdm.tqdm(
        desc=description, total=total_bytes, unit="B", unit_scale=True, disable=not progress, smoothing=0.1
    )


def _corpus_texts(corpus_dir: str, bar: tqdm.tqdm) -> Iterator[str]:
    for count, document in enumerate(read_documents(corpus_dir), start=1):
        bar.update(len(document.text.encode("utf-8")))
        bar.set_postfix(documents=count, refresh=False)
        yield document.text


def eval_conllu_path(config: ml_collections.ConfigDict) -> str | None:
    """The CoNLL-U file the tokenizer is measured on, or None when the default one is not there."""
    if config.report.eval_conllu:
        return os.path.expanduser(config.report.eval_conllu)
    return tokenizer_lib.DEFAULT_UD_PATH if os.path.isfile(tokenizer_lib.DEFAULT_UD_PATH) else None


def train_corpus_tokenizer(
    config: ml_collections.ConfigDict, corpus_dir: str, tokenizer_dir: str, progress: bool
) -> dict[str, Any]:
    """Trains tokenizer.model/.vocab in `tokenizer_dir` on the corpus; returns its metrics."""
    settings = config.tokenizer
    with _corpus_bar("tokenizer", corpus_dir, progress) as bar:
        tokenizer = tokenizer_lib.train_tokenizer(
            _corpus_texts(corpus_dir, bar),
            join(tokenizer_dir, "tokenizer"),
            vocab_size=settings.vocab_size,
            model_type=settings.model_type,
            character_coverage=settings.character_coverage,
            input_sentence_size=settings.input_sentence_size,
            max_sentence_bytes=settings.max_sentence_bytes,
            seed=settings.seed,
            multiword_pieces=settings.multiword_pieces,
        )
    return _measured(config, tokenizer, {"model_type": settings.model_type})


def copy_corpus_tokenizer(config: ml_collections.ConfigDict, tokenizer_dir: str) -> dict[str, Any]:
    """Copies the files of the tokenizer config.tokenizer.path names into `tokenizer_dir`; returns its metrics."""
    source = os.path.expanduser(config.tokenizer.path)
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_lib.copy_tokenizer(source, tokenizer_dir))
    return _measured(config, tokenizer, {"source": os.path.abspath(source), "file": os.path.basename(tokenizer.path)})


def _measured(
    config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.AnyTokenizer, result: dict[str, Any]
) -> dict[str, Any]:
    """`result` with the tokenizer's vocabulary size, round trip of the Spanish characters and, on the CoNLL-U
    file when there is one, fertility and bytes per token."""
    result = {
        "vocab_size": tokenizer.vocab_size,
        **result,
        "spanish_characters_round_trip": tokenizer_lib.round_trips(tokenizer, tokenizer_lib.SPANISH_CHARACTERS),
    }
    conllu = eval_conllu_path(config)
    if conllu is None:
        logging.warning("No CoNLL-U file for the tokenizer metrics (set report.eval_conllu); not measured.")
        return {**result, "eval_text": None, "fertility": None, "bytes_per_token": None}
    texts = tokenizer_lib.conllu_texts(conllu)
    return {
        **result,
        "eval_text": os.path.basename(conllu),
        "fertility": round(tokenizer_lib.fertility(tokenizer, texts), 4),
        "bytes_per_token": round(tokenizer_lib.bytes_per_token(tokenizer, texts), 4),
    }


def _tokenize_to_file(
    tokenizer: tokenizer_lib.AnyTokenizer, corpus_dir: str, scratch: str, progress: bool
) -> tuple[list[tuple[str, int]], dict[str, SourceTotals]]:
    """Writes every document's ids to `scratch` as int32; returns (id, length) in file order and per-source
    totals. Tokenizing once keeps the split (which needs every length) from tokenizing the corpus twice."""
    lengths: list[tuple[str, int]] = []
    totals: dict[str, SourceTotals] = {}
    with open(scratch, "wb") as out, _corpus_bar("tokenize", corpus_dir, progress) as bar:
        documents = read_documents(corpus_dir)
        while chunk := list(itertools.islice(documents, _TOKENIZE_BATCH)):
            for document, ids in zip(chunk, tokenizer.encode_batch([d.text for d in chunk])):
                out.write(np.asarray(ids, dtype="<i4").tobytes())
                lengths.append((document.id, len(ids)))
                source = document.metadata.get("source", "unknown")
                licence = document.metadata.get("licence", "unknown")
                total = totals.setdefault(source, SourceTotals(licence=licence))
                size = len(document.text.encode("utf-8"))
                total.documents += 1
                total.bytes += size
                total.words += word_count(document.text)
                total.tokens += len(ids)
                bar.update(size)
            bar.set_postfix(documents=len(lengths), refresh=False)
    return lengths, totals


def pack_corpus(
    config: ml_collections.ConfigDict, corpus_dir: str, tokenizer_dir: str, pack_dir: str, progress: bool
) -> dict[str, Any]:
    """Tokenizes the corpus, splits it by id hash and packs train/ and validation/ into `pack_dir`."""
    settings = config.pack
    os.makedirs(pack_dir, exist_ok=True)
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)  # Trained here, or copied: either backend.
    scratch = join(pack_dir, ".tokens.bin")
    lengths, totals = _tokenize_to_file(tokenizer, corpus_dir, scratch, progress)
    extra = int(settings.add_bos) + int(settings.add_eos)  # tokens each document gains when packed
    validation = packing.split_train_validation(
        ((doc_id, length + extra) for doc_id, length in lengths),
        settings.seq_len,
        settings.validation_fraction,
        settings.min_validation_rows,
    )

    def tokenized() -> Iterator[tuple[str, np.ndarray]]:
        with open(scratch, "rb") as tokens:
            for doc_id, length in lengths:
                yield doc_id, np.frombuffer(tokens.read(4 * length), dtype="<i4")

    planted, canary_result = _canaries(config.canaries, tokenizer, validation, pack_dir)
    documents = canaries_lib.interleave(
        tokenized(), len(lengths), planted, config.canaries.repeats, config.canaries.seed
    )
    splits = packing.write_packed_splits(
        documents,
        pack_dir,
        settings.seq_len,
        validation,
        bos_id=tokenizer.bos_id if settings.add_bos else None,
        eos_id=tokenizer.eos_id if settings.add_eos else None,
        pad_id=tokenizer.pad_id,
        train_shards=settings.train_shards,
        validation_shards=settings.validation_shards,
    )
    os.remove(scratch)
    return {
        "tokens": sum(length for _, length in lengths),
        "splits": {
            name: {
                "documents": stats.documents,
                "rows": stats.rows,
                "tokens": stats.tokens,
                "shards": len(stats.shards),
                "packing_efficiency": round(stats.efficiency, 4),
            }
            for name, stats in splits.items()
        },
        "sources": source_table(totals),
        "canaries": canary_result,
    }


def _canaries(
    settings: ml_collections.ConfigDict, tokenizer: tokenizer_lib.AnyTokenizer, validation_ids: set[str], pack_dir: str
) -> tuple[list[tuple[str, np.ndarray]], dict[str, Any]]:
    """The planted canaries as (id, tokens) and the report's count of them; with canaries.count > 0 also writes
    canaries.json (planted and reference canaries) into `pack_dir`, atomically."""
    if settings.count == 0:
        return [], {"planted": 0}
    planted, reference = canaries_lib.draw(settings.count, settings.digits, settings.seed)
    canaries_lib.check_not_held_out(planted, settings.repeats, validation_ids)
    write_json(join(pack_dir, canaries_lib.CANARIES_FILE), canaries_lib.description(settings, planted, reference))
    tokens = [(canary.id, np.asarray(tokenizer.encode(canary.text), dtype=np.int32)) for canary in planted]
    result = {
        "planted": len(planted),
        "reference": len(reference),
        "repeats": settings.repeats,
        "digits": settings.digits,
        "documents": len(planted) * settings.repeats,
        "tokens": settings.repeats * sum(len(ids) for _, ids in tokens),
    }
    return tokens, result
