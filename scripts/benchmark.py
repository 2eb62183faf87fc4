"""Benchmarks that print figures (never timed unit tests).

    python scripts/benchmark.py train --config=configs/tiny_es.py [--steps=10] [--json_out=F]
    python scripts/benchmark.py data [--num_docs=20000] [--json_out=F]

Every result carries the machine it came from (device kind and count, JAX version).
"""

import json

from absl import app, flags
from ml_collections import config_flags

from llm.train import benchmark as train_benchmark

SUBCOMMANDS = ("train", "data")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_es.py", "Model/training config (train).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (train).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first, the first compiles (train).", lower_bound=1)
_NUM_DOCS = flags.DEFINE_integer("num_docs", 20000, "Synthetic documents (data).", lower_bound=100)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the result as JSON to this file.")


def _print_table(result: dict) -> None:
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        raise app.UsageError(f"Usage: benchmark.py {{{'|'.join(SUBCOMMANDS)}}} [flags]; got {argv[1:]}")
    if argv[1] == "train":
        result = train_benchmark.benchmark_train(_CONFIG.value, _STEPS.value, _WARMUP.value)
    else:
        from llm.data import dedup_bench  # The data benchmark needs datasketch, a test/bench dependency.
        result = {"benchmark": "data", **train_benchmark.machine(), **dedup_bench.run(_NUM_DOCS.value)}
    _print_table(result)
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
