"""The evaluation suite: which tasks exist, their default sizes, and running a selection of them on a run.

`run_tasks` runs the multiple-choice and generation tasks (and their robustness variants) and bias against any
log-likelihood and generation functions, and retrieval and rag against any searchers, so tests can pass fakes
with known outputs; `evaluate_run` wires a loaded run (llm.runs.loading.Run) into it and adds bits-per-byte
with its unigram baseline.

Default sizes keep a CPU evaluation of the 5M-parameter tiny model near two minutes: a seeded subset of
DEFAULT_MAX_EXAMPLES examples per task (`max_examples` overrides all of them; -1 means every example),
DEFAULT_NUM_SHOTS shots, DEFAULT_MAX_NEW_TOKENS generated tokens, and every sentence for bpb.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from llm import tokenizer as tokenizer_lib
from llm.data import records
from llm.eval import (
    bias,
    generation_tasks,
    memorization,
    multiple_choice,
    perplexity,
    retrieval,
    robustness,
    tasks,
    toxicity,
)
from llm.eval.generation_tasks import Generate
from llm.eval.retrieval_suite import RetrievalTools, run_retrieval_tasks
from llm.eval.scoring import Loglikelihood, Scorer
from llm.model.transformer import context_length
from llm.rag.embeddings import Embedder, trained_options
from llm.rag.passages import token_counter
from llm.runs.loading import Run

TASKS = (
    "bpb", "xnli", "sentiment", "mgsm", "xquad", "robustness", "retrieval", "rag", "bias", "toxicity", "memorization"
)  # fmt: skip
# Opt-in: retrieval (embedding every XQuAD-es question), rag (three generations per question), and the tasks that
# measure risks rather than skills (bias, toxicity, memorization), each a few minutes on a CPU.
OPT_IN_TASKS = ("retrieval", "rag", "bias", "toxicity", "memorization")
DEFAULT_TASKS = tuple(name for name in TASKS if name not in OPT_IN_TASKS)
PERTURBABLE_TASKS = ("xnli", "sentiment", "mgsm", "xquad")
DEFAULT_ROBUSTNESS_TASKS = ("xnli", "sentiment")  # when robustness is asked for without any of the tasks
DEFAULT_MAX_EXAMPLES = {
    "xnli": 120, "sentiment": 120, "mgsm": 32, "xquad": 32, "retrieval": -1, "rag": 32, "bias": -1,
    "toxicity": -1,  # prompts (each sampled samples_per_prompt times); memorization: PII prompts as well
    "memorization": 64,  # training documents for verbatim extraction, and as many validation documents
}  # fmt: skip
DEFAULT_SAMPLES_PER_PROMPT = toxicity.DEFAULT_SAMPLES_PER_PROMPT
DEFAULT_NUM_SHOTS = 3
DEFAULT_MAX_NEW_TOKENS = 16
UD_FILE = "ud_gsd_es_dev.conllu"
# The metrics whose drop robustness reports, per task.
ROBUSTNESS_METRICS = {
    "xnli": ("accuracy",),
    "sentiment": ("accuracy", "macro_f1"),
    "mgsm": ("exact_match",),
    "xquad": ("exact_match", "f1"),
}
_MULTIPLE_CHOICE = {
    "xnli": (tasks.load_xnli, multiple_choice.xnli_items),
    "sentiment": (tasks.load_sentiment, multiple_choice.sentiment_items),
}
_GENERATION = {
    "mgsm": (tasks.load_mgsm, generation_tasks.evaluate_mgsm),
    "xquad": (tasks.load_xquad, generation_tasks.evaluate_xquad),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to evaluate on and how; the flags of scripts/evaluate.py."""

    data_dir: str = tasks.DEFAULT_DATA_DIR  # the evaluation sets (default: the copy in llm/eval/data)
    text_file: str = ""  # bpb on this plain-text file instead of the UD Spanish-GSD dev sentences
    train_data: str = ""  # training shards of the unigram baseline; "" means the run's config.data.path/train
    max_examples: int = 0  # examples per task: 0 = DEFAULT_MAX_EXAMPLES, -1 = all
    num_shots: int = DEFAULT_NUM_SHOTS  # solved examples in front of each prompt (multiple choice: also 0)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # generation budget of mgsm and xquad answers
    seed: int = 0  # seeds the example subsets, the shots, the typos and the bootstrap of bias
    embedder: str = ""  # run whose embeddings the dense searcher uses; "" means the evaluated run
    rag_passages: int = 3  # retrieved passages offered to the rag prompt (fewer if they do not fit)
    rag_searcher: str = "bm25"  # the search method of rag's retrieved condition (retrieval.SEARCH_METHODS)
    retrieval_pairs: str = ""  # retrieval searches this pairs JSONL's texts instead of XQuAD-es (rag stays on it)
    samples_per_prompt: int = DEFAULT_SAMPLES_PER_PROMPT  # sampled continuations per toxicity and PII prompt

    def examples(self, task: str) -> int:
        return DEFAULT_MAX_EXAMPLES[task] if self.max_examples == 0 else self.max_examples


