"""HF tensor names -> our parameter paths, and the parameters streamed onto a mesh straight from disk.

Each of our parameters is created with `jax.make_array_from_callback`: every device's callback reads only
its own block from the memory-mapped checkpoint (llm/hf/safetensors_files.py), transformed into our layout,
so no host ever holds the checkpoint twice. HF stores Linear weights as (out, in) with heads flattened into
`out` (GPT-2's Conv1D as (in, out), query, key and value fused in one); our projections are einsum kernels with
the heads as their own axes (llm/model/attention.py). With scan_layers, a stacked parameter's block reads its
layers' tensors one by one (the dense blocks from `blocks`, the MoE blocks from `moe_blocks`: `stacked_layers`).

A mixture of experts (Mixtral, Qwen3-MoE) stores one tensor per expert ("{e}" in its table entry's name); our
`gate`, `up` and `down` stack the experts along a leading axis, read expert by expert as the layers are. The
transform of such an entry maps one expert's slice of our parameter to that expert's tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llm import sharding
from llm.hf import safetensors_files
from llm.model import moe
from llm.model.transformer import Transformer

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one of our parameters is laid out in its HF tensor."""

    name: str
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # our shape -> the HF tensor's shape
    read: Callable[[np.ndarray, Index, tuple[int, ...]], np.ndarray]  # (HF tensor, our block, our shape) -> block
    # Export: our whole array -> the HF tensor (or, for a fused HF tensor, its column block: see `export_tensors`).
    write: Callable[[np.ndarray], np.ndarray]


def _heads(index: slice, head_dim: int) -> slice:
    """The HF rows (heads flattened with head_dim) of a block of whole heads."""
    return slice(index.start * head_dim, index.stop * head_dim)


def _read_heads_in(t: np.ndarray, ix: Index, shape: tuple[int, ...]) -> np.ndarray:
    # ours (embed, heads, head_dim) = W.T with W: (heads * head_dim, embed)
    block = t[_heads(ix[1], shape[2]), ix[0]]
    return block.reshape(ix[1].stop - ix[1].start, shape[2], -1)[:, ix[2], :].transpose(2, 0, 1)


def _read_heads_out(t: np.ndarray, ix: Index, shape: tuple[int, ...]) -> np.ndarray:
    # ours (heads, head_dim, embed) = W.T with W: (embed, heads * head_dim)
    block = t[ix[2], _heads(ix[0], shape[1])]
    return block.reshape(-1, ix[0].stop - ix[0].start, shape[1])[:, :, ix[1]].transpose(1, 2, 0)


def _read_heads_bias(t: np.ndarray, ix: Index, shape: tuple[int, ...]) -> np.ndarray:
    # ours (heads, head_dim) from b: (heads * head_dim,)
    return t[_heads(ix[0], shape[1])].reshape(-1, shape[1])[:, ix[1]]


def _read_heads_rows(t: np.ndarray, ix: Index, shape: tuple[int, ...]) -> np.ndarray:
    # ours (heads, head_dim, embed) from W: (heads * head_dim, embed), a GPT-2 Conv1D stored (in, out)
    return t[_heads(ix[0], shape[1]), ix[2]].reshape(ix[0].stop - ix[0].start, shape[1], -1)[:, ix[1], :]


def _shifted(index: slice, offset: int) -> slice:
    return slice(index.start + offset, index.stop + offset)


def fused_heads_in(part: int, parts: int) -> Transform:
    """Our query, key or value kernel (embed, heads, head_dim) as the columns [part * width, (part + 1) * width)
    of a fused Conv1D weight (embed, parts * width), width = heads * head_dim: GPT-2's c_attn is [q | k | v]."""

    def read(t: np.ndarray, ix: Index, shape: tuple[int, ...]) -> np.ndarray:
        columns = _shifted(_heads(ix[1], shape[2]), part * shape[1] * shape[2])
        return t[ix[0], columns].reshape(-1, ix[1].stop - ix[1].start, shape[2])[:, :, ix[2]]

    return Transform(
        f"columns {part} of {parts} of a fused projection",
        lambda s: (s[0], parts * s[1] * s[2]),
        read,
        lambda a: a.reshape(a.shape[0], -1),  # (embed, heads, head_dim) -> (embed, heads * head_dim): its columns
    )


