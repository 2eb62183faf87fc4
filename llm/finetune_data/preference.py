"""DPO preference data: JSONL of {"prompt", "chosen", "rejected"} -> one record per pair (records.encode_pair).

The prompt is a string (one user turn) or a list of chat messages ending with a user turn; the responses
are the assistant's answers as strings. Each pair becomes two rows of `seq_len` tokens, chosen and
rejected, both rendered with the chat template as `prompt <|assistant|> response <|end|>` (or the model's own
Jinja template: `... <|im_start|>assistant\n response <|im_end|>`), with loss_mask 1 on the response and its
end of turn only. One pair fills one row pair (no packing of several pairs), as in
the usual DPO implementations: the loss compares the two log-likelihoods of one prompt.

Length policy. When prompt and the longer response do not fit in `seq_len`, the prompt loses tokens from
its start (after its first token, bos), the same in both rows; a pair whose longer response leaves no room for
that token and the last one of the prompt (`<|assistant|>`) is dropped as `dpo.too_long`.

Unusable lines are an error naming file:line (`on_error="raise"`) or a counted drop (`on_error="skip"`):

  dpo.bad_json  a line that is not UTF-8 JSON, or not a JSON object
  dpo.bad_pair  a missing or malformed prompt, chosen or rejected, or identical responses

A pair whose prompt or responses share a 13-word sequence with an evaluation set is dropped and counted as
`decontaminate.<set>`, as in llm/finetune_data/sft.py.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from llm import chat_template
from llm.data import decontamination, packing, records
from llm.finetune_data.sft import (
    Drops,
    Messages,
    check_output_dir,
    contaminated,
    decontamination_report,
    eval_index,
    read_jsonl,
    split_ids,
    start_writing,
    write_report,
)
from llm.tokenizer import AnyTokenizer, load_tokenizer

Pair = tuple[np.ndarray, np.ndarray, np.ndarray]  # prompt ids, chosen response ids, rejected response ids


def prompt_messages(prompt: Any) -> Messages:
    """The prompt as chat messages; raises ChatFormatError if it is neither a string nor valid messages."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = prompt
    else:
        raise chat_template.ChatFormatError('"prompt" must be a string or a list of messages.')
    chat_template.validate_messages(messages)
    if messages[-1]["role"] != "user":
        raise chat_template.ChatFormatError(
            f"the prompt must end with a user turn (the responses answer it), not {messages[-1]['role']!r}."
        )
    return messages


def tokenize_pair(tokenizer: AnyTokenizer, messages: Sequence[Mapping[str, str]], chosen: str, rejected: str) -> Pair:
    """Prompt ids (bos ... <|assistant|>) and the ids of each response (its content and end of turn: the
    tokens of the answered conversation after the prompt, through the last one of the assistant mask)."""
    prompt, _ = chat_template.render(tokenizer, messages, add_generation_prompt=True)
    responses = []
    for response in (chosen, rejected):
        ids, mask = chat_template.render(tokenizer, [*messages, {"role": "assistant", "content": response}])
        if ids[: len(prompt)] != prompt or not any(mask[len(prompt) :]):
            # Chosen and rejected must share the prompt's tokens: the loss compares them on the same prompt.
            raise chat_template.ChatFormatError("the chat template's prompt tokens change once an answer follows.")
        end = len(mask) - mask[::-1].index(1)
        responses.append(np.asarray(ids[len(prompt) : end], np.int32))
    return np.asarray(prompt, np.int32), responses[0], responses[1]


def fit_prompt(prompt: np.ndarray, longest_response: int, seq_len: int) -> np.ndarray | None:
    """The prompt left-truncated (bos kept) so that it and the longest response fit; None if impossible.

    At least two prompt tokens must remain: bos and the last one (`<|assistant|>`, or `:` of a task prompt).
    """
    room = seq_len - longest_response
    if room < 2:
        return None
    if len(prompt) <= room:
        return prompt
    return np.concatenate([prompt[:1], prompt[len(prompt) - (room - 1) :]])


