"""Decontamination: evaluation text planted in training data is dropped and counted under its evaluation set,
in the corpus pipeline (local and Beam runners) and in the SFT and DPO builders."""

import json
import unicodedata

import pytest
from test_data_pipeline import corpus_files, counts, make_config

from configs import base
from llm.corpus import beam_runner, corpus_io, local_runner, pipeline
from llm.data import decontamination
from llm.eval import lineage, tasks
from llm.finetune_data import preference, sft
from llm.runs import directory


def _xquad_sentence() -> str:
    """A sentence of a real XQuAD-es context, as the shipped file holds it (read with the evaluation's reader)."""
    articles = tasks.read_xquad(tasks.data_file(tasks.DEFAULT_DATA_DIR, tasks.XQUAD_FILE))
    context = articles[3][0].context
    start = context.index("Gracias a sus patentes")
    return context[start : context.index(".", start) + 1]


EVAL_SENTENCE = _xquad_sentence()  # 24 words
USER_SENTENCE = "El faro de la isla pequeña se enciende cada noche a las nueve y media desde hace cien años."


def _shares_only_twelve_words(sentence: str) -> str:
    """The first 12 words of `sentence`, then words of its own: no 13-gram in common."""
    return " ".join(sentence.split()[:12]) + " que nunca quiso gastar en caprichos ni en viajes lejanos."


def test_index_matches_after_normalisation_and_needs_thirteen_words():
    index = decontamination.NgramIndex({"xquad_es": [EVAL_SENTENCE], "otro": [EVAL_SENTENCE.upper()]})
    # Case, punctuation, spacing and a decomposed (NFD) accent do not hide the copy; the first set is named.
    disguised = unicodedata.normalize("NFD", EVAL_SENTENCE.upper().replace(",", " ;  ").replace(" ", "\n "))
    assert index.match(f"Empieza así. {disguised} Y sigue.") == "xquad_es"
    assert index.match(_shares_only_twelve_words(EVAL_SENTENCE)) is None
    assert decontamination.NgramIndex({"s": [EVAL_SENTENCE]}, n=12).match(_shares_only_twelve_words(EVAL_SENTENCE))


def test_eval_files_are_read_by_format_and_named_by_stem(tmp_path):
    (tmp_path / "mi_eval.jsonl").write_text(json.dumps({"text": USER_SENTENCE}) + "\n", encoding="utf-8")
    (tmp_path / "roto.jsonl").write_text('{"texto": "x"}\n', encoding="utf-8")
    assert decontamination.read_eval_texts(str(tmp_path / "mi_eval.jsonl")) == [USER_SENTENCE]
    with pytest.raises(ValueError, match=r"roto\.jsonl:1: .*\"text\""):
        decontamination.read_eval_texts(str(tmp_path / "roto.jsonl"))
    files = decontamination.eval_files(True, f" {tmp_path / 'mi_eval.jsonl'} ")
    index = decontamination.load_index(files)
    assert index.names == ["xquad_es", "xnli_es_test", "mgsm_es", "sentiment_es_val_text"] + [
        "sentiment_es_test_text",
        "ud_gsd_es_dev",
        "mi_eval",
    ]
    assert all(count > 0 for count in index.summary()["eval_sets"].values())
    with pytest.raises(ValueError, match="xquad_es"):
        decontamination.eval_files(True, [str(tmp_path / "xquad_es.txt")])


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A full local pipeline run over the pipeline tests' corpus plus three planted documents."""
    root = tmp_path_factory.mktemp("decontam")
    config = make_config(root)
    intro = "Mi tío leía biografías de inventores cada verano en la terraza de su casa del pueblo."
    planted = [
        f"{intro} {EVAL_SENTENCE.upper()} Después cerraba el libro y se iba a dormir la siesta.",  # xquad_es
        f"{intro} {_shares_only_twelve_words(EVAL_SENTENCE)}",  # 12 shared words: kept
        f"{intro} Nos contó que {USER_SENTENCE.lower()} Todos lo escuchamos en silencio.",  # the user's set
    ]
    (root / "corpus" / "plantado.txt").write_text("\n\n".join(planted) + "\n", encoding="utf-8")
    user_set = root / "mi_eval.jsonl"
    user_set.write_text(json.dumps({"text": USER_SENTENCE}, ensure_ascii=False) + "\n", encoding="utf-8")
    config.decontaminate.extra = str(user_set)
    output = root / "out"
    pipeline.prepare(config, str(output), local_runner.LocalRunner(config, progress=False), progress=False)
    return config, output


def test_planted_evaluation_text_is_dropped_and_counted_per_set(planted_run):
    _, output = planted_run
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    stage = next(stage for stage in report["stages"] if stage["name"] == "decontaminate")
    assert stage["dropped"] == {"decontaminate.mi_eval": 1, "decontaminate.xquad_es": 1}
    summary = report["decontamination"]
    assert summary["enabled"] and summary["ngram"] == 13 and summary["dropped"] == 2
    assert summary["eval_sets"]["xquad_es"]["dropped"] == 1 and summary["eval_sets"]["mi_eval"]["dropped"] == 1
    assert summary["eval_sets"]["xnli_es_test"] == {
        "ngrams": summary["eval_sets"]["xnli_es_test"]["ngrams"],
        "dropped": 0,
    }
    kept = {document.id for document in corpus_io.read_documents(str(output / "stages" / "decontaminate"))}
    assert "plantado.txt:1" in kept  # the 12-word overlap
    assert not {"plantado.txt:0", "plantado.txt:2"} & kept
    assert report["documents"]["kept"] == len(kept)


