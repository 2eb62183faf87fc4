"""lm-evaluation-harness drives the trained test run, in-process (llm/eval/lm_eval_model.py) and through the server
(`local-completions` finding vLLM's tokenizer endpoints, `local-chat-completions`), on two little Spanish tasks
written here over local JSONL files: what each route gives must be what the project's own scorer and generator give.
"""

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval and datasets must not touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import lm_eval
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.utils import RemoteTokenizer

from llm import chat_template
from llm.eval import perplexity, scoring
from llm.eval.lm_eval_model import SpanishLLM
from llm.infer import generate
from llm.serve import api, bench

MODEL = "tiny-test"
# The test run is a 30-step model that mostly writes spaces (and "aaaa" after "músico"): some choices below are its
# greedy continuations, so that is_greedy is both True and False, and the stop strings cut its generations.
MC_ITEMS = [
    {"question": "La niña canta", "choices": [" una canción.", " en el jardín.", "  "], "label": 0},
    {"question": "Un músico", "choices": [" sueña.", "aaaa", " cocina en español."], "label": 0},
    {"question": "El pingüino camina", "choices": [" junto al río.", " una canción.", " "], "label": 0},
    {"question": "¿Quién lo sabe?", "choices": [" ¡Nadie, 3!", " ¡Todos!", " El señor García."], "label": 0},
    {"question": "La compañía trabaja", "choices": [" por la mañana.", " con alegría.", " en el jardín."], "label": 1},
]
GEN_ITEMS = [
    {"prompt": "Un músico", "answer": " sueña"},
    {"prompt": "La niña canta", "answer": " una canción"},
    {"prompt": "El señor García escribe", "answer": " en el jardín"},
    {"prompt": "músico", "answer": "s"},
    {"prompt": "Había una vez", "answer": " un pingüino"},
]
STOP_STRINGS = ["  ", "\n"]
MAX_GEN_TOKS = 12
MC_TASK, GEN_TASK = "es_tiny_mc", "es_tiny_gen"


def _task_yaml(name: str, data_file: str, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        f"test_split: test\n{body}"
    )


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """Only the two tasks of this file: a multiple choice one and a generate_until one."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, items in ((MC_TASK, MC_ITEMS), (GEN_TASK, GEN_ITEMS)):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    mc = "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
    mc += "target_delimiter: ''\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    gen = "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
    gen += f"generation_kwargs:\n  until: {json.dumps(STOP_STRINGS)}\n  max_gen_toks: {MAX_GEN_TOKS}\n"
    gen += "  do_sample: false\n  temperature: 0\nmetric_list:\n  - metric: exact_match\n"
    for name, body in ((MC_TASK, mc), (GEN_TASK, gen)):
        (root / f"{name}.yaml").write_text(_task_yaml(name, str(root / f"{name}.jsonl"), body), encoding="utf-8")
    return TaskManager(include_path=str(root), include_defaults=False)


@pytest.fixture(scope="module")
def server(run):
    app = api.create_app(run.model, run.tokenizer, api.ServeSettings(MODEL, max_batch_size=4, max_tokens=64))
    with bench.background_server(app) as url:
        yield url


def _evaluate(model, task_manager, tasks, **kwargs) -> dict[str, list[dict]]:
    """lm-eval's logged samples of each task, in document order."""
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=task_manager, log_samples=True, bootstrap_iters=0, **kwargs
    )
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in results["samples"].items()}


def _choice_scores(samples: list[dict]) -> tuple[np.ndarray, list[bool]]:
    """Every (item, choice) log-likelihood of a multiple-choice task, and whether each was the greedy choice."""
    responses = [response[0] for sample in samples for response in sample["resps"]]
    return np.array([float(score) for score, _ in responses]), [bool(greedy) for _, greedy in responses]


def _requests(samples: list[dict]) -> list[tuple[str, str]]:
    return [(context, continuation) for sample in samples for context, continuation in sample["arguments"]]


def _completions(samples: list[dict]) -> list[str]:
    return [sample["resps"][0][0] for sample in samples]


