"""The OpenAI-compatible server end to end: a real uvicorn on 127.0.0.1 serving the trained test run."""

import concurrent.futures
import contextlib
import json
import logging
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest

from llm import chat_template
from llm.infer import generate
from llm.serve import admission, api, bench, completions, errors
from tests import conftest
from tests.conftest import forward

MODEL = "tiny-test"
CACHE_LEN = 128  # The trained run's context.


@contextlib.contextmanager
def serving(run, **settings):
    """A uvicorn server on a free loopback port in a thread; yields (base URL, app)."""
    app = api.create_app(run.model, run.tokenizer, api.ServeSettings(MODEL, max_batch_size=4, **settings))
    with bench.background_server(app) as url:
        yield url, app


def hold_decoding(engine, monkeypatch, before_each_step):
    """Runs `before_each_step()` (e.g. a wait) on the engine's thread before every decode step."""
    step = engine._run_decode
    monkeypatch.setattr(engine, "_run_decode", lambda active: (before_each_step(), step(active))[1])


def wait_until(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(run):
    with serving(run, max_tokens=64) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_completions_match_generate_text(client, run):
    prompts = ["La niña canta", "El pingüino"]
    expected = generate.generate_text(run, prompts, max_new_tokens=12)
    for prompt, want in zip(prompts, expected):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert response.choices[0].text == want
        assert response.usage.prompt_tokens == len(run.tokenizer.encode(prompt, add_bos=True))


def test_seeded_sampling_is_reproducible(client):
    ask = lambda seed: client.completions.create(
        model=MODEL, prompt="Mi abuela", max_tokens=10, temperature=1.0, seed=seed, n=2
    )
    first, again = ask(7), ask(7)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len(first.choices) == 2 and first.usage.completion_tokens > 0


def test_chat_applies_the_template_and_streams_the_same_answer(client, run):
    messages = [{"role": "system", "content": "Eres un asistente."}, {"role": "user", "content": "¿Quién canta?"}]
    ids, _ = chat_template.render(run.tokenizer, messages, add_generation_prompt=True)
    want = run.tokenizer.decode(
        generate.run_generator(run).generate([ids], 10, stop_token_ids=chat_template.stop_token_ids(run.tokenizer))[0]
    )
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == want
    assert response.usage.prompt_tokens == len(ids)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == response.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_completion_stream_is_openai_server_sent_events(server, client):
    url, _ = server
    body = {"model": MODEL, "prompt": "La ciudad", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    whole = client.completions.create(model=MODEL, prompt="La ciudad", max_tokens=8, temperature=0)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason


def test_echo_logprobs_are_the_models_prompt_log_likelihoods(client, run):
    """What log-likelihood evaluation (lm-eval-harness style) sends: echo, max_tokens=0, logprobs."""
    prompt = "El señor García escribe una canción."
    ids = run.tokenizer.encode(prompt, add_bos=True)
    logprobs = np.asarray(jax.nn.log_softmax(forward(run.model, np.array([ids]))[0].astype(np.float32)))
    want = [logprobs[t, ids[t + 1]] for t in range(len(ids) - 1)]
    choice = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2).choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    np.testing.assert_allclose(choice.logprobs.token_logprobs, want, atol=1e-4)
    assert [len(top) for top in choice.logprobs.top_logprobs] == [2] * len(want)
    # The tokens add up to the text (no dummy-prefix space before "El"), and each starts at its text_offset.
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    assert "".join(tokens) == prompt and not tokens[0].startswith(" ")
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    # Token-id prompts are taken as given; the first token has nothing before it, so no logprob.
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0).choices[0]
    assert by_ids.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(by_ids.logprobs.token_logprobs[1:], want, atol=1e-4)
    # Streamed, the echoed prompt comes first with its logprobs, then the completion's tokens.
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].text == prompt
    np.testing.assert_allclose(chunks[0].choices[0].logprobs.token_logprobs, want, atol=1e-4)
    streamed = [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs]
    assert len(streamed) == len(want) + 2


def test_stop_string_cuts_the_completion(client, run):
    full = generate.generate_text(run, ["Un músico"], max_new_tokens=16)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    choice = client.completions.create(
        model=MODEL, prompt="Un músico", max_tokens=16, temperature=0, stop=[stop]
    ).choices[0]
    assert choice.text == full[: full.find(stop)] and choice.finish_reason == "stop"


