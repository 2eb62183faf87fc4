"""Test set-up: CPU only, 8 simulated devices, a persistent compilation cache shared across runs."""

import contextlib
import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Must happen before any JAX operation creates the backend.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny_es
from llm import checkpoint, sharding
from llm.data import loader, records
from llm.model.kv_cache import KVCache
from llm.runs import directory, loading
from llm.tokenizer import train_tokenizer
from llm.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SEQ_LEN = 32
TINY_VOCAB = 128


def tiny_config(**overrides):
    """tiny_es shrunk to a few thousand parameters: compiles in seconds, shards on a (2, 2, 2) mesh."""
    config = tiny_es.get_config()
    model = config.model
    model.vocab_size, model.max_seq_len, model.num_layers = TINY_VOCAB, TINY_SEQ_LEN, 2
    model.embed_dim, model.num_heads, model.num_kv_heads, model.mlp_dim = 32, 4, 2, 64
    config.data.seq_len = TINY_SEQ_LEN
    config.train.update(num_steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10)
    config.train.track_emissions = False  # codecarbon takes seconds to start: tests/test_tracking.py turns it on
    config.optimizer.update(learning_rate=1e-2, warmup_steps=2)
    for dotted, value in overrides.items():
        section, key = dotted.split("__") if "__" in dotted else (None, dotted)
        (config[section] if section else config)[key] = value
    return config


def assert_cached_decode_equals_forward(model, tokens, prefill: int = 5) -> None:
    """Prefilling `prefill` tokens into a KV cache and then decoding one token at a time gives the logits of one
    full forward pass over `tokens` (1, length)."""
    full = forward(model, tokens)
    cache = KVCache.create(model.cfg, batch=1, max_len=16)
    ones = jnp.ones_like(tokens)
    logits, cache = model.decode(tokens[:, :prefill], jnp.arange(prefill)[None], ones[:, :prefill], cache)
    np.testing.assert_allclose(logits, full[:, :prefill], atol=1e-5)
    for t in range(prefill, tokens.shape[1]):
        logits, cache = model.decode(tokens[:, t : t + 1], jnp.array([[t]]), ones[:, :1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
    assert cache.index.tolist() == [tokens.shape[1]]


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
        yield {
            "tokens": np.array(tokens),
            "segment_ids": np.array(segments),
            "positions": np.array(positions),
            "loss_mask": (np.array(positions) > 0).astype(np.int32),
        }


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


def finetune_config(trained_run, **train):
    """The trained run's config, fine-tuning from it (`init_from`) for 12 steps with checkpoints every 4."""
    config = directory.load_config(trained_run)
    config.init_from = trained_run
    config.train.update({**dict(num_steps=12, log_every=2, eval_every=6, checkpoint_every=4), **train})
    return config


def metrics_entries(workdir):
    """The entries of a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@contextlib.contextmanager
def one_device_steps(config, num_steps):
    """(mesh, compiled steps) of `config` on a one-device mesh, used inside that mesh."""
    mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    with sharding.use_mesh(mesh, config.logical_axis_rules):
        yield mesh, step_lib.build_steps(config, mesh, num_steps=num_steps)


def saved_state(config, workdir):
    """The train state (step, trainable params, optimizer state) of a run's latest checkpoint."""
    with one_device_steps(config, 12) as (_, steps):
        saver = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
        state, _, _ = saver.restore(saver.latest_step(), steps.abstract_state)
        saver.close()
    return state


def crash_after(monkeypatch, batches):
    """Makes the data iterator raise after `batches` batches: a crash in the middle of training."""
    original, served = loader.TrainIterator.__next__, [0]

    def crashing_next(self):
        served[0] += 1
        if served[0] > batches:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    monkeypatch.setattr(loader.TrainIterator, "__next__", crashing_next)


def record_batches(monkeypatch):
    """The batches the data iterator serves from now on (one per train step), in a list that fills as it runs."""
    original, served = loader.TrainIterator.__next__, []

    def recording_next(self):
        served.append(original(self))
        return served[-1]

    monkeypatch.setattr(loader.TrainIterator, "__next__", recording_next)
    return served


def latest_checkpoint(workdir):
    """The highest complete checkpoint step on disk (Orbax renames a checkpoint into place when done)."""
    return max(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def crash_then_resume(config, workdir, monkeypatch, batches):
    """Trains until the data iterator has served `batches` batches, crashes, then trains again in `workdir`.

    Returns the second call's TrainResult, the checkpoint step the crash left, and the number of batches the
    second call drew: the steps it really trained, counted outside the trainer.
    """
    from llm.train import loop

    crash_after(monkeypatch, batches)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, workdir)
    monkeypatch.undo()
    saved = latest_checkpoint(workdir)
    drawn = record_batches(monkeypatch)
    result = loop.train(config, workdir)
    monkeypatch.undo()
    return result, saved, len(drawn)


SUBJECTS = ["La niña", "El señor García", "Mi abuela", "El pingüino", "La compañía", "Un músico", "La ciudad"]
VERBS = ["canta", "escribe", "cocina", "estudia", "camina", "trabaja", "sueña"]
OBJECTS = [
    "una canción",
    "en el jardín",
    "por la mañana",
    "con alegría",
    "junto al río",
    "en español",
    "después de la reunión",
]


def spanish_documents(count: int) -> list[str]:
    """Deterministic little Spanish documents (accents, ñ, ü, ¿?, ¡!) for tokenizer and end-to-end tests."""
    docs = []
    for i in range(count):
        sentences = [f"{SUBJECTS[(i + j) % 7]} {VERBS[(i * 3 + j) % 7]} {OBJECTS[(i + 2 * j) % 7]}." for j in range(4)]
        docs.append(" ".join(sentences) + f" ¿Quién lo sabe? ¡Nadie, {i}!")
    return docs


def run_script(name: str, *flags: str, stdin: str | None = None, timeout: int = 300, **kwargs):
    """scripts/NAME run by this interpreter on the CPU, with its output captured as text."""
    command = [sys.executable, os.path.join(REPO, "scripts", name), *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(command, capture_output=True, text=True, input=stdin, timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A 320-piece SentencePiece tokenizer trained on `spanish_documents`."""
    return train_tokenizer(spanish_documents(100), str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=320)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A complete little run directory: tokenizer, packed data and 30 trained steps (shared by the tests of
    inference, evaluation and the command-line tools)."""
    from llm.data import packing
    from llm.tokenizer import train_tokenizer
    from llm.train import loop

    data_dir = tmp_path_factory.mktemp("run_data")
    tokenizer = train_tokenizer(spanish_documents(200), str(data_dir / "tokenizer"), vocab_size=320)
    docs = [(f"doc{i}", tokenizer.encode(text)) for i, text in enumerate(spanish_documents(400))]
    validation_ids = packing.split_train_validation([(i, len(t) + 2) for i, t in docs], TINY_SEQ_LEN, 0.1, 8)
    packing.write_packed_splits(
        docs,
        str(data_dir),
        TINY_SEQ_LEN,
        validation_ids,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    # A context longer than the training rows leaves room for chat prompts (RoPE needs no position table).
    config = tiny_config(model__vocab_size=tokenizer.vocab_size, model__max_seq_len=128)
    config.data.path = str(data_dir)
    config.train.update(num_steps=30, eval_every=30, checkpoint_every=30)
    workdir = tmp_path_factory.mktemp("run")
    loop.train(config, str(workdir))
    return str(workdir)


@pytest.fixture(scope="module")
def run(trained_run):
    """The trained run loaded for inference (once per test module)."""
    return loading.load_run(trained_run)
