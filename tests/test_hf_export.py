"""Hugging Face export: tiny runs of ours exported and loaded by transformers (and peft), compared logit by logit,
and exported folders imported back."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from conftest import forward, run_script, tiny_config
from flax import nnx
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file as load_torch
from test_hf_import import hf_model, restored_model
from test_hf_tokenizer import BUILDERS
from transformers import AutoModelForCausalLM

from llm import chat_template
from llm.hf import exporter, importer, peft_adapters, safetensors_files, weights
from llm.model.transformer import create_model
from llm.runs import directory, loading

TOKENS = np.random.default_rng(0).integers(0, 160, (2, 16))  # Below every vocabulary of these tests.
ATOL = 1e-4


def our_config(tokenizer, **model):
    """A tiny Llama-style run config (tiny_es: RMSNorm, SwiGLU, RoPE) with the test tokenizer's vocabulary."""
    config = tiny_config(model__vocab_size=tokenizer.vocab_size)
    config.model.update(embed_dim=64, mlp_dim=128, max_seq_len=64, rope_theta=500000.0, tie_embeddings=False)
    config.model.update(model)
    return config


def randomized(model, seed, kind=nnx.Param):
    """`model` with every parameter of `kind` moved by noise: norm scales, biases and LoRA B included, so that
    a parameter written wrong or not at all changes the logits."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, kind)
    noisy = [(p, v.replace(v.value + 0.1 * rng.standard_normal(v.value.shape))) for p, v in nnx.to_flat_state(state)]
    nnx.update(model, nnx.from_flat_state(noisy))
    return model


def save_our_run(path, config, tokenizer, seed=0):
    """A run directory holding a randomized model of `config` at step 3."""
    model = randomized(create_model(config), seed)
    directory.save_run(str(path), config, tokenizer.path, step=3, model=model)
    return str(path), model


def their_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def our_logits(model):
    return np.asarray(forward(model, TOKENS))


@pytest.mark.parametrize(
    "kind, model_keys, architecture",
    [
        ("untied", dict(), "LlamaForCausalLM"),
        ("tied", dict(tie_embeddings=True), "LlamaForCausalLM"),
        ("qkv_bias", dict(qkv_bias=True), "Qwen2ForCausalLM"),
        ("scanned", dict(scan_layers=True), "LlamaForCausalLM"),  # stacked blocks written layer by layer
    ],
)
def test_exported_run_gives_our_logits_in_transformers(kind, model_keys, architecture, tokenizer, tmp_path):
    run_dir, model = save_our_run(tmp_path / "run", our_config(tokenizer, **model_keys), tokenizer)
    out = exporter.export_run(run_dir, str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(their_logits(hf), our_logits(model), atol=ATOL, rtol=0)
    with open(os.path.join(out, "config.json")) as f:
        hf_config = json.load(f)
    assert hf_config["architectures"] == [architecture] and type(hf).__name__ == architecture
    assert hf_config["tie_word_embeddings"] == (kind == "tied")
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (2, 3, 0)
    assert ("lm_head.weight" in load_torch(os.path.join(out, "model.safetensors"))) == (kind != "tied")
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    assert directory.tokenizer_in(out)  # (the files are llm/hf/tokenizer_export.py's business)
    assert not os.path.exists(out + exporter.STAGING_SUFFIX)


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny random Llama saved with a Llama-style tokenizer (so that its imported run has one)."""
    path = tmp_path / "hf_llama"
    hf_tokenizer, tokenizer_config = BUILDERS["metaspace_template"]()
    path.mkdir()
    hf_tokenizer.save(str(path / "tokenizer.json"))
    with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}, f)
    model = hf_model("llama", vocab_size=hf_tokenizer.get_vocab_size(), bos_token_id=1, eos_token_id=2)
    model.save_pretrained(str(path))
    return model, str(path)


