"""Our SentencePiece tokenizers as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), built with the `tokenizers` library to give the ids `Tokenizer.encode` gives.

How SentencePiece's behaviour is reproduced:

- Model: BPE gets the vocabulary and one merge for every way a piece splits into two pieces, ranked by the
  piece's score (SentencePiece merges the adjacent pair whose union scores highest, not only the pair it learned
  the piece from); Unigram gets the pieces with their scores. Both fall back to the <0xNN> byte pieces for
  characters the vocabulary lacks.
- Dummy prefix: SentencePiece puts one '▁' in front of the whole text, also in front of a leading space
  ('▁▁hola') or a leading role marker ('▁', '<|user|>', 'hola'), and never behind a marker. Metaspace
  (prepend_scheme "first", split off) adds it to the text's first part only, but not where that part starts with
  a space or where the text starts with a marker; for those two cases the normalizer inserts the '▁' itself.
  All added tokens are *normalized* tokens, split off after the whole text is normalized, so that the
  normalizer sees where the text starts.
- NFC in the normalizer: `Tokenizer.encode` normalizes to NFC in Python, so NFD input gives the same ids.
- No splitting into words: SentencePiece segments the whole text (no piece spans words because none was
  learned that does), and runs of spaces may be pieces of their own.
- Decoder: '▁' as a space, byte pieces joined into characters, the dummy prefix's space removed.

Differences no tokenizer.json can remove (tests/test_hf_tokenizer_export.py pins each down):
- <pad> <unk> <s> </s> written in a text are plain characters to SentencePiece (it never matches control
  pieces) but special tokens to Hugging Face tokenizers, which always match them.
- A text that is exactly one role marker gets no dummy '▁' (SentencePiece: '▁', '<|user|>'): the normalizer
  cannot tell that text from the marker itself, which it also normalizes.
- Unigram: a byte piece's name written in a text ('<0x41>') is that byte piece to `tokenizers` (every piece is
  in its lattice), characters to SentencePiece.
- Decoding a run of byte pieces that is not valid UTF-8 gives U+FFFD for every byte of the run, where
  SentencePiece still decodes the valid ones; only generated ids can hold such runs.
- skip_special_tokens drops the role markers too; SentencePiece's decode drops only <pad> <unk> <s> </s>.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable

import ml_collections
import sentencepiece as spm
import tokenizers
from google.protobuf import empty_pb2, unknown_fields
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from llm import io
from llm.hf import importer
from llm.hf_tokenizer import CONFIG_FILE as TOKENIZER_CONFIG, SPECIAL_TOKENS_FILE as SPECIAL_TOKENS_MAP, TOKENIZER_JSON
from llm.runs import directory
from llm.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_PIECES, UNK_ID, AnyTokenizer, Tokenizer

SPACE = "\u2581"  # SentencePiece's '▁'
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers prefers it to tokenizer_config.json's chat_template
# Field numbers and defaults of sentencepiece_model.proto. The sentencepiece_model_pb2 of sentencepiece 0.2.3
# is generated for protobuf 7 and refuses to import under the protobuf 6 that apache-beam pins, so the few
# fields needed are read with protobuf's own wire-format parser.
_PIECES, _TRAINER_SPEC, _NORMALIZER_SPEC = 1, 2, 3
_PIECE_TYPE, _NORMAL, _USER_DEFINED = 3, 1, 4
_MODEL_TYPE, _WHITESPACE_AS_SUFFIX, _BYTE_FALLBACK = 3, 24, 35
_RULE_NAME, _ADD_DUMMY_PREFIX, _REMOVE_EXTRA_WHITESPACES, _ESCAPE_WHITESPACES = 1, 3, 4, 5
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclasses.dataclass(frozen=True)
class _Model:
    """What the conversion needs from a SentencePiece model."""

    model_type: str
    pieces: list[str]
    scores: list[float]
    normal: set[str]  # The pieces text is built from: not control, user-defined (role markers) or byte pieces.
    user_defined: list[str]
    add_dummy_prefix: bool


def _fields(data: bytes) -> dict[int, list]:
    """The fields of a serialized protobuf message by number: ints for varints, bytes for strings/messages."""
    fields: dict[int, list] = {}
    for field in unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(data)):
        fields.setdefault(field.field_number, []).append(field.data)
    return fields


def _field(fields: dict[int, list], number: int, default):
    return fields[number][-1] if number in fields else default


def _read_model(path: str) -> _Model:
    """The pieces and settings of the SentencePiece model file `path`; settings the conversion does not
    reproduce are refused, naming the file and the settings."""
    with open(path, "rb") as f:
        proto = _fields(f.read())
    trainer = _fields(_field(proto, _TRAINER_SPEC, b""))
    normalizer = _fields(_field(proto, _NORMALIZER_SPEC, b""))
    model_type = _MODEL_TYPES.get(_field(trainer, _MODEL_TYPE, 1), "unknown")
    unsupported = {
        f"model_type {model_type!r} (only 'bpe' and 'unigram')": model_type not in ("bpe", "unigram"),
        "a normalization rule other than 'identity'": _field(normalizer, _RULE_NAME, b"nmt_nfkc") != b"identity",
        "remove_extra_whitespaces": _field(normalizer, _REMOVE_EXTRA_WHITESPACES, True),
        "escape_whitespaces off": not _field(normalizer, _ESCAPE_WHITESPACES, True),
        "treat_whitespace_as_suffix": _field(trainer, _WHITESPACE_AS_SUFFIX, False),
        "byte_fallback off": not _field(trainer, _BYTE_FALLBACK, False),
    }
    refused = [setting for setting, present in unsupported.items() if present]
    if refused:
        raise ValueError(
            f"{path}: cannot convert a SentencePiece model with {', '.join(refused)}; llm.tokenizer.train_tokenizer "
            "trains the models this converts."
        )
    processor = spm.SentencePieceProcessor(model_file=path)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    types = [_field(_fields(piece), _PIECE_TYPE, _NORMAL) for piece in proto[_PIECES]]
    return _Model(
        model_type=model_type,
        pieces=pieces,
        scores=[processor.get_score(i) for i in range(len(pieces))],
        normal={piece for piece, piece_type in zip(pieces, types) if piece_type == _NORMAL},
        user_defined=[piece for piece, piece_type in zip(pieces, types) if piece_type == _USER_DEFINED],
        add_dummy_prefix=bool(_field(normalizer, _ADD_DUMMY_PREFIX, True)),
    )


def _bpe(model: _Model) -> models.BPE:
    """BPE with a merge (left, right) for every split of a normal piece into two normal pieces, ranked by the
    piece's score, best first."""
    ids = {piece: i for i, piece in enumerate(model.pieces)}
    ranked = [
        (-model.scores[ids[piece]], ids[piece], cut, (piece[:cut], piece[cut:]))
        for piece in model.normal
        for cut in range(1, len(piece))
        if piece[:cut] in model.normal and piece[cut:] in model.normal
    ]
    merges = [merge for *_, merge in sorted(ranked)]
    return models.BPE(vocab=ids, merges=merges, unk_token=SPECIAL_PIECES[UNK_ID], byte_fallback=True)


