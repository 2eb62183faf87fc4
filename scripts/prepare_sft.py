"""Prepares supervised fine-tuning data: chat JSONL -> packed rows whose loss covers the assistant's tokens.

    python scripts/prepare_sft.py --input=chats.jsonl --tokenizer=data/es_default/tokenizer.model \
        --output_dir=data/sft_es --seq_len=256 [--on_error=raise|skip] [--validation_fraction=0.05]
    python scripts/prepare_sft.py --chatterbot --tokenizer=... --output_dir=data/sft_chatterbot_es

Input: one `{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}` per line. With
--chatterbot, the Spanish dialogues of the chatterbot-corpus package (pip install -e '.[finetune]') are
converted to that format first and written to DIR/chats.jsonl. Writes DIR/train/, DIR/validation/,
DIR/tokenizer.model and DIR/report.json (conversations kept, truncated and dropped by reason, tokens, rows,
assistant-token fraction). See llm/data/sft.py for the length policy.
"""

import collections
import json
import os

from absl import app, flags

from llm.data import sft
from llm.data.sources import ON_ERROR, SourceError

_INPUT = flags.DEFINE_string("input", None, "JSONL file of conversations (one {\"messages\": [...]} per line).")
_CHATTERBOT = flags.DEFINE_bool("chatterbot", False, "Use the Spanish chatterbot-corpus dialogues instead of --input.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (llm/tokenizer.py).", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory.", required=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Row length; must equal the training config's data.seq_len.")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", list(ON_ERROR),
                              "Malformed lines: stop with an error naming file:line, or skip and count them.")
_VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", 0.05, "Share of conversations held out (by id hash).")
_MIN_VALIDATION_ROWS = flags.DEFINE_integer("min_validation_rows", 1, "At least this many validation rows "
                                            "(set it to the training batch size: evaluation needs a full batch).")
_TRAIN_SHARDS = flags.DEFINE_integer("train_shards", 1, "ArrayRecord shards of the train split.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the shards of an earlier run in --output_dir.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if bool(_INPUT.value) == _CHATTERBOT.value:
        raise app.UsageError("Pass exactly one of --input=FILE.jsonl and --chatterbot.")
    source = None
    input_path = _INPUT.value
    if _CHATTERBOT.value:
        dialogues = sft.chatterbot_dialogues("spanish")
        input_path = os.path.join(_OUTPUT_DIR.value, "chats.jsonl")
        sft.write_jsonl([{"messages": messages} for _, messages in dialogues], input_path)
        categories = collections.Counter(category for category, _ in dialogues)
        source = {"chatterbot_corpus": "spanish", "dialogues": len(dialogues), "categories": dict(categories)}
        print(f"Wrote {len(dialogues)} chatterbot dialogues ({len(categories)} categories) to {input_path}.")
    elif not os.path.isfile(input_path):
        raise app.UsageError(f"--input={input_path!r} is not a file.")
    try:
        report = sft.prepare_sft(
            input_path, _TOKENIZER.value, _OUTPUT_DIR.value, _SEQ_LEN.value, on_error=_ON_ERROR.value,
            validation_fraction=_VALIDATION_FRACTION.value, min_validation_rows=_MIN_VALIDATION_ROWS.value,
            train_shards=_TRAIN_SHARDS.value, overwrite=_OVERWRITE.value, source=source)
    except (SourceError, ValueError, FileExistsError, FileNotFoundError) as error:
        raise SystemExit(f"Error: {error}") from error
    print(json.dumps({key: report[key] for key in ("conversations", "drops", "tokens", "rows",
                                                    "assistant_token_fraction")}, ensure_ascii=False))
    print(f"Wrote {_OUTPUT_DIR.value}/train/, validation/, tokenizer.model and report.json.")


if __name__ == "__main__":
    app.run(main)
