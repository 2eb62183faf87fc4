"""POST /v1/embeddings end to end: the `openai` client against a real uvicorn serving the trained test run, whose
embeddings must be `Embedder.embed`'s."""

import base64
import concurrent.futures
import json
import threading

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from llm.rag.embeddings import Embedder
from llm.serve import api, bench, embeddings_api, schemas
from tests.test_serve import MODEL, hold_decoding, wait_until

TEXTS = [
    "El niño come pan.",
    "¿Dónde está la biblioteca de la ciudad?",
    "La abuela canta una canción en la plaza mientras el pingüino escucha.",
    "Hola",
]
# The served embedder is not the default one (mean pooling, no prefixes, passages), so that the test sees the
# server's options reach the embedding; the default is checked without a server.
OPTIONS = dict(pooling="last", query_prefix="consulta: ", passage_prefix="pasaje: ", batch_size=2)


@pytest.fixture(scope="module")
def reference(run):
    return Embedder(run.model, run.tokenizer, **OPTIONS)


@pytest.fixture(scope="module")
def server(run):
    embeddings = embeddings_api.EmbeddingModel(Embedder(run.model, run.tokenizer, **OPTIONS), kind="query")
    app = api.create_app(run.model, run.tokenizer, api.ServeSettings(MODEL, max_batch_size=4), embeddings)
    with bench.background_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def vectors(response) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.array([item.embedding for item in response.data], np.float32)


def test_openai_client_embeddings_are_the_embedders(client, reference):
    want = reference.embed(TEXTS, "query")
    # The client asks for base64 unless told otherwise, and decodes it itself.
    by_default = client.embeddings.create(model=MODEL, input=TEXTS)
    np.testing.assert_allclose(vectors(by_default), want, atol=1e-5)
    as_floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    np.testing.assert_allclose(vectors(as_floats), want, atol=1e-5)
    assert as_floats.model == MODEL and as_floats.object == "list"
    tokens = sum(len(reference.encode(text, "query")) for text in TEXTS)
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == tokens
    one = client.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float")
    np.testing.assert_allclose(vectors(one), want[2:3], atol=1e-5)
    assert one.usage.prompt_tokens == len(reference.encode(TEXTS[2], "query"))


def test_base64_is_little_endian_float32(client, reference):
    response = client.embeddings.create(model=MODEL, input=TEXTS[:2], encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(item.embedding), "<f4") for item in response.data]
    np.testing.assert_allclose(decoded, reference.embed(TEXTS[:2], "query"), atol=1e-5)


def test_dimensions_truncate_and_renormalise(client, reference):
    full = reference.embed(TEXTS, "query")
    for encoding_format in ("float", "base64"):
        response = client.embeddings.create(model=MODEL, input=TEXTS, dimensions=16, encoding_format=encoding_format)
        got = (
            vectors(response)
            if encoding_format == "float"
            else np.array([np.frombuffer(base64.b64decode(item.embedding), "<f4") for item in response.data])
        )
        assert got.shape == (len(TEXTS), 16)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, full[:, :16] / np.linalg.norm(full[:, :16], axis=-1, keepdims=True), atol=1e-5)
    whole = client.embeddings.create(model=MODEL, input=TEXTS[:1], dimensions=full.shape[1], encoding_format="float")
    np.testing.assert_allclose(vectors(whole), full[:1], atol=1e-5)


def test_token_ids_embed_like_their_text(client, run, reference):
    """Ids get BOS and the prefix (tokenized alone) in front, so a text whose ids follow the prefix's ids embeds
    the same either way."""
    prefix = run.tokenizer.encode(OPTIONS["query_prefix"])
    texts = [text for text in TEXTS if run.tokenizer.encode(OPTIONS["query_prefix"] + text)[: len(prefix)] == prefix]
    assert len(texts) >= 3, "the prefix's ids should start the prefixed texts' ids"
    ids = [run.tokenizer.encode(OPTIONS["query_prefix"] + text)[len(prefix) :] for text in texts]
    want = reference.embed(texts, "query")
    np.testing.assert_allclose(vectors(client.embeddings.create(model=MODEL, input=ids)), want, atol=1e-5)
    single = client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")
    np.testing.assert_allclose(vectors(single), want[:1], atol=1e-5)
    assert single.usage.prompt_tokens == 1 + len(prefix) + len(ids[0])


LONG = "palabra " * 200  # Far past the trained run's context of 128 tokens.


