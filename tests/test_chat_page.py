"""The chat page (GET /, /static/chat.js, /favicon.ico) and the mixed load of `bench.run(mix=...)`.

The page's logic runs under Node (tests/js/): its unit tests, and a conversation with the real server.
"""

import json
import os
import shutil
import subprocess

import httpx
import pytest
from flax import nnx

from llm.model.transformer import create_model
from llm.serve import api, bench, load_mix
from tests.conftest import REPO

MODEL, KEY = "tiny-chat", "clave-de-prueba"
CONTEXT = 256  # The context of the user's report: 128 answer tokens leave 128 for the conversation.
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="the chat page's logic is tested with Node (node not on PATH)")


@pytest.fixture(scope="module")
def server(run):
    """The trained test run (context 128) with a 256-token context, served with an API key; yields its URL."""
    config = run.config.copy_and_resolve_references()
    config.model.max_seq_len = CONTEXT  # RoPE: the same weights serve a longer context.
    model = create_model(config)
    nnx.update(model, nnx.state(run.model))
    settings = api.ServeSettings(MODEL, max_batch_size=4, api_keys=frozenset({KEY}))
    with bench.background_server(api.create_app(model, run.tokenizer, settings)) as url:
        yield url


def _node(*args: str, **env: str) -> subprocess.CompletedProcess:
    process = subprocess.run(
        [NODE, *args], capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **env}
    )
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]
    return process


@needs_node
def test_page_logic_under_node():
    """Trimming, failed turns, settings and the Spanish errors (tests/js/chat_page.test.js); the sources of grounded
    answers and the index note (tests/js/chat_sources.test.js)."""
    _node("--test", "tests/js/chat_page.test.js", "tests/js/chat_sources.test.js")


@needs_node
def test_four_turns_in_a_256_token_context_all_get_answers(server, run):
    """The reported bug: 128 answer tokens in a 256-token context made turns 2-4 fail with HTTP 400."""
    sentence = "La niña lee un libro en la biblioteca de la ciudad. "
    message = sentence * 2
    while len(run.tokenizer.encode(message)) < 45:  # Two such messages and the system one exceed 128 tokens.
        message += sentence
    texts = [f"{i}. {message}" for i in range(4)]
    output = _node("tests/js/chat_turns.js", server, "128", *texts, API_KEY=KEY).stdout
    turns = [json.loads(line) for line in output.splitlines()]
    assert len(turns) == 4
    for number, turn in enumerate(turns):
        assert turn["error"] is None and turn["statuses"][-1] == 200, (number, turn)
        assert turn["messages"][0] == {"role": "system", "content": "Eres un asistente."}
        assert turn["messages"][-1] == {"role": "user", "content": texts[number]}
    assert turns[0]["statuses"] == [200]
    assert all(turn["statuses"][0] == 400 and turn["kept"] < number for number, turn in enumerate(turns[1:], 1))


def test_page_script_and_favicon_are_served_without_a_key(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/chat.js">' in page.text and '<link rel="icon" href="/favicon.ico"' in page.text
    # The header's index note reads GET /health without a key; without an index it says nothing.
    assert '<small id="index">' in page.text and httpx.get(server + "/health").json()["index"] is None
    script = httpx.get(server + "/static/chat.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    with open(os.path.join(REPO, "llm", "serve", "static", "chat.js"), encoding="utf-8") as f:
        assert script.text == f.read()
    icon = httpx.get(server + "/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.text.startswith("<svg")
    missing = httpx.get(server + "/static/nada.js")
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(server + "/v1/models").status_code == 401  # The API itself still needs the key.


def test_parse_mix_and_schedule():
    assert load_mix.parse_mix("good:8,malformed:1,abandoned:1") == {"good": 0.8, "malformed": 0.1, "abandoned": 0.1}
    for bad in ("good:x", "buenos:1", "good:-1", "good:0"):
        with pytest.raises(ValueError, match="ix"):
            load_mix.parse_mix(bad)
    plan = load_mix.schedule(10, {"good": 0.55, "malformed": 0.25, "abandoned": 0.2})
    kinds = [kind for kind, _ in plan]
    assert (kinds.count("good"), kinds.count("malformed"), kinds.count("abandoned")) == (6, 2, 2)
    assert sorted(variant for kind, variant in plan if kind == "abandoned") == ["mid_non_stream", "mid_stream"]


def test_mixed_load_counts_every_status_and_leaves_the_server_idle(server):
    mix = {"good": 0.5, "malformed": 0.3, "abandoned": 0.2}
    result = bench.run(url=server, num_requests=20, concurrency=4, max_tokens=8, api_key=KEY, mix=mix, seed=1)
    statuses = result["statuses"]
    assert sum(sum(counts.values()) for counts in statuses.values()) == 20
    assert statuses["good"] == {"200": 10}
    assert result["output_tokens_per_s"] == pytest.approx(10 * 8 / result["wall_s"])
    assert 0 < result["ttft_p50_s"] <= result["ttft_p99_s"]
    assert sum(statuses["malformed"].values()) == 6 and "200" not in statuses["malformed"]
    assert {"bad_json", "deep_nesting", "wrong_types", "unknown_model", "too_long", "lone_surrogate"} <= set(
        result["malformed_statuses"]
    )
    assert result["malformed_statuses"]["bad_json"] == {"400": 1}
    assert result["malformed_statuses"]["unknown_model"] == {"404": 1}
    assert result["malformed_statuses"]["wrong_types"] == {"422": 1}
    assert result["malformed_statuses"]["too_long"] == {"400": 1}
    assert set(statuses["abandoned"]) <= {"abandoned", "200"} and sum(statuses["abandoned"].values()) == 4
    assert result["after"] == {"health_status": 200, "in_flight_requests": 0, "active_slots": 0, "queue_depth": 0}
