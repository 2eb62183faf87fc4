"""Mixture of experts: the dropless layer equals the masked reference, routing and router losses equal
hand-computed values, an MoE model trains, shards, resumes and decodes like a dense one, bad configs are refused."""

import queue

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    assert_cached_decode_equals_forward,
    crash_then_resume,
    forward,
    metrics_entries,
    pattern_rows,
    tiny_config,
)
from flax import nnx
from jax.sharding import PartitionSpec

from configs import base
from llm import config_validation, sharding
from llm.data import records
from llm.infer.generate import Generator
from llm.model import mlp, moe
from llm.model.transformer import create_model
from llm.quant import ptq
from llm.serve.engine import Engine, Finished, Request
from llm.train import (
    benchmark as train_benchmark,
    loop,
    losses,
    metrics as metrics_lib,
    step as step_lib,
)

TOKENS_9 = jnp.array([[7, 21, 3, 99, 45, 8, 60, 12, 5]])


def moe_config(**overrides):
    """tiny_config (2 layers, width 32) with 8 experts, top-2, in every layer."""
    moe_keys = dict(
        model__num_experts=8, model__experts_per_token=2, model__moe_mlp_dim=32, model__router_aux_loss_coef=0.01
    )
    return tiny_config(**{**moe_keys, **overrides})


def moe_layer(model_cfg, seed=0):
    with sharding.no_eager_sharding():
        return moe.MoE(model_cfg, rngs=nnx.Rngs(params=seed))


def _inputs(shape=(2, 8, 32), seed=1):
    # Scaled up so the router's logits are far from uniform and the experts' choices differ between tokens.
    return jax.random.normal(jax.random.key(seed), shape) * 20.0


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dropless_dispatch_equals_the_masked_reference_in_values_and_gradients(activation):
    x = _inputs()
    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    results = {}
    for impl in moe.IMPLEMENTATIONS:
        layer = moe_layer(moe_config(model__moe_impl=impl, model__mlp_activation=activation).model)

        def objective(layer, x):
            out, stats = layer(x)
            return jnp.sum(out * cotangent) + jnp.sum(stats.aux_loss) + jnp.sum(stats.z_loss), out

        (_, out), grads = nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True)(layer, x)
        results[impl] = out, nnx.to_pure_dict(grads[0]), grads[1]
    assert len(np.unique(np.asarray(jax.lax.top_k(x.reshape(-1, 32) @ layer.router[...], 2)[1]))) > 4
    want_out, want_params, want_x = results.pop("masked")
    for got_out, got_params, got_x in results.values():  # dropless (ragged_dot) and megablox (Pallas, interpreted)
        np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got_params, want_params)
        assert np.abs(got_params["router"]).max() > 0  # the router learns through the renormalized weights


@pytest.mark.parametrize("impl", list(moe.IMPLEMENTATIONS))
def test_one_expert_with_top_1_equals_the_dense_mlp_with_the_same_weights(impl):
    cfg = moe_config(model__num_experts=1, model__experts_per_token=1, model__moe_impl=impl).model
    layer = moe_layer(cfg)
    dense_cfg = tiny_config(model__mlp_dim=cfg.moe_mlp_dim).model
    with sharding.no_eager_sharding():
        dense = mlp.MLP(dense_cfg, rngs=nnx.Rngs(params=5))
    for name in ("gate", "up", "down"):
        getattr(dense, name).kernel[...] = getattr(layer, name)[0]
    x = _inputs(seed=3)
    out, stats = layer(x)
    np.testing.assert_allclose(out, dense(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.load, [1.0])


def test_routing_and_router_losses_equal_hand_computed_values():
    logits = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32) * 3
    routing = moe.route(jnp.asarray(logits), k=2)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[:, :2]
    top2_probs = np.take_along_axis(probs, top2, -1)
    np.testing.assert_array_equal(routing.experts, top2)
    np.testing.assert_allclose(routing.weights, top2_probs / top2_probs.sum(-1, keepdims=True), rtol=1e-6)
    load = np.bincount(top2.ravel(), minlength=4) / 12  # 6 tokens x 2 choices
    np.testing.assert_allclose(routing.stats.load, load)
    np.testing.assert_allclose(routing.stats.aux_loss, 4 * np.sum(load * probs.mean(0)), rtol=1e-6)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(routing.stats.z_loss, np.mean(lse**2), rtol=1e-6)
    # Perfect balance (uniform probabilities, every expert chosen equally often) gives 1.
    balanced = moe.route(jnp.asarray(np.eye(4, dtype=np.float32)), k=1)
    np.testing.assert_allclose(balanced.stats.aux_loss, 1.0, rtol=1e-6)


