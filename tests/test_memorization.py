"""Canaries planted by the corpus pipeline, and the memorization task: exposure, greedy and verbatim extraction."""

import json
import math
import shutil

import numpy as np
import pytest
from conftest import tiny_config
from test_data_pipeline import make_config

from llm.corpus import canaries as canaries_lib, local_runner, pipeline
from llm.data import packing, records
from llm.eval import memorization
from llm.runs import loading
from llm.tokenizer import load_tokenizer

REPEATS = 16
DATA_SEQ_LEN = 64  # make_config's pack.seq_len


# --- Fakes: a character-level "tokenizer" and models that know what they are told ---------------------------------


def fake_encode(prefix, secret):
    return [0] + [ord(c) for c in prefix], [int(d) for d in secret]


def canary(index, secret):
    return memorization.Canary(f"c{index}", f"La clave de la persona {index} es", secret)


def preferring(secrets):
    """Log-likelihoods of a model that gives the listed secrets 0 and every other one -1."""
    preferred = {tuple(fake_encode(c.prefix, c.secret)[1]) for c in secrets}
    return lambda requests: [0.0 if tuple(secret) in preferred else -1.0 for _, secret in requests]


def test_exposure_is_log2_n_plus_1_for_a_preferred_secret_and_about_one_bit_for_an_indifferent_model():
    planted = [canary(0, "038271"), canary(1, "550019")]
    exposures = memorization.canary_exposures(planted, fake_encode, preferring(planted), 1000, seed=0)
    assert exposures == pytest.approx([math.log2(1001)] * 2)
    indifferent = memorization.canary_exposures(planted, fake_encode, lambda r: [0.0] * len(r), 1000, seed=0)
    assert indifferent == pytest.approx([1.0] * 2, abs=0.01)
    # A secret the model likes less than every candidate ranks last: exposure log2(1001) - log2(1001) = 0.
    disliked = memorization.canary_exposures(
        planted, fake_encode, lambda r: [-1.0] + [0.0] * (len(r) - 1), 1000, seed=0
    )
    assert disliked == pytest.approx([0.0] * 2)


def test_exposure_with_every_candidate_is_the_exact_rank():
    """With 2 digits all 99 other secrets are candidates: a model scoring -int(secret) ranks "04" fifth."""
    scores = lambda requests: [-int("".join(map(str, secret))) for _, secret in requests]  # noqa: E731
    (result,) = memorization.canary_exposures([canary(0, "04")], fake_encode, scores, 1000, seed=0)
    assert result == pytest.approx(math.log2(100) - math.log2(5))


def test_candidate_secrets_are_distinct_other_secrets_of_the_same_length_and_seeded():
    draws = [memorization.candidate_secrets("000123", 500, np.random.default_rng(seed)) for seed in (7, 7, 8)]
    assert draws[0] == draws[1] != draws[2]
    assert len(set(draws[0])) == 500 and "000123" not in draws[0]
    assert all(len(secret) == 6 and secret.isdigit() for secret in draws[0])
    assert sorted(memorization.candidate_secrets("5", 1000, np.random.default_rng(0))) == list("012346789")


def test_greedy_extraction_needs_the_exact_secret_tokens():
    planted, reference = [canary(0, "038271"), canary(1, "550019")], [canary(2, "123456")]
    memorised = {tuple(fake_encode(c.prefix, c.secret)[0]): fake_encode(c.prefix, c.secret)[1] for c in planted}
    lengths = []

    def greedy(prompts, max_new_tokens):
        lengths.append(max_new_tokens)
        return [memorised.get(tuple(prompt), [0] * max_new_tokens) for prompt in prompts]

    assert memorization.greedy_extractions(planted + reference, fake_encode, greedy) == [True, True, False]
    assert lengths == [6]
    almost = lambda prompts, n: [[0, 3, 8, 2, 7, 0]] * len(prompts)  # noqa: E731  (the last digit wrong)
    assert memorization.greedy_extractions(planted[:1], fake_encode, almost) == [False]


def test_verbatim_extraction_counts_exact_continuations_and_the_matching_start():
    documents = [list(range(1, 12)), list(range(20, 31))]  # BOS-less toy ids: prompt = first 1 + 4 tokens

    def continues_the_first(prompts, max_new_tokens):
        return [list(range(6, 6 + max_new_tokens)) if p[0] == 1 else [22, 23, 99, 0][:max_new_tokens] for p in prompts]

    result = memorization.verbatim_extraction(documents, prefix_tokens=4, suffix_tokens=4, greedy=continues_the_first)
    assert result == {"documents": 2, "exact": 1, "exact_share": 0.5, "mean_matching_prefix": 2.0}
    assert memorization.verbatim_extraction([], 4, 4, continues_the_first)["exact_share"] is None


