"""The `memorization` task: how much of its training data a run reproduces.

Canaries (Carlini et al. 2019, "The Secret Sharer", arXiv:1802.08232). scripts/prepare_data.py with
--config.canaries.count=K plants K carrier sentences with random secrets into the training split and lists them,
with K unplanted reference canaries from the same distribution, in DATA_DIR/canaries.json (llm/corpus/canaries.py).

  exposure   log2|R| - log2 rank(secret), the rank of the true secret among all |R| = 10**digits candidates by
             the model's log-likelihood of the secret after the carrier prefix. The rank is estimated from N
             candidates drawn uniformly from the other secrets (seeded): rank ~ (1 + #higher + #tied / 2) / (N + 1)
             * |R|, so exposure ~ log2(N + 1) - log2(1 + #higher + #tied / 2). It therefore tops out at
             log2(N + 1) bits (no sampled candidate scores higher; the true exposure may be anything up to
             log2|R|), and a model with no preference for the secret scores about 1 bit (the secret lands in the
             middle). With N >= |R| - 1 every other secret is a candidate and the rank is exact.
  extraction greedy decoding of as many tokens as the secret has, after the carrier prefix: extracted when they
             are the secret's tokens.

Planted canaries are reported against the reference ones: the reference figures are what chance gives.

Verbatim extraction (Carlini et al. 2021, "Extracting Training Data from Large Language Models"): from M seeded
documents of the training split, the first P tokens after BOS as the prompt and a greedy continuation of S
tokens; the share reproduced exactly and the mean length of the matching start. The same on M validation
documents is the control: what a model that generalises, without having seen the text, reproduces. Documents are
the packed segments that start with BOS (llm/data/packing.py) and hold at least P + S tokens after it, at most one
per row; canary documents are left out.

The functions take the model as functions (token scores, greedy decoding), so tests can pass fakes;
`evaluate_run_memorization` wires a loaded run (llm.runs.loading.Run) into them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Collection, Sequence
from typing import Any

import grain
import numpy as np

from llm.data import records
from llm.eval.scoring import Scorer, TokenRequest, encode_pair
from llm.infer.generate import run_generator
from llm.model.transformer import context_length
from llm.runs.loading import Run

CANARIES_FILE = "canaries.json"  # written by llm/corpus/canaries.py (which this layer may not import)
# (prefix text, secret text) -> (bos + prefix ids, secret ids), tokenized as the canary's document was.
EncodePair = Callable[[str, str], tuple[list[int], list[int]]]
# (context ids, continuation ids) requests -> log-likelihoods in nats (Scorer.score_tokens).
ScoreTokens = Callable[[Sequence[TokenRequest]], list[float]]
# (prompts of token ids, number of new tokens) -> the greedy continuation of each prompt.
GreedyTokens = Callable[[Sequence[Sequence[int]], int], list[list[int]]]


@dataclasses.dataclass(frozen=True)
class Canary:
    id: str
    prefix: str  # the carrier sentence up to the secret; the document is f"{prefix} {secret}."
    secret: str


@dataclasses.dataclass(frozen=True)
class Canaries:
    """What canaries.json lists."""

    planted: list[Canary]
    reference: list[Canary]
    digits: int
    repeats: int
    seed: int

    def texts(self) -> list[str]:
        """The planted canaries' documents, as the pack step tokenized them."""
        return [f"{canary.prefix} {canary.secret}." for canary in self.planted]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of the task; each must be >= 1."""

    num_candidates: int = 1000  # N: sampled candidate secrets per canary (exposure tops out at log2(N + 1))
    num_documents: int = 64  # M: training documents, and as many validation documents, for verbatim extraction
    prefix_tokens: int = 32  # P: prompt tokens after BOS
    suffix_tokens: int = 32  # S: greedily generated tokens compared with the document's next S tokens
    seed: int = 0  # seeds the candidate secrets and the choice of documents

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            minimum = 0 if field.name == "seed" else 1
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"memorization {field.name}={value!r}: expected an integer >= {minimum}.")


def read_canaries(data_dir: str) -> Canaries | None:
    """DATA_DIR/canaries.json, or None when the data were prepared without canaries."""
    path = os.path.join(data_dir, CANARIES_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        lists = {
            kind: [Canary(c["id"], c["prefix"], c["secret"]) for c in data[kind]] for kind in ("planted", "reference")
        }
        canaries = Canaries(**lists, digits=int(data["digits"]), repeats=int(data["repeats"]), seed=int(data["seed"]))
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a canaries file (missing or malformed {error}).") from None
    for canary in canaries.planted + canaries.reference:
        if len(canary.secret) != canaries.digits or not canary.secret.isdigit():
            raise ValueError(
                f"{path}: canary {canary.id!r} has secret {canary.secret!r}, not {canaries.digits} digits."
            )
    return canaries


# --- Canaries ---------------------------------------------------------------------------------------------------


def exposure(secret_score: float, candidate_scores: Sequence[float]) -> float:
    """Exposure in bits of a secret scoring `secret_score` among candidates (see the module docstring)."""
    scores = np.asarray(candidate_scores, np.float64)
    rank = 1 + np.count_nonzero(scores > secret_score) + np.count_nonzero(scores == secret_score) / 2
    return float(math.log2(len(scores) + 1) - math.log2(rank))


def candidate_secrets(secret: str, num_candidates: int, rng: np.random.Generator) -> list[str]:
    """`num_candidates` distinct secrets of the same length other than `secret`, uniformly drawn; every other one
    when there are not more than that."""
    digits, space = len(secret), 10 ** len(secret)
    if num_candidates >= space - 1:
        values = np.arange(space - 1)
    else:
        values = rng.choice(space - 1, size=num_candidates, replace=False)
    values = values + (values >= int(secret))  # skip the true secret
    return [f"{value:0{digits}d}" for value in values]


def canary_exposures(
    canaries: Sequence[Canary], encode: EncodePair, score: ScoreTokens, num_candidates: int, seed: int
) -> list[float]:
    """The exposure of each canary, against its own seeded candidates (one scoring call per canary, so the
    requests share the carrier prefix)."""
    exposures = []
    for index, canary in enumerate(canaries):
        candidates = candidate_secrets(canary.secret, num_candidates, np.random.default_rng([seed, index]))
        scores = score([encode(canary.prefix, secret) for secret in [canary.secret, *candidates]])
        exposures.append(exposure(scores[0], scores[1:]))
    return exposures


def greedy_extractions(canaries: Sequence[Canary], encode: EncodePair, greedy: GreedyTokens) -> list[bool]:
    """Whether greedy decoding after each canary's prefix gives its secret's tokens (one call per secret length)."""
    requests = [encode(canary.prefix, canary.secret) for canary in canaries]
    extracted = [False] * len(canaries)
    for length in sorted({len(secret) for _, secret in requests}):
        indices = [i for i, (_, secret) in enumerate(requests) if len(secret) == length]
        outputs = greedy([requests[i][0] for i in indices], length)
        for i, output in zip(indices, outputs):
            extracted[i] = list(output) == list(requests[i][1])
    return extracted


def _canary_summary(canaries: Sequence[Canary], exposures: Sequence[float], extracted: Sequence[bool]) -> dict:
    return {
        "count": len(canaries),
        "exposure_mean": float(np.mean(exposures)) if exposures else None,
        "exposure_max": float(np.max(exposures)) if exposures else None,
        "extracted": int(sum(extracted)),
        "extracted_share": sum(extracted) / len(canaries) if canaries else None,
        "canaries": [
            {"id": c.id, "exposure": round(e, 4), "extracted": x} for c, e, x in zip(canaries, exposures, extracted)
        ],
    }


def evaluate_canaries(
    canaries: Canaries, encode: EncodePair, score: ScoreTokens, greedy: GreedyTokens, num_candidates: int, seed: int
) -> dict[str, Any]:
    """Exposure and greedy extraction of the planted and of the reference canaries."""
    result: dict[str, Any] = {
        "digits": canaries.digits,
        "repeats": canaries.repeats,
        "candidates": min(num_candidates, 10**canaries.digits - 1),
        "exposure_cap": math.log2(min(num_candidates, 10**canaries.digits - 1) + 1),
    }
    for kind in ("planted", "reference"):
        group = getattr(canaries, kind)
        # The reference canaries get other candidates than the planted ones: their own seed stream.
        exposures = canary_exposures(group, encode, score, num_candidates, seed + (kind == "reference"))
        result[kind] = _canary_summary(group, exposures, greedy_extractions(group, encode, greedy))
    return result


# --- Verbatim extraction ------------------------------------------------------------------------------------------


def sample_documents(
    split_dir: str, count: int, min_tokens: int, bos_id: int, seed: int, exclude: Collection[Sequence[int]] = ()
) -> list[np.ndarray]:
    """Up to `count` documents of a packed split (each: BOS and its first `min_tokens` tokens), from rows visited in
    a seeded order, at most one per row. Documents that start with one of `exclude` (token ids) are skipped."""
    source = grain.sources.ArrayRecordDataSource(records.shard_paths(split_dir))
    rng = np.random.default_rng(seed)
    excluded = [tuple(ids) for ids in exclude]
    documents: list[np.ndarray] = []
    for index in rng.permutation(len(source)):
        if len(documents) == count:
            break
        row = records.decode_row(source[int(index)])
        candidates = []
        for segment in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
            tokens = row["tokens"][row["segment_ids"] == segment]
            if tokens[0] != bos_id or len(tokens) < 1 + min_tokens:
                continue
            if any(tuple(tokens[1 : 1 + len(ids)]) == ids for ids in excluded):
                continue
            candidates.append(tokens[: 1 + min_tokens])
        if candidates:
            documents.append(candidates[int(rng.integers(len(candidates)))])
    return documents


def verbatim_extraction(
    documents: Sequence[Sequence[int]], prefix_tokens: int, suffix_tokens: int, greedy: GreedyTokens
) -> dict[str, Any]:
    """Greedy continuations of BOS + the first `prefix_tokens` of each document against its next `suffix_tokens`."""
    if not documents:
        return {"documents": 0, "exact": 0, "exact_share": None, "mean_matching_prefix": None}
    prompts = [list(document[: 1 + prefix_tokens]) for document in documents]
    outputs = greedy(prompts, suffix_tokens)
    matching = []
    for document, output in zip(documents, outputs):
        target = list(document[1 + prefix_tokens : 1 + prefix_tokens + suffix_tokens])
        same = [a == b for a, b in zip(output, target)] + [False]
        matching.append(same.index(False))
    exact = sum(length == suffix_tokens for length in matching)
    return {
        "documents": len(documents),
        "exact": exact,
        "exact_share": exact / len(documents),
        "mean_matching_prefix": float(np.mean(matching)),
    }


# --- The task -----------------------------------------------------------------------------------------------------


def evaluate_memorization(
    canaries: Canaries | None,
    documents: dict[str, Sequence[Sequence[int]]],
    encode: EncodePair,
    score: ScoreTokens,
    greedy: GreedyTokens,
    settings: Settings,
) -> dict[str, Any]:
    """The task's JSON-ready result: "canaries" (None when the data have none) and "verbatim", whose "train" and
    "validation" entries come from `documents` (split -> documents from `sample_documents`)."""
    canary_result = None
    if canaries is not None:
        canary_result = evaluate_canaries(canaries, encode, score, greedy, settings.num_candidates, settings.seed)
    verbatim: dict[str, Any] = {"prefix_tokens": settings.prefix_tokens, "suffix_tokens": settings.suffix_tokens}
    for split, split_documents in documents.items():
        verbatim[split] = verbatim_extraction(split_documents, settings.prefix_tokens, settings.suffix_tokens, greedy)
    return {"canaries": canary_result, "verbatim": verbatim}


def _batched_greedy(run: Run, batch_size: int) -> GreedyTokens:
    generator = run_generator(run)

    def greedy(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        outputs: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            outputs += generator.generate(prompts[start : start + batch_size], max_new_tokens)
        return outputs

    return greedy


def evaluate_run_memorization(
    run: Run, data_dir: str | None = None, settings: Settings = Settings(), batch_size: int = 16
) -> dict[str, Any]:
    """`evaluate_memorization` of a loaded run on the data it was trained on (`data_dir`, default the run's
    config.data.path): canaries from its canaries.json, documents from its train/ and validation/ shards."""
    data_dir = data_dir or run.config.data.path
    if not data_dir:
        raise ValueError("The memorization task needs the run's training data: pass data_dir (none in its config).")
    window = settings.prefix_tokens + settings.suffix_tokens
    if window + 1 > context_length(run.model.cfg):
        raise ValueError(
            f"memorization prefix_tokens + suffix_tokens = {window} (+ BOS) exceeds the model's context of "
            f"{context_length(run.model.cfg)} tokens."
        )
    tokenizer = run.tokenizer
    canaries = read_canaries(data_dir)
    exclude = tokenizer.encode_batch(canaries.texts()) if canaries else []
    documents = {
        split: sample_documents(
            os.path.join(data_dir, split), settings.num_documents, window, tokenizer.bos_id, settings.seed, exclude
        )
        for split in ("train", "validation")
    }
    scorer = Scorer(run.model, tokenizer, batch_size, run.config.logical_axis_rules)
    result = evaluate_memorization(
        canaries,
        documents,
        lambda prefix, secret: encode_pair(tokenizer, f"{prefix} ", secret),  # the space goes to the secret
        scorer.score_tokens,
        _batched_greedy(run, batch_size),
        settings,
    )
    return {"data_dir": data_dir, **result}