def test_many_concurrent_clients_all_get_their_own_answer(server, client, run):
    prompts = [f"{s} {v}" for s in conftest.SUBJECTS[:4] for v in conftest.VERBS[:4]]
    lengths = [4 + i % 9 for i in range(len(prompts))]  # Requests join and leave the batch at different steps.
    encoded = [run.tokenizer.encode(p, add_bos=True) for p in prompts]
    # Greedy rows are independent, so one batched generation gives every prompt's answer at every length.
    tokens = generate.run_generator(run).generate(encoded, max(lengths), stop_token_ids=(run.tokenizer.eos_id,))
    tokens = [ids[:n] for ids, n in zip(tokens, lengths)]
    # Each answer's log-likelihood under one full forward pass: a row mixed up with another would not match.
    rows = np.zeros((len(prompts), CACHE_LEN // 2), np.int32)
    for row, (prompt, new) in enumerate(zip(encoded, tokens)):
        rows[row, : len(prompt) + len(new)] = prompt + new
    logprobs = np.asarray(jax.nn.log_softmax(forward(run.model, rows).astype(np.float32)))
    want = [
        (
            run.tokenizer.decode_after(new, prompt[-1]),
            [logprobs[row, len(prompt) - 1 + i, t] for i, t in enumerate(new)],
        )
        for row, (prompt, new) in enumerate(zip(encoded, tokens))
    ]

    def ask(prompt, max_tokens):
        choice = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0
        ).choices[0]
        return choice.text, choice.logprobs.token_logprobs

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, prompts, lengths))
    for (text, token_logprobs), (want_text, want_logprobs) in zip(got, want):
        assert text == want_text
        np.testing.assert_allclose(token_logprobs, want_logprobs, atol=1e-4)
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["active_slots"] == 0


def test_cancelled_stream_frees_its_slot(server):
    url, app = server
    body = {"model": MODEL, "prompt": "La compañía", "max_tokens": 64, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())
        assert app.state.engine.num_active == 1
    deadline = time.monotonic() + 10
    while app.state.engine.num_active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.engine.num_active == 0


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": MODEL, "prompt": "Hola", "best_of": 2}, 422, "best_of"),
        ({"model": MODEL, "prompt": "Hola", "max_tokens": "5"}, 422, "max_tokens"),
        ({"model": MODEL, "prompt": "Hola", "temperature": 3}, 422, "temperature"),
        ({"model": MODEL, "prompt": 5}, 422, "prompt"),
        ({"prompt": "Hola"}, 422, "model"),
        ({"model": "gpt-4", "prompt": "Hola"}, 404, "model"),
        ({"model": MODEL, "prompt": "Hola " * 200}, 400, "prompt"),
        ({"model": MODEL, "prompt": "Hola", "max_tokens": 1000}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": [[1, 2], [10**6]]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x" * 2_000_000}, 413, None),
    ],
)
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        server[0] + "/v1/completions", content=content, timeout=30, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def post_raw(url, path, body, client=httpx):
    """POSTs `body` (a dict, written with Python's json: a lone surrogate becomes a \\uXXXX escape; or text)."""
    text = body if isinstance(body, str) else json.dumps(body)
    return client.post(url + path, content=text.encode(), headers={"content-type": "application/json"}, timeout=30)


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["param"] == param
    return error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_deeply_nested_json_is_a_bad_request(server, path):
    deep = f'{{"model": "{MODEL}", "messages": {"[" * 1000}{"]" * 1000}, "prompt": 1}}'
    assert "nest" in assert_openai_error(post_raw(server[0], path, deep), 400)["message"]
    # Deep enough to parse, too deep to be a request; and NaN, which strict JSON has not.
    assert_openai_error(post_raw(server[0], path, f'{{"model": {"[" * 40}{"]" * 40}}}'), 400)
    assert_openai_error(post_raw(server[0], path, f'{{"model": "{MODEL}", "temperature": NaN}}'), 400)


HALF = "hola \ud800"  # Half a surrogate pair: valid JSON (as an escape), not encodable text.
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    "path, fields, param",
    [
        ("/v1/completions", {"prompt": "hola \udcff"}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", HALF]}, "prompt.1"),
        ("/v1/completions", {"prompt": "ok", "stop": ["a", HALF]}, "stop.1"),
        ("/v1/completions", {"prompt": "ok", "user": HALF}, "user"),
        (CHAT, {"messages": [{"role": "user", "content": HALF}]}, "messages.0.content"),
        (CHAT, {"messages": [{"role": "user", "content": "a", "name": HALF}]}, "messages.0.name"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": HALF}]}]},
            "messages.0.content.0.text",
        ),
    ],
)
def test_unpaired_surrogates_are_a_bad_request_naming_the_field(server, path, fields, param):
    response = post_raw(server[0], path, {"model": MODEL, **fields})
    assert "surrogate" in assert_openai_error(response, 400, param)["message"]


