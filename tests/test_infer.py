"""Generation: the KV cache reproduces the full forward pass, batching changes nothing, bad input is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_cached_decode_equals_forward, forward, tiny_config

from llm.infer import sampling as sampling_lib
from llm.infer.generate import Generator, cache_bucket
from llm.model.kv_cache import KVCache
from llm.model.transformer import create_model


@pytest.fixture(scope="module")
def model():
    return create_model(tiny_config())


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decoding_with_the_cache_gives_the_logits_of_a_full_forward_pass(scan_layers):
    model = create_model(tiny_config(model__scan_layers=scan_layers))
    assert_cached_decode_equals_forward(model, jnp.array([[7, 21, 3, 99, 45, 8, 60, 12, 5]]))


def test_a_batch_of_different_lengths_gives_each_prompt_its_greedy_output_alone(model):
    prompts = [[2, 17, 40], [2, 5, 9, 31, 77, 12, 8, 90, 4, 33, 61, 19, 20], [2, 100]]
    generator = Generator(model)
    batched = generator.generate(prompts, max_new_tokens=8)
    alone = [generator.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone
    assert all(len(out) == 8 for out in batched)


def test_greedy_is_deterministic_and_sampling_follows_the_seed(model):
    generator = Generator(model)
    prompt = [[2, 11, 12]]
    assert generator.generate(prompt, 6) == generator.generate(prompt, 6, seed=123)
    hot = sampling_lib.SamplingParams(temperature=1.5)
    assert generator.generate(prompt, 6, hot, seed=1) == generator.generate(prompt, 6, hot, seed=1)
    samples = {tuple(generator.generate(prompt, 6, hot, seed=s)[0]) for s in range(4)}
    assert len(samples) > 1


def test_stop_tokens_end_a_row_and_streaming_sees_every_token(model):
    generator = Generator(model)
    free = generator.generate([[2, 11, 12]], 6)[0]
    stopped = generator.generate([[2, 11, 12]], 6, stop_token_ids=(free[2],))[0]
    assert stopped == free[: free.index(free[2])]
    streamed = []
    generator.generate([[2, 11, 12]], 6, on_tokens=lambda tokens: streamed.append(tokens[0]))
    assert streamed == free


def test_cache_lengths_round_up_to_an_eighth_of_a_power_of_two():
    sizes = [cache_bucket(n) for n in (1, 16, 17, 33, 100, 129, 160, 161, 257)]
    assert sizes == [16, 16, 32, 48, 112, 160, 160, 192, 320]
    assert cache_bucket(300, 256) == 256


def greedy_by_forward(model, prompt, new_tokens):
    """The greedy continuation of `prompt` by full forward passes, without a cache."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(jnp.argmax(forward(model, jnp.array([tokens]))[0, -1])))
    return tokens[len(prompt) :]


def test_a_cache_of_no_power_of_two_length_gives_the_full_forward_pass_greedy_tokens():
    model = create_model(tiny_config(model__max_seq_len=64))
    prompt = [2, 11, 12, 40]  # With 20 new tokens, a cache of cache_bucket(16 + 20) = 48 positions.
    assert Generator(model).generate([prompt], 20) == [greedy_by_forward(model, prompt, 20)]


def test_a_prompt_whose_bucket_reaches_the_context_still_gets_its_new_tokens(model):
    prompt = [2] + list(range(5, 24))  # 20 tokens, bucket 32: the whole context of the tiny model.
    assert Generator(model).generate([prompt], 8) == [greedy_by_forward(model, prompt, 8)]


def one_step_per_call(generator, prompts, new_tokens, sampling, seed):
    """Tokens (batch, new_tokens) of a prefill then one jitted `decode_step` call per token: step s writes at
    each prompt's length + s with key fold_in(key, s + 1), as `generate` has always decoded."""
    prompt_len = max(len(p) for p in prompts)
    tokens = np.array([[0] * (prompt_len - len(p)) + p for p in prompts], np.int32)
    segments = np.array([[0] * (prompt_len - len(p)) + [1] * len(p) for p in prompts], np.int32)
    positions = np.array([[0] * (prompt_len - len(p)) + list(range(len(p))) for p in prompts], np.int32)
    lengths = jnp.array([len(p) for p in prompts], jnp.int32)
    key = jax.random.key(seed)
    cache = KVCache.create(generator.cfg, len(prompts), 32)
    chosen, _, cache, seen = generator.prefill(
        generator.params, tokens, positions, segments, cache, jax.random.fold_in(key, 0), sampling
    )
    out = [chosen]
    for step in range(new_tokens - 1):
        fold = jax.random.fold_in(key, step + 1)
        chosen, _, cache, seen = generator.decode_step(
            generator.params, chosen, lengths + step, cache, seen, fold, sampling
        )
        out.append(chosen)
    return np.stack(out, axis=1).tolist()


def test_several_steps_per_dispatch_give_the_tokens_of_one_step_per_call(model):
    generator = Generator(model)
    prompts = [[2, 17, 40, 3], [2, 5, 9, 31, 77, 12, 8, 90, 4, 33, 61, 19, 20], [2, 100], [2, 8, 8]]
    hot = sampling_lib.SamplingParams(temperature=1.5, repetition_penalty=1.3)
    for sampling in (sampling_lib.SamplingParams(), hot):
        want = one_step_per_call(generator, prompts, 12, sampling, seed=7)
        stop = (want[0][4], want[2][7])
        for steps in (1, 3, 16):
            assert generator.generate(prompts, 12, sampling, seed=7, steps_per_dispatch=steps) == want
            stopped = generator.generate(prompts, 12, sampling, stop, seed=7, steps_per_dispatch=steps)
            assert stopped == [row[: min([row.index(t) for t in stop if t in row], default=12)] for row in want]


