"""Chat completions grounded in a retrieval index (scripts/serve.py --index): the `openai` client against a real
uvicorn serving the trained test run, with an index of the test documents and a planted passage."""

import dataclasses

import httpx
import openai
import pytest
from conftest import run_script, spanish_documents
from flax import nnx

from llm import chat_template
from llm.infer import generate
from llm.model.transformer import create_model
from llm.rag import answering
from llm.rag.documents import SourceDocument
from llm.rag.embeddings import Embedder
from llm.rag.index import RetrievalIndex
from llm.rag.passages import split_document
from llm.serve import api, bench, completions, rag_chat, schemas
from tests.test_serve import MODEL, assert_openai_error, serving

PLANTED = "La catedral de Burgos guarda el sepulcro del Cid."
QUESTION = "¿Qué guarda la catedral de Burgos?"
MAX_TOKENS = 1024  # The server's --max_tokens (its default), more than the context holds.
# The instruction prompt alone is ~170 tokens of the test tokenizer: the trained run (context 128) is served with a
# longer context, which RoPE allows with the same weights.
CACHE_LEN = 384


def passages():
    texts = spanish_documents(30) + [PLANTED]
    documents = [SourceDocument(f"doc{i}", text, f"corpus.jsonl:{i + 1}") for i, text in enumerate(texts)]
    return [passage for document in documents for passage in split_document(document, budget=16, overlap=0)]


@pytest.fixture(scope="module")
def wide(run):
    """The trained run with a CACHE_LEN context."""
    config = run.config.copy_and_resolve_references()
    config.model.max_seq_len = CACHE_LEN
    model = create_model(config)
    nnx.update(model, nnx.state(run.model))
    return dataclasses.replace(run, model=model, config=config)


@pytest.fixture(scope="module")
def index_dir(trained_run, tmp_path_factory):
    """An index of the test documents and PLANTED, embedded by the trained run itself, saved to disk."""
    directory = str(tmp_path_factory.mktemp("serve_index") / "index")
    RetrievalIndex.build(passages(), Embedder.from_run(trained_run)).save(directory)
    return directory


@pytest.fixture(scope="module")
def retrieval(index_dir):
    return rag_chat.Retrieval(RetrievalIndex.open(index_dir), k=3, directory=index_dir)


@pytest.fixture(scope="module")
def server(wide, retrieval):
    settings = api.ServeSettings(MODEL, max_batch_size=4, max_tokens=MAX_TOKENS)
    app = api.create_app(wide.model, wide.tokenizer, settings, retrieval=retrieval)
    with bench.background_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(run, retrieval, messages, max_tokens):
    """The grounded request the server should build for `messages`, and the answer generate() gives for it."""
    *history, last = messages
    hits = retrieval.search(last["content"])
    request = answering.grounded_request(run.tokenizer, True, last["content"], hits, CACHE_LEN, max_tokens, history)
    ids = generate.run_generator(run).generate([request.ids], max_tokens, stop_token_ids=request.stop_token_ids)[0]
    return request, run.tokenizer.decode(ids)


def test_openai_client_gets_the_planted_passage_as_first_source(client, wide, retrieval):
    messages = [{"role": "system", "content": "Eres un asistente."}, {"role": "user", "content": QUESTION}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    request, answer = expected(wide, retrieval, messages, 8)
    # The engine saw the grounded prompt (with its history): same token count, same greedy answer.
    assert response.usage.prompt_tokens == len(request.ids)
    assert response.choices[0].message.content == answer
    sources = response.model_extra["sources"]
    planted = next(passage for passage in retrieval.index.passages if passage.text == PLANTED)
    assert sources[0]["number"] == 1 and sources[0]["passage_id"] == planted.id
    assert sources[0]["text"] == PLANTED and sources[0]["document_id"] == planted.document_id
    assert sources == request.result(answer)["sources"] and len(sources) >= 1
    assert PLANTED in wide.tokenizer.decode(request.ids)
    # Without max_tokens the default budget still leaves room for the best passage.
    default = client.chat.completions.create(model=MODEL, messages=messages[1:], temperature=0)
    assert default.model_extra["sources"][0]["text"] == PLANTED


def test_streaming_sends_the_sources_first_and_cited_at_the_end(client):
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    first, last = chunks[0].model_extra["sources"], chunks[-1].model_extra["sources"]
    assert [source["passage_id"] for source in first] == [
        source["passage_id"] for source in whole.model_extra["sources"]
    ]
    assert all(source["cited"] is None for source in first) and first[0]["text"] == PLANTED
    assert last == whole.model_extra["sources"] and chunks[-1].choices[0].finish_reason is not None
    assert all("sources" not in chunk.model_extra for chunk in chunks[1:-1])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content


def test_retrieval_false_is_a_plain_chat_completion(client, run):
    messages = [{"role": "user", "content": QUESTION}]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, extra_body={"retrieval": False}
    )
    assert "sources" not in response.model_extra
    ids, _ = chat_template.render(run.tokenizer, messages, add_generation_prompt=True)
    assert response.usage.prompt_tokens == len(ids)


