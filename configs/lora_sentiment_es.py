"""LoRA for the 3-way Spanish sentiment demo: prompt tuning's data and schedule, rank-4 adapters instead.

    python scripts/train.py --config=configs/lora_sentiment_es.py --workdir=runs/lora_sentiment_es

The side-by-side comparison with zero-shot prompting and prompt tuning is scripts/sentiment_demo.sh.
"""

import ml_collections

from configs import prompt_tuning_sentiment_es


def get_config() -> ml_collections.ConfigDict:
    config = prompt_tuning_sentiment_es.get_config()
    config.model.soft_prompt_length = 0
    config.model.update(lora_rank=4, lora_alpha=8.0, lora_dropout=0.05, lora_targets="attention/(query|value)")
    config.train.trainable = "lora"
    config.optimizer.update(learning_rate=2e-3, schedule="cosine")
    return config
