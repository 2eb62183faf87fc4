"""The training loop: loss falls, metrics are written, a killed run resumes bit-exactly, NaN stops a run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, metrics_entries, one_device_steps, tiny_config
from flax import nnx

from llm import checkpoint, config_validation, sharding
from llm.model.transformer import REMAT_POLICIES, create_model
from llm.runs import directory
from llm.train import loop, losses, optimizer as optimizer_lib, start, step as step_lib

TRAIN_FLAGS = [
    "--config.model.vocab_size=128",
    "--config.model.max_seq_len=32",
    "--config.model.num_layers=2",
    "--config.model.embed_dim=32",
    "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2",
    "--config.model.mlp_dim=64",
    "--config.data.seq_len=32",
    "--config.train.batch_size=8",
    "--config.train.log_every=2",
    "--config.train.eval_every=10",
    "--config.train.eval_batches=2",
    "--config.train.checkpoint_every=5",
    "--config.optimizer.warmup_steps=2",
    "--config.model.dropout_rate=0.1",
]


def test_loss_falls_and_metrics_are_written(tmp_path, data_dir):
    config = tiny_config()
    config.data.path = data_dir
    config.train.num_steps = 40
    config.train.eval_every = 20
    result = loop.train(config, str(tmp_path))
    assert (result.start_step, result.steps_run) == (0, 40)
    entries = metrics_entries(tmp_path)
    train_entries = [e for e in entries if "loss" in e]
    assert train_entries[-1]["loss"] < 0.75 * train_entries[0]["loss"]
    for key in ("step", "loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"):
        assert key in train_entries[-1]
    evals = [e for e in entries if "eval_loss" in e]
    assert [e["step"] for e in evals] == [20, 40]
    assert evals[-1]["eval_perplexity"] == pytest.approx(np.exp(evals[-1]["eval_loss"]))
    assert result.metrics["eval_loss"] == evals[-1]["eval_loss"]
    assert os.listdir(tmp_path / "tensorboard")
    assert json.load(open(tmp_path / "config.json"))["model"]["num_layers"] == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "30", "40"]  # keep_checkpoints=3


def _train_cli(workdir, data_dir, num_steps):
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "train.py"),
        "--config=" + os.path.join(REPO, "configs", "tiny_es.py"),
        f"--workdir={workdir}",
        f"--config.data.path={data_dir}",
        f"--config.train.num_steps={num_steps}",
        *TRAIN_FLAGS,
    ]


def _logged_train_steps(log):
    """The steps whose training metrics a run logged (lines "step N: ...learning_rate=...")."""
    return [int(step) for step in re.findall(r"step (\d+): .*learning_rate=", log)]


def _final_params(workdir, step):
    config = tiny_config()
    with one_device_steps(config, 30) as (_, steps):
        saver = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
        state, data_state, _ = saver.restore(step, steps.abstract_state)
        saver.close()
    return jax.device_get(nnx.to_pure_dict(state["params"])), data_state


def test_run_killed_with_sigkill_resumes_bit_exactly(tmp_path, data_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    first = subprocess.run(_train_cli(uninterrupted, data_dir, 30), check=True, env=env, capture_output=True, text=True)
    assert _logged_train_steps(first.stderr) == list(range(2, 31, 2))  # log_every=2
    assert "Resumed" not in first.stderr

    process = subprocess.Popen(
        _train_cli(interrupted, data_dir, 30), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Kill as soon as the first checkpoint is complete (Orbax renames it into place when done).
    deadline = time.time() + 300
    while not os.path.isdir(interrupted / "checkpoints" / "5") and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = sorted(int(s) for s in os.listdir(interrupted / "checkpoints") if s.isdigit())
    assert saved and saved[-1] < 30, "the run finished before it could be killed"

    resumed = subprocess.run(_train_cli(interrupted, data_dir, 30), check=True, env=env, capture_output=True, text=True)
    # The second run must start from the last checkpoint, not from scratch: a restart from step 0 would end
    # with the same parameters and metrics (training is deterministic, and Orbax skips steps it already has).
    assert re.findall(r"Resumed from step (\d+) ", resumed.stderr) == [str(saved[-1])]
    assert _logged_train_steps(resumed.stderr) == [s for s in range(saved[-1] + 1, 31) if s % 2 == 0]
    assert f"Trained {30 - saved[-1]} steps, from step {saved[-1]} to step 30." in resumed.stderr

    want, want_data = _final_params(str(uninterrupted), 30)
    got, got_data = _final_params(str(interrupted), 30)
    jax.tree.map(np.testing.assert_array_equal, want, got)
    assert want_data == got_data
    exact_keys = ("step", "loss", "perplexity", "learning_rate", "grad_norm", "eval_loss", "eval_perplexity")
    strip = lambda entries: [{k: v for k, v in e.items() if k in exact_keys} for e in entries]
    assert strip(metrics_entries(interrupted)) == strip(metrics_entries(uninterrupted))


def test_a_workdir_or_init_from_of_another_model_is_refused_by_the_first_differing_key(tmp_path, data_dir):
    config = tiny_config()
    config.data.path = data_dir
    config.train.update(num_steps=2, checkpoint_every=2, eval_every=0)
    loop.train(config, str(tmp_path))
    other = tiny_config(model__mlp_dim=48)
    other.data.path = data_dir
    other.train.update(num_steps=4, eval_every=0)
    saved = r"config.model.mlp_dim=48 differs from the config saved with the workdir's checkpoint \(64\)"
    with pytest.raises(config_validation.ConfigError, match=saved):
        loop.train(other, str(tmp_path))
    assert directory.load_config(str(tmp_path)).model.mlp_dim == 64  # the refused run wrote nothing
    other.init_from = str(tmp_path)
    with pytest.raises(config_validation.ConfigError, match=r"config.model.mlp_dim=48 differs from the run in config"):
        start.check_init_from(other)
    # Adapters and how the model runs may differ from the base.
    start.check_init_from(tiny_config(init_from=str(tmp_path), model__lora_rank=4, model__remat_policy="full"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    config = tiny_config()
    config.data.path = data_dir
    config.train.update(num_steps=40, checkpoint_every=1, log_every=1, eval_every=0)
    # Warmup makes step 1 an update with learning rate 0; the next ones, at ~1e30, overflow the model.
    config.optimizer.update(learning_rate=1e30, grad_clip_norm=0.0, warmup_steps=2, schedule="constant")
    with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint is step"):
        loop.train(config, str(tmp_path))
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    logged = {e["step"]: e["loss"] for e in metrics_entries(tmp_path)}
    assert saved and all(logged[s] is not None for s in saved)
    assert saved[-1] < 40


def _one_step_metrics(config, seed):
    """The metrics of one train step on a fixed random batch (one device)."""
    with one_device_steps(config, 20) as (mesh, steps):
        rng = np.random.default_rng(seed)
        batch = {
            "tokens": rng.integers(0, 128, (8, 32)),
            "positions": np.tile(np.arange(32), (8, 1)),
            "segment_ids": np.ones((8, 32), int),
            "loss_mask": rng.integers(0, 2, (8, 32)),
        }
        batch = sharding.global_batch(
            {k: v.astype(np.int32) for k, v in batch.items()}, mesh, config.logical_axis_rules
        )
        state, frozen = steps.init(None)
        _, metrics = steps.train(state, frozen, batch)
    return [float(metrics[name]) for name in ("loss", "grad_norm", "param_norm")]


def test_gradient_accumulation_matches_the_full_batch():
    results = [_one_step_metrics(tiny_config(train__grad_accum_steps=accum), seed=0) for accum in (1, 4)]
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def _loss_gradients(config):
    """Every parameter's gradient of the next-token loss, dropout on, on a fixed random batch; and whether
    the backward pass rematerializes (a remat primitive in its program)."""
    graphdef, params, rest = nnx.split(create_model(config), nnx.Param, ...)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, (4, 32)), jnp.int32)
    positions, segments = jnp.tile(jnp.arange(32, dtype=jnp.int32), (4, 1)), jnp.ones((4, 32), jnp.int32)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(tokens, positions, segments, dropout_key=jax.random.key(0))
        cross_entropy, _, weight = losses.next_token_loss(logits, tokens, losses.next_token_weights(segments, segments))
        return cross_entropy / weight

    rematerialized = "remat" in str(jax.make_jaxpr(jax.grad(loss))(params))
    return jax.device_get(nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))), rematerialized


@pytest.mark.parametrize("scan_layers", [False, True], ids=["listed", "scanned"])
@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_remat_policies_leave_the_gradients_unchanged(policy, scan_layers):
    # Dropout on: the recomputed forward pass must draw the same masks as the first one.
    config = lambda remat: tiny_config(
        model__remat_policy=remat, model__scan_layers=scan_layers, model__dropout_rate=0.1
    )
    (want, plain), (got, rematerialized) = _loss_gradients(config("none")), _loss_gradients(config(policy))
    assert rematerialized and not plain
    jax.tree.map(lambda w, g: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), want, got)


def test_accumulated_gradients_sum_interleaved_microbatches_each_with_its_own_dropout_key():
    def grad_fn(params, frozen, batch, key):
        sums = {"first_rows": batch["x"][0], "noise": jax.random.uniform(key, ())}
        return (jnp.sum(params * batch["x"]), (sums, jnp.float32(len(batch["x"])))), jnp.sum(batch["x"], axis=0)

    params, batch, key = jnp.ones(3), {"x": jnp.arange(24.0).reshape(8, 3)}, jax.random.key(1)
    (value, (sums, weight)), grads = jax.jit(step_lib.accumulate_gradients(grad_fn, 4))(params, None, batch, key)
    (full_value, _), full_grads = grad_fn(params, None, batch, key)
    assert float(value) == float(full_value) and float(weight) == 8.0
    np.testing.assert_array_equal(grads, full_grads)
    # Microbatch i holds rows i, i + 4: its first row is row i, so no row moves between devices.
    np.testing.assert_array_equal(sums["first_rows"], batch["x"][:4].sum(axis=0))
    noise = sum(float(jax.random.uniform(jax.random.fold_in(key, i), ())) for i in range(4))
    assert float(sums["noise"]) == pytest.approx(noise, rel=1e-6)


def test_weight_decay_skips_norms_biases_and_embeddings():
    config = tiny_config(model__use_bias=True, model__norm="layernorm", model__tie_embeddings=False)
    params = nnx.state(create_model(config), nnx.Param)
    mask, _ = jax.tree_util.tree_flatten_with_path(optimizer_lib.weight_decay_mask(params))
    decayed = {jax.tree_util.keystr(path).removesuffix(".value") for path, value in mask if value}
    assert decayed and all(path.endswith("['kernel']") for path in decayed)
    assert any("unembed" in path for path in decayed)
    assert not any(part in path for path in decayed for part in ("scale", "bias", "embedding"))


@pytest.mark.parametrize("schedule", optimizer_lib.SCHEDULES)
def test_learning_rate_schedules_warm_up_then_decay_to_the_final_ratio(schedule):
    config = tiny_config(optimizer__schedule=schedule)
    config.optimizer.update(learning_rate=1.0, warmup_steps=10, final_lr_ratio=0.1)
    lr = optimizer_lib.learning_rate_schedule(config.optimizer, 100)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    final = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[schedule]
    assert float(lr(100)) == pytest.approx(final, rel=1e-4)


def test_chunked_cross_entropy_equals_the_full_one():
    # 7 does not divide the 31 predicted positions: the padding must not count.
    results = [
        _one_step_metrics(tiny_config(train__loss_chunk_size=chunk, train__z_loss=1e-3), seed=1) for chunk in (0, 7)
    ]
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_a_saved_config_without_newer_keys_loads_with_their_defaults(tmp_path):
    config = tiny_config()
    saved = json.loads(config.to_json())
    del saved["model"]["soft_prompt_length"], saved["train"]["quantize_base"]  # a run from before these keys
    (tmp_path / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    loaded = directory.load_config(str(tmp_path))
    assert loaded.model.soft_prompt_length == 0 and loaded.train.quantize_base == "none"
    assert loaded.model.num_layers == config.model.num_layers and loaded.data.seq_len == config.data.seq_len


def test_a_model_vocabulary_smaller_than_the_datas_tokenizer_is_refused(tmp_path, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(tokenizer.path, data / "tokenizer.model")  # 320 ids
    config = tiny_config(model__vocab_size=256)
    config.data.path = str(data)
    with pytest.raises(config_validation.ConfigError, match="vocab_size=256 is smaller than the 320 ids"):
        start.check_vocabulary(config)
    config.model.vocab_size = 320
    start.check_vocabulary(config)
