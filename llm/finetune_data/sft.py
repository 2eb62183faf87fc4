"""Supervised fine-tuning data: chat JSONL -> rendered conversations -> packed rows that train on the answers.

Input is JSONL with one conversation per line, `{"messages": [{"role": ..., "content": ...}, ...]}`
(roles system / user / assistant, as in llm/chat_template.py). Each conversation is rendered with the chat
template (the project's role markers, or the model's own Jinja template for a Hugging Face tokenizer); its
loss mask is 1 exactly on the assistant's tokens (content and end of turn: `<|end|>`, `<|im_end|>`, ...), so
the model learns to answer and never to imitate the user. Several conversations share a row as separate segments, and a
conversation is never split across rows: its answers would lose the question they answer.

Length policy. Messages after the last assistant turn train nothing and are left out. A conversation longer
than `seq_len` loses its oldest turns (the system message, if any, is kept) until it fits, always starting
again at a user turn; if even its last exchange does not fit, it is dropped as `sft.too_long`.

Input the template cannot use is an error naming file:line (`on_error="raise"`) or a counted drop
(`on_error="skip"`):

  sft.bad_json      a line that is not UTF-8 JSON, or not a JSON object
  sft.bad_messages  no "messages" list, or a message the chat template rejects
  sft.no_assistant  no assistant turn: nothing to train on

Decontamination (llm/data/decontamination.py, as in the corpus pipeline): a conversation with a message that
shares a 13-word sequence with an evaluation set (the shipped ones and `eval_files`) is always dropped, counted
as `decontaminate.<set>`; `decontaminate=False` turns the check off. The report says which way it ran.

The Spanish dialogues of the `chatterbot-corpus` package (extra [finetune]) make a small demo set.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from llm import chat_template
from llm.data import decontamination, packing, records
from llm.io import ON_ERROR, SourceError
from llm.tokenizer import AnyTokenizer, copy_tokenizer, load_tokenizer

Messages = list[dict[str, str]]
MAX_DROP_EXAMPLES = 5  # file:line locations kept per drop reason in the report


@dataclasses.dataclass
class Drops:
    """What to do with unusable input (`on_error`), and the count and first locations of each drop reason."""

    on_error: str = "raise"
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error={self.on_error!r}: expected one of {list(ON_ERROR)}.")

    def reject(self, where: str, reason: str, message: str) -> None:
        """Malformed input: raises SourceError("where: message") under "raise", else counts a drop."""
        if self.on_error == "raise":
            raise SourceError(f"{where}: {message} (use --on_error=skip to drop and count it instead)")
        self.count(where, reason)

    def count(self, where: str, reason: str) -> None:
        """A drop that is no error (e.g. too long for seq_len): always counted."""
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < MAX_DROP_EXAMPLES:
            self.examples[reason].append(where)

    def as_dict(self) -> dict[str, Any]:
        return {
            reason: {"count": count, "first": self.examples[reason]} for reason, count in sorted(self.counts.items())
        }


def read_jsonl(path: str, drops: Drops, reason: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file; bad lines go to `drops` as `reason`."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                drops.reject(where, reason, f"not UTF-8 (byte {error.start})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                drops.reject(where, reason, f"not valid JSON ({error.msg})")
                continue
            if not isinstance(record, dict):
                drops.reject(where, reason, f"expected a JSON object, got {type(record).__name__}")
                continue
            yield number, record


def conversation(record: Mapping[str, Any], where: str, drops: Drops) -> Messages | None:
    """The validated messages of one JSONL record, or None when it was dropped."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        drops.reject(where, "sft.bad_messages", 'expected a "messages" list of {"role", "content"} objects')
        return None
    try:
        chat_template.validate_messages(messages)
    except chat_template.ChatFormatError as error:
        drops.reject(where, "sft.bad_messages", str(error))
        return None
    if not any(message["role"] == "assistant" for message in messages):
        drops.reject(where, "sft.no_assistant", "the conversation has no assistant turn: nothing to train on")
        return None
    return messages


def eval_index(decontaminate: bool, eval_files: Sequence[str]) -> decontamination.NgramIndex | None:
    """The n-gram index of the shipped evaluation sets and `eval_files`, or None when not decontaminating."""
    if not decontaminate:
        return None
    return decontamination.load_index(decontamination.eval_files(True, eval_files))


