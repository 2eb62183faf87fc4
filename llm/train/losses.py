"""The training objectives and their losses, in float32: next-token cross-entropy (with a loss mask and an
optional z-loss), DPO, contrastive embedding training and knowledge distillation, chosen by `train.objective`
from `OBJECTIVES`.

`next_token_loss` takes the logits; `chunked_next_token_loss` takes the final hidden states and the output
projection, and computes the same sums chunk by chunk along the sequence, recomputing each chunk's logits in
the backward pass. With a large vocabulary the full (batch, length, vocab) float32 logits, and their
gradient, are then never in memory at once. Distillation does the same with the teacher's logits beside the
student's (`chunked_distill_sums`).

An objective returns sums, not means (`LossTerms`), so gradient accumulation over microbatches divides once
by the total weight and equals the full batch. (The contrastive loss, in contrastive_loss.py, is the exception in
substance: see its `contrastive_terms`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llm.data import records
from llm.model import moe
from llm.model.logprobs import log_normalizer, log_softmax, target_logprobs
from llm.model.moe import RouterStats
from llm.model.transformer import Transformer
from llm.train import contrastive_loss

LossSums = tuple[jax.Array, jax.Array, jax.Array]  # (cross-entropy sum, z-loss term, weight sum)
# (objective to differentiate, metric sums, weight): metrics are sums so that accumulation is exact.
LossTerms = tuple[jax.Array, dict[str, jax.Array], jax.Array]
Batch = dict[str, jax.Array]
LossParams = dict[str, jax.Array]  # An objective's own trained parameters (the learnable temperature), by name.
DPO_SIDES = ("chosen", "rejected")


def next_token_weights(segment_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Weight of predicting token t+1 from position t: (batch, length - 1) float32.

    A prediction counts when its target is marked in `loss_mask` and lies in the same document as the
    position that predicts it (see llm/data/records.py).
    """
    same_segment = segment_ids[:, 1:] == segment_ids[:, :-1]
    return (same_segment & (loss_mask[:, 1:] > 0)).astype(jnp.float32)


def _loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float) -> LossSums:
    normalizer = log_normalizer(logits)
    cross_entropy = -jnp.sum(target_logprobs(logits, targets, normalizer) * weights)
    z_term = z_loss * jnp.sum(jnp.square(normalizer) * weights)
    return cross_entropy, z_term, jnp.sum(weights)


def next_token_loss(logits: jax.Array, tokens: jax.Array, weights: jax.Array, z_loss: float = 0.0) -> LossSums:
    """Sums over the batch of (cross-entropy, z-loss term, weight) for predicting tokens[:, 1:].

    Sums rather than means, so gradient accumulation over microbatches divides once by the total weight and
    equals the full-batch gradient. The z-loss z_loss * log(Z)^2 (PaLM) keeps the softmax normalizer near 1.
    """
    return _loss_sums(logits, *_targets_at_every_position(tokens, weights), z_loss)


