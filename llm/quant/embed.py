"""The token embedding table, quantized with Qwix's array API.

Qwix's PTQ rewrites matmuls (dot_general, einsum), but an embedding lookup is a gather, so the table is
quantized here with `qwix.quantize` instead: one scale per vocabulary row (int8), or per group of
`group_size` columns of a row (int4). A lookup gathers the int rows and their scales and dequantizes them;
the tied output projection (`attend`) is a Qwix dot_general against the quantized table, whose per-row
scales are exactly per-output-channel scales for the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx


class QuantizedEmbed(nnx.Module):
    """Drop-in replacement of `nnx.Embed` (`__call__` and `attend`) holding an int8 or int4 table."""

    def __init__(self, embed: nnx.Embed, qtype: jnp.dtype, group_size: int = 0, act_qtype: jnp.dtype | None = None):
        """`group_size` 0 gives one scale per row; `act_qtype` also quantizes the features in `attend`."""
        table = embed.embedding
        tiled_axes = {1: group_size} if group_size else {}
        quantized = qwix.quantize(table[...], qtype, channelwise_axes=(0,), tiled_axes=tiled_axes)
        # `replace` keeps the table's metadata (its logical axes), as Qwix does for the weights it quantizes
        # (llm.quant.ptq then drops the scale's axis that holds groups rather than channels).
        self.qvalue = table.replace(quantized.qvalue)
        self.scale = table.replace(quantized.scale)
        self.dtype = embed.dtype
        self.act_qtype = act_qtype

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Dequantized embeddings (..., features) of int token ids."""
        rows = qwix.QArray(jnp.take(self.qvalue[...], inputs, axis=0), jnp.take(self.scale[...], inputs, axis=0))
        return qwix.dequantize(rows).astype(self.dtype or jnp.float32)

    def attend(self, query: jax.Array) -> jax.Array:
        """Logits (..., num_embeddings): `query` times the transposed table, computed by Qwix."""
        table = qwix.QArray(self.qvalue[...], self.scale[...])
        contract = query.ndim - 1
        if self.act_qtype is not None:
            # Dynamic range: one scale per position, as Qwix's PTQ does for the inputs of the other matmuls.
            query = qwix.quantize(query, self.act_qtype, channelwise_axes=tuple(range(contract)))
        logits = qwix.dot_general(query, table, (((contract,), (1,)), ((), ())))
        return logits.astype(self.dtype or jnp.float32)
