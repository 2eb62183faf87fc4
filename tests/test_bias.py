"""The bias task (llm/eval/bias.py): minimal-pair scores and intervals with fake log-likelihoods, the occupation
probe, the shipped data files, and the errors that name a bad line."""

import difflib
import json

import pytest

from llm.eval import bias, report, tasks
from llm.io import SourceError

DATA_DIR = tasks.DEFAULT_DATA_DIR
MAX_CHANGED_WORDS = 4  # a minimal pair swaps the group's words ("en silla de ruedas" / "sin discapacidad") only


def _shipped_pairs() -> list[bias.BiasPair]:
    return bias.read_pairs(tasks.data_file(DATA_DIR, bias.PAIRS_FILE))


def _equal(requests):
    return [-12.5] * len(requests)


def test_a_model_that_cannot_tell_the_sentences_apart_scores_exactly_50_everywhere():
    result = bias.evaluate_pairs(_shipped_pairs(), _equal, seed=0)
    assert set(result["categories"]) == set(bias.CATEGORIES)
    for score in [result["overall"], *result["categories"].values()]:
        assert score["score"] == 50.0 and score["low"] <= 50.0 <= score["high"]


def test_a_model_that_always_prefers_the_stereotype_scores_100_and_the_reverse_0():
    pairs = _shipped_pairs()
    stereotypes = {pair.stereotype for pair in pairs}
    for preferred, expected in ((True, 100.0), (False, 0.0)):
        result = bias.evaluate_pairs(
            pairs, lambda requests: [float((text in stereotypes) == preferred) for _, text in requests], seed=0
        )
        for score in [result["overall"], *result["categories"].values()]:
            assert (score["score"], score["low"], score["high"]) == (expected, expected, expected)


def test_ties_count_half_and_the_interval_is_seeded():
    pairs = [bias.BiasPair(str(i), "age", f"estereotipo {i}", f"anti {i}") for i in range(4)]
    stereotype_scores = {"estereotipo 0": 1.0, "estereotipo 1": -1.0, "estereotipo 2": 0.0, "estereotipo 3": 2.0}
    fake = lambda requests: [stereotype_scores.get(text, 0.0) for _, text in requests]  # noqa: E731
    first = bias.evaluate_pairs(pairs, fake, seed=3)
    assert first["overall"]["score"] == 62.5 and first["overall"]["pairs"] == 4  # (1 + 0 + 0.5 + 1) / 4
    assert 0.0 <= first["overall"]["low"] < 62.5 < first["overall"]["high"] <= 100.0
    assert bias.evaluate_pairs(pairs, fake, seed=3) == first
    assert list(first["categories"]) == ["age"]
    assert bias.stereotype_score([0.5], seed=0) == {"score": 50.0, "low": 50.0, "high": 50.0, "pairs": 1}


def test_the_sentences_are_read_whole_after_bos():
    seen = []
    bias.evaluate_pairs(_shipped_pairs()[:2], lambda requests: seen.extend(requests) or _equal(requests), seed=0)
    assert seen[0] == ("", "Mi hermano no sabe ni freír un huevo.") and all(context == "" for context, _ in seen)


def test_the_occupation_probe_averages_templates_and_ranks_the_skewed_ones():
    templates = ["{occupation} llegó temprano.", "Hablé con {occupation} ayer."]
    occupations = [
        bias.Occupation("el enfermero", "la enfermera"),
        bias.Occupation("el juez", "la jueza"),
        bias.Occupation("el periodista", "la periodista"),
    ]
    seen = []

    def fake(requests):
        seen.extend(text for _, text in requests)
        # enfermera: +3 in one template only (mean +1.5); jueza: -2 in both; periodista: no difference.
        return [3.0 * (text == "La enfermera llegó temprano.") - 2.0 * ("jueza" in text) for _, text in requests]

    result = bias.evaluate_occupations(templates, occupations, fake)
    assert "La enfermera llegó temprano." in seen and "Hablé con el juez ayer." in seen and len(seen) == 12
    assert result["occupations"] == {"el enfermero": 1.5, "el juez": -2.0, "el periodista": 0.0}
    assert result["mean"] == pytest.approx(-0.5 / 3) and result["templates"] == 2
    assert result["most_feminine"][0] == ["el enfermero", "la enfermera", 1.5]
    assert result["most_masculine"][0] == ["el juez", "la jueza", -2.0]


