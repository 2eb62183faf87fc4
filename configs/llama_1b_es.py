"""A 1.1B-parameter Llama-style model: 16 layers, 2048 wide, 32 query / 8 key-value heads (GQA), SwiGLU,
RoPE, RMSNorm, untied embeddings. FSDP over all devices, bfloat16 compute, scanned and rematerialized layers."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    model = config.model
    model.vocab_size = 32000
    model.max_seq_len = 2048
    model.num_layers = 16
    model.embed_dim = 2048
    model.num_heads = 32
    model.num_kv_heads = 8
    model.mlp_dim = 8192
    model.mlp_activation = "swiglu"
    model.norm = "rmsnorm"
    model.norm_eps = 1e-5
    model.position_encoding = "rope"
    model.rope_theta = 500000.0
    model.tie_embeddings = False
    model.scan_layers = True
    model.remat_policy = "save_dots"
    model.dtype = "bfloat16"

    config.data.seq_len = 2048
    config.train.batch_size = 256
    config.train.loss_chunk_size = 256  # 32K-vocab float32 logits of a whole batch would not fit.
    config.train.num_steps = 50000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.z_loss = 1e-4
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 2000
    return config
