"""Sentence embeddings from any run: the pooled final hidden states of its model.

A text is encoded as scoring encodes a context, BOS first (so an empty text still has one token and gets the
embedding of BOS alone), and cut to the model's context keeping its start. Its embedding is the mean of the
final hidden states (after the final norm: transformers' `last_hidden_state`) over its tokens, or the state of
its last token, L2-normalised by default. Queries and passages may get different prefixes (e5-style
"consulta: " / "pasaje: ").

Texts are sorted by length and run in batches right-padded to power-of-two lengths (and row counts), with
segment id 0 on padding, so a text gives the same embedding alone or next to longer ones and a new mix of
lengths rarely compiles anew. The parameters stay where `load_run` placed them (sharded over the local
devices), as in generation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from llm.infer.generate import bucket
from llm.model.pooling import POOLINGS, pool
from llm.model.transformer import Transformer, context_length
from llm.runs.loading import load_run
from llm.tokenizer import AnyTokenizer

KINDS = ("passage", "query")


def _embed_batch(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    segment_ids: jax.Array,
    pooling: str,
    normalize: bool,
) -> jax.Array:
    """(rows, embed) float32 pooled hidden states of right-padded rows (segment id 1 on tokens, 0 on padding)."""
    hidden = nnx.merge(graphdef, params).features(tokens, segment_ids=segment_ids)
    return pool(hidden, segment_ids, pooling, normalize)


def trained_options(config: ml_collections.ConfigDict) -> dict[str, str]:
    """The embedding options a run was trained with: pooling and prefixes of a contrastive run, else none."""
    train = config.train
    if train.objective != "contrastive":
        return {}
    return {
        "pooling": train.contrastive_pooling,
        "query_prefix": train.query_prefix,
        "passage_prefix": train.passage_prefix,
    }


@functools.lru_cache(maxsize=8)
def _jitted_embed(graphdef: nnx.GraphDef) -> Callable:
    """`_embed_batch` jitted for one graphdef (bound here, not hashed as a static argument on every call)."""
    return jax.jit(functools.partial(_embed_batch, graphdef), static_argnames=("pooling", "normalize"))


class Embedder:
    """Embeds texts with one model: `embed(texts, kind)` -> (n, embed_dim) float32."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: AnyTokenizer,
        pooling: str = "mean",
        normalize: bool = True,
        query_prefix: str = "",
        passage_prefix: str = "",
        batch_size: int = 32,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.tokenizer = tokenizer
        self.pooling, self.normalize, self.batch_size = pooling, normalize, batch_size
        self.prefixes = {"query": query_prefix, "passage": passage_prefix}
        self.max_len = context_length(model.cfg)
        self.dim = model.cfg.embed_dim
        self._graphdef, self._params = nnx.split(model)
        self._forward = _jitted_embed(self._graphdef)
        # Where the model came from, for an index's manifest (set by `from_run`; None for a model built in code).
        self.workdir: str | None = None
        self.step: int | None = None

    @classmethod
    def from_run(cls, workdir: str, step: int | None = None, **options) -> Embedder:
        """The embedder of a run's checkpoint (default: the latest; an imported Hugging Face run too);
        `options` are the constructor's (pooling, normalize, prefixes, batch_size). A contrastively trained
        run defaults to the pooling and prefixes it was trained with; explicit options still win."""
        run = load_run(workdir, step)
        embedder = cls(run.model, run.tokenizer, **{**trained_options(run.config), **options})
        embedder.workdir, embedder.step = run.workdir, run.step
        return embedder

    def encode(self, text: str, kind: str = "passage") -> list[int]:
        """The token ids a text is embedded from: BOS, the kind's prefix and the text, cut to the context."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        return ([self.tokenizer.bos_id] + self.tokenizer.encode(self.prefixes[kind] + text))[: self.max_len]

    def embed(self, texts: Sequence[str], kind: str = "passage") -> np.ndarray:
        """(len(texts), embed_dim) float32 embeddings, in the order of `texts`."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts, not a single string; wrap it: embed([text]).")
        return self.embed_ids([self.encode(text, kind) for text in texts])

    def embed_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """(len(rows), embed_dim) float32 embeddings of token rows as `encode` makes them (BOS, prefix, text;
        at most the context), in their order."""
        out = np.zeros((len(rows), self.dim), np.float32)
        # Longest first: similar lengths share a batch, and each batch pads only to its own bucket.
        order = sorted(range(len(rows)), key=lambda index: -len(rows[index]))
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            out[indices] = self._embed_rows([rows[index] for index in indices])
        return out

    def _embed_rows(self, rows: list[list[int]]) -> np.ndarray:
        """Embeddings of up to batch_size token rows, padded to a (row bucket, length bucket) batch."""
        length = bucket(max(len(row) for row in rows), self.max_len)
        num_rows = bucket(len(rows), self.batch_size, minimum=1)
        tokens = np.zeros((num_rows, length), np.int32)
        segment_ids = np.zeros((num_rows, length), np.int32)
        for index, row in enumerate(rows):
            tokens[index, : len(row)] = row
            segment_ids[index, : len(row)] = 1
        pooled = self._forward(self._params, tokens, segment_ids, pooling=self.pooling, normalize=self.normalize)
        return np.asarray(pooled)[: len(rows)]
