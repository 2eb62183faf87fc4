"""The train state and the jitted, sharded init / train / eval steps, for every training mode.

One trainer serves pretraining and fine-tuning. The config chooses
  * which parameters train (`train.trainable`): all of them, only the LoRA adapters, or only the soft
    prompt (prompt tuning);
  * whether the frozen base is quantized (`train.quantize_base`: int4 with LoRA is QLoRA);
  * the objective (`train.objective`, llm/train/losses.py): next-token cross-entropy, DPO against a
    frozen reference, contrastive embedding training, or distillation from a frozen teacher (another run,
    loaded by llm/train/teacher.py, with a graph of its own).
The model's parameters are split into `params` (trainable: the only ones with optimizer state) and
`frozen` (the rest, plus the DPO reference). An objective's own parameters (the contrastive loss's learnable
temperature) join `params` as extra top-level entries rather than a new part of the state: the same code
then trains, clips, shards (replicated), checkpoints and resumes them with the model's (weight decay skips
them: they are no `kernel`), and loading a run for inference restores the model's entries only (a partial
restore), so it never sees them. The train state is a plain dict `{"step", "params",
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
from llm.model.transformer import create_model
from llm.runs.build import TRAINABLE, base_config, trained_model
from llm.train import losses, optimizer as optimizer_lib, teacher as teacher_lib

TrainState = dict[str, Any]
Frozen = dict[str, nnx.State]
Batch = losses.Batch
StepFn = Callable[[TrainState, Frozen, Batch], tuple[TrainState, dict[str, jax.Array]]]
# (params, frozen, batch, dropout key) -> (objective to differentiate, (metric sums, weight)).
LossFn = Callable[[nnx.State, Frozen, Batch, jax.Array | None], tuple[jax.Array, tuple[dict, jax.Array]]]
# The same arguments -> (what LossFn returns, gradients): jax.value_and_grad(loss_fn, has_aux=True).
GradFn = Callable[[nnx.State, Frozen, Batch, jax.Array | None], tuple[Any, nnx.State]]


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
    return losses.OBJECTIVES[config.train.objective].fields


def build_steps(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    teacher: teacher_lib.Teacher | None = None,
    num_steps: int | None = None,
) -> Steps:
    """The compiled steps of `config` on `mesh`, with the optimizer and learning-rate schedule of
    `config.optimizer` over `num_steps` (default config.train.num_steps); distillation needs its loaded `teacher`
    (teacher.load_teacher), whose parameters the steps then take as frozen["teacher"]."""
    num_steps = config.train.num_steps if num_steps is None else num_steps
    optimizer = optimizer_lib.make_optimizer(config.optimizer, num_steps)
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, num_steps)
    rules = config.logical_axis_rules
    trainable = TRAINABLE[config.train.trainable]
    objective = losses.OBJECTIVES[config.train.objective]
    if objective.teacher and teacher is None:
        raise ValueError(f"config.train.objective={config.train.objective!r} needs the loaded teacher.")
    init = _init_fn(config, trainable, optimizer, objective)
    # Parameters are the model's only state (dropout keys are passed per call), so this split is exhaustive.
    graphdef = nnx.split(nnx.eval_shape(lambda: trained_model(config, None)), trainable, ...)[0]
    abstract_base = nnx.state(nnx.eval_shape(lambda: create_model(base_config(config))), nnx.Param)
    abstract_state, abstract_frozen = jax.eval_shape(init, abstract_base)
    state_shardings, frozen_shardings, base_shardings = (
        sharding.tree_shardings(tree, mesh, rules) for tree in (abstract_state, abstract_frozen, abstract_base)
    )
    batch_shardings = dict.fromkeys(batch_fields(config), sharding.logical_sharding(mesh, rules, ("batch", "length")))
    loss_fn = _loss_fn(config, graphdef, objective, teacher.graphdef if teacher else None)

    def eval_step(state: TrainState, frozen: Frozen, batch: Batch) -> dict[str, Any]:
        _, (sums, weight) = loss_fn(state["params"], frozen, batch, None)
        return {"sums": sums, "weight": weight}

    # The teacher stays where it was loaded: placed by the same rules table (llm/train/teacher.py).
    step_frozen_shardings = (
        {**frozen_shardings, "teacher": teacher.shardings} if objective.teacher else frozen_shardings
    )
    inputs = (state_shardings, step_frozen_shardings, batch_shardings)
    replicated = sharding.replicated(mesh)
    return Steps(
        graphdef=graphdef,
        state_shardings=state_shardings,
        abstract_state=sharding.abstract_with_shardings(abstract_state, state_shardings),
        abstract_base=sharding.abstract_with_shardings(abstract_base, base_shardings),
        init=jax.jit(init, out_shardings=(state_shardings, frozen_shardings)),
        # XLA drops the unused train-state computation, so a resume never holds two full states at once.
        init_frozen=jax.jit(lambda base: init(base)[1], out_shardings=frozen_shardings),
        train=jax.jit(
            _train_step_fn(config, loss_fn, optimizer, schedule),
            in_shardings=inputs,
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
        ),
        eval=jax.jit(eval_step, in_shardings=inputs, out_shardings=replicated),
    )


def _init_fn(
    config: ml_collections.ConfigDict,
    trainable: type[nnx.Variable],
    optimizer: optax.GradientTransformation,
    objective: losses.Objective,
) -> Callable[[nnx.State | None], tuple[TrainState, Frozen]]:
    def init(base: nnx.State | None) -> tuple[TrainState, Frozen]:
        """A fresh state; `base` (the pretrained parameters of `init_from`) replaces the initial weights."""
        _, params, rest = nnx.split(trained_model(config, base), trainable, ...)
        frozen = {"rest": rest}
        if objective.reference:
            frozen["reference"] = params  # The policy before training is the DPO reference.
        own = objective.params(config.train)
        if own:
            params = nnx.State({**params, **own})
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}, frozen

    return init


def _loss_fn(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    objective: losses.Objective,
    teacher_graphdef: nnx.GraphDef | None,
) -> LossFn:
    own = tuple(objective.params(config.train))  # The objective's entries of `params` (see the docstring).

    def loss_fn(params: nnx.State, frozen: Frozen, batch: Batch, key: jax.Array | None):
        loss_params = {name: params[name][...] for name in own}
        if own:
            params = nnx.State({name: value for name, value in params.items() if name not in own})
        model = nnx.merge(graphdef, params, frozen["rest"])
        reference = None
        if objective.reference:
            reference = nnx.merge(graphdef, frozen["reference"], frozen["rest"])
        elif objective.teacher:
            reference = nnx.merge(teacher_graphdef, frozen["teacher"])
        value, sums, weight = objective.terms(model, reference, batch, key, config.train, loss_params)
        return value, (sums, weight)

    return loss_fn


def _train_step_fn(
    config: ml_collections.ConfigDict,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> StepFn:
    grad_fn = accumulate_gradients(jax.value_and_grad(loss_fn, has_aux=True), config.train.grad_accum_steps)
    model = config.model
    dropout = model.dropout_rate > 0 or (model.lora_rank > 0 and model.lora_dropout > 0)
    base_key = jax.random.key(config.seed)

    def train_step(state: TrainState, frozen: Frozen, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        params, step = state["params"], state["step"]
        # Dropout masks depend only on (seed, step, microbatch), so a resumed run draws the same ones.
        key = jax.random.fold_in(base_key, step) if dropout else None
        (_, (sums, weight_sum)), grad_sum = grad_fn(params, frozen, batch, key)
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

    return train_step


def accumulate_gradients(grad_fn: GradFn, accum_steps: int) -> GradFn:
    """`grad_fn` summed over `accum_steps` microbatches of the batch, in one `lax.scan`.

    Every output of `grad_fn` (objective, metric sums, weight, gradients) is summed, so with losses that are
    sums the result is the full batch's. Microbatch i gets the dropout key folded with i (even when there is
    only one), so masks depend on (seed, step, microbatch) alone.
    """

    def accumulated(params: nnx.State, frozen: Frozen, batch: Batch, key: jax.Array | None):
        microbatches = jax.tree.map(lambda x: _split_microbatches(x, accum_steps), batch)

        def add_microbatch(total: Any, inputs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
            microbatch, index = inputs
            micro_key = None if key is None else jax.random.fold_in(key, index)
            return jax.tree.map(jnp.add, total, grad_fn(params, frozen, microbatch, micro_key)), None

        first = jax.tree.map(lambda x: x[0], microbatches)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, frozen, first, key))
        total, _ = jax.lax.scan(add_microbatch, zeros, (microbatches, jnp.arange(accum_steps)))
        return total

    return accumulated


def _split_microbatches(x: jax.Array, accum: int) -> jax.Array:
    """(batch, ...) -> (accum, batch // accum, ...), microbatch i taking rows i, i + accum, ...

    Rows are grouped so each device keeps its own rows: no data moves between devices.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
