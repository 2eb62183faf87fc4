"""Chat supervised fine-tuning of the quickstart model on Spanish dialogues (all parameters train).

    python scripts/prepare_sft.py --chatterbot --tokenizer=data/es_default/tokenizer.model \\
        --output_dir=data/sft_demo --seq_len=256 --min_validation_rows=8
    python scripts/train.py --config=configs/sft_es.py --workdir=runs/sft_es

Rows come from the chat template (llm/chat_template.py); the loss covers only the assistant's tokens.
"""

import ml_collections

from configs import tiny_es


def get_config() -> ml_collections.ConfigDict:
    config = tiny_es.get_config()
    config.init_from = "runs/tiny_es"
    config.data.path = "data/sft_demo"
    config.train.update(num_steps=200, batch_size=8, eval_every=50, eval_batches=4, checkpoint_every=50, log_every=10)
    config.optimizer.update(learning_rate=3e-4, warmup_steps=20, weight_decay=0.0)
    return config
