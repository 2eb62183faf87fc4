"""Run metrics: metrics.jsonl and its trackers (TensorBoard here, MLflow in tracking.py), and the FLOP accounting
behind MFU."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import ml_collections
import tensorboardX

from llm import devices
from llm.model import layers, moe


def matmul_params(model: ml_collections.ConfigDict) -> int:
    """Parameters that take part in a matmul for every token: all projection kernels and the unembedding.

    Embedding lookups (token and learned positions) are gathers, not matmuls, and are not counted. In an MoE
    layer only the active parameters count: the router, the experts_per_token experts a token runs through and
    the shared experts.
    """
    head = layers.head_dim(model)
    attention = model.embed_dim * head * (2 * model.num_heads + 2 * model.num_kv_heads)
    matrices = 3 if model.mlp_activation == "swiglu" else 2
    dense_mlp = matrices * model.embed_dim * model.mlp_dim
    num_moe = model.num_layers // model.moe_every if model.num_experts else 0
    active_experts = model.experts_per_token + model.num_shared_experts
    moe_mlp = matrices * model.embed_dim * moe.expert_mlp_dim(model) * active_experts
    moe_mlp += model.embed_dim * model.num_experts  # the router
    mlp = (model.num_layers - num_moe) * dense_mlp + num_moe * moe_mlp
    return model.num_layers * attention + mlp + model.embed_dim * model.vocab_size


def train_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
    """Model FLOPs to train on one token (forward + backward = 3 x forward), the PaLM appendix B formula:

        6 * matmul_params + 6 * num_layers * seq_len * num_heads * head_dim

    The second term is the attention scores and weighted values (q k^T and a v, 2 FLOPs per multiply-add,
    4 * seq_len * heads * head_dim per layer and token), halved because a causal query sees on average
    half the keys. Rematerialization is not counted: this is model FLOPs, not hardware FLOPs.
    """
    attention = 6 * model.num_layers * seq_len * model.num_heads * layers.head_dim(model)
    return 6 * matmul_params(model) + attention


def peak_flops_per_device(configured_tflops: float = 0.0) -> float | None:
    """The configured peak, or the data-sheet peak of this device kind; None when unknown (e.g. CPU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    spec = devices.device_spec()
    return spec.peak_flops if spec else None


def mfu(tokens_per_sec: float, flops_per_token: float, peak_per_device: float | None) -> float | None:
    if peak_per_device is None:
        return None
    return tokens_per_sec * flops_per_token / (peak_per_device * jax.device_count())


class Throughput:
    """Tokens per second and MFU over the steps since the last `restart`.

    The trainer restarts it after the first step (which includes compilation) and after every log and
    evaluation, so the rates measure training steps alone.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self._tokens_per_step = config.train.batch_size * config.data.seq_len
        self._flops_per_token = train_flops_per_token(config.model, config.data.seq_len)
        self._peak = peak_flops_per_device(config.train.peak_tflops_per_device)
        self.restart()

    def restart(self) -> None:
        self._start, self._steps = time.perf_counter(), 0

    def step(self) -> None:
        self._steps += 1

    def rates(self) -> dict[str, float | None]:
        """{"tokens_per_sec", "mfu"}; None when no step was timed (or, for MFU, the peak is unknown)."""
        if not self._steps:
            return {"tokens_per_sec": None, "mfu": None}
        tokens_per_sec = self._tokens_per_step * self._steps / (time.perf_counter() - self._start)
        return {"tokens_per_sec": tokens_per_sec, "mfu": mfu(tokens_per_sec, self._flops_per_token, self._peak)}


class Tracker(Protocol):
    """Where logged scalars go besides metrics.jsonl: TensorBoard, MLflow (llm/train/tracking.py)."""

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, succeeded: bool) -> None: ...


class TensorBoardTracker:
    """Scalars as TensorBoard events in WORKDIR/tensorboard/."""

    def __init__(self, workdir: str):
        self._writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)

    def close(self, succeeded: bool) -> None:
        self._writer.close()


class MetricsWriter:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and passes its numbers to the trackers.

    Only process 0 writes. On resume, entries past the restored step (written by the interrupted run after
    its last checkpoint) are dropped so the file reads like one uninterrupted run. Used as a context manager,
    it closes the trackers with whether training ended normally (MLflow marks the run FINISHED or FAILED).
    """

    def __init__(self, workdir: str, resume_step: int = 0, trackers: Sequence[Tracker] = ()):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._trackers = list(trackers)
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run; close() closes it)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self._trackers:
            tracker.log(step, scalars)

    def close(self, succeeded: bool = True) -> None:
        if not self.enabled:
            return
        self._file.close()
        for tracker in self._trackers:
            tracker.close(succeeded)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        self.close(succeeded=exc_type is None)


def _plain(value: Any) -> Any:
    """JSON-friendly scalars; NaN and inf become null so the file stays valid JSON."""
    if value is None:
        return None
    value = float(value) if not isinstance(value, (int, str)) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value
