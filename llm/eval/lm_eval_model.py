"""lm-evaluation-harness's model "spanish-llm": a run directory evaluated in-process by lm-eval's tasks.

    python scripts/lm_eval.py --workdir=RUN --tasks=spanish_bench [any lm-eval flag]
    # or, once this module is imported: lm_eval.simple_evaluate(model="spanish-llm", model_args="workdir=RUN")

model_args: workdir (required), step (default: the latest checkpoint), batch_size, max_gen_toks (default 256,
when a task sets none), add_bos_token (default True), seed (sampling tasks). lm-eval's requests run on the
project's own primitives:

    loglikelihood          scoring.encode_pair and the batched Scorer, with lm-eval's is_greedy
    loglikelihood_rolling  lm-eval's rolling windows over the model's context, scored by the same Scorer
    generate_until         batched generation with the task's stop strings (infer.generate.generate_text)
    apply_chat_template    the run's chat template as text (llm/chat_template.render_text), for --apply_chat_template

Texts are read as Hugging Face tokenizers read them (a special token spelled in a text is that token: a chat
rendering starts with '<s>'), and a BOS goes in front of every context that does not spell one, as the run was
trained and as the project's scorer scores. add_bos_token=False leaves it out: that is what lm-eval's
`local-completions` does through a server (its /tokenize requests never add one), and the two then agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lm_eval.models  # noqa: F401  (lm-eval's own models: it registers them only into an empty registry)
import numpy as np
from lm_eval import utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llm import chat_template as chat_format
from llm.eval import scoring
from llm.hf.tokenizer_export import special_token_encoder
from llm.infer import generate
from llm.infer.sampling import SamplingParams
from llm.runs.loading import Run, load_run

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


def _batch_size(value: int | str | None) -> int:
    """An int, or lm-eval's 'auto' / 'auto:N', which mean the default here (the scorer's batches are fixed)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    return int(value)


@register_model("spanish-llm")
class SpanishLLM(TemplateLM):
    """A loaded run (model, tokenizer, chat template) behind lm-eval's model interface."""

    def __init__(
        self,
        workdir: str | None = None,
        step: int | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool = True,
        seed: int = 0,
        run: Run | None = None,
        max_batch_size: int | None = None,  # lm-eval's CLI always passes these two; JAX places the model itself.
        device: str | None = None,
    ):
        super().__init__()
        if run is None:
            if not workdir:
                raise ValueError("The spanish-llm model needs model_args workdir=RUN (a run directory).")
            run = load_run(workdir, None if step is None else int(step))
        if not isinstance(add_bos_token, bool):
            raise ValueError(f"model_args add_bos_token must be True or False, got {add_bos_token!r}.")
        self.run, self.tokenizer = run, run.tokenizer
        self.batch_size, self.max_gen_toks, self.seed = _batch_size(batch_size), int(max_gen_toks), int(seed)
        self.add_bos_token = add_bos_token
        self.scorer = scoring.Scorer(run.model, run.tokenizer, self.batch_size, run.config.logical_axis_rules)
        self._encode = special_token_encoder(run.tokenizer)
        self._bos_text = run.tokenizer.piece(run.tokenizer.bos_id)
        # A chat-tuned run ends its answers with an end-of-turn token; a base run never produces one.
        has_chat = chat_format.has_chat_format(run.tokenizer)
        self._stop_ids = chat_format.stop_token_ids(run.tokenizer) if has_chat else (run.tokenizer.eos_id,)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> SpanishLLM:
        """As lm-eval's, but model_args win over the CLI's settings (it always passes --batch_size and --device)."""
        extra = (additional_config or {}).items()
        return cls(**arg_dict, **{key: value for key, value in extra if value is not None and key not in arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SpanishLLM:
        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window are conditioned on: the BOS, as documents start."""
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_len

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return chat_format.template_source(self.tokenizer) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # Without a generation prompt the last message is the start of the answer (a task's gen_prefix): it is
        # continued, as lm-eval's Hugging Face model does.
        return chat_format.render_text(
            self.tokenizer, chat_history, add_generation_prompt, continue_final_message=not add_generation_prompt
        )

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        """Ids of `string`, with a BOS in front when asked (default: add_bos_token) unless it spells one."""
        ids = self._encode(string)
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_bos and not string.startswith(self._bos_text):
            ids = [self.tokenizer.bos_id, *ids]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_ids, continuation_ids = scoring.encode_pair(self.tokenizer, context, continuation, self._encode)
        # encode_pair puts a BOS in front: not twice where the context spells one (a chat rendering), and not
        # with add_bos_token=False (unless nothing else is left to condition on).
        if context.startswith(self._bos_text) or (not self.add_bos_token and len(context_ids) > 1):
            context_ids = context_ids[1:]
        return context_ids, continuation_ids

    def _loglikelihood_tokens(
        self, requests: Sequence[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        answers = self.scorer.score_tokens_greedy([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts from the BOS: lm-eval's disjoint windows of the model's context."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in utils.get_rolling_token_windows(
                self._encode(text), self.prefix_token_id, self.scorer.max_len, context_len=1
            ):
                windows.append(utils.make_disjoint_window(window))
                owners.append(index)
        totals = np.zeros(len(requests))
        np.add.at(totals, owners, self.scorer.score_tokens(windows) if windows else [])
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
        return totals.tolist()

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Completions of the contexts, a batch at a time per set of generation settings, cut at `until`."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        texts: list[str] = [""] * len(requests)
        for indices in groups.values():
            stop_strings, max_new_tokens, sampling = self._generation_settings(requests[indices[0]].args[1])
            prompts = {index: self._prompt_ids(requests[index].args[0], max_new_tokens) for index in indices}
            ordered = sorted(indices, key=lambda index: len(prompts[index]))  # Similar lengths share a batch.
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start : start + self.batch_size]
                completions = generate.generate_text(
                    self.run,
                    [prompts[i] for i in batch],
                    max_new_tokens,
                    sampling,
                    stop_strings,
                    self.seed,
                    self._stop_ids,
                )
                for index, text in zip(batch, completions):
                    texts[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return texts

    def _prompt_ids(self, context: str, max_new_tokens: int) -> list[int]:
        """The context's ids, cut from the left to leave room for the completion in the model's context."""
        room = max(1, self.scorer.max_len - max_new_tokens)
        return self.tok_encode(context)[-room:]

    def _generation_settings(self, gen_kwargs: Mapping) -> tuple[list[str], int, SamplingParams]:
        """(stop strings, max new tokens, sampling) of a task's generation_kwargs: greedy unless do_sample."""
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise ValueError(
                f"spanish-llm: unsupported generation_kwargs {unknown}; supported: {', '.join(GENERATION_KEYS)}."
            )
        until = gen_kwargs.get("until") or []
        stop_strings = [s for s in ([until] if isinstance(until, str) else until) if s]
        max_new_tokens = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks)
        if not gen_kwargs.get("do_sample", False):
            return stop_strings, max_new_tokens, SamplingParams()
        temperature = gen_kwargs.get("temperature")
        sampling = SamplingParams(
            temperature=1.0 if temperature is None else float(temperature),
            top_p=float(gen_kwargs.get("top_p") or 1.0),
            top_k=int(gen_kwargs.get("top_k") or 0),
        )
        return stop_strings, max_new_tokens, sampling
