"""Samples continuations of Spanish prompts from a trained run.

python scripts/sample.py --workdir=runs/tiny_es --prompt="Había una vez" [--prompt=...]
    [--max_new_tokens=64 --temperature=0.8 --top_p=0.95 --num_samples=3 --seed=0]
    [--watermark_key=K --watermark_gamma=0.25 --watermark_delta=2.0]

With --watermark_key the samples carry a green-list watermark that scripts/detect_watermark.py finds with the
same key and gamma (llm/infer/watermark.py).
"""

import os

import run_flags
import watermark_flags
from absl import app, flags

from llm.infer import generate
from llm.infer.sampling import SamplingParams

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by scripts/train.py.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat the flag for several).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per sample.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass (1: off).", lower_bound=0.0, upper_bound=1.0)
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Min-p filter (0: off).", lower_bound=0.0, upper_bound=1.0)
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "CTRL repetition penalty (1: off).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.", lower_bound=1)
_STOP = flags.DEFINE_multi_string("stop", [], "Stop strings.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.adopt_module_key_flags(watermark_flags)  # --help lists the watermark flags too.


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if any(not p.strip() for p in _PROMPT.value):
        raise app.UsageError("--prompt must not be empty: give the model some text to continue.")
    if not os.path.isdir(_WORKDIR.value):
        raise app.UsageError(f"--workdir={_WORKDIR.value!r} does not exist.")
    sampling = SamplingParams(
        _TEMPERATURE.value,
        _TOP_K.value,
        _TOP_P.value,
        _MIN_P.value,
        _REPETITION_PENALTY.value,
        watermark_flags.watermark(),
    )
    run = run_flags.load_run(_WORKDIR.value, _STEP.value)
    prompts = [p for p in _PROMPT.value for _ in range(_NUM_SAMPLES.value)]
    completions = generate.generate_text(run, prompts, _MAX_NEW_TOKENS.value, sampling, _STOP.value, _SEED.value)
    for prompt, completion in zip(prompts, completions):
        print(f"--- {prompt}{completion}")


if __name__ == "__main__":
    app.run(main)
