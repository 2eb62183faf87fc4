"""Contrastive embedder training: the ranking loss against numpy, Matryoshka prefixes, the inverse-cloze miner
and its refusal of XQuAD, pairs-file errors, and a tiny embedder that learns, resumes and embeds as trained."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import crash_then_resume, metrics_entries, run_script, saved_state, tiny_config

from llm import config_validation
from llm.data import records
from llm.eval import tasks
from llm.finetune_data import contrastive
from llm.io import SourceError
from llm.model import pooling
from llm.rag.embeddings import Embedder
from llm.tokenizer import load_tokenizer
from llm.train import contrastive_loss, loop

SUBJECTS = ["La niña", "El señor García", "Mi abuela", "El pingüino", "La compañía", "Un músico", "La ciudad"]
VERBS = ["canta", "escribe", "cocina", "estudia", "camina", "trabaja", "sueña"]
OBJECTS = ["una canción", "en el jardín", "por la mañana", "con alegría", "junto al río", "en español"]


def numpy_loss(q, p, n, has_negative, temperature, dims):
    """InfoNCE written out per query: softmax over all positives and the hard negatives present."""
    losses_, correct = np.zeros(len(q)), np.zeros(len(q))
    for dim in dims:
        unit = [x[:, :dim] / np.linalg.norm(x[:, :dim], axis=1, keepdims=True) for x in (q, p, n)]
        for i in range(len(q)):
            scores = [unit[0][i] @ unit[1][j] / temperature for j in range(len(q))]
            scores += [unit[0][i] @ unit[2][j] / temperature for j in range(len(q)) if has_negative[j]]
            losses_[i] += (np.log(np.sum(np.exp(scores))) - scores[i]) / len(dims)
            if dim == dims[0]:
                correct[i] = float(np.argmax(scores) == i)
    return losses_, correct


@pytest.mark.parametrize(
    "has_negative, dims",
    [
        ([False, False, False, False], (8,)),  # in-batch negatives only
        ([True, True, True, True], (8,)),  # every query with a hard negative
        ([True, False, True, False], (8,)),  # absent negatives masked out
        ([True, False, True, True], (8, 2, 4)),  # Matryoshka: the full width and two prefixes
    ],
)
def test_ranking_loss_equals_the_hand_computed_value(has_negative, dims):
    q, p, n = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    has_negative = np.array(has_negative)
    loss, correct = contrastive_loss.ranking_loss(q, p, n, jnp.asarray(has_negative), 0.5, dims)
    want_loss, want_correct = numpy_loss(q, p, n, has_negative, 0.5, dims)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_array_equal(correct, want_correct)
    grads = jax.grad(lambda x: contrastive_loss.ranking_loss(x, p, n, has_negative, 0.5, dims)[0].sum())(q)
    assert np.isfinite(grads).all()  # masked negatives (-inf logits) leave no NaN behind


def test_matryoshka_truncation_keeps_unit_norm():
    hidden = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 7.0
    segment_ids = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    for name in pooling.POOLINGS:
        full = pooling.pool(hidden, segment_ids, name)
        for dim in (4, 8, 16):
            norms = np.linalg.norm(pooling.truncate(full, dim)[:2], axis=-1)
            np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    assert np.all(pooling.truncate(pooling.pool(hidden, segment_ids, "mean"), 4)[2] == 0)  # padding only: 0
    with pytest.raises(ValueError, match="Cannot truncate 16-dimensional embeddings to 17"):
        pooling.truncate(full, 17)


def write_corpus(path, plant_xquad=False):
    """A corpus directory: JSONL shards whose paragraphs each keep one subject and object (so a sentence
    points to the rest of its paragraph), a Markdown file with a heading, and optionally an XQuAD-es context
    planted as one paragraph."""
    os.makedirs(path, exist_ok=True)
    paragraphs = [
        " ".join(f"{subject} {verb} {obj}." for verb in VERBS[k % 3 : k % 3 + 4])
        for k, (subject, obj) in enumerate((s, o) for s in SUBJECTS for o in OBJECTS)
    ]
    if plant_xquad:
        paragraphs[5] = xquad_context()
    with open(os.path.join(path, "docs-00000.jsonl"), "w", encoding="utf-8") as f:
        for index in range(0, len(paragraphs), 3):
            text = "\n\n".join(paragraphs[index : index + 3])
            f.write(json.dumps({"id": f"d{index}", "text": text, "metadata": {"source": "test"}}) + "\n")
    with open(os.path.join(path, "guia.md"), "w", encoding="utf-8") as f:
        f.write("# La cocina de mi abuela\n\nMi abuela cocina por la mañana. Mi abuela canta junto al río.\n")
    return str(path)


def xquad_context():
    return tasks.read_xquad(tasks.data_file(tasks.DEFAULT_DATA_DIR, tasks.XQUAD_FILE))[1][0].context


def test_miner_makes_inverse_cloze_pairs_and_drops_planted_xquad(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", plant_xquad=True)
    drops = contrastive.Drops("skip")
    mined = list(contrastive.mine_pairs(corpus, 0, drops))
    kept = contrastive._collect(mined, True, False, drops)
    assert drops.counts["eval_overlap"] == 1 and len(kept) == len(mined) - 1
    planted = xquad_context()
    assert not any(planted[:60] in e.query + e.positive for _, e in kept)
    assert ("La cocina de mi abuela", "Mi abuela cocina por la mañana. Mi abuela canta junto al río.") in {
        (e.query, e.positive) for _, e in kept
    }
    for _, example in kept[:-2]:  # (the Markdown file's two pairs come last)
        assert example.query.endswith(".") and example.query not in example.positive
        assert example.query.split()[-1] == example.positive.split()[-1]  # same paragraph, same object
    again = [e for _, _, e in contrastive.mine_pairs(corpus, 0, contrastive.Drops("skip"))]
    other = [e for _, _, e in contrastive.mine_pairs(corpus, 1, contrastive.Drops("skip"))]
    assert again == [e for _, _, e in mined] and other != again  # the seed chooses the query sentence


def test_eval_overlap_catches_a_copied_question_and_a_stretch_across_sentences():
    overlap = contrastive.EvalOverlap(
        [
            "Primera frase con muchas palabras para el ejemplo de hoy. Segunda frase que también tiene palabras.",
            "¿Cuál es la capital de Francia?",
        ]
    )
    assert overlap.overlaps("Pregunta: ¿cuál es la CAPITAL de  francia?")  # a sentence, whatever case and spacing
    assert overlap.overlaps("con muchas palabras para el ejemplo de hoy. Segunda frase que también tiene")  # 13 words
    assert not overlap.overlaps("La capital de Francia es París. Primera frase con muchas palabras.")


def write_pairs(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_pairs_file_errors_name_file_line_and_key(tmp_path, tokenizer):
    good = {"query": "¿Quién canta?", "positive": "La niña canta una canción."}
    more = [{"query": f"¿Quién {verb}?", "positive": f"Mi abuela {verb} en el jardín."} for verb in VERBS[1:4]]
    cases = [
        ('{"query": "x",', r"pairs.jsonl:2: not valid JSON"),
        ({"query": "¿Quién?"}, r'pairs.jsonl:2: "positive" must be a non-empty string'),
        ({**good, "negative": 3}, r'pairs.jsonl:2: "negative" must be a non-empty string'),
        ({**good, "positive": xquad_context()}, r"pairs.jsonl:2: the 'positive' text overlaps the XQuAD-es"),
    ]
    for line, message in cases:
        path = write_pairs(tmp_path / "pairs.jsonl", [good, line, *more])
        with pytest.raises(SourceError, match=message):
            contrastive.prepare_pairs(path, tokenizer.path, str(tmp_path / "out"), 32)
    report = contrastive.prepare_pairs(path, tokenizer.path, str(tmp_path / "out"), 32, drop_eval_overlap=True)
    assert report["pairs"]["kept"] == 4 and report["drops"]["eval_overlap"]["first"] == [f"{path}:2"]
    result = run_script(
        "prepare_pairs.py", f"--pairs={path}", f"--tokenizer={tokenizer.path}", f"--output_dir={tmp_path / 'cli'}"
    )
    assert result.returncode != 0 and "pairs.jsonl:2: the 'positive' text overlaps" in result.stderr


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("matryoshka_dims", "16,x", r"config.train.matryoshka_dims='16,x': 'x' is not a width between 1 and config"),
        ("matryoshka_dims", "32", r"'32' is not a width between 1 and config.model.embed_dim - 1 = 31"),
        ("contrastive_temperature", 0.0, r"config.train.contrastive_temperature=0.0 must be > 0"),
        ("contrastive_pooling", "max", r"config.train.contrastive_pooling='max' is not one of \('mean', 'last'\)"),
    ],
)
def test_bad_contrastive_settings_name_the_key(key, value, message):
    config = tiny_config(train__objective="contrastive", **{f"train__{key}": value})
    with pytest.raises(config_validation.ConfigError, match=message):
        config_validation.validate(config)


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("contrastive")
    corpus = write_corpus(path / "corpus")
    out = str(path / "pairs")
    report = contrastive.prepare_pairs(corpus, tokenizer.path, out, 32, mine=True, min_validation_pairs=8)
    return out, report


def encoded_pairs(data, split):
    """(query ids, positive ids, negative ids or ()) of every record of a split: the tokens of each side's text."""
    paths = records.shard_paths(os.path.join(data, split))
    rows = [row for path in paths for row in records.iterate_shard(path, records.decode_triple)]
    return {
        tuple(tuple(row[f"{side}_tokens"][row[f"{side}_segment_ids"] == 1]) for side in records.CONTRASTIVE_SIDES)
        for row in rows
    }


