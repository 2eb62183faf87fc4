"""Sharded generation: a tensor-parallel model decodes on a (1, 2, 4) mesh with its KV cache split as the rules
table says (rows over data x fsdp, kv heads over tensor), and gives one device's tokens and scores."""

import math
import queue
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from jax.sharding import PartitionSpec

from llm import sharding
from llm.eval.scoring import Scorer
from llm.infer.generate import Generator
from llm.infer.sampling import SamplingParams
from llm.model.kv_cache import new_cache
from llm.model.transformer import create_model
from llm.serve.engine import Engine, Finished, Request

MESH = (1, 2, 4)
PROMPTS = [[2, 17, 40], [2, 5, 9, 31, 77, 12, 8, 90, 4]]
BATCH = ("data", "fsdp")  # What the rules table maps the cache's rows (`batch`) to.


def config_for(kv_heads=4, **model):
    """A tiny model with 8 heads of 8 and `kv_heads` kv heads; untied embeddings, so greedy decoding does not just
    repeat the last token."""
    overrides = dict(embed_dim=64, num_heads=8, num_kv_heads=kv_heads, tie_embeddings=False, position_encoding="rope")
    return tiny_config(**{f"model__{key}": value for key, value in {**overrides, **model}.items()})


def on_mesh(model, config, mesh_shape=MESH):
    """The model with its parameters placed on a mesh of the first devices, as the rules table says (what
    `load_run(workdir, mesh_shape=...)` returns)."""
    mesh = sharding.create_mesh(mesh_shape, jax.devices()[: math.prod(mesh_shape)])
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, sharding.tree_shardings(state, mesh, config.logical_axis_rules)))


def assert_sharded(array, *spec):
    mesh = sharding.mesh_of(array)
    assert mesh is not None and mesh.shape == dict(zip(sharding.MESH_AXES, MESH))
    expected = jax.sharding.NamedSharding(mesh, PartitionSpec(*spec))
    assert array.sharding.is_equivalent_to(expected, array.ndim), f"{array.sharding.spec} is not {expected.spec}"


def assert_cache_sharded(cache, kv_axis, batch_axis=BATCH):
    """Every array of the cache is split as its logical axes say (a stacked one has its layers unsplit)."""
    for field in ("keys", "values", "key_scales", "value_scales"):
        for array in jax.tree.leaves(getattr(cache, field)):
            assert_sharded(array, *([None] if array.ndim == 5 else []), batch_axis, kv_axis, None, None)
    assert_sharded(cache.segment_ids, batch_axis, None)
    assert_sharded(cache.index, batch_axis)


@pytest.mark.parametrize(
    "kv_heads, model, sampled",
    [
        (4, {}, True),
        (4, dict(scan_layers=True), False),
        (4, dict(kv_cache_dtype="int8"), False),
        (2, {}, False),  # GQA: 2 kv heads on 4 tensor devices, so the cache's heads are replicated.
    ],
    ids=["unrolled", "scan_layers", "int8_cache", "kv_heads_2_of_tensor_4"],
)
def test_decoding_on_a_1x2x4_mesh_gives_one_devices_tokens_with_the_cache_sharded(kv_heads, model, sampled):
    config = config_for(kv_heads, **model)
    single, meshed = Generator(create_model(config)), Generator(on_mesh(create_model(config), config))
    for sampling in [SamplingParams()] + [SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2)] * sampled:
        want = single.generate(PROMPTS, 12, sampling, seed=3)
        assert meshed.generate(PROMPTS, 12, sampling, seed=3) == want
        assert len(set(want[1])) > 3  # Varied tokens: equality says something.
    # The cache as the mesh's generation creates it, and as its prefill returns it (the shapes `generate` used).
    kv_axis = "tensor" if kv_heads % MESH[2] == 0 else None
    with sharding.use_mesh_of(meshed.params, config.logical_axis_rules):
        cache = new_cache(meshed.graphdef, meshed.params, 2, 32)
        assert_cache_sharded(cache, kv_axis)
        tokens = np.ones((2, 16), np.int32)
        _, _, cache, _ = meshed.prefill(meshed.params, tokens, tokens, tokens, cache, jax.random.key(0), sampling)
    assert_cache_sharded(cache, kv_axis)