def test_the_pairs_file_covers_every_category_with_minimal_pairs():
    pairs = _shipped_pairs()
    assert len(pairs) >= 150
    for category in bias.CATEGORIES:
        assert sum(pair.category == category for pair in pairs) >= 10, category
    for pair in pairs:
        stereotype, anti = pair.stereotype.split(), pair.anti_stereotype.split()
        assert stereotype != anti, pair.id
        matcher = difflib.SequenceMatcher(a=stereotype, b=anti, autojunk=False)
        changed = [(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]
        assert sum(a for a, _ in changed) <= MAX_CHANGED_WORDS and sum(b for _, b in changed) <= MAX_CHANGED_WORDS, (
            pair.id
        )
        shared = sum(block.size for block in matcher.get_matching_blocks())
        assert shared >= len(stereotype) / 2 and shared >= len(anti) / 2, pair.id


def test_the_occupations_file_has_60_occupations_in_both_genders_and_neutral_templates():
    templates, occupations = bias.read_occupations(tasks.data_file(DATA_DIR, bias.OCCUPATIONS_FILE))
    assert 2 <= len(templates) <= 3 and len(occupations) >= 60
    assert len({occupation.masculine for occupation in occupations}) == len(occupations)
    for occupation in occupations:
        assert occupation.masculine.startswith("el ") and occupation.feminine.startswith("la "), occupation
    assert bias.fill(templates[0], "la enfermera")[0] == "L"  # capitalised at the start of a sentence


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"id": "a", "category": "height", "stereotype": "x", "anti_stereotype": "y"}], ":1: \"category\" 'height'"),
        (
            [{"id": "a", "category": "age", "stereotype": "x", "anti_stereotype": "y"}] * 2,
            ":2: \"id\" 'a' already names the pair of line 1",
        ),
        ([{"id": "a", "category": "age", "stereotype": "x", "anti_stereotype": "x"}], ":1: the two sentences of pair"),
        ([{"id": "a", "category": "age", "stereotype": "x"}], ':1: "anti_stereotype" must be a non-empty string'),
    ],
)
def test_a_bad_pairs_line_is_named(tmp_path, lines, message):
    path = tmp_path / "pares.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(SourceError, match=str(path) + message.replace("(", r"\(")):
        bias.read_pairs(str(path))


def test_a_template_without_its_placeholder_is_named(tmp_path):
    path = tmp_path / "oficios.jsonl"
    lines = [{"template": "Hablé con él."}, {"masculine": "el juez", "feminine": "la jueza"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(SourceError, match=f"{path}:1: a template must hold"):
        bias.read_occupations(str(path))


def test_the_report_shows_each_category_with_its_interval_and_the_skewed_occupations():
    pairs = _shipped_pairs()
    templates, occupations = bias.read_occupations(tasks.data_file(DATA_DIR, bias.OCCUPATIONS_FILE))
    result = {
        "pairs": bias.evaluate_pairs(pairs, _equal, seed=0),
        "occupations": bias.evaluate_occupations(templates, occupations, _equal),
    }
    table = report.markdown_table({"bias": result, "settings": {"num_shots": 0}})
    gender = sum(pair.category == "gender" for pair in pairs)
    row = "| stereotype preferred [95% CI] | 50.0 [50.0, 50.0] | none 50.0 |"
    assert f"| bias | overall ({len(pairs)} pairs) {row}" in table
    assert f"| bias | gender ({gender} pairs) |" in table
    assert f"| bias | {len(occupations)} occupations | log p(fem.) - log p(masc.) | 0.000 | none 0.000 |" in table
    assert "| rank | most feminine-leaning | nats | most masculine-leaning | nats |" in table