def test_a_question_longer_than_the_context_is_a_400_naming_the_message(server):
    messages = [{"role": "system", "content": "Eres un asistente."}, {"role": "user", "content": "palabra " * 500}]
    response = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": messages})
    error = assert_openai_error(response, 400, "messages.1")
    assert error["code"] == "context_length_exceeded" and "messages.1" in error["message"]
    last = httpx.post(
        server + "/v1/chat/completions",
        json={"model": MODEL, "messages": [*messages[:1], {"role": "assistant", "content": "Hola"}]},
    )
    assert "must be the user's" in assert_openai_error(last, 400, "messages.1")["message"]


def test_health_reports_the_index(server, retrieval):
    index = httpx.get(server + "/health").json()["index"]
    assert index["passages"] == len(retrieval.index.passages) == len(passages())
    assert index["modes"] == ["hybrid", "bm25", "dense"] and index["mode"] == "hybrid"
    assert index["vector_kind"] == "flat" and index["k"] == 3


def test_the_server_without_an_index_is_unchanged(run):
    with serving(run, max_tokens=MAX_TOKENS) as (url, app):
        body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)  # The first request compiles.
        assert response.status_code == 200 and "sources" not in response.json()
        assert httpx.get(url + "/health").json()["index"] is None
        refused = httpx.post(url + "/v1/chat/completions", json={**body, "retrieval": True})
        assert "--index" in assert_openai_error(refused, 400, "retrieval")["message"]


def test_a_run_without_chat_format_grounds_one_question_as_plain_text(run, retrieval, monkeypatch):
    monkeypatch.setattr(chat_template, "has_chat_format", lambda tokenizer: False)
    limits = completions.Limits(CACHE_LEN, CACHE_LEN, MAX_TOKENS, 8)
    question = [{"role": "user", "content": QUESTION}]
    body = lambda messages: schemas.ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": messages, "max_tokens": 8}
    )
    hits = retrieval.search(QUESTION)
    plan = rag_chat.plan_grounded(body(question), run.tokenizer, limits, hits)
    want = answering.grounded_request(run.tokenizer, False, QUESTION, hits, CACHE_LEN, 8)
    assert plan.requests[0].prompt == want.ids and plan.requests[0].stop == answering.PLAIN_STOP_STRINGS
    assert plan.requests[0].stop_token_ids == (run.tokenizer.eos_id,) and plan.grounding.prompt.passages
    with pytest.raises(completions.RequestError, match="no chat format") as error:
        rag_chat.plan_grounded(
            body([{"role": "system", "content": "Eres un asistente."}, *question]), run.tokenizer, limits, hits
        )
    assert error.value.param == "messages"


def test_serve_script_refuses_a_missing_index_and_dense_search_of_a_bm25_index(trained_run, tmp_path):
    missing = run_script("serve.py", f"--workdir={trained_run}", f"--index={tmp_path / 'none'}")
    assert missing.returncode != 0 and "is not a retrieval index" in missing.stderr
    bm25_only = str(tmp_path / "bm25")
    RetrievalIndex.build(passages()).save(bm25_only)
    dense = run_script("serve.py", f"--workdir={trained_run}", f"--index={bm25_only}", "--index_mode=dense")
    assert dense.returncode != 0 and "BM25 only" in dense.stderr and "Traceback" not in dense.stderr
