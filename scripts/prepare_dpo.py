"""Prepares DPO preference data: JSONL of {"prompt", "chosen", "rejected"} -> one record per pair.

    python scripts/prepare_dpo.py --input=prefs.jsonl --tokenizer=data/es_default/tokenizer.model \
        --output_dir=data/dpo_es --seq_len=256 [--on_error=raise|skip]
    python scripts/prepare_dpo.py --chatterbot --tokenizer=... --output_dir=data/dpo_chatterbot_es

"prompt" is a string (one user turn) or a list of chat messages ending with a user turn; "chosen" and
"rejected" are answers. With --chatterbot, a demo set is built from the Spanish chatterbot-corpus dialogues
(chosen: the real answer; rejected: an answer from a dialogue of another category) and written to
DIR/prefs.jsonl first. Writes DIR/train/, DIR/validation/ (records.encode_pair records), DIR/tokenizer.model
and DIR/report.json. See llm/finetune_data/preference.py for the row layout and the length policy.
"""

import json

import finetune_flags
from absl import app, flags

from llm.finetune_data import preference, sft

_MIN_VALIDATION_PAIRS = flags.DEFINE_integer(
    "min_validation_pairs",
    1,
    "At least this many validation pairs (set it to the training batch size: evaluation needs a full batch).",
)
flags.adopt_module_key_flags(finetune_flags)  # --help lists the shared flags too.


def _write_chatterbot_pairs(path: str) -> dict:
    pairs = preference.chatterbot_preferences(sft.chatterbot_dialogues("spanish"))
    sft.write_jsonl(pairs, path)
    print(f"Wrote {len(pairs)} chatterbot preference pairs to {path}.")
    return {
        "chatterbot_corpus": "spanish",
        "pairs": len(pairs),
        "rejected": "an answer from a dialogue of another category",
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    path, source = finetune_flags.input_path("prefs.jsonl", _write_chatterbot_pairs)
    report = finetune_flags.prepare(
        preference.prepare_dpo,
        path,
        min_validation_pairs=_MIN_VALIDATION_PAIRS.value,
        source=source,
        **finetune_flags.decontamination_options(),
    )
    print(json.dumps({key: report[key] for key in ("pairs", "drops", "mean_tokens", "splits")}, ensure_ascii=False))
    print(f"Wrote {finetune_flags.OUTPUT_DIR.value}/train/, validation/, tokenizer.model and report.json.")


if __name__ == "__main__":
    app.run(main)