def contaminated(index: decontamination.NgramIndex | None, texts: Sequence[str], where: str, drops: Drops) -> bool:
    """True, with the drop counted as "decontaminate.<set>", when a text shares an n-gram with an evaluation set."""
    eval_set = next((name for name in map(index.match, texts) if name), None) if index else None
    if eval_set is not None:
        drops.count(where, f"decontaminate.{eval_set}")
    return eval_set is not None


def decontamination_report(index: decontamination.NgramIndex | None) -> dict[str, Any]:
    return {"enabled": False} if index is None else {"enabled": True, **index.summary()}


def render_conversation(
    tokenizer: AnyTokenizer, messages: Sequence[Mapping[str, str]], seq_len: int
) -> tuple[list[int], list[int], bool] | None:
    """(token ids, loss mask, truncated) of a conversation that fits in `seq_len`, or None if none does.

    The length policy of the module docstring: trailing non-assistant turns are left out, then the oldest
    turns go until the rest fits, restarting at a user turn and keeping the system message.
    """
    last_answer = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    messages = list(messages[: last_answer + 1])
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    starts = [0] + [i for i, message in enumerate(turns) if i > 0 and message["role"] == "user"]
    for start in starts:
        ids, mask = chat_template.render(tokenizer, system + turns[start:])
        if len(ids) <= seq_len:
            return ids, mask, start > 0
    return None


def split_ids(
    lengths: Sequence[tuple[str, int]], seq_len: int, validation_fraction: float, min_validation_rows: int, what: str
) -> set[str]:
    """Validation ids by a hash of each id (packing.split_train_validation), with a clearer error on tiny data."""
    try:
        return packing.split_train_validation(lengths, seq_len, validation_fraction, min_validation_rows)
    except ValueError as error:
        raise ValueError(f"{len(lengths)} {what} are too few for the validation split: {error}") from error


