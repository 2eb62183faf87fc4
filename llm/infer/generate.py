"""Batched generation with a KV cache: one jitted prefill over the prompts, then one jitted step per token.

Prompts of different lengths are left-padded to a common length, so every row decodes at the same cache
index; padding carries segment id 0 and is masked out, and positions count from each prompt's own start,
so a prompt gives the same tokens alone or in a batch. Prompt lengths and batch sizes are rounded up to powers
of two ("buckets": lengths from MIN_BUCKET, batches from one row), so a new prompt length rarely means a new
compilation; cache lengths to an eighth of a power of two (`cache_bucket`), since every decoding step reads the
whole cache. The cache is donated to each step and updated in place.

A model whose parameters sit on a mesh (`load_run(workdir, mesh_shape=(1, 2, 4))`: tensor parallel) generates on
that mesh under the run's logical-axis rules: the cache is created and kept sharded as they say (llm/model/kv_cache.py).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import base
from llm import sharding
from llm.infer.sampling import SamplingParams, sample
from llm.model.kv_cache import KVCache, new_cache
from llm.model.transformer import Transformer, context_length
from llm.runs.loading import Run
from llm.tokenizer import Tokenizer

MIN_BUCKET = 16
# Decoding steps per dispatch when nothing streams: the host checks stop strings between dispatches, so a
# larger count wastes more steps after one appears.
STEPS_PER_DISPATCH = 16


def bucket(n: int, cap: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """The power of two >= n (at least `minimum`), capped at `cap`."""
    size = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return min(size, cap) if cap else size


def cache_bucket(n: int, cap: int | None = None) -> int:
    """n rounded up to a multiple of an eighth of its power-of-two bucket (and of MIN_BUCKET), capped at `cap`.

    Attention reads every cached position at every step, so a prompt of 128 and 32 new tokens decodes over 160
    positions rather than 256 (a fifth faster at batch 64 on CPU), for at most eight compiled shapes per octave.
    """
    step = max(bucket(n) // 8, MIN_BUCKET)
    size = -(-max(n, 1) // step) * step
    return min(size, cap) if cap else size


def _prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    cache: KVCache,
    key: jax.Array,
    sampling: SamplingParams,
):
    model = nnx.merge(graphdef, params)
    hidden, cache = model.decode_features(tokens, positions, segment_ids, cache)
    # Only the last position's logits are used (prompts are left-padded): projecting every position cost more
    # than the rest of the prefill of a small model.
    logits = model.logits(hidden[:, -1:])[:, 0]
    vocab = logits.shape[-1]
    seen = (
        jnp.zeros((tokens.shape[0], vocab), bool).at[jnp.arange(tokens.shape[0])[:, None], tokens].set(segment_ids > 0)
    )
    # Prompts are left-padded: the last column holds each prompt's last token (a watermark's previous token).
    next_tokens = sample(logits, key, sampling, seen, tokens[:, -1])
    return next_tokens, logits, cache, seen


def _decode_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    seen: jax.Array,
    key: jax.Array,
    sampling: SamplingParams,
):
    model = nnx.merge(graphdef, params)
    seen = seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
    logits, cache = model.decode(tokens[:, None], positions[:, None], jnp.ones_like(tokens)[:, None], cache)
    next_tokens = sample(logits[:, -1], key, sampling, seen, tokens)
    return next_tokens, logits[:, -1], cache, seen


class DecodeState(NamedTuple):
    """What a decoding dispatch carries over to the next: each row's last token, the cache, the tokens seen
    (repetition penalty) and whether each row has produced a stop token (or is a filler row)."""

    tokens: jax.Array
    cache: KVCache
    seen: jax.Array
    finished: jax.Array


def _decode_tokens(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: DecodeState,
    positions: jax.Array,
    key: jax.Array,
    first_step: jax.Array,
    limit: jax.Array,
    stop_ids: jax.Array,
    sampling: SamplingParams,
    count: int,
) -> tuple[jax.Array, jax.Array, DecodeState]:
    """Up to `count` decoding steps in one dispatch: (batch, count) tokens, how many steps ran, the new state.

    Step `first_step + i` writes at `positions + first_step + i` with key fold_in(key, first_step + i + 1), as
    one `_decode_step` call per token would. The loop ends after `limit` (<= count) steps, or as soon as every
    row has produced one of `stop_ids`: with one dispatch and one host round trip per token, the host's share
    was about a sixth of a step at batch 8 on CPU.
    """

    def unfinished(carry: tuple[jax.Array, DecodeState, jax.Array]) -> jax.Array:
        step, state, _ = carry
        return (step < limit) & ~jnp.all(state.finished)

    def decode_one(carry: tuple[jax.Array, DecodeState, jax.Array]) -> tuple[jax.Array, DecodeState, jax.Array]:
        step, state, chosen = carry
        at = first_step + step
        tokens, _, cache, seen = _decode_step(
            graphdef,
            params,
            state.tokens,
            positions + at,
            state.cache,
            state.seen,
            jax.random.fold_in(key, at + 1),
            sampling,
        )
        finished = state.finished | jnp.isin(tokens, stop_ids)
        return step + 1, DecodeState(tokens, cache, seen, finished), chosen.at[:, step].set(tokens)

    chosen = jnp.zeros((state.tokens.shape[0], count), jnp.int32)
    steps, state, chosen = jax.lax.while_loop(unfinished, decode_one, (jnp.int32(0), state, chosen))
    return chosen, steps, state


@functools.lru_cache(maxsize=8)
def _jitted_steps(graphdef: nnx.GraphDef) -> tuple[Callable, Callable, Callable]:
    """The jitted prefill, decode step and multi-token decode of one graphdef (`sampling` and `count` static; the
    cache, and the record of seen tokens, donated). The graphdef is bound here rather than passed as a static
    argument, which jit hashed on every call: a fifth of a small model's decoding step."""
    prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnames=("sampling",), donate_argnames=("cache",))
    decode_step = jax.jit(
        functools.partial(_decode_step, graphdef), static_argnames=("sampling",), donate_argnames=("cache", "seen")
    )
    decode_tokens = jax.jit(
        functools.partial(_decode_tokens, graphdef), static_argnames=("sampling", "count"), donate_argnames=("state",)
    )
    return prefill, decode_step, decode_tokens