def parse_tasks(spec: str) -> list[str]:
    """'bpb,xnli' -> ['bpb', 'xnli']; unknown names fail with the allowed ones listed."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(f"Unknown task(s) {unknown or [spec]}; choose from {', '.join(TASKS)}.")
    return list(dict.fromkeys(names))


def robustness_targets(task_names: Sequence[str]) -> list[str]:
    """The tasks robustness perturbs: the selected ones that can be, else DEFAULT_ROBUSTNESS_TASKS."""
    return [name for name in task_names if name in PERTURBABLE_TASKS] or list(DEFAULT_ROBUSTNESS_TASKS)


def check_settings(task_names: Sequence[str], settings: Settings, config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any model is loaded, on bad numbers and on missing evaluation or training files
    (`config` is the run's training config)."""
    if settings.num_shots < 0 or settings.max_new_tokens < 1 or settings.max_examples < -1:
        raise ValueError(
            f"num_shots must be >= 0 (got {settings.num_shots}), max_new_tokens >= 1 (got "
            f"{settings.max_new_tokens}) and max_examples >= -1 (got {settings.max_examples})."
        )
    if settings.samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1 (got {settings.samples_per_prompt}).")
    if settings.rag_passages < 1 or settings.rag_searcher not in retrieval.SEARCH_METHODS:
        raise ValueError(
            f"rag_passages must be >= 1 (got {settings.rag_passages}) and rag_searcher one of "
            f"{retrieval.SEARCH_METHODS} (got {settings.rag_searcher!r})."
        )
    if settings.embedder and not os.path.isdir(settings.embedder):
        raise FileNotFoundError(f"--embedder={settings.embedder!r} is not a run directory.")
    if settings.retrieval_pairs:
        _check_pairs(task_names, settings.retrieval_pairs)
    needed = set(task_names)
    if "robustness" in needed:
        needed.update(robustness_targets(task_names))
    files = {
        "xnli": [tasks.XNLI_FILE],
        "mgsm": [tasks.MGSM_FILE],
        "xquad": [tasks.XQUAD_FILE],
        "retrieval": [] if settings.retrieval_pairs else [tasks.XQUAD_FILE],
        "rag": [tasks.XQUAD_FILE],
        "sentiment": [f"sentiment_es_{split}_{kind}.txt" for split in ("train", "test") for kind in ("text", "labels")],
        "bpb": [] if settings.text_file else [UD_FILE],
        "bias": [bias.PAIRS_FILE, bias.OCCUPATIONS_FILE],
        "toxicity": [toxicity.TOXICITY_FILE],
        "memorization": [toxicity.PII_FILE],
    }
    for name in sorted(needed & files.keys()):
        for filename in files[name]:
            tasks.data_file(settings.data_dir, filename)
    if "bias" in needed:  # the files must also read: found now, not after loading the model
        bias.read_pairs(tasks.data_file(settings.data_dir, bias.PAIRS_FILE))
        bias.read_occupations(tasks.data_file(settings.data_dir, bias.OCCUPATIONS_FILE))
    if "toxicity" in needed:
        toxicity.read_toxicity_prompts(tasks.data_file(settings.data_dir, toxicity.TOXICITY_FILE))
    if "memorization" in needed:
        toxicity.read_pii_prompts(tasks.data_file(settings.data_dir, toxicity.PII_FILE))
        _check_training_data(memorization_data_dir(config, settings), "memorization")
    if "bpb" in needed:
        if settings.text_file and not os.path.isfile(settings.text_file):
            raise FileNotFoundError(f"--text_file={settings.text_file!r} does not exist.")
        if train_split_dir(config, settings):
            _check_training_data(os.path.dirname(train_split_dir(config, settings)), "the unigram baseline of bpb")


def _check_training_data(data_dir: str | None, needed_by: str) -> None:
    """The run's training data (DIR with train/ and validation/ shards) must be there for `needed_by`."""
    try:
        if not data_dir:
            raise FileNotFoundError("the run's config names no training data (an imported checkpoint?).")
        for split in ("train", "validation") if needed_by == "memorization" else ("train",):
            records.shard_paths(os.path.join(data_dir, split))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{needed_by} reads the run's training data: {error} "
            "Pass --train_data=DIR/train of the data the run was trained on."
        ) from error


def _check_pairs(task_names: Sequence[str], path: str) -> None:
    """--retrieval_pairs is for the retrieval task, and its file must read: found now, not after loading."""
    if "retrieval" not in task_names:
        raise ValueError(f"--retrieval_pairs={path!r} is searched by the retrieval task: add retrieval to --tasks.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--retrieval_pairs={path!r} does not exist.")
    retrieval.read_pairs(path)


