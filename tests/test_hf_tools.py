"""Every tool takes a run imported from Hugging Face unchanged: LoRA, QLoRA and prompt tuning start from it,
`evaluate.py` scores it, and it quantizes and decodes quantized. (The server and chat.py with an imported run:
tests/test_hf_chat_template.py.)"""

import json

import numpy as np
import pytest
from conftest import finetune_config, forward, run_script
from test_hf_end_to_end import hf_llama  # noqa: F401 (a fixture)

from llm.hf import importer
from llm.infer import generate
from llm.quant import ptq
from llm.runs import loading, quantized_run
from llm.train import loop

TOKENS = np.random.default_rng(0).integers(3, 128, (2, 16))


@pytest.fixture(scope="module")
def imported(hf_llama, tmp_path_factory):  # noqa: F811
    return importer.import_hf(hf_llama[1], str(tmp_path_factory.mktemp("imported") / "run"))


@pytest.mark.parametrize(
    "trainable, model, train",
    [
        ("lora", dict(lora_rank=4, lora_targets="attention/(query|value)|mlp/down"), {}),
        ("lora", dict(lora_rank=4), dict(quantize_base="int4", quantize_group_size=16)),
        ("soft_prompt", dict(soft_prompt_length=4), {}),
    ],
    ids=["lora", "qlora", "prompt_tuning"],
)
def test_parameter_efficient_tuning_starts_from_an_imported_run(imported, data_dir, tmp_path, trainable, model, train):
    config = finetune_config(imported, trainable=trainable, num_steps=2, batch_size=8, eval_every=0, **train)
    config.data.path, config.data.seq_len = data_dir, 32  # conftest's rows: 32 token ids below 128
    config.model.update(model)
    config.optimizer.warmup_steps = 1
    workdir = str(tmp_path / "tuned")
    result = loop.train(config, workdir)
    assert result.steps_run == 2 and np.isfinite(result.metrics["loss"])
    tuned = loading.load_run(workdir)  # The imported base under the trained parameters, merged or in front.
    assert tuned.tokenizer.vocab_size == loading.load_run(imported).tokenizer.vocab_size
    assert np.isfinite(np.asarray(forward(tuned.model, TOKENS))).all()


def test_evaluate_scores_an_imported_run(imported, tmp_path):
    output = tmp_path / "report.json"
    result = run_script(
        "evaluate.py", f"--workdir={imported}", "--tasks=bpb,xnli", "--max_examples=4", f"--output={output}"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text(encoding="utf-8"))
    assert np.isfinite(report["bpb"]) and report["bpb"] > 0 and report["perplexity"] > 1
    assert report["unigram_bpb"] is None  # No training data of its own: no baseline, and no error.
    assert report["xnli"]  # The multiple-choice scores of the imported model
    assert "| bpb | ud_gsd_es_dev.conllu | bits per byte |" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_an_imported_run_quantizes_and_decodes(imported, tmp_path):
    run = loading.load_run(imported)
    quantized = quantized_run.quantize_run(run, "int8")
    quantized_run.save_quantized_run(quantized, str(tmp_path / "int8"))
    loaded = loading.load_run(str(tmp_path / "int8"))
    assert ptq.is_quantized(loaded.config) and ptq.parameter_bytes(loaded.model) < ptq.parameter_bytes(run.model) / 3
    expected = np.asarray(forward(run.model, TOKENS))
    error = np.linalg.norm(np.asarray(forward(loaded.model, TOKENS)) - expected) / np.linalg.norm(expected)
    assert error < 0.05  # int8 per channel on random weights; a wrong scale or layout is off by far more
    assert len(generate.generate_text(loaded, ["El niño comió"], 8)[0]) > 0
