"""The chat template: conversations as token ids, built on the tokenizer's reserved role markers.

    <s><|system|>Eres un asistente útil.<|end|><|user|>¿Qué hora es?<|end|><|assistant|>Son las tres.<|end|>

Each message is its role marker, its content and `<|end|>`. Rendering for generation ends with
`<|assistant|>`, and the model's answer ends when it produces `<|end|>`. The marker strings are reserved:
if a message's text contains one literally, it is broken with a zero-width space so that user text can
never forge a turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llm.hf_tokenizer import NoChatMarkersError
from llm.tokenizer import ROLE_TOKENS, Tokenizer

ROLES = ("system", "user", "assistant")
_ZERO_WIDTH_SPACE = "\u200b"


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (unknown role, missing content, wrong order)."""


def _defuse(text: str) -> str:
    for marker in ROLE_TOKENS.values():
        text = text.replace(marker, marker[:2] + _ZERO_WIDTH_SPACE + marker[2:])
    return text


def validate_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Raises ChatFormatError naming the offending message."""
    if not messages:
        raise ChatFormatError("A conversation needs at least one message.")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) - {"role", "content", "name"}:
            raise ChatFormatError(f"Message {index} must be an object with 'role' and 'content'; got {message!r}.")
        if message.get("role") not in ROLES:
            raise ChatFormatError(f"Message {index} has role {message.get('role')!r}; allowed roles: {ROLES}.")
        if not isinstance(message.get("content"), str):
            raise ChatFormatError(f"Message {index} needs a string 'content'.")
        if message["role"] == "system" and index != 0:
            raise ChatFormatError(f"Message {index}: a system message may only come first.")


def render(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a mask that is 1 on the assistant's tokens (its content and <|end|>).

    The mask is what supervised fine-tuning trains on. With `add_generation_prompt`, the ids end with
    `<|assistant|>` so that generation continues with the assistant's answer.
    """
    validate_messages(messages)
    try:
        roles = tokenizer.role_ids
    except NoChatMarkersError as error:  # A run imported from Hugging Face: the request, not the server, is wrong.
        raise ChatFormatError(str(error)) from None
    ids, assistant_mask = [tokenizer.bos_id], [0]
    for message in messages:
        content = tokenizer.encode(_defuse(message["content"]))
        is_assistant = int(message["role"] == "assistant")
        ids += [roles[message["role"]], *content, roles["end"]]
        assistant_mask += [0] + [is_assistant] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(roles["assistant"])
        assistant_mask.append(0)
    return ids, assistant_mask


def stop_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Tokens that end an assistant turn."""
    return tokenizer.role_ids["end"], tokenizer.eos_id


def _defused_content_jinja() -> str:
    """`message['content']` with every marker broken as `_defuse` breaks it, as a Jinja expression."""
    replaces = "".join(
        f" | replace('{marker}', '{marker[:2]}{_ZERO_WIDTH_SPACE}{marker[2:]}')" for marker in ROLE_TOKENS.values()
    )
    return "message['content']" + replaces


# The same layout as a Jinja chat template, the form Hugging Face tokenizers carry: exported chat-tuned runs
# ship it, and transformers' `apply_chat_template` renders exactly `render`'s ids with it (tested). Each content
# reads after a space: the dummy prefix our SentencePiece encoder puts in front of every message.
JINJA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ "
    + _defused_content_jinja()
    + " }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