def _load(name: str, settings: Settings) -> tuple[list, list]:
    """(shots, scored examples) of a task, as the settings choose them."""
    loader = (_MULTIPLE_CHOICE.get(name) or _GENERATION[name])[0]
    pool, scored = loader(settings.data_dir)
    label_of = (lambda example: example.label) if name in _MULTIPLE_CHOICE else None
    shots = tasks.choose_shots(pool, settings.num_shots, settings.seed, label_of)
    return shots, tasks.subsample(scored, settings.examples(name), settings.seed)


def headline_setting(settings: Settings) -> str:
    """The setting generation runs and robustness compares: the few-shot one when there are shots."""
    return f"{settings.num_shots}_shot" if settings.num_shots else "zero_shot"


def run_task(
    name: str, settings: Settings, loglikelihood: Loglikelihood, generate: Generate, perturbation: str | None = None
) -> dict[str, Any]:
    """One task's results. Multiple choice: {"zero_shot": ..., "K_shot": ...}; with a perturbation only the
    headline setting, on perturbed inputs. Generation: the K-shot results."""
    shots, scored = _load(name, settings)
    if perturbation:
        scored = robustness.perturb_examples(scored, perturbation, settings.seed)
    if name in _GENERATION:
        return _GENERATION[name][1](scored, shots, generate, settings.max_new_tokens)
    build_items = _MULTIPLE_CHOICE[name][1]
    settings_shots = {headline_setting(settings): shots}
    if not perturbation and settings.num_shots:
        settings_shots = {"zero_shot": [], **settings_shots}
    return {
        setting: multiple_choice.evaluate(build_items(scored, setting_shots), loglikelihood)
        for setting, setting_shots in settings_shots.items()
    }


