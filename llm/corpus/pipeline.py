"""The corpus pipeline's steps and their order, the logic both runners share, and resumable execution.

`prepare()` runs six steps, each writing under DIR/stages/NAME/ and then, last, a completion marker:

  filter     read the sources, then every per-document stage (clean, archaic, quality, langid, pii,
             offensive)                                           -> documents-*.jsonl + counts.json
  dedup      exact dedup (same normalized text: the smallest id is kept), then MinHash LSH near dedup of
             what is left (band buckets -> candidate pairs confirmed by estimated Jaccard -> clusters, the
             smallest id kept)                                    -> documents-*.jsonl + counts.json
  decontaminate  drop the documents that share a word n-gram with an evaluation set (llm/data/
             decontamination.py), counted per set as "decontaminate.<set>" -> documents-*.jsonl + counts.json;
             with decontaminate.enabled=False it writes nothing and the next steps read dedup's output
  tokenizer  SentencePiece trained on the cleaned corpus, or the files of an existing tokenizer
             (tokenizer.path: ours, or a Hugging Face tokenizer.json) -> tokenizer files + metrics
  pack       tokenize, split train/validation by id hash, plant canaries into train (canaries.count > 0),
             pack                                                 -> train/, validation/ ArrayRecord
                                                                     (+ canaries.json)
  report     the accounting of every document and every figure    -> report.json

`filter`, `dedup` and `decontaminate` run on a runner: `local_runner.LocalRunner` (processes) or
`beam_runner.BeamRunner` (Apache Beam, any Beam runner). Both call the functions below and write corpus shards through
`corpus_io`, so they write byte-identical output that does not depend on the runner, the number of
workers or the order of the input. `tokenizer` and `pack` run here, on local files (`tokenize_pack`).

A re-run skips the steps whose marker exists and whose config is unchanged, so an interrupted run resumes
from the first unfinished step; a step found without its marker is redone from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any, Protocol

import ml_collections

from llm import tokenizer as tokenizer_lib
from llm.corpus import canaries, dedup, sources, stages, tokenize_pack
from llm.corpus.corpus_io import read_counts
from llm.corpus.document import Document, DocumentStage, Dropped
from llm.corpus.report import Accounts, build_report
from llm.io import is_remote, join, read_text, remove_tree, write_text

# Accounting names of the steps around the per-document stages.
READ = "read"
PII_STAGE = "pii"  # its documents carry metadata["pii"], the replacements per PII type
EXACT_DEDUP = "exact_dedup"
NEAR_DEDUP = "near_dedup"
EXACT_DUPLICATE = "exact_dedup.duplicate"
NEAR_DUPLICATE = "near_dedup.near_duplicate"
DECONTAMINATE = stages.DECONTAMINATE

MARKER_FILE = "_COMPLETE.json"

# Builds the per-document stages from the config; runs once in every worker (stages may load models).
StageFactory = Callable[[ml_collections.ConfigDict], Sequence[tuple[str, DocumentStage]]]
# Yields every input document (or the drop of an unreadable one) named by the config.
SourceReader = Callable[[ml_collections.ConfigDict], Iterable["Document | Dropped"]]


class Runner(Protocol):
    """Runs the corpus steps; `local_runner.LocalRunner` and `beam_runner.BeamRunner` implement it."""

    name: str

    def filter(self, config: ml_collections.ConfigDict, output_dir: str) -> Accounts: ...

    def dedup(self, config: ml_collections.ConfigDict, input_dir: str, output_dir: str) -> Accounts: ...

    def decontaminate(self, config: ml_collections.ConfigDict, input_dir: str, output_dir: str) -> Accounts: ...


# --- Per-document stages ------------------------------------------------------------------------------------


def filter_stage_names(document_stages: Sequence[tuple[str, DocumentStage]]) -> list[str]:
    """Accounting stages of the filter step: reading, then the per-document stages in order."""
    return [READ, *(name for name, _ in document_stages)]


def process_item(
    item: Document | Dropped, document_stages: Sequence[tuple[str, DocumentStage]], accounts: Accounts
) -> Document | None:
    """Runs one input item through every per-document stage, counting it; returns what survives."""
    accounts.record(READ, item)
    if isinstance(item, Dropped):
        return None
    document = item
    for name, stage in document_stages:
        start = time.process_time()
        try:
            result = stage(document)
        except Exception as error:
            error.add_note(f"in corpus stage {name!r} on document {document.id!r}")
            raise
        accounts.record(name, result, time.process_time() - start)
        if isinstance(result, Dropped):
            return None
        if name == PII_STAGE:
            accounts.add_pii(result.metadata.get("pii", {}))
        document = result
    return document


def run_stage(name: str, stage: DocumentStage, document: Document, accounts: Accounts) -> Document | None:
    """Runs one per-document stage of a later step (decontaminate), counting it; returns what survives."""
    start = time.process_time()
    result = stage(document)
    accounts.record(name, result, time.process_time() - start)
    return None if isinstance(result, Dropped) else result


# --- Dedup verdicts -----------------------------------------------------------------------------------------

_DUPLICATE_REASONS = {EXACT_DEDUP: EXACT_DUPLICATE, NEAR_DEDUP: NEAR_DUPLICATE}


def count_dedup(stage: str, document: Document, duplicates: Container[str], accounts: Accounts) -> bool:
    """Counts `document` through the dedup `stage`: dropped if its id is in `duplicates`. True if kept."""
    if document.id in duplicates:
        accounts.record(stage, Dropped(document.id, _DUPLICATE_REASONS[stage]))
        return False
    accounts.record(stage, document)
    return True


# --- Steps and resumable execution --------------------------------------------------------------------------

STEPS = ("filter", "dedup", "decontaminate", "tokenizer", "pack", "report")
RUNNER_STEPS = ("filter", "dedup", "decontaminate")  # the steps a Runner executes; the others run here, on local files
# Config sections that shape each step's output. A finished step is reused only while its sections and
# those of the steps before it are unchanged. `runner` says how the steps run, not what they write.
STEP_SECTIONS = {
    "filter": ("sources", "clean", "quality", "langid", "pii", "offensive", "output"),
    "dedup": ("dedup",),
    "decontaminate": ("decontaminate",),
    "tokenizer": ("tokenizer",),
    "pack": ("pack", "canaries"),
    "report": ("report",),
}
FREE_SECTIONS = ("runner",)
PUBLISHED_DIRS = ("train", "validation")


RUNNERS = ("local", "beam")


def validate(config: ml_collections.ConfigDict, output_dir: str, runner: str, until: str) -> None:
    """Checks the flags and the config before any work, with errors that name the flag or key."""
    if not output_dir:
        raise ValueError("--output_dir is required.")
    if runner not in RUNNERS:
        raise ValueError(f"--runner={runner!r}: expected one of {list(RUNNERS)}.")
    if until not in STEPS:
        raise ValueError(f"--until={until!r}: expected one of {list(STEPS)}.")
    if is_remote(output_dir) and (runner != "beam" or until not in RUNNER_STEPS):
        raise ValueError(
            f"--output_dir={output_dir}: a remote directory needs --runner=beam and --until=filter, dedup or "
            "decontaminate; "
            "the tokenizer and packing steps run on local files."
        )
    known = {section for sections in STEP_SECTIONS.values() for section in sections} | set(FREE_SECTIONS)
    for section in sorted(set(config.keys()) - known):
        raise ValueError(f"Config section {section!r} is not used by any step; known: {sorted(known)}.")
    for section in sorted(known - set(config.keys())):
        raise ValueError(f"Config section {section!r} is missing (see configs/data/es_default.py).")
    for key, value, minimum in (
        ("runner.num_workers", config.runner.num_workers, 0),
        ("runner.chunk_size", config.runner.chunk_size, 1),
        ("output.corpus_shards", config.output.corpus_shards, 1),
        ("pack.seq_len", config.pack.seq_len, 2),
        ("pack.train_shards", config.pack.train_shards, 1),
        ("pack.validation_shards", config.pack.validation_shards, 1),
    ):
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key}={value!r}: expected an integer >= {minimum}.")
    for key, value, allowed in (
        ("sources.on_error", config.sources.on_error, sources.ON_ERROR),
        ("sources.format", config.sources.format, sources.FORMATS),
        ("sources.text_mode", config.sources.text_mode, sources.TEXT_MODES),
        ("tokenizer.model_type", config.tokenizer.model_type, tokenizer_lib.MODEL_TYPES),
    ):
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: expected one of {list(allowed)}.")
    dedup.check_config(config.dedup)
    canaries.check_config(config.canaries)
    stages.document_stages(config)  # checks every per-document stage's section
    stages.decontamination_index(config)  # checks the section and reads the evaluation files
    if config.tokenizer.path:
        path = os.path.expanduser(config.tokenizer.path)
        try:
            if not os.path.isfile(tokenizer_lib.tokenizer_file(path)):
                raise FileNotFoundError("no such file or directory.")
        except FileNotFoundError as error:
            raise ValueError(f"tokenizer.path={config.tokenizer.path!r}: {error}") from None
    if config.report.eval_conllu and not os.path.isfile(os.path.expanduser(config.report.eval_conllu)):
        raise ValueError(f"report.eval_conllu={config.report.eval_conllu!r}: no such file.")


def step_dir(output_dir: str, step: str) -> str:
    return join(output_dir, "stages", step)


def dedup_stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """Accounting stages of the dedup step: the enabled kinds of dedup, in order."""
    return [name for name, on in ((EXACT_DEDUP, config.dedup.exact), (NEAR_DEDUP, config.dedup.near)) if on]


def corpus_dir(config: ml_collections.ConfigDict, output_dir: str) -> str:
    """Where the finished corpus is: the decontaminate step's output, or dedup's when that step is off."""
    return step_dir(output_dir, "decontaminate" if config.decontaminate.enabled else "dedup")


def step_config(config: ml_collections.ConfigDict, step: str) -> dict[str, Any]:
    """The flattened config ("quality.min_words": 5, ...) that the output of `step` depends on."""
    flat: dict[str, Any] = {}
    for name in STEPS[: STEPS.index(step) + 1]:
        for section in STEP_SECTIONS[name]:
            if section == "canaries" and config.canaries.count == 0:
                # No canaries, no effect on the output: data packed before canaries existed stays reusable.
                continue
            for key, value in config[section].to_dict().items():
                flat[f"{section}.{key}"] = value
    return json.loads(json.dumps(flat))  # the JSON form (tuples become lists), as stored in markers


def read_marker(directory: str) -> dict[str, Any] | None:
    text = read_text(join(directory, MARKER_FILE))
    return None if text is None else json.loads(text)


class ConfigChanged(ValueError):
    """A finished step was run with another config than the current one; its output would not match."""


def _check_same_config(directory: str, finished: dict[str, Any], current: dict[str, Any]) -> None:
    changed = sorted(key for key in finished.keys() | current.keys() if finished.get(key) != current.get(key))
    if changed:
        details = "; ".join(f"{key} was {finished.get(key)!r}, now {current.get(key)!r}" for key in changed)
        raise ConfigChanged(
            f"{directory} was finished with another config ({details}). Use another --output_dir, or delete "
            f"{directory} and the later steps' directories to redo them."
        )


def prepare(
    config: ml_collections.ConfigDict,
    output_dir: str,
    runner: Runner,
    until: str = STEPS[-1],
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Runs the steps up to `until`, skipping those already finished; returns each step's marker.

    A step runs from scratch (its directory is cleared first) when it has no marker, which is what an
    interrupted run leaves, and so do all the steps after one that ran. With `until="report"` the final
    files are then published into `output_dir` (see `publish`).
    """
    markers: dict[str, dict[str, Any]] = {}
    redo = False
    for step in STEPS[: STEPS.index(until) + 1]:
        directory = step_dir(output_dir, step)
        expected = step_config(config, step)
        marker = read_marker(directory)
        if marker is not None and not redo:
            _check_same_config(directory, marker["config"], expected)
            logging.info("Step %s: finished in a previous run (%.1f s), skipped.", step, marker["elapsed_seconds"])
            markers[step] = marker
            continue
        redo = True
        remove_tree(directory)
        logging.info("Step %s: running.", step)
        start = time.time()
        result = _STEP_FUNCTIONS[step](config, output_dir, runner, markers, progress)
        marker = {
            "step": step,
            "runner": runner.name if step in RUNNER_STEPS else "local",
            "elapsed_seconds": round(time.time() - start, 3),
            "result": result,
            "config": expected,
        }
        # Written last: its presence is what says the step's output is complete.
        write_text(join(directory, MARKER_FILE), json.dumps(marker, indent=1, ensure_ascii=False))
        markers[step] = marker
        logging.info("Step %s: done in %.1f s.", step, marker["elapsed_seconds"])
    if until == STEPS[-1]:
        publish(output_dir)
    return markers


