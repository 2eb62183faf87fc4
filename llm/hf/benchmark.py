"""Import cost of a Hugging Face checkpoint: peak host memory and wall time, against the checkpoint's size.

The import runs in a child process, so its peak resident set is measured alone (`ru_maxrss` of the child),
and is reported as a multiple of the checkpoint's bytes: streaming each device's block straight from the
memory-mapped files must keep it near 1x (the placed parameters) rather than 2x (a full copy in between).
The time is set beside the time to read the same files once, the floor any import has to pay.

Without a model directory, a synthetic Llama-shaped checkpoint of the Llama-3.2-1B shape (1.24B parameters,
bfloat16, two shards) is written first with `safetensors` (it needs torch, from the test extra). The decode
comparison with transformers (scripts/benchmark.py decode --compare) writes one shaped like a run config's model
(`llama_sizes`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import ml_collections

from llm.hf import exporter, safetensors_files

# Llama 3.2 1B: 16 layers, 2048 wide, 32 query and 8 key/value heads, SwiGLU 8192, 128K vocabulary, tied.
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
READ_CHUNK = 64 << 20


def llama_sizes(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config.json sizes of a Llama checkpoint shaped like this run config's model (the decode comparison's
    default model); a model that does not export as a Llama is refused, naming why."""
    arch = exporter.architecture(config)
    if arch.model_type != "llama":
        raise exporter.UnsupportedRun(f"The decode comparison needs a Llama-shaped model, not a {arch.name}.")
    model = config.model
    return {"vocab_size": model.vocab_size, **arch.config_keys(model), "tie_word_embeddings": model.tie_embeddings}


def llama_tensor_shapes(sizes: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The safetensors names and shapes of a Llama checkpoint of these sizes, as transformers saves it."""
    hidden, inner, vocab = sizes["hidden_size"], sizes["intermediate_size"], sizes["vocab_size"]
    head_dim = sizes.get("head_dim") or hidden // sizes["num_attention_heads"]
    queries, kv = sizes["num_attention_heads"] * head_dim, sizes["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(sizes["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (queries, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, queries),
            prefix + "mlp.gate_proj.weight": (inner, hidden),
            prefix + "mlp.up_proj.weight": (inner, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inner),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        }
    if not sizes["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_synthetic_llama(model_dir: str, sizes: dict[str, Any] = LLAMA_1B, num_shards: int = 2) -> None:
    """A random bfloat16 Llama checkpoint (config.json, shards, index) written with safetensors' torch API."""
    import torch
    from safetensors.torch import save_file

    shapes = llama_tensor_shapes(sizes)
    names = list(shapes)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[shard * per_shard : (shard + 1) * per_shard]
        tensors = {name: (0.02 * torch.randn(shapes[name], generator=generator)).to(torch.bfloat16) for name in chunk}
        save_file(tensors, os.path.join(model_dir, file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chunk, file)
        del tensors
    with open(os.path.join(model_dir, safetensors_files.INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", **sizes}
    with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def checkpoint_bytes(model_dir: str) -> int:
    files = set(safetensors_files.weight_map(model_dir).values())
    return sum(os.path.getsize(os.path.join(model_dir, file)) for file in files)


def read_seconds(model_dir: str) -> float:
    """Time to read every checkpoint file once (from the page cache when they were just written)."""
    start = time.perf_counter()
    for file in set(safetensors_files.weight_map(model_dir).values()):
        with open(os.path.join(model_dir, file), "rb", buffering=0) as f:
            while f.read(READ_CHUNK):
                pass
    return time.perf_counter() - start


def _import_in_child(model_dir: str, output_dir: str, dtype: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in bytes) of `importer.import_hf` run alone in a fresh Python process."""
    code = (
        "import sys; from llm.hf import importer; "
        "importer.import_hf(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, model_dir, output_dir, dtype], check=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        raise RuntimeError("The import's peak RSS is hidden by an earlier, larger child process.")
    return seconds, peak_kib * 1024


def benchmark_import(model_dir: str | None = None, dtype: str = "bfloat16") -> dict[str, Any]:
    """Peak RSS and time of importing `model_dir` (default: a synthetic 1.24B Llama) into a run of `dtype`."""
    with tempfile.TemporaryDirectory() as scratch:
        if model_dir is None:
            model_dir = os.path.join(scratch, "synthetic_llama")
            os.makedirs(model_dir)
            write_synthetic_llama(model_dir)
        size = checkpoint_bytes(model_dir)
        read_s = read_seconds(model_dir)
        import_s, peak_rss = _import_in_child(model_dir, os.path.join(scratch, "run"), dtype)
    return {
        "benchmark": "import_hf",
        "dtype": dtype,
        "checkpoint_gib": size / 2**30,
        "peak_rss_gib": peak_rss / 2**30,
        "peak_rss_over_checkpoint": peak_rss / size,
        "import_s": import_s,
        "read_files_s": read_s,
        "import_over_read": import_s / read_s,
    }
