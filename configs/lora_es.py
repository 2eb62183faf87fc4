"""LoRA chat fine-tuning: rank-8 adapters on the attention and MLP projections, every base weight frozen.

    python scripts/train.py --config=configs/lora_es.py --workdir=runs/lora_es
    python scripts/merge_lora.py --workdir=runs/lora_es --output=runs/lora_es_merged   # optional

Checkpoints hold only the adapters (and their optimizer state); the base comes from `init_from`.
"""

import ml_collections

from configs import sft_es


def get_config() -> ml_collections.ConfigDict:
    config = sft_es.get_config()
    config.model.update(
        lora_rank=8,
        lora_alpha=16.0,
        lora_dropout=0.05,
        lora_targets="attention/(query|key|value|out)|mlp/(gate|up|down)",
    )
    config.train.trainable = "lora"
    config.optimizer.update(learning_rate=2e-3, warmup_steps=20, weight_decay=0.0)
    return config
