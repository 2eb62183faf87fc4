"""Hugging Face interop of mixtures of experts: tiny random MixtralForCausalLM and Qwen3MoeForCausalLM models built
with transformers, imported (logits and greedy generation equal to transformers'), runs of ours exported and loaded
by transformers (logits equal to ours), and the settings we cannot honour refused by name."""

import json
import os
import re

import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from test_hf_export import ATOL, our_config, our_logits, save_lora_run, save_our_run, their_logits
from test_hf_import import SIZES as DENSE_SIZES, TOKENS, randomized, restored_model, transformers_logits
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from llm.hf import architectures, exporter, importer, peft_adapters
from llm.infer import generate
from llm.runs import directory

SIZES = dict(DENSE_SIZES, num_experts_per_tok=2, tie_word_embeddings=False)  # the dense tests' sizes, top-2
QWEN3_MOE = dict(SIZES, num_experts=4, moe_intermediate_size=48, norm_topk_prob=True, head_dim=24)
# kind -> (model class, config class, config keys)
MODELS = {
    "mixtral": (MixtralForCausalLM, MixtralConfig, dict(SIZES, num_local_experts=4, router_aux_loss_coef=0.02)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig, QWEN3_MOE),
    # Layer 0 a dense MLP of intermediate_size, layer 1 experts of moe_intermediate_size.
    "qwen3_moe_step2": (Qwen3MoeForCausalLM, Qwen3MoeConfig, dict(QWEN3_MOE, decoder_sparse_step=2)),
}


