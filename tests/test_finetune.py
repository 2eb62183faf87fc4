"""Fine-tuning through the one trainer: LoRA, full fine-tuning from a checkpoint, DPO, continued pretraining
with replay. Only trainable parameters change and carry optimizer state; adapters merge exactly; each mode
resumes bit-exactly after a crash."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    crash_then_resume,
    finetune_config,
    forward,
    metrics_entries,
    pattern_rows,
    record_batches,
    saved_state,
)
from flax import nnx

from llm import checkpoint
from llm.data import records
from llm.model.transformer import create_model
from llm.runs import build, loading
from llm.train import loop, losses


def _lora_config(trained_run, **train):
    config = finetune_config(trained_run, trainable="lora", **train)
    config.model.update(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets="attention/(query|value)|mlp/down")
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
    return config


def _qlora_config(trained_run, **train):
    return _lora_config(trained_run, quantize_base="int4", quantize_group_size=16, **train)


@pytest.fixture(scope="module")
def lora_run(trained_run, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora"))
    loop.train(_lora_config(trained_run), workdir)
    return workdir


@pytest.fixture(scope="module")
def qlora_run(trained_run, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("qlora"))
    loop.train(_qlora_config(trained_run), workdir)
    return workdir


def test_lora_trains_only_the_adapters_and_only_they_have_optimizer_state(trained_run, lora_run):
    config = _lora_config(trained_run)
    state = saved_state(config, lora_run)
    names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    assert names and all("_lora" in name for name in names)
    assert any("query_lora" in n for n in names) and any("down_lora" in n for n in names)
    assert not any("key_lora" in n for n in names)  # not matched by lora_targets
    moment_leaves = jax.tree.leaves(state["opt_state"][1][0].mu)
    assert sum(x.size for x in moment_leaves) == sum(x.size for x in jax.tree.leaves(state["params"]))
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(state["params"]))  # B moved off zero
    evals = [e for e in metrics_entries(lora_run) if "eval_loss" in e]
    assert evals[0]["step"] == 0  # the "before" evaluation
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_merged_adapters_equal_unmerged(trained_run, lora_run):
    config = _lora_config(trained_run)
    adapted = create_model(config)
    graphdef, _, rest = nnx.split(adapted, nnx.LoRAParam, ...)
    base, _ = checkpoint.restore_run_params(trained_run, nnx.eval_shape(lambda: rest))
    adapters = saved_state(config, lora_run)["params"]
    adapted = nnx.merge(graphdef, adapters, base)
    merged = loading.load_run(lora_run).model  # loads base + adapters and merges them
    assert merged.cfg.lora_rank == 0
    tokens = jnp.array([[2, 40, 41, 77, 90, 13, 5]])
    np.testing.assert_allclose(forward(merged, tokens), forward(adapted, tokens), atol=1e-5)
    assert not np.allclose(forward(merged, tokens), forward(loading.load_run(trained_run).model, tokens))


def test_qlora_trains_float_adapters_on_an_int4_base(trained_run, qlora_run):
    config = _qlora_config(trained_run)
    state = saved_state(config, qlora_run)
    trained = jax.tree.leaves(state["params"])
    assert trained and {x.dtype for x in trained} == {jnp.dtype("float32")}
    assert sum(x.size for x in jax.tree.leaves(state["opt_state"][1][0].mu)) == sum(x.size for x in trained)
    frozen = nnx.state(nnx.eval_shape(lambda: build.trained_model(config, None)), nnx.Not(nnx.LoRAParam))
    kernels = {path: x.dtype for path, x in nnx.to_flat_state(frozen) if path[-1] == "qvalue"}
    assert len(kernels) == 2 * 7 + 1  # every projection of both blocks, and the (tied) embedding table
    assert set(kernels.values()) == {jnp.dtype("int4")}
    evals = [e["eval_loss"] for e in metrics_entries(qlora_run) if "eval_loss" in e]
    assert evals[-1] < evals[0]


def test_qlora_adapters_merge_into_the_dequantized_base(trained_run, qlora_run):
    config = _qlora_config(trained_run)
    abstract_base = nnx.state(nnx.eval_shape(lambda: create_model(build.base_config(config))), nnx.Param)
    base, _ = checkpoint.restore_run_params(trained_run, abstract_base)
    graphdef, _, quantized_base = nnx.split(build.trained_model(config, base), nnx.LoRAParam, ...)
    adapted = nnx.merge(graphdef, saved_state(config, qlora_run)["params"], quantized_base)
    merged = loading.load_run(qlora_run).model
    assert merged.cfg.lora_rank == 0
    assert {x.dtype for x in jax.tree.leaves(nnx.state(merged))} == {jnp.dtype("float32")}
    tokens = jnp.array([[2, 40, 41, 77, 90, 13, 5]])
    np.testing.assert_allclose(forward(merged, tokens), forward(adapted, tokens), atol=1e-4)


@pytest.mark.parametrize("make_config", [_lora_config, _qlora_config], ids=["lora", "qlora"])
def test_lora_resumes_bit_exactly_after_a_crash(trained_run, make_config, request, tmp_path, monkeypatch):
    config = make_config(trained_run)
    run = request.getfixturevalue("lora_run" if make_config is _lora_config else "qlora_run")
    resumed, saved, trained = crash_then_resume(config, str(tmp_path), monkeypatch, batches=6)
    # It crashed during step 7: the last checkpoint is step 4 (checkpoint_every=4), and the second run must
    # start there, not from scratch (Orbax would silently skip re-saving steps it has).
    assert saved == 4 and resumed.start_step == 4
    assert resumed.steps_run == trained == 12 - 4
    want, got = saved_state(config, run), saved_state(config, str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, want, got)
    strip = lambda entries: [{k: v for k, v in e.items() if k not in ("tokens_per_sec", "mfu")} for e in entries]
    assert strip(metrics_entries(tmp_path)) == strip(metrics_entries(run))


def test_full_fine_tuning_starts_from_the_checkpoint(trained_run, tmp_path):
    config = finetune_config(trained_run, num_steps=6, checkpoint_every=6)
    loop.train(config, str(tmp_path))
    entries = metrics_entries(tmp_path)
    pretrained_final = [e for e in metrics_entries(trained_run) if "eval_loss" in e][-1]["eval_loss"]
    assert entries[0]["step"] == 0 and entries[0]["eval_loss"] == pytest.approx(pretrained_final, rel=1e-5)


def test_dpo_loss_equals_the_hand_computed_value():
    policy_chosen, policy_rejected = jnp.array([-4.0]), jnp.array([-6.0])
    reference_chosen, reference_rejected = jnp.array([-5.0]), jnp.array([-5.5])
    beta, smoothing = 0.5, 0.1
    margin = beta * ((-4.0 + 5.0) - (-6.0 + 5.5))  # 0.75
    expected = -(1 - smoothing) * np.log(1 / (1 + np.exp(-margin))) - smoothing * np.log(1 / (1 + np.exp(margin)))
    result = losses.dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, smoothing)
    assert float(result["loss"][0]) == pytest.approx(expected, rel=1e-6)
    assert float(result["reward_margin"][0]) == pytest.approx(margin)
    assert float(result["reward_accuracy"][0]) == 1.0


def _pair_rows(seq_len, count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        prompt = [2] + rng.integers(10, 100, 6).tolist()
        rows = []
        for response in ([50, 51, 52, 53, 3], rng.integers(100, 200, 5).tolist() + [3]):
            tokens = prompt + response
            row = {
                "tokens": np.zeros(seq_len, int),
                "segment_ids": np.zeros(seq_len, int),
                "positions": np.zeros(seq_len, int),
                "loss_mask": np.zeros(seq_len, int),
            }
            row["tokens"][: len(tokens)], row["segment_ids"][: len(tokens)] = tokens, 1
            row["positions"][: len(tokens)] = np.arange(len(tokens))
            row["loss_mask"][len(prompt) : len(tokens)] = 1
            rows.append(row)
        yield rows


def test_dpo_learns_the_preference_and_resumes_bit_exactly(trained_run, tmp_path, monkeypatch):
    data = tmp_path / "pairs"
    for split, count, seed in (("train", 64, 0), ("validation", 8, 1)):
        records.write_shards(
            _pair_rows(32, count, seed), str(data / split), 1, encode=lambda p: records.encode_pair(*p)
        )
    config = finetune_config(trained_run, objective="dpo", dpo_beta=0.5, eval_batches=1)
    config.data.path = str(data)
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
    uninterrupted = tmp_path / "uninterrupted"
    loop.train(config, str(uninterrupted))
    entries = [e for e in metrics_entries(uninterrupted) if "reward_accuracy" in e]
    assert entries[-1]["reward_margin"] > entries[0]["reward_margin"]
    assert entries[-1]["reward_accuracy"] >= 0.75
    assert {"eval_loss", "eval_reward_accuracy", "eval_reward_margin"} <= set(metrics_entries(uninterrupted)[-1])

    resumed, saved, trained = crash_then_resume(config, str(tmp_path / "crashed"), monkeypatch, batches=5)
    assert saved == 4 and resumed.start_step == 4  # the last checkpoint before the crash during step 6
    assert resumed.steps_run == trained == 12 - 4
    jax.tree.map(
        np.testing.assert_array_equal,
        saved_state(config, str(uninterrupted)),
        saved_state(config, str(tmp_path / "crashed")),
    )


def _token_range_dataset(path, low, high):
    """Packed rows (conftest.pattern_rows) whose token ids all lie in [low + 4, high)."""
    for split, rows, seed in (("train", 64, 0), ("validation", 16, 1)):
        shifted = ({**row, "tokens": row["tokens"] + low} for row in pattern_rows(rows, 32, high - low, seed))
        records.write_shards(shifted, str(path / split), 1)
    return str(path)


def test_continued_pretraining_mixes_in_replay_and_reports_the_old_validation_loss(trained_run, tmp_path, monkeypatch):
    config = finetune_config(trained_run, num_steps=6, checkpoint_every=6)
    # New and replay rows from disjoint token ranges: every drawn row tells which corpus it came from.
    half = config.model.vocab_size // 2
    new_data, replay_data = (
        _token_range_dataset(tmp_path / "new", 0, half),
        _token_range_dataset(tmp_path / "old", half, 2 * half),
    )
    config.data.update(path=new_data, replay_path=replay_data, replay_fraction=0.25)
    drawn = record_batches(monkeypatch)
    loop.train(config, str(tmp_path / "run"))
    rows = np.concatenate([batch["tokens"] for batch in drawn])
    from_replay, from_new = (rows >= half).all(axis=1), (rows < half).all(axis=1)
    assert len(rows) == 6 * 8 and (from_replay ^ from_new).all()
    assert from_replay.mean() == pytest.approx(0.25, abs=0.05)
    first, last = metrics_entries(tmp_path / "run")[0], metrics_entries(tmp_path / "run")[-1]
    assert {"eval_loss", "replay_eval_loss"} <= set(first) and {"eval_loss", "replay_eval_loss"} <= set(last)
    assert first["step"] == 0
    for entry in (first, last):
        assert entry["replay_eval_loss"] != pytest.approx(entry["eval_loss"], rel=1e-3)


def test_lora_config_without_rank_and_dpo_without_init_from_are_refused(trained_run):
    from llm import config_validation

    config = finetune_config(trained_run, trainable="lora")
    with pytest.raises(config_validation.ConfigError, match="lora_rank > 0"):
        config_validation.validate(config)
    config = finetune_config(trained_run, objective="dpo")
    config.init_from = ""
    with pytest.raises(config_validation.ConfigError, match="needs config.init_from"):
        config_validation.validate(config)
    config = finetune_config(trained_run, quantize_base="int4")
    with pytest.raises(config_validation.ConfigError, match="needs config.train.trainable='lora' \\(QLoRA\\)"):
        config_validation.validate(config)


def test_merge_lora_script_writes_a_standalone_run(lora_run, tmp_path):
    import subprocess
    import sys

    output = tmp_path / "merged"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "merge_lora.py")
    result = subprocess.run(
        [sys.executable, script, f"--workdir={lora_run}", f"--output={output}"],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    tokens = jnp.array([[2, 40, 41, 77, 90, 13, 5]])
    np.testing.assert_allclose(
        forward(loading.load_run(str(output)).model, tokens),
        forward(loading.load_run(lora_run).model, tokens),
        atol=1e-6,
    )
