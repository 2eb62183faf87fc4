"""An 8B Llama-3-shaped model for pretraining or continued pretraining on a pod slice or a GPU node.

Llama 3 8B is llama_1b_es's architecture (32 query / 8 key-value heads, SwiGLU, RoPE theta 500000, RMSNorm,
untied embeddings) at 32 layers, 4096 wide, SwiGLU 14336, with a 128,256-token vocabulary and 8192 context. The
machine is the config's argument, which sets the mesh, the batch and the rematerialization that fit it (checked
with `scripts/train.py --dry_run`, README "Pod-scale recipes"):

    python scripts/train.py --config=configs/llama3_8b_es.py:v5p-64 --workdir=... --distributed
    python scripts/train.py --config=configs/llama3_8b_es.py:8xh100 --workdir=...
"""

import ml_collections

from configs import base, llama_1b_es


def get_config(machine: str = "v5p-64") -> ml_collections.ConfigDict:
    config = llama_1b_es.get_config()
    config.model.update(vocab_size=128256, max_seq_len=8192, num_layers=32, embed_dim=4096, mlp_dim=14336)
    config.data.seq_len = 8192
    config.train.loss_chunk_size = 1024  # (positions, 128K vocabulary) logits a chunk at a time.
    config.train.num_steps = 100000
    config.train.checkpoint_every = 500
    return base.for_machine(config, machine)