def hf_model(kind: str, **overrides):
    """A tiny transformers model of `kind` whose every weight (router and norm scales included) is randomized."""
    model_class, config_class, keys = MODELS[kind]
    return randomized(lambda: model_class(config_class(**{**keys, **overrides})))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """kind -> (transformers model, its saved directory)."""
    dirs = {}
    for kind in MODELS:
        model, path = hf_model(kind), str(tmp_path_factory.mktemp(kind))
        model.save_pretrained(path)
        dirs[kind] = (model, path)
    return dirs


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory):
    """(kind, scan_layers) -> the run directory it was imported into, experts split over 2 fsdp devices."""
    return {
        (kind, scan): importer.import_hf(
            model_dir, str(tmp_path_factory.mktemp(kind) / "run"), mesh_shape=(2, 2, 2), scan_layers=scan
        )
        for kind, (_, model_dir) in hf_dirs.items()
        for scan in (False, True)
    }


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("kind", list(MODELS))
def test_imported_logits_equal_transformers(kind, scan, hf_dirs, imported):
    hf, _ = hf_dirs[kind]
    model = restored_model(imported[kind, scan])
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, TOKENS))
    np.testing.assert_allclose(ours, transformers_logits(hf, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_imported_runs_generate_the_greedy_continuation_of_transformers(kind, hf_dirs, imported):
    hf, _ = hf_dirs[kind]
    prompts = [TOKENS[0, :11].tolist(), TOKENS[1].tolist()]
    eos = hf.generation_config.eos_token_id
    ours = generate.Generator(restored_model(imported[kind, False])).generate(
        prompts, 24, stop_token_ids=() if eos is None else (eos,)
    )
    for prompt, row in zip(prompts, ours):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
        if eos in theirs:
            theirs = theirs[: theirs.index(eos)]
        assert len(row) >= 8 and row == theirs


@pytest.mark.parametrize(
    "kind, expected",
    [
        # Aux-loss coefficient: transformers' 0.02 * k=2 / 2 MoE layers (see architectures._moe_keys).
        ("mixtral", dict(num_experts=4, experts_per_token=2, moe_every=1, moe_mlp_dim=128, router_aux_loss_coef=0.02)),
        ("qwen3_moe", dict(num_experts=4, moe_mlp_dim=48, mlp_dim=128, qk_norm=True, router_aux_loss_coef=0.001)),
        ("qwen3_moe_step2", dict(moe_every=2, router_aux_loss_coef=0.002, router_z_loss_coef=0.0)),
    ],
)
def test_converted_moe_keys(kind, expected, hf_dirs):
    model = importer.run_config(importer.read_hf_config(hf_dirs[kind][1])).model
    assert {key: model[key] for key in expected} == pytest.approx(expected)


def test_qwen_checkpoints_naming_num_experts_import():
    """Qwen's own config.json files say num_experts (transformers 5 writes num_local_experts)."""
    hf = {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8, "num_experts_per_tok": 2}
    hf.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, vocab_size=100)
    hf.update(num_attention_heads=4, max_position_embeddings=64, norm_topk_prob=True)
    assert architectures.model_keys(hf)["num_experts"] == 8


@pytest.mark.parametrize(
    "kind, changes, reason",
    [
        ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob=False (only true is supported)"),
        ("qwen3_moe", dict(mlp_only_layers=[0]), "mlp_only_layers=[0] (only [] is supported)"),
        ("qwen3_moe", dict(decoder_sparse_step=3), "decoder_sparse_step=3 does not divide num_hidden_layers=2"),
        ("mixtral", dict(sliding_window=16), "sliding_window=16 is smaller than max_position_embeddings=64"),
    ],
)
def test_unsupported_moe_settings_are_refused_by_name(kind, changes, reason, hf_dirs, tmp_path):
    with open(os.path.join(hf_dirs[kind][1], "config.json")) as f:
        hf = {**json.load(f), **changes}
    with pytest.raises(architectures.UnsupportedCheckpoint, match=re.escape(reason)):
        architectures.model_keys(hf)


MOE = dict(num_experts=4, experts_per_token=2, moe_mlp_dim=48)
# kind -> (our model keys, the architecture it exports as)
RUNS = {
    "mixtral": (MOE, "MixtralForCausalLM"),
    "mixtral_scanned": (dict(MOE, scan_layers=True), "MixtralForCausalLM"),
    "qwen3_moe": (dict(MOE, qk_norm=True, head_dim=24), "Qwen3MoeForCausalLM"),
    # Layer 0 dense, layer 1 MoE, in two scanned stacks.
    "qwen3_moe_every2_scanned": (dict(MOE, qk_norm=True, moe_every=2, scan_layers=True), "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("kind", list(RUNS))
def test_exported_moe_run_gives_our_logits_in_transformers(kind, tokenizer, tmp_path):
    model_keys, architecture = RUNS[kind]
    config = our_config(tokenizer, **model_keys)
    run_dir, model = save_our_run(tmp_path / "run", config, tokenizer)
    out = exporter.export_run(run_dir, str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == architecture
    np.testing.assert_allclose(their_logits(hf), our_logits(model), atol=ATOL, rtol=0)
    # And back: the export imports as the run it came from (the aux-loss coefficient converted both ways).
    back = directory.load_config(importer.import_hf(out, str(tmp_path / "back"), scan_layers=config.model.scan_layers))
    for key in ("num_experts", "experts_per_token", "moe_every", "moe_mlp_dim", "router_aux_loss_coef"):
        assert back.model[key] == pytest.approx(config.model[key]), key


@pytest.mark.parametrize(
    "model_keys, reason",
    [
        (dict(MOE, num_shared_experts=1), "as MixtralForCausalLM: model.num_shared_experts=1"),
        (dict(MOE, moe_every=2), r"as MixtralForCausalLM: model.moe_every=2 \(every Mixtral layer"),
        (dict(MOE, qkv_bias=True), "model.qkv_bias=True"),
    ],
)
def test_moe_runs_without_an_hf_equivalent_are_refused_by_name(model_keys, reason, tokenizer):
    with pytest.raises(exporter.UnsupportedRun, match=reason):
        exporter.architecture(our_config(tokenizer, **model_keys))


EXPERT_LORA = dict(lora_rank=4, lora_alpha=8.0, lora_targets="attention/(query|value)|mlp/(gate|up|down)")


@pytest.mark.parametrize(
    "kind, lora_keys, targets",
    [
        ("mixtral", EXPERT_LORA, ["q_proj", "v_proj", "w1", "w2", "w3"]),
        ("mixtral_scanned", EXPERT_LORA, ["q_proj", "v_proj", "w1", "w2", "w3"]),
        ("qwen3_moe", EXPERT_LORA, ["down_proj", "gate_proj", "q_proj", "up_proj", "v_proj"]),
        # A dense layer and an MoE layer in two scanned stacks; attention adapters only (see the refusals below).
        ("qwen3_moe_every2_scanned", dict(EXPERT_LORA, lora_targets="attention/(query|out)"), ["o_proj", "q_proj"]),
    ],
)
def test_a_moe_lora_run_exports_as_a_peft_adapter_that_peft_applies_as_we_do(kind, lora_keys, targets, tokenizer,
                                                                             tmp_path):  # fmt: skip
    """Per-expert adapters under PEFT's per-expert names, which PEFT fuses as transformers 5 fuses the experts."""
    model_keys, _ = RUNS[kind]
    make_config = lambda tok, **keys: our_config(tok, **model_keys, **keys)
    _, lora_dir, model = save_lora_run(tmp_path, make_config, tokenizer, **lora_keys)
    out = peft_adapters.export_adapter(lora_dir, str(tmp_path / "adapter"))
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["target_modules"] == targets
    base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base")).eval()
    base_logits = their_logits(base)
    ours = our_logits(model)
    np.testing.assert_allclose(their_logits(PeftModel.from_pretrained(base, out).eval()), ours, atol=ATOL, rtol=0)
    assert np.abs(base_logits - ours).max() > 1e-2  # The adapters matter.


@pytest.mark.parametrize(
    "kind, lora_targets, reason",
    [
        ("mixtral", "mlp/(gate|down)", r"adapts \['mlp/gate'\] of the experts without \['mlp/up'\]: .* gate_up_proj"),
        ("qwen3_moe_every2_scanned", "mlp/down", r"the dense layers' \['mlp/down'\] beside the experts'"),
    ],
)
def test_moe_lora_runs_peft_cannot_load_are_refused_by_lora_targets(kind, lora_targets, reason, tokenizer, tmp_path):
    model_keys, _ = RUNS[kind]
    make_config = lambda tok, **keys: our_config(tok, **model_keys, **keys)
    _, lora_dir, _ = save_lora_run(tmp_path, make_config, tokenizer, lora_rank=4, lora_targets=lora_targets)
    with pytest.raises(exporter.UnsupportedRun, match=reason):
        peft_adapters.export_adapter(lora_dir, str(tmp_path / "adapter"))
    assert not os.path.exists(tmp_path / "adapter")