def _filter_step(config, output_dir, runner, markers, progress) -> dict[str, Any]:
    accounts = runner.filter(config, step_dir(output_dir, "filter"))
    accounts.check()
    return {"documents_in": accounts.documents_in, "documents_out": accounts.documents_kept}


def _dedup_step(config, output_dir, runner, markers, progress) -> dict[str, Any]:
    accounts = runner.dedup(config, step_dir(output_dir, "filter"), step_dir(output_dir, "dedup"))
    accounts.check()
    return {"documents_in": accounts.documents_in, "documents_out": accounts.documents_kept}


def _decontaminate_step(config, output_dir, runner, markers, progress) -> dict[str, Any]:
    if not config.decontaminate.enabled:
        return {"enabled": False}
    accounts = runner.decontaminate(config, step_dir(output_dir, "dedup"), step_dir(output_dir, "decontaminate"))
    accounts.check()
    index = stages.decontamination_index(config)
    return {
        "enabled": True,
        **index.summary(),
        "documents_in": accounts.documents_in,
        "documents_out": accounts.documents_kept,
    }


def _tokenizer_step(config, output_dir, runner, markers, progress) -> dict[str, Any]:
    tokenizer_dir = step_dir(output_dir, "tokenizer")
    if config.tokenizer.path:
        return tokenize_pack.copy_corpus_tokenizer(config, tokenizer_dir)
    return tokenize_pack.train_corpus_tokenizer(config, corpus_dir(config, output_dir), tokenizer_dir, progress)