def test_the_device_loop_ends_when_every_real_row_has_stopped(model):
    generator = Generator(model)
    # A batch of 4: the filler row samples its own tokens, which must not keep the loop going.
    prompts, hot = [[2, 17, 40], [2, 100], [2, 55]], sampling_lib.SamplingParams(temperature=1.5)
    free = generator.generate(prompts, 12, hot, seed=3)
    stop = {row[1] for row in free}  # Every row stops at its second token or before.
    cut = [min(i for i, token in enumerate(row) if token in stop) for row in free]
    steps_run, decode_tokens = [], generator.decode_tokens

    def counting(*args, **kwargs):
        chosen, steps, state = decode_tokens(*args, **kwargs)
        steps_run.append(int(steps))
        return chosen, steps, state

    generator.decode_tokens = counting
    stopped = generator.generate(prompts, 12, hot, tuple(stop), seed=3)
    assert stopped == [row[:i] for row, i in zip(free, cut)]
    assert steps_run == ([1] if max(cut) == 1 else [])


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[]], "at least one token"),
        ([list(range(1, 40))], "does not fit the model's context of 32"),
    ],
)
def test_bad_prompts_get_a_clear_error(model, prompts, message):
    with pytest.raises(ValueError, match=message):
        Generator(model).generate(prompts, 4)


def test_sampling_filters_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = jnp.zeros((1, 4), bool)
    draws = lambda params: {int(sampling_lib.sample(logits, jax.random.key(i), params, seen)[0]) for i in range(64)}
    assert draws(sampling_lib.SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(sampling_lib.SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    assert draws(sampling_lib.SamplingParams(temperature=1.0, min_p=0.4)) == {0, 1}
    penalized = sampling_lib.sample(
        logits,
        jax.random.key(0),
        sampling_lib.SamplingParams(repetition_penalty=10.0),
        jnp.array([[True, False, False, False]]),
    )
    assert int(penalized[0]) == 1
    with pytest.raises(ValueError, match="top_p"):
        sampling_lib.SamplingParams(top_p=0.0)


def test_greedy_picks_argmaxs_token_and_row_sampling_skips_what_no_row_asks_for():
    logits = jax.random.normal(jax.random.key(0), (6, 50)).at[:, 7].set(9.0).at[::2, 3].set(9.0)  # Ties at 3, 7.
    np.testing.assert_array_equal(sampling_lib.greedy(logits), jnp.argmax(logits, axis=-1))
    seen, keys = jnp.zeros((6, 50), bool), jax.random.split(jax.random.key(1), 6)
    greedy_rows = sampling_lib.RowSampling.stack([sampling_lib.SamplingParams()] * 6)
    np.testing.assert_array_equal(sampling_lib.sample_rows(logits, keys, greedy_rows, seen), jnp.argmax(logits, -1))
    # Rows that sample, filtered to their single most likely token, beside greedy rows: every row's argmax.
    mixed = [sampling_lib.SamplingParams(), sampling_lib.SamplingParams(temperature=2.0, top_k=1)] * 2
    mixed += [sampling_lib.SamplingParams(temperature=2.0, top_p=1e-6), sampling_lib.SamplingParams(temperature=2.0)]
    untied = jax.random.normal(jax.random.key(2), (6, 50))
    rows = sampling_lib.RowSampling.stack(mixed)
    draws = [sampling_lib.sample_rows(untied, jax.random.split(jax.random.key(i), 6), rows, seen) for i in range(8)]
    for drawn in draws:
        np.testing.assert_array_equal(drawn[:5], jnp.argmax(untied[:5], axis=-1))
    assert len({int(drawn[5]) for drawn in draws}) > 1  # The unfiltered row does sample.


def test_rows_at_different_cache_positions_decode_independently(model):
    long, short = [7, 21, 3, 99, 45, 8], [60, 12, 5, 31]
    full_long, full_short = forward(model, jnp.array([long])), forward(model, jnp.array([short]))
    cache = KVCache.create(model.cfg, batch=2, max_len=16)
    # Prefill both rows with 5 tokens; the short row's last two are padding (segment 0) it will overwrite.
    tokens = jnp.array([long[:5], short[:3] + [0, 0]])
    segments = jnp.array([[1] * 5, [1, 1, 1, 0, 0]])
    _, cache = model.decode(tokens, jnp.array([list(range(5))] * 2), segments, cache)
    cache = cache._replace(index=jnp.array([5, 3]))
    logits, cache = model.decode(
        jnp.array([[long[5]], [short[3]]]), jnp.array([[5], [3]]), jnp.ones((2, 1), int), cache
    )
    np.testing.assert_allclose(logits[0, 0], full_long[0, 5], atol=1e-5)
    np.testing.assert_allclose(logits[1, 0], full_short[0, 3], atol=1e-5)
    assert cache.index.tolist() == [6, 4]
