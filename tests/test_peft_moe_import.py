"""PEFT adapters of mixtures of experts imported as LoRA runs (llm/hf/peft_import.py): our own export read back
bit for bit (per-expert names), adapters PEFT itself saves for transformers 5's fused experts (target_parameters)
giving PeftModel's logits, and bad files refused naming the tensor."""

import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import run_script
from flax import nnx
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from test_hf_export import ATOL, our_config, our_logits, peft_adapter, save_lora_run, their_logits
from test_hf_moe import EXPERT_LORA, RUNS, hf_model
from transformers import AutoModelForCausalLM

from llm import checkpoint
from llm.hf import importer, peft_adapters, peft_import
from llm.runs import directory, loading


def lora_params(run_dir: str) -> dict:
    """Path -> array of the LoRA parameters in a LoRA run's checkpoint."""
    abstract = peft_adapters._abstract_adapters(directory.load_config(run_dir))
    params, _ = checkpoint.restore_run_params(run_dir, abstract)
    return {path: np.asarray(variable.value) for path, variable in nnx.to_flat_state(params)}


@pytest.mark.parametrize(
    "kind, lora_keys",
    [
        ("mixtral", EXPERT_LORA),
        ("mixtral_scanned", EXPERT_LORA),
        ("qwen3_moe", EXPERT_LORA),
        # A dense and an MoE layer in two scanned stacks (MLP adapters of such a model do not export).
        ("qwen3_moe_every2_scanned", dict(EXPERT_LORA, lora_targets="attention/(query|out)")),
    ],
)
def test_an_exported_moe_lora_run_imports_back_bit_for_bit(kind, lora_keys, tokenizer, tmp_path):
    model_keys, _ = RUNS[kind]
    make_config = lambda tok, **keys: our_config(tok, **model_keys, **keys)
    base_dir, lora_dir, model = save_lora_run(tmp_path, make_config, tokenizer, **lora_keys)
    out = peft_adapters.export_adapter(lora_dir, str(tmp_path / "adapter"))
    back = peft_import.import_adapter(out, base_dir, str(tmp_path / "back"))
    ours = {path: np.asarray(variable.value) for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    theirs = lora_params(back)
    assert set(theirs) == set(ours)
    for path, value in ours.items():
        np.testing.assert_array_equal(theirs[path], value, err_msg=str(path))
    np.testing.assert_allclose(our_logits(loading.load_run(back).model), our_logits(model), atol=ATOL, rtol=0)


def peft_moe_adapter(hf, path, **settings) -> tuple[torch.nn.Module, str]:
    """`hf` wrapped by peft with random adapters (lora_B too) on q_proj and v_proj unless `settings` say
    otherwise, saved to `path`."""
    defaults = {
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
    }  # ParamWrapper: no dropout
    return peft_adapter(hf, path, **{**defaults, **settings})


@pytest.mark.parametrize(
    "kind, scan, target_parameters, lora_targets",
    [
        ("mixtral", False, ["gate_up_proj", "down_proj"], "attention/query|attention/value|mlp/down|mlp/gate|mlp/up"),
        ("mixtral", True, ["down_proj"], "attention/query|attention/value|mlp/down"),
        ("qwen3_moe", True, ["mlp.experts.gate_up_proj"], "attention/query|attention/value|mlp/gate|mlp/up"),
        ("qwen3_moe", False, ["experts.gate_up_proj", "down_proj"], None),
    ],
)
def test_a_peft_adapter_of_fused_experts_imports_with_peft_logits(kind, scan, target_parameters, lora_targets,
                                                                  tmp_path):  # fmt: skip
    """PEFT adapts transformers 5's 3-D expert parameters through target_parameters: one adapter per parameter."""
    hf = hf_model(kind)
    hf.save_pretrained(str(tmp_path / "hf"))
    base_run = importer.import_hf(str(tmp_path / "hf"), str(tmp_path / "base"), scan_layers=scan)
    base_logits = their_logits(hf)
    peft_model, adapter_dir = peft_moe_adapter(hf, tmp_path / "adapter", target_parameters=target_parameters)
    lora_dir = peft_import.import_adapter(adapter_dir, base_run, str(tmp_path / "imported"))
    config = directory.load_config(lora_dir)
    assert lora_targets is None or config.model.lora_targets == lora_targets
    theirs = their_logits(peft_model)
    np.testing.assert_allclose(our_logits(loading.load_model(lora_dir)[0]), theirs, atol=ATOL, rtol=0)
    assert np.abs(base_logits - theirs).max() > 1e-2  # The adapters matter.


@pytest.fixture
def mixtral_adapter(tokenizer, tmp_path):
    """(base run, the PEFT export of a LoRA run on it adapting attention and experts) of an unscanned Mixtral."""
    make_config = lambda tok, **keys: our_config(tok, **RUNS["mixtral"][0], **keys)
    base_dir, lora_dir, _ = save_lora_run(tmp_path, make_config, tokenizer, **EXPERT_LORA)
    return base_dir, peft_adapters.export_adapter(lora_dir, str(tmp_path / "adapter"))


EXPERT_B = "base_model.model.model.layers.1.block_sparse_moe.experts.2.w3.lora_B.weight"


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda t: t.pop(EXPERT_B), KeyError, f"has no tensor '{EXPERT_B}'"),
        (lambda t: t.update({EXPERT_B: t[EXPERT_B][:-1]}), ValueError, f"Tensor '{EXPERT_B}' .* has shape \\(47, 4\\)"),
        (
            lambda t: t.update({EXPERT_B.replace("experts.2", "experts.4"): t[EXPERT_B]}),
            peft_import.UnsupportedAdapter,
            "holds 1 tensors no adapter of ours takes, e.g. '" + re.escape(EXPERT_B.replace("experts.2", "experts.4")),
        ),
    ],
    ids=["missing", "misshaped", "extra"],
)
def test_a_missing_misshaped_or_extra_expert_tensor_is_refused_by_name(edit, error, message, mixtral_adapter,
                                                                       tmp_path):  # fmt: skip
    base_dir, adapter_dir = mixtral_adapter
    file = os.path.join(adapter_dir, peft_adapters.ADAPTER_FILE)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    with pytest.raises(error, match=message):
        peft_import.import_adapter(adapter_dir, base_dir, str(tmp_path / "imported"))
    assert not os.path.exists(tmp_path / "imported")