def _unigram(model: _Model) -> models.Unigram:
    return models.Unigram(list(zip(model.pieces, model.scores)), unk_id=UNK_ID, byte_fallback=True)


def _normalizer(model: _Model) -> normalizers.Normalizer:
    """NFC, and the dummy '▁' in front of a text that starts with a space or a role marker (Metaspace does the
    rest), but not in front of a marker alone: that is how the marker's own text normalizes to be found."""
    steps = [normalizers.NFC()]
    if model.add_dummy_prefix:
        markers = "|".join(re.escape(marker) for marker in model.user_defined)
        steps.append(normalizers.Replace(Regex(rf"\A(?= )|\A(?={markers})(?!(?:{markers})\z)"), SPACE))
    return normalizers.Sequence(steps)


def _decoder(model: _Model) -> decoders.Decoder:
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # The dummy prefix's space, where the text starts with one.
    return decoders.Sequence(steps)


def spm_to_tokenizer_json(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
    """A Hugging Face tokenizer that encodes and decodes as our SentencePiece `tokenizer` does (the module
    docstring lists the exceptions); with special tokens it puts <s> in front of a text, as our training
    documents and prompts have it. <pad> <unk> <s> </s> and the role markers are special added tokens."""
    model = _read_model(tokenizer.path)
    hf = tokenizers.Tokenizer(_bpe(model) if model.model_type == "bpe" else _unigram(model))
    hf.normalizer = _normalizer(model)
    scheme = "first" if model.add_dummy_prefix else "never"
    hf.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme=scheme, split=False)
    hf.decoder = _decoder(model)
    added = [*SPECIAL_PIECES, *model.user_defined]
    hf.add_special_tokens([AddedToken(piece, special=True, normalized=True) for piece in added])
    bos = SPECIAL_PIECES[BOS_ID]
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
    )
    return hf


