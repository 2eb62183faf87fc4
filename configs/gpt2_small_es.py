"""GPT-2-small shape: 12 layers, 768 wide, 12 heads, learned absolute positions, LayerNorm, GELU, tied
embeddings, biases. 110M parameters with our 32K Spanish vocabulary (GPT-2's 50K vocabulary makes it 124M).
bfloat16 compute for accelerators."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    model = config.model
    model.vocab_size = 32000
    model.max_seq_len = 1024
    model.num_layers = 12
    model.embed_dim = 768
    model.num_heads = 12
    model.num_kv_heads = 12
    model.mlp_dim = 3072
    model.mlp_activation = "gelu"
    model.norm = "layernorm"
    model.position_encoding = "learned"
    model.use_bias = True
    model.tie_embeddings = True
    model.scan_layers = True
    model.dtype = "bfloat16"

    config.data.seq_len = 1024
    config.train.batch_size = 256
    config.train.loss_chunk_size = 256  # 32K-vocab float32 logits of a whole batch would not fit.
    config.train.num_steps = 20000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.optimizer.learning_rate = 6e-4
    config.optimizer.warmup_steps = 700
    return config
