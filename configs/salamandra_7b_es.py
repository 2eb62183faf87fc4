"""A 7B Salamandra-shaped model (BSC-LT/salamandra-7b) for pretraining or continued pretraining at pod scale.

Salamandra 7B is Llama 3 8B's architecture (configs/llama3_8b_es.py) with its own sizes: SwiGLU 11008 instead of
14336, RoPE theta 10000, RMSNorm eps 1e-6, and a 256,000-token vocabulary (a quarter of the parameters are
embeddings). The machine is the config's argument, as there:

    python scripts/train.py --config=configs/salamandra_7b_es.py:v5p-64 --workdir=... --distributed
    python scripts/train.py --config=configs/salamandra_7b_es.py:8xh100 --workdir=...

Continued pretraining from the released weights: import them first (scripts/import_hf.py) and set
`--config.init_from=THAT_RUN`.
"""

import ml_collections

from configs import llama3_8b_es


def get_config(machine: str = "v5p-64") -> ml_collections.ConfigDict:
    config = llama3_8b_es.get_config(machine)
    config.model.update(vocab_size=256000, mlp_dim=11008, rope_theta=10000.0, norm_eps=1e-6)
    config.train.loss_chunk_size = 512  # (positions, 256K vocabulary) logits a chunk at a time.
    return config
