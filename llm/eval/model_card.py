"""MODEL_CARD.md for a run: architecture, parameters, training data with licences, results, use, limits.

The training-data section comes from the `report.json` that scripts/prepare_data.py writes into the data
directory (its `sources`, `corpus` and `tokenizer` entries); without it the card says where it looked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from llm.eval import lineage
from llm.eval.report import XQUAD_CORPUS, markdown_table, retrieval_corpus
from llm.io import read_json, write_text
from llm.train import emissions

# Below this size a model learns spelling and local syntax, not facts: the card says so plainly.
SMALL_MODEL_PARAMS = 50_000_000


def read_data_report(data_path: str) -> dict[str, Any] | None:
    """The data directory's report.json, or None if there is none."""
    return read_json(os.path.join(data_path, "report.json"))


def _architecture(model: ml_collections.ConfigDict, num_params: int) -> list[str]:
    head_dim = model.head_dim or model.embed_dim // model.num_heads
    rows = [
        ("type", "decoder-only transformer (pre-norm)"),
        ("parameters", f"{num_params:,}"),
        ("layers", model.num_layers),
        ("width (embed_dim)", model.embed_dim),
        ("attention heads / KV heads / head dim", f"{model.num_heads} / {model.num_kv_heads} / {head_dim}"),
        ("MLP", f"{model.mlp_activation}, hidden {model.mlp_dim}"),
        ("normalization", model.norm),
        ("positions", model.position_encoding),
        ("vocabulary", f"{model.vocab_size:,} (SentencePiece)"),
        ("context", f"{model.max_seq_len} tokens"),
        ("tied input/output embeddings", "yes" if model.tie_embeddings else "no"),
    ]
    return ["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]


def _training(config: ml_collections.ConfigDict, step: int) -> list[str]:
    tokens = step * config.train.batch_size * config.data.seq_len
    opt = config.optimizer
    return [
        f"{step:,} steps of {config.train.batch_size} rows x {config.data.seq_len} tokens: about {tokens:,} "
        f"training tokens. AdamW, peak learning rate {opt.learning_rate}, {opt.schedule} schedule after "
        f"{opt.warmup_steps} warmup steps, weight decay {opt.weight_decay}."
    ]


def _compute(config: ml_collections.ConfigDict, step: int, compute: Mapping[str, Any] | None) -> list[str]:
    """Steps, tokens, wall time, devices, energy and emissions; `compute` is the run's emissions.json."""
    tokens = step * config.train.batch_size * config.data.seq_len
    rows = [("steps", f"{step:,}"), ("tokens seen", f"{tokens:,}")]
    if compute is None:
        return _rows(rows) + ["", f"No {emissions.EMISSIONS_FILE} in the run directory: wall time and energy unknown."]
    total, last = compute["total"], compute["sessions"][-1]
    hosts = f" on {last['process_count']} hosts" if last["process_count"] > 1 else ""
    rows += [
        ("wall time", f"{_duration(total['duration_s'])} over {total['sessions']} session(s)"),
        ("devices", f"{last['device_count']} x {last['device_kind']}{hosts}"),
    ]
    if total["energy_kwh"] is None:
        rows.append(("energy", f"not measured ({last.get('not_measured', 'config.train.track_emissions=False')})"))
        return _rows(rows)
    label = total["measurement"]
    partial = (
        f", {total['sessions_with_energy']} of {total['sessions']} sessions"
        if total["sessions_with_energy"] < total["sessions"]
        else ""
    )
    tracked = [session for session in compute["sessions"] if session["energy_kwh"] is not None][-1]
    methods = ", ".join(f"{name} {method}" for name, method in tracked["methods"].items())
    first_host = " (first host only)" if hosts else ""
    rows += [
        ("energy", f"{total['energy_kwh']:.4g} kWh, {label}{partial}{first_host}"),
        ("emissions", f"{total['emissions_kg_co2eq']:.4g} kg CO2eq ({tracked['country']} grid, codecarbon offline)"),
        ("power readings", methods or "n/a"),
    ]
    return _rows(rows)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]


def _data(data_report: Mapping[str, Any] | None, data_path: str) -> list[str]:
    if data_report is None:
        return [
            f"No data report found at `{os.path.join(data_path, 'report.json')}` (it is written by "
            "`scripts/prepare_data.py`), so the sources and their licences are not listed here."
        ]
    lines = ["| source | licence | documents | MB | words | tokens |", "|---|---|---:|---:|---:|---:|"]
    for source in data_report.get("sources", []):
        lines.append(
            f"| {source['source']} | {source['licence']} | {source['documents']:,} | {source['mb']} | "
            f"{source['words']:,} | {source['tokens']:,} |"
        )
    corpus, tokenizer = data_report.get("corpus", {}), data_report.get("tokenizer", {})
    if corpus:
        # The data report (llm/corpus/report.py) keeps sizes at its top level: {"mb": {"in", "out"}, ...}.
        megabytes = data_report.get("mb", {}).get("out")
        lines.append(
            f"\nCorpus after cleaning, filtering and deduplication: {corpus['documents']:,} documents, "
            f"{megabytes} MB, {corpus['tokens']:,} tokens."
        )
    if tokenizer.get("fertility"):
        lines.append(
            f"Tokenizer: {tokenizer['model_type']}, {tokenizer['vocab_size']:,} pieces, "
            f"{tokenizer['fertility']} tokens per word on {tokenizer['eval_text']}."
        )
    return lines


def _decontamination(report: Mapping[str, Any]) -> list[str]:
    """Whether this run's data, and the data of the runs it started from, was checked against evaluation sets."""
    if "decontamination" not in report:
        return []
    return ["", *lineage.describe(report["decontamination"])]


