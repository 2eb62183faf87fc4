"""The embedded default: a 5M-parameter Llama-style model that trains on a 2-core CPU in minutes."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    model = config.model
    model.vocab_size = 8192
    model.max_seq_len = 256
    model.num_layers = 4
    model.embed_dim = 256
    model.num_heads = 4
    model.num_kv_heads = 2
    model.mlp_dim = 704
    model.mlp_activation = "swiglu"
    model.norm = "rmsnorm"
    model.norm_eps = 1e-6

    config.data.seq_len = 256

    # 300 steps x 16 rows x 256 tokens = 1.2M tokens: about 8 minutes on 2 CPU cores.
    config.train.num_steps = 300
    config.train.batch_size = 16
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 8
    config.train.checkpoint_every = 100

    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 30
    return config