def test_padding_is_left_out_of_the_router_statistics():
    logits = jax.random.normal(jax.random.key(5), (12, 4)) * 3.0
    real = jnp.arange(12) % 3 != 0  # a third of the tokens are padding
    masked = moe.route(logits, k=2, token_mask=real).stats
    only_real = moe.route(logits[real], k=2).stats
    for got, want in zip(masked, only_real):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_training_objective_adds_the_router_losses_with_their_coefficients():
    batch = next(_batches(moe_config(), 1))
    lm = lambda config: losses.lm_terms(create_model(config), None, batch, None, config.train, {})
    plain, sums, weight = lm(moe_config(model__router_aux_loss_coef=0.0, model__router_z_loss_coef=0.0))
    value, _, _ = lm(moe_config(model__router_aux_loss_coef=0.5, model__router_z_loss_coef=0.25))
    # The metric sums are already scaled by the weight, as the cross-entropy sum is.
    np.testing.assert_allclose(value - plain, 0.5 * sums["moe_aux_loss"] + 0.25 * sums["moe_z_loss"], rtol=1e-5)
    assert 1.5 < sums["moe_aux_loss"] / weight < 3 and sums["moe_z_loss"] > 0  # two layers, each near 1
    assert 0 <= sums["moe_load_min"] / weight < 1 / 8 < sums["moe_load_max"] / weight <= 1


@pytest.mark.parametrize("objective", ["distill", "dpo", "contrastive"])
def test_every_objective_adds_the_router_losses_of_an_moe_model(objective):
    lm_batch = next(_batches(moe_config(), 1))
    sides = {"dpo": losses.DPO_SIDES, "contrastive": records.CONTRASTIVE_SIDES}.get(objective, ())
    # Pairs and triples of the same rows: what matters here is that the router terms are added, not their data.
    batch = {f"{side}_{name}": value for side in sides for name, value in lm_batch.items()} or lm_batch

    def terms(aux: float, z: float) -> tuple:
        config = moe_config(model__router_aux_loss_coef=aux, model__router_z_loss_coef=z)
        model = create_model(config)
        other = create_model(tiny_config()) if objective == "distill" else model  # teacher, or DPO's reference
        return losses.OBJECTIVES[objective].terms(model, other, batch, None, config.train, {})

    plain, sums, weight = terms(0.0, 0.0)
    value, _, _ = terms(0.5, 0.25)
    np.testing.assert_allclose(value - plain, 0.5 * sums["moe_aux_loss"] + 0.25 * sums["moe_z_loss"], rtol=1e-5)
    assert 1.5 < sums["moe_aux_loss"] / weight < 3  # two MoE layers, each near 1


def test_shared_experts_are_used_by_every_token():
    cfg = moe_config(model__num_shared_experts=1).model
    layer, x = moe_layer(cfg), _inputs(seed=4)
    with_shared, _ = layer(x)
    shared_out = layer.shared(x)
    layer.shared.down.kernel[...] = jnp.zeros_like(layer.shared.down.kernel[...])
    without_shared, _ = layer(x)
    np.testing.assert_allclose(with_shared - without_shared, shared_out, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(np.asarray(shared_out)).max(-1) > 0)  # every token gets a contribution


def _batches(config, count, seed=3):
    rows = list(pattern_rows(config.train.batch_size * count, config.data.seq_len, config.model.vocab_size, seed))
    for i in range(count):
        chunk = rows[i * config.train.batch_size : (i + 1) * config.train.batch_size]
        yield {name: np.stack([row[name] for row in chunk]) for name in chunk[0]}


def _train_losses(config, mesh_shape, num_steps=3):
    mesh = sharding.create_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    rules = config.logical_axis_rules
    results = []
    with sharding.use_mesh(mesh, rules):
        steps = step_lib.build_steps(config, mesh)
        state, frozen = steps.init(None)
        for batch in _batches(config, num_steps):
            state, metrics = steps.train(state, frozen, sharding.global_batch(batch, mesh, rules))
            results.append([float(metrics[k]) for k in ("loss", "moe_aux_loss", "moe_z_loss", "moe_load_max")])
    return np.array(results), state


