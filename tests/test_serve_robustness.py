"""The server under abuse: fuzzed bodies, stalled uploads, clients that leave, and a storm of all of them.

Each test runs a real uvicorn on loopback (`tests.test_serve.serving`) and checks what a client or an operator
would see: no 5xx for anything a client sends, errors in OpenAI's shape, slots freed, /metrics telling the truth.
"""

import collections
import concurrent.futures
import json
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from tests.test_serve import MODEL, hold_decoding, serving, wait_until

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
TOKENIZE, DETOKENIZE = "/tokenize", "/detokenize"
HALVES = ["hola \ud800", "\udcff", "a\udfffb"]  # Unpaired surrogates: written by json.dumps as \uXXXX escapes.
# Bodies of many kinds of wrong, for both endpoints (raw bytes, so anything goes).
MALFORMED = [
    b"",
    b"{not json",
    b"[1, 2]",
    b"\xff\xfe{}",
    b'{"model": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    b'{"model": ' + b"[" * 40 + b"]" * 40 + b"}",
    b'{"model": "tiny-test", "temperature": NaN}',
    b'{"model": "tiny-test", "max_tokens": 1' + b"0" * 5000 + b"}",
    json.dumps({"model": MODEL, "prompt": HALVES[0], "messages": [{"role": "user", "content": HALVES[1]}]}).encode(),
    json.dumps(
        {"model": MODEL, "prompt": "a", "stop": HALVES, "messages": [{"role": "user", "content": "a"}]}
    ).encode(),
    json.dumps({"model": MODEL, HALVES[0]: 1}).encode(),
    json.dumps({"model": MODEL, "prompt": [], "messages": []}).encode(),
    json.dumps({"model": MODEL, "prompt": [1, "a"], "messages": [{"role": "robot", "content": "a"}]}).encode(),
    json.dumps({"model": MODEL, "prompt": [[]], "messages": [{"role": "user", "content": [[1]]}]}).encode(),
    json.dumps({"model": MODEL, "prompt": [-1], "messages": [{"role": "user"}]}).encode(),
    json.dumps({"model": MODEL, "prompt": "a", "messages": "a", "top_k": 10**30, "max_tokens": 10**30}).encode(),
    json.dumps({"model": MODEL, "prompt": "a", "messages": [], "seed": -(10**40), "n": 10**9}).encode(),
    json.dumps({"model": MODEL, "prompt": "a", "stop": ["x"] * 70, "temperature": 1e308}).encode(),
    json.dumps({"model": "gpt-4", "prompt": "a", "messages": [{"role": "user", "content": "a"}]}).encode(),
    json.dumps({"model": MODEL, "prompt": [[10**6]], "messages": [{"role": "assistant", "content": "a"}]}).encode(),
    # Valid, with a top_k past int32 (the engine's sampling arrays): must be served, not fail the decode loop.
    json.dumps(
        {
            "model": MODEL,
            "prompt": "a",
            "messages": [{"role": "user", "content": "a"}],
            "max_tokens": 1,
            "top_k": 10**30,
        }
    ).encode(),
]

# JSON values of any shape (and the odd surrogate); Python's json writes NaN and huge integers as they are.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(HALVES)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_text = st.text(max_size=12) | st.sampled_from(HALVES + ["Hola", "La niña canta"])
_ids = st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=5)  # The vocabulary has 320.
# Values a client could mean: the body may be fine, or wrong in a way the server must explain.
_plausible = {
    "max_tokens": st.integers(min_value=0, max_value=4),  # Few, to keep it fast; 16 when not given.
    "temperature": st.sampled_from([0, 0.7, 2]),
    "top_p": st.floats(min_value=0.1, max_value=1),
    "top_k": st.integers(min_value=0, max_value=10**20),
    "min_p": st.floats(min_value=0, max_value=0.9),
    "n": st.integers(min_value=1, max_value=2),
    "stop": _text | st.lists(_text, max_size=6),
    "seed": st.integers(min_value=-(10**20), max_value=10**20),
    "stream": st.booleans(),
    "user": _text,
    "ignore_eos": st.booleans(),
}
_completion = {
    "prompt": _text | st.lists(_text, min_size=1, max_size=3) | _ids | st.lists(_ids, min_size=1, max_size=2),
    "logprobs": st.integers(min_value=0, max_value=5),
    "echo": st.booleans(),
}
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": _text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text}), max_size=2),
    },
    optional={"name": _text},
)
_chat = {
    "messages": st.lists(_message, min_size=1, max_size=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=5),
}


def _bodies(required: str, fields: dict) -> st.SearchStrategy:
    """Plausible bodies, and bodies where any field may be any JSON value."""
    optional = {name: value for name, value in fields.items() if name != required}
    plausible = st.fixed_dictionaries({"model": st.just(MODEL), required: fields[required]}, optional=optional)
    wild = st.fixed_dictionaries(
        {"model": st.just(MODEL) | _json}, optional={name: value | _json for name, value in fields.items()}
    )
    return plausible | wild


fuzzed = (
    st.tuples(st.just(COMPLETIONS), _bodies("prompt", {**_plausible, **_completion}).map(json.dumps))
    | st.tuples(st.just(CHAT), _bodies("messages", {**_plausible, **_chat}).map(json.dumps))
    | st.tuples(st.sampled_from([COMPLETIONS, CHAT]), st.binary(max_size=64) | _json.map(json.dumps))
    | st.tuples(
        st.just(TOKENIZE),
        (
            _bodies("prompt", {"prompt": _text, "add_special_tokens": st.booleans()})
            | _bodies("messages", {"messages": _chat["messages"], "add_generation_prompt": st.booleans()})
        ).map(json.dumps),
    )
    | st.tuples(st.just(DETOKENIZE), _bodies("tokens", {"tokens": _ids}).map(json.dumps))
)


