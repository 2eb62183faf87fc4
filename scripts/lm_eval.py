"""lm-evaluation-harness on a run directory, in-process: lm-eval's CLI with the model "spanish-llm".

    python scripts/lm_eval.py --workdir=runs/tiny_es [--step=N] --tasks=spanish_bench [any lm-eval flag]

Runs `lm-eval run --model spanish-llm --model_args workdir=RUN[,step=N] --batch_size 16` followed by every other
flag as given (--tasks, --num_fewshot, --limit, --apply_chat_template, --output_path, --log_samples,
--model_args max_gen_toks=...,add_bos_token=False, --batch_size ...). The model is llm/eval/lm_eval_model.py.
"""

import os
import sys

# This file has the package's name: keep `import lm_eval` from finding the script itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [path for path in sys.path if os.path.abspath(path or os.curdir) != _HERE]

from absl import flags  # noqa: E402
from lm_eval.__main__ import cli_evaluate  # noqa: E402

from llm.eval.lm_eval_model import DEFAULT_BATCH_SIZE  # noqa: E402  (registers "spanish-llm")

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by scripts/train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")


def lm_eval_argv(argv: list[str], workdir: str, step: int | None) -> list[str]:
    """lm-eval's command line: the model and its run, a batch size unless one is given, then the rest of argv."""
    model_args = f"workdir={workdir}" + (f",step={step}" if step is not None else "")
    command = [argv[0], "run", "--model", "spanish-llm", "--model_args", model_args]
    given = any(arg in ("-b", "--batch_size") or arg.startswith("--batch_size=") for arg in argv[1:])
    return command + ([] if given else ["--batch_size", str(DEFAULT_BATCH_SIZE)]) + argv[1:]


def main() -> None:
    rest = flags.FLAGS(sys.argv, known_only=True)  # lm-eval's own flags pass through.
    if not _WORKDIR.value:
        sys.exit("scripts/lm_eval.py: --workdir=RUN (a run directory) is required.")
    if not os.path.isdir(_WORKDIR.value):
        sys.exit(f"scripts/lm_eval.py: --workdir={_WORKDIR.value} is not a directory.")
    sys.argv = lm_eval_argv(rest, _WORKDIR.value, _STEP.value)
    cli_evaluate()


if __name__ == "__main__":
    main()
