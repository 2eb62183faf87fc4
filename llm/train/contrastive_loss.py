"""The contrastive objective of embedding training: the multiple-negatives ranking loss (InfoNCE over in-batch
and hard negatives, with Matryoshka widths) on pooled hidden states, and its learnable temperature."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llm import config_validation
from llm.data import records
from llm.model import moe
from llm.model.pooling import pool, truncate
from llm.model.transformer import Transformer

# The learnable temperature's name among the trained parameters (step.py), and its floor: CLIP's cap of 100 on
# the logit scale, which keeps the softmax from collapsing onto the largest similarity.
LOG_TEMPERATURE = "contrastive_log_temperature"
MIN_TEMPERATURE = 0.01


def ranking_loss(
    queries: jax.Array,
    positives: jax.Array,
    negatives: jax.Array,
    has_negative: jax.Array,
    temperature: jax.Array | float,
    dims: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """Multiple-negatives ranking loss (InfoNCE over in-batch negatives) per query, and whether the query's
    own positive scored highest: ((batch,), (batch,)) float32.

    Query i is scored against every positive of the batch and every hard negative present (`has_negative`:
    rows without one are left out), logits = cosine similarity / temperature, and its loss is the
    cross-entropy of its own positive. With Matryoshka `dims` (the full width first), each prefix of the
    embeddings is re-normalised and scored alike, and the loss is their mean; the accuracy is the full width's.
    """
    candidate_mask = jnp.concatenate([jnp.ones_like(has_negative, bool), has_negative.astype(bool)])
    rows = jnp.arange(queries.shape[0])
    losses, correct = [], None
    for dim in dims:
        q, p, n = (truncate(x.astype(jnp.float32), dim) for x in (queries, positives, negatives))
        similarity = jnp.einsum("qd,cd->qc", q, jnp.concatenate([p, n]), precision=jax.lax.Precision.HIGHEST)
        logits = jnp.where(candidate_mask[None, :], similarity / temperature, -jnp.inf)
        losses.append(-jax.nn.log_softmax(logits, axis=-1)[rows, rows])
        if correct is None:
            correct = (jnp.argmax(logits, axis=-1) == rows).astype(jnp.float32)
    return jnp.mean(jnp.stack(losses), axis=0), correct


def contrastive_params(train_cfg: ml_collections.ConfigDict) -> dict[str, nnx.Param]:
    """The learnable temperature, as log(temperature) from the configured start; nothing when it is fixed."""
    if not train_cfg.contrastive_learn_temperature:
        return {}
    return {LOG_TEMPERATURE: nnx.Param(jnp.log(jnp.asarray(train_cfg.contrastive_temperature, jnp.float32)))}


def contrastive_terms(
    model: Transformer,
    reference: Transformer | None,
    batch: dict[str, jax.Array],
    key: jax.Array | None,
    train_cfg: ml_collections.ConfigDict,
    loss_params: dict[str, jax.Array],
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """`ranking_loss` of the batch's (query, positive, negative) rows (records.TRIPLE_FIELDS), pooled as the
    embedder pools them (llm/model/pooling.py); the weight is the number of queries.

    InfoNCE over in-batch negatives is not a sum over rows: each query's loss depends on the whole batch. With
    train.grad_accum_steps > 1 the negatives of a query are those of its own microbatch (batch_size /
    grad_accum_steps rows), so accumulation trades memory for a smaller, easier set of negatives; the sums
    returned here keep the reported loss and the gradient the mean over all queries of their microbatch losses.
    """
    del reference
    sides = records.CONTRASTIVE_SIDES
    joined = {name: jnp.concatenate([batch[f"{side}_{name}"] for side in sides]) for name in records.FIELDS}
    # Queries, positives and negatives go through the model as one batch of three times the rows.
    hidden, router = model.features_and_router_stats(
        joined["tokens"], joined["positions"], joined["segment_ids"], dropout_key=key
    )
    queries, positives, negatives = jnp.split(
        pool(hidden, joined["segment_ids"], train_cfg.contrastive_pooling, normalize=False), 3
    )
    if LOG_TEMPERATURE in loss_params:
        temperature = jnp.maximum(jnp.exp(loss_params[LOG_TEMPERATURE]), MIN_TEMPERATURE)
    else:
        temperature = jnp.asarray(train_cfg.contrastive_temperature, jnp.float32)
    dims = (queries.shape[-1], *config_validation.matryoshka_dims(train_cfg.matryoshka_dims, queries.shape[-1]))
    has_negative = jnp.any(batch["negative_segment_ids"] > 0, axis=1)
    per_query, correct = ranking_loss(queries, positives, negatives, has_negative, temperature, dims)
    count = jnp.asarray(queries.shape[0], jnp.float32)
    sums = {"loss": jnp.sum(per_query), "accuracy": jnp.sum(correct), "temperature": temperature * count}
    value, sums = moe.add_router_losses(model.cfg, router, sums["loss"], sums, count)  # weighted per query
    return value, sums, count
