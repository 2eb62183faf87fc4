"""The evaluation report: one JSON file with every figure, and the same results as a Markdown table.

Scores of tasks are percentages (accuracy, macro-F1, exact match, F1, BLEU, chrF, ROUGE, and retrieval's
recall, MRR and nDCG scaled by 100); bpb is bits per UTF-8 byte and perplexity is per token of the run's
tokenizer. Each row carries its baseline: the unigram model for bpb, chance for multiple choice, the clean
score for a perturbed input, closed-book for rag, no preference for bias. Retrieval and rag also get side-by-side
tables below the main one (methods by metrics, conditions by metrics), and bias its most skewed occupations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from llm.eval import lineage
from llm.io import write_text

_LABELS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "exact_match": "exact match",
    "f1": "token F1",
    "bleu": "BLEU",
    "chrf": "chrF",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "recall@1": "recall@1",
    "recall@5": "recall@5",
    "recall@20": "recall@20",
    "mrr@10": "MRR@10",
    "ndcg@10": "nDCG@10",
    "hit_rate": "retrieval hit rate",
}
XQUAD_CORPUS = "XQuAD-es"  # retrieval's default corpus, as reports name it (a pairs file is named by its path)
_RETRIEVAL_METRICS = ("recall@1", "recall@5", "recall@20", "mrr@10", "ndcg@10")
_RAG_CONDITIONS = {"closed_book": "closed-book", "retrieved": "retrieved", "gold": "gold passage"}
_RAG_METRICS = ("exact_match", "f1", "hit_rate")
_RAG_ROWS = {"passages": "passages in the prompt", "gold_cut": "gold passage cut to fit"}
_GENERATION_METRICS = {"mgsm": ("exact_match",), "xquad": ("exact_match", "f1", "bleu", "chrf", "rougeL")}
_MULTIPLE_CHOICE_METRICS = {"xnli": ("accuracy",), "sentiment": ("accuracy", "macro_f1")}


def build_report(
    results: Mapping[str, Any],
    *,
    workdir: str,
    step: int,
    num_params: int,
    settings: Mapping[str, Any],
    seconds: Mapping[str, float],
) -> dict[str, Any]:
    """The JSON report: the run, the settings, the results of each task and the time each took."""
    return {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "num_params": num_params,
        **results,
        "settings": dict(settings),
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
    }


def _percent(value: float) -> str:
    return f"{value:.1f}"


def _ratio(value: float | None) -> str:
    """bpb and perplexity: three decimals while they are small, one once they are large; "n/a" for a missing
    baseline (a run with no training data of its own)."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def table_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(task, setting, metric, score, baseline) for every reported figure, in task order."""
    rows = []
    if "bpb" in report:
        details = report["bpb_details"]
        rows.append(
            ("bpb", details["text"], "bits per byte", _ratio(report["bpb"]), f"unigram {_ratio(report['unigram_bpb'])}")
        )
        rows.append(
            (
                "bpb",
                details["text"],
                "perplexity",
                _ratio(report["perplexity"]),
                f"unigram {_ratio(details['unigram_perplexity'])}",
            )
        )
    for task, metrics in _MULTIPLE_CHOICE_METRICS.items():
        for setting, scores in report.get(task, {}).items():
            for metric in metrics:
                rows.append(
                    (
                        task,
                        setting.replace("_", "-"),
                        _LABELS[metric],
                        _percent(scores[metric]),
                        f"chance {_percent(scores['chance'])}",
                    )
                )
    shots = report["settings"]["num_shots"]
    for task, metrics in _GENERATION_METRICS.items():
        for metric in metrics if task in report else ():
            rows.append(
                (task, f"{shots}-shot" if shots else "zero-shot", _LABELS[metric], _percent(report[task][metric]), "-")
            )
    rows += _retrieval_rows(report)
    rows += _bias_rows(report) + _toxicity_rows(report) + _memorization_rows(report)
    for task, entry in report.get("robustness", {}).items():
        for kind in ("typos", "no_accents"):
            setting = f"{kind.replace('_', ' ')}, {entry['setting'].replace('_', '-')}"
            for metric, value in entry[kind].items():
                clean, drop = entry["clean"][metric], entry[f"{kind}_drop"][metric]
                rows.append(
                    (
                        f"robustness: {task}",
                        setting,
                        _LABELS[metric],
                        _percent(value),
                        f"clean {_percent(clean)} (drop {_percent(drop)})",
                    )
                )
    return rows


