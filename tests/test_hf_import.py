"""Hugging Face checkpoint import: tiny random Llama (plain and with Llama 3 RoPE scaling), Mistral, Qwen2, Qwen3
and GPT-2 models built with transformers, imported, restored from the run directory, and compared with
transformers on the CPU: logits, logits of a padded batch, and greedy generation."""

import json
import os
import shutil
from collections.abc import Callable

import jax
import numpy as np
import pytest
import torch
from conftest import run_script, tiny_config
from flax import nnx
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file as load_torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from llm import checkpoint, sharding
from llm.hf import architectures, importer, safetensors_files, weights
from llm.infer import generate
from llm.model.transformer import create_model
from llm.runs import directory

VOCAB = 160
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
# Llama 3.1's RoPE scaling with a pretraining context of 32: wavelengths above 32 are stretched 8 times, those
# between 8 and 32 interpolated, shorter ones kept, so every branch of the scaling shows in 16 positions.
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)
GPT2_SIZES = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
# kind -> (model class, config class, config keys)
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(SIZES, tie_word_embeddings=False, rope_theta=500000.0)),
    "llama_tied": (LlamaForCausalLM, LlamaConfig, dict(SIZES, tie_word_embeddings=True)),
    "llama3_rope": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(SIZES, max_position_embeddings=128, rope_parameters=LLAMA3_ROPE),
    ),
    "mistral": (MistralForCausalLM, MistralConfig, dict(SIZES, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(SIZES, tie_word_embeddings=False)),
    # head_dim 24, not hidden_size / heads = 16: Qwen3 names it explicitly.
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(SIZES, head_dim=24, tie_word_embeddings=False)),
    "gpt2": (GPT2LMHeadModel, GPT2Config, GPT2_SIZES),  # tied, n_inner None (4 * n_embd), gelu_new
    "gpt2_untied": (
        GPT2LMHeadModel,
        GPT2Config,
        dict(GPT2_SIZES, tie_word_embeddings=False, n_inner=96, activation_function="gelu_pytorch_tanh"),
    ),
}
# Streamed onto a (2, 2, 2) mesh (data, fsdp and tensor all split); the others onto fsdp over all 8 devices.
ON_2X2X2 = ("qwen2", "qwen3", "gpt2", "gpt2_untied")
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 16))  # A batch of 2 sequences.


def hf_model(kind: str, **overrides):
    """A tiny transformers model of `kind` whose every weight (norm scales and zero-initialized biases
    included) is randomized, so a weight mapped wrong or not at all changes the logits."""
    model_class, config_class, keys = MODELS[kind]
    return randomized(lambda: model_class(config_class(**{**keys, **overrides})))


