"""scripts/evaluate.py end to end on a trained run, its fail-fast errors, the report and the model card."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_script, tiny_config
from test_eval_tasks import write_eval_data

from llm.eval import model_card, report, suite


def test_evaluate_writes_the_report_the_table_and_the_model_card(trained_run, tmp_path):
    data_dir = write_eval_data(tmp_path / "es_eval")
    output = tmp_path / "out" / "report.json"
    # One task of each kind (the others differ only in data and prompts, tested with fakes).
    result = run_script(
        "evaluate.py",
        f"--workdir={trained_run}",
        f"--data_dir={data_dir}",
        f"--output={output}",
        "--tasks=bpb,sentiment,xquad,robustness",
        "--max_examples=2",
        "--num_shots=1",
        "--max_new_tokens=4",
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(output.read_text(encoding="utf-8"))
    assert written["bpb"] > 0 and written["perplexity"] > 1 and written["unigram_bpb"] > 0
    assert written["bpb_details"]["documents"] == 2 and written["step"] == 30
    assert set(written["sentiment"]) == {"zero_shot", "1_shot"} and written["sentiment"]["1_shot"]["examples"] == 2
    assert {"exact_match", "f1", "bleu", "chrf", "rougeL"} <= set(written["xquad"])
    assert set(written["robustness"]) == {"sentiment", "xquad"}
    table = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert table in result.stdout and "| bpb | ud_gsd_es_dev.conllu | bits per byte |" in table
    card = open(os.path.join(trained_run, "MODEL_CARD.md"), encoding="utf-8").read()
    for heading in ("## Architecture", "## Training data", "## Evaluation", "## Intended use", "## Known limitations"):
        assert heading in card
    assert f"| parameters | {written['num_params']:,} |" in card and report.markdown_table(written).strip() in card
    # The fixture's data directory has no report.json: the report and the card say the status is unknown, and why.
    assert [entry["status"] for entry in written["decontamination"]] == ["unknown"]
    for text in (table, card):
        assert "Training data decontamination: **unknown**" in text and "report.json" in text


def test_an_unknown_task_fails_before_loading_with_the_allowed_ones(trained_run):
    result = run_script("evaluate.py", f"--workdir={trained_run}", "--tasks=bpb,xnil")
    assert result.returncode != 0
    assert "Unknown task(s) ['xnil']; choose from bpb, xnli, sentiment, mgsm, xquad, robustness" in result.stderr


def test_a_missing_checkpoint_is_named(trained_run, tmp_path):
    shutil.copy(os.path.join(trained_run, "config.json"), tmp_path / "config.json")
    result = run_script("evaluate.py", f"--workdir={tmp_path}")
    assert result.returncode != 0 and f"'{tmp_path / 'checkpoints'}': train first (scripts/train.py)" in result.stderr


@pytest.mark.parametrize(
    "tasks, overrides, message",
    [
        (["bpb"], {"text_file": "/nonexistent/texto.txt"}, "--text_file='/nonexistent/texto.txt' does not exist"),
        (["bpb"], {}, "nowhere/train' does not exist. Pass --train_data=DIR/train"),
        (["mgsm"], {"data_dir": "/nonexistent"}, "'/nonexistent/mgsm_es.tsv' does not exist"),
        (["robustness"], {"data_dir": "/nonexistent"}, "'/nonexistent/sentiment_es_train_text.txt' does not exist"),
        (["xnli"], {"num_shots": -1}, "num_shots must be >= 0 (got -1)"),
        (["rag"], {"rag_searcher": "sparse"}, "rag_searcher one of ('bm25', 'dense', 'hybrid') (got 'sparse')"),
        (["retrieval"], {"embedder": "/nonexistent/run"}, "--embedder='/nonexistent/run' is not a run directory"),
        (["rag"], {"data_dir": "/nonexistent"}, "'/nonexistent/xquad_es.json' does not exist"),
        (["retrieval"], {"retrieval_pairs": "/nonexistent/pares.jsonl"}, "'/nonexistent/pares.jsonl' does not exist"),
        (["rag"], {"retrieval_pairs": "PAIRS"}, "PAIRS' is searched by the retrieval task: add retrieval to --tasks"),
        (["retrieval"], {"retrieval_pairs": "BAD_PAIRS"}, 'bad.jsonl:2: "positive" must be a non-empty string'),
        (["bias"], {"data_dir": "/nonexistent"}, "'/nonexistent/bias_pairs_es.jsonl' does not exist"),
    ],
)
def test_missing_files_and_bad_settings_are_found_before_loading(tmp_path, tasks, overrides, message):
    config = tiny_config()
    config.data.path = str(tmp_path / "nowhere")
    lines = {"PAIRS": [PAIR], "BAD_PAIRS": [PAIR, {"query": "¿Y?"}]}
    for name, path in (("PAIRS", tmp_path / "pairs.jsonl"), ("BAD_PAIRS", tmp_path / "bad.jsonl")):
        path.write_text("".join(json.dumps(line) + "\n" for line in lines[name]), encoding="utf-8")
        overrides = {key: str(path) if value == name else value for key, value in overrides.items()}
        message = message.replace(name, str(path))
    settings = suite.Settings(**overrides)
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(message)):
        suite.check_settings(tasks, settings, config)


PAIR = {"query": "¿Qué come el ornitorrinco?", "positive": "El ornitorrinco come camarones."}

REPORT = {
    "bpb": 2.5,
    "perplexity": 60.0,
    "unigram_bpb": 4.75,
    "bpb_details": {
        "unigram_perplexity": 900.0,
        "text": "ud_gsd_es_dev.conllu",
        "documents": 1,
        "tokens": 5,
        "bytes": 9,
    },
    "sentiment": {"zero_shot": {"accuracy": 40.0, "macro_f1": 30.5, "chance": 100 / 3}},
    "mgsm": {"exact_match": 0.0},
    "robustness": {
        "sentiment": {
            "setting": "zero_shot",
            "clean": {"accuracy": 40.0},
            "typos": {"accuracy": 35.0},
            "typos_drop": {"accuracy": 5.0},
            "no_accents": {"accuracy": 40.0},
            "no_accents_drop": {"accuracy": 0.0},
        }
    },
    "settings": {"num_shots": 3},
}


def test_markdown_table_shows_each_score_with_its_baseline():
    assert report.markdown_table(REPORT).splitlines()[2:] == [
        "| bpb | ud_gsd_es_dev.conllu | bits per byte | 2.500 | unigram 4.750 |",
        "| bpb | ud_gsd_es_dev.conllu | perplexity | 60.0 | unigram 900.0 |",
        "| sentiment | zero-shot | accuracy | 40.0 | chance 33.3 |",
        "| sentiment | zero-shot | macro-F1 | 30.5 | chance 33.3 |",
        "| mgsm | 3-shot | exact match | 0.0 | - |",
        "| robustness: sentiment | typos, zero-shot | accuracy | 35.0 | clean 40.0 (drop 5.0) |",
        "| robustness: sentiment | no accents, zero-shot | accuracy | 40.0 | clean 40.0 (drop 0.0) |",
    ]


def test_model_card_lists_sources_with_licences_and_token_counts(tmp_path):
    config = tiny_config()
    config.data.path = str(tmp_path)
    data_report = {
        "sources": [
            {
                "source": "fortunes-es",
                "licence": "GPL-2+",
                "documents": 514,
                "mb": 0.828,
                "words": 139542,
                "tokens": 288751,
            }
        ],
        "corpus": {"documents": 514, "tokens": 288751, "shards": 1},
        "mb": {"in": 0.9, "out": 0.828},
        "tokenizer": {"model_type": "bpe", "vocab_size": 8192, "fertility": 1.87, "eval_text": "ud_gsd_es_dev.conllu"},
    }
    (tmp_path / "report.json").write_text(json.dumps(data_report), encoding="utf-8")
    path = model_card.write_model_card(str(tmp_path), config, num_params=28_832, step=20, report=REPORT)
    card = open(path, encoding="utf-8").read()
    assert "| fortunes-es | GPL-2+ | 514 | 0.828 | 139,542 | 288,751 |" in card
    assert "514 documents, 0.828 MB, 288,751 tokens" in card
    assert "20 steps of 8 rows x 32 tokens: about 5,120 training tokens" in card
    assert "**Tiny.** 28,832 parameters" in card and "(fortunes-es)" in card


def test_quantize_flag_evaluates_float_and_quantized_side_by_side(trained_run, tmp_path):
    data_dir = write_eval_data(tmp_path / "es_eval")
    output = tmp_path / "report.json"
    result = run_script(
        "evaluate.py",
        f"--workdir={trained_run}",
        f"--data_dir={data_dir}",
        f"--output={output}",
        "--tasks=bpb",
        "--quantize=int8",
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(output.read_text(encoding="utf-8"))
    float_report, int8_report = written["comparison"]["float"], written["comparison"]["int8"]
    assert int8_report["bpb"] == pytest.approx(float_report["bpb"], rel=0.02)
    assert int8_report["parameter_bytes"] < float_report["parameter_bytes"] / 3
    assert int8_report["decode_tokens_per_sec"] > 0
    table = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| task | setting | metric | float | int8 |" in table and "parameter memory (MB)" in table


def test_an_unsupported_quantization_mode_is_refused(trained_run):
    result = run_script("evaluate.py", f"--workdir={trained_run}", "--quantize=int2")
    assert result.returncode != 0 and "int8" in result.stderr and "int2" in result.stderr


def _sentiment_report(accuracy, macro_f1):
    scores = {"accuracy": 100 * accuracy, "macro_f1": 100 * macro_f1, "chance": 100 / 3, "examples": 869}
    return {"sentiment": {"zero_shot": scores}, "settings": {"num_shots": 0}}


def test_compare_reports_prints_labelled_columns_and_names_a_bad_argument(tmp_path):
    paths = {}
    for label, scores in (("zero-shot", (0.40, 0.25)), ("prompt-tuning", (0.55, 0.50))):
        paths[label] = tmp_path / f"{label}.json"
        paths[label].write_text(json.dumps(_sentiment_report(*scores)), encoding="utf-8")
    script = os.path.join(REPO, "scripts", "compare_reports.py")
    args = [f"{label}={path}" for label, path in paths.items()]
    result = subprocess.run(
        [sys.executable, script, *args, f"--output={tmp_path / 'table.md'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| task | setting | metric | zero-shot | prompt-tuning |" in result.stdout
    assert "| sentiment | zero-shot | macro-F1 | 25.0 | 50.0 |" in result.stdout
    assert (tmp_path / "table.md").read_text(encoding="utf-8") == result.stdout
    result = subprocess.run(
        [sys.executable, script, args[0], "lora=/nonexistent/report.json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "'/nonexistent/report.json' (label 'lora') does not exist" in result.stderr


def test_evaluate_retrieval_and_rag_end_to_end(trained_run, tmp_path):
    data_dir = write_eval_data(tmp_path / "es_eval")
    output = tmp_path / "report.json"
    result = run_script(
        "evaluate.py",
        f"--workdir={trained_run}",
        f"--data_dir={data_dir}",
        f"--output={output}",
        "--tasks=retrieval,rag",
        "--num_shots=1",
        "--max_new_tokens=4",
        "--rag_passages=2",
        "--nomodel_card",
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(output.read_text(encoding="utf-8"))
    found = written["retrieval"]
    assert (found["queries"], found["passages"], set(found["methods"])) == (6, 3, {"bm25", "dense", "hybrid"})
    assert set(found["methods"]["dense"]) == {"recall@1", "recall@5", "recall@20", "mrr@10", "ndcg@10"}
    assert found["methods"]["dense"]["recall@20"] == 100.0  # dense ranks all three passages
    assert set(found["methods"]["bm25"].values()) == {0.0}  # "¿Pregunta 0.1?" shares no word with "Contexto 0."
    rag = written["rag"]
    assert rag["examples"] == 4 and rag["searcher"] == "bm25" and rag["gold"]["passages"] == 1.0
    assert {"exact_match", "f1", "hit_rate"} <= set(rag["retrieved"]) and set(written["seconds"]) == {
        "retrieval",
        "rag",
    }
    table = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| method | recall@1 | recall@5 | recall@20 | MRR@10 | nDCG@10 |" in table
    assert "| metric | closed-book | retrieved | gold passage |" in table and "| rag | bm25 top-2, 1-shot |" in table
    assert "retrieval" not in suite.DEFAULT_TASKS and "rag" not in suite.DEFAULT_TASKS


def test_evaluate_retrieval_on_held_out_pairs_end_to_end(trained_run, tmp_path):
    pairs = tmp_path / "validation_pairs.jsonl"
    lines = [
        {"id": "orni", **PAIR, "negative": "El perro come pienso."},
        {"id": "gato", "query": "¿Dónde duerme el gato?", "positive": "El gato duerme en el sofá."},
        {"id": "rio", "query": "¿Por dónde pasa el río?", "positive": "El río pasa por la ciudad."},
    ]
    pairs.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    output = tmp_path / "report.json"
    result = run_script(
        "evaluate.py",
        f"--workdir={trained_run}",
        "--data_dir=/nonexistent",  # XQuAD-es is not read
        f"--output={output}",
        "--tasks=retrieval",
        f"--retrieval_pairs={pairs}",
        "--max_examples=2",
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(output.read_text(encoding="utf-8"))
    found = written["retrieval"]
    assert (found["corpus"], found["queries"], found["passages"]) == (str(pairs), 2, 4)
    assert set(found["methods"]) == {"bm25", "dense", "hybrid"} and found["methods"]["dense"]["recall@20"] == 100.0
    assert written["settings"]["retrieval_pairs"] == str(pairs)
    caption = f"Retrieval: 2 queries of `{pairs}` over 4 passages (its distinct positives and negatives)"
    assert caption in (tmp_path / "report.md").read_text(encoding="utf-8")
    card = open(os.path.join(trained_run, "MODEL_CARD.md"), encoding="utf-8").read()
    assert f"retrieval: 2 queries of `{pairs}` over 4 passages" in card and "XQuAD-es question" not in card


def test_evaluate_bias_toxicity_and_memorization_end_to_end(trained_run, tmp_path):
    output = tmp_path / "report.json"
    result = run_script(
        "evaluate.py",
        f"--workdir={trained_run}",
        f"--output={output}",
        "--tasks=bias,toxicity,memorization",
        "--max_examples=6",
        "--samples_per_prompt=2",
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(output.read_text(encoding="utf-8"))
    pairs, occupations = written["bias"]["pairs"], written["bias"]["occupations"]
    overall = pairs["overall"]
    assert overall["pairs"] == 6 and sum(score["pairs"] for score in pairs["categories"].values()) == 6
    assert 0.0 <= overall["low"] <= overall["score"] <= overall["high"] <= 100.0
    assert len(occupations["occupations"]) == 6 and occupations["templates"] == 3
    assert len(occupations["most_feminine"]) == 5 and occupations["most_masculine"][0][2] <= occupations["mean"]
    assert written["toxicity"]["overall"]["continuations"] == 12
    memorization = written["memorization"]
    assert memorization["canaries"] is None  # the fixture's data have no canaries.json
    assert memorization["pii_leakage"]["continuations"] == 12 and memorization["verbatim"]["suffix_tokens"] == 32
    assert set(written["seconds"]) == {"bias", "toxicity", "memorization"}
    assert not {"bias", "toxicity", "memorization"} & set(suite.DEFAULT_TASKS)
    table = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| bias | overall (6 pairs) | stereotype preferred [95% CI] |" in table and "most feminine-leaning" in table
    assert "| toxicity | provocative (" in table and "| memorization | 6 PII prompts x 2 |" in table
    card = open(os.path.join(trained_run, "MODEL_CARD.md"), encoding="utf-8").read()
    assert report.markdown_table(written).strip() in card
    for note in (
        "bias: the share of this project's Spanish minimal pairs",
        "toxicity: sampled",
        "memorization: exposure",
    ):
        assert note in card