def test_one_device_and_a_2x2x2_mesh_give_the_same_losses_with_experts_split_over_fsdp():
    # Every second layer MoE, scanned: the scan runs groups of (dense, MoE) blocks.
    config = moe_config(model__moe_every=2, model__scan_layers=True, train__grad_accum_steps=2)
    single, _ = _train_losses(config, (1, 1, 1))
    meshed, state = _train_losses(config, (2, 2, 2))
    np.testing.assert_allclose(single, meshed, rtol=1e-5, atol=1e-5)
    assert single[-1, 0] < single[0, 0]
    up = state["params"]["moe_blocks"]["mlp"]["up"]
    assert up[...].shape == (1, 8, 32, 32)  # (layers, experts, embed, mlp)
    assert up[...].sharding.spec == PartitionSpec(None, "fsdp", None, "tensor")
    assert state["params"]["blocks"]["mlp"]["up"]["kernel"][...].shape == (1, 32, 64)  # the dense layer


def test_a_tiny_moe_trains_logs_its_router_metrics_and_resumes_bit_exactly(tmp_path, data_dir, monkeypatch):
    config = moe_config(model__num_shared_experts=1)
    config.data.path = data_dir
    config.train.update(num_steps=20, checkpoint_every=5, log_every=5, eval_every=10)
    loop.train(config, str(tmp_path / "uninterrupted"))
    entries = [e for e in metrics_entries(tmp_path / "uninterrupted") if "learning_rate" in e]
    assert entries[-1]["loss"] < 0.75 * entries[0]["loss"]
    for key in ("moe_aux_loss", "moe_z_loss", "moe_load_max", "moe_load_min", "tokens_per_sec", "mfu"):
        assert key in entries[-1]
    assert 1.0 <= entries[-1]["moe_aux_loss"] < 4.0  # two layers, each 1 when balanced

    result, saved, drawn = crash_then_resume(config, str(tmp_path / "interrupted"), monkeypatch, batches=12)
    assert (result.start_step, saved, drawn) == (10, 10, 10)
    want = metrics_entries(tmp_path / "uninterrupted")
    got = metrics_entries(tmp_path / "interrupted")
    exact = ("step", "loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "moe_load_max", "eval_loss")
    strip = lambda entries: [{k: v for k, v in e.items() if k in exact} for e in entries]
    assert strip(got) == strip(want)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decoding_with_the_cache_gives_the_logits_of_a_full_forward_pass(scan_layers):
    model = create_model(moe_config(model__scan_layers=scan_layers, model__num_shared_experts=1))
    assert_cached_decode_equals_forward(model, jnp.array([[7, 21, 3, 99, 45, 8, 60, 12, 5]]))
    # The generator (and so the server) batches prompts of different lengths; each gets its output alone.
    generator, prompts = Generator(model), [[2, 17, 40], [2, 5, 9, 31, 77, 12]]
    assert generator.generate(prompts, 5) == [generator.generate([p], 5)[0] for p in prompts]


def test_the_server_engine_serves_an_moe_model_as_its_generator_does(tokenizer):
    model = create_model(moe_config(model__vocab_size=tokenizer.vocab_size, model__max_seq_len=64))
    prompts = [tokenizer.encode(text, add_bos=True) for text in ("El pingüino camina", "La niña canta en el jardín")]
    want = [Generator(model).generate([prompt], 6)[0] for prompt in prompts]
    engine = Engine(model, tokenizer, max_batch_size=2).start()
    try:
        # Both requests in flight at once: the engine's batch mixes rows at different cache positions.
        events = [queue.Queue() for _ in prompts]
        for prompt, queue_of_prompt in zip(prompts, events):
            engine.submit(Request(prompt, 6), queue_of_prompt.put)
        got = []
        for queue_of_prompt in events:
            tokens = []
            while not isinstance(event := queue_of_prompt.get(timeout=60), Finished):
                tokens.append(event.token_id)
            got.append(tokens)
    finally:
        engine.stop()
    assert got == want


def test_mfu_counts_the_active_parameters_only():
    config = moe_config(model__num_shared_experts=1, model__moe_every=2)
    # Layer 1 runs 2 routed + 1 shared expert of width 32 (three MLPs of width 32) and a router; layer 0 is dense.
    dense_equivalent = metrics_lib.matmul_params(tiny_config(model__mlp_dim=96).model)
    dense_layer_mlp = 3 * 32 * (64 - 96)  # layer 0's real MLP is 64 wide, not 96
    assert metrics_lib.matmul_params(config.model) == dense_equivalent + dense_layer_mlp + 32 * 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model__num_experts=-1), "config.model.num_experts=-1 must be >= 0"),
        (dict(model__experts_per_token=9), "config.model.experts_per_token=9 must be between 1 and"),
        (dict(model__experts_per_token=0), "config.model.experts_per_token=0 must be between 1 and"),
        (dict(model__moe_every=3), "config.model.moe_every=3 must be >= 1 and divide config.model.num_layers=2"),
        (dict(model__moe_mlp_dim=-4), "config.model.moe_mlp_dim=-4 must be >= 0"),
        (dict(model__num_shared_experts=-1), "config.model.num_shared_experts=-1 must be >= 0"),
        (dict(model__router_aux_loss_coef=-0.1), "config.model.router_aux_loss_coef=-0.1 must be >= 0"),
        (dict(model__router_z_loss_coef=-1.0), "config.model.router_z_loss_coef=-1.0 must be >= 0"),
        (
            dict(model__moe_impl="sparse"),
            "config.model.moe_impl='sparse' is not one of ('dropless', 'megablox', 'masked')",
        ),
        (dict(model__use_bias=True), "config.model.use_bias=True: expert projections have no biases"),
        (dict(model__moe_impl="megablox", model__dtype="float16"), "config.model.moe_impl='megablox' with config"),
    ],
)
def test_bad_moe_configs_are_refused_naming_the_key(overrides, message):
    with pytest.raises(config_validation.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_validation.validate(moe_config(**overrides))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_quantization_covers_attention_shared_and_expert_weights_and_keeps_the_router_float(scan_layers):
    config = moe_config(model__scan_layers=scan_layers, model__moe_every=2, model__num_shared_experts=1)
    model = create_model(config)
    quantized = ptq.quantize_model(model, ptq.QuantConfig("int8"))
    dtypes = {"/".join(map(str, p)): v.dtype for p, v in nnx.to_flat_state(nnx.state(quantized, nnx.Param))}
    for name in ("gate", "up", "down"):
        assert dtypes[f"blocks/1/mlp/{name}/qvalue"] == jnp.int8  # the stacked expert weights
        assert dtypes[f"blocks/1/mlp/shared/{name}/kernel/array/qvalue"] == jnp.int8  # the shared experts (Qwix)
    assert dtypes["blocks/1/attention/query/kernel/array/qvalue"] == jnp.int8
    assert dtypes["blocks/1/mlp/router"] == jnp.float32
    assert quantized.blocks[1].mlp.down.scale.shape == (8, 1, 32)  # one scale per (expert, output channel)
    assert dtypes["blocks/0/mlp/up/kernel/array/qvalue"] == jnp.int8  # the dense layer
    expected = forward(model, TOKENS_9)
    assert np.linalg.norm(forward(quantized, TOKENS_9) - expected) / np.linalg.norm(expected) < 0.02
    # Saved and loaded like any quantized run: the restore target built from its config has the same parameters,
    # and dequantized (QLoRA's base) they sit at the float model's paths, unrolled.
    target = nnx.eval_shape(lambda: ptq.model_from_config(ptq.quantized_config(config, ptq.QuantConfig("int8"))))
    shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    assert shapes(target) == shapes(quantized)
    unrolled_config = moe_config(model__moe_every=2, model__num_shared_experts=1)
    assert shapes(ptq.dequantized_params(quantized)) == shapes(create_model(unrolled_config))


def test_int8_activations_are_refused_for_experts_naming_the_reason():
    with pytest.raises(ValueError, match="'int8_act' does not support mixture-of-experts.*inputs of the expert"):
        ptq.quantize_model(create_model(moe_config()), ptq.QuantConfig("int8_act"))


def test_the_implementations_are_exactly_the_allowed_choices():
    assert set(moe.IMPLEMENTATIONS) == set(base.CHOICES["model.moe_impl"])


def test_the_train_benchmark_takes_an_moe_config_and_reports_validation_loss_on_data(data_dir):
    config = moe_config(model__num_shared_experts=1)
    config.data.path = data_dir
    result = train_benchmark.benchmark_train(config, num_steps=2, warmup_steps=1)
    assert (result["num_experts"], result["experts_per_token"], result["train_steps"]) == (8, 2, 3)
    assert result["active_matmul_parameters"] == metrics_lib.matmul_params(config.model)
    assert result["tokens_per_sec"] > 0 and 0 < result["eval_loss"] < 2 * np.log(config.model.vocab_size)
    assert train_benchmark.benchmark_train(moe_config(), num_steps=1, warmup_steps=1)["eval_loss"] is None
