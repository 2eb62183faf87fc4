"""A model's own Jinja chat template (llm/chat_template.py, llm/jinja_chat.py) against transformers'
apply_chat_template, on tokenizers built here with real templates (Qwen2.5's ChatML, Llama 3's, Mistral's
[INST]); and an imported tiny model chatting, served and fine-tuned through its template."""

import json
import os
import re
import types

import jinja2
import numpy as np
import openai
import pytest
import torch
import transformers
from conftest import run_script
from test_hf_import import hf_model
from test_hf_tokenizer import BUILDERS
from test_serve import MODEL, serving

from llm import chat_template, jinja_chat
from llm.data import records
from llm.finetune_data import preference, sft
from llm.hf import importer
from llm.hf_tokenizer import HFTokenizer
from llm.infer import generate
from llm.runs import directory, loading

# The templates as their models' tokenizer_config.json hold them (Qwen2.5-Instruct, Meta-Llama-3-Instruct,
# Mistral-7B-Instruct-v0.1): test data. Qwen's, with its tool calls, is a file of its own.
QWEN25 = open(os.path.join(os.path.dirname(__file__), "chat_templates", "qwen2.5.jinja"), encoding="utf-8").read()
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# ChatML with {% generation %} blocks (as in transformers' tests of return_assistant_tokens_mask).
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Zephyr's (HuggingFaceH4/zephyr-7b-beta): a template over several lines, whose block tags' newlines go.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# Made up for the test: indented block tags (lstrip_blocks), and a generation block around the answer alone.
ANSWERS_ONLY = """{% for message in messages %}
    {% if message['role'] == 'assistant' %}
{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>\n' }}
    {% else %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}"""
CHATML = re.sub(r"\{% (end)?generation %\}", "", CHATML_GENERATION)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# kind -> (template, tokenizer builder, added special tokens, tokenizer_config entries, end of an answer)
KINDS = {
    "qwen": (QWEN25, "byte_level", CHATML_TOKENS, {}, "<|im_end|>"),
    "llama3": (
        LLAMA3,
        "byte_level",
        LLAMA3_TOKENS,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        "<|eot_id|>",
    ),
    "mistral": (MISTRAL, "metaspace_template", [], {}, "</s>"),
    "zephyr": (ZEPHYR, "byte_level", [], {}, "<|endoftext|>"),
    "chatml": (CHATML, "byte_level", CHATML_TOKENS, {}, "<|im_end|>"),
    "chatml_generation": (CHATML_GENERATION, "byte_level", CHATML_TOKENS, {}, "<|im_end|>"),
    "answers_only": (ANSWERS_ONLY, "byte_level", CHATML_TOKENS, {}, ""),
}
SYSTEM = {"role": "system", "content": "Eres un asistente útil que responde en español."}
TURNS = [
    {"role": "user", "content": "¿Qué tal estás?"},
    {"role": "assistant", "content": "¡Muy bien, gracias! ¿Y tú?"},
    {"role": "user", "content": "Bien. ¿Qué hora es?"},
    {"role": "assistant", "content": "Son las tres y media."},
]
CONVERSATIONS = {"system": [SYSTEM, *TURNS], "no_system": TURNS, "ends_with_user": TURNS[:3]}


def save_tokenizer(path, kind: str) -> str:
    """A tokenizer directory with `kind`'s template, stored as its models store it: Qwen in chat_template.jinja,
    Llama 3 as tokenizer_config.json's string (with generation_config.json's eos ids), Mistral as a named list."""
    template, builder, specials, config, _ = KINDS[kind]
    tokenizer, base_config = BUILDERS[builder]()
    tokenizer.add_special_tokens(specials)
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **base_config, **config}
    if kind == "mistral":
        config["chat_template"] = [{"name": "default", "template": template}, {"name": "rag", "template": "x"}]
    elif kind == "llama3":
        config["chat_template"] = template
        eos_ids = [tokenizer.token_to_id("<|end_of_text|>"), tokenizer.token_to_id("<|eot_id|>")]
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": eos_ids}, f)
    else:
        with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """kind -> (ours, transformers')."""
    pairs = {}
    for kind in KINDS:
        path = save_tokenizer(tmp_path_factory.mktemp(kind), kind)
        pairs[kind] = HFTokenizer.load(path), transformers.AutoTokenizer.from_pretrained(path)
    return pairs


def _text(tokenizer, messages, add_generation_prompt):
    return jinja_chat.render(tokenizer.chat_template, messages, add_generation_prompt, tokenizer.template_tokens)[0]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("kind", ["qwen", "llama3", "mistral", "zephyr"])