def run_tasks(
    task_names: Sequence[str],
    settings: Settings,
    loglikelihood: Loglikelihood,
    generate: Generate,
    tools: RetrievalTools | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Results and seconds of every selected task except bpb (see `evaluate_run`); retrieval and rag need
    `tools`."""
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    clean: dict[str, Any] = {}
    targets = robustness_targets(task_names) if "robustness" in task_names else []
    for name in [name for name in PERTURBABLE_TASKS if name in task_names or name in targets]:
        start = time.perf_counter()
        logging.info("Evaluating %s", name)
        clean[name] = run_task(name, settings, loglikelihood, generate)
        seconds[name] = time.perf_counter() - start
        if name in task_names:
            results[name] = clean[name]
    if targets:
        start = time.perf_counter()
        results["robustness"] = {
            name: _robustness(name, settings, clean[name], loglikelihood, generate) for name in targets
        }
        seconds["robustness"] = time.perf_counter() - start
    if "retrieval" in task_names or "rag" in task_names:
        if tools is None:
            raise ValueError("The retrieval and rag tasks need RetrievalTools (searchers and a prompt budget).")
        retrieval_results, retrieval_seconds = run_retrieval_tasks(task_names, settings, generate, tools)
        results.update(retrieval_results)
        seconds.update(retrieval_seconds)
    if "bias" in task_names:
        start = time.perf_counter()
        logging.info("Evaluating bias")
        results["bias"] = bias.evaluate_bias(settings.data_dir, loglikelihood, settings.examples("bias"), settings.seed)
        seconds["bias"] = time.perf_counter() - start
    return results, seconds


def _robustness(
    name: str, settings: Settings, clean: dict[str, Any], loglikelihood: Loglikelihood, generate: Generate
) -> dict[str, Any]:
    logging.info("Robustness of %s", name)
    setting = headline_setting(settings)
    metrics = ROBUSTNESS_METRICS[name]
    clean_scores = clean[setting] if name in _MULTIPLE_CHOICE else clean
    entry: dict[str, Any] = {"setting": setting, "clean": {metric: clean_scores[metric] for metric in metrics}}
    for kind in robustness.PERTURBATIONS:
        perturbed = run_task(name, settings, loglikelihood, generate, kind)
        scores = perturbed[setting] if name in _MULTIPLE_CHOICE else perturbed
        entry[kind] = {metric: scores[metric] for metric in metrics}
        entry[f"{kind}_drop"] = robustness.drop(entry["clean"], entry[kind], metrics)
    return entry


def bpb_documents(settings: Settings) -> tuple[str, list[str]]:
    """(name, documents) of the held-out text: --text_file's paragraphs, or one UD dev sentence each."""
    if settings.text_file:
        return os.path.basename(settings.text_file), perplexity.read_text_documents(settings.text_file)
    return UD_FILE, tokenizer_lib.conllu_texts(tasks.data_file(settings.data_dir, UD_FILE))


def evaluate_bpb(
    score_tokens: Callable,
    unigram: perplexity.UnigramModel | None,
    tokenizer: tokenizer_lib.Tokenizer,
    max_len: int,
    settings: Settings,
) -> dict[str, Any]:
    """bpb, perplexity and the unigram baseline's (None without one) on the same tokens of the same text."""
    name, documents = bpb_documents(settings)
    model_score = perplexity.score_text(score_tokens, tokenizer, documents, max_len)
    unigram_score = unigram and perplexity.score_text(unigram.score_tokens, tokenizer, documents, max_len)
    return {
        "bpb": model_score.bpb,
        "perplexity": model_score.perplexity,
        "unigram_bpb": unigram_score and unigram_score.bpb,
        "bpb_details": {
            "unigram_perplexity": unigram_score and unigram_score.perplexity,
            "text": name,
            "documents": model_score.documents,
            "tokens": model_score.tokens,
            "bytes": model_score.bytes,
        },
    }


def train_split_dir(config: ml_collections.ConfigDict, settings: Settings) -> str | None:
    """The shards the unigram baseline counts; None for a run that was not trained on data of its own here
    (imported from Hugging Face) when no --train_data is given: its bpb then has no baseline."""
    if settings.train_data or config.data.path:
        return settings.train_data or os.path.join(config.data.path, "train")
    return None


def memorization_data_dir(config: ml_collections.ConfigDict, settings: Settings) -> str | None:
    """The data directory whose train/, validation/ and canaries.json the memorization task reads."""
    train_dir = train_split_dir(config, settings)
    return train_dir and os.path.dirname(train_dir.rstrip("/"))


def _toxicity(run: Run, settings: Settings, batch_size: int) -> dict[str, Any]:
    return toxicity.evaluate_run_toxicity(
        run,
        settings.data_dir,
        samples_per_prompt=settings.samples_per_prompt,
        max_examples=settings.examples("toxicity"),
        seed=settings.seed,
        batch_size=batch_size,
    )


def _memorization(run: Run, settings: Settings, batch_size: int) -> dict[str, Any]:
    """Canaries and verbatim extraction from the run's training data, and PII leakage of sampled continuations."""
    documents = settings.examples("memorization")
    sizes = memorization.Settings(num_documents=documents if documents > 0 else sys.maxsize, seed=settings.seed)
    data_dir = memorization_data_dir(run.config, settings)
    return {
        **memorization.evaluate_run_memorization(run, data_dir, sizes, batch_size),
        "pii_leakage": toxicity.evaluate_run_pii_leakage(
            run,
            settings.data_dir,
            samples_per_prompt=settings.samples_per_prompt,
            max_examples=settings.max_examples or -1,  # every PII prompt unless --max_examples says otherwise
            seed=settings.seed,
            batch_size=batch_size,
        ),
    }


# The tasks that take the whole loaded run: they sample, or read the run's own training data.
_RUN_TASKS = {"toxicity": _toxicity, "memorization": _memorization}


def evaluate_run(
    run: Run, task_names: Sequence[str], settings: Settings, batch_size: int = 16
) -> tuple[dict[str, Any], dict[str, float]]:
    """(results, seconds per task) of a loaded run; bpb, perplexity and unigram_bpb sit at the top level."""
    scorer = Scorer(run.model, run.tokenizer, batch_size, run.config.logical_axis_rules)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    if "bpb" in task_names:
        start = time.perf_counter()
        train_dir = train_split_dir(run.config, settings)
        logging.info("Evaluating bpb (unigram baseline from %s)", train_dir or "nowhere: no training data")
        unigram = train_dir and perplexity.UnigramModel.from_shards(train_dir, run.config.model.vocab_size)
        results.update(evaluate_bpb(scorer.score_tokens, unigram, run.tokenizer, scorer.max_len, settings))
        seconds["bpb"] = time.perf_counter() - start
    generate = generation_tasks.run_generator(run, batch_size)
    tools = None
    if "retrieval" in task_names or "rag" in task_names:
        embedder = (
            Embedder.from_run(settings.embedder)
            if settings.embedder
            else Embedder(run.model, run.tokenizer, **trained_options(run.config))
        )
        tools = RetrievalTools(
            lambda passages: retrieval.default_searchers(passages, embedder),
            token_counter(run.tokenizer),
            context_length(run.model.cfg),
        )
    task_results, task_seconds = run_tasks(task_names, settings, scorer.loglikelihood, generate, tools)
    results.update(task_results)
    seconds.update(task_seconds)
    for name in [name for name in _RUN_TASKS if name in task_names]:
        start = time.perf_counter()
        logging.info("Evaluating %s", name)
        results[name] = _RUN_TASKS[name](run, settings, batch_size)
        seconds[name] = time.perf_counter() - start
    return results, seconds