def _retrieval_note(report: Mapping[str, Any]) -> list[str]:
    """What the retrieval and rag figures measure, when the report has them."""
    notes = []
    if "retrieval" in report:
        retrieval = report["retrieval"]
        gold = (
            "the gold passage is its own context"
            if retrieval.get("corpus", XQUAD_CORPUS) == XQUAD_CORPUS
            else "the gold passage is its pair's positive, the negatives are distractors"
        )
        notes.append(
            f"retrieval: {retrieval_corpus(retrieval)}; {gold}. dense pools this model's own hidden states "
            "unless another embedder run was given."
        )
    if "rag" in report:
        notes.append(
            "rag: the same few-shot XQuAD prompt with no context (closed-book), the retrieved passages, or the "
            "question's own context (gold passage): what retrieval adds, and what it loses against the oracle."
        )
    return ["", *notes] if notes else []


def _bias_note(report: Mapping[str, Any]) -> list[str]:
    """How to read the bias rows, when the report has them."""
    if "bias" not in report:
        return []
    return [
        "",
        "bias: the share of this project's Spanish minimal pairs (llm/eval/data/bias_pairs_es.jsonl) where the "
        "model finds the stereotypical sentence likelier than the anti-stereotypical one (50 = no preference), with "
        "95% bootstrap intervals; occupations: log p(feminine) - log p(masculine) of the same sentence with an "
        "occupation's two grammatical genders (0 = no preference). A score near 50 on a small set does not show "
        "that the model is unbiased.",
    ]


def _toxicity_and_memorization_note(report: Mapping[str, Any]) -> list[str]:
    """How to read the toxicity and memorization rows, when the report has them."""
    notes = []
    if "toxicity" in report:
        notes.append(
            "toxicity: sampled continuations (temperature 1, top-p 0.95) of this project's neutral and provocative "
            "Spanish prompts (llm/eval/data/toxicity_prompts_es.jsonl); a continuation is flagged when it holds a word "
            "of the corpus filter's offensive list, so insults in ordinary words are not counted: a lower bound."
        )
    if "memorization" in report:
        notes.append(
            "memorization: exposure (bits) of canaries planted in the training data against unplanted ones from the "
            "same distribution (Carlini et al. 2019); greedy continuations of training documents against validation "
            "documents (what generalisation alone reproduces); and sampled continuations of prompts such as "
            '"Mi DNI es" that hold a checksum-valid identifier (an invented but valid number also counts).'
        )
    return ["", *notes] if notes else []


def _limitations(
    config: ml_collections.ConfigDict, num_params: int, step: int, data_report: Mapping[str, Any] | None
) -> list[str]:
    tokens = step * config.train.batch_size * config.data.seq_len
    sources = ", ".join(source["source"] for source in (data_report or {}).get("sources", [])) or "its corpus"
    lines = []
    if num_params < SMALL_MODEL_PARAMS:
        lines.append(
            f"- **Tiny.** {num_params:,} parameters trained on about {tokens:,} tokens (minutes on a CPU "
            "for the default recipe). It learns spelling, frequent words and local syntax, not facts or "
            "reasoning: its text is fluent-looking but often meaningless or false, and scores near the "
            "chance and unigram baselines on the tasks above are expected."
        )
    lines += [
        f"- **Narrow data.** It writes like its training data ({sources}); other registers, dialects and "
        "topics are poorly covered.",
        "- **Not aligned.** No instruction tuning and no safety training: only the corpus cleaning filters "
        "(quality, PII, offensive words). It can reproduce biases and errors of its data.",
        f"- **Spanish only, short context.** Its tokenizer was trained on Spanish text; other languages split "
        f"into many pieces. It reads at most {config.model.max_seq_len} tokens; longer evaluation prompts "
        "were cut from the left.",
    ]
    return lines


def model_card(
    config: ml_collections.ConfigDict,
    *,
    num_params: int,
    step: int,
    workdir: str,
    report: Mapping[str, Any],
    data_report: Mapping[str, Any] | None,
    compute: Mapping[str, Any] | None = None,
) -> str:
    """The Markdown of MODEL_CARD.md; `compute` is the run's emissions.json."""
    name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    sections = [
        [
            f"# Model card: {name}",
            "",
            f"A Spanish language model trained with this repository (checkpoint of step {step:,}).",
        ],
        ["## Architecture", ""] + _architecture(config.model, num_params),
        ["## Training", ""] + _training(config, step),
        ["## Training compute", ""] + _compute(config, step, compute),
        ["## Training data", ""] + _data(data_report, config.data.path) + _decontamination(report),
        [
            "## Evaluation",
            "",
            "Scores in percent except bits per byte and perplexity; written by "
            "`scripts/evaluate.py` (every figure, with the settings, is in its JSON report).",
            "",
            markdown_table(report).rstrip(),
            *_retrieval_note(report),
            *_bias_note(report),
            *_toxicity_and_memorization_note(report),
        ],
        [
            "## Intended use",
            "",
            "Research and teaching: seeing how a Spanish language model is built, trained and evaluated end to end, "
            "and comparing changes of data, tokenizer, architecture or training against a baseline. Not for "
            "production, advice, or any text that people will rely on.",
        ],
        ["## Known limitations", ""] + _limitations(config, num_params, step, data_report),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def write_model_card(
    workdir: str, config: ml_collections.ConfigDict, *, num_params: int, step: int, report: Mapping[str, Any]
) -> str:
    """Writes (or replaces) WORKDIR/MODEL_CARD.md and returns its path."""
    data_report = read_data_report(config.data.path)
    path = os.path.join(workdir, "MODEL_CARD.md")
    write_text(
        path,
        model_card(
            config,
            num_params=num_params,
            step=step,
            workdir=workdir,
            report=report,
            data_report=data_report,
            compute=emissions.read(workdir),
        ),
    )
    return path