def pair_rows(pair: Pair, seq_len: int, pad_id: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The chosen and the rejected row of a pair whose prompt already fits."""
    prompt, chosen, rejected = pair
    rows = []
    for response in (chosen, rejected):
        tokens = np.concatenate([prompt, response])
        mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)])
        (row,) = packing.pack_masked_documents([(tokens, mask)], seq_len, pad_id=pad_id)
        rows.append(row)
    return rows[0], rows[1]


def read_pairs(
    path: str,
    tokenizer: AnyTokenizer,
    seq_len: int,
    drops: Drops,
    index: decontamination.NgramIndex | None = None,
) -> Iterator[tuple[str, Pair, bool]]:
    """(id "file name:line", pair fitted to seq_len, prompt truncated) for every usable line that shares no
    n-gram with the evaluation sets of `index`."""
    for line, record in read_jsonl(path, drops, "dpo.bad_json"):
        where = f"{path}:{line}"
        try:
            messages = prompt_messages(record.get("prompt"))
        except chat_template.ChatFormatError as error:
            drops.reject(where, "dpo.bad_pair", f"prompt: {error}")
            continue
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if not (isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() and rejected.strip()):
            drops.reject(where, "dpo.bad_pair", '"chosen" and "rejected" must be non-empty strings.')
            continue
        if chosen == rejected:
            drops.reject(where, "dpo.bad_pair", '"chosen" and "rejected" are identical: nothing to prefer.')
            continue
        if contaminated(index, [*(message["content"] for message in messages), chosen, rejected], where, drops):
            continue
        try:
            prompt, chosen_ids, rejected_ids = tokenize_pair(tokenizer, messages, chosen, rejected)
        except chat_template.ChatFormatError as error:  # What a model's own template refuses.
            drops.reject(where, "dpo.bad_pair", str(error))
            continue
        fitted = fit_prompt(prompt, max(len(chosen_ids), len(rejected_ids)), seq_len)
        if fitted is None:
            drops.count(where, "dpo.too_long")
            continue
        yield f"{os.path.basename(path)}:{line}", (fitted, chosen_ids, rejected_ids), len(fitted) < len(prompt)


def prepare_dpo(
    input_path: str,
    tokenizer_path: str,
    output_dir: str,
    seq_len: int,
    *,
    on_error: str = "raise",
    validation_fraction: float = 0.05,
    min_validation_pairs: int = 1,
    train_shards: int = 1,
    validation_shards: int = 1,
    overwrite: bool = False,
    source: Mapping[str, Any] | None = None,
    decontaminate: bool = True,
    eval_files: Sequence[str] = (),
) -> dict[str, Any]:
    """Writes pair records to DIR/train/ and DIR/validation/, the tokenizer's files and DIR/report.json.

    `tokenizer_path` is a tokenizer file or a directory holding one (a run, a Hugging Face model directory).

    Pairs are held in memory as token arrays; rows are built while writing. The validation split takes
    pairs by a hash of their "file name:line" id, at least `min_validation_pairs` of them. `decontaminate` and
    `eval_files` are as in `sft.prepare_sft`.
    """
    drops = Drops(on_error)
    check_output_dir(output_dir, overwrite)
    tokenizer = load_tokenizer(tokenizer_path)
    pairs: list[tuple[str, Pair]] = []
    truncated = 0
    index = eval_index(decontaminate, eval_files)
    for pair_id, pair, was_truncated in read_pairs(input_path, tokenizer, seq_len, drops, index):
        pairs.append((pair_id, pair))
        truncated += was_truncated
    dropped = sum(drops.counts.values())
    if not pairs:
        raise ValueError(f"{input_path}: no usable preference pair among {dropped} (drops: {dict(drops.counts)}).")
    # Every pair is one record: a "length" of 1 and rows of 1 make the minimum a number of pairs.
    validation_ids = split_ids(
        [(pair_id, 1) for pair_id, _ in pairs], 1, validation_fraction, min_validation_pairs, "preference pairs"
    )
    members = {
        "train": [pair for pair_id, pair in pairs if pair_id not in validation_ids],
        "validation": [pair for pair_id, pair in pairs if pair_id in validation_ids],
    }
    if not members["validation"]:  # checked before writing, so no empty shards are left behind
        raise ValueError("The validation split is empty: raise validation_fraction or min_validation_pairs.")
    tokenizer_copy = start_writing(output_dir, tokenizer_path)
    splits = {}
    for split, shards in (("train", train_shards), ("validation", validation_shards)):
        paths = records.write_shards(
            (pair_rows(pair, seq_len, tokenizer.pad_id) for pair in members[split]),
            os.path.join(output_dir, split),
            shards,
            encode=lambda rows: records.encode_pair(*rows),
        )
        splits[split] = {"pairs": len(members[split]), "shards": len(paths)}
    lengths = {name: [len(pair[i]) for _, pair in pairs] for i, name in enumerate(("prompt", "chosen", "rejected"))}
    report = {
        "format": "chat",  # Rows rendered with the chat template: a run trained on them is chat-tuned.
        "input": input_path,
        **({"source": dict(source)} if source else {}),
        "tokenizer": tokenizer_copy,
        "seq_len": seq_len,
        "pairs": {"read": len(pairs) + dropped, "kept": len(pairs), "prompt_truncated": truncated, "dropped": dropped},
        "drops": drops.as_dict(),
        "decontamination": decontamination_report(index),
        "tokens": {name: int(sum(values)) for name, values in lengths.items()},
        "mean_tokens": {name: round(float(np.mean(values)), 1) for name, values in lengths.items()},
        "splits": splits,
    }
    write_report(output_dir, report)
    return report


def chatterbot_preferences(dialogues: Sequence[tuple[str, Messages]]) -> list[dict[str, Any]]:
    """Demo preference pairs: every answer of every dialogue against an answer from another category.

    The prompt is the dialogue up to the question; chosen is the real answer, rejected an answer drawn
    from a dialogue of another category (so unrelated to the question), seeded by the pair's position:
    the same package version always gives the same file.
    """
    answers = [
        (category, message["content"])
        for category, messages in dialogues
        for message in messages
        if message["role"] == "assistant"
    ]
    pairs = []
    for number, (category, messages) in enumerate(dialogues):
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # Other categories can still hold the same short answer ("Sí."), which would prefer nothing.
            unrelated = [text for other, text in answers if other != category and text != message["content"]]
            rejected = random.Random(f"chatterbot:{number}:{index}").choice(unrelated)
            pairs.append({"prompt": messages[:index], "chosen": message["content"], "rejected": rejected})
    return pairs