def test_text_and_ids_equal_apply_chat_template(tokenizers, kind, conversation, add_generation_prompt):
    ours, reference = tokenizers[kind]
    messages = CONVERSATIONS[conversation]
    if kind == "mistral" and conversation == "system":  # Mistral's template refuses system messages.
        with pytest.raises(chat_template.ChatFormatError, match="Conversation roles must alternate"):
            chat_template.render(ours, messages, add_generation_prompt)
        with pytest.raises(jinja2.TemplateError):
            reference.apply_chat_template(messages, tokenize=False)
        return
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert _text(ours, messages, add_generation_prompt) == text
    ids, mask = chat_template.render(ours, messages, add_generation_prompt)
    want = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ids == want and len(mask) == len(ids)
    if kind in ("llama3", "mistral"):  # The template writes the BOS; none is added in front of it.
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1


@pytest.mark.parametrize("conversation", ["system", "no_system"])
def test_the_assistant_mask_equals_transformers_generation_mask(tokenizers, conversation):
    """With {% generation %} blocks the mask is transformers'; without them (plain ChatML), the rendered prefixes
    give the same mask."""
    messages = CONVERSATIONS[conversation]
    for kind, reference_kind in (
        ("chatml_generation", "chatml_generation"),
        ("chatml", "chatml_generation"),
        ("answers_only", "answers_only"),
    ):
        reference = tokenizers[reference_kind][1]
        out = reference.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = chat_template.render(tokenizers[kind][0], messages)
        assert ids == out["input_ids"] and mask == out["assistant_masks"], kind
        assert 0 < sum(mask) < len(mask)


@pytest.mark.parametrize("kind", ["qwen", "llama3", "mistral", "chatml"])
def test_the_mask_covers_each_answer_and_its_end_of_turn_and_nothing_of_the_prompt(tokenizers, kind):
    ours, reference = tokenizers[kind]
    end_of_turn = KINDS[kind][-1]
    for messages in (TURNS, TURNS[:2]):
        ids, mask = chat_template.render(ours, messages)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        masked = [token for token, kept in zip(ids, mask) if kept]
        assert reference.decode(masked) == "".join(answer + end_of_turn for answer in answers)
        # The generation prompt before an answer is all prompt: none of its tokens is trained on.
        prompt, _ = chat_template.render(ours, messages[:1], add_generation_prompt=True)
        assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
        assert mask[len(prompt)] == 1


def test_stop_tokens_are_eos_generation_config_and_the_templates_end_of_turn(tokenizers):
    for kind, ends in (("qwen", ["<|endoftext|>", "<|im_end|>"]), ("llama3", ["<|end_of_text|>", "<|eot_id|>"])):
        ours, reference = tokenizers[kind]
        assert chat_template.stop_token_ids(ours) == tuple(reference.convert_tokens_to_ids(ends)), kind
    llama3 = tokenizers["llama3"][0]
    assert llama3.generation_eos_ids == tuple(
        tokenizers["llama3"][1].convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    )
    assert chat_template.stop_token_ids(tokenizers["mistral"][0]) == (tokenizers["mistral"][0].eos_id,)


def test_template_files_and_errors(tmp_path):
    path = save_tokenizer(tmp_path / "both", "llama3")
    with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHATML)  # chat_template.jinja wins over tokenizer_config.json's, as in transformers.
    assert HFTokenizer.load(path).chat_template == transformers.AutoTokenizer.from_pretrained(path).chat_template
    assert HFTokenizer.load(path).chat_template == CHATML
    config_file = os.path.join(path, "tokenizer_config.json")
    config = json.load(open(config_file, encoding="utf-8"))
    os.remove(os.path.join(path, "chat_template.jinja"))
    json.dump({**config, "chat_template": [{"name": "rag", "template": "x"}]}, open(config_file, "w"))
    with pytest.raises(ValueError, match=r"tokenizer_config.json.*default.*\['rag'\]"):
        HFTokenizer.load(path)
    for template, message in (
        ("{% for m in messages %}{{ m.content }", "does not parse"),
        ("{{ raise_exception('Solo se admite español.') }}", "Solo se admite español"),
        ("{% set ns = namespace(_secreto=1) %}", "namespace attribute '_secreto'"),
        ("{{ messages[5]['content'] }}", "rejects the conversation"),
    ):
        json.dump({**config, "chat_template": template}, open(config_file, "w"))
        with pytest.raises(chat_template.ChatFormatError, match=re.escape(message)):
            chat_template.render(HFTokenizer.load(path), TURNS[:1])


def test_dpo_pairs_through_a_models_template(tokenizers, tmp_path):
    ours, reference = tokenizers["qwen"]
    prompt, chosen, rejected = preference.tokenize_pair(ours, TURNS[:1], "Muy bien.", "No sé.")
    assert prompt.tolist() == reference.apply_chat_template(TURNS[:1], add_generation_prompt=True, return_dict=False)
    assert reference.decode(chosen) == "Muy bien.<|im_end|>" and reference.decode(rejected) == "No sé.<|im_end|>"


