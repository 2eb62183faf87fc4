"""The serving engine (continuous batching), per-row sampling, API keys and rate limiting, without HTTP."""

import queue

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.infer import generate
from llm.infer.sampling import RowSampling, SamplingParams, sample_rows
from llm.runs import quantized_run
from llm.serve import auth
from llm.serve.engine import Engine, Finished, Request, Token


def test_short_requests_finish_while_a_long_one_decodes(run):
    engine = Engine(run.model, run.tokenizer, max_batch_size=4).start()
    events = queue.Queue()
    prompt = run.tokenizer.encode("La niña canta", add_bos=True)
    try:
        engine.submit(Request(prompt, max_tokens=60), lambda e: events.put(("long", e)))
        for i in range(6):
            engine.submit(Request(prompt, max_tokens=3), lambda e, i=i: events.put((f"short{i}", e)))
        finished, tokens = [], {}
        while len(finished) < 7:
            name, event = events.get(timeout=60)
            if isinstance(event, Token):
                tokens[name] = tokens.get(name, 0) + 1
            elif isinstance(event, Finished):
                finished.append((name, event.reason, event.completion_tokens))
    finally:
        engine.stop()
    # Six short requests took turns in the other three slots while the long one kept the first.
    assert [name for name, _, _ in finished] == [f"short{i}" for i in range(6)] + ["long"]
    assert finished[-1] == ("long", "length", 60) and tokens["long"] == 60
    assert engine.num_active == 0 and engine.num_waiting == 0


def generate_with_engine(engine, prompt, max_tokens):
    events = queue.Queue()
    engine.submit(Request(prompt, max_tokens), events.put)
    tokens = []
    while not isinstance(event := events.get(timeout=60), Finished):
        tokens.append(event)
    return tokens


def test_a_quantized_model_with_an_int8_cache_serves_like_its_generator(run):
    quantized = quantized_run.quantize_run(run, "int8", kv_cache="int8")
    prompt = run.tokenizer.encode("El pingüino camina", add_bos=True)
    want = generate.run_generator(quantized).generate([prompt], 8)[0]
    engine = Engine(quantized.model, quantized.tokenizer, max_batch_size=2).start()
    try:
        tokens = generate_with_engine(engine, prompt, 8)
    finally:
        engine.stop()
    assert [t.token_id for t in tokens] == want
    assert all(np.isfinite(t.logprob) and t.logprob <= 0 for t in tokens)


def test_engine_rejects_requests_that_do_not_fit(run):
    engine = Engine(run.model, run.tokenizer, max_batch_size=1, max_cache_len=64)
    with pytest.raises(ValueError, match="1 to 64 tokens"):
        engine.submit(Request([5] * 65, max_tokens=1), print)
    with pytest.raises(ValueError, match="exceeds the cache length of 64"):
        engine.submit(Request([5] * 60, max_tokens=5), print)
    with pytest.raises(ValueError, match="max_cache_len"):
        Engine(run.model, run.tokenizer, max_cache_len=1000)


def test_each_row_samples_with_its_own_parameters():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.tile(probs, (5, 1)))
    rows = RowSampling.stack(
        [
            SamplingParams(),  # Greedy.
            SamplingParams(temperature=1.0, top_k=2),
            SamplingParams(temperature=1.0, top_p=0.7),
            SamplingParams(temperature=1.0, min_p=0.4),
            SamplingParams(repetition_penalty=10.0),  # Greedy, with token 0 already seen.
        ]
    )
    seen = jnp.zeros((5, 4), bool).at[4, 0].set(True)
    draw = jax.jit(sample_rows)
    draws = np.array([draw(logits, jax.random.split(jax.random.key(i), 5), rows, seen) for i in range(64)])
    assert [set(draws[:, row]) for row in range(5)] == [{0}, {0, 1}, {0, 1}, {0, 1}, {1}]
    keys = jax.random.split(jax.random.key(3), 5)
    np.testing.assert_array_equal(draw(logits, keys, rows, seen), draw(logits, keys, rows, seen))


def test_api_keys_come_from_file_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "keys.txt"
    path.write_text("# claves del equipo\nclave-1\n\nclave-2\n", encoding="utf-8")
    monkeypatch.setenv(auth.API_KEYS_ENV, "clave-3, clave-4")
    keys = auth.load_api_keys(str(path))
    assert keys == {"clave-1", "clave-2", "clave-3", "clave-4"}
    assert auth.check_key(keys, "Bearer clave-2") == "clave-2"
    assert auth.check_key(keys, "Bearer clave-9") is None and auth.check_key(keys, "clave-2") is None
    path.write_text("clave-1\nclave con espacio\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"keys.txt:2"):
        auth.load_api_keys(str(path))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        auth.load_api_keys(str(tmp_path / "missing.txt"))


def test_rate_limiter_allows_bursts_then_the_rate_per_client():
    now = [0.0]
    limiter = auth.RateLimiter(rate=60, burst=2, clock=lambda: now[0])  # One request per second.
    assert [limiter.acquire("a"), limiter.acquire("a")] == [0, 0]
    assert limiter.acquire("a") == pytest.approx(1.0)
    assert limiter.acquire("b") == 0  # Buckets are per client.
    now[0] = 1.0
    assert limiter.acquire("a") == 0 and limiter.acquire("a") > 0
