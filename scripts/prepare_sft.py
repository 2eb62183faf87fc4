"""Prepares supervised fine-tuning data: chat JSONL -> packed rows whose loss covers the assistant's tokens.

    python scripts/prepare_sft.py --input=chats.jsonl --tokenizer=data/es_default/tokenizer.model \
        --output_dir=data/sft_es --seq_len=256 [--on_error=raise|skip] [--validation_fraction=0.05]
    python scripts/prepare_sft.py --chatterbot --tokenizer=... --output_dir=data/sft_chatterbot_es

Input: one `{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}` per line. With
--chatterbot, the Spanish dialogues of the chatterbot-corpus package (pip install -e '.[finetune]') are
converted to that format first and written to DIR/chats.jsonl. Writes DIR/train/, DIR/validation/,
DIR/tokenizer.model and DIR/report.json (conversations kept, truncated and dropped by reason, tokens, rows,
assistant-token fraction). See llm/finetune_data/sft.py for the length policy.
"""

import collections
import json

import finetune_flags
from absl import app, flags

from llm.finetune_data import sft

_MIN_VALIDATION_ROWS = flags.DEFINE_integer(
    "min_validation_rows",
    1,
    "At least this many validation rows (set it to the training batch size: evaluation needs a full batch).",
)
flags.adopt_module_key_flags(finetune_flags)  # --help lists the shared flags too.


def _write_chatterbot_chats(path: str) -> dict:
    dialogues = sft.chatterbot_dialogues("spanish")
    sft.write_jsonl([{"messages": messages} for _, messages in dialogues], path)
    categories = collections.Counter(category for category, _ in dialogues)
    print(f"Wrote {len(dialogues)} chatterbot dialogues ({len(categories)} categories) to {path}.")
    return {"chatterbot_corpus": "spanish", "dialogues": len(dialogues), "categories": dict(categories)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    path, source = finetune_flags.input_path("chats.jsonl", _write_chatterbot_chats)
    report = finetune_flags.prepare(
        sft.prepare_sft,
        path,
        min_validation_rows=_MIN_VALIDATION_ROWS.value,
        source=source,
        **finetune_flags.decontamination_options(),
    )
    print(
        json.dumps(
            {key: report[key] for key in ("conversations", "drops", "tokens", "rows", "assistant_token_fraction")},
            ensure_ascii=False,
        )
    )
    print(f"Wrote {finetune_flags.OUTPUT_DIR.value}/train/, validation/, tokenizer.model and report.json.")


if __name__ == "__main__":
    app.run(main)
