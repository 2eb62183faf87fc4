"""A model's own Jinja chat template, rendered as `transformers`' apply_chat_template renders it.

The environment is transformers' (utils/chat_template_utils.py): a sandbox whose objects the template cannot
change, `trim_blocks` and `lstrip_blocks`, the loop controls, `raise_exception(message)`, `strftime_now(format)`,
a `tojson` filter that leaves non-ASCII text and HTML characters alone, and `{% generation %}` blocks that mark
the assistant's text. The template sees `messages`, `add_generation_prompt`, `tools` and `documents` (None
here) and the special tokens its tokenizer config names (`bos_token`, `eos_token`, ...). Templates come from
model repositories: untrusted code, hence the sandbox (and transformers' guards on `dict` and `namespace`).
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

Span = tuple[int, int]  # [start, end) character offsets in a rendered text
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# While a template renders: (the text blocks rendered so far, the spans of its {% generation %} blocks).
_TRACKING: contextvars.ContextVar[tuple[list[str], list[Span]] | None] = contextvars.ContextVar(
    "generation_blocks", default=None
)


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (unknown role, missing content, wrong order, a template error)."""


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records where the assistant's text lands in the output."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller: jinja2.runtime.Macro) -> str:
        text = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            # The blocks before this one have been yielded already (render() consumes the stream as it comes).
            blocks, spans = tracking
            start = sum(map(len, blocks))
            spans.append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() without underscore attributes, which could reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick: namespace(self=...) works.
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"A chat template may not set the namespace attribute {name!r}.")


class _Dict:
    """dict() for templates, without the attributes of the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_: str) -> str:
    return datetime.datetime.now().strftime(format_)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace
    )
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ChatFormatError(f"The chat template does not parse (line {error.lineno}): {error.message}") from None


def has_generation_blocks(template: str) -> bool:
    """Whether the template marks the assistant's text itself with {% generation %} blocks."""
    return bool(_GENERATION_TAG.search(template))


def render(
    template: str,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
) -> tuple[str, list[Span]]:
    """The conversation's text, and the spans of the template's {% generation %} blocks in it (if any).

    A template that rejects the conversation (`raise_exception`, an undefined value, a type error) raises
    ChatFormatError with the template's own message.
    """
    compiled = _compile(template)
    variables = {
        **special_tokens,
        "messages": [dict(message) for message in messages],
        "tools": None,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }
    blocks: list[str] = []
    spans: list[Span] = []
    token = _TRACKING.set((blocks, spans))
    try:
        for block in compiled.generate(**variables):
            blocks.append(block)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as error:
        raise ChatFormatError(f"The chat template rejects the conversation: {type(error).__name__}: {error}") from None
    finally:
        _TRACKING.reset(token)
    return "".join(blocks), spans