def send(client, path, body):
    content = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    return client.post(path, content=content, headers={"content-type": "application/json"})


def assert_well_answered(response):
    """No 5xx, and every error in OpenAI's shape."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
    elif response.request.url.path in (TOKENIZE, DETOKENIZE):
        assert {"tokens", "prompt"} & set(response.json())
    elif not response.headers["content-type"].startswith("text/event-stream"):
        assert response.json()["choices"]
    else:
        assert '"error"' not in response.text and response.text.endswith("data: [DONE]\n\n")


@pytest.fixture(scope="module")
def fuzz_client(run):
    with serving(run, max_tokens=16) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        yield client


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=fuzzed)
@example(request=(COMPLETIONS, MALFORMED[4]))
@example(request=(CHAT, MALFORMED[8]))
@example(request=(COMPLETIONS, MALFORMED[-1]))
@example(request=(CHAT, MALFORMED[-1]))
@example(request=(TOKENIZE, MALFORMED[8]))
def test_fuzzed_bodies_never_get_a_server_error(fuzz_client, request):
    assert_well_answered(send(fuzz_client, *request))


def metric_samples(url, name="llm_requests_total"):
    """{(endpoint, status): count} of the server's request counter."""
    counts = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            fields = dict(part.split("=", 1) for part in labels.split(","))
            counts[fields["endpoint"].strip('"'), int(fields["status"].strip('"'))] = float(value)
    return counts


def stalled_upload(url):
    """A socket that sent its headers and 9 of the 200 body bytes it announced, and then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST {COMPLETIONS} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"model":')
    return sock


def test_stalled_uploads_never_starve_a_normal_request(run):
    body = {"model": MODEL, "prompt": "Hola", "max_tokens": 2}
    with serving(run, max_concurrent_requests=4, body_timeout_s=1.5) as (url, app):
        assert httpx.post(url + COMPLETIONS, json=body, timeout=30).status_code == 200  # Compiles what it needs.
        stalled = [stalled_upload(url) for _ in range(6)]  # More than the server's request places.
        try:
            start = time.monotonic()
            assert httpx.post(url + COMPLETIONS, json=body, timeout=10).status_code == 200
            assert time.monotonic() - start < 1.0
            for sock in stalled:  # Each is answered 408 once its body is late, and the connection closed.
                sock.settimeout(10)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer
            assert time.monotonic() - start < 5.0
        finally:
            for sock in stalled:
                sock.close()
        assert metric_samples(url)[COMPLETIONS, 408] == 6 and metric_samples(url)[COMPLETIONS, 200] == 2


def test_clients_that_leave_free_their_slots_at_once_and_count_as_499(run, monkeypatch):
    long = {"model": MODEL, "prompt": "La compañía", "max_tokens": 110, "ignore_eos": True}
    with serving(run) as (url, app):
        engine = app.state.engine
        hold_decoding(engine, monkeypatch, lambda: time.sleep(0.03))  # 110 steps: over 3 s of generating.
        # Non-streaming: the client gives up while tokens are still arriving.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + COMPLETIONS, json=long, timeout=httpx.Timeout(10, read=0.5))
        left = time.monotonic()
        wait_until(lambda: engine.num_active == 0, timeout_s=1.0)
        # Streaming: the client reads the first tokens, then closes the connection.
        with httpx.stream("POST", url + COMPLETIONS, json={**long, "stream": True}, timeout=10) as response:
            next(response.iter_lines())
            assert engine.num_active == 1
        wait_until(lambda: engine.num_active == 0, timeout_s=1.0)
        assert time.monotonic() - left < 3.0
        wait_until(lambda: metric_samples(url).get((COMPLETIONS, 499)) == 2)
        assert {status for endpoint, status in metric_samples(url) if endpoint == COMPLETIONS} == {499}


def test_a_storm_of_clients_and_malformed_requests_leaves_answers_unchanged(run):
    prompts = ["La niña canta", "El pingüino", "Mi abuela cocina", "Un músico"]
    ask = lambda client, prompt: client.post(
        COMPLETIONS, json={"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    )
    with (
        serving(run) as (url, app),
        httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=100)) as client,
    ):
        before = [ask(client, prompt).json()["choices"][0]["text"] for prompt in prompts]
        kinds = [(path, body) for body in MALFORMED for path in (COMPLETIONS, CHAT)]
        jobs = [("ask", i % len(prompts)) for i in range(64)] + [("bad", kinds[i % len(kinds)]) for i in range(200)]
        jobs = jobs[::2] + jobs[1::2]  # Interleaved, so both kinds run at once.
        sent = collections.Counter()

        def one(job):
            kind, what = job
            response = ask(client, prompts[what]) if kind == "ask" else send(client, *what)
            assert_well_answered(response)
            return kind, what, response

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            for kind, what, response in pool.map(one, jobs):
                sent[COMPLETIONS if kind == "ask" else what[0], response.status_code] += 1
                if kind == "ask":
                    assert response.json()["choices"][0]["text"] == before[what]
        after = [ask(client, prompt).json()["choices"][0]["text"] for prompt in prompts]
        health = client.get("/health").json()
        counted = metric_samples(url)
    assert after == before
    assert health["status"] == "ok" and health["active_slots"] == health["in_flight_requests"] == 0
    sent[COMPLETIONS, 200] += 2 * len(prompts)
    assert sent[COMPLETIONS, 200] == 64 + 8 and len(sent) > 4
    assert {key: value for key, value in counted.items() if key[0] != "/health"} == dict(sent)