# ------------------------------------------------------------------------- an imported model chats through it
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(transformers model, its directory, the imported run's directory): a tiny Llama with Qwen's template."""
    hf_dir = save_tokenizer(tmp_path_factory.mktemp("hf_chat"), "qwen")
    vocab = HFTokenizer.load(hf_dir).vocab_size
    model = hf_model("llama", vocab_size=vocab, max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    model.save_pretrained(hf_dir)
    return model, hf_dir, importer.import_hf(hf_dir, str(tmp_path_factory.mktemp("chat") / "run"))


def _greedy_reference(model, reference, messages, stop_ids, max_new_tokens=16) -> list[int]:
    ids = reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids)
        )
    answer = out[0, len(ids) :].tolist()
    return answer[:-1] if answer and answer[-1] in stop_ids else answer  # The generator drops its stop token.


def test_an_imported_run_chats_through_its_template_as_transformers_does(chat_model):
    model, hf_dir, run_dir = chat_model
    run, reference = loading.load_run(run_dir), transformers.AutoTokenizer.from_pretrained(hf_dir)
    messages = [SYSTEM, TURNS[0]]
    stop_ids = chat_template.stop_token_ids(run.tokenizer)
    theirs = _greedy_reference(model, reference, messages, stop_ids)
    ids, _ = chat_template.render(run.tokenizer, messages, add_generation_prompt=True)
    assert generate.run_generator(run).generate([ids], 16, stop_token_ids=stop_ids)[0] == theirs
    answer = reference.decode(theirs, skip_special_tokens=True)
    with serving(run, max_tokens=64) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
        assert response.choices[0].message.content == answer and response.usage.prompt_tokens == len(ids)
    # A tokenizer with neither role markers nor a template: the request is refused, naming why.
    bare_dir = save_tokenizer(os.path.join(os.path.dirname(run_dir), "bare"), "chatml")
    os.remove(os.path.join(bare_dir, "chat_template.jinja"))
    bare = HFTokenizer.load(bare_dir)
    with serving(types.SimpleNamespace(model=run.model, tokenizer=bare), max_tokens=64) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="nor a chat template"):
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)


def test_chat_script_prompts_an_imported_run_through_its_template(chat_model):
    model, hf_dir, run_dir = chat_model
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    stop_ids = chat_template.stop_token_ids(HFTokenizer.load(hf_dir))
    theirs = _greedy_reference(model, reference, TURNS[:1], stop_ids, max_new_tokens=8)
    flags = ("--max_new_tokens=8", "--temperature=0", "--repetition_penalty=1", "--system=")
    result = run_script("chat.py", f"--workdir={run_dir}", *flags, stdin=f"{TURNS[0]['content']}\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "ajustado para chat" in result.stdout
    body = result.stdout.split("Asistente: ", 1)[1]
    assert body[: body.rindex("\n\nTú:")].removesuffix("\n") == reference.decode(theirs, skip_special_tokens=True)


def test_prepare_sft_on_an_imported_run_writes_rows_that_train(chat_model, tmp_path):
    from llm.train import loop

    _, _, run_dir = chat_model
    tokenizer = loading.load_run(run_dir).tokenizer
    chats = [[TURNS[0], {"role": "assistant", "content": f"Respuesta número {i}."}, *TURNS[2:]] for i in range(24)]
    path = tmp_path / "chats.jsonl"
    sft.write_jsonl([{"messages": messages} for messages in chats], str(path))
    out = str(tmp_path / "sft")
    report = sft.prepare_sft(str(path), run_dir, out, seq_len=128, min_validation_rows=1)
    assert report["tokenizer"] == os.path.join(out, "tokenizer.json") and report["conversations"]["kept"] == 24
    assert 0 < report["assistant_tokens"] < report["tokens"]
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(out))
    # The conversations as the template renders them (the long ones from their last exchange: sft's length policy).
    expected = {tuple(map(tuple, sft.render_conversation(tokenizer, messages, 128)[:2])) for messages in chats}
    for split in ("train", "validation"):
        for shard in records.shard_paths(os.path.join(out, split)):
            for row in records.iterate_shard(shard):
                for segment in set(row["segment_ids"].tolist()) - {0}:
                    where = row["segment_ids"] == segment
                    assert (tuple(row["tokens"][where]), tuple(row["loss_mask"][where])) in expected
    config = directory.load_config(run_dir)
    config.init_from, config.data.path, config.data.seq_len = run_dir, out, 128
    config.train.update(num_steps=2, batch_size=8, log_every=1, eval_every=0, checkpoint_every=2)
    config.optimizer.update(warmup_steps=1)
    result = loop.train(config, str(tmp_path / "finetuned"))
    assert result.steps_run == 2 and np.isfinite(result.metrics["loss"])
    finetuned = loading.load_run(str(tmp_path / "finetuned"))
    assert finetuned.config.chat and finetuned.tokenizer.chat_template == tokenizer.chat_template
