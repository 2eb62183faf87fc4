"""The stacked expert weights of a mixture-of-experts layer, quantized with Qwix's array API.

Qwix's PTQ intercepts einsums and dot_generals, but the dropless MoE layer multiplies its experts with
`jax.lax.ragged_dot`, which Qwix does not rewrite, so those weights are quantized here instead (as the
embedding table is, llm/quant/embed.py): weight-only, one scale per (expert, output channel), or with int4 per
group of inputs of each. The layer reads a weight as `weight[...]`; `QuantizedExperts` answers that with the
dequantized float array, so the grouped matmuls (and the masked reference) run on the dequantized weights: the
memory of the stored weights shrinks, their matmuls do not run in int8. The inputs of the expert matmuls are
never quantized (hence no int8_act for MoE models: see llm/quant/ptq.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx


class QuantizedExperts(nnx.Module):
    """An int8 or int4 stacked expert weight (experts, in, out) standing in for its nnx.Param."""

    def __init__(self, weight: nnx.Param, qtype: jnp.dtype, group_size: int | None = None):
        """`group_size` None: one scale per (expert, output channel); else groups of that many inputs."""
        tiled_axes = {1: group_size} if group_size else {}
        quantized = qwix.quantize(weight[...], qtype, channelwise_axes=(0, 2), tiled_axes=tiled_axes)
        # `replace` keeps the weight's logical axes (llm.quant.ptq then drops the scale's axis of groups).
        self.qvalue = weight.replace(quantized.qvalue)
        self.scale = weight.replace(quantized.scale)
        self.dtype = weight[...].dtype

    def __getitem__(self, index: object) -> jax.Array:
        """The dequantized weight (or a slice of it), in the float dtype it had."""
        return qwix.dequantize(qwix.QArray(self.qvalue[...], self.scale[...])).astype(self.dtype)[index]
