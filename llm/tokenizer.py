"""The Spanish SentencePiece tokenizer: training, loading, encoding, special and chat-role tokens, metrics.

Text is NFC-normalized in Python and the model is trained with the identity normalization rule, so what
goes in is what comes out: accents, ñ, ¿ ¡ « », runs of spaces and newlines round-trip exactly, and any
character the vocabulary lacks (emoji, CJK) falls back to its UTF-8 bytes instead of <unk>.

Reserved ids are fixed so that every model trained here is interchangeable for the rest of the code:
pad=0, unk=1, bos=2, eos=3, then the chat-role markers of ROLE_TOKENS (ids 4..7), which fine-tuning uses to
build its chat template. They are user-defined symbols: the encoder never splits them.

`load_tokenizer` also loads a Hugging Face tokenizer.json (llm/hf_tokenizer.py, same interface) for runs
imported from Hugging Face checkpoints.
"""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from llm.hf_tokenizer import COMPANION_FILES, TOKENIZER_JSON, HFTokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
MODEL_TYPES = ("bpe", "unigram")
# Every character the tokenizer promises to round-trip, in both cases (the check of train_tokenizer.py).
SPANISH_CHARACTERS = "á é í ó ú ü ñ Á É Í Ó Ú Ü Ñ ¿ ¡ « »"
# Reserved ids + the 256 byte-fallback pieces: a smaller vocabulary has no room for learned pieces.
# The first ordinary text piece: after the special, role and 256 byte-fallback pieces. Pieces are ranked by
# frequency from there on.
FIRST_TEXT_PIECE = len(SPECIAL_PIECES) + len(ROLE_TOKENS) + 256
MIN_VOCAB_SIZE = FIRST_TEXT_PIECE + 1
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")  # A byte-fallback piece
SENTENCEPIECE_FILE = "tokenizer.model"
# Every file a tokenizer of either backend is made of, as copied into a run or data directory.
TOKENIZER_FILES = (SENTENCEPIECE_FILE, TOKENIZER_JSON, *COMPANION_FILES)
DEFAULT_UD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval", "data", "ud_gsd_es_dev.conllu")


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