def _pack_step(config, output_dir, runner, markers, progress) -> dict[str, Any]:
    directories = (step_dir(output_dir, step) for step in ("tokenizer", "pack"))
    return tokenize_pack.pack_corpus(config, corpus_dir(config, output_dir), *directories, progress)


def _report_step(config, output_dir, runner, markers, progress) -> dict[str, Any]:
    accounts = read_counts(step_dir(output_dir, "filter")).extend(read_counts(step_dir(output_dir, "dedup")))
    if config.decontaminate.enabled:
        accounts = accounts.extend(read_counts(step_dir(output_dir, "decontaminate")))
    report = build_report(
        accounts,
        tokenizer=markers["tokenizer"]["result"],
        packed=markers["pack"]["result"],
        seq_len=config.pack.seq_len,
        corpus_shards=config.output.corpus_shards,
        elapsed_seconds={step: markers[step]["elapsed_seconds"] for step in STEPS[:-1]},
        runner=markers["filter"]["runner"],
        decontamination=markers["decontaminate"]["result"],
        canaries=markers["pack"]["result"].get("canaries", {"planted": 0}),  # packed before canaries existed
    )
    text = json.dumps(report, indent=2, ensure_ascii=False)
    write_text(join(step_dir(output_dir, "report"), "report.json"), text)
    return report["documents"]


