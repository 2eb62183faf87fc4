"""Answers a question from your documents: retrieves passages, prompts the run with them numbered, prints the
answer and its sources.

    python scripts/build_index.py --input=docs/ --embedder=runs/embedder_es --output=runs/docs_index
    python scripts/ask.py --index=runs/docs_index --workdir=runs/tiny_es "¿Quién puede pedir la beca?"
        [--mode=hybrid|bm25|dense --k=5 --max_new_tokens=128 --temperature=0 --embedder=RUN --json]

The index's embedder (named in its manifest) embeds the question; --embedder points to it when the run has
moved. The prompt (llm/rag/answering.py) holds the best passages that fit the run's context after
--max_new_tokens; each source says whether the answer cites it ([1], [2]...). Flags, the index and the run
are checked before any model is loaded.
"""

import json
import os
import textwrap

import run_flags
from absl import app, flags

from llm import checkpoint
from llm.infer.generate import generate_text
from llm.infer.sampling import SamplingParams
from llm.model.transformer import context_length
from llm.rag import answering, index as index_lib

_INDEX = flags.DEFINE_string("index", None, "Index directory written by scripts/build_index.py.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run that writes the answer.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
_EMBEDDER = flags.DEFINE_string("embedder", None, "The index's embedder run, when not where its manifest says.")
_MODE = flags.DEFINE_enum("mode", None, index_lib.MODES, "Search mode (default: hybrid with vectors, else bm25).")
_K = flags.DEFINE_integer("k", 5, "Passages retrieved (those that fit the context go into the prompt).", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Longest answer in tokens.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).", lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_JSON = flags.DEFINE_bool("json", False, "Print {answer, sources} as JSON instead of text.")


def _checked_question(argv: list[str]) -> str:
    """The question (the one positional argument), the index and the run, checked before loading anything."""
    if len(argv) != 2 or not argv[1].strip():
        raise app.UsageError('Pass exactly one question, quoted: ask.py --index=... --workdir=... "¿...?"')
    try:
        index_lib.check_index(_INDEX.value, _MODE.value)
    except (FileNotFoundError, ValueError) as error:
        raise app.UsageError(f"--index={_INDEX.value!r}, --mode={_MODE.value}: {error}") from error
    if not os.path.isdir(_WORKDIR.value):
        raise app.UsageError(f"--workdir={_WORKDIR.value!r} does not exist.")
    checkpoint.require_checkpoint(_WORKDIR.value, _STEP.value)
    if _EMBEDDER.value is not None and not os.path.isdir(_EMBEDDER.value):
        raise app.UsageError(f"--embedder={_EMBEDDER.value!r} is not a run directory.")
    return argv[1].strip()


def _print_text(result: dict) -> None:
    print(f"Respuesta: {result['answer'].strip()}\n")
    if not result["sources"]:
        print("Fuentes: ninguna (no cupo ningún pasaje, o la búsqueda no encontró ninguno).")
        return
    print("Fuentes:")
    for source in result["sources"]:
        cited = " · citada" if source["cited"] else ""
        where = f"{source['source']}, caracteres {source['start']}-{source['end']}"
        print(f"  [{source['number']}] {source['passage_id']} ({where}){cited}")
        print(textwrap.indent(textwrap.shorten(source["text"], 200, placeholder=" …"), "      "))


def main(argv: list[str]) -> None:
    question = _checked_question(argv)
    index = index_lib.RetrievalIndex.open(_INDEX.value, _EMBEDDER.value)
    run = run_flags.load_run(_WORKDIR.value, _STEP.value)
    hits = index.search(question, _K.value, _MODE.value)
    chat = answering.is_chat_run(run.config.chat, run.tokenizer)
    try:
        request = answering.grounded_request(
            run.tokenizer, chat, question, hits, context_length(run.model.cfg), _MAX_NEW_TOKENS.value
        )
    except ValueError as error:
        raise app.UsageError(
            f"{error} (--workdir={_WORKDIR.value!r}, --max_new_tokens={_MAX_NEW_TOKENS.value})"
        ) from error
    sampling = SamplingParams(temperature=_TEMPERATURE.value, top_p=_TOP_P.value)
    (answer,) = generate_text(
        run,
        [request.ids],
        _MAX_NEW_TOKENS.value,
        sampling,
        stop_strings=request.stop_strings,
        seed=_SEED.value,
        stop_token_ids=request.stop_token_ids,
    )
    result = request.result(answer)
    if _JSON.value:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        _print_text(result)


if __name__ == "__main__":
    app.run(main)