def fused_heads_bias(part: int, parts: int) -> Transform:
    """Our query, key or value bias (heads, head_dim) as the slice `part` of `parts` of a fused bias."""

    def read(t: np.ndarray, ix: Index, shape: tuple[int, ...]) -> np.ndarray:
        return t[_shifted(_heads(ix[0], shape[1]), part * shape[0] * shape[1])].reshape(-1, shape[1])[:, ix[1]]

    return Transform(
        f"slice {part} of {parts} of a fused bias", lambda s: (parts * s[0] * s[1],), read, lambda a: a.reshape(-1)
    )


COPY = Transform("copy", lambda s: s, lambda t, ix, s: t[ix], lambda a: a)
TRANSPOSE = Transform("transpose", lambda s: s[::-1], lambda t, ix, s: t[ix[::-1]].T, lambda a: a.T)
HEADS_IN = Transform(
    "split heads of an input projection",
    lambda s: (s[1] * s[2], s[0]),
    _read_heads_in,
    lambda a: a.reshape(a.shape[0], -1).T,  # (embed, heads, head_dim) -> (heads * head_dim, embed)
)
HEADS_OUT = Transform(
    "split heads of the output projection",
    lambda s: (s[2], s[0] * s[1]),
    _read_heads_out,
    lambda a: a.reshape(-1, a.shape[-1]).T,  # (heads, head_dim, embed) -> (embed, heads * head_dim)
)
HEADS_BIAS = Transform("split heads of a bias", lambda s: (s[0] * s[1],), _read_heads_bias, lambda a: a.reshape(-1))
HEADS_ROWS = Transform(
    "split heads of a Conv1D output projection",
    lambda s: (s[0] * s[1], s[2]),
    _read_heads_rows,
    lambda a: a.reshape(-1, a.shape[-1]),  # (heads, head_dim, embed) -> (heads * head_dim, embed)
)

