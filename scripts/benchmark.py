"""Benchmarks that print figures (never timed unit tests).

    python scripts/benchmark.py train --config=configs/tiny_es.py [--steps=10] [--json_out=F]
    python scripts/benchmark.py dry_run --config=configs/gpt2_small_es.py [--dry_run_devices=256]
        [--dry_run_device_kind="TPU v5p"] [--json_out=F]
    python scripts/benchmark.py decode (--workdir=DIR | --config=C | --model_dir=HF_DIR) [--compare=transformers]
        [--batch_sizes=1,8,64] [--json_out=F]
    python scripts/benchmark.py data [--data_config=configs/data/es_default.py] [--stage_docs=5000] [--json_out=F]
    python scripts/benchmark.py tokenizer --tokenizer=DIR/tokenizer.model [--json_out=F]
    python scripts/benchmark.py serve (--workdir=DIR | --url=URL) [--num_requests=64 --concurrency=8]
        [--mix=good:0.8,malformed:0.1,abandoned:0.1] [--api_key=KEY]
    python scripts/benchmark.py import_hf [--model_dir=HF_DIR] [--dtype=bfloat16] [--json_out=F]
    python scripts/benchmark.py rag_index [--num_passages=1000000 --dim=256 --num_queries=200 --intrinsic_dim=32]
    python scripts/benchmark.py watermark [--workdir=runs/tiny_es --num_prompts=64 --watermark_key=K
        --watermark_gamma=0.25 --watermark_delta=2.0]

`dry_run` is scripts/train.py's `--dry_run`: the train step compiled for the mesh on simulated devices, its memory,
FLOPs and collectives per device and an estimated step time, without running it (llm/train/dry_run.py).

`import_hf` imports a Hugging Face checkpoint (default: a synthetic 1.24B Llama, Llama-3.2-1B-shaped) and reports
peak host memory against the checkpoint's size. `decode --compare=transformers` times greedy generation of the
same weights with transformers' `generate` too (needs the [bench] extra): a Hugging Face checkpoint
(`--model_dir`, else a random Llama of `--config`'s shape) is imported, and both libraries generate from it.

`serve --mix` is a load mode: it mixes good requests (streamed completions and non-streamed chat answers) with
malformed ones (bad JSON, deep nesting, wrong types, unknown model, too long, lone surrogate, oversized body, not an
object) and abandoned ones (the client hangs up mid-stream, mid-answer or mid-upload), and reports good tokens/s,
requests/s, TTFT percentiles of the streamed good requests, the statuses each kind got back ("closed": the
connection failed without a status) and /health after the load (llm/serve/load_mix.py).

`rag_index` builds flat, IVF-PQ and HNSW FAISS indexes of synthetic clustered passage embeddings and reports build
time, index size, memory, single-query latency p50/p99 and recall@10 against exact search (llm/rag/index_bench.py).

`watermark` samples continuations of Spanish UD sentence starts at temperature 1 with and without the green-list
watermark and reports the detection rate at 50/100/200 new tokens, the false-positive rate on plain continuations and
on human text, and the perplexity cost under the unwatermarked model (llm/infer/watermark_bench.py).

Every result carries the machine it came from (device kind and count, JAX version).
"""

import json
import os

import dry_run_flags
import watermark_flags
from absl import app, flags
from ml_collections import config_flags

from llm.train import benchmark as train_benchmark

