"""Trains the Spanish SentencePiece tokenizer on text or JSONL files and reports its quality.

    python scripts/train_tokenizer.py --input='corpus/*.jsonl' --text_field=text \
        --output_prefix=data/tokenizer [--vocab_size=32000 --model_type=bpe]

Writes OUTPUT_PREFIX.model and OUTPUT_PREFIX.vocab, then prints fertility (tokens per word) and bytes per
token on the UD Spanish-GSD dev sentences and checks that Spanish characters round-trip exactly.
"""

import os
from collections.abc import Iterator

from absl import app, flags

from llm import tokenizer
from llm.corpus import sources
from llm.corpus.document import Document

_INPUT = flags.DEFINE_string("input", None, "Text (.txt/.md) or JSONL file, directory or glob.", required=True)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL field holding the text.")
_FORMAT = flags.DEFINE_enum("format", "auto", list(sources.FORMATS), "Input format; auto = by extension.")
_OUTPUT_PREFIX = flags.DEFINE_string("output_prefix", None, "Writes PREFIX.model and PREFIX.vocab.", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size, reserved and byte pieces included.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", list(tokenizer.MODEL_TYPES), "SentencePiece algorithm.")
_EVAL_CONLLU = flags.DEFINE_string("eval_conllu", tokenizer.DEFAULT_UD_PATH, "CoNLL-U file for the metrics.")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", list(sources.ON_ERROR), "Malformed input: stop, or skip it.")
_MAX_DOCUMENT_BYTES = flags.DEFINE_integer(
    "max_document_bytes", sources.DEFAULT_MAX_DOCUMENT_BYTES, "Larger paragraphs or JSONL lines are malformed."
)


def _validate_flags() -> int:
    """Fails before any training work on flags that cannot work; returns the number of input files."""
    if _VOCAB_SIZE.value < tokenizer.MIN_VOCAB_SIZE:
        raise app.UsageError(f"--vocab_size must be >= {tokenizer.MIN_VOCAB_SIZE}, got {_VOCAB_SIZE.value}.")
    directory = os.path.dirname(os.path.abspath(_OUTPUT_PREFIX.value))
    if os.path.exists(directory) and not os.access(directory, os.W_OK):
        raise app.UsageError(f"--output_prefix: directory {directory!r} is not writable.")
    try:
        return len(sources.expand_paths([_INPUT.value], _FORMAT.value))
    except sources.SourceError as e:
        raise app.UsageError(f"--input={_INPUT.value!r}: {e}") from e


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    num_files = _validate_flags()
    print(f"Training a {_VOCAB_SIZE.value}-piece {_MODEL_TYPE.value} tokenizer on {num_files} file(s).")
    documents = sources.read_files(
        [_INPUT.value],
        format=_FORMAT.value,
        text_mode="paragraph",
        text_field=_TEXT_FIELD.value,
        on_error=_ON_ERROR.value,
        max_document_bytes=_MAX_DOCUMENT_BYTES.value,
    )
    dropped = []

    def texts() -> Iterator[str]:
        for doc in documents:
            if isinstance(doc, Document):
                yield doc.text
            else:
                dropped.append(doc)

    try:
        tok = tokenizer.train_tokenizer(texts(), _OUTPUT_PREFIX.value, _VOCAB_SIZE.value, _MODEL_TYPE.value)
    except sources.SourceError as e:
        raise SystemExit(f"Error: {e}") from e
    if dropped:
        print(f"Skipped {len(dropped)} malformed input document(s), e.g. {dropped[0].id}: {dropped[0].reason}.")
    print(f"Wrote {tok.path} ({tok.vocab_size} pieces).")
    if os.path.isfile(_EVAL_CONLLU.value):
        ud = tokenizer.conllu_texts(_EVAL_CONLLU.value)
        print(f"Fertility on {len(ud)} UD sentences: {tokenizer.fertility(tok, ud):.3f} tokens/word")
        print(f"Bytes per token: {tokenizer.bytes_per_token(tok, ud):.3f}")
    else:
        print(f"No metrics: {_EVAL_CONLLU.value} does not exist (set --eval_conllu).")
    sample = f"{tokenizer.SPANISH_CHARACTERS} ¿Qué año? ¡Olé, pingüino! «Ñandú»"
    if not tokenizer.round_trips(tok, sample):
        raise SystemExit(f"Round-trip FAILED: {sample!r} -> {tok.decode(tok.encode(sample))!r}")
    print(f"Round-trip OK: {sample}")


if __name__ == "__main__":
    app.run(main)