def _targets_at_every_position(tokens: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets, weights) of shape (batch, length): position t predicts tokens[t + 1].

    The targets move left instead of the logits: slicing off the last position would copy the whole
    (batch, length - 1, vocab) logits, and its gradient would be a padded copy back, two passes over the
    largest tensors of the step. The last position, left without a target, gets weight 0.
    """
    pad = ((0, 0), (0, 1))
    return jnp.pad(tokens[:, 1:], pad), jnp.pad(weights, pad)


def chunked_next_token_loss(
    features: jax.Array,
    project: Callable[[jax.Array], jax.Array],
    tokens: jax.Array,
    weights: jax.Array,
    z_loss: float,
    chunk_size: int,
) -> LossSums:
    """`next_token_loss(project(features), ...)`, `chunk_size` positions of logits at a time."""
    return _chunk_sums(
        lambda f, t, w: _loss_sums(project(f), t, w, z_loss), (features[:, :-1], tokens[:, 1:], weights), chunk_size
    )


def _chunk_sums(sums: Callable[..., Any], inputs: tuple[jax.Array, ...], chunk_size: int) -> Any:
    """`sums(*inputs)` (a pytree of sums over positions) added up `chunk_size` positions at a time.

    The inputs are (batch, length, ...) arrays, aligned so that position t of each belongs to prediction t and
    padded positions must carry weight 0 (every `sums` here weighs its terms). Each chunk is rematerialized in
    the backward pass, so only one chunk's logits (and their gradient) are ever in memory.
    """
    length = inputs[0].shape[1]
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length  # Padded positions carry weight 0.

    def chunks(x: jax.Array) -> jax.Array:  # (batch, length, ...) -> (num_chunks, batch, chunk_size, ...)
        x = jnp.pad(x, ((0, 0), (0, pad), *[(0, 0)] * (x.ndim - 2)))
        return jnp.swapaxes(x.reshape(x.shape[0], num_chunks, chunk_size, *x.shape[2:]), 0, 1)

    chunk_sums = jax.checkpoint(sums)
    chunked = tuple(chunks(x) for x in inputs)

    def body(totals: Any, chunk: tuple) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, totals, chunk_sums(*chunk)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums, *(x[0] for x in chunked)))
    totals, _ = jax.lax.scan(body, zeros, chunked)
    return totals


def sequence_logprobs(logits: jax.Array, tokens: jax.Array, weights: jax.Array) -> jax.Array:
    """Per row, the summed log-probability of the weighted next-token targets: (batch,) float32."""
    targets, weights = _targets_at_every_position(tokens, weights)
    return jnp.sum(target_logprobs(logits, targets) * weights, axis=-1)


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    reference_chosen: jax.Array,
    reference_rejected: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
) -> dict[str, jax.Array]:
    """Direct Preference Optimization (Rafailov et al. 2023), per pair, from sequence log-probabilities.

    The implicit reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)); the loss is
    -log sigmoid(reward_chosen - reward_rejected). With label smoothing e (conservative DPO, Mitchell 2023)
    the preference label is trusted with probability 1 - e:
    -(1 - e) log sigmoid(margin) - e log sigmoid(-margin).
    """
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * jax.nn.log_sigmoid(-margin)
    return {
        "loss": loss,
        "reward_accuracy": (margin > 0).astype(jnp.float32),
        "reward_margin": margin,
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
    }


def lm_terms(
    model: Transformer,
    reference: Transformer | None,
    batch: Batch,
    key: jax.Array | None,
    train_cfg: ml_collections.ConfigDict,
    loss_params: LossParams,
) -> LossTerms:
    """Next-token cross-entropy plus the z-loss term (and an MoE model's router losses); the metric "loss" is
    the cross-entropy alone."""
    del reference, loss_params  # Only DPO has a reference; only the contrastive loss has parameters.
    features, router = model.features_and_router_stats(
        batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key=key
    )
    weights = next_token_weights(batch["segment_ids"], batch["loss_mask"])
    if train_cfg.loss_chunk_size:
        cross_entropy, z_term, weight = chunked_next_token_loss(
            features, model.logits, batch["tokens"], weights, train_cfg.z_loss, train_cfg.loss_chunk_size
        )
    else:
        cross_entropy, z_term, weight = next_token_loss(
            model.logits(features), batch["tokens"], weights, train_cfg.z_loss
        )
    value, sums = moe.add_router_losses(model.cfg, router, cross_entropy + z_term, {"loss": cross_entropy}, weight)
    return value, sums, weight


class DistillSums(NamedTuple):
    """Sums over a batch's weighted next-token predictions: the student's cross-entropy and z-loss term, the
    KL from the teacher at temperature T (unscaled), and the weight."""

    cross_entropy: jax.Array
    z_term: jax.Array
    kl: jax.Array
    weight: jax.Array


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """KL(p || q) per position (...) float32, p and q the softmax of the teacher's and the student's logits / T:
    the forward KL of Hinton et al. (2015), which pulls the student towards every token the teacher gives mass."""
    teacher_logprobs = log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    student_logprobs = log_softmax(student_logits.astype(jnp.float32) / temperature)
    return jnp.sum(jnp.exp(teacher_logprobs) * (teacher_logprobs - student_logprobs), axis=-1)


def distill_sums(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    temperature: float,
    z_loss: float = 0.0,
) -> DistillSums:
    """`DistillSums` from both models' logits (batch, length, vocab) at the positions that predict `targets`
    (batch, length); only the predictions `weights` counts (the loss mask, within a document) enter the sums."""
    cross_entropy, z_term, weight = _loss_sums(student_logits, targets, weights, z_loss)
    kl = jnp.sum(forward_kl(student_logits, teacher_logits, temperature) * weights)
    return DistillSums(cross_entropy, z_term, kl, weight)


def chunked_distill_sums(
    student_features: jax.Array,
    teacher_features: jax.Array,
    project: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    tokens: jax.Array,
    weights: jax.Array,
    temperature: float,
    z_loss: float,
    chunk_size: int,
) -> DistillSums:
    """`distill_sums` from both models' final hidden states, `chunk_size` positions at a time:
    `project(student_chunk, teacher_chunk)` gives the chunk's logits of both, so neither model's full
    (batch, length, vocab) logits exist at once."""

    def sums(student: jax.Array, teacher: jax.Array, targets: jax.Array, w: jax.Array) -> DistillSums:
        return distill_sums(*project(student, teacher), targets, w, temperature, z_loss)

    inputs = (student_features[:, :-1], teacher_features[:, :-1], tokens[:, 1:], weights)
    return _chunk_sums(sums, inputs, chunk_size)


def distill_objective(sums: DistillSums, alpha: float, temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(objective, metric sums): alpha * T^2 * KL + (1 - alpha) * cross-entropy, plus the student's z-loss term.

    The soft targets' gradients scale as 1/T^2, so T^2 keeps the two terms' balance when T changes (Hinton
    et al.). The metrics are the mixed loss and its two parts, each summed over the weighted predictions.
    """
    mixed = alpha * temperature**2 * sums.kl + (1.0 - alpha) * sums.cross_entropy
    return mixed + sums.z_term, {"loss": mixed, "distill_kl": sums.kl, "distill_ce": sums.cross_entropy}


def distill_terms(
    model: Transformer,
    teacher: Transformer | None,
    batch: Batch,
    key: jax.Array | None,
    train_cfg: ml_collections.ConfigDict,
    loss_params: LossParams,
) -> LossTerms:
    """Knowledge distillation of `model` from the frozen `teacher` on the same batch (`distill_objective`)."""
    del loss_params
    tokens, positions, segment_ids = batch["tokens"], batch["positions"], batch["segment_ids"]
    features, router = model.features_and_router_stats(tokens, positions, segment_ids, dropout_key=key)
    teacher_features = jax.lax.stop_gradient(teacher.features(tokens, positions, segment_ids))
    weights = next_token_weights(segment_ids, batch["loss_mask"])
    temperature, z_loss = train_cfg.distill_temperature, train_cfg.z_loss
    if train_cfg.loss_chunk_size:

        def project(student_chunk: jax.Array, teacher_chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
            return model.logits(student_chunk), jax.lax.stop_gradient(teacher.logits(teacher_chunk))

        sums = chunked_distill_sums(
            features, teacher_features, project, tokens, weights, temperature, z_loss, train_cfg.loss_chunk_size
        )
    else:
        teacher_logits = jax.lax.stop_gradient(teacher.logits(teacher_features))
        targets, weights = _targets_at_every_position(tokens, weights)
        sums = distill_sums(model.logits(features), teacher_logits, targets, weights, temperature, z_loss)
    value, metrics = distill_objective(sums, train_cfg.distill_alpha, temperature)
    value, metrics = moe.add_router_losses(model.cfg, router, value, metrics, sums.weight)
    return value, metrics, sums.weight


def dpo_terms(
    model: Transformer,
    reference: Transformer | None,
    batch: Batch,
    key: jax.Array | None,
    train_cfg: ml_collections.ConfigDict,
    loss_params: LossParams,
) -> LossTerms:
    """DPO of the policy `model` against the frozen `reference`, summed over the batch's preference pairs."""
    del loss_params
    # Chosen and rejected responses go through the model as one batch of twice the rows.
    joined = {name: jnp.concatenate([batch[f"{side}_{name}"] for side in DPO_SIDES]) for name in records.FIELDS}
    weights = next_token_weights(joined["segment_ids"], joined["loss_mask"])

    def logprobs(m: Transformer, k: jax.Array | None) -> tuple[list[jax.Array], RouterStats | None]:
        features, router = m.features_and_router_stats(
            joined["tokens"], joined["positions"], joined["segment_ids"], dropout_key=k
        )
        return jnp.split(sequence_logprobs(m.logits(features), joined["tokens"], weights), 2), router

    (policy_chosen, policy_rejected), router = logprobs(model, key)
    reference_chosen, reference_rejected = jax.lax.stop_gradient(logprobs(reference, None)[0])
    per_pair = dpo_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        train_cfg.dpo_beta,
        train_cfg.dpo_label_smoothing,
    )
    sums = {name: jnp.sum(values) for name, values in per_pair.items()}
    pairs = jnp.asarray(policy_chosen.shape[0], jnp.float32)
    value, sums = moe.add_router_losses(model.cfg, router, sums["loss"], sums, pairs)
    return value, sums, pairs


TermsFn = Callable[
    [Transformer, Transformer | None, Batch, jax.Array | None, ml_collections.ConfigDict, LossParams], LossTerms
]


def _no_params(train_cfg: ml_collections.ConfigDict) -> dict[str, nnx.Param]:
    del train_cfg
    return {}


class Objective(NamedTuple):
    terms: TermsFn
    fields: tuple[str, ...]  # What a batch holds: records.FIELDS, PAIR_FIELDS (DPO) or TRIPLE_FIELDS (contrastive).
    reference: bool  # Trains against a frozen copy of the starting model (the DPO reference).
    perplexity: bool  # The loss is a mean next-token cross-entropy, so exp(loss) is a perplexity.
    # The objective's own trained parameters beside the model's (train config -> {name: initial nnx.Param}).
    params: Callable[[ml_collections.ConfigDict], dict[str, nnx.Param]] = _no_params
    # Trains against the frozen train.teacher (distillation), passed to `terms` where DPO gets its reference.
    teacher: bool = False


# train.objective -> its objective; the keys are exactly configs.base.CHOICES["train.objective"] (tested).
OBJECTIVES = {
    "lm": Objective(lm_terms, records.FIELDS, reference=False, perplexity=True),
    "dpo": Objective(dpo_terms, records.PAIR_FIELDS, reference=True, perplexity=False),
    "contrastive": Objective(
        contrastive_loss.contrastive_terms,
        records.TRIPLE_FIELDS,
        reference=False,
        perplexity=False,
        params=contrastive_loss.contrastive_params,
    ),
    "distill": Objective(distill_terms, records.FIELDS, reference=False, perplexity=False, teacher=True),
}
