"""Batched log-likelihood of continuations given contexts: the one primitive behind bpb and multiple choice.

A request is (context token ids, continuation token ids); its score is sum_i log p(cont_i | context, cont_<i)
in nats. Requests are sorted by length, grouped into batches of a fixed size and right-padded to the next
length bucket (powers of two up to the model's context), so the jitted forward pass compiles once per
bucket and a new mix of lengths never recompiles. A request longer than the context keeps its continuation
and loses the start of its context (left truncation), as a model reading a long document would.

Few-shot prompts repeat the same solved examples in front of every request. When all requests of a call
share a prefix of at least MIN_SHARED_PREFIX tokens, it is run once into a KV cache and every batch only
runs its own tokens on top of it: a 3-shot task then costs about what its zero-shot version costs.

`score_tokens_greedy` also says whether each continuation is the model's greedy choice, token by token (lm-eval's
`is_greedy`); it is a separately compiled variant, so the plain scores pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import base
from llm import sharding
from llm.infer import generate
from llm.model.kv_cache import KVCache, new_cache
from llm.model.logprobs import target_logprobs
from llm.model.transformer import Transformer, context_length
from llm.tokenizer import Tokenizer

TokenRequest = tuple[Sequence[int], Sequence[int]]
# What the tasks need from a model: (context, continuation) texts -> log-likelihoods in nats.
Loglikelihood = Callable[[Sequence[tuple[str, str]]], list[float]]
MIN_SHARED_PREFIX = 16  # shorter shared prefixes are not worth a separate pass


def encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str, encode: Callable[[str], list[int]] | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of (bos + context, continuation), split where the text is split.

    Trailing spaces of the context move to the continuation: SentencePiece attaches a space to the word
    after it ('▁Sí'), so "¿verdad?" + " Sí" tokenizes like the running text the model was trained on. The
    continuation's ids are the tail of the encoding of the whole text when the context's encoding is its
    prefix (the usual case); otherwise the continuation is encoded on its own. `encode` (default
    `tokenizer.encode`) turns text into ids: lm-eval's model passes one that reads special tokens spelled in it.
    """
    encode = encode or tokenizer.encode
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = encode(stripped)
    whole = encode(stripped + continuation)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        continuation_ids = whole[len(context_ids) :]
    else:
        continuation_ids = encode(continuation)
    return [tokenizer.bos_id] + context_ids, continuation_ids


class _Row(NamedTuple):
    """A request as scored."""

    index: int  # position in the caller's list
    tokens: list[int]  # context + continuation, the last max_len + 1 of them
    num_scored: int  # the continuation: the last num_scored tokens
    cut: bool  # the start of the context did not fit


def _sum_log_probs(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, greedy: bool
) -> tuple[jax.Array, jax.Array | None]:
    """Per row: sum over masked positions of log p(target), in float32; with `greedy`, also whether every
    masked target is the most likely token (else None)."""
    sums = jnp.sum(jnp.where(mask, target_logprobs(logits, targets), 0.0), axis=-1)
    if not greedy:
        return sums, None
    return sums, jnp.all(~mask | (jnp.argmax(logits, axis=-1) == targets), axis=-1)


def _score_batch(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    inputs: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    greedy: bool,
) -> tuple[jax.Array, jax.Array | None]:
    return _sum_log_probs(nnx.merge(graphdef, state)(inputs, positions, segment_ids), targets, mask, greedy)


