"""Evaluates a trained run in Spanish: bits-per-byte, XNLI, sentiment, MGSM, XQuAD, robustness, and (asked for
by name) XQuAD-es retrieval, retrieval-augmented answers, bias, toxicity and memorization.

    python scripts/evaluate.py --workdir=runs/tiny_es [--tasks=bpb,xnli,sentiment,mgsm,xquad,robustness]
        [--output=report.json] [--text_file=F] [--max_examples=N] [--num_shots=K] [--data_dir=DIR]
        [--quantize=int8|int4|int8_act]
    python scripts/evaluate.py --workdir=runs/tiny_es --tasks=retrieval,rag [--embedder=RUN]
        [--rag_passages=3] [--rag_searcher=bm25|dense]
    python scripts/evaluate.py --workdir=runs/embedder --tasks=retrieval \
        --retrieval_pairs=data/pairs_es/validation_pairs.jsonl [--embedder=RUN]
    python scripts/evaluate.py --workdir=runs/tiny_es --tasks=bias,toxicity,memorization [--seed=0] \
        [--samples_per_prompt=4]

--tasks=bias scores the project's Spanish stereotype minimal pairs (share preferring the stereotype, per category,
with bootstrap intervals) and the occupation gender probe (llm/eval/bias.py); --max_examples subsamples both.
--tasks=toxicity samples continuations of Spanish prompts and flags offensive words (llm/eval/toxicity.py);
--tasks=memorization measures canary exposure and extraction, verbatim extraction of training documents against
validation ones (llm/eval/memorization.py) and PII leakage of sampled continuations of prompts like "Mi DNI es".

--retrieval_pairs searches your own pairs instead of XQuAD-es: each query over the file's distinct positives and
negatives (e.g. the held-out pairs scripts/prepare_pairs.py writes to DIR/validation_pairs.jsonl).

With --quantize (or a quantized --workdir from scripts/quantize.py), the float and the quantized model are
evaluated side by side, with their parameter memory and decode speed, in one table.

Writes the JSON report (default WORKDIR/eval/report.json) and report.md beside it, prints the table, and
writes WORKDIR/MODEL_CARD.md (unless --nomodel_card). A run trained with MLflow tracking (WORKDIR/mlflow_run.json) gets
the report's numbers as eval/... metrics and the files as artifacts. Flags and files are checked before the model is
loaded.
"""

import dataclasses
import os

import run_flags
from absl import app, flags, logging

from llm import checkpoint
from llm.eval import lineage, model_card, report, retrieval, suite
from llm.eval.tasks import DEFAULT_DATA_DIR
from llm.infer.benchmark import benchmark_decode
from llm.model.transformer import count_params
from llm.quant import ptq
from llm.runs import directory, loading, quantized_run
from llm.train import tracking

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by scripts/train.py.", required=True)
_TASKS = flags.DEFINE_string(
    "tasks",
    ",".join(suite.DEFAULT_TASKS),
    f"Comma-separated tasks from: {', '.join(suite.TASKS)} ({', '.join(suite.OPT_IN_TASKS)} only when named).",
)
_OUTPUT = flags.DEFINE_string("output", "", "JSON report path (default WORKDIR/eval/report.json); .md beside it.")
_TEXT_FILE = flags.DEFINE_string(
    "text_file",
    "",
    "bpb on this UTF-8 text file (paragraphs split at blank lines) instead of the UD Spanish-GSD dev sentences.",
)
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples",
    0,
    f"Examples per task: 0 = the per-task defaults {suite.DEFAULT_MAX_EXAMPLES}, -1 = all.",
    lower_bound=-1,
)
_NUM_SHOTS = flags.DEFINE_integer(
    "num_shots",
    suite.DEFAULT_NUM_SHOTS,
    "Solved examples before each prompt (multiple-choice tasks also report zero-shot).",
    lower_bound=0,
)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", suite.DEFAULT_MAX_NEW_TOKENS, "Generated tokens per MGSM / XQuAD answer.", lower_bound=1
)
_DATA_DIR = flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Directory with the Spanish evaluation files.")
_TRAIN_DATA = flags.DEFINE_string(
    "train_data", "", "Training shards for the unigram baseline (default: the run's config.data.path/train)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    None,
    list(ptq.MODES),
    "Also evaluate this post-training quantization of the run, side by side with the float model.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.", lower_bound=1)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seeds the example subsets, the shots, the typos, the samples and the bootstrap intervals."
)
_SAMPLES_PER_PROMPT = flags.DEFINE_integer(
    "samples_per_prompt",
    suite.DEFAULT_SAMPLES_PER_PROMPT,
    "Sampled continuations per toxicity and PII-leakage prompt.",
    lower_bound=1,
)
_EMBEDDER = flags.DEFINE_string(
    "embedder", "", "Run whose pooled hidden states the retrieval task's dense search uses (default: --workdir)."
)
_RAG_PASSAGES = flags.DEFINE_integer(
    "rag_passages",
    suite.Settings.rag_passages,
    "Retrieved passages offered to each rag prompt (fewer when they do not fit).",
    lower_bound=1,
)
_RAG_SEARCHER = flags.DEFINE_enum(
    "rag_searcher",
    suite.Settings.rag_searcher,
    list(retrieval.SEARCH_METHODS),
    "Search method of rag's retrieved condition.",
)
_RETRIEVAL_PAIRS = flags.DEFINE_string(
    "retrieval_pairs",
    "",
    'retrieval: search this JSONL of {"id"?, "query", "positive", "negative"?} (its queries over its distinct '
    "positives and negatives) instead of XQuAD-es.",
)
_MODEL_CARD = flags.DEFINE_bool(
    "model_card",
    True,
    "Write WORKDIR/MODEL_CARD.md with this report (--nomodel_card "
    "for a side experiment that should not replace the run's card).",
)