class Generator:
    """Generates token ids for batches of prompts with one model."""

    def __init__(self, model: Transformer, rules: sharding.Rules = base.DEFAULT_LOGICAL_AXIS_RULES):
        """`rules`: the logical-axis rules (the run's `config.logical_axis_rules`) by which a model placed on a
        mesh generates: its cache and activations are sharded as they say."""
        self.graphdef, params = nnx.split(model)
        self.cfg, self.rules = model.cfg, rules
        # Serve in the compute dtype: decoding reads every weight per token, so bfloat16 halves its cost.
        compute = jnp.dtype(self.cfg.dtype)
        self.params = jax.tree.map(lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        # prefill(params, tokens, positions, segment_ids, cache, key, sampling) and
        # decode_step(params, tokens, positions, cache, seen, key, sampling) -> (next tokens, last logits, cache,
        # seen), and `_decode_tokens` (several steps per dispatch), jitted for this graphdef.
        self.prefill, self.decode_step, self.decode_tokens = _jitted_steps(self.graphdef)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_token_ids: Sequence[int] = (),
        seed: int = 0,
        on_tokens: Callable[[list[int | None]], bool | None] | None = None,
        steps_per_dispatch: int = STEPS_PER_DISPATCH,
    ) -> list[list[int]]:
        """The new tokens of each prompt, without the stop token that ended it.

        `on_tokens` receives each step's new token per row (None for finished rows); returning True stops
        generation. Generation stops at `max_new_tokens`, at the end of the model's context, or when every row
        has produced a stop token. The device decodes up to `steps_per_dispatch` tokens before the host sees
        them: streaming passes 1, so that each token reaches `on_tokens` as soon as it exists.
        """
        max_new_tokens, prompt_len, cache_len = self._lengths(prompts, max_new_tokens)
        batch = bucket(len(prompts), minimum=1)  # On CPU every row costs compute: one prompt decodes as one row.
        tokens, positions, segment_ids, next_positions = _left_padded(prompts, batch, prompt_len)
        key = jax.random.key(seed)
        stop = set(stop_token_ids)
        stop_ids = jnp.asarray(sorted(stop) or [-1], jnp.int32)  # -1: no token is a stop token.
        outputs: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        # A model loaded onto several devices generates on their mesh, its cache sharded as the rules say.
        with sharding.use_mesh_of(self.params, self.rules):
            cache = new_cache(self.graphdef, self.params, batch, cache_len)
            next_tokens, _, cache, seen = self.prefill(
                self.params, tokens, positions, segment_ids, cache, jax.random.fold_in(key, 0), sampling
            )
            step, chosen = 0, np.asarray(next_tokens)[:, None]  # The tokens the host has not seen yet, a column a step.
            while True:
                for column in chosen.T:
                    step += 1
                    streamed = _collect(column, outputs, finished, stop)
                    if (on_tokens is not None and on_tokens(streamed)) or all(finished) or step == max_new_tokens:
                        return outputs
                if step == 1:
                    # Filler rows count as finished, so that only the real rows' stop tokens end the loop early.
                    done = jnp.asarray(finished + [True] * (batch - len(prompts)))
                    state = DecodeState(next_tokens, cache, seen, done)
                limit = min(steps_per_dispatch, max_new_tokens - step)
                chosen, steps, state = self.decode_tokens(
                    self.params, state, next_positions, key, step - 1, limit, stop_ids, sampling, steps_per_dispatch
                )
                chosen = np.asarray(chosen)[:, : int(steps)]

    def _lengths(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[int, int, int]:
        """(new tokens that fit, prompt bucket, cache length) for these prompts; bad requests are refused."""
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            raise ValueError(
                "Every prompt needs at least one token (an empty prompt has nothing to continue; "
                "encode it with a beginning-of-sequence token)."
            )
        context = context_length(self.cfg)
        if max(lengths) >= context:
            raise ValueError(
                f"A prompt of {max(lengths)} tokens does not fit the model's context of {context} "
                "tokens (it needs room for at least one new token); shorten the prompt."
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        max_new_tokens = min(max_new_tokens, context - max(lengths))
        # Left padding up to the prompt bucket must leave the new tokens room in the context: near its end the
        # prompts are padded to less (a prompt of 20 tokens in a context of 32 once got no new tokens).
        prompt_len = min(bucket(max(lengths), context), context - max_new_tokens)
        return max_new_tokens, prompt_len, cache_bucket(prompt_len + max_new_tokens, context)


def _left_padded(
    prompts: Sequence[Sequence[int]], batch: int, prompt_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, jax.Array]:
    """(tokens, positions, segment ids) (batch, prompt_len) of the prompts left-padded, filler rows repeating the
    first prompt to fill the batch bucket, and each row's next position."""
    tokens, positions, segment_ids = (np.zeros((batch, prompt_len), np.int32) for _ in range(3))
    rows = list(prompts) + [prompts[0]] * (batch - len(prompts))
    for row, prompt in enumerate(rows):
        pad = prompt_len - len(prompt)
        tokens[row, pad:] = prompt
        segment_ids[row, pad:] = 1
        positions[row, pad:] = np.arange(len(prompt))
    return tokens, positions, segment_ids, jnp.asarray([len(p) for p in rows], jnp.int32)


def _collect(chosen: np.ndarray, outputs: list[list[int]], finished: list[bool], stop: set[int]) -> list[int | None]:
    """Appends one step's tokens (a row's first stop token finishes it) and returns them as streamed: the new
    token of each row, None for finished rows (filler rows past len(outputs) are ignored)."""
    streamed: list[int | None] = []
    for row in range(len(outputs)):
        token = int(chosen[row])
        if finished[row] or token in stop:
            finished[row] = True
            streamed.append(None)
        else:
            outputs[row].append(token)
            streamed.append(token)
    return streamed


_GENERATORS: weakref.WeakKeyDictionary[Transformer, Generator] = weakref.WeakKeyDictionary()


def run_generator(run: Run) -> Generator:
    """The Generator of a loaded run's model, made once: its parameters are cast to the compute dtype once and
    shared by every later call (it lives as long as the model does)."""
    if run.model not in _GENERATORS:
        _GENERATORS[run.model] = Generator(run.model, run.config.logical_axis_rules)
    return _GENERATORS[run.model]


class TextStream:
    """Turns a growing list of generated ids into text that is safe to show as it streams.

    Text is decoded behind the prompt's last token (so the completion keeps its leading space); text that
    could still turn out to be the start of a stop string, or a trailing half character (U+FFFD from
    byte-fallback pieces), is held back until it cannot be.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), previous_id: int | None = None):
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
        # After a chat role marker the answer starts a fresh text, as after <s>: no leading space. (A Hugging
        # Face tokenizer has no such markers; its decode_after starts fresh after any special token.)
        markers = tokenizer.role_ids.values() if tokenizer.has_role_tokens else ()
        fresh_start = previous_id is None or previous_id in markers
        self.previous_id = tokenizer.bos_id if fresh_start else previous_id
        self.ids: list[int] = []
        self.shown = 0
        self.hold_back = max((len(s) for s in self.stop_strings), default=1) - 1

    def text(self) -> str:
        """The completion so far, cut at the first stop string."""
        return _cut_at_stop(self.tokenizer.decode_after(self.ids, self.previous_id), self.stop_strings)

    def stopped(self) -> bool:
        return any(s in self.tokenizer.decode_after(self.ids, self.previous_id) for s in self.stop_strings)

    def push(self, token: int) -> tuple[str, bool]:
        """The newly visible text after `token`, and whether a stop string has appeared."""
        self.ids.append(token)
        text = self.tokenizer.decode_after(self.ids, self.previous_id)
        stopped = any(s in text for s in self.stop_strings)
        if stopped:
            visible = _cut_at_stop(text, self.stop_strings)
        else:
            visible = text[: max(len(text) - self.hold_back, self.shown)].rstrip("\ufffd")
        delta = visible[self.shown :]
        self.shown = max(self.shown, len(visible))
        return delta, stopped

    def rest(self) -> str:
        """Everything not shown yet, at the end of generation."""
        return self.text()[self.shown :]


def generate_text(
    run: Run,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_strings: Sequence[str] = (),
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
) -> list[str]:
    """Completions of prompts for a loaded run, in one batch, cut at the first stop string.

    A prompt is text (encoded after <s>) or token ids as they are. Generation ends at one of `stop_token_ids`
    (default: </s>), or as soon as every row contains a stop string.
    """
    tokenizer = run.tokenizer
    encoded = [
        tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt) for prompt in prompts
    ]
    stop_ids = (tokenizer.eos_id,) if stop_token_ids is None else tuple(stop_token_ids)
    streams = [TextStream(tokenizer, stop_strings, ids[-1]) for ids in encoded]

    def collect(step_tokens: list[int | None]) -> bool:
        for stream, token in zip(streams, step_tokens):
            if token is not None:
                stream.ids.append(token)
        return bool(stop_strings) and all(stream.stopped() for stream in streams)

    run_generator(run).generate(encoded, max_new_tokens, sampling, stop_ids, seed, on_tokens=collect)
    return [stream.text() for stream in streams]


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    return text[: min((text.find(s) for s in stop_strings if s in text), default=len(text))]


def stream_text(
    run: Run,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    emit: Callable[[str], None],
    sampling: SamplingParams = SamplingParams(),
    stop_strings: Sequence[str] = (),
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
) -> str:
    """Generates one completion, passing each new piece of text to `emit` as soon as it is known.

    `prompt` is text (encoded after <s>) or token ids as they are (a conversation rendered by
    llm/chat_template.py). Generation ends at a stop string or one of `stop_token_ids` (default: </s>).
    Returns the whole completion (cut at the stop string).
    """
    tokenizer = run.tokenizer
    prompt_ids = tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
    stop_ids = (tokenizer.eos_id,) if stop_token_ids is None else tuple(stop_token_ids)
    stream = TextStream(tokenizer, stop_strings, prompt_ids[-1])

    def on_tokens(step_tokens: list[int | None]) -> bool:
        if step_tokens[0] is None:
            return True
        delta, stopped = stream.push(step_tokens[0])
        if delta:
            emit(delta)
        return stopped

    run_generator(run).generate(
        [prompt_ids], max_new_tokens, sampling, stop_ids, seed, on_tokens=on_tokens, steps_per_dispatch=1
    )
    if rest := stream.rest():
        emit(rest)
    return stream.text()