def all_gather_sizes(hlo: str) -> list[int]:
    """The number of elements each all-gather of a compiled program's HLO produces."""
    sizes = []
    for result in re.findall(r"= (.*?) all-gather(?:-start)?\(", hlo):  # The result's type: f32[2,4,1,8]{...}
        shapes = re.findall(r"\[([\d,]*)\]", result)
        sizes.append(max(math.prod(int(d) for d in shape.split(",") if d) for shape in shapes))
    return sizes


def test_a_decoding_step_on_the_mesh_gathers_no_cache():
    # A cache of 1024 positions: a layer's keys (2 rows, 4 heads, 1024, 8) hold 8x the elements of any weight.
    config = config_for(mlp_dim=128, max_seq_len=1024)
    generator = Generator(on_mesh(create_model(config), config))
    with sharding.use_mesh_of(generator.params, config.logical_axis_rules):
        cache = new_cache(generator.graphdef, generator.params, 2, 1024)
        tokens, seen = jnp.array([5, 7], jnp.int32), jnp.zeros((2, config.model.vocab_size), bool)
        step = generator.decode_step.lower(
            generator.params, tokens, tokens, cache, seen, jax.random.key(0), SamplingParams()
        )
        hlo = step.compile().as_text()
    shard = cache.keys[0].size // math.prod(MESH)  # One device's slice of one layer's keys.
    gathered = all_gather_sizes(hlo)
    assert max(gathered, default=0) < 2 * shard, f"all-gathers of {gathered} elements; a cache shard has {shard}"


def test_scores_on_the_mesh_equal_one_devices():
    config = config_for()
    model = create_model(config)
    shared = list(range(2, 22))  # A shared prefix of 20 tokens: scored through a (sharded) prefix cache.
    requests = [(shared + [30 + i], [40 + i, 50 + i, 60 - i][: i + 1]) for i in range(3)]
    want = Scorer(model, batch_size=2).score_tokens(requests)
    scorer = Scorer(on_mesh(model, config), batch_size=2, rules=config.logical_axis_rules)
    np.testing.assert_allclose(scorer.score_tokens(requests), want, rtol=1e-5)
    with sharding.use_mesh_of(scorer._state, config.logical_axis_rules):
        prefix = scorer._read_prefix(shared)
    assert_cache_sharded(prefix, "tensor", batch_axis=None)  # One row: not split over the 2 fsdp devices.


def serve(engine, prompts, max_tokens):
    """The tokens the engine generates for each prompt, submitted together."""
    events = [queue.Queue() for _ in prompts]
    for prompt, sink in zip(prompts, events):
        engine.submit(Request(prompt, max_tokens, SamplingParams(temperature=1.0), seed=5), sink.put)
    outputs = []
    for sink in events:
        tokens = []
        while not isinstance(event := sink.get(timeout=60), Finished):
            tokens.append(event.token_id)
        outputs.append(tokens)
    return outputs


def test_the_server_engine_on_the_mesh_serves_one_devices_tokens(tokenizer):
    config = config_for()
    model = create_model(config)
    outputs = []
    for placed in (model, on_mesh(model, config)):
        engine = Engine(placed, tokenizer, max_batch_size=2, max_cache_len=32, rules=config.logical_axis_rules)
        engine.start()
        try:
            outputs.append(serve(engine, PROMPTS, 10))
        finally:
            engine.stop()
    assert outputs[1] == outputs[0] and len(set(outputs[0][0])) > 3
    assert_cache_sharded(engine._cache, "tensor")
