"""Prepares the prompt-tuning data of the 3-way Spanish sentiment demo (train and val splits of es_eval).

    python scripts/prepare_sentiment_tuning.py --tokenizer=data/es_default/tokenizer.model \
        --output_dir=data/sentiment_es [--seq_len=128 --data_dir=llm/eval/data]

Each row is the evaluation suite's zero-shot sentiment prompt followed by the label word and eos, with the
loss on the label word and eos only (llm/finetune_data/sentiment_tuning.py). Writes DIR/train/, DIR/validation/,
DIR/tokenizer.model and DIR/report.json. The test split is left for the evaluation.
"""

import json

from absl import app, flags

from llm.eval import tasks
from llm.finetune_data import sentiment_tuning

_DATA_DIR = flags.DEFINE_string("data_dir", tasks.DEFAULT_DATA_DIR, "Directory of the sentiment_es_* files.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (llm/tokenizer.py).", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory.", required=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Row length; must equal the training config's data.seq_len.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the shards of an earlier run in --output_dir.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        report = sentiment_tuning.prepare_sentiment(
            _DATA_DIR.value, _TOKENIZER.value, _OUTPUT_DIR.value, _SEQ_LEN.value, overwrite=_OVERWRITE.value
        )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        raise SystemExit(f"Error: {error}") from error
    print(json.dumps(report["splits"], ensure_ascii=False))
    print(f"Wrote {_OUTPUT_DIR.value}/train/, validation/, tokenizer.model and report.json.")


if __name__ == "__main__":
    app.run(main)
