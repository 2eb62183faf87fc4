"""Training that starts from any run directory, trained here or imported from Hugging Face: the run's model
(and context length) with `init_from` set to it, and the base training defaults.

    python scripts/train.py --config=configs/from_run.py:runs/qwen2.5-0.5b --workdir=runs/qwen_es \\
        --config.data.path=data/es_qwen --config.train.num_steps=2000 --config.train.batch_size=16
    # LoRA instead of all parameters:
    #   --config.train.trainable=lora --config.model.lora_rank=16 --config.optimizer.weight_decay=0

The text after the colon is the run directory. Everything else is a flag away, as for any recipe.
"""

import json
import os

import ml_collections

from configs import base


def get_config(run_dir: str) -> ml_collections.ConfigDict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"configs/from_run.py:{run_dir}: {path!r} not found (a run directory has one).")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    config = base.get_config()
    config.model.update(saved["model"])
    config.data.seq_len = saved["data"]["seq_len"]
    config.chat = saved.get("chat", False)
    config.init_from = os.path.abspath(run_dir)
    return config
