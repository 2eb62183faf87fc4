"""QLoRA chat fine-tuning: the LoRA recipe of lora_es.py on a frozen base quantized to int4 by Qwix.

    python scripts/train.py --config=configs/qlora_es.py --workdir=runs/qlora_es
    python scripts/merge_lora.py --workdir=runs/qlora_es --output=runs/qlora_es_merged   # optional

At start-up the float base of `init_from` is loaded and quantized (int4 weights, one float32 scale per
group of 128 inputs; embeddings included); the adapters train in float32 on top of it. Checkpoints hold only
the adapters. Loading the run (or merge_lora.py) merges them into the dequantized base.
"""

import ml_collections

from configs import lora_es


def get_config() -> ml_collections.ConfigDict:
    config = lora_es.get_config()
    config.train.update(quantize_base="int4", quantize_group_size=128)
    return config
