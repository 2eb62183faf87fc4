"""The green-list watermark: one hash in NumPy and JAX, the sampling bias (batch, per row, server) and detection."""

import json
import queue

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, run_script, tiny_config

from llm.infer import watermark as wm
from llm.infer.generate import Generator, TextStream
from llm.infer.sampling import RowSampling, SamplingParams, sample, sample_rows
from llm.model.transformer import create_model
from llm.serve import api, bench
from llm.serve.engine import Engine, Finished, Request, Token
from llm.tokenizer import conllu_texts

KEY = 0xC0FFEE_1234_5678  # Over 32 bits: both halves of the key matter.
STRONG = wm.WatermarkParams(KEY, gamma=0.25, delta=6.0)


@pytest.fixture(scope="module")
def model():
    """A random tiny model with room for 200 new tokens (its distributions are nearly flat: easy to bias)."""
    return create_model(tiny_config(model__max_seq_len=256))


def hash_in_jax(key_words, previous, tokens):
    return jax.jit(lambda k, p, t: wm.token_hash(wm.row_seed(k, p), t))(key_words, previous, tokens)


def test_numpy_and_jax_compute_the_same_hash_bit_for_bit():
    rng = np.random.default_rng(0)
    previous, tokens = rng.integers(0, 2**31, 4096), rng.integers(0, 2**31, 4096)
    for key in (0, 1, KEY, 2**64 - 1):
        words = wm.WatermarkParams(key).key_words
        in_numpy = wm.token_hash(wm.row_seed(words, previous), tokens)
        in_jax = hash_in_jax(jnp.asarray(words), jnp.asarray(previous, jnp.int32), jnp.asarray(tokens, jnp.int32))
        assert in_numpy.dtype == np.uint32 and in_jax.dtype == jnp.uint32
        np.testing.assert_array_equal(in_numpy, np.asarray(in_jax))
    # The vocabulary-wide mask of the sampling step is the detector's colour of every token.
    mask = wm.green_mask(STRONG.key_words, jnp.array([5, 77]), STRONG.threshold, 300)
    vocab = np.arange(300)
    for row, prev in enumerate((5, 77)):
        detector = wm.token_hash(wm.row_seed(STRONG.key_words, np.full(300, prev)), vocab) < STRONG.threshold
        np.testing.assert_array_equal(np.asarray(mask[row]), detector)


@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_a_fraction_gamma_of_the_vocabulary_is_green_and_random_text_is_not_detected(gamma):
    params = wm.WatermarkParams(7, gamma)
    mask = np.asarray(wm.green_mask(params.key_words, jnp.arange(64), params.threshold, 8192))
    assert abs(mask.mean() - gamma) < 0.005  # 524288 draws: the standard error is under 0.0007.
    assert abs((mask[0] & mask[1]).mean() - gamma**2) < 0.02  # Another previous token, an independent list.
    # Texts that know nothing of the key: z is standard normal (calibrated p-values), never past 4.
    rng = np.random.default_rng(1)
    found = [wm.detect(rng.integers(0, 8192, 200), params) for _ in range(300)]
    z = np.array([f.z for f in found])
    assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.15 and z.max() < 4
    assert abs(np.mean([f.p_value < 0.05 for f in found]) - 0.05) < 0.03


