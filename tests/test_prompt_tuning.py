"""Prompt tuning: a learned soft prompt that every document reads first, trained alone on a frozen model.

The reference semantics (Lester et al. 2021) is "virtual tokens in front of the input": a model with a soft
prompt must compute what the same model computes with extra vocabulary rows holding the prompt, fed in
front of each document. Generation (KV cache), serving and training all follow from that.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_VOCAB, crash_then_resume, finetune_config, forward, metrics_entries, saved_state, tiny_config
from flax import nnx
from test_serve_engine import generate_with_engine

from llm import config_validation
from llm.infer import generate
from llm.infer.generate import Generator
from llm.model.transformer import create_model
from llm.runs import loading
from llm.serve.engine import Engine
from llm.train import loop

PROMPT = 3


def _with_virtual_tokens(model):
    """The same model without a soft prompt but with PROMPT extra vocabulary rows that hold it."""
    config = tiny_config(model__vocab_size=TINY_VOCAB + PROMPT, model__position_encoding=model.cfg.position_encoding)
    reference = create_model(config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    prompt = params.pop("soft_prompt")
    params["embed"]["embedding"] = jnp.concatenate([params["embed"]["embedding"], prompt])
    state = nnx.state(reference, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(reference, state)
    return reference


@pytest.mark.parametrize("position_encoding", ["rope", "learned"])
def test_soft_prompt_equals_virtual_tokens_in_front_of_every_packed_document(position_encoding):
    model = create_model(tiny_config(model__soft_prompt_length=PROMPT, model__position_encoding=position_encoding))
    reference = _with_virtual_tokens(model)
    documents = [[2, 40, 41, 42, 43, 44], [2, 77, 78, 79, 3]]
    tokens = np.zeros((1, 16), np.int32)
    positions, segment_ids = np.zeros_like(tokens), np.zeros_like(tokens)
    start = 0
    for segment, document in enumerate(documents, start=1):
        end = start + len(document)
        tokens[0, start:end], positions[0, start:end], segment_ids[0, start:end] = (
            document,
            range(len(document)),
            segment,
        )
        start = end
    packed = forward(model, tokens, positions, segment_ids)
    start = 0
    for document in documents:
        virtual = list(range(TINY_VOCAB, TINY_VOCAB + PROMPT))
        alone = forward(reference, jnp.array([virtual + document]))[0, PROMPT:, :TINY_VOCAB]
        np.testing.assert_allclose(packed[0, start : start + len(document)], alone, atol=1e-5)
        start += len(document)


def test_generation_with_a_soft_prompt_continues_like_the_full_forward_pass():
    model = create_model(tiny_config(model__soft_prompt_length=PROMPT))
    prompt = [2, 40, 41, 42, 43]
    greedy = list(prompt)
    for _ in range(4):  # greedy decoding by hand: the whole sequence through the model each time
        greedy.append(int(jnp.argmax(forward(model, jnp.array([greedy]))[0, -1])))
    # Generation reads the prompt's keys and values from the cache (Transformer.init_cache).
    assert Generator(model).generate([prompt], 4)[0] == greedy[len(prompt) :]


@pytest.fixture(scope="module")
def prompt_config(trained_run):
    config = finetune_config(trained_run, trainable="soft_prompt")
    config.model.soft_prompt_length = 4
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
    return config


@pytest.fixture(scope="module")
def prompt_run(prompt_config, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("prompt_tuning"))
    loop.train(prompt_config, workdir)
    return workdir


def test_prompt_tuning_trains_only_the_prompt_and_lowers_the_loss(trained_run, prompt_config, prompt_run):
    state = saved_state(prompt_config, prompt_run)
    assert list(state["params"]) == ["soft_prompt"] and state["params"]["soft_prompt"].shape == (4, 32)
    moments = jax.tree.leaves(state["opt_state"][1][0].mu)
    assert sum(x.size for x in moments) == 4 * 32  # optimizer state for the prompt only
    evals = [e["eval_loss"] for e in metrics_entries(prompt_run) if "eval_loss" in e]
    assert evals[-1] < evals[0]
    # The frozen model is the base, bit for bit; the loaded run reads the prompt in front of it.
    tuned, base = loading.load_run(prompt_run).model, loading.load_run(trained_run).model
    assert tuned.prompt_length == 4
    np.testing.assert_array_equal(tuned.soft_prompt[...], state["params"]["soft_prompt"][...])
    base_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    tuned_params = nnx.to_pure_dict(nnx.state(tuned, nnx.Param))
    tuned_params.pop("soft_prompt")
    jax.tree.map(np.testing.assert_array_equal, tuned_params, base_params)


def test_prompt_tuning_resumes_bit_exactly_after_a_crash(prompt_config, prompt_run, tmp_path, monkeypatch):
    resumed, saved, trained = crash_then_resume(prompt_config, str(tmp_path), monkeypatch, batches=6)
    assert saved == 4 and resumed.start_step == 4  # the last checkpoint before the crash during step 7
    assert resumed.steps_run == trained == 12 - 4
    jax.tree.map(
        np.testing.assert_array_equal, saved_state(prompt_config, prompt_run), saved_state(prompt_config, str(tmp_path))
    )


def test_a_prompt_tuned_run_serves_like_its_generator(prompt_run):
    run = loading.load_run(prompt_run)
    prompt = run.tokenizer.encode("La niña canta", add_bos=True)
    want = generate.run_generator(run).generate([prompt], 6)[0]
    engine = Engine(run.model, run.tokenizer, max_batch_size=2).start()
    try:
        first = [t.token_id for t in generate_with_engine(engine, prompt, 6)]
        second = [t.token_id for t in generate_with_engine(engine, prompt, 6)]  # a reused slot
    finally:
        engine.stop()
    assert first == second == want


def test_prompt_tuning_configs_are_checked(trained_run):
    config = finetune_config(trained_run, trainable="soft_prompt")
    with pytest.raises(config_validation.ConfigError, match="soft_prompt_length > 0"):
        config_validation.validate(config)
    config.model.soft_prompt_length = 120  # the trained run's context is 128 and its rows 32 long
    with pytest.raises(config_validation.ConfigError, match="soft_prompt_length=120 exceeds"):
        config_validation.validate(config)