def _old_shards(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "*", "*" + records.SHARD_SUFFIX)))


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses a directory with shards of an earlier run (they would mix with the new ones) unless `overwrite`."""
    old = _old_shards(output_dir)
    if old and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds {len(old)} shard(s) from an earlier run, e.g. {old[0]}; "
            "pass --overwrite to replace them, or choose another --output_dir."
        )


def start_writing(output_dir: str, tokenizer_path: str) -> str:
    """Removes the shards of an earlier run and copies the tokenizer's files into DIR (tokenizer.model, or
    tokenizer.json with its config and chat template), where training finds them; returns the copy's path.

    Called once the input has been read, so that bad input stops a run before it replaces anything.
    """
    for path in _old_shards(output_dir):
        os.remove(path)
    return copy_tokenizer(tokenizer_path, output_dir)


def write_report(output_dir: str, report: Mapping[str, Any]) -> None:
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
        f.write("\n")


def split_summary(stats: packing.SplitStats) -> dict[str, Any]:
    summary = stats.as_dict()
    summary["shards"] = len(stats.shards)
    summary["packing_efficiency"] = round(stats.efficiency, 4)
    return summary


def prepare_sft(
    input_path: str,
    tokenizer_path: str,
    output_dir: str,
    seq_len: int,
    *,
    on_error: str = "raise",
    validation_fraction: float = 0.05,
    min_validation_rows: int = 1,
    train_shards: int = 1,
    validation_shards: int = 1,
    overwrite: bool = False,
    source: Mapping[str, Any] | None = None,
    decontaminate: bool = True,
    eval_files: Sequence[str] = (),
) -> dict[str, Any]:
    """Writes DIR/train/, DIR/validation/, the tokenizer's files and DIR/report.json; returns the report.

    `tokenizer_path` is a tokenizer file or a directory holding one: a run (ours, or one imported from
    Hugging Face) or a Hugging Face model directory.

    Conversations are held in memory as int32 arrays (a few hundred MB for a million chats of 100 tokens).
    The validation split takes conversations by a hash of their "file name:line" id (so it survives moving
    the file), at least `min_validation_rows` rows' worth (the trainer needs a full validation batch).
    `source`, if given, describes where the input came from in the report. `eval_files` are evaluation
    sets checked besides the shipped ones (see the module docstring).
    """
    drops = Drops(on_error)
    check_output_dir(output_dir, overwrite)
    tokenizer = load_tokenizer(tokenizer_path)
    index = eval_index(decontaminate, eval_files)
    docs: list[tuple[str, tuple[np.ndarray, np.ndarray]]] = []
    truncated = 0
    for line, record in read_jsonl(input_path, drops, "sft.bad_json"):
        where = f"{input_path}:{line}"
        messages = conversation(record, where, drops)
        if messages is None or contaminated(index, [message["content"] for message in messages], where, drops):
            continue
        rendered = render_conversation(tokenizer, messages, seq_len)
        if rendered is None:
            drops.count(where, "sft.too_long")
            continue
        ids, mask, was_truncated = rendered
        truncated += was_truncated
        docs.append((f"{os.path.basename(input_path)}:{line}", (np.asarray(ids, np.int32), np.asarray(mask, np.int32))))
    dropped = sum(drops.counts.values())
    if not docs:
        raise ValueError(f"{input_path}: no usable conversation among {dropped} (drops: {dict(drops.counts)}).")
    validation_ids = split_ids(
        [(doc_id, len(ids)) for doc_id, (ids, _) in docs],
        seq_len,
        validation_fraction,
        min_validation_rows,
        "conversations",
    )
    tokenizer_copy = start_writing(output_dir, tokenizer_path)
    splits = packing.write_packed_splits(
        docs,
        output_dir,
        seq_len,
        validation_ids,
        pad_id=tokenizer.pad_id,
        train_shards=train_shards,
        validation_shards=validation_shards,
        masked=True,
    )
    tokens = sum(stats.tokens for stats in splits.values())
    assistant_tokens = sum(stats.target_tokens for stats in splits.values())
    report = {
        "format": "chat",  # Rows rendered with the chat template: a run trained on them is chat-tuned.
        "input": input_path,
        **({"source": dict(source)} if source else {}),
        "tokenizer": tokenizer_copy,
        "seq_len": seq_len,
        "conversations": {"read": len(docs) + dropped, "kept": len(docs), "truncated": truncated, "dropped": dropped},
        "drops": drops.as_dict(),
        "decontamination": decontamination_report(index),
        "tokens": tokens,
        "assistant_tokens": assistant_tokens,
        "assistant_token_fraction": round(assistant_tokens / tokens, 4),
        "rows": sum(stats.rows for stats in splits.values()),
        "splits": {name: split_summary(stats) for name, stats in splits.items()},
    }
    write_report(output_dir, report)
    return report


# ------------------------------------------------------------------------------------------ chatterbot corpus
def chatterbot_dialogues(language: str = "spanish") -> list[tuple[str, Messages]]:
    """(category, messages) for every dialogue of the installed `chatterbot-corpus` in `language`.

    Each YAML file of the package is a category holding lists of lines spoken in turn; they become
    alternating user / assistant messages, the first line the user's.
    """
    import yaml

    try:
        from chatterbot_corpus import corpus
    except ImportError as error:
        raise ImportError("The chatterbot-corpus package is not installed: pip install -e '.[finetune]'.") from error
    directory = os.path.join(corpus.DATA_DIRECTORY, language)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"chatterbot-corpus has no {language!r} dialogues ({directory} does not exist).")
    dialogues = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith((".yml", ".yaml")):
            continue
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
            raise SourceError(f"{path}: expected a mapping with a 'conversations' list.")
        category = os.path.splitext(name)[0]
        for index, lines in enumerate(data["conversations"]):
            # YAML reads bare `no` or `1963` as a bool or an int: such a line is a data bug, not a turn.
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
                raise SourceError(f"{path}: conversation {index} is not a list of strings: {lines!r}")
            roles = ("user", "assistant")
            dialogues.append(
                (category, [{"role": roles[i % 2], "content": line.strip()} for i, line in enumerate(lines)])
            )
    if not dialogues:
        raise SourceError(f"{directory}: no conversations in its YAML files.")
    return dialogues


def write_jsonl(records_: Sequence[Mapping[str, Any]], path: str) -> None:
    """One JSON object per line, UTF-8 (accents kept readable)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records_:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