class Tokenizer:
    """A loaded SentencePiece model with the project's reserved ids."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str):
        self._sp = processor
        self.path = path
        for token_id, piece in enumerate(SPECIAL_PIECES + tuple(ROLE_TOKENS.values())):
            if processor.id_to_piece(token_id) != piece:
                raise ValueError(
                    f"{path}: id {token_id} is {processor.id_to_piece(token_id)!r}, expected {piece!r}; "
                    "the model was not trained by llm.tokenizer.train_tokenizer."
                )

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Loads a `.model` file written by `train_tokenizer` (`load_tokenizer` loads either backend)."""
        if os.path.isdir(path) or os.path.basename(path) == TOKENIZER_JSON:
            raise ValueError(
                f"{path!r} is a Hugging Face tokenizer, not a SentencePiece model: load it with "
                "llm.tokenizer.load_tokenizer (it has no chat-role markers for chat fine-tuning data)."
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer model {path!r} does not exist.")
        processor = spm.SentencePieceProcessor()
        processor.load(path)
        return cls(processor, path)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (NFC-normalized first)."""
        return self._sp.encode(_nfc(text), add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded on all cores."""
        return self._sp.encode(
            [_nfc(text) for text in texts], add_bos=add_bos, add_eos=add_eos, num_threads=os.cpu_count()
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def decode_after(self, ids: Sequence[int], previous_id: int) -> str:
        """The text of `ids` as it reads after the token `previous_id`.

        `decode(ids)` alone drops the space that starts the first piece ("▁de" -> "de"), which would glue a
        completion to its prompt; decoding behind the prompt's last token keeps it.
        """
        return self.decode([previous_id, *ids])[len(self.decode([previous_id])) :]

    def piece(self, token_id: int) -> str:
        """The vocabulary piece of an id (e.g. '▁casa', '<0xF0>', '<|user|>')."""
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"Token id {token_id} is outside the vocabulary of {self.vocab_size} ({self.path}).")
        return self._sp.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a piece stands for (the logprobs of the server): a byte piece's byte, else its text with
        '▁' as a space."""
        piece = self.piece(token_id)
        byte = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def has_role_tokens(self) -> bool:
        """Whether `role_ids` exists (the project's chat markers); False for Hugging Face tokenizers."""
        return True

    @property
    def role_ids(self) -> dict[str, int]:
        """Ids of the chat-role markers: {'system': 4, 'user': 5, 'assistant': 6, 'end': 7}."""
        return {role: self._sp.piece_to_id(piece) for role, piece in ROLE_TOKENS.items()}

    @property
    def chat_template(self) -> None:
        """No Jinja chat template: the role markers make the project's own (llm/chat_template.py)."""
        return None


# Either backend: both have the interface of Tokenizer (encode, decode, decode_after, piece, the special ids).
AnyTokenizer = Tokenizer | HFTokenizer


def tokenizer_file(path: str) -> str:
    """The tokenizer file `path` names: the file itself, or the tokenizer.json, else tokenizer.model, of a
    directory (a run, a data directory, a Hugging Face model: one that has both, e.g. Llama 2's, means the
    tokenizer.json, since its tokenizer.model is no tokenizer of this project)."""
    if not os.path.isdir(path):
        return path
    for name in (TOKENIZER_JSON, SENTENCEPIECE_FILE):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path!r} holds no {TOKENIZER_JSON} or {SENTENCEPIECE_FILE}.")


def load_tokenizer(path: str) -> AnyTokenizer:
    """A SentencePiece `.model` file, or a Hugging Face tokenizer.json; or a directory holding one of them."""
    path = tokenizer_file(path)
    if os.path.basename(path) == TOKENIZER_JSON:
        return HFTokenizer.load(path)
    return Tokenizer.load(path)


def copy_tokenizer(path: str, output_dir: str) -> str:
    """Copies the tokenizer `path` names into `output_dir` (a SentencePiece model as tokenizer.model; a
    tokenizer.json with its companion files: config, chat template, generation config) and removes the files
    of another tokenizer left there, which would otherwise be found first. Returns the copy's path."""
    source = tokenizer_file(path)
    if os.path.basename(source) == TOKENIZER_JSON:
        source_dir = os.path.dirname(source)
        names = [TOKENIZER_JSON, *(name for name in COMPANION_FILES if os.path.isfile(os.path.join(source_dir, name)))]
        copies = [(os.path.join(source_dir, name), name) for name in names]
    else:
        copies = [(source, SENTENCEPIECE_FILE)]
    os.makedirs(output_dir, exist_ok=True)
    for name in set(TOKENIZER_FILES) - {name for _, name in copies}:
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
    for origin, name in copies:
        target = os.path.join(output_dir, name)
        if not (os.path.exists(target) and os.path.samefile(origin, target)):
            shutil.copyfile(origin, target + ".tmp")
            os.replace(target + ".tmp", target)
    return os.path.join(output_dir, copies[0][1])


def _training_sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty NFC lines of the documents, long lines cut at spaces into pieces of <= max_bytes.

    SentencePiece silently skips sentences longer than its max_sentence_length, which would drop whole
    long paragraphs from training.
    """
    for text in texts:
        for line in _nfc(text).split("\n"):
            while line.strip():
                head = line
                if len(line.encode("utf-8")) > max_bytes:
                    # Cut at the last space of the first max_bytes // 4 characters: at most max_bytes bytes.
                    head = line[: max_bytes // 4]
                    cut = head.rfind(" ")
                    head = head[:cut] if cut > 0 else head
                if head.strip():
                    yield head
                line = line[len(head) :]


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    character_coverage: float = 0.9999,
    input_sentence_size: int = 5_000_000,
    max_sentence_bytes: int = 4096,
    seed: int = 0,
    multiword_pieces: bool = False,
) -> Tokenizer:
    """Trains a SentencePiece model on `texts` and writes `{model_prefix}.model` and `.vocab`.

    `input_sentence_size` bounds memory on big corpora: SentencePiece keeps a uniform random sample of that
    many lines (seeded by `seed`). A character coverage of 0.9999 leaves the rarest characters (box
    drawing, CJK in a Spanish corpus) out of the vocabulary; byte fallback still encodes them exactly, and
    their slots go to Spanish pieces.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (reserved ids + 256 byte pieces), got {vocab_size}.")
    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(texts, max_sentence_bytes),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        # Multi-word pieces ("▁de▁la"; SuperBPE-style) cut tokens per word by ~8% on Spanish, at the cost of
        # token boundaries that no longer coincide with word boundaries. Off by default.
        split_by_whitespace=not multiword_pieces,
        split_by_unicode_script=not multiword_pieces,
        # Lets runs of spaces (code indentation) become single pieces instead of one token per space.
        allow_whitespace_only_pieces=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece=SPECIAL_PIECES[PAD_ID],
        unk_piece=SPECIAL_PIECES[UNK_ID],
        bos_piece=SPECIAL_PIECES[BOS_ID],
        eos_piece=SPECIAL_PIECES[EOS_ID],
        user_defined_symbols=list(ROLE_TOKENS.values()),
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_bytes,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,  # warnings and errors only; the INFO log is thousands of lines
    )
    return Tokenizer.load(model_prefix + ".model")


