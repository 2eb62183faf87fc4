"""Prepares DPO preference data: JSONL of {"prompt", "chosen", "rejected"} -> one record per pair.

    python scripts/prepare_dpo.py --input=prefs.jsonl --tokenizer=data/es_default/tokenizer.model \
        --output_dir=data/dpo_es --seq_len=256 [--on_error=raise|skip]
    python scripts/prepare_dpo.py --chatterbot --tokenizer=... --output_dir=data/dpo_chatterbot_es

"prompt" is a string (one user turn) or a list of chat messages ending with a user turn; "chosen" and
"rejected" are answers. With --chatterbot, a demo set is built from the Spanish chatterbot-corpus dialogues
(chosen: the real answer; rejected: an answer from a dialogue of another category) and written to
DIR/prefs.jsonl first. Writes DIR/train/, DIR/validation/ (records.encode_pair records), DIR/tokenizer.model
and DIR/report.json. See llm/data/preference.py for the row layout and the length policy.
"""

import json
import os

from absl import app, flags

from llm.data import preference, sft
from llm.data.sources import ON_ERROR, SourceError

_INPUT = flags.DEFINE_string("input", None, "JSONL file of preference pairs.")
_CHATTERBOT = flags.DEFINE_bool("chatterbot", False, "Build demo pairs from the chatterbot-corpus dialogues.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (llm/tokenizer.py).", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory.", required=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Row length; must equal the training config's data.seq_len.")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", list(ON_ERROR),
                              "Malformed lines: stop with an error naming file:line, or skip and count them.")
_VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", 0.05, "Share of pairs held out (by id hash).")
_MIN_VALIDATION_PAIRS = flags.DEFINE_integer("min_validation_pairs", 1, "At least this many validation pairs "
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
        pairs = preference.chatterbot_preferences(sft.chatterbot_dialogues("spanish"))
        input_path = os.path.join(_OUTPUT_DIR.value, "prefs.jsonl")
        sft.write_jsonl(pairs, input_path)
        source = {"chatterbot_corpus": "spanish", "pairs": len(pairs),
                  "rejected": "an answer from a dialogue of another category"}
        print(f"Wrote {len(pairs)} chatterbot preference pairs to {input_path}.")
    elif not os.path.isfile(input_path):
        raise app.UsageError(f"--input={input_path!r} is not a file.")
    try:
        report = preference.prepare_dpo(
            input_path, _TOKENIZER.value, _OUTPUT_DIR.value, _SEQ_LEN.value, on_error=_ON_ERROR.value,
            validation_fraction=_VALIDATION_FRACTION.value, min_validation_pairs=_MIN_VALIDATION_PAIRS.value,
            train_shards=_TRAIN_SHARDS.value, overwrite=_OVERWRITE.value, source=source)
    except (SourceError, ValueError, FileExistsError, FileNotFoundError) as error:
        raise SystemExit(f"Error: {error}") from error
    print(json.dumps({key: report[key] for key in ("pairs", "drops", "mean_tokens", "splits")}, ensure_ascii=False))
    print(f"Wrote {_OUTPUT_DIR.value}/train/, validation/, tokenizer.model and report.json.")


if __name__ == "__main__":
    app.run(main)