def test_multiple_choice_scores_agree_natively_through_the_server_and_with_our_scorer(run, server, task_manager):
    native = _evaluate(SpanishLLM(run=run, batch_size=4), task_manager, [MC_TASK])[MC_TASK]
    pairs = [scoring.encode_pair(run.tokenizer, *request) for request in _requests(native)]
    scorer = scoring.Scorer(run.model, run.tokenizer, batch_size=4)
    native_scores, native_greedy = _choice_scores(native)
    np.testing.assert_allclose(native_scores, scorer.loglikelihood(_requests(native)), atol=1e-4)
    assert native_greedy == [greedy for _, greedy in scorer.score_tokens_greedy(pairs)]
    assert True in native_greedy and False in native_greedy

    # Through the server with nothing but its address: lm-eval finds /tokenizer_info and /tokenize and scores the
    # token ids it gets there, which never start with a BOS; the native model with add_bos_token=False does so too.
    address = {"base_url": f"{server}/v1/completions", "model": MODEL}
    remote = _evaluate("local-completions", task_manager, [MC_TASK], model_args=address)[MC_TASK]
    no_bos = _evaluate(SpanishLLM(run=run, batch_size=4, add_bos_token=False), task_manager, [MC_TASK])[MC_TASK]
    remote_scores, remote_greedy = _choice_scores(remote)
    no_bos_scores, no_bos_greedy = _choice_scores(no_bos)
    np.testing.assert_allclose(remote_scores, no_bos_scores, atol=1e-4)
    np.testing.assert_allclose(remote_scores, scorer.score_tokens([(c[1:], x) for c, x in pairs]), atol=1e-4)
    assert remote_greedy == no_bos_greedy
    assert not np.allclose(native_scores, no_bos_scores, atol=1e-3)  # The BOS matters: the comparisons can fail.

    # Sent as text (tokenized_requests=False), the server encodes each request with its BOS: the native scores.
    as_text = _evaluate(
        "local-completions", task_manager, [MC_TASK], model_args=address | {"tokenized_requests": False}
    )
    np.testing.assert_allclose(_choice_scores(as_text[MC_TASK])[0], native_scores, atol=1e-4)


def test_generations_agree_natively_through_the_server_and_with_generate_text(run, server, task_manager):
    prompts = [item["prompt"] for item in GEN_ITEMS]
    expected = generate.generate_text(run, prompts, MAX_GEN_TOKS, stop_strings=STOP_STRINGS)
    uncut = generate.generate_text(run, prompts, MAX_GEN_TOKS)
    assert expected != uncut  # The stop strings cut some completions: dropping them would show.
    native = _evaluate(SpanishLLM(run=run, batch_size=4), task_manager, [GEN_TASK])[GEN_TASK]
    assert _completions(native) == expected
    # Text prompts (tokenized_requests=False): the server encodes them with their BOS, as generate_text does.
    args = {"base_url": f"{server}/v1/completions", "model": MODEL, "tokenized_requests": False}
    remote = _evaluate("local-completions", task_manager, [GEN_TASK], model_args=args)[GEN_TASK]
    assert _completions(remote) == expected


def test_chat_generations_agree_natively_and_through_the_chat_server(run, server, task_manager):
    ids = [
        chat_template.render(run.tokenizer, [{"role": "user", "content": item["prompt"]}], True)[0]
        for item in GEN_ITEMS
    ]
    expected = generate.generate_text(
        run, ids, MAX_GEN_TOKS, stop_strings=STOP_STRINGS, stop_token_ids=chat_template.stop_token_ids(run.tokenizer)
    )
    native = _evaluate(SpanishLLM(run=run, batch_size=4), task_manager, [GEN_TASK], apply_chat_template=True)[GEN_TASK]
    assert _completions(native) == expected
    args = {"base_url": f"{server}/v1/chat/completions", "model": MODEL}
    remote = _evaluate("local-chat-completions", task_manager, [GEN_TASK], model_args=args, apply_chat_template=True)[
        GEN_TASK
    ]
    assert _completions(remote) == expected


def _post(url: str, body: object) -> httpx.Response:
    return httpx.post(url, content=body if isinstance(body, str) else json.dumps(body), timeout=60)


