"""Prompt-tuning data for 3-way Spanish sentiment: the evaluation's zero-shot prompt, trained on the label.

Every example is the exact zero-shot item the evaluation suite scores (llm/eval/multiple_choice.py,
`sentiment_items` with no shots), tokenized exactly as its scorer does (llm/eval/scoring.py,
`encode_pair`), so a tuned soft prompt or adapter is trained on the text it is evaluated on:

    Clasifica el sentimiento de cada tuit como Negativo, Neutro o Positivo.

    Tuit: {tweet}
    Sentimiento: {Negativo|Neutro|Positivo}

followed by eos. The loss mask is 1 on the label word and eos only. One example per row (no packing):
prompt tuning puts its virtual tokens in front of a row, so each row must hold a single example. A prompt
too long for `seq_len` loses tokens from its start (after bos), as the scorer's left truncation does.

Training rows come from the train split of llm/eval/data (the sentiment set), validation rows from its val split;
the test split, which the evaluation reports, is never read.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from llm.data import packing, records
from llm.eval import multiple_choice, scoring, tasks
from llm.finetune_data.preference import fit_prompt
from llm.finetune_data.sft import check_output_dir, start_writing, write_report
from llm.tokenizer import Tokenizer

SPLITS = {"train": "train", "validation": "val"}  # output split -> sentiment split of the evaluation files


def example_tokens(
    tokenizer: Tokenizer, item: multiple_choice.MultipleChoiceItem, seq_len: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(tokens, loss mask, truncated) of one labelled item: bos + prompt + label word + eos."""
    context, answer = scoring.encode_pair(tokenizer, item.context, item.choices[item.label])
    answer = [*answer, tokenizer.eos_id]
    fitted = fit_prompt(np.asarray(context, np.int32), len(answer), seq_len)
    if fitted is None:
        raise ValueError(f"seq_len={seq_len} leaves no room for the prompt of a {len(answer)}-token answer.")
    tokens = np.concatenate([fitted, np.asarray(answer, np.int32)])
    mask = np.concatenate([np.zeros(len(fitted), np.int32), np.ones(len(answer), np.int32)])
    return tokens, mask, len(fitted) < len(context)


def sentiment_rows(
    tokenizer: Tokenizer, examples: Sequence[tasks.SentimentExample], seq_len: int, counts: collections.Counter
) -> Iterator[dict[str, np.ndarray]]:
    """One row per example; `counts` gets "examples", "truncated", "tokens" and "label_tokens"."""
    for item in multiple_choice.sentiment_items(examples, shots=()):
        tokens, mask, truncated = example_tokens(tokenizer, item, seq_len)
        counts.update(examples=1, truncated=int(truncated), tokens=len(tokens), label_tokens=int(mask.sum()))
        (row,) = packing.pack_masked_documents([(tokens, mask)], seq_len, pad_id=tokenizer.pad_id)
        yield row


def prepare_sentiment(
    data_dir: str, tokenizer_path: str, output_dir: str, seq_len: int = 128, *, overwrite: bool = False
) -> dict[str, Any]:
    """Writes DIR/train/ (train split), DIR/validation/ (val split), DIR/tokenizer.model, DIR/report.json."""
    check_output_dir(output_dir, overwrite)
    tokenizer = Tokenizer.load(tokenizer_path)
    examples = {split: tasks.read_sentiment(data_dir, source) for split, source in SPLITS.items()}
    for split, source in SPLITS.items():
        if not examples[split]:
            raise ValueError(f"The sentiment {source!r} split in {data_dir} has no examples.")
    start_writing(output_dir, tokenizer_path)
    splits = {}
    for split, source in SPLITS.items():
        counts: collections.Counter = collections.Counter()
        paths = records.write_shards(
            sentiment_rows(tokenizer, examples[split], seq_len, counts), os.path.join(output_dir, split), num_shards=1
        )
        labels = collections.Counter(example.label for example in examples[split])
        splits[split] = {
            "source": f"sentiment_es_{source}",
            "examples": counts["examples"],
            "labels": {tasks.SENTIMENT_ANSWERS[label]: labels[label] for label in sorted(labels)},
            "tokens": counts["tokens"],
            "label_tokens": counts["label_tokens"],
            "truncated": counts["truncated"],
            "shards": len(paths),
        }
    first = multiple_choice.sentiment_items(examples["train"][:1], shots=())[0]
    report = {
        "data_dir": data_dir,
        "tokenizer": os.path.join(output_dir, "tokenizer.model"),
        "seq_len": seq_len,
        "first_example": first.context + first.choices[first.label],
        "splits": splits,
    }
    write_report(output_dir, report)
    return report
