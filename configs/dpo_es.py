"""DPO preference alignment of the SFT model, with the SFT model itself as the frozen reference.

    python scripts/prepare_dpo.py --chatterbot --tokenizer=data/es_default/tokenizer.model \\
        --output_dir=data/dpo_demo --seq_len=256 --min_validation_pairs=8
    python scripts/train.py --config=configs/dpo_es.py --workdir=runs/dpo_es

Logs the DPO loss, reward accuracy and reward margins (train and validation).
"""

import ml_collections

from configs import tiny_es


def get_config() -> ml_collections.ConfigDict:
    config = tiny_es.get_config()
    config.init_from = "runs/sft_es"
    config.data.path = "data/dpo_demo"
    config.train.update(
        objective="dpo",
        dpo_beta=0.1,
        dpo_label_smoothing=0.0,
        num_steps=100,
        batch_size=8,
        eval_every=25,
        eval_batches=2,
        checkpoint_every=25,
        log_every=5,
    )
    config.optimizer.update(
        learning_rate=5e-5, warmup_steps=10, weight_decay=0.0, schedule="linear", final_lr_ratio=0.0
    )
    return config