SUBCOMMANDS = ("train", "dry_run", "decode", "data", "tokenizer", "serve", "import_hf", "rag_index", "watermark")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_es.py", "Model/training config (train).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (train).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first, the first compiles (train).", lower_bound=1)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Trained run to benchmark (decode: else --config's shape; watermark: else runs/tiny_es)."
)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Decode batch sizes (decode).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens (decode).", lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Decode steps timed (decode).", lower_bound=4)
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Hugging Face checkpoint (import_hf, decode); else synthetic.")
_COMPARE = flags.DEFINE_enum("compare", None, ["transformers"], "Also time this library on the same weights (decode).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per figure of --compare, the median reported.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Dtype of the imported run (import_hf).")
_URL = flags.DEFINE_string("url", None, "A running server to load (serve); else one is started for --workdir.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 64, "Requests sent (serve).", lower_bound=1)
_CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "Clients at once (serve).", lower_bound=1)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Tokens per answer (serve).", lower_bound=1)
_MIX = flags.DEFINE_string("mix", None, "Load mode: shares of good, malformed, abandoned requests (serve).")
_API_KEY = flags.DEFINE_string("api_key", None, "API key for a --url server that needs one (serve).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model or tokenizer.json (tokenizer).")
_NUM_DOCS = flags.DEFINE_integer("num_docs", 20000, "Synthetic documents for MinHash (data).", lower_bound=100)
_DATA_CONFIG = config_flags.DEFINE_config_file(
    "data_config", "configs/data/es_default.py", "Corpus pipeline config whose sources and stages are timed (data)."
)
_STAGE_DOCS = flags.DEFINE_integer(
    "stage_docs", 5000, "Documents read from the sources for the stages (data).", lower_bound=1
)
_NUM_PASSAGES = flags.DEFINE_integer(
    "num_passages", 1_000_000, "Synthetic passage embeddings (rag_index).", lower_bound=10
)
_DIM = flags.DEFINE_integer("dim", 256, "Embedding dim (rag_index).", lower_bound=4)
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 200, "Single queries timed and scored (rag_index).", lower_bound=1)
_INTRINSIC_DIM = flags.DEFINE_integer(
    "intrinsic_dim",
    32,
    "Dimensions the synthetic clusters live in; = --dim: the worst case (rag_index).",
    lower_bound=1,
)
_NUM_PROMPTS = flags.DEFINE_integer(
    "num_prompts", 64, "Prompts continued with and without the watermark (watermark).", lower_bound=1
)
flags.adopt_module_key_flags(dry_run_flags)  # --dry_run_devices, --dry_run_device_kind (dry_run).
flags.adopt_module_key_flags(watermark_flags)  # --watermark_key, --watermark_gamma, --watermark_delta (watermark).
WATERMARK_BENCH_KEY = 15485863  # Without --watermark_key: the hash key of Kirchenbauer et al.'s code, a public one.
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the result as JSON to this file.")