# Our parameter path ("{i}": the layer) -> (HF tensor name, transform).
LLAMA = {
    "embed.embedding": ("model.embed_tokens.weight", COPY),
    "blocks.{i}.attention.query.kernel": ("model.layers.{i}.self_attn.q_proj.weight", HEADS_IN),
    "blocks.{i}.attention.key.kernel": ("model.layers.{i}.self_attn.k_proj.weight", HEADS_IN),
    "blocks.{i}.attention.value.kernel": ("model.layers.{i}.self_attn.v_proj.weight", HEADS_IN),
    "blocks.{i}.attention.out.kernel": ("model.layers.{i}.self_attn.o_proj.weight", HEADS_OUT),
    "blocks.{i}.mlp.gate.kernel": ("model.layers.{i}.mlp.gate_proj.weight", TRANSPOSE),
    "blocks.{i}.mlp.up.kernel": ("model.layers.{i}.mlp.up_proj.weight", TRANSPOSE),
    "blocks.{i}.mlp.down.kernel": ("model.layers.{i}.mlp.down_proj.weight", TRANSPOSE),
    "blocks.{i}.attention_norm.scale": ("model.layers.{i}.input_layernorm.weight", COPY),
    "blocks.{i}.mlp_norm.scale": ("model.layers.{i}.post_attention_layernorm.weight", COPY),
    "final_norm.scale": ("model.norm.weight", COPY),
    "unembed.kernel": ("lm_head.weight", TRANSPOSE),  # only untied models have unembed
}
MISTRAL = dict(LLAMA)
QWEN2 = {
    **LLAMA,
    "blocks.{i}.attention.query.bias": ("model.layers.{i}.self_attn.q_proj.bias", HEADS_BIAS),
    "blocks.{i}.attention.key.bias": ("model.layers.{i}.self_attn.k_proj.bias", HEADS_BIAS),
    "blocks.{i}.attention.value.bias": ("model.layers.{i}.self_attn.v_proj.bias", HEADS_BIAS),
}
QWEN3 = {
    **LLAMA,
    "blocks.{i}.attention.query_norm.scale": ("model.layers.{i}.self_attn.q_norm.weight", COPY),
    "blocks.{i}.attention.key_norm.scale": ("model.layers.{i}.self_attn.k_norm.weight", COPY),
}
# The routed experts of an MoE block ({e}: the expert): router (embed, experts) and, per expert, Linear weights.
_MIXTRAL_EXPERTS = {
    "blocks.{i}.mlp.router": ("model.layers.{i}.block_sparse_moe.gate.weight", TRANSPOSE),
    "blocks.{i}.mlp.gate": ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", TRANSPOSE),
    "blocks.{i}.mlp.up": ("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", TRANSPOSE),
    "blocks.{i}.mlp.down": ("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", TRANSPOSE),
}
# Every Mixtral layer is an MoE layer: no dense MLP entries.
MIXTRAL = {key: entry for key, entry in LLAMA.items() if ".mlp." not in key} | _MIXTRAL_EXPERTS
# Qwen3-MoE: Qwen3's attention; dense MLP layers (decoder_sparse_step > 1) as Qwen3's.
QWEN3_MOE = {
    **QWEN3,
    "blocks.{i}.mlp.router": ("model.layers.{i}.mlp.gate.weight", TRANSPOSE),
    "blocks.{i}.mlp.gate": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", TRANSPOSE),
    "blocks.{i}.mlp.up": ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", TRANSPOSE),
    "blocks.{i}.mlp.down": ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", TRANSPOSE),
}
# GPT-2's Conv1D layers store (in, out), which is our Linear layout; c_attn fuses query, key and value columns.
GPT2 = {
    "embed.embedding": ("transformer.wte.weight", COPY),
    "position_embed.embedding": ("transformer.wpe.weight", COPY),
    "blocks.{i}.attention_norm.scale": ("transformer.h.{i}.ln_1.weight", COPY),
    "blocks.{i}.attention_norm.bias": ("transformer.h.{i}.ln_1.bias", COPY),
    "blocks.{i}.attention.query.kernel": ("transformer.h.{i}.attn.c_attn.weight", fused_heads_in(0, 3)),
    "blocks.{i}.attention.key.kernel": ("transformer.h.{i}.attn.c_attn.weight", fused_heads_in(1, 3)),
    "blocks.{i}.attention.value.kernel": ("transformer.h.{i}.attn.c_attn.weight", fused_heads_in(2, 3)),
    "blocks.{i}.attention.query.bias": ("transformer.h.{i}.attn.c_attn.bias", fused_heads_bias(0, 3)),
    "blocks.{i}.attention.key.bias": ("transformer.h.{i}.attn.c_attn.bias", fused_heads_bias(1, 3)),
    "blocks.{i}.attention.value.bias": ("transformer.h.{i}.attn.c_attn.bias", fused_heads_bias(2, 3)),
    "blocks.{i}.attention.out.kernel": ("transformer.h.{i}.attn.c_proj.weight", HEADS_ROWS),
    "blocks.{i}.attention.out.bias": ("transformer.h.{i}.attn.c_proj.bias", COPY),
    "blocks.{i}.mlp_norm.scale": ("transformer.h.{i}.ln_2.weight", COPY),
    "blocks.{i}.mlp_norm.bias": ("transformer.h.{i}.ln_2.bias", COPY),
    "blocks.{i}.mlp.up.kernel": ("transformer.h.{i}.mlp.c_fc.weight", COPY),
    "blocks.{i}.mlp.up.bias": ("transformer.h.{i}.mlp.c_fc.bias", COPY),
    "blocks.{i}.mlp.down.kernel": ("transformer.h.{i}.mlp.c_proj.weight", COPY),
    "blocks.{i}.mlp.down.bias": ("transformer.h.{i}.mlp.c_proj.bias", COPY),
    "final_norm.scale": ("transformer.ln_f.weight", COPY),
    "final_norm.bias": ("transformer.ln_f.bias", COPY),
    "unembed.kernel": ("lm_head.weight", TRANSPOSE),  # only untied models have unembed
}
MAPPINGS = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": MISTRAL,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
    "GPT2LMHeadModel": GPT2,
    "MixtralForCausalLM": MIXTRAL,
    "Qwen3MoeForCausalLM": QWEN3_MOE,
}
# save_pretrained writes GPT-2's tensors under `transformer.`; the original OpenAI checkpoints have them bare.
OPTIONAL_PREFIXES = {"GPT2LMHeadModel": "transformer."}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one of our parameters comes from: one HF tensor, or with scan_layers one per layer (stacked); for
    an expert-stacked parameter, one per expert (of each layer, layer-major)."""

    names: tuple[str, ...]
    transform: Transform
    stacked: bool
    experts: int = 0  # HF tensors per layer, one per expert; 0: one tensor (per layer) for the whole parameter

    def leading_axes(self) -> int:
        """Axes of our parameter (layers, experts) that index HF tensors rather than their contents."""
        return int(self.stacked) + int(bool(self.experts))


STACKS = ("blocks", "moe_blocks")  # scanned stacks of Blocks (llm/model/transformer.py)


def stacked_layers(model_cfg: ml_collections.ConfigDict) -> dict[str, list[int]]:
    """The layer of each entry of the scanned stacks: `blocks` holds the dense layers, `moe_blocks` the MoE
    layers, each in depth order (transformer.py's _scan_groups runs them so)."""
    layers = range(model_cfg.num_layers)
    return {
        "blocks": [i for i in layers if not moe.is_moe_layer(model_cfg, i)],
        "moe_blocks": [i for i in layers if moe.is_moe_layer(model_cfg, i)],
    }


def _source(mapping: dict, path: tuple, stacks: dict[str, list[int]], num_experts: int) -> Source:
    """The HF tensors and transform of one of our parameter paths, e.g. ('blocks', 3, 'mlp', 'up', 'kernel'),
    or ('blocks', 'mlp', 'up', 'kernel') for a scanned stack's parameter (a leading `layers` axis over the
    layers `stacks` lists). An entry whose HF name holds "{e}" is read from `num_experts` tensors per layer."""
    parts = ["{i}" if isinstance(part, int) else str(part) for part in path]
    stacked = parts[0] in STACKS and "{i}" not in parts
    if stacked:
        parts[:1] = ["blocks", "{i}"]
    template = ".".join(parts)
    if template not in mapping:
        raise KeyError(f"No HF tensor is mapped to our parameter {'.'.join(map(str, path))!r}.")
    hf_name, transform = mapping[template]
    layers = stacks[path[0]] if stacked else [next((part for part in path if isinstance(part, int)), None)]
    experts = num_experts if "{e}" in hf_name else 0
    names = tuple(hf_name.format(i=layer, e=e) for layer in layers for e in (range(experts) if experts else [None]))
    return Source(names, transform, stacked, experts)


def _present(source: Source, available: dict[str, str], prefix: str) -> Source:
    """`source` with its names stripped of the architecture's optional prefix where only the bare name exists."""
    names = [
        name[len(prefix) :] if prefix and name.startswith(prefix) and name not in available else name
        for name in source.names
    ]
    return dataclasses.replace(source, names=tuple(names))


def _abstract_model(config: ml_collections.ConfigDict) -> Transformer:
    with sharding.no_eager_sharding():
        return nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(params=0)))


