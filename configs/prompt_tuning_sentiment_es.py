"""Prompt tuning for 3-way Spanish sentiment: 20 learned virtual tokens in front of a frozen model.

    python scripts/prepare_sentiment_tuning.py --tokenizer=data/es_default/tokenizer.model \\
        --output_dir=data/sentiment_es
    python scripts/train.py --config=configs/prompt_tuning_sentiment_es.py --workdir=runs/prompt_sentiment_es
    python scripts/evaluate.py --workdir=runs/prompt_sentiment_es --tasks=sentiment --num_shots=0 --max_examples=-1

Only the soft prompt (20 x 256 = 5,120 parameters) trains; the rest of the quickstart model stays frozen,
and checkpoints hold only the prompt. It starts from embeddings of frequent pieces (Lester et al. 2021).
The data are the evaluation's zero-shot sentiment prompts of the train split with the loss on the label.
"""

import ml_collections

from configs import tiny_es


def get_config() -> ml_collections.ConfigDict:
    config = tiny_es.get_config()
    config.init_from = "runs/tiny_es"
    config.data.path = "data/sentiment_es"
    config.data.seq_len = 128
    config.model.soft_prompt_length = 20
    config.train.trainable = "soft_prompt"
    config.train.update(
        num_steps=300, batch_size=16, eval_every=100, eval_batches=8, checkpoint_every=100, log_every=10
    )
    # Lester et al. train the prompt with a learning rate of 0.3: a prompt is a few thousand parameters, and
    # only large steps move it far enough from its initialization.
    config.optimizer.update(learning_rate=0.1, warmup_steps=20, weight_decay=0.0, schedule="constant")
    return config
