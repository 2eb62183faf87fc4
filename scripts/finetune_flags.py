"""What scripts/prepare_sft.py and scripts/prepare_dpo.py share: their common flags, the choice between
--input and the chatterbot-corpus demo set, and turning an error in the input into a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from absl import app, flags

from llm.io import ON_ERROR, SourceError

INPUT = flags.DEFINE_string("input", None, "JSONL file to prepare (its format: the script's docstring).")
CHATTERBOT = flags.DEFINE_bool(
    "chatterbot", False, "Build a demo set from the Spanish chatterbot-corpus dialogues instead of --input."
)
TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer: a SentencePiece .model, a tokenizer.json, or a run or HF model directory."
)
OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Row length; must equal the training config's data.seq_len.")
ON_ERROR_FLAG = flags.DEFINE_enum(
    "on_error", "raise", list(ON_ERROR), "Malformed lines: stop with an error naming file:line, or skip and count them."
)
VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", 0.05, "Share of examples held out (by id hash).")
TRAIN_SHARDS = flags.DEFINE_integer("train_shards", 1, "ArrayRecord shards of the train split.")
DECONTAMINATE = flags.DEFINE_bool(
    "decontaminate",
    True,
    "Drop examples sharing a 13-word sequence with an evaluation set (llm/eval/data, --eval_files).",
)
EVAL_FILES = flags.DEFINE_list(
    "eval_files", [], 'Extra evaluation sets to decontaminate against: .jsonl with "text", .json, .tsv, .conllu, .txt.'
)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the shards of an earlier run in --output_dir.")
flags.mark_flags_as_required(["tokenizer", "output_dir"])


def input_path(demo_file: str, write_demo: Callable[[str], dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
    """(the JSONL file to prepare, where its data came from): --input, or the demo set that
    `write_demo(path)` writes to OUTPUT_DIR/demo_file and describes."""
    if bool(INPUT.value) == CHATTERBOT.value:
        raise app.UsageError("Pass exactly one of --input=FILE.jsonl and --chatterbot.")
    if CHATTERBOT.value:
        path = os.path.join(OUTPUT_DIR.value, demo_file)
        return path, write_demo(path)
    if not os.path.isfile(INPUT.value):
        raise app.UsageError(f"--input={INPUT.value!r} is not a file.")
    return INPUT.value, None


def decontamination_options() -> dict[str, Any]:
    """The SFT and DPO builders' decontamination arguments from --decontaminate and --eval_files."""
    return {"decontaminate": DECONTAMINATE.value, "eval_files": EVAL_FILES.value}


def prepare(function: Callable[..., dict[str, Any]], path: str, **options: Any) -> dict[str, Any]:
    """`function(path, tokenizer, output_dir, seq_len, ...)` with the common flags, its report returned; an
    error in the input (already named by file and line) ends the script with that one line."""
    try:
        return function(
            path,
            TOKENIZER.value,
            OUTPUT_DIR.value,
            SEQ_LEN.value,
            on_error=ON_ERROR_FLAG.value,
            validation_fraction=VALIDATION_FRACTION.value,
            train_shards=TRAIN_SHARDS.value,
            overwrite=OVERWRITE.value,
            **options,
        )
    except (SourceError, ValueError, FileExistsError, FileNotFoundError) as error:
        raise SystemExit(f"Error: {error}") from error