def test_tokenizer_endpoints_answer_as_vllm_and_read_spelled_special_tokens(run, server):
    tokenizer = run.tokenizer
    remote = RemoteTokenizer(f"{server}/v1/completions")  # lm-eval's own client of these endpoints
    # lm-eval learns the special ids by tokenizing their text: '</s>' must be the eos id, not its characters.
    assert (remote.eos_token_id, remote.bos_token_id) == (tokenizer.eos_id, tokenizer.bos_id)
    text = "¿Quién canta? La niña, en el jardín con alegría."
    assert remote.encode(text) == tokenizer.encode(text)
    assert remote.decode(tokenizer.encode(text)) == text
    assert remote.encode("La niña</s>") == tokenizer.encode("La niña") + [tokenizer.eos_id]

    info = httpx.get(f"{server}/tokenizer_info").json()
    assert {key: info[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")} == dict(
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    assert info["chat_template"] == chat_template.JINJA_TEMPLATE and info["model_max_length"] == 128
    assert info["tokenizer_class"] == "llm.tokenizer.Tokenizer"

    answer = _post(f"{server}/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    ids = tokenizer.encode(text, add_bos=True)  # add_special_tokens defaults to true, as in vLLM
    pieces = [tokenizer.piece(token) for token in ids]
    assert answer == {"count": len(ids), "max_model_len": 128, "tokens": ids, "token_strs": pieces}
    messages = [{"role": "user", "content": "¿Qué hora es?"}, {"role": "assistant", "content": "Son las tres."}]
    rendered, _ = chat_template.render(tokenizer, messages)
    assert (
        _post(f"{server}/tokenize", {"messages": messages[:1]}).json()["tokens"]
        == chat_template.render(tokenizer, messages[:1], add_generation_prompt=True)[0]
    )
    continued = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    assert _post(f"{server}/tokenize", continued).json()["tokens"] == rendered[:-1]  # no <|end|>: it goes on


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"prompt": 3}, 422, "prompt"),
        ("/tokenize", {"prompt": "hola", "truncate": True}, 422, "truncate"),
        ("/tokenize", {"prompt": "hola", "model": "otro"}, 404, "model"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "hola"}]}, 422, "messages.0.role"),
        ("/tokenize", {"messages": [{"role": "user", "content": "hola"}], "continue_final_message": True}, 400, None),
        ("/tokenize", "{not json", 400, None),
        ("/detokenize", {"tokens": [5, 100000]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "5"}, 422, "tokens"),
        ("/detokenize", {}, 422, "tokens"),
    ],
)
def test_tokenizer_endpoints_answer_bad_input_with_openai_errors(server, path, body, status, param):
    response = _post(server + path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (param is None or error["param"] == param)


def test_rolling_loglikelihood_scores_whole_texts_from_the_bos(run):
    documents = ["La niña canta una canción junto al río.", "¿Quién lo sabe? ¡Nadie!", "Un músico"]
    model = SpanishLLM(run=run, batch_size=4)
    scores = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), 0) for d in documents])
    for document, score in zip(documents, scores):
        expected = perplexity.score_text(model.scorer.score_tokens, run.tokenizer, [document], model.max_length)
        assert score == pytest.approx(-expected.nll_nats, abs=1e-4)


def test_chat_renderings_read_back_as_the_templates_ids(run):
    model = SpanishLLM(run=run, batch_size=4)
    conversation = [
        {"role": "system", "content": "Eres un asistente."},
        {"role": "user", "content": "¿Quién canta?"},
        {"role": "assistant", "content": "La niña"},
    ]
    prompt = model.apply_chat_template(conversation[:2])
    assert prompt.startswith("<s>") and model.chat_template(True) == chat_template.JINJA_TEMPLATE
    assert model.tok_encode(prompt) == chat_template.render(run.tokenizer, conversation[:2], True)[0]
    # Without a generation prompt the answer is continued: the ids stop before its <|end|>.
    continued = model.apply_chat_template(conversation, add_generation_prompt=False)
    assert model.tok_encode(continued) == chat_template.render(run.tokenizer, conversation)[0][:-1]
