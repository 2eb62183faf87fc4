"""The requests of a mixed load (`bench.run(mix=...)`): good ones, malformed ones and ones the client abandons.

A mix is written `good:0.8,malformed:0.1,abandoned:0.1` (fractions of the requests, normalized). Within a kind the
variants take turns:

    good        stream (a streamed completion: gives the time to first token), whole (a non-streamed chat answer)
    malformed   bad_json, deep_nesting, wrong_types, unknown_model, too_long, lone_surrogate, oversized_body,
                not_object
    abandoned   mid_stream (closes after the first chunk), mid_non_stream (closes while the answer is computed),
                mid_upload (closes halfway through sending the body)

Every request comes back as a status: the HTTP status code, "closed" when the connection failed without one
(the server hung up), "abandoned" when this client closed it as planned, "stream_error" for an error event in a
stream that began with 200. Nothing a server answers makes the benchmark fail.
"""

from __future__ import annotations

import json
import random
import time

import httpx

KINDS = {
    "good": ("stream", "whole"),
    "malformed": (
        "bad_json",
        "deep_nesting",
        "wrong_types",
        "unknown_model",
        "too_long",
        "lone_surrogate",
        "oversized_body",
        "not_object",
    ),
    "abandoned": ("mid_stream", "mid_non_stream", "mid_upload"),
}
OVERSIZED_BYTES = (1 << 20) + 1024  # Above the server's default max_body_bytes (1 MiB).
NESTING_DEPTH = 20_000  # Far deeper than Python's recursion limit, in a 40 kB body.
ABANDON_AFTER_S = 0.05  # How long mid_non_stream waits for the answer before it hangs up.


def parse_mix(text: str) -> dict[str, float]:
    """'good:0.8,malformed:0.1,abandoned:0.1' as fractions of the requests that sum to 1."""
    mix = {}
    for part in text.split(","):
        kind, _, share = part.partition(":")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError(f"Mix part {part!r}: the kind must be one of {', '.join(KINDS)}.")
        try:
            mix[kind] = float(share)
        except ValueError:
            raise ValueError(f"Mix part {part!r}: write KIND:SHARE with a number, e.g. 'good:0.8'.") from None
        if not mix[kind] >= 0:
            raise ValueError(f"Mix part {part!r}: the share must be >= 0.")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"Mix {text!r}: the shares add up to 0.")
    return {kind: share / total for kind, share in mix.items()}


def schedule(num_requests: int, mix: dict[str, float], seed: int = 0) -> list[tuple[str, str]]:
    """(kind, variant) of each request: the kinds in proportion to `mix` (largest remainders), each kind's
    variants in turn, shuffled with `seed` so that the kinds interleave."""
    exact = {kind: share * num_requests for kind, share in mix.items()}
    counts = {kind: int(value) for kind, value in exact.items()}
    for kind in sorted(exact, key=lambda k: counts[k] - exact[k])[: num_requests - sum(counts.values())]:
        counts[kind] += 1
    plan = [(kind, KINDS[kind][i % len(KINDS[kind])]) for kind, count in counts.items() for i in range(count)]
    random.Random(seed).shuffle(plan)
    return plan


def _completion(model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


def malformed_body(variant: str, model: str, max_model_len: int) -> bytes:
    """The body of a malformed POST /v1/completions."""
    if variant == "bad_json":
        return b'{"model": "' + model.encode() + b'", "prompt": "Hola'
    if variant == "deep_nesting":
        return b'{"model": "' + model.encode() + b'", "prompt": ' + b"[" * NESTING_DEPTH + b"]" * NESTING_DEPTH + b"}"
    if variant == "lone_surrogate":  # Valid JSON syntax; "\ud800" decodes to a code point UTF-8 cannot hold.
        return b'{"model": "' + model.encode() + b'", "prompt": "Hola \\ud800 mundo", "max_tokens": 4}'
    if variant == "not_object":
        return b'["Hola", "mundo"]'
    body = {
        "wrong_types": {"model": model, "prompt": 5, "max_tokens": "diez"},
        "unknown_model": _completion("no-such-model", "Hola", 4, False),
        "too_long": _completion(model, "hola " * (2 * max_model_len), 4, False),  # Each word is >= 1 token.
        "oversized_body": _completion(model, "a" * OVERSIZED_BYTES, 4, False),
    }[variant]
    return json.dumps(body).encode()


def send_malformed(client: httpx.Client, url: str, variant: str, model: str, max_model_len: int) -> str:
    content = malformed_body(variant, model, max_model_len)
    try:
        response = client.post(url + "/v1/completions", content=content, headers={"Content-Type": "application/json"})
    except httpx.HTTPError:
        return "closed"
    return str(response.status_code)


class _HangUp(Exception):
    """Raised inside a request body's iterator: httpx stops sending and drops the connection."""


def _half_a_body(content: bytes):
    yield content[: len(content) // 2]
    time.sleep(ABANDON_AFTER_S)
    raise _HangUp


def abandon(client: httpx.Client, url: str, variant: str, model: str, prompt: str, max_tokens: int) -> str:
    """Starts a good request and closes the connection partway; "abandoned", or the status if the server
    answered (or failed) before the client hung up."""
    try:
        if variant == "mid_stream":
            with client.stream("POST", url + "/v1/completions", json=_completion(model, prompt, max_tokens, True)) as r:
                if r.status_code != 200:
                    return str(r.status_code)
                next(r.iter_lines())  # Leaving the block unread closes the connection.
        elif variant == "mid_non_stream":
            timeout = httpx.Timeout(client.timeout.connect, read=ABANDON_AFTER_S)
            body = _completion(model, prompt, max_tokens, False)
            return str(client.post(url + "/v1/completions", json=body, timeout=timeout).status_code)
        else:
            content = json.dumps(_completion(model, prompt, max_tokens, False)).encode()
            headers = {"Content-Type": "application/json", "Content-Length": str(len(content))}
            return str(client.post(url + "/v1/completions", content=_half_a_body(content), headers=headers).status_code)
    except (_HangUp, httpx.ReadTimeout):
        pass
    except (httpx.HTTPError, StopIteration):
        return "closed"
    return "abandoned"


def good_whole(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """A non-streamed chat answer: (status, completion tokens)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    try:
        response = client.post(url + "/v1/chat/completions", json=body)
    except httpx.HTTPError:
        return "closed", 0
    if response.status_code != 200:
        return str(response.status_code), 0
    return "200", response.json()["usage"]["completion_tokens"]