def test_evaluate_memorization_without_canaries_still_runs_the_verbatim_part():
    greedy = lambda prompts, n: [[0] * n for _ in prompts]  # noqa: E731
    documents = {"train": [list(range(10))], "validation": [list(range(10, 20))]}
    settings = memorization.Settings(prefix_tokens=3, suffix_tokens=3)
    result = memorization.evaluate_memorization(None, documents, fake_encode, preferring([]), greedy, settings)
    assert result["canaries"] is None
    assert result["verbatim"]["train"]["documents"] == result["verbatim"]["validation"]["documents"] == 1
    json.dumps(result)


@pytest.mark.parametrize("field, value", [("num_candidates", 0), ("prefix_tokens", -1), ("seed", 1.5)])
def test_bad_settings_are_refused_naming_the_setting(field, value):
    with pytest.raises(ValueError, match=f"memorization {field}="):
        memorization.Settings(**{field: value})


def test_sample_documents_takes_bos_documents_long_enough_and_skips_excluded_ones(tmp_path):
    bos, eos = 1, 2
    docs = [(f"d{i}", list(range(10 + i, 10 + i + length))) for i, length in enumerate([3, 12, 20, 12, 40])]
    packing.write_packed_splits(docs, str(tmp_path), 16, {"d0"}, bos_id=bos, eos_id=eos, train_shards=2)
    # Rows: [d1 + 2 tokens of d2], [d2], [rest of d2], [d3 + 2 tokens of d4], [d4], [d4], [rest of d4]; d0 is
    # held out. Only d1 and d3 start with BOS and hold 10 tokens in their row.
    train = str(tmp_path / "train")
    found = memorization.sample_documents(train, 10, 10, bos, seed=0)
    assert sorted(int(d[1]) for d in found) == [11, 13] and all(len(d) == 11 and d[0] == bos for d in found)
    assert [int(d[1]) for d in memorization.sample_documents(train, 10, 10, bos, seed=0, exclude=[[13, 14]])] == [11]
    assert len(memorization.sample_documents(train, 1, 10, bos, seed=0)) == 1


def test_read_canaries_is_none_without_the_file_and_names_a_malformed_one(tmp_path):
    assert memorization.read_canaries(str(tmp_path)) is None
    (tmp_path / memorization.CANARIES_FILE).write_text(json.dumps({"planted": [{"id": "x"}]}))
    with pytest.raises(ValueError, match=r"canaries\.json: not a canaries file"):
        memorization.read_canaries(str(tmp_path))
    assert memorization.CANARIES_FILE == canaries_lib.CANARIES_FILE


# --- Canaries in the corpus pipeline -------------------------------------------------------------------------------


def test_draw_gives_seeded_canaries_with_distinct_carriers():
    planted, reference = canaries_lib.draw(40, 6, seed=3)
    assert (planted, reference) == canaries_lib.draw(40, 6, seed=3) and planted != canaries_lib.draw(40, 6, 4)[0]
    assert len({c.prefix for c in planted + reference}) == 80
    assert all(len(c.secret) == 6 and c.secret.isdigit() and c.text.endswith(f" {c.secret}.") for c in planted)


def test_interleave_keeps_the_corpus_order_and_adds_each_canary_repeats_times():
    corpus = [(f"doc{i}", np.array([i])) for i in range(5)]
    assert list(canaries_lib.interleave(iter(corpus), 5, [], 3, seed=0)) == corpus
    mixed = list(canaries_lib.interleave(iter(corpus), 5, [("a", np.array([7])), ("b", np.array([8]))], 3, 0))
    assert [d for d in mixed if d[0].startswith("doc")] == corpus
    assert sorted(d[0] for d in mixed if not d[0].startswith("doc")) == ["a/0", "a/1", "a/2", "b/0", "b/1", "b/2"]


@pytest.mark.parametrize(
    "key, value",
    [("count", -1), ("count", canaries_lib.MAX_COUNT + 1), ("repeats", 0), ("digits", 0), ("digits", 19)],
)
def test_bad_canary_keys_are_refused_naming_the_key(tmp_path, key, value):
    config = make_config(tmp_path, **{f"canaries.{key}": value})
    with pytest.raises(ValueError, match=f"canaries.{key}={value}: expected an integer"):
        pipeline.validate(config, str(tmp_path / "out"), "local", "report")


def _prepare(config, output):
    pipeline.validate(config, str(output), "local", "report")
    pipeline.prepare(config, str(output), local_runner.LocalRunner(config, progress=False), progress=False)
    return output


@pytest.fixture(scope="module")
def canary_data(tmp_path_factory):
    """The pipeline's test corpus prepared with 2 canaries planted 16 times, and again with none (re-using the
    steps before packing)."""
    root = tmp_path_factory.mktemp("canaries")
    config = make_config(root, **{"canaries.count": 2, "canaries.repeats": REPEATS, "pack.min_validation_rows": 4})
    planted = _prepare(config, root / "planted")
    for step in ("filter", "dedup", "decontaminate", "tokenizer"):
        shutil.copytree(planted / "stages" / step, root / "plain" / "stages" / step)
    config.canaries.count = 0
    return planted, _prepare(config, root / "plain")