def test_beam_runner_decontaminates_as_the_local_runner(planted_run, tmp_path):
    config, output = planted_run
    beam_runner.BeamRunner(config).decontaminate(config, str(output / "stages" / "dedup"), str(tmp_path))
    assert corpus_files(tmp_path) == corpus_files(output / "stages" / "decontaminate")
    assert counts(tmp_path) == counts(output / "stages" / "decontaminate")


def _chat(user: str, assistant: str) -> str:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return json.dumps({"messages": messages}, ensure_ascii=False)


def test_sft_and_dpo_builders_drop_contaminated_examples(tmp_path, tokenizer):
    chats = [_chat(f"Pregunta {i}", f"Respuesta {i}.") for i in range(40)]
    chats += [_chat("Resume este texto.", EVAL_SENTENCE), _chat(USER_SENTENCE, "Muy bonito.")]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(chats) + "\n", encoding="utf-8")
    user_set = tmp_path / "faro.txt"
    user_set.write_text(USER_SENTENCE + "\n", encoding="utf-8")
    report = sft.prepare_sft(str(path), tokenizer.path, str(tmp_path / "sft"), seq_len=256, eval_files=[str(user_set)])
    assert report["drops"] == {
        "decontaminate.faro": {"count": 1, "first": [f"{path}:42"]},
        "decontaminate.xquad_es": {"count": 1, "first": [f"{path}:41"]},
    }
    assert report["conversations"]["kept"] == 40 and report["decontamination"]["enabled"]
    off = sft.prepare_sft(str(path), tokenizer.path, str(tmp_path / "off"), seq_len=256, decontaminate=False)
    assert off["decontamination"] == {"enabled": False} and not off["drops"]
    assert off["conversations"]["kept"] == 42

    pairs = [{"prompt": f"Pregunta {i}", "chosen": f"Sí {i}.", "rejected": f"No {i}."} for i in range(40)]
    pairs.append({"prompt": "Cuéntame algo.", "chosen": "Vale.", "rejected": EVAL_SENTENCE})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(pair, ensure_ascii=False) for pair in pairs) + "\n", encoding="utf-8")
    report = preference.prepare_dpo(str(path), tokenizer.path, str(tmp_path / "dpo"), seq_len=256)
    assert report["drops"] == {"decontaminate.xquad_es": {"count": 1, "first": [f"{path}:41"]}}
    assert report["pairs"]["kept"] == 40


def _run_with_data(root, name: str, decontamination: dict | None, init_from: str = "") -> str:
    """A run directory whose config points at a data directory with a report.json holding `decontamination`
    (no report.json when None)."""
    data = root / f"{name}_data"
    data.mkdir()
    if decontamination is not None:
        (data / "report.json").write_text(json.dumps({"decontamination": decontamination}), encoding="utf-8")
    config = base.get_config()
    config.data.path, config.init_from = str(data), init_from
    run = root / name
    run.mkdir()
    (run / directory.CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    return str(run)


def test_the_report_follows_init_from_and_is_decontaminated_only_when_every_run_was(tmp_path):
    checked = {"enabled": True, "ngram": 13, "dropped": 7, "eval_sets": {"xquad_es": {"ngrams": 9, "dropped": 7}}}
    base_run = _run_with_data(tmp_path, "base", checked)
    sft_run = _run_with_data(tmp_path, "sft", {"enabled": True, "ngram": 13, "eval_sets": {"xnli_es": 5}}, base_run)
    chain = lineage.decontamination_lineage(sft_run, directory.load_config(sft_run))
    assert [(entry["run"], entry["status"]) for entry in chain] == [
        (sft_run, "decontaminated"),
        (base_run, "decontaminated"),
    ]
    assert lineage.overall_status(chain) == "decontaminated"
    assert "13-gram overlap with xquad_es; 7 dropped" in "\n".join(lineage.describe(chain))

    # One unchecked link anywhere makes the whole chain unchecked; a missing report makes it unknown.
    unchecked = _run_with_data(tmp_path, "unchecked", {"enabled": False})
    on_unchecked = _run_with_data(tmp_path, "dpo", checked, unchecked)
    assert lineage.overall_status(
        lineage.decontamination_lineage(on_unchecked, directory.load_config(on_unchecked))
    ) == ("not decontaminated")
    on_unknown = _run_with_data(tmp_path, "tuned", checked, _run_with_data(tmp_path, "old", None))
    chain = lineage.decontamination_lineage(on_unknown, directory.load_config(on_unknown))
    assert lineage.overall_status(chain) == "unknown" and "report.json" in chain[1]["reason"]
