"""An imported Hugging Face model with its own tokenizer is an ordinary run: it loads, encodes as transformers
does and generates transformers' greedy continuation."""

import json
import os

import pytest
import torch
import transformers
from test_hf_import import hf_model
from test_hf_tokenizer import BUILDERS

from llm.hf import importer
from llm.infer import generate
from llm.runs import loading


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random Llama saved with a Llama-style tokenizer (Metaspace BPE, byte fallback, <s> added)."""
    path = tmp_path_factory.mktemp("hf_llama")
    tokenizer, tokenizer_config = BUILDERS["metaspace_template"]()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}, f)
    model = hf_model(
        "llama", vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=128, bos_token_id=1, eos_token_id=2
    )
    model.save_pretrained(str(path))
    return model, str(path)


def test_an_imported_llama_generates_the_greedy_continuation_of_transformers(hf_llama, tmp_path):
    model, hf_dir = hf_llama
    run = loading.load_run(importer.import_hf(hf_dir, str(tmp_path / "run")))
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = "¿Qué tal? El niño comió paella"
    ids = run.tokenizer.encode(prompt, add_bos=True)
    assert ids == reference(prompt)["input_ids"] and ids[0] == run.tokenizer.bos_id
    ours = generate.run_generator(run).generate([ids], 32, stop_token_ids=(run.tokenizer.eos_id,))[0]
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
    if theirs and theirs[-1] == run.tokenizer.eos_id:
        theirs = theirs[:-1]  # transformers keeps the end-of-sequence token; the generator drops its stop token.
    assert len(ours) >= 8 and ours == theirs
    assert generate.generate_text(run, [prompt], 32)[0] == reference.decode(ours)
