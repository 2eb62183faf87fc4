"""The Hugging Face tokenizer backend: a `tokenizer.json` (the `tokenizers` library) behind the interface of
llm.tokenizer.Tokenizer, so that runs imported from Hugging Face checkpoints work with every tool.

Text is encoded exactly as `transformers` encodes it: the tokenizer.json's own normalizer and pre-tokenizer,
and no NFC normalization here (the model was trained on what its tokenizer makes of the text). The special
tokens (bos, eos, pad, unk) come from `tokenizer_config.json` (then `special_tokens_map.json`); whether a
text gets a BOS by default comes from tokenizer.json's post-processor, as in `transformers`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import tokenizers

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer_config.json", "special_tokens_map.json"
CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE = "chat_template.jinja", "generation_config.json"
# Copied alongside tokenizer.json into a run or data directory: they name the special tokens, hold the model's
# own chat template and the ids that end its turns (llm/chat_template.py).
COMPANION_FILES = (CONFIG_FILE, SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE)
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# The special tokens a chat template sees as variables (transformers' SPECIAL_TOKENS_ATTRIBUTES).
TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")  # SentencePiece-style byte fallback


def _byte_level_chars() -> dict[str, int]:
    """The byte of each character of a byte-level vocabulary (GPT-2's bytes_to_unicode, inverted): printable
    bytes stand for themselves, the others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_LEVEL_CHARS = _byte_level_chars()


def _has_byte_level(component: Mapping | list | None) -> bool:
    """Whether a serialized decoder is (or contains) the ByteLevel decoder."""
    if isinstance(component, list):
        return any(_has_byte_level(part) for part in component)
    if isinstance(component, Mapping):
        return component.get("type") == "ByteLevel" or _has_byte_level(component.get("decoders"))
    return False


class NoChatMarkersError(ValueError):
    """The tokenizer lacks the project's chat-role markers (llm/chat_template.py cannot render for it)."""


def _content(token: str | Mapping | None) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a serialized AddedToken."""
    return token.get("content") if isinstance(token, Mapping) else token


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_settings(directory: str) -> dict:
    """tokenizer_config.json, with special_tokens_map.json over it as `transformers` 5 reads them: the legacy
    map counts only when the config has no added_tokens_decoder, and then its tokens override the config's."""
    settings = _read_json(os.path.join(directory, CONFIG_FILE))
    if "added_tokens_decoder" not in settings:
        settings.update(_read_json(os.path.join(directory, SPECIAL_TOKENS_FILE)))
    return settings


def read_special_tokens(directory: str) -> dict[str, str | Mapping | None]:
    """The special tokens (bos_token, eos_token, pad_token, unk_token) the config files in `directory` name:
    strings, or serialized AddedTokens."""
    settings = _token_settings(directory)
    return {key: settings.get(key) for key in _SPECIAL_KEYS}


def read_template_tokens(directory: str) -> dict[str, str]:
    """The special tokens a chat template sees (bos_token, eos_token, ...), as text: those the config names."""
    settings = _token_settings(directory)
    return {key: _content(settings[key]) for key in TEMPLATE_TOKEN_KEYS if _content(settings.get(key)) is not None}


def read_chat_template(directory: str) -> str | None:
    """The model's Jinja chat template: chat_template.jinja, else tokenizer_config.json's "chat_template" (a
    string, or a list of {"name", "template"} of which "default" is the chat template); None without one."""
    jinja_file = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    config_file = os.path.join(directory, CONFIG_FILE)
    template = _read_json(config_file).get("chat_template")
    if template is None or isinstance(template, str):
        return template
    entries = template if isinstance(template, list) else []
    named = {entry.get("name"): entry.get("template") for entry in entries if isinstance(entry, Mapping)}
    if not isinstance(named.get("default"), str):
        raise ValueError(
            f'{config_file}: "chat_template" must be a string or a list of {{"name", "template"}} with a "default" '
            f"one; found the names {sorted(map(str, named))}."
        )
    return named["default"]


def read_generation_eos_ids(directory: str) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an id or a list: the ids that end generation); () without it."""
    path = os.path.join(directory, GENERATION_CONFIG_FILE)
    eos = _read_json(path).get("eos_token_id")
    ids = tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)
    if not all(isinstance(token_id, int) and not isinstance(token_id, bool) for token_id in ids):
        raise ValueError(f"{path}: eos_token_id must be an id or a list of ids, got {eos!r}.")
    return ids


def _register_special_tokens(tokenizer: tokenizers.Tokenizer, tokens: Mapping[str, str | Mapping | None]) -> None:
    """Makes the config's special tokens special added tokens, as `transformers` does: the encoder never splits
    them and decode skips them, also where tokenizer.json has them as plain vocabulary entries (or not at all)."""
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    for token in tokens.values():
        content = _content(token)
        if content is None or content in special:
            continue
        flags = {"normalized": False}
        if isinstance(token, Mapping):
            flags |= {key: token[key] for key in ("single_word", "lstrip", "rstrip", "normalized") if key in token}
        tokenizer.add_special_tokens([tokenizers.AddedToken(content, special=True, **flags)])


class HFTokenizer:
    """A loaded tokenizer.json with the special tokens of its tokenizer_config.json and the model's own chat
    template (rendered by llm/chat_template.py)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, path: str, settings: Mapping):
        self._tk = tokenizer
        self.path = path
        directory = os.path.dirname(path)
        self.chat_template = read_chat_template(directory)
        self.template_tokens = read_template_tokens(directory)
        self.generation_eos_ids = read_generation_eos_ids(directory)
        self._eos_id = self._id_of(settings.get("eos_token"))
        if self._eos_id is None:
            raise ValueError(
                f"{path}: the tokenizer config names no eos_token of the vocabulary; generation needs one."
            )
        bos_id = self._id_of(settings.get("bos_token"))
        # A tokenizer without a BOS (GPT-2, Qwen) starts its documents after the end-of-text token; that is the
        # "beginning of sequence" the rest of the code (scoring, generation prompts) puts in front of a text.
        self._bos_id = self._eos_id if bos_id is None else bos_id
        pad_id = self._id_of(settings.get("pad_token"))
        self._pad_id = self._eos_id if pad_id is None else pad_id  # Padding is masked out: any id will do.
        self._unk_id = self._id_of(settings.get("unk_token"))
        self._special_ids = frozenset(
            token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special
        )
        decoder = tokenizer.decoder
        self._byte_level = decoder is not None and _has_byte_level(json.loads(decoder.__getstate__()))
        # What `transformers` adds around a text by default; encode() adds them only when asked.
        self.add_bos_token = self._adds(bos_id, first=True)
        self.add_eos_token = self._adds(self._eos_id, first=False)

    @classmethod
    def load(cls, path: str) -> HFTokenizer:
        """Loads a tokenizer.json file, or the one in directory `path`, with its companion config files."""
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_JSON)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer file {path!r} does not exist.")
        tokenizer, settings = tokenizers.Tokenizer.from_file(path), read_special_tokens(os.path.dirname(path))
        _register_special_tokens(tokenizer, settings)
        return cls(tokenizer, path, settings)

    def _id_of(self, token: str | Mapping | None) -> int | None:
        content = _content(token)
        return None if content is None else self._tk.token_to_id(content)

    def _adds(self, token_id: int | None, first: bool) -> bool:
        """Whether tokenizer.json's post-processor puts `token_id` first (or last) around an encoded text.

        `transformers` (5.x) ignores tokenizer_config.json's add_bos_token / add_eos_token when there is a
        tokenizer.json: its post-processor alone decides, and so it does here.
        """
        if token_id is None:
            return False
        plain = self._tk.encode("a", add_special_tokens=False).ids
        full = self._tk.encode("a", add_special_tokens=True).ids
        return len(full) > len(plain) and full[0 if first else -1] == token_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, with the BOS / EOS only when asked for (whatever the post-processor says)."""
        return self._wrapped(self._tk.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded on all cores."""
        encodings = self._tk.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrapped(encoding.ids, add_bos, add_eos) for encoding in encodings]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no BOS / EOS added) and each token's (start, end) character span in `text`."""
        encoding = self._tk.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special added token (bos, eos, a template's <|im_end|> ...)."""
        return token_id in self._special_ids

    def _wrapped(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return [self._bos_id] * add_bos + ids + [self._eos_id] * add_eos

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special tokens (bos, eos, pad) read as nothing, as SentencePiece's control ids."""
        return self._tk.decode(list(ids), skip_special_tokens=True)

    def decode_after(self, ids: Sequence[int], previous_id: int | None) -> str:
        """The text of `ids` as it reads after the token `previous_id` (which ends a whole character).

        Decoders drop the space that starts the first token ("▁de" -> "de" for SentencePiece-style tokenizers);
        decoding behind the previous token keeps it. After a special token (<s>, or a </s> that ends a
        document) a new text starts, without that space, as in SentencePiece's decode_after.
        """
        if previous_id is None or previous_id in self._special_ids:
            return self.decode(ids)
        head = [previous_id]
        if _BYTE_PIECE.fullmatch(self._tk.id_to_token(previous_id) or ""):
            # Byte-fallback pieces decode as one group: the previous byte would join the ids' leading bytes into
            # invalid UTF-8 (U+FFFD). Plain text in front reads the same, since the previous token ends a character.
            head = self._tk.encode("a", add_special_tokens=False).ids
        return self.decode([*head, *ids])[len(self.decode(head)) :]

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of an id (e.g. 'Ġcasa' for byte-level BPE, '▁casa' for SentencePiece-style)."""
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"Token id {token_id} is outside the vocabulary of {self.vocab_size} ({self.path}).")
        return self._tk.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (the logprobs of the server): a byte-level piece's characters mapped
        back to bytes, a byte-fallback piece's byte, else the piece with '▁' as a space."""
        piece = self.piece(token_id)
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        if self._byte_level and all(char in _BYTE_LEVEL_CHARS for char in piece):
            return bytes(_BYTE_LEVEL_CHARS[char] for char in piece)
        return piece.replace("\u2581", " ").encode()

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int | None:
        """None for byte-level tokenizers, which need no unknown token."""
        return self._unk_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def has_role_tokens(self) -> bool:
        return False

    @property
    def role_ids(self) -> dict[str, int]:
        raise NoChatMarkersError(
            f"{self.path} is a Hugging Face tokenizer without the project's chat-role markers: its conversations "
            "go through its own Jinja chat template (llm/chat_template.py renders both)."
        )
