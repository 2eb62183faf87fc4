"""The train state and the jitted, sharded init / train / eval steps, for every training mode.

One trainer serves pretraining and fine-tuning. The config chooses
  * which parameters train (`train.trainable`): all of them, only the LoRA adapters, or only the soft
    prompt (prompt tuning);
  * whether the frozen base is quantized (`train.quantize_base`: int4 with LoRA is QLoRA);
  * the objective (`train.objective`): next-token cross-entropy, or DPO against a frozen reference.
The model's parameters are split into `params` (trainable: the only ones with optimizer state) and
`frozen` (the rest, plus the DPO reference). The train state is a plain dict `{"step", "params",
"opt_state"}` and is what checkpoints hold; frozen parameters are rebuilt at start-up from the seed and
`init_from` (`trained_model`), so a LoRA or prompt-tuning checkpoint is just its adapters or its prompt.
Every jitted function declares its shardings, and the train step donates the old state so it is updated
in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from llm import sharding
from llm.data import records
from llm.model.transformer import Transformer, create_model
from llm.runs.build import TRAINABLE, base_config, trained_model
from llm.train import losses

TrainState = dict[str, Any]
Frozen = dict[str, nnx.State]
Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Frozen, Batch], tuple[TrainState, dict[str, jax.Array]]]

DPO_SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class Steps:
    """Compiled entry points of one run, all bound to one mesh."""

    graphdef: nnx.GraphDef
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings: the Orbax restore target.
    abstract_base: Any  # The same for the base model's parameters (what `init_from` provides).
    init: Callable[[nnx.State | None], tuple[TrainState, Frozen]]
    init_frozen: Callable[[nnx.State | None], Frozen]  # The frozen part alone, for a resumed run.
    train: StepFn
    eval: Callable[[TrainState, Frozen, Batch], dict[str, Any]]


def batch_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    if config.train.objective == "dpo":
        return tuple(f"{side}_{name}" for side in DPO_SIDES for name in records.FIELDS)
    return records.FIELDS


def build_steps(
    config: ml_collections.ConfigDict, mesh: Mesh, optimizer: optax.GradientTransformation, schedule: optax.Schedule
) -> Steps:
    rules, train_cfg = config.logical_axis_rules, config.train
    trainable = TRAINABLE[train_cfg.trainable]
    dpo = train_cfg.objective == "dpo"

    def init(base: nnx.State | None) -> tuple[TrainState, Frozen]:
        """A fresh state; `base` (the pretrained parameters of `init_from`) replaces the initial weights."""
        _, params, rest = nnx.split(trained_model(config, base), trainable, ...)
        frozen = {"rest": rest}
        if dpo:
            frozen["reference"] = params  # The policy before training is the DPO reference.
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}, frozen

    abstract_model = nnx.eval_shape(lambda: trained_model(config, None))
    # Parameters are the model's only state (dropout keys are passed per call), so this split is exhaustive.
    graphdef = nnx.split(abstract_model, trainable, ...)[0]
    abstract_base = nnx.state(nnx.eval_shape(lambda: create_model(base_config(config))), nnx.Param)
    abstract_state, abstract_frozen = jax.eval_shape(init, abstract_base)
    state_shardings = sharding.tree_shardings(abstract_state, mesh, rules)
    frozen_shardings = sharding.tree_shardings(abstract_frozen, mesh, rules)
    base_shardings = sharding.tree_shardings(abstract_base, mesh, rules)
    batch_sharding = sharding.logical_sharding(mesh, rules, ("batch", "length"))
    batch_shardings = dict.fromkeys(batch_fields(config), batch_sharding)
    replicated = sharding.replicated(mesh)
    dropout = config.model.dropout_rate > 0 or (config.model.lora_rank > 0 and config.model.lora_dropout > 0)
    base_key = jax.random.key(config.seed)

    def lm_terms(model: Transformer, batch: Batch, key: jax.Array | None) -> tuple[jax.Array, dict, jax.Array]:
        features = model.features(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key=key)
        weights = losses.next_token_weights(batch["segment_ids"], batch["loss_mask"])
        if train_cfg.loss_chunk_size:
            cross_entropy, z_term, weight = losses.chunked_next_token_loss(
                features, model.logits, batch["tokens"], weights, train_cfg.z_loss, train_cfg.loss_chunk_size
            )
        else:
            cross_entropy, z_term, weight = losses.next_token_loss(
                model.logits(features), batch["tokens"], weights, train_cfg.z_loss
            )
        return cross_entropy + z_term, {"loss": cross_entropy}, weight

    def dpo_terms(
        model: Transformer, reference: Transformer, batch: Batch, key: jax.Array | None
    ) -> tuple[jax.Array, dict, jax.Array]:
        # Chosen and rejected responses go through the model as one batch of twice the rows.
        joined = {name: jnp.concatenate([batch[f"{side}_{name}"] for side in DPO_SIDES]) for name in records.FIELDS}
        weights = losses.next_token_weights(joined["segment_ids"], joined["loss_mask"])

        def logprobs(m: Transformer, k: jax.Array | None) -> tuple[jax.Array, jax.Array]:
            logits = m(joined["tokens"], joined["positions"], joined["segment_ids"], dropout_key=k)
            return jnp.split(losses.sequence_logprobs(logits, joined["tokens"], weights), 2)

        policy_chosen, policy_rejected = logprobs(model, key)
        reference_chosen, reference_rejected = jax.lax.stop_gradient(logprobs(reference, None))
        per_pair = losses.dpo_loss(
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            train_cfg.dpo_beta,
            train_cfg.dpo_label_smoothing,
        )
        sums = {name: jnp.sum(values) for name, values in per_pair.items()}
        return sums["loss"], sums, jnp.asarray(policy_chosen.shape[0], jnp.float32)

    def loss_terms(params: nnx.State, frozen: Frozen, batch: Batch, key: jax.Array | None):
        """(objective to differentiate, (metric sums, weight)); metrics are sums so accumulation is exact."""
        model = nnx.merge(graphdef, params, frozen["rest"])
        if dpo:
            objective, sums, weight = dpo_terms(
                model, nnx.merge(graphdef, frozen["reference"], frozen["rest"]), batch, key
            )
        else:
            objective, sums, weight = lm_terms(model, batch, key)
        return objective, (sums, weight)

    grad_fn = jax.value_and_grad(loss_terms, has_aux=True)

    def train_step(state: TrainState, frozen: Frozen, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        params, step = state["params"], state["step"]
        # Dropout masks depend only on (seed, step, microbatch), so a resumed run draws the same ones.
        step_key = jax.random.fold_in(base_key, step) if dropout else None

        def accumulate(carry: tuple, inputs: tuple) -> tuple[tuple, None]:
            grad_sum, sums, weight_sum = carry
            microbatch, index = inputs
            key = None if step_key is None else jax.random.fold_in(step_key, index)
            (_, (micro_sums, weight)), grads = grad_fn(params, frozen, microbatch, key)
            return (
                jax.tree.map(jnp.add, grad_sum, grads),
                jax.tree.map(jnp.add, sums, micro_sums),
                weight_sum + weight,
            ), None

        accum = train_cfg.grad_accum_steps
        microbatches = jax.tree.map(lambda x: _split_microbatches(x, accum), batch)
        zero_sums = jax.tree.map(
            jnp.zeros_like,
            jax.eval_shape(lambda: loss_terms(params, frozen, jax.tree.map(lambda x: x[0], microbatches), None)[1][0]),
        )
        zeros = (jax.tree.map(jnp.zeros_like, params), zero_sums, jnp.zeros((), jnp.float32))
        (grad_sum, sums, weight_sum), _ = jax.lax.scan(accumulate, zeros, (microbatches, jnp.arange(accum)))
        # Losses are sums: dividing once by the total weight makes accumulation equal the full batch.
        weight = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grad_sum)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"step": step + 1, "params": new_params, "opt_state": opt_state}
        # param_norm is of the *updated* parameters: the NaN guard checks it before saving them.
        metrics = {name: value / weight for name, value in sums.items()}
        metrics.update(
            grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(new_params), learning_rate=schedule(step)
        )
        return new_state, metrics

    def eval_step(state: TrainState, frozen: Frozen, batch: Batch) -> dict[str, Any]:
        _, (sums, weight) = loss_terms(state["params"], frozen, batch, None)
        return {"sums": sums, "weight": weight}

    return Steps(
        graphdef=graphdef,
        state_shardings=state_shardings,
        abstract_state=sharding.abstract_with_shardings(abstract_state, state_shardings),
        abstract_base=sharding.abstract_with_shardings(abstract_base, base_shardings),
        init=jax.jit(init, out_shardings=(state_shardings, frozen_shardings)),
        # XLA drops the unused train-state computation, so a resume never holds two full states at once.
        init_frozen=jax.jit(lambda base: init(base)[1], out_shardings=frozen_shardings),
        train=jax.jit(
            train_step,
            in_shardings=(state_shardings, frozen_shardings, batch_shardings),
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
        ),
        eval=jax.jit(
            eval_step, in_shardings=(state_shardings, frozen_shardings, batch_shardings), out_shardings=replicated
        ),
    )


def _split_microbatches(x: jax.Array, accum: int) -> jax.Array:
    """(batch, ...) -> (accum, batch // accum, ...), microbatch i taking rows i, i + accum, ...

    Rows are grouped so each device keeps its own rows: no data moves between devices.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