def _retrieval_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = [
        ("retrieval", method, _LABELS[metric], _percent(scores[metric]), "-")
        for method, scores in report.get("retrieval", {}).get("methods", {}).items()
        for metric in _RETRIEVAL_METRICS
    ]
    if "rag" in report:
        rag, shots = report["rag"], _shots(report["settings"]["num_shots"])
        retrieved = f"{rag['searcher']} top-{rag['num_passages']}"
        for condition, label in {**_RAG_CONDITIONS, "retrieved": retrieved}.items():
            for metric in [metric for metric in _RAG_METRICS if metric in rag[condition]]:
                closed_book = rag["closed_book"].get(metric) if condition != "closed_book" else None
                baseline = "-" if closed_book is None else f"closed-book {_percent(closed_book)}"
                rows.append(("rag", f"{label}, {shots}", _LABELS[metric], _percent(rag[condition][metric]), baseline))
    return rows


def _interval(score: Mapping[str, Any]) -> str:
    return f"{score['score']:.1f} [{score['low']:.1f}, {score['high']:.1f}]"


def _bias_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Stereotype preference overall and per category with its interval, and the occupations' mean skew."""
    if "bias" not in report:
        return []
    pairs, occupations = report["bias"]["pairs"], report["bias"]["occupations"]
    rows = [
        ("bias", f"{name} ({score['pairs']} pairs)", "stereotype preferred [95% CI]", _interval(score), "none 50.0")
        for name, score in {"overall": pairs["overall"], **pairs["categories"]}.items()
    ]
    setting = f"{len(occupations['occupations'])} occupations"
    rows.append(("bias", setting, "log p(fem.) - log p(masc.)", f"{occupations['mean']:.3f}", "none 0.000"))
    return rows


def _estimate(figure: Mapping[str, float], digits: int = 1) -> str:
    """A {value, low, high} figure as "value [low, high]"."""
    return f"{figure['value']:.{digits}f} [{figure['low']:.{digits}f}, {figure['high']:.{digits}f}]"


def _toxicity_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The three RealToxicityPrompts figures per kind of prompt; the neutral prompts are the provocative ones'
    baseline."""
    if "toxicity" not in report:
        return []
    toxicity = report["toxicity"]
    kinds = {"all prompts": toxicity["overall"], **toxicity["kinds"]}
    neutral = toxicity["kinds"].get("neutral")
    rows = []
    for metric, label, digits in (
        ("toxicity_rate", "continuations flagged [95% CI]", 1),
        ("toxicity_probability", "prompts with one flagged of K [95% CI]", 1),
        ("expected_max_toxicity", "expected max toxicity (0-1) [95% CI]", 3),
    ):
        for kind, summary in kinds.items():
            setting = f"{kind} ({summary['prompts']} x {toxicity['samples_per_prompt']})"
            baseline = f"neutral {neutral[metric]['value']:.{digits}f}" if neutral and kind == "provocative" else "-"
            rows.append(("toxicity", setting, label, _estimate(summary[metric], digits), baseline))
    return rows


def _memorization_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Canaries against the unplanted reference ones, training documents against validation ones, PII leakage."""
    if "memorization" not in report:
        return []
    memorization, rows = report["memorization"], []
    canaries = memorization["canaries"]
    if canaries:
        planted, reference = canaries["planted"], canaries["reference"]
        setting = f"{planted['count']} canaries x {canaries['repeats']}"
        rows += [
            (
                "memorization",
                setting,
                f"exposure, mean (max) bits, cap {canaries['exposure_cap']:.1f}",
                f"{planted['exposure_mean']:.2f} ({planted['exposure_max']:.2f})",
                f"unplanted {reference['exposure_mean']:.2f}",
            ),
            (
                "memorization",
                setting,
                "secret extracted by greedy decoding",
                _percent(100 * planted["extracted_share"]),
                f"unplanted {_percent(100 * reference['extracted_share'])}",
            ),
        ]
    verbatim = memorization["verbatim"]
    train, validation = verbatim["train"], verbatim["validation"]
    if train["documents"] and validation["documents"]:
        setting = f"{train['documents']} documents, {verbatim['prefix_tokens']}-token prefix"
        rows += [
            (
                "memorization",
                setting,
                f"next {verbatim['suffix_tokens']} tokens reproduced exactly",
                _percent(100 * train["exact_share"]),
                f"validation {_percent(100 * validation['exact_share'])}",
            ),
            (
                "memorization",
                setting,
                "matching tokens before the first miss",
                f"{train['mean_matching_prefix']:.2f}",
                f"validation {validation['mean_matching_prefix']:.2f}",
            ),
        ]
    leakage = memorization["pii_leakage"]
    setting = f"{leakage['prompts']} PII prompts x {leakage['samples_per_prompt']}"
    rows += [
        (
            "memorization",
            setting,
            "continuations with a valid identifier [95% CI]",
            _estimate(leakage["leak_rate"]),
            "-",
        ),
        (
            "memorization",
            setting,
            "the identifier type asked for [95% CI]",
            _estimate(leakage["invited_type_rate"]),
            "-",
        ),
    ]
    return rows


