"""The train state and the jitted, sharded init / train / eval steps.

The train state is a plain dict `{"step", "params", "opt_state"}`: `params` is the nnx.State of the model's
parameters and the model's structure (the graphdef) stays outside, closed over by the steps. Every jitted
function declares its input and output shardings, derived from the logical axis rules, and the train
step donates the old state so parameters and optimizer moments are updated in place.
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
from llm.model.transformer import Transformer
from llm.train import losses

TrainState = dict[str, Any]
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Steps:
    """Compiled entry points of one run, all bound to one mesh."""

    graphdef: nnx.GraphDef
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings: the Orbax restore target.
    init: Callable[[], TrainState]
    train: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval: Callable[[TrainState, Batch], dict[str, jax.Array]]


def create_model(config: ml_collections.ConfigDict) -> Transformer:
    """The model with freshly initialized parameters (seeded by `config.seed`), unsharded."""
    with sharding.no_eager_sharding():
        return Transformer(config.model, rngs=nnx.Rngs(params=config.seed))


def build_steps(config: ml_collections.ConfigDict, mesh: Mesh, optimizer: optax.GradientTransformation,
                schedule: optax.Schedule) -> Steps:
    rules = config.logical_axis_rules

    def init() -> TrainState:
        params = nnx.state(create_model(config), nnx.Param)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

    abstract_model = nnx.eval_shape(lambda: create_model(config))
    # Parameters are the model's only state (dropout keys are passed per call), so split(model, Param) is
    # exhaustive; anything else stored on a module would make this raise.
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    abstract_state = jax.eval_shape(init)
    state_shardings = sharding.tree_shardings(abstract_state, mesh, rules)
    batch_sharding = sharding.logical_sharding(mesh, rules, ("batch", "length"))
    replicated = sharding.replicated(mesh)

    train_cfg, dropout = config.train, config.model.dropout_rate > 0
    base_key = jax.random.key(config.seed)

    def loss_terms(params: nnx.State, batch: Batch, key: jax.Array | None) -> tuple[jax.Array, tuple]:
        model = nnx.merge(graphdef, params)
        features = model.features(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key=key)
        weights = losses.next_token_weights(batch["segment_ids"], batch["loss_mask"])
        if train_cfg.loss_chunk_size:
            cross_entropy, z_term, weight = losses.chunked_next_token_loss(
                features, model.logits, batch["tokens"], weights, train_cfg.z_loss, train_cfg.loss_chunk_size)
        else:
            cross_entropy, z_term, weight = losses.next_token_loss(
                model.logits(features), batch["tokens"], weights, train_cfg.z_loss)
        return cross_entropy + z_term, (cross_entropy, weight)

    grad_fn = jax.value_and_grad(loss_terms, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        params, step = state["params"], state["step"]
        # Dropout masks depend only on (seed, step, microbatch), so a resumed run draws the same ones.
        step_key = jax.random.fold_in(base_key, step) if dropout else None

        def accumulate(carry: tuple, inputs: tuple) -> tuple[tuple, None]:
            grad_sum, loss_sum, weight_sum = carry
            microbatch, index = inputs
            key = None if step_key is None else jax.random.fold_in(step_key, index)
            (_, (cross_entropy, weight)), grads = grad_fn(params, microbatch, key)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + cross_entropy, weight_sum + weight), None

        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        accum = train_cfg.grad_accum_steps
        microbatches = jax.tree.map(lambda x: _split_microbatches(x, accum), batch)
        (grad_sum, loss_sum, weight_sum), _ = jax.lax.scan(accumulate, zeros, (microbatches, jnp.arange(accum)))
        # Losses are sums over tokens: dividing once by the total weight makes accumulation exact.
        weight = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grad_sum)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"step": step + 1, "params": new_params, "opt_state": opt_state}
        # param_norm is of the *updated* parameters: the NaN guard checks it before saving them.
        metrics = {"loss": loss_sum / weight, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(new_params), "learning_rate": schedule(step)}
        return new_state, metrics

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        _, (cross_entropy, weight) = loss_terms(state["params"], batch, None)
        return {"loss_sum": cross_entropy, "weight": weight}

    batch_shardings = {name: batch_sharding for name in ("tokens", "segment_ids", "positions", "loss_mask")}
    return Steps(
        graphdef=graphdef,
        state_shardings=state_shardings,
        abstract_state=sharding.abstract_with_shardings(abstract_state, state_shardings),
        init=jax.jit(init, out_shardings=state_shardings),
        train=jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
        eval=jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings), out_shardings=replicated),
    )


def _split_microbatches(x: jax.Array, accum: int) -> jax.Array:
    """(batch, ...) -> (accum, batch // accum, ...), microbatch i taking rows i, i + accum, ...

    Rows are grouped so each device keeps its own rows: no data moves between devices.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