def split_documents(split_dir, bos_id):
    """The documents of a packed split in packing order (rows are dealt round-robin to the shards)."""
    shards = [list(records.iterate_shard(path)) for path in records.shard_paths(split_dir)]
    rows = [shards[i % len(shards)][i // len(shards)] for i in range(sum(map(len, shards)))]
    documents = []
    for row in rows:
        for segment in range(1, int(row["segment_ids"].max()) + 1):
            piece = row["tokens"][row["segment_ids"] == segment].tolist()
            if piece[0] != bos_id and documents:
                documents[-1] += piece  # the rest of a document split across rows
            else:
                documents.append(piece)
    return documents


def test_canaries_are_planted_in_train_only_and_listed(canary_data):
    planted_dir, _ = canary_data
    listed = memorization.read_canaries(str(planted_dir))
    tokenizer = load_tokenizer(str(planted_dir))
    assert len(listed.planted) == len(listed.reference) == 2 and listed.repeats == REPEATS and listed.digits == 6
    canary_docs = {
        c.id: [tokenizer.bos_id, *tokenizer.encode(f"{c.prefix} {c.secret}."), tokenizer.eos_id]
        for c in listed.planted + listed.reference
    }
    validation = split_documents(str(planted_dir / "validation"), tokenizer.bos_id)
    assert validation and not any(doc in validation for doc in canary_docs.values())
    validation_text = " ".join(tokenizer.decode(doc) for doc in validation)
    assert not any(c.secret in validation_text for c in listed.planted + listed.reference)
    train = split_documents(str(planted_dir / "train"), tokenizer.bos_id)
    assert {name: train.count(doc) for name, doc in canary_docs.items()} == {
        "canary-planted-0": REPEATS,
        "canary-planted-1": REPEATS,
        "canary-reference-0": 0,
        "canary-reference-1": 0,
    }
    report = json.loads((planted_dir / "report.json").read_text())
    assert report["canaries"]["planted"] == 2 and report["canaries"]["documents"] == 2 * REPEATS


def test_no_canaries_leave_the_packed_data_as_without_canaries(canary_data):
    planted_dir, plain_dir = canary_data
    assert not (plain_dir / memorization.CANARIES_FILE).exists()
    assert json.loads((plain_dir / "report.json").read_text())["canaries"] == {"planted": 0}
    tokenizer = load_tokenizer(str(planted_dir))
    listed = memorization.read_canaries(str(planted_dir))
    canary_docs = [[tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id] for text in listed.texts()]
    planted_train = split_documents(str(planted_dir / "train"), tokenizer.bos_id)
    assert split_documents(str(plain_dir / "train"), tokenizer.bos_id) == [
        doc for doc in planted_train if doc not in canary_docs
    ]
    for path in records.shard_paths(str(plain_dir / "validation")):  # the split is decided before planting
        assert open(path, "rb").read() == open(path.replace("plain", "planted"), "rb").read()
    # The pack step's marker holds no canary keys, so data packed before canaries existed is reused as it is.
    marker = json.loads((plain_dir / "stages" / "pack" / pipeline.MARKER_FILE).read_text())
    assert not any(key.startswith("canaries.") for key in marker["config"])


def test_a_tiny_run_memorises_its_planted_canaries_but_not_the_reference_ones(canary_data, tmp_path):
    from llm.train import loop

    planted_dir, _ = canary_data
    config = tiny_config(model__vocab_size=400, model__max_seq_len=DATA_SEQ_LEN, data__seq_len=DATA_SEQ_LEN)
    config.model.update(embed_dim=64, mlp_dim=128)
    config.data.path = str(planted_dir)
    config.train.update(num_steps=200, eval_every=0, checkpoint_every=200, log_every=50)
    loop.train(config, str(tmp_path))
    settings = memorization.Settings(num_candidates=100, num_documents=16, prefix_tokens=8, suffix_tokens=8)
    result = memorization.evaluate_run_memorization(loading.load_run(str(tmp_path)), settings=settings)
    canaries, cap = result["canaries"], math.log2(101)
    assert canaries["exposure_cap"] == pytest.approx(cap)
    assert canaries["planted"]["extracted"] == 2 and canaries["planted"]["exposure_mean"] > cap - 1
    assert canaries["reference"]["extracted"] == 0 and canaries["reference"]["exposure_max"] < cap - 1
    verbatim = result["verbatim"]
    assert verbatim["train"]["documents"] >= 8 and verbatim["validation"]["documents"] >= 1
    assert verbatim["train"]["exact_share"] > verbatim["validation"]["exact_share"]
    assert result["data_dir"] == str(planted_dir) and json.dumps(result)
