"""log p(target): one float32 computation that the whole distribution agrees with exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model.logprobs import log_normalizer, log_softmax, target_logprobs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_target_logprobs_are_the_log_softmax_at_the_targets(dtype):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 8, dtype)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 5)), jnp.int32)
    got = target_logprobs(logits, targets)
    assert got.dtype == jnp.float32 and got.shape == (2, 5)
    reference = jax.nn.log_softmax(logits.astype(jnp.float32))
    np.testing.assert_allclose(got, np.take_along_axis(reference, targets[..., None], -1)[..., 0], atol=1e-5)
    # Bit for bit what the whole distribution holds, so a token and its entry among the top alternatives agree.
    np.testing.assert_array_equal(got, np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0])
    np.testing.assert_array_equal(got, target_logprobs(logits, targets, log_normalizer(logits)))