def _checked_inputs() -> tuple[list[str], suite.Settings]:
    """Everything that can be wrong with the flags and files, found before the model is loaded."""
    task_names = suite.parse_tasks(_TASKS.value)
    workdir = _WORKDIR.value
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir!r} does not exist.")
    config = directory.load_config(workdir)
    checkpoint.require_checkpoint(workdir, _STEP.value)
    settings = suite.Settings(
        data_dir=_DATA_DIR.value,
        text_file=_TEXT_FILE.value,
        train_data=_TRAIN_DATA.value,
        max_examples=_MAX_EXAMPLES.value,
        num_shots=_NUM_SHOTS.value,
        max_new_tokens=_MAX_NEW_TOKENS.value,
        seed=_SEED.value,
        embedder=_EMBEDDER.value,
        rag_passages=_RAG_PASSAGES.value,
        rag_searcher=_RAG_SEARCHER.value,
        retrieval_pairs=_RETRIEVAL_PAIRS.value,
        samples_per_prompt=_SAMPLES_PER_PROMPT.value,
    )
    suite.check_settings(task_names, settings, config)
    return task_names, settings


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        task_names, settings = _checked_inputs()
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from error
    checkpoint.quiet_orbax_logs()
    run = run_flags.load_run(_WORKDIR.value, _STEP.value)
    variants = _variants(run)
    num_params = count_params(variants["float"].model)  # Quantization scales are not parameters.
    reports = {}
    for label, variant in variants.items():
        results, seconds = suite.evaluate_run(variant, task_names, settings, _BATCH_SIZE.value)
        reports[label] = report.build_report(
            results,
            workdir=run.workdir,
            step=run.step,
            num_params=num_params,
            settings={"tasks": task_names, **dataclasses.asdict(settings)},
            seconds=seconds,
        )
        if len(variants) > 1:
            reports[label].update(
                parameter_bytes=ptq.parameter_bytes(variant.model),
                decode_tokens_per_sec=benchmark_decode(variant.model, (1,), prompt_len=64, new_tokens=16)["batch_1"][
                    "decode_tokens_per_sec"
                ],
            )
    full_report = reports[_label(run)]
    if len(variants) > 1:
        full_report = {**full_report, "comparison": reports}
    full_report["decontamination"] = lineage.decontamination_lineage(run.workdir, run.config)
    output = _OUTPUT.value or os.path.join(run.workdir, "eval", "report.json")
    print(report.write_report(full_report, output))
    logging.info("Wrote %s and %s", output, os.path.splitext(output)[0] + ".md")
    if _MODEL_CARD.value:
        card = model_card.write_model_card(
            run.workdir, run.config, num_params=num_params, step=run.step, report=full_report
        )
        logging.info("Wrote %s", card)
    tracking.log_evaluation(run.workdir, full_report, run.step, output)  # When the run has an MLflow run.


def _label(run: loading.Run) -> str:
    return run.config.quantization.mode if ptq.is_quantized(run.config) else "float"


def _variants(run: loading.Run) -> dict[str, loading.Run]:
    """The runs to evaluate: the run itself, and with --quantize or a quantized run its counterpart."""
    if _QUANTIZE.value:
        return {"float": run, _QUANTIZE.value: quantized_run.quantize_run(run, _QUANTIZE.value)}
    if ptq.is_quantized(run.config):
        return {"float": quantized_run.load_source_run(run), _label(run): run}
    return {"float": run}


if __name__ == "__main__":
    app.run(main)
