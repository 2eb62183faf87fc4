"""Continuous batching: one background thread decodes a fixed set of slots; requests join and leave between steps.

    submit() -> waiting queue --admit: prefill into a free slot--> slots[0..B) --one decode step for all--> events

The KV cache has `max_batch_size` rows of `max_cache_len` positions, allocated once, so the memory is fixed
by the config. A new request is prefilled alone into its slot's row (the prompt right-padded to a
power-of-two bucket, so a new prompt length rarely compiles anything), then decodes one token per step
together with every other active row; each row sits at its own cache position (`KVCache.index` is per
row). A request that finishes, hits a stop string or is cancelled frees its slot at once, and a waiting
request takes it before the next step: a long request never holds up short ones.

The decode step is one jitted function over all slots with the cache donated (updated in place). Each row
samples with its own parameters and seed (`sampling.sample_rows`). Log-probabilities are those of the
model's raw distribution (log-softmax of the logits), whatever the sampling parameters, which is what
log-likelihood evaluation needs. An engine made with a `watermark` watermarks every request it serves (the
key stays in the engine: requests, events and metrics never carry it). A model placed on a mesh (loaded with a
tensor-parallel `mesh_shape`) is served on that mesh, its cache sharded as the logical-axis `rules` say
(llm/model/kv_cache.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import base
from llm import sharding
from llm.infer.generate import TextStream, bucket
from llm.infer.sampling import RowSampling, SamplingParams
from llm.infer.watermark import WatermarkParams
from llm.model.kv_cache import new_cache
from llm.model.transformer import context_length
from llm.serve import slot_steps
from llm.serve.slot_steps import MAX_LOGPROBS
from llm.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion to generate: token ids in, tokens and text out."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop: tuple[str, ...] = ()  # Generation ends before the first of these strings; it is not returned.
    stop_token_ids: tuple[int, ...] = ()  # Tokens that end generation (not returned), e.g. end-of-sequence.
    logprobs: int | None = None  # Alternatives per generated token (0: only the chosen one's); None: no logprobs.
    prompt_logprobs: bool = False  # Also the log-probability of every prompt token given the ones before it.


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Sent once after prefill when asked for: per prompt token (the first has none, nothing precedes it)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token. `text` is the newly visible text: empty while it could still be the start of a
    stop string or half of a multi-byte character (it is released with a later token or at the end)."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event of a request. reason: 'stop' (stop token or string), 'length' (max_tokens or the
    cache is full), 'cancelled', or 'error' (with `error`)."""

    reason: str
    text: str  # Text held back until the end, if any.
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = PromptLogprobs | Token | Finished


class Ticket:
    """A submitted request: `cancel()` frees its slot before the next decode step."""

    def __init__(self, request: Request, emit: Callable[[Event], None], engine: Engine):
        self.request, self.emit, self.submitted = request, emit, time.perf_counter()
        self.cancelled = False
        self._engine = engine

    def cancel(self) -> None:
        self.cancelled = True
        self._engine.wake()


@dataclasses.dataclass
class _Row:
    ticket: Ticket
    text: TextStream
    generated: int = 0