def abstract_params(model: Transformer, config: ml_collections.ConfigDict, mesh: Mesh) -> nnx.State:
    """The model's parameters as ShapeDtypeStructs carrying the shardings the rules table declares."""
    params = nnx.state(model, nnx.Param)
    return sharding.abstract_with_shardings(params, sharding.tree_shardings(params, mesh, config.logical_axis_rules))


def load_model(model_dir: str, architecture: str, config: ml_collections.ConfigDict, mesh: Mesh) -> Transformer:
    """`config`'s model with the HF checkpoint's weights, every parameter sharded on `mesh` as the rules say.

    Every tensor and its shape is checked before any data is read; errors name the tensor. With
    config.model.scan_layers the blocks' parameters are stacked over a leading `layers` axis, read layer by layer.
    """
    model = _abstract_model(config)
    targets = nnx.to_flat_state(abstract_params(model, config, mesh))
    available = safetensors_files.weight_map(model_dir)
    prefix = OPTIONAL_PREFIXES.get(architecture, "")
    stacks, num_experts = stacked_layers(config.model), config.model.num_experts
    sources = {
        path: _present(_source(MAPPINGS[architecture], path, stacks, num_experts), available, prefix)
        for path, _ in targets
    }
    tensors = safetensors_files.open_tensors(model_dir, sorted({name for s in sources.values() for name in s.names}))
    for path, target in targets:
        source, shape = sources[path], tuple(target.value.shape)
        expected = source.transform.hf_shape(shape[source.leading_axes() :])
        for name in source.names:
            if tuple(tensors[name].shape) != expected:
                raise ValueError(
                    f"Tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {expected} "
                    f"for our parameter {'.'.join(map(str, path))} {shape} ({source.transform.name})."
                )
    arrays = []
    for path, target in targets:
        arrays.append((path, _placed([tensors[n] for n in sources[path].names], sources[path], target)))
        for name in sources[path].names:
            safetensors_files.release(tensors[name])  # Now on the devices: the host need not keep its pages.
    nnx.update(model, nnx.from_flat_state(arrays))
    return model


