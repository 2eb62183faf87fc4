"""Distilling a tiny_es-shaped student from a teacher run (llm/train/teacher.py):

    python scripts/train.py --config=configs/distill_es.py --workdir=runs/distilled \
        --config.data.path=data/es_default --config.train.teacher=runs/teacher_es

The loss is alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy over the loss-masked
next-token predictions; metrics.jsonl logs both parts (distill_kl, distill_ce) beside the mixed loss.
"""

import ml_collections

from configs import tiny_es


def get_config() -> ml_collections.ConfigDict:
    config = tiny_es.get_config()
    config.train.objective = "distill"
    config.train.teacher = ""  # Required: the teacher's run directory (--config.train.teacher=RUN).
    config.train.distill_alpha = 0.5
    config.train.distill_temperature = 1.0
    return config