def _prefill(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, segment_ids: jax.Array, cache: KVCache
) -> KVCache:
    """The cache after reading one (1, P) prefix; its padding (segment 0) is never attended to."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, cache = nnx.merge(graphdef, state).decode(tokens, positions, segment_ids, cache)
    return cache


def _score_batch_after_prefix(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prefix: KVCache,
    inputs: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    greedy: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """Like _score_batch for rows that continue the cached prefix (every row gets its own copy of it)."""
    cache = prefix.repeat_rows(inputs.shape[0])
    logits, _ = nnx.merge(graphdef, state).decode(inputs, positions, segment_ids, cache)
    return _sum_log_probs(logits, targets, mask, greedy)


class Scorer:
    """Log-likelihoods of continuations under a Transformer, in fixed-shape jitted batches. A model placed on a
    mesh scores on it, its prefix cache sharded as the logical-axis `rules` say."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        batch_size: int = 16,
        rules: sharding.Rules = base.DEFAULT_LOGICAL_AXIS_RULES,
    ):
        self.rules = rules
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = context_length(model.cfg)
        self._graphdef, self._state = nnx.split(model)
        self._forward = jax.jit(_score_batch, static_argnums=0, static_argnames="greedy")
        self._prefill = jax.jit(_prefill, static_argnums=0)
        self._forward_after_prefix = jax.jit(_score_batch_after_prefix, static_argnums=0, static_argnames="greedy")

    def score_tokens(self, requests: Sequence[TokenRequest]) -> list[float]:
        """Sum of continuation log-probabilities (nats) of each (context ids, continuation ids) request."""
        return self._score(requests, greedy=None).tolist()

    def score_tokens_greedy(self, requests: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        """(score_tokens' log-likelihood, whether greedy decoding after the context gives the continuation)."""
        greedy = np.zeros(len(requests), bool)
        scores = self._score(requests, greedy)
        return [(float(score), bool(is_greedy)) for score, is_greedy in zip(scores, greedy)]

    def _score(self, requests: Sequence[TokenRequest], greedy: np.ndarray | None) -> np.ndarray:
        """The requests' scores; with a `greedy` array, writes each request's greediness into it too."""
        rows = [self._row(index, context, continuation) for index, (context, continuation) in enumerate(requests)]
        scores = np.zeros(len(rows), np.float64)
        # Rows whose context was cut no longer start like the others: they run whole.
        intact, whole = [row for row in rows if not row.cut], [row for row in rows if row.cut]
        prefix = _shared_prefix(intact)
        if len(prefix) < MIN_SHARED_PREFIX:
            intact, prefix, whole = [], [], rows
        with sharding.use_mesh_of(self._state, self.rules):
            self._score_rows(intact, prefix, scores, greedy)
            self._score_rows(whole, [], scores, greedy)
        return scores

    def _score_rows(self, rows: list[_Row], prefix: list[int], scores: np.ndarray, greedy: np.ndarray | None) -> None:
        """Writes the score of each row into scores[index] (and its greediness into greedy[index], if given),
        running the rows on top of `prefix`'s cache."""
        cache = self._read_prefix(prefix) if prefix else None
        # Longest first: each batch pads to its own bucket, and similar lengths share a batch.
        rows = sorted(rows, key=lambda row: -len(row.tokens))
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            length = self._bucket(len(batch[0].tokens) - len(prefix) - 1)
            inputs, targets, positions, segment_ids = (np.zeros((self.batch_size, length), np.int32) for _ in range(4))
            mask = np.zeros((self.batch_size, length), bool)
            for row, (_, tokens, num_scored, _) in enumerate(batch):
                own = tokens[len(prefix) :]  # the row's tokens after the shared prefix
                inputs[row, : len(own) - 1] = own[:-1]
                targets[row, : len(own) - 1] = own[1:]
                positions[row, : len(own) - 1] = np.arange(len(prefix), len(tokens) - 1)
                segment_ids[row, : len(own) - 1] = 1
                mask[row, len(own) - 1 - num_scored : len(own) - 1] = True
            arrays = (inputs, positions, segment_ids, targets, mask)
            with_greedy = greedy is not None
            if cache is None:
                sums, matches = self._forward(self._graphdef, self._state, *arrays, greedy=with_greedy)
            else:
                sums, matches = self._forward_after_prefix(
                    self._graphdef, self._state, cache, *arrays, greedy=with_greedy
                )
            indices = [request.index for request in batch]
            scores[indices] = np.asarray(sums)[: len(batch)]
            if with_greedy:
                greedy[indices] = np.asarray(matches)[: len(batch)]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Log-likelihood (nats) of each continuation text given its context text (bos is prepended)."""
        if self.tokenizer is None:
            raise ValueError("Scorer.loglikelihood needs the tokenizer; pass it to Scorer(model, tokenizer).")
        return self.score_tokens(
            [encode_pair(self.tokenizer, context, continuation) for context, continuation in requests]
        )

    def _bucket(self, length: int) -> int:
        return generate.bucket(length, self.max_len)

    def _read_prefix(self, prefix: list[int]) -> KVCache:
        """The KV cache of the prefix, padded to a bucket, with room for a full context after it."""
        length = self._bucket(len(prefix))
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(prefix)] = prefix
        segment_ids = (np.arange(length) < len(prefix)).astype(np.int32)[None]
        cache = new_cache(self._graphdef, self._state, 1, 2 * self.max_len)
        return self._prefill(self._graphdef, self._state, tokens, segment_ids, cache)

    def _row(self, index: int, context: Sequence[int], continuation: Sequence[int]) -> _Row:
        if not context:
            raise ValueError(f"Request {index}: the context is empty; start it with the bos token.")
        if not continuation:
            raise ValueError(f"Request {index}: the continuation is empty; there is nothing to score.")
        if len(continuation) > self.max_len:
            raise ValueError(
                f"Request {index}: a continuation of {len(continuation)} tokens does not fit the "
                f"model's context of {self.max_len}; score it in windows (perplexity.rolling_requests)."
            )
        # max_len inputs predict max_len targets: keep the last max_len + 1 tokens.
        tokens = list(context) + list(continuation)
        return _Row(index, tokens[-(self.max_len + 1) :], len(continuation), len(tokens) > self.max_len + 1)


def _shared_prefix(rows: Sequence[_Row]) -> list[int]:
    """The longest token prefix of every row that stops before its first scored prediction."""
    if not rows:
        return []
    limit = min(len(row.tokens) - 1 - row.num_scored for row in rows)
    first = rows[0].tokens
    length = 0
    while length < limit and all(row.tokens[length] == first[length] for row in rows):
        length += 1
    return first[:length]