def test_an_unknown_field_with_a_surrogate_name_is_refused_in_valid_utf8(server):
    response = post_raw(server[0], "/v1/completions", {"model": MODEL, "prompt": "a", "\ud800x": 1})
    assert "\\ud800x" in assert_openai_error(response, 400)["message"]


@pytest.mark.parametrize(
    "prompt, param, says",
    [
        ([], "prompt", "must be a string, a list of strings, a list of token ids or a list of lists of token ids"),
        ([-1], "prompt.0", "token ids must be >= 0"),
        ([[]], "prompt.0", "at least 1 item"),
        ([1, "a"], "prompt", "must be a string, a list of strings, a list of token ids"),
        ([[3], [4, -2]], "prompt.1.1", "token ids must be >= 0"),
    ],
)
def test_a_bad_prompt_gets_a_message_that_says_what_is_wrong(server, prompt, param, says):
    response = httpx.post(server[0] + "/v1/completions", json={"model": MODEL, "prompt": prompt}, timeout=30)
    assert says in assert_openai_error(response, 422, param)["message"]


def test_many_stop_strings_are_accepted_up_to_a_generous_limit(server):
    ask = lambda stop: httpx.post(
        server[0] + "/v1/completions",
        json={"model": MODEL, "prompt": "Hola", "max_tokens": 2, "stop": stop},
        timeout=60,  # The first request compiles the model's steps.
    )
    assert ask([f"\n{i}" for i in range(6)]).status_code == 200  # lm-eval's tasks: 5 stop strings and EOS.
    error = assert_openai_error(ask([f"s{i}" for i in range(70)]), 422, "stop")
    assert "at most 64 stop strings" in error["message"]
    assert "a string or a list of strings" in assert_openai_error(ask(5), 422, "stop")["message"]


