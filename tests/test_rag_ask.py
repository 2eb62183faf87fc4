"""Grounded answers: scripts/ask.py end to end, and the prompt llm/rag/answering.py builds for plain and chat runs."""

import json

import pytest
from conftest import run_script, spanish_documents

from llm import chat_template
from llm.rag import answering
from llm.rag.documents import SourceDocument
from llm.rag.embeddings import Embedder
from llm.rag.index import Hit, RetrievalIndex
from llm.rag.passages import split_document

# In the words of the tiny run's 320-piece vocabulary, so that the planted passage fits its 128-token context.
PLANTED = "El pingüino canta junto al faro desde 1852."
QUESTION = "¿Desde cuándo canta el pingüino junto al faro?"


@pytest.fixture(scope="module")
def documents():
    texts = [*spanish_documents(12), PLANTED]
    return [SourceDocument(f"doc{i}", text, f"d{i}") for i, text in enumerate(texts)]


@pytest.fixture(scope="module")
def index_dir(documents, trained_run, tmp_path_factory):
    """An index of the documents (BM25 and flat vectors) embedded by the shared tiny run."""
    passages = [passage for document in documents for passage in split_document(document, budget=8, overlap=0)]
    path = str(tmp_path_factory.mktemp("ask") / "index")
    RetrievalIndex.build(passages, Embedder.from_run(trained_run)).save(path)
    return path


@pytest.fixture(scope="module")
def bm25_index_dir(documents, tmp_path_factory):
    passages = [passage for document in documents for passage in split_document(document, budget=8, overlap=0)]
    path = str(tmp_path_factory.mktemp("ask_bm25") / "index")
    RetrievalIndex.build(passages).save(path)
    return path


def test_ask_prints_the_answer_with_sources_that_point_into_the_documents(index_dir, trained_run, documents):
    result = run_script(
        "ask.py", f"--index={index_dir}", f"--workdir={trained_run}", "--k=3", "--max_new_tokens=4", "--json", QUESTION
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert isinstance(answer["answer"], str) and answer["sources"]
    first = answer["sources"][0]
    assert (first["number"], first["document_id"], first["text"]) == (1, f"doc{len(documents) - 1}", PLANTED)
    by_id = {document.id: document for document in documents}
    for number, source in enumerate(answer["sources"], start=1):
        assert source["number"] == number and source["cited"] == (f"[{number}]" in answer["answer"])
        assert by_id[source["document_id"]].text[source["start"] : source["end"]] == source["text"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--index=/nonexistent/index"], "is not a retrieval index"),
        (["--mode=dense"], "needs vectors"),
        (["--max_new_tokens=120"], "over the budget"),  # the run's context is 128 tokens
    ],
)
def test_ask_refuses_bad_input_with_a_clear_message(bm25_index_dir, trained_run, flags, message):
    result = run_script("ask.py", f"--index={bm25_index_dir}", f"--workdir={trained_run}", *flags, QUESTION)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def hits_of(documents):
    return [Hit(passage, 1.0, rank) for rank, passage in enumerate(_passages(documents)[::-1], start=1)]


def _passages(documents):
    return [passage for document in documents for passage in split_document(document, budget=8, overlap=0)]


def test_a_plain_run_gets_bos_and_text_and_the_passages_fill_the_budget_exactly(run, documents):
    tokenizer, hits = run.tokenizer, hits_of(documents)
    request = answering.grounded_request(tokenizer, False, QUESTION, hits, context_length=128, max_new_tokens=4)
    assert request.ids == tokenizer.encode(request.prompt.text, add_bos=True) and len(request.ids) <= 124
    used = len(request.prompt.passages)
    assert 0 < used < len(hits) and request.prompt.passages[0] == hits[0].passage
    # One token less of context and the last passage no longer fits whole.
    tighter = answering.grounded_request(
        tokenizer, False, QUESTION, hits, context_length=len(request.ids) + 3, max_new_tokens=4
    )
    assert tighter.prompt.passages != request.prompt.passages
    assert request.stop_strings == answering.PLAIN_STOP_STRINGS and request.stop_token_ids is None
    result = request.result(f"Desde 1852 [{used}].")
    assert [source["cited"] for source in result["sources"]] == [False] * (used - 1) + [True]
    assert result["sources"][0]["text"] == hits[0].passage.text


def test_a_chat_run_gets_the_grounded_prompt_as_its_last_user_turn(run, documents):
    tokenizer = run.tokenizer  # budgeting needs no model, so a context larger than the run's will do
    assert chat_template.has_chat_format(tokenizer)
    history = [{"role": "user", "content": "Hola."}, {"role": "assistant", "content": "Hola, ¿en qué te ayudo?"}]
    request = answering.grounded_request(tokenizer, True, QUESTION, hits_of(documents), 1024, 4, history)
    messages = [*history, {"role": "user", "content": request.prompt.text}]
    assert request.ids == chat_template.render(tokenizer, messages, add_generation_prompt=True)[0]
    assert (
        request.prompt.passages
        and len(request.ids) <= 1020
        and request.stop_token_ids == chat_template.stop_token_ids(tokenizer)
    )


def test_a_question_that_leaves_no_room_for_an_answer_is_refused(run, documents):
    with pytest.raises(ValueError, match="over the budget"):
        answering.grounded_request(run.tokenizer, False, QUESTION * 20, hits_of(documents), 128, 32)
    with pytest.raises(ValueError, match="needs a chat-tuned run"):
        answering.grounded_request(run.tokenizer, False, QUESTION, [], 128, 32, [{"role": "user", "content": "Hola"}])
