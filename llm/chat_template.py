"""Conversations as token ids: the project's chat template, or the model's own Jinja template.

Runs trained here use the project's template, built on the tokenizer's reserved role markers:

    <s><|system|>Eres un asistente útil.<|end|><|user|>¿Qué hora es?<|end|><|assistant|>Son las tres.<|end|>

Each message is its role marker, its content and `<|end|>`. Rendering for generation ends with
`<|assistant|>`, and the model's answer ends when it produces `<|end|>`. The marker strings are reserved:
if a message's text contains one literally, it is broken with a zero-width space so that user text can
never forge a turn.

Runs imported from Hugging Face have no role markers but usually a Jinja chat template of their own
(chat_template.jinja or tokenizer_config.json's "chat_template"), rendered as `transformers` renders it
(llm/jinja_chat.py) and encoded without added special tokens: the template writes the BOS itself when the
model wants one (`{{ bos_token }}`), so the ids equal apply_chat_template's (and, as there by default, a
message that spells a special token, `<|im_end|>`, gets that token: unlike our markers, nothing is defused).
The assistant mask of such a
conversation covers the tokens that overlap an assistant span of the text:

  - with {% generation %} blocks in the template, the blocks (as transformers' return_assistant_tokens_mask);
  - else, for assistant message i: from the end of the conversation before it rendered with the generation
    prompt (`messages[:i]`, add_generation_prompt=True) to the end of the conversation through it
    (`messages[:i+1]`) less trailing whitespace. That is its content and the end-of-turn text the template
    writes after it (`<|im_end|>`, `<|eot_id|>`, `</s>`), but not the newline that separates turns, which
    the model never generates before it stops. Both renderings must be prefixes of the whole conversation's
    text; a template that renders earlier turns differently once later ones follow is a ChatFormatError.

Stop tokens of such a run: its eos, generation_config.json's eos_token_id(s) and the end-of-turn token of its
template (the last special token of an assistant span).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llm import jinja_chat
from llm.jinja_chat import ChatFormatError, Span
from llm.tokenizer import ROLE_TOKENS, AnyTokenizer

ROLES = ("system", "user", "assistant")
_ZERO_WIDTH_SPACE = "\u200b"
# A conversation whose rendering shows what a template writes after an answer (its end-of-turn token).
_PROBE = ({"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Hola"})


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


def has_chat_format(tokenizer: AnyTokenizer) -> bool:
    """Whether conversations can be rendered for this tokenizer: role markers, or a Jinja template."""
    return tokenizer.has_role_tokens or tokenizer.chat_template is not None


def render(
    tokenizer: AnyTokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a mask that is 1 on the assistant's tokens (its content and end of turn).

    The mask is what supervised fine-tuning trains on. With `add_generation_prompt`, the ids end where the
    assistant's answer starts (`<|assistant|>`, or the template's generation prompt), so that generation
    continues with it.
    """
    validate_messages(messages)
    if tokenizer.has_role_tokens:
        return _render_markers(tokenizer, messages, add_generation_prompt)
    if tokenizer.chat_template is None:  # A run imported from Hugging Face: the request, not the server, is wrong.
        raise _no_chat_format(tokenizer)
    return _render_jinja(tokenizer, messages, add_generation_prompt)


def _no_chat_format(tokenizer: AnyTokenizer) -> ChatFormatError:
    return ChatFormatError(
        f"{tokenizer.path} has neither the project's chat-role markers nor a chat template of its own "
        "(chat_template.jinja or tokenizer_config.json's chat_template): use it for plain text completion."
    )


def _render_markers(
    tokenizer: AnyTokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
) -> tuple[list[int], list[int]]:
    roles = tokenizer.role_ids
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


def _text(
    tokenizer: AnyTokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
) -> tuple[str, list[Span]]:
    return jinja_chat.render(tokenizer.chat_template, messages, add_generation_prompt, tokenizer.template_tokens)


def _render_jinja(
    tokenizer: AnyTokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
) -> tuple[list[int], list[int]]:
    text, spans = _text(tokenizer, messages, add_generation_prompt)
    if not jinja_chat.has_generation_blocks(tokenizer.chat_template):
        spans = _assistant_spans(tokenizer, messages, text)
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ids, _token_mask(offsets, spans)


def _assistant_spans(tokenizer: AnyTokenizer, messages: Sequence[Mapping[str, str]], text: str) -> list[Span]:
    """The assistant spans of `text` (the whole conversation) by rendering its prefixes: the module's rule."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = _text(tokenizer, messages[:index], add_generation_prompt=True)
        through, _ = _text(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatFormatError(
                f"Message {index}: the chat template renders the conversation before this answer differently "
                "once more turns follow, so the answer's tokens cannot be found (a template with "
                "{% generation %} blocks marks them itself)."
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return spans


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """1 for every token whose characters overlap a span (as transformers' return_assistant_tokens_mask)."""
    mask = [0] * len(offsets)
    span = 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        mask[index] = int(end > spans[span][0])
    return mask


def stop_token_ids(tokenizer: AnyTokenizer) -> tuple[int, ...]:
    """Tokens that end an assistant turn: `<|end|>` and eos; for a Jinja template, eos, generation_config's
    eos ids and the template's end-of-turn token (the last special token of an answer's span)."""
    if tokenizer.has_role_tokens:
        return tokenizer.role_ids["end"], tokenizer.eos_id
    end_of_turn = []
    if tokenizer.chat_template is not None:
        try:
            ids, mask = _render_jinja(tokenizer, _PROBE, add_generation_prompt=False)
        except ChatFormatError:  # A template that refuses the probe: eos and generation_config still stop.
            ids, mask = [], []
        end_of_turn = [token for token, kept in zip(ids, mask) if kept and tokenizer.is_special(token)][-1:]
    return tuple(dict.fromkeys([tokenizer.eos_id, *tokenizer.generation_eos_ids, *end_of_turn]))


def template_source(tokenizer: AnyTokenizer) -> str | None:
    """The conversation layout as a Jinja template: the run's own, or JINJA_TEMPLATE for the project's markers
    (what an exported chat run ships); None for a tokenizer with neither."""
    if tokenizer.has_role_tokens:
        return JINJA_TEMPLATE
    return tokenizer.chat_template


def render_text(
    tokenizer: AnyTokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
) -> str:
    """A conversation as text, for tools that take prompts as strings (lm-eval's apply_chat_template): read as
    Hugging Face tokenizers read it (special tokens spelled in it are those tokens), it is `render`'s ids.

    `continue_final_message` ends the text right after the last message's content (transformers' option of the
    same name), so that a model continues that message instead of starting a new turn. A message that spells a
    control token ('</s>') reads as that token here, where `render` keeps it as text.
    """
    validate_messages(messages)
    if tokenizer.has_role_tokens:
        template, tokens = JINJA_TEMPLATE, {"bos_token": tokenizer.piece(tokenizer.bos_id)}
    elif tokenizer.chat_template is not None:
        template, tokens = tokenizer.chat_template, tokenizer.template_tokens
    else:
        raise _no_chat_format(tokenizer)
    text, _ = jinja_chat.render(template, messages, add_generation_prompt, tokens)
    if continue_final_message:
        final = messages[-1]["content"].strip()
        end = text.rfind(final) if final else len(text)
        if end < 0:
            raise ChatFormatError("The last message's content does not appear in the rendered conversation.")
        text = text[: end + len(final)]
    return text


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
