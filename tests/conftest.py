"""Test set-up: CPU only, 8 simulated devices, a persistent compilation cache shared across runs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Must happen before any JAX operation creates the backend.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update(
    "jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from flax import nnx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import tiny_es  # noqa: E402
from llm.data import records  # noqa: E402

TINY_SEQ_LEN = 32
TINY_VOCAB = 128


def tiny_config(**overrides):
    """tiny_es shrunk to a few thousand parameters: compiles in seconds, shards on a (2, 2, 2) mesh."""
    config = tiny_es.get_config()
    model = config.model
    model.vocab_size, model.max_seq_len, model.num_layers = TINY_VOCAB, TINY_SEQ_LEN, 2
    model.embed_dim, model.num_heads, model.num_kv_heads, model.mlp_dim = 32, 4, 2, 64
    config.data.seq_len = TINY_SEQ_LEN
    config.train.update(num_steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2,
                        checkpoint_every=10)
    config.optimizer.update(learning_rate=1e-2, warmup_steps=2)
    for dotted, value in overrides.items():
        section, key = dotted.split("__") if "__" in dotted else (None, dotted)
        (config[section] if section else config)[key] = value
    return config


def pattern_rows(num_rows: int, seq_len: int, vocab: int, seed: int):
    """Packed rows of 2 documents each; every document is an arithmetic progression of token ids, so a
    model can learn to continue it and the loss must fall."""
    rng = np.random.default_rng(seed)
    for _ in range(num_rows):
        cut = int(rng.integers(seq_len // 4, 3 * seq_len // 4))
        tokens, segments, positions = [], [], []
        for segment, length in ((1, cut), (2, seq_len - cut)):
            start, stride = rng.integers(4, vocab), rng.integers(1, 4)
            tokens += [4 + (start + stride * i) % (vocab - 4) for i in range(length)]
            segments += [segment] * length
            positions += list(range(length))
        yield {"tokens": np.array(tokens), "segment_ids": np.array(segments), "positions": np.array(positions),
               "loss_mask": (np.array(positions) > 0).astype(np.int32)}


def write_dataset(path, seq_len=TINY_SEQ_LEN, vocab=TINY_VOCAB, train_rows=256, validation_rows=32):
    records.write_shards(pattern_rows(train_rows, seq_len, vocab, seed=0), str(path / "train"), num_shards=2)
    records.write_shards(pattern_rows(validation_rows, seq_len, vocab, seed=1), str(path / "validation"), 1)
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@nnx.jit(static_argnames=())
def forward(model, tokens, positions=None, segment_ids=None, dropout_key=None):
    """The model's logits, jitted: one compilation instead of hundreds of eagerly dispatched ops."""
    return model(tokens, positions, segment_ids, dropout_key=dropout_key)