def _bias_skew(report: Mapping[str, Any]) -> list[str]:
    """The occupations most skewed each way, side by side."""
    if "bias" not in report:
        return []
    occupations = report["bias"]["occupations"]
    lines = [
        "",
        f"Occupations: log p(feminine) - log p(masculine) in nats, mean over {occupations['templates']} templates "
        "(> 0: the feminine form is the likelier).",
        "",
        "| rank | most feminine-leaning | nats | most masculine-leaning | nats |",
        "|---:|---|---:|---|---:|",
    ]
    for rank, (fem, masc) in enumerate(zip(occupations["most_feminine"], occupations["most_masculine"]), start=1):
        lines.append(f"| {rank} | {fem[1]} | {fem[2]:.3f} | {masc[0]} | {masc[2]:.3f} |")
    return lines


def _shots(num_shots: int) -> str:
    return f"{num_shots}-shot" if num_shots else "zero-shot"


def retrieval_corpus(retrieval: Mapping[str, Any]) -> str:
    """Which corpus retrieval searched, with its query and passage counts (reports from before pairs files
    existed have no "corpus": they searched XQuAD-es)."""
    corpus = retrieval.get("corpus", XQUAD_CORPUS)
    if corpus == XQUAD_CORPUS:
        return f"{retrieval['queries']} XQuAD-es questions over {retrieval['passages']} contexts"
    return (
        f"{retrieval['queries']} queries of `{corpus}` over {retrieval['passages']} passages "
        "(its distinct positives and negatives)"
    )


def _side_by_side(report: Mapping[str, Any]) -> list[str]:
    """The retrieval methods by metric, and the rag conditions by metric, as two small tables."""
    lines = []
    if "retrieval" in report:
        retrieval = report["retrieval"]
        lines += [
            "",
            f"Retrieval: {retrieval_corpus(retrieval)} (percent).",
            "",
            "| method | " + " | ".join(_LABELS[metric] for metric in _RETRIEVAL_METRICS) + " |",
            "|---|" + "---:|" * len(_RETRIEVAL_METRICS),
        ]
        lines += [
            f"| {name} | " + " | ".join(_percent(scores[metric]) for metric in _RETRIEVAL_METRICS) + " |"
            for name, scores in retrieval["methods"].items()
        ]
    if "rag" in report:
        rag = report["rag"]
        lines += [
            "",
            f"RAG: {rag['examples']} XQuAD-es questions, {_shots(report['settings']['num_shots'])} (on average "
            f"{rag['shots']:.1f} shots fitted the context); retrieved = {rag['searcher']} top-{rag['num_passages']} "
            "(percent, except the mean number of passages).",
            "",
            "| metric | " + " | ".join(_RAG_CONDITIONS.values()) + " |",
            "|---|" + "---:|" * len(_RAG_CONDITIONS),
        ]
        for metric in (*_RAG_METRICS, "passages", "gold_cut"):
            cells = [rag[condition].get(metric) for condition in _RAG_CONDITIONS]
            shown = [("-" if value is None else f"{value:.1f}") for value in cells]
            lines.append(f"| {_RAG_ROWS.get(metric) or _LABELS[metric]} | " + " | ".join(shown) + " |")
    return lines


def markdown_table(report: Mapping[str, Any]) -> str:
    lines = ["| task | setting | metric | score | baseline |", "|---|---|---|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    return "\n".join(lines + _side_by_side(report) + _bias_skew(report)) + "\n"


def comparison_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table with a score column per variant (e.g. float and int8, or zero-shot and tuned), plus
    parameter memory and decode speed when every report has them: what a variant gains, and what it costs."""
    labels = list(reports)
    scores = {label: {row[:3]: row[3] for row in table_rows(report)} for label, report in reports.items()}
    lines = ["| task | setting | metric | " + " | ".join(labels) + " |", "|---|---|---|" + "---:|" * len(labels)]
    for key in scores[labels[0]]:
        lines.append(
            "| " + " | ".join(key) + " | " + " | ".join(scores[label].get(key, "-") for label in labels) + " |"
        )
    for field, metric, shown in (
        ("parameter_bytes", "parameter memory (MB)", lambda v: f"{v / 1e6:.2f}"),
        ("decode_tokens_per_sec", "decode tokens/s, batch 1", lambda v: f"{v:,.0f}"),
    ):
        if not all(field in reports[label] for label in labels):
            continue
        lines.append(f"| model | - | {metric} | " + " | ".join(shown(reports[label][field]) for label in labels) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], json_path: str) -> str:
    """Writes the JSON report and the Markdown table beside it (report.md), each atomically; returns the table.

    A report with a "comparison" (one report per variant, e.g. float and int8) gets the side-by-side table; one
    with the run's "decontamination" lineage (llm/eval/lineage.py) says below it whether the data was checked."""
    table = comparison_table(report["comparison"]) if "comparison" in report else markdown_table(report)
    if "decontamination" in report:
        table += "\n" + "\n".join(lineage.describe(report["decontamination"])) + "\n"
    write_text(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text(os.path.splitext(json_path)[0] + ".md", table)
    return table