def test_import_then_export_gives_back_the_hf_model(hf_dir, tmp_path):
    hf, model_dir = hf_dir
    run_dir = importer.import_hf(model_dir, str(tmp_path / "run"))
    out = exporter.export_run(run_dir, str(tmp_path / "hf"))
    np.testing.assert_allclose(their_logits(AutoModelForCausalLM.from_pretrained(out)), their_logits(hf), atol=ATOL)
    original = load_torch(os.path.join(model_dir, "model.safetensors"))
    exported = load_torch(os.path.join(out, "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name


def test_export_then_import_gives_back_our_parameters_bit_for_bit(tokenizer, tmp_path):
    run_dir, model = save_our_run(tmp_path / "run", our_config(tokenizer, qkv_bias=True), tokenizer)
    out = exporter.export_run(run_dir, str(tmp_path / "hf"))
    back = restored_model(importer.import_hf(out, str(tmp_path / "back")))
    ours, theirs = nnx.to_flat_state(nnx.state(model, nnx.Param)), dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    assert len(ours) == len(theirs)
    for path, value in ours:
        np.testing.assert_array_equal(np.asarray(theirs[path].value), np.asarray(value.value), err_msg=str(path))


def test_a_sharded_export_has_an_index_that_transformers_loads(tokenizer, tmp_path):
    run_dir, model = save_our_run(tmp_path / "run", our_config(tokenizer), tokenizer)
    out = exporter.export_run(run_dir, str(tmp_path / "hf"), shard_bytes=100_000)
    with open(os.path.join(out, safetensors_files.INDEX_FILE)) as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 2 and files == {name for name in os.listdir(out) if name.startswith("model-")}
    assert not os.path.exists(os.path.join(out, safetensors_files.SINGLE_FILE))
    np.testing.assert_allclose(their_logits(AutoModelForCausalLM.from_pretrained(out)), our_logits(model), atol=ATOL)


def test_bfloat16_export_holds_our_weights_rounded(tokenizer, tmp_path):
    run_dir, model = save_our_run(tmp_path / "run", our_config(tokenizer), tokenizer)
    out = exporter.export_run(run_dir, str(tmp_path / "hf"), dtype="bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    expected = torch.tensor(np.asarray(model.blocks[1].mlp.down.kernel.value).T).to(torch.bfloat16)
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight.detach(), expected)


LORA_KEYS = dict(lora_rank=4, lora_alpha=8.0, lora_targets="attention/(query|value|out)|mlp/(gate|down)")


@pytest.fixture
def lora_run(tokenizer, tmp_path):
    """(base run, LoRA run on it, our unmerged LoRA model): random adapters, LoRA B nonzero."""
    config = our_config(tokenizer)
    base_dir, base = save_our_run(tmp_path / "base", config, tokenizer)
    lora_config = our_config(tokenizer, **LORA_KEYS)
    lora_config.init_from, lora_config.train.trainable = base_dir, "lora"
    model = create_model(lora_config)
    nnx.update(model, nnx.state(base, nnx.Param))
    randomized(model, seed=1, kind=nnx.LoRAParam)
    lora_dir = str(tmp_path / "lora")
    peft_adapters.save_lora_run(lora_dir, lora_config, tokenizer.path, nnx.state(model, nnx.LoRAParam))
    return base_dir, lora_dir, model


def test_a_lora_run_exports_as_a_peft_adapter_that_peft_applies_as_we_do(lora_run, tmp_path):
    _, lora_dir, model = lora_run
    out = peft_adapters.export_adapter(lora_dir, str(tmp_path / "adapter"))
    with open(os.path.join(out, "adapter_config.json")) as f:
        settings = json.load(f)
    assert settings["target_modules"] == ["down_proj", "gate_proj", "o_proj", "q_proj", "v_proj"]
    assert (settings["r"], settings["lora_alpha"], settings["base_model_name_or_path"]) == (4, 8.0, f"{out}/base")
    base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"))
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ours = our_logits(model)
    np.testing.assert_allclose(their_logits(peft_model), ours, atol=ATOL, rtol=0)
    np.testing.assert_allclose(their_logits(AutoPeftModelForCausalLM.from_pretrained(out)), ours, atol=ATOL, rtol=0)
    # The adapters matter: the base alone computes something else.
    assert np.abs(their_logits(AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"))) - ours).max() > 1e-2


def test_a_merged_lora_export_gives_our_unmerged_logits(lora_run, tmp_path):
    _, lora_dir, model = lora_run
    with pytest.raises(exporter.UnsupportedRun, match="PEFT adapter"):
        exporter.export_run(lora_dir, str(tmp_path / "merged"))
    out = exporter.export_run(lora_dir, str(tmp_path / "merged"), merge=True)
    hf = AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(their_logits(hf), our_logits(model), atol=ATOL, rtol=0)


def peft_adapter(hf, path, **settings):
    """`hf` wrapped by peft with random adapters (lora_B too), saved to `path`."""
    config = dict(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(hf, LoraConfig(task_type="CAUSAL_LM", **{**config, **settings}))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(str(path))
    return peft_model.eval(), str(path)


def test_a_peft_adapter_imports_as_a_lora_run_with_peft_logits(hf_dir, tmp_path):
    hf, model_dir = hf_dir
    base_run = importer.import_hf(model_dir, str(tmp_path / "base"))
    peft_model, adapter_dir = peft_adapter(hf, tmp_path / "adapter")
    lora_dir = peft_adapters.import_adapter(adapter_dir, base_run, str(tmp_path / "lora"))
    config = directory.load_config(lora_dir)
    assert config.model.lora_targets == "attention/query|attention/value|mlp/down"
    assert (config.model.lora_rank, config.model.lora_alpha, config.model.lora_dropout) == (4, 16.0, 0.05)
    assert config.init_from == base_run and config.train.trainable == "lora"
    run = loading.load_run(lora_dir)  # base + adapters, merged
    np.testing.assert_allclose(our_logits(run.model), their_logits(peft_model), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(use_dora=True), "use_dora=True"),
        (dict(use_rslora=True), "use_rslora=True"),
        (dict(bias="lora_only"), "bias='lora_only'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save="),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern="),
        (dict(alpha_pattern={"q_proj": 8}), "alpha_pattern="),
        (dict(target_modules=["q_proj", "lm_head"]), r"\['lm_head'\] are not among"),
    ],
)
def test_peft_features_we_lack_are_refused_by_key(settings, message, hf_dir, tmp_path):
    hf, model_dir = hf_dir
    base_run = importer.import_hf(model_dir, str(tmp_path / "base"))
    _, adapter_dir = peft_adapter(hf, tmp_path / "adapter")
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        adapter_config = json.load(f)
    with open(path, "w") as f:
        json.dump({**adapter_config, **settings}, f)
    with pytest.raises(ValueError, match=message):
        peft_adapters.import_adapter(adapter_dir, base_run, str(tmp_path / "lora"))
    assert not os.path.exists(tmp_path / "lora")


@pytest.mark.parametrize(
    "model_keys, message",
    [
        (dict(position_encoding="sinusoidal"), "model.position_encoding='sinusoidal'"),
        (dict(norm="layernorm"), "model.norm='layernorm'"),
        (dict(mlp_activation="gelu"), "model.mlp_activation='gelu'"),
        (dict(use_bias=True), "model.use_bias=True"),
        (dict(soft_prompt_length=4), "model.soft_prompt_length=4"),
    ],
)
def test_configs_without_a_hf_equivalent_are_refused_by_key_before_writing(model_keys, message, tokenizer, tmp_path):
    run_dir = str(tmp_path / "run")
    directory.write_run_files(run_dir, our_config(tokenizer, **model_keys), tokenizer.path)  # (no checkpoint needed)
    with pytest.raises(exporter.UnsupportedRun, match=message):
        exporter.export_run(run_dir, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(str(tmp_path / "hf") + exporter.STAGING_SUFFIX)


def test_a_model_key_the_export_does_not_know_is_refused_unless_default(tokenizer, tmp_path, monkeypatch):
    # As if rope_theta were a key added after the exporter was written.
    monkeypatch.setattr(exporter, "EXPORTED_KEYS", exporter.EXPORTED_KEYS - {"rope_theta"})
    assert exporter.architecture(our_config(tokenizer, rope_theta=10000.0)).name == "LlamaForCausalLM"
    with pytest.raises(exporter.UnsupportedRun, match="model.rope_theta=500000.0: not exported"):
        exporter.architecture(our_config(tokenizer))


def test_a_fused_hf_tensor_is_its_parts_in_table_order():
    # GPT-2's c_attn: (embed, 3 * embed) = query | key | value columns (Conv1D stores (in, out)).
    columns = weights.Transform("columns", lambda s: (s[0], s[1] * s[2]), None, lambda a: a.reshape(a.shape[0], -1))
    table = {
        f"blocks.{{i}}.attention.{name}.kernel": ("h.{i}.attn.c_attn.weight", columns)
        for name in ("query", "key", "value")
    }
    paths = [("blocks", 1, "attention", name, "kernel") for name in ("key", "query", "value")]  # (our sorted order)
    (tensor,) = weights.export_tensors(table, paths)
    arrays = {
        name: np.random.default_rng(i).standard_normal((8, 2, 4)) for i, name in enumerate(("query", "key", "value"))
    }
    assert tensor.name == "h.1.attn.c_attn.weight" and tensor.shape(dict.fromkeys(paths, (8, 2, 4))) == (8, 24)
    fused = tensor.assemble([arrays[path[3]] for path, _ in tensor.parts])
    np.testing.assert_array_equal(
        fused, np.concatenate([arrays[n].reshape(8, 8) for n in ("query", "key", "value")], -1)
    )


def test_a_quantized_run_is_refused_naming_its_source(tokenizer, tmp_path):
    config = our_config(tokenizer)
    config.quantization.update(mode="int8", source_workdir="/runs/float")
    directory.write_run_files(str(tmp_path / "q"), config, tokenizer.path)
    with pytest.raises(exporter.UnsupportedRun, match="quantization.source_workdir='/runs/float'"):
        exporter.export_run(str(tmp_path / "q"), str(tmp_path / "hf"))


def test_a_missing_checkpoint_and_an_existing_output_are_refused(tokenizer, tmp_path):
    directory.write_run_files(str(tmp_path / "empty"), our_config(tokenizer), tokenizer.path)
    with pytest.raises(FileNotFoundError, match="No checkpoints"):
        exporter.export_run(str(tmp_path / "empty"), str(tmp_path / "hf"))
    run_dir, _ = save_our_run(tmp_path / "run", our_config(tokenizer), tokenizer)
    with pytest.raises(FileNotFoundError, match="No checkpoint for step 9"):
        exporter.export_run(run_dir, str(tmp_path / "hf"), step=9)
    out = exporter.export_run(run_dir, str(tmp_path / "hf"))
    with pytest.raises(FileExistsError, match="already exists"):
        exporter.export_run(run_dir, out)
    assert exporter.export_run(run_dir, out, overwrite=True) == out
    (tmp_path / "precious").mkdir()
    with pytest.raises(FileExistsError, match="not an exported model"):
        exporter.export_run(run_dir, str(tmp_path / "precious"), overwrite=True)


def test_export_script_end_to_end(lora_run, tmp_path):
    _, lora_dir, model = lora_run
    out = tmp_path / "adapter"
    result = run_script("export_hf.py", f"--workdir={lora_dir}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert "PEFT" in result.stdout
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    np.testing.assert_allclose(their_logits(peft_model), our_logits(model), atol=ATOL, rtol=0)
    again = run_script("export_hf.py", f"--workdir={lora_dir}", f"--output={out}", "--merge")
    assert again.returncode != 0 and "already exists" in again.stderr


def test_the_quickstart_shaped_export_runs_in_a_transformers_pipeline_as_sample_py_does(trained_run, tmp_path):
    prompt = "La niña canta"
    sampled = run_script(
        "sample.py", f"--workdir={trained_run}", f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=12"
    )
    assert sampled.returncode == 0, sampled.stderr
    completion = sampled.stdout.split(f"--- {prompt}", 1)[1].split("\n---", 1)[0].rstrip("\n")
    out = exporter.export_run(trained_run, str(tmp_path / "hf"))
    generator = transformers.pipeline("text-generation", model=out, device="cpu")
    ids = generator(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    # The pipeline's own text cuts the prompt off by its decoded length, which loses a space of this barely trained
    # model's runs of spaces; its tokens, decoded with the exported tokenizer, are sample.py's text.
    text = generator.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(completion) > 4 and text == prompt + completion


def test_a_chat_tuned_export_carries_our_template_and_a_plain_one_none(trained_run, tmp_path):
    chat_run = tmp_path / "chat_run"
    shutil.copytree(trained_run, chat_run)
    config = json.loads((chat_run / "config.json").read_text(encoding="utf-8"))
    (chat_run / "config.json").write_text(json.dumps({**config, "chat": True}), encoding="utf-8")
    messages = [{"role": "system", "content": "Eres útil."}, {"role": "user", "content": "¿Quién canta?"}]
    reference = transformers.AutoTokenizer.from_pretrained(exporter.export_run(str(chat_run), str(tmp_path / "chat")))
    rendered = reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    tokenizer = loading.load_run(str(chat_run)).tokenizer
    assert rendered == chat_template.render(tokenizer, messages, add_generation_prompt=True)[0]
    plain = transformers.AutoTokenizer.from_pretrained(exporter.export_run(trained_run, str(tmp_path / "plain")))
    assert plain.chat_template is None
