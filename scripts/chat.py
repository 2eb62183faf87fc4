"""Talk to a trained run in the terminal; the answer streams as it is generated.

    python scripts/chat.py --workdir=runs/tiny_es [--temperature=0.7 --max_new_tokens=128]

A chat-tuned run (trained on chat rows: its config has `chat=True`, see configs/sft_es.py) is prompted
exactly as it was trained: the conversation so far through the chat template (llm/chat_template.py), ending
with <|assistant|>, and its answer ends at <|end|>. A run imported from Hugging Face whose tokenizer has a chat
template of its own (chat_template.jinja) is prompted through that template, and its answer ends at the
template's end-of-turn token or an eos of its generation_config.json. A pretrained run continues a plain-text
dialogue instead: each turn is sent as "Usuario: ...\\nAsistente:" after the conversation so far, and the answer
ends where the model starts the user's next turn. When the conversation outgrows the context, its oldest turns
are dropped. Commands: /reset clears the conversation, /exit (or Ctrl-D) quits.
"""

import os
import sys

import run_flags
from absl import app, flags

from llm import chat_template
from llm.infer import generate
from llm.infer.sampling import SamplingParams
from llm.model.transformer import context_length
from llm.tokenizer import AnyTokenizer

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by scripts/train.py.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Longest answer in tokens.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "0 = greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass (1: off).", lower_bound=0.0, upper_bound=1.0)
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.1, "CTRL repetition penalty (1: off).")
_SYSTEM = flags.DEFINE_string(
    "system",
    "Conversación en español entre un usuario y un asistente amable.",
    "System message of a chat-tuned run, or the text placed before a plain dialogue (empty: none).",
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
    run = run_flags.load_run(_WORKDIR.value, _STEP.value)
    # Leave room for the answer: at least a quarter of the context, at most max_new_tokens.
    context = context_length(run.model.cfg)
    prompt_budget = context - min(_MAX_NEW_TOKENS.value, context // 4)
    chat = run.config.chat or run.tokenizer.chat_template is not None
    if chat and not chat_template.has_chat_format(run.tokenizer):
        raise app.UsageError(
            f"--workdir={_WORKDIR.value!r} is chat-tuned (config chat=True) but its tokenizer has neither the "
            "chat-role markers nor a chat template (chat_template.jinja or tokenizer_config.json's chat_template)."
        )
    build_prompt = _chat_prompt if chat else _plain_prompt
    stop = (
        {"stop_token_ids": chat_template.stop_token_ids(run.tokenizer)}
        if chat
        else {"stop_strings": (f"\n{USER}", "\n\n")}
    )
    kind = "ajustado para chat" if chat else "preentrenado"
    print(f"Modelo {kind} de {_WORKDIR.value} (paso {run.step}). /reset para empezar de nuevo, /exit para salir.")
    messages: list[dict[str, str]] = []
    for turn in range(10**9):
        try:
            message = input("\nTú: ").strip()
        except EOFError:
            print()
            return
        if message == "/exit":
            return
        if message == "/reset":
            messages = []
            continue
        if not message:
            continue
        messages.append({"role": "user", "content": message})
        try:
            prompt = build_prompt(run.tokenizer, messages, prompt_budget)
        except chat_template.ChatFormatError as error:  # A model's own template may refuse, e.g., a system turn.
            print(f"({error} Con --system= no se envía mensaje de sistema.)")
            messages.pop()
            continue
        if prompt is None:
            print("(Mensaje demasiado largo para el contexto del modelo.)")
            messages = []
            continue
        sys.stdout.write(ASSISTANT + (" " if chat else ""))
        answer = generate.stream_text(
            run,
            prompt,
            _MAX_NEW_TOKENS.value,
            lambda text: (sys.stdout.write(text), sys.stdout.flush()),
            sampling,
            seed=_SEED.value + turn,
            **stop,
        )
        print()
        messages.append({"role": "assistant", "content": answer})


def _chat_prompt(tokenizer: AnyTokenizer, messages: list[dict[str, str]], budget: int) -> list[int] | None:
    """The conversation through the chat template, ending where the answer starts, in at most `budget` tokens;
    drops the oldest exchanges (in place) to fit."""
    system = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
    while messages:
        ids, _ = chat_template.render(tokenizer, system + messages, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids
        del messages[:2]  # The oldest user turn and its answer.
    return None


def _plain_prompt(tokenizer: AnyTokenizer, messages: list[dict[str, str]], budget: int) -> list[int] | None:
    """The system text and as many recent turns as fit `budget` tokens, as a plain-text dialogue; drops the
    oldest exchanges (in place) to fit."""
    while messages:
        turns = "".join(
            f"{USER} {m['content']}\n{ASSISTANT}" if m["role"] == "user" else f"{m['content']}\n" for m in messages
        )
        for text in (_SYSTEM.value + "\n\n" + turns, turns):
            ids = tokenizer.encode(text, add_bos=True)
            if len(ids) <= budget:
                return ids
        del messages[:2]
    return None


if __name__ == "__main__":
    app.run(main)
