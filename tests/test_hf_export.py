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
from test_hf_import import MODELS, hf_model, restored_model
from test_hf_tokenizer import BUILDERS
from transformers import AutoConfig, AutoModelForCausalLM

from configs import gpt2_small_es
from configs.base import CHOICES
from llm import chat_template
from llm.hf import export_architectures, exporter, importer, peft_adapters, peft_import, safetensors_files, weights
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


def gpt2_config(tokenizer, **model):
    """configs/gpt2_small_es.py (LayerNorm, GELU, learned positions, biases, tied, scan_layers) shrunk to 2 layers
    of width 64, computing in float32 as transformers does on the CPU."""
    config = gpt2_small_es.get_config()
    config.model.update(vocab_size=tokenizer.vocab_size, max_seq_len=64, num_layers=2, embed_dim=64, dtype="float32")
    config.model.update(num_heads=4, num_kv_heads=4, mlp_dim=128)
    config.data.seq_len = 64
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


# Llama 3.1's RoPE scaling with a pretraining context of 32: every branch of it shows in the 16 positions.
LLAMA3_ROPE = dict(
    rope_scaling="llama3",
    rope_scaling_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=32,
    max_seq_len=128,
)
LINEAR_ROPE = dict(rope_scaling="linear", rope_scaling_factor=4.0)
# kind -> (config of a run of ours, its model keys, the architecture it exports as)
RUNS = {
    "untied": (our_config, dict(), "LlamaForCausalLM"),
    "tied": (our_config, dict(tie_embeddings=True), "LlamaForCausalLM"),
    "qkv_bias": (our_config, dict(qkv_bias=True), "Qwen2ForCausalLM"),
    "scanned": (our_config, dict(scan_layers=True), "LlamaForCausalLM"),  # stacked blocks written layer by layer
    "qk_norm": (our_config, dict(qk_norm=True, head_dim=24), "Qwen3ForCausalLM"),  # head_dim not embed / heads
    "llama3_rope": (our_config, LLAMA3_ROPE, "LlamaForCausalLM"),
    "linear_rope": (our_config, LINEAR_ROPE, "LlamaForCausalLM"),
    "qwen2_llama3_rope": (our_config, dict(LLAMA3_ROPE, qkv_bias=True), "Qwen2ForCausalLM"),
    "qwen3_linear_rope": (our_config, dict(LINEAR_ROPE, qk_norm=True), "Qwen3ForCausalLM"),
    "gpt2": (gpt2_config, dict(), "GPT2LMHeadModel"),  # tied, scanned
    "gpt2_untied": (gpt2_config, dict(tie_embeddings=False, scan_layers=False, mlp_dim=96), "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("kind", list(RUNS))
def test_exported_run_gives_our_logits_in_transformers(kind, tokenizer, tmp_path):
    make_config, model_keys, architecture = RUNS[kind]
    config = make_config(tokenizer, **model_keys)
    run_dir, model = save_our_run(tmp_path / "run", config, tokenizer)
    out = exporter.export_run(run_dir, str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(their_logits(hf), our_logits(model), atol=ATOL, rtol=0)
    with open(os.path.join(out, "config.json")) as f:
        hf_config = json.load(f)
    assert hf_config["architectures"] == [architecture] and type(hf).__name__ == architecture
    assert hf_config["tie_word_embeddings"] == config.model.tie_embeddings
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (2, 3, 0)
    tensors = load_torch(os.path.join(out, "model.safetensors"))
    assert ("lm_head.weight" in tensors) == (not config.model.tie_embeddings)
    if "rope_parameters" in hf_config:  # As transformers writes it back.
        assert AutoConfig.from_pretrained(out).to_dict()["rope_parameters"] == hf_config["rope_parameters"]
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    assert directory.tokenizer_in(out)  # (the files are llm/hf/tokenizer_export.py's business)
    assert not os.path.exists(out + exporter.STAGING_SUFFIX)


def saved_hf(kind, path):
    """test_hf_import's random model of `kind` saved with a tokenizer (so that its imported run has one): GPT-2's
    byte-level BPE, whose <|endoftext|> is id 0, or a Llama-style one (<s> 1, </s> 2)."""
    gpt2 = MODELS[kind][0].__name__ == "GPT2LMHeadModel"
    hf_tokenizer, tokenizer_config = BUILDERS["byte_level" if gpt2 else "metaspace_template"]()
    path.mkdir()
    hf_tokenizer.save(str(path / "tokenizer.json"))
    with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}, f)
    ids = dict(bos_token_id=0, eos_token_id=0) if gpt2 else dict(bos_token_id=1, eos_token_id=2)
    model = hf_model(kind, vocab_size=hf_tokenizer.get_vocab_size(), **ids)
    model.save_pretrained(str(path))
    return model, str(path)


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny random Llama saved with a Llama-style tokenizer."""
    return saved_hf("llama", tmp_path / "hf_llama")


@pytest.mark.parametrize("kind", list(MODELS))
def test_import_then_export_gives_back_the_hf_model(kind, tmp_path):
    hf, model_dir = saved_hf(kind, tmp_path / "original")
    run_dir = importer.import_hf(model_dir, str(tmp_path / "run"))
    out = exporter.export_run(run_dir, str(tmp_path / "hf"))
    np.testing.assert_allclose(their_logits(AutoModelForCausalLM.from_pretrained(out)), their_logits(hf), atol=ATOL)
    original = load_torch(os.path.join(model_dir, "model.safetensors"))
    exported = load_torch(os.path.join(out, "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name


@pytest.mark.parametrize("kind", ["qkv_bias", "qk_norm", "gpt2", "gpt2_untied"])  # gpt2 scanned, gpt2_untied not
def test_export_then_import_gives_back_our_parameters_bit_for_bit(kind, tokenizer, tmp_path):
    make_config, model_keys, _ = RUNS[kind]
    config = make_config(tokenizer, **model_keys)
    run_dir, model = save_our_run(tmp_path / "run", config, tokenizer)
    out = exporter.export_run(run_dir, str(tmp_path / "hf"))
    back = restored_model(importer.import_hf(out, str(tmp_path / "back"), scan_layers=config.model.scan_layers))
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


def save_lora_run(tmp_path, make_config, tokenizer, **lora_keys):
    """(base run, LoRA run on it, our unmerged LoRA model) of `make_config`: random adapters, LoRA B nonzero."""
    base_dir, base = save_our_run(tmp_path / "base", make_config(tokenizer), tokenizer)
    lora_config = make_config(tokenizer, **lora_keys)
    lora_config.init_from, lora_config.train.trainable = base_dir, "lora"
    model = create_model(lora_config)
    nnx.update(model, nnx.state(base, nnx.Param))
    randomized(model, seed=1, kind=nnx.LoRAParam)
    lora_dir = str(tmp_path / "lora")
    peft_adapters.save_lora_run(lora_dir, lora_config, tokenizer.path, nnx.state(model, nnx.LoRAParam))
    return base_dir, lora_dir, model


@pytest.fixture
def lora_run(tokenizer, tmp_path):
    """A LoRA run on a Llama-style base (save_lora_run)."""
    return save_lora_run(tmp_path, our_config, tokenizer, **LORA_KEYS)


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


def test_a_gpt2_lora_run_exports_as_a_peft_adapter_of_its_conv1d_layers_and_back(tokenizer, tmp_path):
    targets = "attention/out|mlp/(up|down)"  # c_attn aside, GPT-2's projections are unfused Conv1D layers.
    _, lora_dir, model = save_lora_run(tmp_path, gpt2_config, tokenizer, lora_rank=4, lora_targets=targets)
    out = peft_adapters.export_adapter(lora_dir, str(tmp_path / "adapter"))
    with open(os.path.join(out, "adapter_config.json")) as f:
        settings = json.load(f)
    assert settings["target_modules"] == ["attn.c_proj", "c_fc", "mlp.c_proj"] and settings["fan_in_fan_out"]
    ours = our_logits(model)
    np.testing.assert_allclose(their_logits(AutoPeftModelForCausalLM.from_pretrained(out)), ours, atol=ATOL, rtol=0)
    assert np.abs(their_logits(AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"))) - ours).max() > 1e-2
    base_run = importer.import_hf(os.path.join(out, "base"), str(tmp_path / "base_run"))
    back = peft_import.import_adapter(out, base_run, str(tmp_path / "back"))
    assert directory.load_config(back).model.lora_targets == "attention/out|mlp/down|mlp/up"
    np.testing.assert_allclose(our_logits(loading.load_run(back).model), ours, atol=ATOL, rtol=0)


def test_a_gpt2_lora_run_adapting_the_fused_query_key_value_is_refused_by_lora_targets(tokenizer, tmp_path):
    targets = "attention/(query|out)"
    _, lora_dir, model = save_lora_run(tmp_path, gpt2_config, tokenizer, lora_rank=4, lora_targets=targets)
    message = r"model.lora_targets='attention/\(query\|out\)' adapts \['attention/query'\], fused in GPT2LMHeadModel"
    with pytest.raises(exporter.UnsupportedRun, match=message):
        peft_adapters.export_adapter(lora_dir, str(tmp_path / "adapter"))
    assert not os.path.exists(tmp_path / "adapter") and not os.path.exists(f"{tmp_path / 'adapter'}.exporting")
    refused = run_script("export_hf.py", f"--workdir={lora_dir}", f"--output={tmp_path / 'adapter'}")
    assert refused.returncode != 0 and "model.lora_targets='attention/(query|out)'" in refused.stderr
    merged = exporter.export_run(lora_dir, str(tmp_path / "merged"), merge=True)  # Merged, it exports.
    np.testing.assert_allclose(their_logits(AutoModelForCausalLM.from_pretrained(merged)), our_logits(model), atol=ATOL)


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
    lora_dir = peft_import.import_adapter(adapter_dir, base_run, str(tmp_path / "lora"))
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
        peft_import.import_adapter(adapter_dir, base_run, str(tmp_path / "lora"))
    assert not os.path.exists(tmp_path / "lora")


@pytest.mark.parametrize(
    "make_config, model_keys, message",
    [
        (our_config, dict(position_encoding="sinusoidal"), "model.position_encoding='sinusoidal'"),
        (our_config, dict(norm="layernorm"), "model.norm='layernorm'"),
        (our_config, dict(mlp_activation="gelu"), "model.mlp_activation='gelu'"),
        (our_config, dict(use_bias=True), "model.use_bias=True"),
        (our_config, dict(soft_prompt_length=4), "model.soft_prompt_length=4"),
        (our_config, dict(qkv_bias=True, qk_norm=True), "model.qkv_bias=True with model.qk_norm=True"),
        (gpt2_config, dict(num_kv_heads=2), "model.num_kv_heads=2 differs from model.num_heads=4"),
        (gpt2_config, dict(head_dim=32), r"model.head_dim=32 is not model.embed_dim // model.num_heads = 16"),
        (gpt2_config, dict(use_bias=False), r"model.use_bias=False \(GPT2LMHeadModel needs True\)"),
    ],
)
def test_configs_without_a_hf_equivalent_are_refused_by_key_before_writing(
    make_config, model_keys, message, tokenizer, tmp_path
):
    run_dir = str(tmp_path / "run")
    directory.write_run_files(run_dir, make_config(tokenizer, **model_keys), tokenizer.path)  # (no checkpoint needed)
    with pytest.raises(exporter.UnsupportedRun, match=message):
        exporter.export_run(run_dir, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(str(tmp_path / "hf") + exporter.STAGING_SUFFIX)


def test_each_rope_scaling_has_its_rope_parameters():
    assert set(export_architectures.ROPE_PARAMETERS) == set(CHOICES["model.rope_scaling"])


def test_a_model_key_the_export_does_not_know_is_refused_unless_default(tokenizer, tmp_path, monkeypatch):
    # As if rope_theta were a key added after the exporter was written.
    monkeypatch.setattr(exporter, "EXPORTED_KEYS", exporter.EXPORTED_KEYS - {"rope_theta"})
    assert exporter.architecture(our_config(tokenizer, rope_theta=10000.0)).name == "LlamaForCausalLM"
    with pytest.raises(exporter.UnsupportedRun, match="model.rope_theta=500000.0: not exported"):
        exporter.architecture(our_config(tokenizer))


def test_a_fused_hf_tensor_is_its_parts_in_table_order():
    # GPT-2's c_attn: (embed, 3 * heads * head_dim) = query | key | value columns (Conv1D stores (in, out)).
    names = ("query", "key", "value")
    paths = [("blocks", 1, "attention", name, "kernel") for name in sorted(names)]  # (our sorted order)
    (tensor,) = weights.export_tensors(weights.GPT2, paths)
    arrays = {name: np.random.default_rng(i).standard_normal((8, 2, 4)) for i, name in enumerate(names)}
    assert tensor.name == "transformer.h.1.attn.c_attn.weight"
    assert tensor.shape(dict.fromkeys(paths, (8, 2, 4))) == (8, 24)
    fused = tensor.assemble([arrays[path[3]] for path, _ in tensor.parts])
    np.testing.assert_array_equal(fused, np.concatenate([arrays[n].reshape(8, 8) for n in names], -1))
    for path, transform in tensor.parts:  # and the import reads each part back
        whole = (slice(0, 8), slice(0, 2), slice(0, 4))
        np.testing.assert_array_equal(transform.read(fused, whole, (8, 2, 4)), arrays[path[3]], err_msg=path[3])


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
