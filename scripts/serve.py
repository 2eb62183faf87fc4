"""Serves a trained run over an OpenAI-compatible HTTP API, with a chat page at /.

    pip install -e '.[serve]'
    python scripts/serve.py --workdir=runs/tiny_es [--host=127.0.0.1 --port=8000]
        [--max_batch_size=8 --max_cache_len=N --api_keys_file=keys.txt --rate_limit_per_minute=60]

Then e.g. `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")`.

POST /v1/embeddings embeds with the served run (mean pooling, no prefixes) unless told otherwise:
    --embedder=runs/embedder_es [--embedding_pooling=last --embedding_query_prefix="consulta: "
    --embedding_passage_prefix="pasaje: " --embedding_input_kind=query]
OpenAI's API has no query/passage kind, so every input is embedded as --embedding_input_kind (passage by default).

Chat completions grounded in your documents (llm/serve/rag_chat.py): with an index from scripts/build_index.py,
    --index=runs/docs_index [--index_k=5 --index_mode=hybrid|bm25|dense --index_embedder=RUN]
each chat request retrieves with its last (user) message and answers from the passages that fit, returning them as
a top-level "sources" list; `"retrieval": false` in a request skips it. --index_embedder is the index's embedder
run when it is no longer where the index's manifest says. The index is checked before the model is loaded.
API keys also come from the LLM_API_KEYS environment variable (comma-separated); with none, the server is open.

With --watermark_key=K [--watermark_gamma=0.25 --watermark_delta=2.0] every completion is watermarked (green-list
watermark, llm/infer/watermark.py; scripts/detect_watermark.py finds it with the same key and gamma). The key is in
no response, header or metric; keep it out of shared shell histories.

Slow clients: a request body must arrive within --body_timeout (else 408), and a request takes one of the
--max_concurrent_requests places only once its body is in and valid; an idle keep-alive connection is closed
after --keep_alive_timeout. Nothing here bounds a client that sends its request *headers* slowly (uvicorn has
no header timeout; h11 caps them at 16 KiB): such a client holds a socket but no request place. Facing the
open internet, put a reverse proxy with a header timeout (e.g. nginx's client_header_timeout) in front.
"""

import os

import run_flags
import watermark_flags
from absl import app, flags