def randomized(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The model `build` makes (seeded) in eval mode, with seeded noise added to every weight."""
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def save_hf(model, path, **kwargs) -> str:
    model.save_pretrained(str(path), **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """kind -> (transformers model, its saved directory)."""
    models = {kind: hf_model(kind) for kind in MODELS}
    return {kind: (model, save_hf(model, tmp_path_factory.mktemp(kind))) for kind, model in models.items()}


@pytest.fixture(scope="module")
def sharded_qwen2(tmp_path_factory):
    """Qwen2 (q/k/v biases) saved as several safetensors shards with model.safetensors.index.json."""
    return save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("sharded"), max_shard_size="40KB")


def restored_model(run_dir):
    """The model of an imported run, restored from its checkpoint onto one device."""
    config = directory.load_config(run_dir)
    mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    model = nnx.eval_shape(lambda: create_model(config))
    params = nnx.state(model, nnx.Param)
    target = sharding.abstract_with_shardings(params, sharding.tree_shardings(params, mesh, config.logical_axis_rules))
    restored, step = checkpoint.restore_run_params(run_dir, target)
    assert step == 0
    nnx.update(model, restored)
    return model


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory):
    """kind -> the run directory it was imported into."""
    return {
        kind: importer.import_hf(
            model_dir,
            str(tmp_path_factory.mktemp(kind) / "run"),
            mesh_shape=(2, 2, 2) if kind in ON_2X2X2 else (1, -1, 1),
        )
        for kind, (_, model_dir) in hf_dirs.items()
    }


def transformers_logits(hf, tokens, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(tokens)), **kwargs).logits.numpy()


@pytest.mark.parametrize("kind", list(MODELS))
def test_imported_logits_equal_transformers(kind, hf_dirs, imported):
    hf, _ = hf_dirs[kind]
    model = restored_model(imported[kind])
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, TOKENS))
    np.testing.assert_allclose(ours, transformers_logits(hf, TOKENS), atol=1e-4, rtol=0)
    config = directory.load_config(imported[kind])
    assert config.model.tie_embeddings == (kind in ("llama_tied", "gpt2"))
    assert config.model.qkv_bias == (kind == "qwen2")
    assert config.train.trainable == "all" and config.data.seq_len == config.model.max_seq_len


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_padded_batch_gives_transformers_logits_at_the_real_positions(kind, padding, hf_dirs, imported):
    """Two prompts of 16 and 9 tokens in one batch. Ours marks padding with segment id 0 (llm/infer/generate.py
    left-pads so); transformers gets the attention mask and, left-padded, the position ids its generate derives
    from it."""
    hf, _ = hf_dirs[kind]
    real = np.ones((2, 16), np.int64)
    if padding == "left":
        real[1, :7] = 0
    else:
        real[1, 9:] = 0
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
    tokens = np.where(real == 1, TOKENS, 0)
    model = restored_model(imported[kind])
    ours = np.asarray(nnx.jit(lambda m, t, p, s: m(t, p, s))(model, tokens, positions, real))
    position_ids = torch.tensor(positions) if padding == "left" else None
    theirs = transformers_logits(hf, tokens, attention_mask=torch.tensor(real), position_ids=position_ids)
    mask = real.astype(bool)
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_imported_runs_generate_the_greedy_continuation_of_transformers(kind, hf_dirs, imported):
    """Our generator decodes two prompts of different lengths in one left-padded batch; transformers each alone."""
    hf, _ = hf_dirs[kind]
    prompts = [TOKENS[0, :11].tolist(), TOKENS[1].tolist()]
    eos = hf.generation_config.eos_token_id
    ours = generate.Generator(restored_model(imported[kind])).generate(
        prompts, 32, stop_token_ids=() if eos is None else (eos,)
    )
    for prompt, row in zip(prompts, ours):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
        if eos in theirs:
            theirs = theirs[: theirs.index(eos)]  # transformers keeps the stop token; ours drops it.
        assert len(row) >= 8 and row == theirs


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
def test_a_scanned_import_gives_the_same_logits(kind, hf_dirs, tmp_path):
    hf, model_dir = hf_dirs[kind]
    run_dir = importer.import_hf(model_dir, str(tmp_path / "run"), mesh_shape=(2, 2, 2), scan_layers=True)
    model = restored_model(run_dir)
    assert directory.load_config(run_dir).model.scan_layers
    assert model.blocks.attention.query.kernel.value.shape[0] == 2  # one stacked Block, leading layers axis
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, TOKENS))
    np.testing.assert_allclose(ours, transformers_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_the_run_config_is_the_converted_one(hf_dirs, tmp_path):
    run_dir = importer.import_hf(hf_dirs["llama"][1], str(tmp_path / "run"))
    model = directory.load_config(run_dir).model
    assert (model.vocab_size, model.max_seq_len, model.num_layers, model.embed_dim) == (VOCAB, 64, 2, 64)
    assert (model.num_heads, model.num_kv_heads, model.head_dim, model.mlp_dim) == (4, 2, 16, 128)
    assert (model.mlp_activation, model.norm, model.position_encoding) == ("swiglu", "rmsnorm", "rope")
    assert (model.rope_theta, model.norm_eps, model.use_bias) == (500000.0, 1e-6, False)
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.json", "generation_config.json"]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("llama", dict(rope_scaling="none", qk_norm=False, position_encoding="rope")),
        ("qwen3", dict(qk_norm=True, head_dim=24, qkv_bias=False, use_bias=False, mlp_activation="swiglu")),
        (
            "llama3_rope",
            dict(
                rope_scaling="llama3",
                rope_scaling_factor=8.0,
                rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0,
                rope_original_max_len=32,
                rope_theta=10000.0,
                max_seq_len=128,
            ),
        ),
        (
            "gpt2",
            dict(
                position_encoding="learned",
                norm="layernorm",
                norm_eps=1e-5,
                mlp_activation="gelu",
                mlp_dim=256,
                use_bias=True,
                num_kv_heads=4,
                head_dim=16,
                tie_embeddings=True,
                max_seq_len=64,
            ),
        ),
        ("gpt2_untied", dict(mlp_dim=96, tie_embeddings=False)),
    ],
)
def test_converted_model_keys(kind, expected, hf_dirs):
    model = importer.run_config(importer.read_hf_config(hf_dirs[kind][1])).model
    assert {key: model[key] for key in expected} == expected


@pytest.mark.parametrize(
    "changes, expected",
    [
        # transformers < 5 wrote rope_scaling (type or rope_type) beside a top-level rope_theta.
        (dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=5e5), ("linear", 2.0, 5e5)),
        (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}), ("linear", 4.0, 1e4)),
    ],
)
def test_linear_rope_scaling_is_read_in_both_spellings(changes, expected, hf_dirs, tmp_path):
    hf_config = importer.read_hf_config(edited_config(hf_dirs["llama"][1], tmp_path / "model", **changes))
    model = importer.run_config(hf_config).model
    assert (model.rope_scaling, model.rope_scaling_factor, model.rope_theta) == expected


@pytest.mark.parametrize("kind", ["qwen2_sharded", "qwen3", "gpt2"])
def test_import_onto_a_2x2x2_mesh_matches_one_device(kind, sharded_qwen2, hf_dirs):
    model_dir = sharded_qwen2 if kind == "qwen2_sharded" else hf_dirs[kind][1]
    if kind == "qwen2_sharded":
        assert os.path.exists(os.path.join(sharded_qwen2, safetensors_files.INDEX_FILE))
    hf_config = importer.read_hf_config(model_dir)
    config, name = importer.run_config(hf_config), architectures.architecture(hf_config)
    one = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    eight = sharding.create_mesh((2, 2, 2))
    single = nnx.state(weights.load_model(model_dir, name, config, one), nnx.Param)
    spread = nnx.state(weights.load_model(model_dir, name, config, eight), nnx.Param)
    declared = nnx.to_flat_state(sharding.tree_shardings(spread, eight, config.logical_axis_rules))
    for (path, a), (_, b), (_, placement) in zip(nnx.to_flat_state(single), nnx.to_flat_state(spread), declared):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=str(path))
        assert b.value.sharding == placement.value, path
    # The rules do shard: the query kernel (embed 64, 4 heads, head_dim) is split over fsdp (embed) and tensor.
    query = dict(nnx.to_flat_state(spread))[("blocks", 0, "attention", "query", "kernel")].value
    assert query.sharding.spec[:2] == ("fsdp", "tensor")
    assert query.addressable_shards[0].data.shape == (32, 2, config.model.head_dim)


def test_gpt2_tensors_are_found_without_the_transformer_prefix_too(hf_dirs, tmp_path):
    """save_pretrained writes transformer.h.0...; the original OpenAI GPT-2 checkpoints have h.0... bare."""
    hf, saved = hf_dirs["gpt2"]
    model_dir = str(tmp_path / "model")
    shutil.copytree(saved, model_dir)
    path = os.path.join(model_dir, safetensors_files.SINGLE_FILE)
    tensors = load_numpy(path)
    assert all(name.startswith("transformer.") for name in tensors)
    save_numpy({name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}, path)
    model = restored_model(importer.import_hf(model_dir, str(tmp_path / "run")))
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, TOKENS))
    np.testing.assert_allclose(ours, transformers_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_the_reader_gives_safetensors_values_in_bfloat16_too(tmp_path):
    model_dir = save_hf(hf_model("llama").to(torch.bfloat16), tmp_path)
    expected = load_torch(os.path.join(model_dir, safetensors_files.SINGLE_FILE))
    ours = safetensors_files.open_tensors(model_dir, sorted(expected))
    for name, tensor in expected.items():
        assert ours[name].dtype.name == "bfloat16"
        np.testing.assert_array_equal(ours[name].astype(np.float32), tensor.float().numpy(), err_msg=name)


def test_a_bfloat16_checkpoint_imports_as_a_bfloat16_run(tmp_path):
    hf = hf_model("llama").to(torch.bfloat16)
    run_dir = importer.import_hf(save_hf(hf, tmp_path / "model"), str(tmp_path / "run"), dtype="bfloat16")
    model = restored_model(run_dir)
    assert directory.load_config(run_dir).model.param_dtype == "bfloat16"
    assert model.embed.embedding.value.dtype == jax.numpy.bfloat16
    expected = hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.blocks[1].mlp.down.kernel.value, np.float32), expected)


def test_tokenizer_files_are_copied_unchanged(hf_dirs, tmp_path):
    model_dir = str(tmp_path / "model")
    shutil.copytree(hf_dirs["llama"][1], model_dir)
    files = {"tokenizer.json": '{"version": "1.0"}', "chat_template.jinja": "{{ messages }}", "README.md": "not copied"}
    for name, text in files.items():
        with open(os.path.join(model_dir, name), "w") as f:
            f.write(text)
    run_dir = importer.import_hf(model_dir, str(tmp_path / "run"))
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert open(os.path.join(run_dir, name), "rb").read() == open(os.path.join(model_dir, name), "rb").read()
    assert not os.path.exists(os.path.join(run_dir, "README.md"))


def edited_config(source_dir, target, **changes) -> str:
    """A copy of a saved HF model directory with some config.json keys set to other values."""
    shutil.copytree(source_dir, target)
    path = os.path.join(target, "config.json")
    with open(path) as f:
        hf_config = json.load(f)
    hf_config.update(changes)
    with open(path, "w") as f:
        json.dump(hf_config, f)
    return str(target)


@pytest.mark.parametrize(
    "kind, changes, message",
    [
        ("llama", dict(architectures=["GPTNeoXForCausalLM"]), "architectures=['GPTNeoXForCausalLM']"),
        ("llama", dict(architectures=["GPT2LMHeadModel"]), "this GPT2LMHeadModel lacks the key 'n_embd'"),
        ("llama", dict(auto_map={"AutoModel": "x.Y"}), "remote code"),
        ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters.rope_type='yarn'"),
        ("llama", dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling.rope_type='dynamic'"),
        ("llama", dict(rope_parameters={"rope_type": "longrope"}), "rope_parameters.rope_type='longrope'"),
        ("llama", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "lacks ['low_freq_factor', 'high"),
        ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        ("llama", dict(attention_bias=True), "attention_bias=True"),
        ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
        ("mistral", dict(sliding_window=16), "sliding_window=16"),
        ("qwen2", dict(use_sliding_window=True), "use_sliding_window=True"),
        ("qwen3", dict(attention_bias=True), "attention_bias=True"),
        ("qwen3", dict(use_sliding_window=True), "use_sliding_window=True"),
        ("qwen3", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types contains ['sliding_att"),
        ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn'"),
        ("gpt2", dict(activation_function="relu"), "activation_function='relu'"),
        ("gpt2", dict(activation_function="gelu"), "activation_function='gelu'"),  # exact erf GELU
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
        ("gpt2", dict(scale_attn_weights=False), "scale_attn_weights=False"),
        ("gpt2", dict(add_cross_attention=True), "add_cross_attention=True"),
    ],
)
def test_unsupported_configs_are_refused_by_name_before_any_weight(kind, changes, message, hf_dirs, tmp_path):
    model_dir = edited_config(hf_dirs[kind][1], tmp_path / "model", **changes)
    os.remove(os.path.join(model_dir, safetensors_files.SINGLE_FILE))  # Refused before the weights are looked at.
    with pytest.raises(architectures.UnsupportedCheckpoint, match=message.replace("[", r"\[").replace("(", r"\(")):
        importer.import_hf(model_dir, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "run.importing")


def test_a_missing_shard_is_named(sharded_qwen2, tmp_path):
    model_dir = str(tmp_path / "model")
    shutil.copytree(sharded_qwen2, model_dir)
    with open(os.path.join(model_dir, safetensors_files.INDEX_FILE)) as f:
        last_shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(model_dir, last_shard))
    with pytest.raises(FileNotFoundError, match=f"Shard '{last_shard}' is missing"):
        importer.import_hf(model_dir, str(tmp_path / "run"))


def test_a_missing_tensor_and_a_wrong_shape_are_named(hf_dirs, tmp_path):
    model_dir = str(tmp_path / "model")
    shutil.copytree(hf_dirs["llama"][1], model_dir)
    path = os.path.join(model_dir, safetensors_files.SINGLE_FILE)
    tensors = load_numpy(path)
    name = "model.layers.1.mlp.up_proj.weight"
    save_numpy({**tensors, name: tensors[name][:, :32].copy()}, path)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(128, 32\), expected"):
        importer.import_hf(model_dir, str(tmp_path / "run"))
    save_numpy({key: value for key, value in tensors.items() if key != "lm_head.weight"}, path)
    with pytest.raises(KeyError, match="no tensor 'lm_head.weight'"):
        importer.import_hf(model_dir, str(tmp_path / "run"))


def test_output_is_replaced_only_when_asked_and_only_if_a_run(hf_dirs, tmp_path):
    model_dir, run_dir = hf_dirs["llama_tied"][1], str(tmp_path / "run")
    importer.import_hf(model_dir, run_dir)
    with pytest.raises(FileExistsError, match="already exists"):
        importer.import_hf(model_dir, run_dir)
    assert importer.import_hf(model_dir, run_dir, overwrite=True) == run_dir
    (tmp_path / "precious").mkdir()
    with pytest.raises(FileExistsError, match="not a run directory"):
        importer.import_hf(model_dir, str(tmp_path / "precious"), overwrite=True)


def test_qkv_bias_adds_biases_to_query_key_value_only():
    def params(**overrides):
        model = nnx.eval_shape(lambda: create_model(tiny_config(**overrides)))
        return {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    added = params(model__qkv_bias=True) - params()
    assert added == {f"blocks.{i}.attention.{p}.bias" for i in range(2) for p in ("query", "key", "value")}


def test_import_script(hf_dirs, tmp_path):
    model_dir, run_dir = hf_dirs["qwen2"][1], str(tmp_path / "run")
    refused = run_script("import_hf.py", f"--model_dir={model_dir}", f"--output={run_dir}")
    assert refused.returncode != 0 and "tokenizer.json' not found" in refused.stderr and not os.path.exists(run_dir)
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only the slow tokenizer.model"):
        importer.check_tokenizer(str(tmp_path / "slow"))
    flags = (f"--model_dir={model_dir}", f"--output={run_dir}", "--scan_layers", "--weights_only")
    result = run_script("import_hf.py", *flags)
    assert result.returncode == 0, result.stderr
    assert "2 layers, embed 64, 4/2 heads, vocab 160" in result.stdout
    assert directory.load_config(run_dir).model.qkv_bias and directory.load_config(run_dir).model.scan_layers
    missing = run_script("import_hf.py", f"--model_dir={tmp_path}", f"--output={tmp_path / 'other'}")
    assert missing.returncode != 0 and "config.json' not found" in missing.stderr


def test_an_imported_run_is_an_init_from_for_training(hf_dirs, data_dir, tmp_path):
    from llm.train import loop

    run_dir = importer.import_hf(hf_dirs["qwen2"][1], str(tmp_path / "run"))
    config = directory.load_config(run_dir)
    config.init_from, config.data.path, config.data.seq_len = run_dir, data_dir, 32  # conftest's rows: 32 tokens
    config.train.update(num_steps=2, batch_size=8, log_every=1, eval_every=0, checkpoint_every=2)
    config.optimizer.update(warmup_steps=1)
    result = loop.train(config, str(tmp_path / "finetuned"))
    assert result.steps_run == 2 and np.isfinite(result.metrics["loss"])


class _RecordingArray(np.ndarray):
    """A checkpoint tensor that records how many elements each read of it takes."""

    def __getitem__(self, index):
        block = np.ndarray.__getitem__(self, index)
        self.reads.append(block.size)
        return block.view(np.ndarray)


def test_each_device_reads_only_its_own_block(hf_dirs, monkeypatch):
    model_dir = hf_dirs["llama"][1]
    opened, open_tensors = {}, safetensors_files.open_tensors

    def recording(path, names):
        for name, tensor in open_tensors(path, names).items():
            opened[name] = tensor.view(_RecordingArray)
            opened[name].reads = []
        return opened

    monkeypatch.setattr(safetensors_files, "open_tensors", recording)
    config = importer.run_config(importer.read_hf_config(model_dir))
    weights.load_model(model_dir, "LlamaForCausalLM", config, sharding.create_mesh((2, 2, 2)))
    # q_proj (heads x embed) is split 2 ways over heads (tensor) and 2 over embed (fsdp): 8 reads of a quarter.
    query = opened["model.layers.0.self_attn.q_proj.weight"]
    assert query.reads == [query.size // 4] * 8
    # lm_head: vocab over tensor, embed over fsdp. The norms are replicated: JAX asks once for a block that
    # several devices share.
    assert opened["lm_head.weight"].reads == [opened["lm_head.weight"].size // 4] * 8
    assert opened["model.norm.weight"].reads == [64]
