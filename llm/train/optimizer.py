"""AdamW with warmup and a cosine / linear / constant schedule, global-norm clipping and selective decay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

# optimizer.schedule -> the decay after warmup, from (peak, final_lr_ratio, decay_steps); the keys are
# exactly configs.base.CHOICES["optimizer.schedule"] (tested).
SCHEDULES: dict[str, Callable[[float, float, int], optax.Schedule]] = {
    "cosine": lambda peak, ratio, steps: optax.cosine_decay_schedule(peak, steps, alpha=ratio),
    "linear": lambda peak, ratio, steps: optax.linear_schedule(peak, peak * ratio, steps),
    "constant": lambda peak, ratio, steps: optax.constant_schedule(peak),
}


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then the configured decay down to peak * final_lr_ratio."""
    warmup = optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1))
    decay = SCHEDULES[opt.schedule](opt.learning_rate, opt.final_lr_ratio, max(num_steps - opt.warmup_steps, 1))
    return optax.join_schedules([warmup, decay], boundaries=[opt.warmup_steps])


def weight_decay_mask(params: Any) -> Any:
    """True for weight matrices only.

    Norm scales, biases and embedding tables are left undecayed (the usual GPT/Llama practice): decaying
    them pulls normalization gains and rare-token embeddings towards zero for no regularization benefit.
    Flax names weight matrices `kernel` (Linear, Einsum), so the test is on the parameter's name; the shape
    cannot tell, because scanned layers give norm scales a second (layers) dimension.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _param_name(path) == "kernel", params)


def _param_name(path: tuple[Any, ...]) -> str:
    """The attribute name of a parameter, e.g. "kernel" for ('blocks', 0, 'mlp', 'up', 'kernel', 'value')."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n != "value"]
    return names[-1] if names else ""


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    transforms = []
    if opt.grad_clip_norm > 0:
        transforms.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    transforms.append(
        optax.adamw(
            learning_rate_schedule(opt, num_steps),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*transforms)
