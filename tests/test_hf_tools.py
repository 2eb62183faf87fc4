"""Every tool takes a run imported from Hugging Face unchanged: continued pretraining, LoRA, QLoRA and prompt
tuning start from it (through configs/from_run.py),
`evaluate.py` scores it, and it quantizes and decodes quantized. (The server and chat.py with an imported run:
tests/test_hf_chat_template.py.)"""

import json

import numpy as np
import pytest
from conftest import REPO, forward, run_script
from test_hf_end_to_end import hf_llama  # noqa: F401 (a fixture)

from configs import from_run
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
        ("all", {}, {}),
        ("lora", dict(lora_rank=4, lora_targets="attention/(query|value)|mlp/down"), {}),
        ("lora", dict(lora_rank=4), dict(quantize_base="int4", quantize_group_size=16)),
        ("soft_prompt", dict(soft_prompt_length=4), {}),
    ],
    ids=["continued_pretraining", "lora", "qlora", "prompt_tuning"],
)
def test_training_of_every_kind_starts_from_an_imported_run(imported, data_dir, tmp_path, trainable, model, train):
    config = from_run.get_config(imported)  # The recipe a user starts from (configs/from_run.py:RUN).
    config.data.path, config.data.seq_len = data_dir, 32  # conftest's rows: 32 token ids below 128
    config.train.update(trainable=trainable, num_steps=2, batch_size=8, eval_every=0, checkpoint_every=2, **train)
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


def test_train_script_continues_an_imported_run_through_the_from_run_recipe(imported, data_dir, tmp_path):
    flags = (
        f"--config={REPO}/configs/from_run.py:{imported}",
        f"--workdir={tmp_path / 'continued'}",
        f"--config.data.path={data_dir}",
        "--config.data.seq_len=32",
        "--config.train.num_steps=1",
        "--config.train.batch_size=8",
        "--config.train.eval_every=0",
        "--config.optimizer.warmup_steps=0",
    )
    result = run_script("train.py", *flags)
    assert result.returncode == 0, result.stderr
    continued = loading.load_run(str(tmp_path / "continued"))
    assert continued.step == 1 and continued.config.init_from == imported
    missing = run_script("train.py", f"--config={REPO}/configs/from_run.py:{tmp_path}", f"--workdir={tmp_path / 'x'}")
    assert missing.returncode != 0 and "config.json' not found" in missing.stderr
