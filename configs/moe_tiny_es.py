"""tiny_es with mixture-of-experts layers: 8 experts of half tiny_es's MLP width, top-2, in every layer.

A token runs through 2 experts of width 352, the same active MLP parameters as tiny_es's one MLP of width 704
(plus a 256 x 8 router per layer), with four times the MLP parameters in all: the pair for comparing a sparse
model with the dense model of the same compute (`scripts/benchmark.py train`, README).
"""

import ml_collections

from configs import tiny_es


def get_config() -> ml_collections.ConfigDict:
    config = tiny_es.get_config()
    model = config.model
    model.num_experts = 8
    model.experts_per_token = 2
    model.moe_every = 1
    model.moe_mlp_dim = model.mlp_dim // 2
    model.router_aux_loss_coef = 0.01
    model.router_z_loss_coef = 0.001
    return config