def test_an_internal_error_is_one_log_line_a_500_with_the_request_id_and_keeps_the_connection(
    server, monkeypatch, caplog
):
    def broken_planner(*args):
        raise RuntimeError("planner exploded")

    monkeypatch.setattr(completions, "plan_completion", broken_planner)
    traceback_log = logging.getLogger("uvicorn.error")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    traceback_log.addHandler(handler)
    try:
        with httpx.Client(base_url=server[0], timeout=30) as client, caplog.at_level(logging.INFO):
            failed = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hola", "max_tokens": 1})
            request_id = failed.headers["x-request-id"]
            assert request_id in assert_openai_error(failed, 500)["message"] and failed.json()["error"]["type"]
            assert failed.headers.get("connection") != "close"
            monkeypatch.undo()
            again = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hola", "max_tokens": 1})
            assert again.status_code == 200 and again.headers["x-request-id"] != request_id
            # Both went over one connection: the same local port.
            port = lambda r: r.extensions["network_stream"].get_extra_info("client_addr")[1]
            assert port(failed) == port(again)
    finally:
        traceback_log.removeHandler(handler)
    errors_logged = [r for r in caplog.records + seen if r.levelno >= logging.ERROR]
    assert len(errors_logged) == 1, [r.getMessage() for r in errors_logged]
    assert request_id in errors_logged[0].getMessage() and "planner exploded" in errors_logged[0].getMessage()
    assert errors_logged[0].exc_info is None
    # A client's own tame request id is kept.
    assert httpx.get(server[0] + "/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"


def test_the_developer_role_is_the_system_role(client):
    ask = lambda role: client.chat.completions.create(
        model=MODEL,
        messages=[{"role": role, "content": "Eres un asistente."}, {"role": "user", "content": "Hola"}],
        max_tokens=6,
        temperature=0,
    )
    developer, system = ask("developer"), ask("system")
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens


def test_bad_chat_requests_get_openai_errors(server):
    post = lambda body: httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30)
    wrong_role = post({"model": MODEL, "messages": [{"role": "robot", "content": "hola"}]})
    assert wrong_role.status_code == 422 and wrong_role.json()["error"]["param"] == "messages.0.role"
    late_system = post(
        {"model": MODEL, "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}
    )
    assert late_system.status_code == 400 and "system" in late_system.json()["error"]["message"]
    assert httpx.get(server[0] + "/v1/nothing").json()["error"]["message"]


def test_models_health_and_unknown_routes(server):
    url, app = server
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [MODEL]
    card = httpx.get(url + f"/v1/models/{MODEL}").json()
    assert card["id"] == MODEL and card["max_model_len"] == app.state.engine.max_cache_len
    missing = httpx.get(url + "/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    wrong_method = httpx.get(url + "/v1/completions")
    assert wrong_method.status_code == 405 and set(wrong_method.json()["error"]) == {"message", "type", "param", "code"}
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["in_flight_requests"] == 0


def test_a_request_slot_is_released_once():
    in_flight = admission.InFlight(limit=1)
    slot = in_flight.enter()
    with pytest.raises(errors.APIError) as busy:
        in_flight.enter()
    assert busy.value.status == 429 and busy.value.code == "server_busy"
    slot.release()
    slot.release()  # The stream's cleanup and the error path may both release it.
    assert in_flight.count == 0
    in_flight.enter()
    assert in_flight.count == 1


def test_api_keys_and_rate_limit(run):
    with serving(run, api_keys=frozenset({"clave-1", "clave-2"}), rate_limit_per_minute=60, rate_limit_burst=2) as (
        url,
        _,
    ):
        body = {"model": MODEL, "prompt": "Hola", "max_tokens": 1}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        wrong = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer otra"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        key = openai.OpenAI(base_url=url + "/v1", api_key="clave-1", max_retries=0)
        assert [m.id for m in key.models.list()] == [MODEL]
        key.completions.create(model=MODEL, prompt="Hola", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as limited:
            key.completions.create(model=MODEL, prompt="Hola", max_tokens=1)
        assert int(limited.value.response.headers["retry-after"]) >= 1
        # The limit is per key: another key still gets through.
        other = openai.OpenAI(base_url=url + "/v1", api_key="clave-2", max_retries=0)
        assert other.completions.create(model=MODEL, prompt="Hola", max_tokens=1).choices
        # The scheme is case-insensitive (RFC 7235); /metrics needs a key too, but is not rate limited.
        assert httpx.get(url + "/v1/models", headers={"Authorization": "bearer clave-2"}).status_code == 200
        assert httpx.get(url + "/metrics").status_code == 401
        for _ in range(3):
            assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer clave-1"}).status_code == 200
    with serving(run, api_keys=frozenset({"clave-1"}), metrics_public=True) as (url, _):
        assert httpx.get(url + "/metrics").status_code == 200


def test_busy_server_and_timeouts_answer_with_errors_and_free_the_slots(run, monkeypatch):
    body = {"model": MODEL, "prompt": "La ciudad", "max_tokens": 8}
    with serving(run, max_concurrent_requests=1) as (url, app):
        # The first request holds the only request slot, generating, until the second has been refused.
        go_on = threading.Event()
        hold_decoding(app.state.engine, monkeypatch, lambda: go_on.wait(30))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=30)
            wait_until(lambda: app.state.engine.num_active == 1)
            busy = httpx.post(url + "/v1/completions", json=body, timeout=30)
            go_on.set()
            assert first.result().status_code == 200
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
        assert busy.headers["retry-after"] == "1"
    with serving(run, request_timeout_s=0.001) as (url, app):
        late = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 64, "ignore_eos": True}, timeout=30)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        deadline = time.monotonic() + 10
        while (app.state.engine.num_active or app.state.engine.num_waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.engine.num_active == app.state.engine.num_waiting == 0


def test_metrics_count_what_was_served(run):
    with serving(run) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            client.completions.create(
                model=MODEL, prompt="La niña", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
            )
        httpx.post(url + "/v1/completions", content=b"{")
        text = httpx.get(url + "/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['llm_requests_total{endpoint="/v1/completions",status="200"}'] == 3
    assert samples['llm_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    assert samples["llm_completion_tokens_total"] == 15
    assert samples["llm_time_to_first_token_seconds_count"] == 3
    assert samples['llm_request_latency_seconds_count{endpoint="/v1/completions"}'] == 4
    assert samples["llm_queue_depth"] == 0


def test_chat_page_is_served(server):
    page = httpx.get(server[0] + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'lang="es"' in page.text and "/v1/chat/completions" in page.text and "Enviar" in page.text


def test_benchmark_reports_throughput_and_latency_percentiles(server):
    result = bench.run(url=server[0], num_requests=6, concurrency=3, max_tokens=4)
    assert result["errors"] == 0 and result["num_requests"] == 6
    assert result["requests_per_s"] > 0 and result["output_tokens_per_s"] == pytest.approx(6 * 4 / result["wall_s"])
    assert result["latency_p50_s"] <= result["latency_p90_s"] <= result["latency_p99_s"]
    assert 0 < result["ttft_p50_s"] <= result["latency_p99_s"]
