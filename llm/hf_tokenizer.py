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
# Copied alongside tokenizer.json into a run directory: they name the special tokens.
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
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


def read_special_tokens(directory: str) -> dict[str, str | Mapping | None]:
    """The special tokens (bos_token, eos_token, pad_token, unk_token) the config files in `directory` name:
    strings, or serialized AddedTokens.

    As in `transformers` 5: the legacy special_tokens_map.json counts only when tokenizer_config.json has no
    added_tokens_decoder, and then its tokens override the config's.
    """
    config_file, map_file = (os.path.join(directory, name) for name in COMPANION_FILES)
    settings = _read_json(config_file)
    if "added_tokens_decoder" not in settings:
        settings.update(_read_json(map_file))
    return {key: settings.get(key) for key in _SPECIAL_KEYS}


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
    """A loaded tokenizer.json with the special tokens of its tokenizer_config.json."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, path: str, settings: Mapping):
        self._tk = tokenizer
        self.path = path
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
            f"{self.path} is a Hugging Face tokenizer without the project's chat-role markers: this run does not "
            "use the project's chat template (llm/chat_template.py), and its own Jinja chat template is not "
            "supported yet. Use it for plain text completion."
        )