def special_token_encoder(tokenizer: AnyTokenizer) -> Callable[[str], list[int]]:
    """Token ids of texts (no BOS added) read as Hugging Face tokenizers read them, and so vLLM and lm-eval: a
    special token spelled in a text ('</s>', '<s>' in front of a rendered chat template) is that token.

    A Hugging Face run's tokenizer reads texts so already. SentencePiece never matches its control pieces in a
    text, so ours reads them through its export, which otherwise gives `Tokenizer.encode`'s ids (the module
    docstring lists the exceptions): the ids vLLM would give serving the exported model.
    """
    if not isinstance(tokenizer, Tokenizer):
        return tokenizer.encode
    exported = spm_to_tokenizer_json(tokenizer)
    return lambda text: exported.encode(text, add_special_tokens=False).ids


def _tokenizer_config(
    hf: tokenizers.Tokenizer, config: ml_collections.ConfigDict, chat_template: str | None
) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) of an exported tokenizer."""
    special = {
        "bos_token": SPECIAL_PIECES[BOS_ID],
        "eos_token": SPECIAL_PIECES[EOS_ID],
        "pad_token": SPECIAL_PIECES[PAD_ID],
        "unk_token": SPECIAL_PIECES[UNK_ID],
    }
    added = [token.content for token in hf.get_added_tokens_decoder().values()]
    markers = [content for content in added if content not in special.values()]
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "extra_special_tokens": markers,
        "add_bos_token": True,  # What the post-processor does; transformers 5 follows the post-processor.
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # Decoding gives back the text, a space before '.' included.
        "model_max_length": config.model.max_seq_len,
    }
    if chat_template is not None:
        settings["chat_template"] = chat_template
    return settings, {**special, "additional_special_tokens": markers}


def write_tokenizer_files(run_dir: str, output_dir: str, chat_template: str | None) -> None:
    """Writes the tokenizer of the run `run_dir` as Hugging Face tokenizer files into `output_dir`.

    A run with our tokenizer.model gets tokenizer.json, tokenizer_config.json (model_max_length from the run's
    config) and special_tokens_map.json; an imported run's own tokenizer files are copied. `chat_template`,
    when given, becomes tokenizer_config.json's chat template (an imported run's chat_template.jinja, which
    transformers would read instead, is then left out); otherwise an imported run keeps its own.
    """
    config = directory.load_config(run_dir)
    path = directory.find_tokenizer(run_dir, config)
    os.makedirs(output_dir, exist_ok=True)
    if os.path.basename(path) == TOKENIZER_JSON:
        _copy_hf_files(os.path.dirname(path), output_dir, chat_template)
        return
    hf = spm_to_tokenizer_json(Tokenizer.load(path))
    settings, special_tokens_map = _tokenizer_config(hf, config, chat_template)
    io.write_text(os.path.join(output_dir, TOKENIZER_JSON), hf.to_str(pretty=True))
    io.write_json(os.path.join(output_dir, TOKENIZER_CONFIG), settings)
    io.write_json(os.path.join(output_dir, SPECIAL_TOKENS_MAP), special_tokens_map)


def _copy_hf_files(source_dir: str, output_dir: str, chat_template: str | None) -> None:
    names = [name for name in importer.TOKENIZER_FILES if os.path.isfile(os.path.join(source_dir, name))]
    for name in names:
        if chat_template is None or name != CHAT_TEMPLATE_FILE:
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(output_dir, name))
    if chat_template is not None:
        config_path = os.path.join(output_dir, TOKENIZER_CONFIG)
        settings = json.loads(io.read_text(config_path) or "{}")
        io.write_json(config_path, {**settings, "chat_template": chat_template})