def conllu_texts(path: str = DEFAULT_UD_PATH) -> list[str]:
    """The raw sentences (`# text = ...` comment lines) of a CoNLL-U file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CoNLL-U file {path!r} does not exist.")
    prefix = "# text = "
    with open(path, encoding="utf-8") as f:
        texts = [line[len(prefix) :].rstrip("\n") for line in f if line.startswith(prefix)]
    if not texts:
        raise ValueError(f"{path}: no '{prefix}' lines; is it a CoNLL-U file?")
    return texts


def fertility(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """Tokens per whitespace-separated word (lower is better: fewer, more meaningful pieces)."""
    words = sum(len(text.split()) for text in texts)
    if words == 0:
        raise ValueError("fertility needs texts with at least one word.")
    return sum(len(ids) for ids in tokenizer.encode_batch(texts)) / words


def bytes_per_token(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """UTF-8 bytes of text per token (higher is better: each token carries more text)."""
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    if tokens == 0:
        raise ValueError("bytes_per_token needs non-empty texts.")
    return sum(len(_nfc(text).encode("utf-8")) for text in texts) / tokens


def round_trips(tokenizer: Tokenizer, text: str) -> bool:
    """True if decoding the encoding of `text` gives back exactly its NFC form."""
    return tokenizer.decode(tokenizer.encode(text)) == _nfc(text)


def benchmark(tokenizer: Tokenizer, texts: Sequence[str] | None = None, repeats: int = 5) -> dict[str, float]:
    """Encoding speed (MB/s, batch and one text at a time) and quality (fertility, bytes/token) on `texts`,
    by default the UD Spanish-GSD dev sentences."""
    import time

    texts = list(texts) if texts is not None else conllu_texts()
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6

    def best_seconds(encode_all) -> float:
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            encode_all()
            timings.append(time.perf_counter() - start)
        return min(timings)

    batch_s = best_seconds(lambda: tokenizer.encode_batch(texts))
    single_s = best_seconds(lambda: [tokenizer.encode(text) for text in texts])
    return {
        "texts": len(texts),
        "megabytes": megabytes,
        "encode_batch_mb_per_sec": megabytes / batch_s,
        "encode_mb_per_sec": megabytes / single_s,
        "fertility": fertility(tokenizer, texts),
        "bytes_per_token": bytes_per_token(tokenizer, texts),
        "vocab_size": tokenizer.vocab_size,
    }