from llm.rag import embeddings, index as index_lib
from llm.runs import loading
from llm.serve import api, auth, embeddings_api, rag_chat

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by scripts/train.py.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 exposes the server to the network).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=1, upper_bound=65535)
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Model id for clients (default: the workdir's name).")
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 8, "Requests decoded at once (KV-cache rows).", lower_bound=1)
_MAX_CACHE_LEN = flags.DEFINE_integer(
    "max_cache_len",
    None,
    "Tokens per KV-cache row, prompt + completion (default: the model's context). Cache memory = batch x this.",
)
_MAX_PROMPT_TOKENS = flags.DEFINE_integer("max_prompt_tokens", None, "Longest prompt (default: the cache length).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 1024, "Most completion tokens per choice.", lower_bound=1)
_MAX_CONCURRENT = flags.DEFINE_integer(
    "max_concurrent_requests", 64, "Requests in progress; more get 429.", lower_bound=1
)
_TIMEOUT = flags.DEFINE_float("request_timeout", 300.0, "Seconds before an unfinished request is cancelled.")
_MAX_BODY_BYTES = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body; larger gets 413.")
_BODY_TIMEOUT = flags.DEFINE_float("body_timeout", 10.0, "Seconds to receive a request body; slower gets 408.")
_KEEP_ALIVE = flags.DEFINE_integer(
    "keep_alive_timeout", 5, "Seconds an idle keep-alive connection stays open.", lower_bound=1
)
_API_KEYS_FILE = flags.DEFINE_string("api_keys_file", None, "File with one API key per line.")
_METRICS_PUBLIC = flags.DEFINE_bool("metrics_public", False, "Serve /metrics without a key even when keys are set.")
_RATE = flags.DEFINE_float("rate_limit_per_minute", 0.0, "Requests per minute per key (or address); 0: off.")
_BURST = flags.DEFINE_integer("rate_limit_burst", 20, "Requests a client may send at once.", lower_bound=1)
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every prompt length bucket before serving.")
_EMBEDDER = flags.DEFINE_string(
    "embedder",
    None,
    "Run whose embeddings POST /v1/embeddings serves (e.g. a contrastively trained one); default: the served run.",
)
_POOLING = flags.DEFINE_enum(
    "embedding_pooling", "mean", embeddings.POOLINGS, "How /v1/embeddings pools (default: as trained, else mean)."
)
_QUERY_PREFIX = flags.DEFINE_string("embedding_query_prefix", "", "Put before inputs embedded as queries.")
_PASSAGE_PREFIX = flags.DEFINE_string("embedding_passage_prefix", "", "Put before inputs embedded as passages.")
_INPUT_KIND = flags.DEFINE_enum(
    "embedding_input_kind", "passage", embeddings.KINDS, "What /v1/embeddings embeds every input as (its prefix)."
)
_INDEX = flags.DEFINE_string("index", None, "Retrieval index (scripts/build_index.py) to ground chat completions in.")
_INDEX_EMBEDDER = flags.DEFINE_string("index_embedder", None, "The index's embedder run, when not where it says.")
_INDEX_K = flags.DEFINE_integer(
    "index_k", 5, "Passages retrieved per chat request (those that fit go in).", lower_bound=1
)
_INDEX_MODE = flags.DEFINE_enum(
    "index_mode", None, index_lib.MODES, "Search mode (default: hybrid when the index has vectors, else bm25)."
)
flags.adopt_module_key_flags(watermark_flags)  # --help lists the watermark flags too.


def check_index_flags() -> None:
    """--index and its companions, checked before anything is loaded (UsageError naming the flag)."""
    if _INDEX.value is None:
        if _INDEX_EMBEDDER.value is not None or _INDEX_MODE.value is not None:
            raise app.UsageError("--index_embedder and --index_mode need --index=DIR.")
        return
    try:
        index_lib.check_index(_INDEX.value, _INDEX_MODE.value)
    except (FileNotFoundError, ValueError) as error:
        raise app.UsageError(f"--index={_INDEX.value!r}, --index_mode={_INDEX_MODE.value}: {error}") from error
    if _INDEX_EMBEDDER.value is not None and not os.path.isdir(_INDEX_EMBEDDER.value):
        raise app.UsageError(f"--index_embedder={_INDEX_EMBEDDER.value!r} is not a run directory.")


def retrieval() -> rag_chat.Retrieval | None:
    """The --index flags' index, loaded with its embedder (refused when that embedder is not the index's)."""
    if _INDEX.value is None:
        return None
    try:
        index = index_lib.RetrievalIndex.open(_INDEX.value, _INDEX_EMBEDDER.value)
    except (FileNotFoundError, ValueError) as error:
        raise app.UsageError(f"--index={_INDEX.value!r}: {error}") from error
    return rag_chat.Retrieval(index, _INDEX_K.value, _INDEX_MODE.value, _INDEX.value)


def embedding_model(run: loading.Run) -> embeddings_api.EmbeddingModel:
    """The embedder the flags describe: the --embedder run's, or the served run's."""
    # Flags given win; otherwise a contrastively trained run embeds as it was trained (Embedder.from_run does the same).
    named = {"pooling": _POOLING, "query_prefix": _QUERY_PREFIX, "passage_prefix": _PASSAGE_PREFIX}
    options = {name: flag.value for name, flag in named.items() if flag.present}
    if _EMBEDDER.value is None:
        options = {**embeddings.trained_options(run.config), **options}
        embedder = embeddings.Embedder(run.model, run.tokenizer, **options)
    else:
        embedder = embeddings.Embedder.from_run(_EMBEDDER.value, **options)
    return embeddings_api.EmbeddingModel(embedder, _INPUT_KIND.value, _EMBEDDER.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not os.path.isdir(_WORKDIR.value):
        raise app.UsageError(f"--workdir={_WORKDIR.value!r} does not exist.")
    if _EMBEDDER.value is not None and not os.path.isdir(_EMBEDDER.value):
        raise app.UsageError(f"--embedder={_EMBEDDER.value!r} does not exist.")
    check_index_flags()
    watermark = watermark_flags.watermark()
    import uvicorn  # The [serve] extra.

    keys = auth.load_api_keys(_API_KEYS_FILE.value)
    grounding = retrieval()  # Before the model: a bad index fails fast.
    run = run_flags.load_run(_WORKDIR.value, _STEP.value)
    settings = api.ServeSettings(
        model_name=_MODEL_NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value)),
        max_batch_size=_MAX_BATCH_SIZE.value,
        max_cache_len=_MAX_CACHE_LEN.value,
        max_prompt_tokens=_MAX_PROMPT_TOKENS.value,
        max_tokens=_MAX_TOKENS.value,
        max_concurrent_requests=_MAX_CONCURRENT.value,
        request_timeout_s=_TIMEOUT.value,
        max_body_bytes=_MAX_BODY_BYTES.value,
        body_timeout_s=_BODY_TIMEOUT.value,
        api_keys=keys,
        metrics_public=_METRICS_PUBLIC.value,
        rate_limit_per_minute=_RATE.value,
        rate_limit_burst=_BURST.value,
        warmup=_WARMUP.value,
        rules=run.config.logical_axis_rules,
        watermark=watermark,
    )
    server = api.create_app(run.model, run.tokenizer, settings, embedding_model(run), grounding)
    engine, embedder = server.state.engine, server.state.embeddings.describe()
    if grounding is not None:
        described = grounding.describe()
        print(
            f"Chat completions retrieve from {_INDEX.value!r}: {described['passages']} passages, "
            f"{described['mode']} search, {described['k']} per question."
        )
    print(
        f"Serving {settings.model_name!r} (step {run.step}) on http://{_HOST.value}:{_PORT.value}/ : "
        f"{engine.max_batch_size} slots x {engine.max_cache_len} tokens, KV cache "
        f"{engine.kv_cache_bytes / 2**20:.1f} MiB, API keys: {len(keys) or 'none (open)'}; embeddings: "
        f"{embedder['run']}, {embedder['pooling']} pooling, {embedder['dimensions']} dimensions; "
        f"watermark: {'on' if watermark else 'off'}."
    )
    uvicorn.run(server, host=_HOST.value, port=_PORT.value, log_level="info", timeout_keep_alive=_KEEP_ALIVE.value)


if __name__ == "__main__":
    app.run(main)
