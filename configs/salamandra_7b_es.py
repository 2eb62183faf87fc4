"""A 7B Salamandra-shaped model (BSC-LT/salamandra-7b) for pretraining or continued pretraining at pod scale.

Salamandra 7B's shape: 32 layers, 4096 wide, 32 query / 8 key-value heads, SwiGLU 11008, RoPE theta 10000,
RMSNorm (eps 1e-6), untied 256,000-token vocabulary (a quarter of the parameters are embeddings), 8192 context.
The machine is the config's argument, as in configs/llama3_8b_es.py:

    python scripts/train.py --config=configs/salamandra_7b_es.py:v5p-64 --workdir=... --distributed
    python scripts/train.py --config=configs/salamandra_7b_es.py:8xh100 --workdir=...

Continued pretraining from the released weights: import them first (scripts/import_hf.py) and set
`--config.init_from=THAT_RUN`.
"""

import ml_collections

from configs import base


def get_config(machine: str = "v5p-64") -> ml_collections.ConfigDict:
    config = base.get_config()
    model = config.model
    model.vocab_size = 256000
    model.max_seq_len = 8192
    model.num_layers = 32
    model.embed_dim = 4096
    model.num_heads = 32
    model.num_kv_heads = 8
    model.mlp_dim = 11008
    model.mlp_activation = "swiglu"
    model.norm = "rmsnorm"
    model.norm_eps = 1e-6
    model.position_encoding = "rope"
    model.rope_theta = 10000.0
    model.tie_embeddings = False
    model.scan_layers = True
    model.dtype = "bfloat16"

    config.data.seq_len = 8192
    config.train.loss_chunk_size = 512  # (positions, 256K vocabulary) logits a chunk at a time.
    config.train.num_steps = 100000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 500
    config.train.z_loss = 1e-4
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 2000
    return base.for_machine(config, machine)
