"""Prepares contrastive (sentence-embedder) data: (query, positive, negative?) triples, one record each.

    python scripts/prepare_pairs.py --pairs=pairs.jsonl --tokenizer=runs/tiny --output_dir=data/pairs_es \
        --seq_len=128 [--drop_eval_overlap] [--on_error=raise|skip]
    python scripts/prepare_pairs.py --mine=data/es_default/documents --seed=0 --tokenizer=runs/tiny \
        --output_dir=data/pairs_mined_es --seq_len=128

--pairs reads `{"query", "positive", "negative"?}` lines; --mine builds inverse-cloze pairs (a sentence and
the rest of its paragraph; a Markdown heading and its section) from the corpus pipeline's JSONL shards or
text files. Texts overlapping XQuAD-es (evaluation data) are dropped and counted when mining, and are an
error in a pairs file unless --drop_eval_overlap. Texts are tokenized as the embedder reads them (BOS, the
prefix, the text, cut to --seq_len); the prefixes must be the training run's train.query_prefix and
train.passage_prefix. Writes DIR/train/, DIR/validation/, the tokenizer, DIR/report.json and
DIR/validation_pairs.jsonl (the held-out pairs as text: `evaluate.py --tasks=retrieval --retrieval_pairs=`). Train with
`scripts/train.py --config.train.objective=contrastive --config.data.path=DIR --config.data.seq_len=...`.
See llm/finetune_data/contrastive.py.
"""

import json

import finetune_flags
from absl import app, flags

from configs import base
from llm.finetune_data import contrastive

_DEFAULTS = base.get_config().train
_PAIRS = flags.DEFINE_string("pairs", None, 'JSONL of {"query", "positive", "negative"?} to prepare.')
_MINE = flags.DEFINE_string("mine", None, "Mine inverse-cloze pairs from this corpus directory or file instead.")
_SEED = flags.DEFINE_integer("seed", 0, "--mine: seeds which sentence of each paragraph is the query.")
_QUERY_PREFIX = flags.DEFINE_string("query_prefix", _DEFAULTS.query_prefix, "Text before every query.")
_PASSAGE_PREFIX = flags.DEFINE_string("passage_prefix", _DEFAULTS.passage_prefix, "Text before every passage.")
_DROP_EVAL_OVERLAP = flags.DEFINE_bool(
    "drop_eval_overlap", False, "--pairs: drop (and count) pairs overlapping XQuAD-es instead of stopping."
)
_MIN_VALIDATION_PAIRS = flags.DEFINE_integer(
    "min_validation_pairs", 1, "At least this many validation pairs (set it to the training batch size)."
)
flags.adopt_module_key_flags(finetune_flags)  # --help lists the shared flags too (not --input, --chatterbot).


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if finetune_flags.INPUT.value or finetune_flags.CHATTERBOT.value:
        raise app.UsageError("prepare_pairs reads --pairs=FILE.jsonl or --mine=CORPUS, not --input or --chatterbot.")
    if finetune_flags.EVAL_FILES.value or not finetune_flags.DECONTAMINATE.value:
        raise app.UsageError(
            "prepare_pairs checks the XQuAD-es overlap itself (--drop_eval_overlap); --eval_files and "
            "--nodecontaminate are for prepare_sft.py and prepare_dpo.py."
        )
    if bool(_PAIRS.value) == bool(_MINE.value):
        raise app.UsageError("Pass exactly one of --pairs=FILE.jsonl and --mine=CORPUS_DIR.")
    report = finetune_flags.prepare(
        contrastive.prepare_pairs,
        _PAIRS.value or _MINE.value,
        mine=bool(_MINE.value),
        seed=_SEED.value,
        query_prefix=_QUERY_PREFIX.value,
        passage_prefix=_PASSAGE_PREFIX.value,
        drop_eval_overlap=_DROP_EVAL_OVERLAP.value,
        min_validation_pairs=_MIN_VALIDATION_PAIRS.value,
    )
    print(json.dumps({key: report[key] for key in ("pairs", "drops", "splits")}, ensure_ascii=False))
    overlap = report["pairs"]["eval_overlap_dropped"]
    print(f"Dropped {overlap} example(s) overlapping XQuAD-es evaluation data.")
    print(
        f"Wrote {finetune_flags.OUTPUT_DIR.value}/train/, validation/, the tokenizer, report.json and "
        "validation_pairs.jsonl (held-out pairs for evaluate.py --tasks=retrieval --retrieval_pairs=...)."
    )


if __name__ == "__main__":
    app.run(main)