def _placed(hf_tensors: list[np.ndarray], source: Source, target: nnx.Variable) -> nnx.Variable:
    shape, dtype, placement = tuple(target.value.shape), target.value.dtype, target.value.sharding
    read = source.transform.read
    per_layer = max(source.experts, 1)  # HF tensors per layer

    def layer_block(layer: int, index: Index, layer_shape: tuple[int, ...]) -> np.ndarray:
        """The block `index` of one layer's parameter (layer: its position in the stack, 0 unstacked)."""
        if not source.experts:
            return np.asarray(read(hf_tensors[layer], index, layer_shape), dtype=dtype)
        # Only the experts of this block, each read from its own tensor.
        tensors = hf_tensors[layer * per_layer : (layer + 1) * per_layer]
        experts = range(index[0].start, index[0].stop)
        return np.stack([np.asarray(read(tensors[e], index[1:], layer_shape[1:]), dtype=dtype) for e in experts])

    def block(index: Index) -> np.ndarray:
        # Open-ended slices made explicit, so the transforms can do arithmetic on them.
        index = tuple(slice(*ix.indices(n)[:2]) for ix, n in zip(index, shape))
        if source.stacked:  # Only the layers of this block, each read as an unstacked parameter.
            layers = range(index[0].start, index[0].stop)
            return np.stack([layer_block(layer, index[1:], shape[1:]) for layer in layers])
        return layer_block(0, index, shape)

    return target.replace(jax.make_array_from_callback(shape, placement, block))


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of an exported checkpoint and the parameters of ours it is written from, in column order; with
    `expert`, it is that expert's slice of each (a mixture of experts stores one tensor per expert)."""

    name: str
    parts: tuple[tuple[tuple, Transform], ...]  # (our parameter path, its transform)
    expert: int | None = None

    def select(self, array: jax.Array) -> jax.Array:
        """The slice of one of our (per-layer) parameters this tensor is written from."""
        return array if self.expert is None else array[self.expert]

    def shape(self, our_shapes: dict[tuple, tuple[int, ...]]) -> tuple[int, ...]:
        """The HF tensor's shape, from our parameters' shapes: each part's transform gives the whole tensor's (the
        written file checks that the assembled parts have it)."""
        path, transform = self.parts[0]
        return transform.hf_shape(our_shapes[path][0 if self.expert is None else 1 :])

    def assemble(self, arrays: list[np.ndarray]) -> np.ndarray:
        """The HF tensor from our arrays (one per part, in `parts` order, each already `select`ed)."""
        blocks = [transform.write(array) for (_, transform), array in zip(self.parts, arrays)]
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=-1)


def export_tensors(mapping: dict, paths: list[tuple], num_experts: int = 0) -> list[HFTensor]:
    """The HF tensors that our parameters `paths` (per layer, e.g. ('blocks', 3, 'mlp', 'up', 'kernel')) make;
    an expert-stacked parameter makes `num_experts` of them.

    Several parameters mapped to one HF tensor are its column blocks, in the order of their entries in
    `mapping`: a fused tensor such as GPT-2's c_attn (query | key | value) is one table entry per block.
    """
    order = {template: position for position, template in enumerate(mapping)}
    grouped: dict[str, list[tuple[int, tuple, Transform, int | None]]] = {}
    for path in paths:
        source = _source(mapping, path, {}, num_experts)  # Per-layer paths: one tensor each (or per expert).
        template = ".".join("{i}" if isinstance(part, int) else str(part) for part in path)
        for position, name in enumerate(source.names):
            expert = position if source.experts else None
            grouped.setdefault(name, []).append((order[template], path, source.transform, expert))
    return [
        HFTensor(name, tuple((path, t) for _, path, t, _ in sorted(parts, key=lambda p: p[0])), parts[0][3])
        for name, parts in grouped.items()
    ]