class Engine:
    """Serves generation requests from one model with continuous batching on a background thread.

    `model` is any loaded model with the Transformer interface (`cfg`, `decode(tokens, positions,
    segment_ids, cache)`), e.g. `load_run(workdir).model` or a quantized model built from it. `metrics`
    (optional) receives `queue(waiting, active)`, `tokens(prompt, completion)` and `first_token(seconds)`.
    `watermark` (optional) is added to every request's sampling parameters. `rules`: the logical-axis rules
    (the run's `config.logical_axis_rules`) of a model placed on a mesh.
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: Tokenizer,
        max_batch_size: int = 8,
        max_cache_len: int | None = None,
        metrics=None,
        watermark: WatermarkParams | None = None,
        rules: sharding.Rules = base.DEFAULT_LOGICAL_AXIS_RULES,
    ):
        self.cfg, self.rules = model.cfg, rules
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        context = context_length(self.cfg)
        if max_cache_len is not None and not 1 < max_cache_len <= context:
            raise ValueError(f"max_cache_len must be in [2, {context}] (the model's context), got {max_cache_len}.")
        self.graphdef, self.params = nnx.split(model)
        self.tokenizer, self.metrics, self._watermark = tokenizer, metrics, watermark
        self.max_batch_size, self.max_cache_len = max_batch_size, max_cache_len or context
        self._lock = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._slots: list[_Row | None] = [None] * max_batch_size
        self._tokens = np.zeros(max_batch_size, np.int32)  # Each row's last token, fed to the next step.
        self._counts = np.zeros(max_batch_size, np.int32)  # Tokens sampled so far: folds into the row's key.
        self._seeds = np.zeros(max_batch_size, np.uint32)
        self._sampling = RowSampling.stack([SamplingParams()] * max_batch_size)
        self._reset_device_state()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llm-serve-engine", daemon=True)
        self.error: str | None = None  # The last failure of the decode loop (reported by /health).

    @property
    def kv_cache_bytes(self) -> int:
        return self._cache.nbytes()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return sum(row is not None for row in self._slots)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the loop; requests still waiting or running finish with reason 'cancelled'."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join()
        for ticket in list(self._waiting) + [row.ticket for row in self._slots if row]:
            ticket.emit(Finished("cancelled", "", len(ticket.request.prompt), 0))

    def wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def submit(self, request: Request, emit: Callable[[Event], None]) -> Ticket:
        """Queues `request`; `emit` is called from the engine thread with each of its events, Finished last."""
        prompt_len = len(request.prompt)
        if not 1 <= prompt_len <= self.max_cache_len:
            raise ValueError(f"A prompt must have 1 to {self.max_cache_len} tokens, got {prompt_len}.")
        if not 0 <= request.max_tokens <= self.max_cache_len - prompt_len:
            raise ValueError(
                f"max_tokens={request.max_tokens} with a prompt of {prompt_len} tokens exceeds the "
                f"cache length of {self.max_cache_len} tokens."
            )
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}.")
        if any(not 0 <= t < self.cfg.vocab_size for t in request.prompt):
            raise ValueError(f"Prompt token ids must be in [0, {self.cfg.vocab_size}).")
        ticket = Ticket(request, emit, self)
        with self._lock:
            self._waiting.append(ticket)
            self._lock.notify()
        self._report_queue()
        return ticket

    def warmup(self) -> None:
        """Compiles the decode step and the prefill of every prompt bucket (before serving, so that the first
        requests of each length are not slow). Call before `start`."""
        sizes, size = [], bucket(1, self.max_cache_len)
        while True:
            sizes.append(size)
            if size >= self.max_cache_len:
                break
            size = bucket(size + 1, self.max_cache_len)
        for size in sizes:
            request = Request([1] * size, 0)
            self._run_prefill(0, request.prompt, request, self._row_sampling(request))
        self._run_decode(np.zeros(self.max_batch_size, bool))
        self._reset_device_state()

    def _on_mesh(self):
        """The mesh and rules of the parameters' placement, for every jitted call (nothing off a mesh)."""
        return sharding.use_mesh_of(self.params, self.rules)

    def _reset_device_state(self) -> None:
        with self._on_mesh():
            # Sharded as the steps return it (llm/model/kv_cache.py), so that no step compiles twice.
            self._cache = new_cache(self.graphdef, self.params, self.max_batch_size, self.max_cache_len)
        seen = jnp.zeros((self.max_batch_size, self.cfg.vocab_size), bool)
        # The steps return `seen` replicated over the parameters' mesh; starting it there too spares a second
        # compilation of every step for a first call with another placement.
        mesh = sharding.mesh_of(self.params)
        self._seen = seen if mesh is None else jax.device_put(seen, sharding.replicated(mesh))

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(self.num_waiting, self.num_active)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or any(self._slots)):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if any(self._slots):
                    self._step()
            except Exception as error:  # A failed step must not take the server down: fail its requests.
                logging.exception("Decode loop failed; failing the running requests.")
                self.error = f"{type(error).__name__}: {error}"
                for slot, row in enumerate(self._slots):
                    if row is not None:
                        self._finish(slot, "error", error=self.error)
                self._reset_device_state()
            self._report_queue()

    def _drop_cancelled(self) -> None:
        for slot, row in enumerate(self._slots):
            if row is not None and row.ticket.cancelled:
                self._finish(slot, "cancelled")

    def _admit(self) -> None:
        """Prefills waiting requests into free slots until either runs out."""
        for slot in range(self.max_batch_size):
            if self._slots[slot] is not None:
                continue
            with self._lock:
                ticket = self._waiting.popleft() if self._waiting else None
            if ticket is None:
                return
            if ticket.cancelled:
                ticket.emit(Finished("cancelled", "", len(ticket.request.prompt), 0))
                continue
            request = ticket.request
            self._slots[slot] = _Row(ticket, TextStream(self.tokenizer, request.stop, request.prompt[-1]))
            self._seeds[slot], self._counts[slot] = np.uint32(request.seed % 2**32), 1
            sampling = self._row_sampling(request)
            for field, value in zip(RowSampling._fields, sampling):
                getattr(self._sampling, field)[slot] = value[0]
            token, logprob, top_ids, top_logprobs, prompt = self._run_prefill(slot, request.prompt, request, sampling)
            if self.metrics is not None:
                self.metrics.tokens(len(request.prompt), 0)
            if prompt is not None:
                chosen, ids, values = (np.asarray(x) for x in prompt)
                count = len(request.prompt) - 1
                ticket.emit(
                    PromptLogprobs(
                        [None] + chosen[:count].tolist(),
                        [None] + [self._top(ids[t], values[t], request.logprobs) for t in range(count)],
                    )
                )
            if request.max_tokens == 0:
                self._finish(slot, "length")
            else:
                self._accept(slot, int(token), float(logprob), np.asarray(top_ids), np.asarray(top_logprobs))

    def _row_sampling(self, request: Request) -> RowSampling:
        """The request's sampling parameters as one row, with the engine's watermark when it has one."""
        if self._watermark is None:
            return RowSampling.stack([request.sampling])
        return RowSampling.stack([dataclasses.replace(request.sampling, watermark=self._watermark)])

    def _run_prefill(self, slot: int, prompt: Sequence[int], request: Request, sampling: RowSampling):
        size = bucket(len(prompt), self.max_cache_len)
        tokens = np.zeros((1, size), np.int32)
        tokens[0, : len(prompt)] = prompt
        with self._on_mesh():
            token, logprob, top_ids, top_logprobs, prompt_logprobs, self._cache, self._seen = slot_steps.prefill_slot(
                self.graphdef,
                self.params,
                self._cache,
                self._seen,
                np.int32(slot),
                tokens,
                np.int32(len(prompt)),
                sampling,
                np.array([request.seed % 2**32], np.uint32),
                with_prompt_logprobs=request.prompt_logprobs,
            )
        return token, logprob, top_ids, top_logprobs, prompt_logprobs

    def _run_decode(self, active: np.ndarray):
        with self._on_mesh():
            next_tokens, chosen, top_ids, top_logprobs, self._cache, self._seen = slot_steps.decode_slots(
                self.graphdef,
                self.params,
                self._cache,
                self._seen,
                self._tokens,
                active,
                self._sampling,
                self._seeds,
                self._counts,
            )
        return np.asarray(next_tokens), np.asarray(chosen), np.asarray(top_ids), np.asarray(top_logprobs)

    def _step(self) -> None:
        active = np.array([row is not None for row in self._slots])
        next_tokens, chosen, top_ids, top_logprobs = self._run_decode(active)
        for slot in np.flatnonzero(active):
            self._accept(slot, int(next_tokens[slot]), float(chosen[slot]), top_ids[slot], top_logprobs[slot])

    def _accept(self, slot: int, token: int, logprob: float, top_ids: np.ndarray, top_logprobs: np.ndarray) -> None:
        """Hands a sampled token to its request, and finishes the request or queues the token for the next step."""
        row = self._slots[slot]
        request = row.ticket.request
        if row.generated == 0 and self.metrics is not None:
            self.metrics.first_token(time.perf_counter() - row.ticket.submitted)
        if token in request.stop_token_ids:
            self._finish(slot, "stop")
            return
        row.generated += 1
        text, stopped = row.text.push(token)
        row.ticket.emit(Token(token, text, logprob, self._top(top_ids, top_logprobs, request.logprobs)))
        if stopped:
            self._finish(slot, "stop", final_text="")
        elif row.generated >= request.max_tokens:
            self._finish(slot, "length")
        else:
            self._tokens[slot] = token
            self._counts[slot] += 1

    @staticmethod
    def _top(ids: np.ndarray, values: np.ndarray, count: int | None) -> list[tuple[int, float]]:
        return [(int(i), float(v)) for i, v in zip(ids[: count or 0], values[: count or 0])]

    def _finish(self, slot: int, reason: str, final_text: str | None = None, error: str | None = None) -> None:
        row = self._slots[slot]
        self._slots[slot] = None
        text = row.text.rest() if final_text is None and reason in ("stop", "length") else ""
        if self.metrics is not None:
            self.metrics.tokens(0, row.generated)
        row.ticket.emit(Finished(reason, text, len(row.ticket.request.prompt), row.generated, error))
