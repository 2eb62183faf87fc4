"""A teacher for distilling tiny_es (scripts/distill_demo.sh): half as wide again (384) with a wider MLP, trained
on three times the tokens of the demo's students; about 2x tiny_es's cost per token."""

import ml_collections

from configs import tiny_es


def get_config() -> ml_collections.ConfigDict:
    config = tiny_es.get_config()
    model = config.model
    model.embed_dim = 384
    model.num_heads = 6  # head_dim 64, as tiny_es
    model.num_kv_heads = 2
    model.mlp_dim = 1024

    config.train.num_steps = 150
    config.train.batch_size = 16
    config.train.eval_every = 50
    config.train.checkpoint_every = 50
    config.optimizer.warmup_steps = 15
    return config
