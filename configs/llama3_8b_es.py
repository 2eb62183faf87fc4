"""An 8B Llama-3-shaped model for pretraining or continued pretraining on a pod slice or a GPU node.

Llama 3 8B's shape: 32 layers, 4096 wide, 32 query / 8 key-value heads, SwiGLU 14336, RoPE theta 500000,
RMSNorm, untied 128,256-token vocabulary, 8192 context. The machine is the config's argument, which sets the
mesh, the batch and the rematerialization that fit it (checked with `scripts/train.py --dry_run`, README
"Pod-scale recipes"):

    python scripts/train.py --config=configs/llama3_8b_es.py:v5p-64 --workdir=... --distributed
    python scripts/train.py --config=configs/llama3_8b_es.py:8xh100 --workdir=...
"""

import ml_collections

from configs import base


def get_config(machine: str = "v5p-64") -> ml_collections.ConfigDict:
    config = base.get_config()
    model = config.model
    model.vocab_size = 128256
    model.max_seq_len = 8192
    model.num_layers = 32
    model.embed_dim = 4096
    model.num_heads = 32
    model.num_kv_heads = 8
    model.mlp_dim = 14336
    model.mlp_activation = "swiglu"
    model.norm = "rmsnorm"
    model.norm_eps = 1e-5
    model.position_encoding = "rope"
    model.rope_theta = 500000.0
    model.tie_embeddings = False
    model.scan_layers = True
    model.dtype = "bfloat16"

    config.data.seq_len = 8192
    config.train.loss_chunk_size = 1024  # (positions, 128K vocabulary) logits a chunk at a time.
    config.train.num_steps = 100000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 500
    config.train.z_loss = 1e-4
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 2000
    return base.for_machine(config, machine)
