"""Perplexity and bits-per-byte on held-out text, and the unigram baseline they are compared against.

Bits-per-byte is the total negative log-likelihood of the text in bits divided by its UTF-8 bytes, so it
compares models with different tokenizers; perplexity is exp(mean NLL per token) and only compares models
that share a tokenizer. Each document is scored from a bos token, as training documents start; the eos
that training appends is not scored (it is not text). Documents longer than the context are scored in
windows of half the context, each window reading up to the full context before it.

The unigram baseline is a model that ignores context: token frequencies counted over the run's training
shards (the tokens it was trained to predict, loss_mask == 1) with add-one smoothing, scored on exactly
the same tokens of the same text.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from llm.data import records
from llm.eval.scoring import TokenRequest
from llm.tokenizer import Tokenizer

# Reading every shard of a billion-token corpus would take longer than the evaluation; the first 50M
# tokens estimate unigram frequencies to far better precision than the report prints.
DEFAULT_MAX_UNIGRAM_TOKENS = 50_000_000


def read_text_documents(path: str) -> list[str]:
    """The documents of a plain-text file: paragraphs separated by blank lines, NFC-normalized.

    The blank lines between paragraphs are separators, not text: they are not counted in the bytes.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Text file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}).") from error
    documents = [part.strip("\n") for part in re.split(r"\n(?:[ \t]*\n)+", unicodedata.normalize("NFC", text))]
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise ValueError(f"{path}: no text to evaluate (the file is empty or only whitespace).")
    return documents


def rolling_requests(token_ids: Sequence[int], bos_id: int, max_len: int) -> list[TokenRequest]:
    """Requests that together score every token of a document once, from bos, within the context.

    Windows of max_len // 2 tokens; each has all the tokens before it as context (the scorer keeps the
    last ones that fit), so every token after the first window sees at least half a context of history.
    """
    tokens = [bos_id] + list(token_ids)
    window = max(1, max_len // 2)
    return [(tokens[:start], tokens[start : start + window]) for start in range(1, len(tokens), window)]


@dataclasses.dataclass(frozen=True)
class TextScore:
    """Negative log-likelihood of a text, with the sizes that normalize it."""

    nll_nats: float
    tokens: int
    bytes: int
    documents: int

    @property
    def bpb(self) -> float:
        return self.nll_nats / math.log(2) / self.bytes

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_nats / self.tokens)


def score_text(
    score_tokens: Callable[[Sequence[TokenRequest]], list[float]],
    tokenizer: Tokenizer,
    documents: Sequence[str],
    max_len: int,
) -> TextScore:
    """Scores every token of every document with `score_tokens` (e.g. `Scorer.score_tokens`)."""
    token_lists = [ids for ids in tokenizer.encode_batch(documents) if ids]
    requests = [request for ids in token_lists for request in rolling_requests(ids, tokenizer.bos_id, max_len)]
    if not requests:
        raise ValueError("score_text needs at least one non-empty document.")
    return TextScore(
        nll_nats=-float(sum(score_tokens(requests))),
        tokens=sum(len(ids) for ids in token_lists),
        bytes=sum(len(unicodedata.normalize("NFC", text).encode("utf-8")) for text in documents),
        documents=len(token_lists),
    )


@dataclasses.dataclass(frozen=True)
class UnigramModel:
    """Context-free token model: add-one smoothed frequencies over a vocabulary."""

    counts: np.ndarray  # (vocab_size,) int64 occurrences in the training data

    @classmethod
    def fit(
        cls, rows: Iterable[Mapping[str, np.ndarray]], vocab_size: int, max_tokens: int = DEFAULT_MAX_UNIGRAM_TOKENS
    ) -> UnigramModel:
        """Counts the training targets (loss_mask == 1) of packed rows, up to about `max_tokens` of them."""
        counts = np.zeros(vocab_size, np.int64)
        for row in rows:
            targets = row["tokens"][row["loss_mask"] == 1]
            if targets.size and targets.max() >= vocab_size:
                raise ValueError(
                    f"Token id {int(targets.max())} in the training rows is outside the vocabulary "
                    f"of {vocab_size}: the shards were made with another tokenizer."
                )
            counts += np.bincount(targets, minlength=vocab_size)
            if counts.sum() >= max_tokens:
                break
        if not counts.any():
            raise ValueError("No training tokens to fit the unigram model on (every loss_mask is 0).")
        return cls(counts)

    @classmethod
    def from_shards(cls, split_dir: str, vocab_size: int, max_tokens: int = DEFAULT_MAX_UNIGRAM_TOKENS) -> UnigramModel:
        """Fits on the ArrayRecord shards of one split directory (e.g. DATA/train)."""
        rows = (row for path in records.shard_paths(split_dir) for row in records.iterate_shard(path))
        return cls.fit(rows, vocab_size, max_tokens)

    def log_probs(self) -> np.ndarray:
        """log p(token) in nats: (count + 1) / (total + vocab_size)."""
        return np.log(self.counts + 1.0) - math.log(self.counts.sum() + self.counts.size)

    def score_tokens(self, requests: Sequence[TokenRequest]) -> list[float]:
        """Same interface as `Scorer.score_tokens`: the context is ignored, which is the point."""
        log_probs = self.log_probs()
        return [float(log_probs[np.asarray(continuation, np.int64)].sum()) for _, continuation in requests]