def test_the_watermark_parameters_are_checked_and_the_key_is_not_shown():
    assert str(KEY) not in repr(STRONG) and hex(KEY) not in repr(STRONG)
    for bad, message in [
        (dict(key=-1), "key"),
        (dict(key=2**64), "key"),
        (dict(key=True), "key"),
        (dict(key=1, gamma=1.0), "gamma=1.0"),
        (dict(key=1, delta=0.0), "delta=0.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            wm.WatermarkParams(**bad)
    assert hash(SamplingParams(watermark=STRONG)) == hash(SamplingParams(watermark=wm.WatermarkParams(KEY, 0.25, 6.0)))


def test_detection_counts_each_bigram_once_and_refuses_short_texts():
    repeated = [5, 9] * 200  # Two distinct bigrams, however long the text.
    with pytest.raises(ValueError, match="Only 2 distinct token bigrams to score"):
        wm.detect(repeated, STRONG)
    with pytest.raises(ValueError, match="Only 0 distinct"):
        wm.detect([], STRONG)
    text = list(np.random.default_rng(2).integers(0, 1000, 40))
    assert wm.detect(text + text, STRONG, min_scored=1).scored == wm.detect(text, STRONG).scored + 1


def sample_generation(model, sampling, seed=0, new_tokens=200):
    """A prompt's last token and the `new_tokens` sampled after it (the bigrams a detector scores)."""
    prompt = [2, 17, 40, 3]
    tokens = Generator(model).generate([prompt], new_tokens, sampling, seed=seed)[0]
    assert len(tokens) == new_tokens
    return prompt[-1:] + tokens


def test_watermarked_samples_are_detected_and_plain_ones_or_a_wrong_key_are_not(model):
    marked = sample_generation(model, SamplingParams(temperature=1.0, watermark=STRONG))
    plain = sample_generation(model, SamplingParams(temperature=1.0))
    found = wm.detect(marked, STRONG)
    assert found.z > 4 and found.p_value < 1e-4 and found.green_fraction > 0.6
    assert abs(wm.detect(plain, STRONG).z) < 2
    assert abs(wm.detect(marked, wm.WatermarkParams(KEY + 1, 0.25)).z) < 2


def greedy_by_forward(model, prompt, new_tokens, params=None):
    """Greedy decoding by full forward passes, of the logits watermarked with `params` when given (the bias follows
    each previous token). Right padding to a fixed length keeps it one compilation: no position attends ahead."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        padded = jnp.array([tokens + [0] * (32 - len(tokens))])
        logits = forward(model, padded)[:, len(tokens) - 1]
        if params is not None:
            logits = wm.watermark_logits(logits, jnp.array(tokens[-1:]), params)
        tokens.append(int(jnp.argmax(logits)))
    return tokens[len(prompt) :]


def test_greedy_watermarked_generation_takes_the_argmax_of_the_biased_logits(model):
    prompt = [2, 11, 12, 40]
    want = greedy_by_forward(model, prompt, 8, STRONG)
    assert Generator(model).generate([prompt], 8, SamplingParams(watermark=STRONG)) == [want]
    assert want != greedy_by_forward(model, prompt, 8)


def test_sample_needs_the_previous_tokens_for_a_watermark():
    with pytest.raises(ValueError, match="previous token"):
        sample(jnp.zeros((1, 8)), jax.random.key(0), SamplingParams(watermark=STRONG), jnp.zeros((1, 8), bool))


def test_a_watermarked_row_and_a_plain_row_sample_as_each_would_alone():
    logits = jax.random.normal(jax.random.key(0), (2, 300))
    seen, previous = jnp.zeros((2, 300), bool), jnp.array([31, 31])
    keys = jax.random.split(jax.random.key(1), 2)
    draw = jax.jit(sample_rows)
    for temperature in (0.0, 1.0):
        rows = [SamplingParams(temperature, watermark=STRONG), SamplingParams(temperature, top_k=50)]
        both = draw(logits, keys, RowSampling.stack(rows), seen, previous)
        for row in range(2):
            alone = draw(logits[row : row + 1], keys[row : row + 1], RowSampling.stack(rows[row : row + 1]),
                         seen[:1], previous[:1])  # fmt: skip
            assert int(both[row]) == int(alone[0])
        plain = draw(logits[1:], keys[1:], RowSampling.stack(rows[1:]), seen[:1])  # No previous: no watermark.
        assert int(plain[0]) == int(both[1])
    # Over many draws the watermarked row lands on green tokens far more often than the plain row.
    rows = RowSampling.stack([SamplingParams(1.0, watermark=STRONG), SamplingParams(1.0)])
    green = np.asarray(wm.green_mask(STRONG.key_words, previous[:1], STRONG.threshold, 300))[0]
    draws = np.array([draw(logits, jax.random.split(jax.random.key(i), 2), rows, seen, previous) for i in range(64)])
    assert green[draws[:, 0]].mean() > 0.8 and green[draws[:, 1]].mean() < 0.5


def engine_tokens(engine, prompt, max_tokens, sampling):
    events = queue.Queue()
    engine.submit(Request(prompt, max_tokens, sampling, seed=3), events.put)
    tokens = []
    while not isinstance(event := events.get(timeout=60), Finished):
        assert isinstance(event, Token)
        tokens.append(event.token_id)
    assert event.reason == "length", event
    return tokens


def test_a_watermarking_server_watermarks_every_request(model, tokenizer):
    prompt = [2, 11, 12, 40]
    engine = Engine(model, tokenizer, max_batch_size=2, max_cache_len=256, watermark=STRONG).start()
    plain_engine = Engine(model, tokenizer, max_batch_size=2, max_cache_len=256).start()
    try:
        # Greedy: the prefill's and every decode step's bias follow the previous token exactly.
        assert engine_tokens(engine, prompt, 8, SamplingParams()) == greedy_by_forward(model, prompt, 8, STRONG)
        marked = engine_tokens(engine, prompt, 200, SamplingParams(temperature=1.0))
        plain = engine_tokens(plain_engine, prompt, 200, SamplingParams(temperature=1.0))
    finally:
        engine.stop()
        plain_engine.stop()
    assert wm.detect(prompt[-1:] + marked, STRONG).z > 4
    assert abs(wm.detect(prompt[-1:] + plain, STRONG).z) < 2


def test_the_http_server_watermarks_completions_and_shows_the_key_nowhere(model, tokenizer):
    prompt = [2, 11, 12, 40]
    settings = api.ServeSettings("wm", max_batch_size=2, max_cache_len=64, watermark=STRONG)
    with bench.background_server(api.create_app(model, tokenizer, settings)) as url:
        body = {"model": "wm", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        pages = [httpx.get(f"{url}{path}", timeout=10).text for path in ("/health", "/metrics", "/v1/models")]
    assert answer.status_code == 200, answer.text
    stream = TextStream(tokenizer, (), prompt[-1])
    stream.ids = greedy_by_forward(model, prompt, 8, STRONG)
    assert answer.json()["choices"][0]["text"] == stream.text()
    for page in [answer.text, *pages]:
        assert str(KEY) not in page and hex(KEY)[2:] not in page.lower()


def watermarked_words(tokenizer, params, count=60):
    """Spanish text written word by word, each time the unused word whose tokens are most often green after the
    token before them: a watermarked text whose own tokenization carries the mark (SentencePiece encodes each
    space-separated word alone, so the text's tokens are its words' tokens)."""
    words = sorted({word for text in conllu_texts()[:100] for word in text.split()})
    pieces = {word: tokenizer.encode(word) for word in words}
    text, previous = [], tokenizer.bos_id

    def green_fraction(word):
        ids = np.array([previous] + pieces[word])
        return np.mean(wm.token_hash(wm.row_seed(params.key_words, ids[:-1]), ids[1:]) < params.threshold)

    for _ in range(count):
        word = max(words, key=green_fraction)
        words.remove(word)
        text.append(word)
        previous = pieces[word][-1]
    return " ".join(text)


def test_detect_script_finds_the_watermark_in_text_and_refuses_short_texts(tokenizer, tmp_path):
    text = watermarked_words(tokenizer, STRONG)
    want = wm.detect(tokenizer.encode(text), STRONG)
    assert want.z > 4
    path = tmp_path / "texto.txt"
    path.write_text(text, encoding="utf-8")
    common = [f"--tokenizer={tokenizer.path}", f"--watermark_key={KEY}"]
    found = run_script("detect_watermark.py", *common, f"--file={path}", "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == pytest.approx(
        {"tokens": len(tokenizer.encode(text)), "scored": want.scored, "green": want.green,
         "green_fraction": want.green_fraction, "gamma": 0.25, "z": want.z, "p_value": want.p_value,
         "z_threshold": 4.0, "watermarked": True}
    )  # fmt: skip
    short = run_script("detect_watermark.py", *common, "--text=Hola.")
    assert short.returncode != 0 and "distinct token bigrams to score" in short.stderr and "longer text" in short.stderr
    empty = run_script("detect_watermark.py", *common, "--text=  ")
    assert empty.returncode != 0 and "--text is empty" in empty.stderr


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("sample.py", ["--prompt=Hola", "--watermark_key=1", "--watermark_gamma=1.5"], "gamma=1.5"),
        ("serve.py", ["--watermark_delta=3"], "--watermark_gamma and --watermark_delta need --watermark_key"),
    ],
)
def test_bad_watermark_flags_are_refused_before_the_run_is_loaded(tmp_path, script, flags, message):
    result = run_script(script, f"--workdir={tmp_path}", *flags)  # Not a run: loading it would fail otherwise.
    assert result.returncode != 0 and message in result.stderr, result.stderr