def test_validation_pairs_jsonl_is_the_held_out_split_as_text(pairs_data, tmp_path, tokenizer):
    data, report = pairs_data
    mined = {
        i: e
        for i, _, e in contrastive.mine_pairs(
            os.path.join(os.path.dirname(data), "corpus"), 0, contrastive.Drops("skip")
        )
    }
    with open(os.path.join(data, report["validation_pairs"]), encoding="utf-8") as f:
        held_out = [json.loads(line) for line in f]
    assert len({pair["id"] for pair in held_out}) == len(held_out) == report["splits"]["validation"]["pairs"]
    assert all(
        pair == {"id": pair["id"], "query": mined[pair["id"]].query, "positive": mined[pair["id"]].positive}
        for pair in held_out
    )
    spm = load_tokenizer(tokenizer.path)
    texts = {
        (
            tuple(contrastive.encode_text(spm, "consulta: ", pair["query"], 32)),
            tuple(contrastive.encode_text(spm, "pasaje: ", pair["positive"], 32)),
            (),
        )
        for pair in held_out
    }
    assert encoded_pairs(data, "validation") == texts and not encoded_pairs(data, "train") & texts
    # A pairs file's negatives are held out too, under the ids "<file name>:<line>".
    lines = [
        {"query": f"¿Quién {verb}?", "positive": f"Mi abuela {verb}.", "negative": f"Nadie {verb}."} for verb in VERBS
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    contrastive.prepare_pairs(str(path), tokenizer.path, str(tmp_path / "out"), 32, min_validation_pairs=2)
    with open(tmp_path / "out" / "validation_pairs.jsonl", encoding="utf-8") as f:
        held_out = [json.loads(line) for line in f]
    assert len(held_out) == 2 and all(
        pair == {"id": pair["id"], **lines[int(pair["id"].split(":")[1]) - 1]} for pair in held_out
    )


def contrastive_config(data_path, **train):
    config = tiny_config(train__objective="contrastive")
    config.model.vocab_size = 320  # the conftest tokenizer's pieces
    config.data.path = data_path
    config.train.update(dict(num_steps=30, log_every=2, eval_every=15, eval_batches=1, checkpoint_every=10, **train))
    config.optimizer.update(learning_rate=3e-3, warmup_steps=2)
    return config


def test_a_tiny_embedder_learns_mined_pairs_resumes_and_embeds_as_trained(pairs_data, tmp_path, monkeypatch):
    data, report = pairs_data
    assert report["pairs"]["kept"] >= 40 and report["splits"]["validation"]["pairs"] >= 8
    config = contrastive_config(data, contrastive_learn_temperature=True, matryoshka_dims="16")
    uninterrupted = str(tmp_path / "uninterrupted")
    loop.train(config, uninterrupted)
    entries = [e for e in metrics_entries(uninterrupted) if "accuracy" in e]
    assert np.mean([e["loss"] for e in entries[-3:]]) < 0.7 * np.mean([e["loss"] for e in entries[:3]])
    assert entries[-1]["temperature"] != pytest.approx(0.05)  # the temperature trained
    assert {"eval_loss", "eval_accuracy"} <= set(metrics_entries(uninterrupted)[-1])

    resumed, saved, trained = crash_then_resume(config, str(tmp_path / "crashed"), monkeypatch, batches=15)
    assert saved == 10 and resumed.start_step == 10 and resumed.steps_run == trained == 20
    want, got = saved_state(config, uninterrupted), saved_state(config, str(tmp_path / "crashed"))
    assert contrastive_loss.LOG_TEMPERATURE in want["params"]
    jax.tree.map(np.testing.assert_array_equal, want, got)

    embedder = Embedder.from_run(uninterrupted)  # pooling and prefixes default to the run's training
    assert embedder.prefixes == {"query": "consulta: ", "passage": "pasaje: "} and embedder.pooling == "mean"
    assert Embedder.from_run(uninterrupted, pooling="last").pooling == "last"  # explicit options win
    text = "La niña canta una canción junto al río, y el señor García escribe en el jardín por la mañana."
    for kind, prefix in (("query", "consulta: "), ("passage", "pasaje: ")):  # the data's rows are the embedder's
        assert embedder.encode(text, kind) == contrastive.encode_text(embedder.tokenizer, prefix, text, 32)


def test_data_prepared_with_other_prefixes_is_refused(pairs_data, tmp_path):
    config = contrastive_config(pairs_data[0], query_prefix="query: ")
    with pytest.raises(config_validation.ConfigError, match=r"config.train.query_prefix='query: ' differs from"):
        loop.train(config, str(tmp_path))
