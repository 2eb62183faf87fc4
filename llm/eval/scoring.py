"""Batched log-likelihood of continuations given contexts: the one primitive behind bpb and multiple choice.

A request is (context token ids, continuation token ids); its score is sum_i log p(cont_i | context, cont_<i)
in nats. Requests are sorted by length, grouped into batches of a fixed size and right-padded to the next
length bucket (powers of two up to the model's context), so one jitted forward pass compiles once per
bucket and a new mix of lengths never recompiles. A request longer than the context keeps its continuation
and loses the start of its context (left truncation), as a model reading a long document would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm.model.transformer import Transformer
from llm.tokenizer import Tokenizer

TokenRequest = tuple[Sequence[int], Sequence[int]]
# What the tasks need from a model: (context, continuation) texts -> log-likelihoods in nats.
Loglikelihood = Callable[[Sequence[tuple[str, str]]], list[float]]
SMALLEST_BUCKET = 16


def length_buckets(max_len: int) -> list[int]:
    """Padded lengths used for batches: 16, 32, 64, ... below max_len, then max_len itself."""
    buckets = []
    length = SMALLEST_BUCKET
    while length < max_len:
        buckets.append(length)
        length *= 2
    return buckets + [max_len]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (bos + context, continuation), split where the text is split.

    Trailing spaces of the context move to the continuation: SentencePiece attaches a space to the word
    after it ('▁Sí'), so "¿verdad?" + " Sí" tokenizes like the running text the model was trained on. The
    continuation's ids are the tail of the encoding of the whole text when the context's encoding is its
    prefix (the usual case); otherwise the continuation is encoded on its own.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        continuation_ids = whole[len(context_ids):]
    else:
        continuation_ids = tokenizer.encode(continuation)
    return [tokenizer.bos_id] + context_ids, continuation_ids


def _score_batch(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, targets: jax.Array,
                 mask: jax.Array) -> jax.Array:
    """Per row: sum over masked positions of log p(target | inputs up to there), in float32."""
    model = nnx.merge(graphdef, state)
    logits = model(inputs).astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    log_probs = target_logits - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(jnp.where(mask, log_probs, 0.0), axis=-1)


class Scorer:
    """Log-likelihoods of continuations under a Transformer, in fixed-shape jitted batches."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = model.cfg.max_seq_len
        self.buckets = length_buckets(self.max_len)
        self._graphdef, self._state = nnx.split(model)
        self._forward = jax.jit(_score_batch, static_argnums=0)

    def score_tokens(self, requests: Sequence[TokenRequest]) -> list[float]:
        """Sum of continuation log-probabilities (nats) of each (context ids, continuation ids) request."""
        rows = [self._row(index, context, continuation) for index, (context, continuation) in enumerate(requests)]
        # Longest first: each batch pads to its own bucket, and similar lengths share a batch.
        rows.sort(key=lambda row: -len(row[1]))
        scores = np.zeros(len(rows), np.float64)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            length = next(bucket for bucket in self.buckets if bucket >= len(batch[0][1]) - 1)
            inputs = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            mask = np.zeros((self.batch_size, length), bool)
            for row, (_, tokens, num_scored) in enumerate(batch):
                inputs[row, :len(tokens) - 1] = tokens[:-1]
                targets[row, :len(tokens) - 1] = tokens[1:]
                mask[row, len(tokens) - 1 - num_scored:len(tokens) - 1] = True
            sums = np.asarray(self._forward(self._graphdef, self._state, inputs, targets, mask))
            for row, (index, _, _) in enumerate(batch):
                scores[index] = sums[row]
        return scores.tolist()

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Log-likelihood (nats) of each continuation text given its context text (bos is prepended)."""
        if self.tokenizer is None:
            raise ValueError("Scorer.loglikelihood needs the tokenizer; pass it to Scorer(model, tokenizer).")
        return self.score_tokens([encode_pair(self.tokenizer, context, continuation)
                                  for context, continuation in requests])

    def _row(self, index: int, context: Sequence[int], continuation: Sequence[int]) -> tuple[int, list[int], int]:
        if not context:
            raise ValueError(f"Request {index}: the context is empty; start it with the bos token.")
        if not continuation:
            raise ValueError(f"Request {index}: the continuation is empty; there is nothing to score.")
        if len(continuation) > self.max_len:
            raise ValueError(f"Request {index}: a continuation of {len(continuation)} tokens does not fit the "
                             f"model's context of {self.max_len}; score it in windows (perplexity.rolling_requests).")
        # max_len inputs predict max_len targets: keep the last max_len + 1 tokens.
        tokens = (list(context) + list(continuation))[-(self.max_len + 1):]
        return index, tokens, len(continuation)
