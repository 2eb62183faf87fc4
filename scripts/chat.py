"""Talk to a trained run in the terminal; the answer streams as it is generated.

    python scripts/chat.py --workdir=runs/tiny_es [--temperature=0.7 --max_new_tokens=128]

A pretrained (not instruction-tuned) model continues a plain-text dialogue: each turn is sent as
"Usuario: ...\\nAsistente:" after the conversation so far, and the answer ends where the model starts the
user's next turn. Commands: /reset clears the conversation, /exit (or Ctrl-D) quits.
"""

import os
import sys

from absl import app, flags

from llm.infer import generate, loading
from llm.infer.sampling import SamplingParams
from llm.model.transformer import context_length

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by scripts/train.py.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Longest answer in tokens.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "0 = greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass (1: off).", lower_bound=0.0, upper_bound=1.0)
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.1, "CTRL repetition penalty (1: off).")
_SYSTEM = flags.DEFINE_string(
    "system", "Conversación en español entre un usuario y un asistente amable.", "Text placed before the dialogue."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (each turn adds its index).")

USER, ASSISTANT = "Usuario:", "Asistente:"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not os.path.isdir(_WORKDIR.value):
        raise app.UsageError(f"--workdir={_WORKDIR.value!r} does not exist.")
    sampling = SamplingParams(
        temperature=_TEMPERATURE.value, top_p=_TOP_P.value, repetition_penalty=_REPETITION_PENALTY.value
    )
    run = loading.load_run(_WORKDIR.value, _STEP.value)
    # Leave room for the answer: at least a quarter of the context, at most max_new_tokens.
    context = context_length(run.model.cfg)
    prompt_budget = context - min(_MAX_NEW_TOKENS.value, context // 4)
    print(f"Modelo de {_WORKDIR.value} (paso {run.step}). /reset para empezar de nuevo, /exit para salir.")
    turns: list[str] = []
    for turn in range(10**9):
        try:
            message = input("\nTú: ").strip()
        except EOFError:
            print()
            return
        if message == "/exit":
            return
        if message == "/reset":
            turns = []
            continue
        if not message:
            continue
        turns.append(f"{USER} {message}\n{ASSISTANT}")
        prompt = _fit_prompt(run.tokenizer, turns, prompt_budget)
        if prompt is None:
            print("(Mensaje demasiado largo para el contexto del modelo.)")
            turns = []
            continue
        sys.stdout.write("Asistente:")
        answer = generate.stream_text(
            run,
            prompt,
            _MAX_NEW_TOKENS.value,
            lambda text: (sys.stdout.write(text), sys.stdout.flush()),
            sampling,
            stop_strings=(f"\n{USER}", "\n\n"),
            seed=_SEED.value + turn,
        )
        print()
        turns[-1] += f"{answer}\n"


def _fit_prompt(tokenizer, turns: list[str], budget: int) -> str | None:
    """The system text and as many recent turns as fit `budget` tokens; drops the oldest turns (in place)."""
    while turns:
        for prompt in (_SYSTEM.value + "\n\n" + "".join(turns), "".join(turns)):
            if len(tokenizer.encode(prompt, add_bos=True)) <= budget:
                return prompt
        turns.pop(0)
    return None


if __name__ == "__main__":
    app.run(main)
