"""Sentence embeddings of an imported tiny random Llama against pooling of transformers' `last_hidden_state`."""

import numpy as np
import pytest
import torch
import transformers
from test_hf_export import saved_hf

from llm.hf import importer
from llm.rag.embeddings import Embedder
from llm.runs import loading

TEXTS = [
    "El niño comió paella.",
    "¿Dónde está la biblioteca?",
    "La lluvia en Sevilla es una maravilla, y el sol de Andalucía calienta las plazas en verano.",
    "Hola",
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, its directory with tokenizer, our imported run directory)."""
    path = tmp_path_factory.mktemp("embed")
    model, hf_dir = saved_hf("llama", path / "hf")
    return model, hf_dir, importer.import_hf(hf_dir, str(path / "run"))


@pytest.fixture(scope="module")
def run(llama):
    return loading.load_run(llama[2])


@pytest.fixture(scope="module")
def embedders(run):
    """pooling -> normalize -> Embedder of the imported run."""
    return {
        pooling: {normalize: Embedder(run.model, run.tokenizer, pooling, normalize) for normalize in (True, False)}
        for pooling in ("mean", "last")
    }


def transformers_embeddings(llama, texts, pooling, normalize):
    """Pooling of transformers' last_hidden_state over a right-padded batch, masked by the attention mask."""
    model, hf_dir, _ = llama
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.pad_token_id, tokenizer.padding_side = 0, "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()
    if pooling == "mean":
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    else:
        pooled = hidden[np.arange(len(texts)), mask.sum(1) - 1]
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True) if normalize else pooled


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_equal_pooled_transformers_hidden_states(pooling, normalize, llama, embedders):
    embedder = embedders[pooling][normalize]
    reference = transformers.AutoTokenizer.from_pretrained(llama[1])
    assert [embedder.encode(text) for text in TEXTS] == [reference(text)["input_ids"] for text in TEXTS]
    ours = embedder.embed(TEXTS)
    assert ours.shape == (len(TEXTS), 64) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, transformers_embeddings(llama, TEXTS, pooling, normalize), atol=1e-4, rtol=1e-4)
    norms = np.linalg.norm(ours, axis=-1)
    if normalize:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
        assert np.all(np.abs(norms - 1.0) > 1e-2)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_a_text_alone_equals_the_same_text_among_longer_ones(pooling, run, embedders):
    embedder = embedders[pooling][True]
    alone = embedder.embed(["Hola"])
    batched = embedder.embed(["Hola", TEXTS[2], TEXTS[2] + " " + TEXTS[2]])
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)
    small = Embedder(run.model, run.tokenizer, pooling, batch_size=2)  # The texts split and reordered.
    np.testing.assert_allclose(small.embed(TEXTS), embedder.embed(TEXTS), atol=1e-5)


def test_prefixes_are_applied_by_kind(llama, embedders):
    plain = embedders["mean"][True]
    prefixed = Embedder.from_run(llama[2], query_prefix="consulta: ", passage_prefix="pasaje: ")
    tokenizer = plain.tokenizer
    assert prefixed.encode("lluvia", "query") == plain.encode("consulta: lluvia")
    assert prefixed.encode("lluvia", "passage") == [tokenizer.bos_id] + tokenizer.encode("pasaje: lluvia")
    query = prefixed.embed(["lluvia en Sevilla"], kind="query")
    np.testing.assert_allclose(query, plain.embed(["consulta: lluvia en Sevilla"]), atol=1e-6)
    assert not np.allclose(query, plain.embed(["lluvia en Sevilla"], kind="query"), atol=1e-3)
    np.testing.assert_allclose(
        prefixed.embed(["lluvia"], kind="passage"), plain.embed(["pasaje: lluvia"], kind="passage"), atol=1e-6
    )
    with pytest.raises(ValueError, match="kind must be one of"):
        prefixed.embed(["lluvia"], kind="document")


def test_empty_inputs_and_long_texts(llama, embedders):
    embedder = embedders["last"][False]
    assert embedder.embed([]).shape == (0, 64) and embedder.embed([]).dtype == np.float32
    # An empty text is BOS alone: its embedding is BOS's final hidden state, the first position of any text.
    assert embedder.encode("") == [embedder.tokenizer.bos_id]
    model, hf_dir, _ = llama
    ids = transformers.AutoTokenizer.from_pretrained(hf_dir)(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        first = model.model(**ids).last_hidden_state.numpy()[:, 0]
    np.testing.assert_allclose(embedder.embed([""]), first, atol=1e-4)
    long = " ".join(TEXTS * 20)
    tokenizer = embedder.tokenizer
    assert embedder.encode(long) == ([tokenizer.bos_id] + tokenizer.encode(long))[: embedder.max_len]  # the start
    np.testing.assert_array_equal(embedder.embed([long]).shape, (1, 64))
    with pytest.raises(ValueError, match="pooling must be one of"):
        Embedder(None, None, pooling="max")