@pytest.mark.parametrize(
    "body, status, param, says",
    [
        ({"input": ""}, 400, "input", "empty"),
        ({"input": ["Hola", ""]}, 400, "input.1", "empty"),
        ({"input": ["Hola"] * (schemas.MAX_EMBEDDING_INPUTS + 1)}, 422, "input", "at most 2048"),
        ({"input": []}, 422, "input", "must be a string"),
        ({"input": [[]]}, 422, "input.0", "at least 1"),
        ({"input": "Hola", "dimensions": 0}, 422, "dimensions", "greater than or equal to 1"),
        ({"input": "Hola", "dimensions": 33}, 400, "dimensions", "at most 32"),
        ({"input": "Hola", "encoding_format": "int8"}, 422, "encoding_format", "'float' or 'base64'"),
        ({"input": [5, 320]}, 400, "input", "outside the vocabulary of 320"),
        ({"input": [[5], [6, 999]]}, 400, "input.1", "outside the vocabulary"),
        ({"input": [5, -1]}, 422, "input.1", ">= 0"),
        ({"input": LONG}, 400, "input", "at most 128"),
        ({"input": ["Hola", LONG]}, 400, "input.1", "at most 128"),
        ({"input": [[5] * 200]}, 400, "input.0", "at most 128"),
        ({"input": ["Hola", "mal \ud800 texto"]}, 400, "input.1", "surrogate"),
        ({"input": "Hola", "user": 5}, 422, "user", "string"),
        ({"input": "Hola", "extra": 1}, 422, "extra", "Unrecognized"),
        ({"input": "Hola", "model": None}, 422, "model", "string"),
        ({"input": "Hola", "model": "otro"}, 404, "model", "does not exist"),
    ],
)
def test_bad_embedding_requests_get_openai_errors(server, body, status, param, says):
    # Written with ASCII escapes: httpx's own JSON encoder cannot carry a lone surrogate.
    raw = json.dumps({"model": MODEL, **body})
    response = httpx.post(
        server[0] + "/v1/embeddings", content=raw, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_embeddings_go_on_while_generation_runs_and_both_succeed(server, client, reference, monkeypatch):
    url, app = server
    engine = app.state.engine
    go_on = threading.Event()
    hold_decoding(engine, monkeypatch, lambda: go_on.wait(30))
    chat = lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "¿Quién canta?"}], max_tokens=8, temperature=0
    )
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        held = pool.submit(chat)
        wait_until(lambda: engine.num_active == 1)  # Prefilled, and its decoding waits for `go_on`.
        # Neither the decode loop nor the event loop holds the embeddings up.
        got = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
        np.testing.assert_allclose(vectors(got), reference.embed(TEXTS, "query"), atol=1e-5)
        assert httpx.get(url + "/health", timeout=10).json()["active_slots"] == 1
        assert not held.done()
        go_on.set()
        # Now generation and embeddings at once, on the same devices, from their own threads.
        chats = [pool.submit(chat) for _ in range(3)]
        embedded = [
            pool.submit(client.embeddings.create, model=MODEL, input=TEXTS[i : i + 2], encoding_format="float")
            for i in range(3)
        ]
        answers = [future.result(timeout=60) for future in [held, *chats]]
        for i, future in enumerate(embedded):
            np.testing.assert_allclose(
                vectors(future.result(timeout=60)), reference.embed(TEXTS[i : i + 2], "query"), atol=1e-5
            )
    assert len({answer.choices[0].message.content for answer in answers}) == 1
    assert all(answer.usage.completion_tokens > 0 for answer in answers)


def test_the_event_loop_and_generation_go_on_while_an_embedding_runs(server, client, monkeypatch):
    url, app = server
    embedder, started, go_on = app.state.embeddings.embedder, threading.Event(), threading.Event()
    embed = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda *args: (started.set(), go_on.wait(30), embed(*args))[2])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(client.embeddings.create, model=MODEL, input=TEXTS[:1])
        assert started.wait(30)
        assert httpx.get(url + "/health", timeout=5).json()["in_flight_requests"] == 1
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hola"}], max_tokens=4, timeout=10
        )
        assert answer.usage.completion_tokens > 0 and not held.done()
        go_on.set()
        assert len(held.result(timeout=30).data) == 1


def test_health_metrics_and_request_id(server):
    url, _ = server
    health = httpx.get(url + "/health", timeout=10).json()["embeddings"]
    assert health == {
        "run": "served model",
        "pooling": "last",
        "input_kind": "query",
        "dimensions": 32,
        "max_input_tokens": 128,
    }
    response = httpx.post(
        url + "/v1/embeddings", json={"model": MODEL, "input": "Hola"}, headers={"X-Request-Id": "emb-1"}, timeout=60
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "emb-1"
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'llm_requests_total{endpoint="/v1/embeddings",status="200"}' in metrics


def test_the_default_embedder_is_the_served_model_with_mean_pooling_and_keys_apply(run):
    """No server: the route needs no running engine, so Starlette's test client (without the lifespan) will do."""
    settings = api.ServeSettings(MODEL, max_batch_size=1, api_keys=frozenset({"secreto"}))
    app = api.create_app(run.model, run.tokenizer, settings)
    embeddings = app.state.embeddings
    assert (embeddings.kind, embeddings.run, embeddings.embedder.pooling) == ("passage", None, "mean")
    assert embeddings.embedder.prefixes == {"query": "", "passage": ""}
    http = TestClient(app)
    body = {"model": MODEL, "input": TEXTS[:2]}
    assert http.post("/v1/embeddings", json=body).status_code == 401
    response = http.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer secreto"})
    want = Embedder(run.model, run.tokenizer).embed(TEXTS[:2])
    np.testing.assert_allclose([item["embedding"] for item in response.json()["data"]], want, atol=1e-5)
    with pytest.raises(ValueError, match="input kind must be one of"):
        embeddings_api.EmbeddingModel(embeddings.embedder, kind="document")