_STEP_FUNCTIONS = {
    "filter": _filter_step,
    "dedup": _dedup_step,
    "decontaminate": _decontaminate_step,
    "tokenizer": _tokenizer_step,
    "pack": _pack_step,
    "report": _report_step,
}


def _same_file(first: str, second: str) -> bool:
    return os.path.exists(first) and os.path.exists(second) and os.path.samefile(first, second)


def _link(source: str, destination: str) -> None:
    """Publishes a file under a second name: a hard link (no copy), atomically replacing the old one."""
    if _same_file(source, destination):  # published by an earlier run
        return
    temporary = destination + ".tmp"
    if os.path.lexists(temporary):
        os.remove(temporary)
    try:
        os.link(source, temporary)
    except OSError:  # a file system without hard links
        shutil.copy2(source, temporary)
    os.replace(temporary, destination)


def _link_dir(source: str, destination: str) -> None:
    """Publishes a directory of files, swapped in whole so a loader never sees old and new shards mixed."""
    names = sorted(os.listdir(source))
    if (
        os.path.isdir(destination)
        and sorted(os.listdir(destination)) == names
        and all(_same_file(join(source, name), join(destination, name)) for name in names)
    ):
        return
    staging, old = destination + ".tmp", destination + ".old"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(staging)
    for name in names:
        _link(join(source, name), join(staging, name))
    if os.path.exists(destination):
        os.rename(destination, old)
    os.rename(staging, destination)
    shutil.rmtree(old, ignore_errors=True)


def publish(output_dir: str) -> None:
    """Makes DIR's tokenizer files (tokenizer.model and .vocab, or tokenizer.json and its companions),
    canaries.json, report.json, train/ and validation/ the finished steps' files. The files of an earlier run's
    other tokenizer go, as training would find them first, and so does an earlier run's canaries.json."""
    tokenizer_dir, pack_dir = step_dir(output_dir, "tokenizer"), step_dir(output_dir, "pack")
    published = [(tokenizer_dir, name) for name in (*tokenizer_lib.TOKENIZER_FILES, tokenize_pack.SENTENCEPIECE_VOCAB)]
    for directory, name in [*published, (pack_dir, canaries.CANARIES_FILE)]:
        if os.path.exists(join(directory, name)):
            _link(join(directory, name), join(output_dir, name))
        elif os.path.exists(join(output_dir, name)):
            os.remove(join(output_dir, name))
    for split in PUBLISHED_DIRS:
        _link_dir(join(pack_dir, split), join(output_dir, split))
    # The report last: its presence says that everything it describes is in place.
    _link(join(step_dir(output_dir, "report"), "report.json"), join(output_dir, "report.json"))