def _flatten(result: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _print_table(result: dict) -> None:
    flat = _flatten(result)
    width = max(len(k) for k in flat)
    for key, value in flat.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def _decode() -> dict:
    from llm.infer import benchmark as decode_benchmark
    from llm.model.transformer import create_model
    from llm.runs import loading

    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    if not (_COMPARE.value or _MODEL_DIR.value):
        model = loading.load_model(_WORKDIR.value)[0] if _WORKDIR.value else create_model(_CONFIG.value)
        return decode_benchmark.benchmark_decode(model, batch_sizes, _PROMPT_LEN.value, _NEW_TOKENS.value)
    if _WORKDIR.value:
        raise app.UsageError(
            "decode --compare and --model_dir time a Hugging Face checkpoint: export the run with "
            "scripts/export_hf.py and pass that folder as --model_dir."
        )
    return _decode_hugging_face(batch_sizes)


def _decode_hugging_face(batch_sizes: list[int]) -> dict:
    """The decode figures of an imported checkpoint (--model_dir, else a random Llama of --config's shape), with
    transformers' on the same weights beside ours per batch size when --compare asks."""
    import tempfile

    from llm.hf import benchmark as hf_benchmark, importer
    from llm.infer import benchmark as decode_benchmark, transformers_bench
    from llm.runs import loading

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = _MODEL_DIR.value
        if model_dir is None:
            model_dir = os.path.join(scratch, "synthetic_llama")
            os.makedirs(model_dir)
            hf_benchmark.write_synthetic_llama(model_dir, hf_benchmark.llama_sizes(_CONFIG.value), num_shards=1)
        run_dir = importer.import_hf(model_dir, os.path.join(scratch, "run"), "float32")
        model = loading.load_model(run_dir)[0]
        result = decode_benchmark.benchmark_decode(model, batch_sizes, _PROMPT_LEN.value, _NEW_TOKENS.value)
        if _COMPARE.value == "transformers":
            peer = transformers_bench.benchmark_against_transformers(
                run_dir, model_dir, batch_sizes, result["prompt_len"], _NEW_TOKENS.value, _REPEATS.value
            )
            result["transformers"] = {key: peer.pop(key) for key in ("repeats", "torch_threads")}
            for batch in batch_sizes:
                result[f"batch_{batch}"]["vs_transformers"] = peer[f"batch_{batch}"]
    return result


def _watermark() -> dict:
    """The watermark figures of --workdir (default runs/tiny_es), flags checked before the run is loaded."""
    from llm.infer import watermark_bench
    from llm.runs import loading

    workdir = _WORKDIR.value or "runs/tiny_es"
    if not os.path.isdir(workdir):
        raise app.UsageError(f"--workdir={workdir!r} does not exist (train one with scripts/quickstart.sh).")
    params = watermark_flags.watermark(default_key=WATERMARK_BENCH_KEY)
    return watermark_bench.run(loading.load_run(workdir), params, _NUM_PROMPTS.value)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        raise app.UsageError(f"Usage: benchmark.py {{{'|'.join(SUBCOMMANDS)}}} [flags]; got {argv[1:]}")
    if argv[1] == "dry_run":  # Prints its own table; must start JAX itself, on the simulated devices.
        dry_run_flags.run(_CONFIG.value, _JSON_OUT.value)
        return
    if argv[1] == "watermark":
        from llm.infer import watermark_bench

        result = {**train_benchmark.machine(), **_watermark()}
        print(watermark_bench.table(result))
    elif argv[1] == "rag_index":  # FAISS on the host CPU: its own machine lines and a table, one row per index kind
        from llm.rag import index_bench

        result = {
            **train_benchmark.machine(),
            **index_bench.run(_NUM_PASSAGES.value, _DIM.value, _NUM_QUERIES.value, intrinsic_dim=_INTRINSIC_DIM.value),
        }
        print(index_bench.table(result))
    elif argv[1] == "train":
        result = train_benchmark.benchmark_train(_CONFIG.value, _STEPS.value, _WARMUP.value)
    elif argv[1] == "decode":
        result = {"benchmark": "decode", **train_benchmark.machine(), **_decode()}
    elif argv[1] == "import_hf":
        from llm.hf import benchmark as hf_benchmark

        result = {**train_benchmark.machine(), **hf_benchmark.benchmark_import(_MODEL_DIR.value, _DTYPE.value)}
    elif argv[1] == "tokenizer":
        if not _TOKENIZER.value:
            raise app.UsageError("benchmark.py tokenizer needs --tokenizer=PATH/tokenizer.model (or tokenizer.json).")
        from llm import tokenizer as tokenizer_lib

        result = {
            "benchmark": "tokenizer",
            **train_benchmark.machine(),
            **tokenizer_lib.benchmark(tokenizer_lib.load_tokenizer(_TOKENIZER.value)),
        }
    elif argv[1] == "serve":
        if bool(_URL.value) == bool(_WORKDIR.value):
            raise app.UsageError("benchmark.py serve needs exactly one of --url or --workdir.")
        from llm.serve import bench as serve_bench, load_mix  # Needs the [serve] extra.

        try:
            mix = load_mix.parse_mix(_MIX.value) if _MIX.value else None
        except ValueError as error:
            raise app.UsageError(f"--mix={_MIX.value!r}: {error}") from None
        result = {
            **train_benchmark.machine(),
            **serve_bench.run(
                url=_URL.value,
                workdir=_WORKDIR.value,
                num_requests=_NUM_REQUESTS.value,
                concurrency=_CONCURRENCY.value,
                max_tokens=_MAX_TOKENS.value,
                api_key=_API_KEY.value,
                mix=mix,
            ),
        }
    else:
        from llm.corpus import dedup_bench, stage_bench

        result = {
            "benchmark": "data",
            **train_benchmark.machine(),
            "stages": stage_bench.run(_DATA_CONFIG.value, _STAGE_DOCS.value),
            "minhash": dedup_bench.run(_NUM_DOCS.value),
        }
    if argv[1] not in ("rag_index", "watermark"):
        _print_table(result)
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