def test_a_misshaped_fused_expert_tensor_is_refused_by_name(tmp_path):
    hf = hf_model("mixtral")
    hf.save_pretrained(str(tmp_path / "hf"))
    base_run = importer.import_hf(str(tmp_path / "hf"), str(tmp_path / "base"))
    _, adapter_dir = peft_moe_adapter(hf, tmp_path / "adapter", target_parameters=["gate_up_proj", "down_proj"])
    file = os.path.join(adapter_dir, peft_adapters.ADAPTER_FILE)
    tensors = load_file(file)
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"  # gate_up_proj's, (2 * 128, 4 * 4)
    tensors[key] = tensors[key][:128]
    save_file(tensors, file)
    message = f"Tensor '{key}' in {file} has shape (128, 16), expected (256, 16)"
    with pytest.raises(ValueError, match=re.escape(message)):
        peft_import.import_adapter(adapter_dir, base_run, str(tmp_path / "imported"))


def test_an_adapter_peft_converted_to_fused_experts_is_refused_by_its_rank_pattern(mixtral_adapter, tmp_path):
    """PEFT loads per-expert adapters onto the fused gate_up_proj as one of rank 2r (block-diagonal): saved again,
    it has a rank_pattern, which one lora_rank cannot express."""
    base_dir, adapter_dir = mixtral_adapter
    base = AutoModelForCausalLM.from_pretrained(os.path.join(adapter_dir, "base"))
    PeftModel.from_pretrained(base, adapter_dir).save_pretrained(str(tmp_path / "resaved"))
    with open(tmp_path / "resaved" / "adapter_config.json") as f:
        assert sorted(json.load(f)["target_parameters"]) == ["down_proj", "gate_up_proj"]
    with pytest.raises(peft_import.UnsupportedAdapter, match=r"rank_pattern=\{'.*gate_up_proj': 8\}"):
        peft_import.import_adapter(str(tmp_path / "resaved"), base_dir, str(tmp_path / "imported"))


@pytest.mark.parametrize(
    "target_parameters, message",
    [
        (["layers.0.mlp.experts.gate_up_proj"], r"\['layers.0.mlp.experts.gate_up_proj'\] name no fused expert"),
        (["gate.weight"], r"\['gate.weight'\] name no fused expert parameter of every layer of a MixtralForCausalLM"),
    ],
)
def test_target_parameters_we_cannot_read_are_refused_by_key(target_parameters, message, mixtral_adapter, tmp_path):
    base_dir, adapter_dir = mixtral_adapter
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        settings = json.load(f)
    with open(path, "w") as f:
        json.dump({**settings, "target_parameters": target_parameters}, f)
    with pytest.raises(peft_import.UnsupportedAdapter, match=r"target_parameters=.*" + message):
        peft_import.import_adapter(adapter_dir, base_dir, str(tmp_path / "imported"))


def test_import_peft_script_imports_a_moe_adapter(mixtral_adapter, tmp_path):
    base_dir, adapter_dir = mixtral_adapter
    out = tmp_path / "imported"
    done = run_script("import_peft.py", f"--adapter_dir={adapter_dir}", f"--base_run={base_dir}", f"--output={out}")
    assert done.returncode == 0, done.stderr
    assert "targets 'attention/query|attention/value|mlp/down|mlp/gate|mlp/up'" in done.stdout
    assert set(lora_params(str(out))) == set(lora_params(str(tmp_path / "lora")))
