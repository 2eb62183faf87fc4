"""The frozen teacher of knowledge distillation (`train.objective="distill"`): checked, loaded, placed.

The teacher is any run directory (`train.teacher`): trained here, fully fine-tuned, LoRA, quantized or
imported from Hugging Face. The run loading code reads it (llm/runs/loading.py: a LoRA run comes with its
adapters merged, a quantized run quantized); it is then cast to `train.teacher_dtype`, optionally quantized to
int8 by Qwix as scripts/quantize.py does (`train.teacher_quantization`), and placed on the training mesh by the
one logical-axis rules table. It keeps a graph of its own, so it may be wider or deeper than the student: the
train step merges it from frozen["teacher"] and runs it on the same batch under stop_gradient. It gets no
optimizer state and no place in checkpoints; a resumed run loads it again.

Distillation compares the two models' next-token distributions id by id, so they must share the vocabulary:
`check_teacher` compares the two tokenizers piece by piece and names the first piece that differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from llm import checkpoint, sharding
from llm.config_validation import ConfigError
from llm.model.transformer import Transformer, context_length
from llm.quant import ptq
from llm.runs import build, directory, loading
from llm.tokenizer import AnyTokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A loaded teacher: its graph, and its parameters placed as `shardings` says (frozen["teacher"])."""

    graphdef: nnx.GraphDef
    params: nnx.State
    shardings: Any
    config: ml_collections.ConfigDict  # The teacher's run config as it runs (merged, cast, quantized).
    step: int  # The teacher's checkpoint step.


def check_teacher(config: ml_collections.ConfigDict, student_tokenizer: str | None) -> None:
    """Start-up checks, no device needed: distillation has a teacher run with a checkpoint, whose vocabulary
    (model and tokenizer) is the student's (`student_tokenizer`: the file of its data, else of init_from)."""
    train = config.train
    if train.objective != "distill":
        if train.teacher:
            raise ConfigError(
                f"config.train.teacher={train.teacher!r} is set but config.train.objective={train.objective!r}; "
                "a teacher is used only by config.train.objective='distill'."
            )
        return
    if not train.teacher:
        raise ConfigError("config.train.objective='distill' needs config.train.teacher (the teacher's run directory).")
    if not 0.0 <= train.distill_alpha <= 1.0:
        raise ConfigError(f"config.train.distill_alpha={train.distill_alpha} must be in [0, 1].")
    if not train.distill_temperature > 0:
        raise ConfigError(f"config.train.distill_temperature={train.distill_temperature} must be > 0.")
    if jax.process_count() > 1:
        # llm.runs.loading.load_model reads the teacher onto this host's devices only.
        raise ConfigError(
            f"config.train.teacher={train.teacher!r}: distillation runs on one host; this run has "
            f"{jax.process_count()} processes. Distil on one host, or from sequence-level data (README)."
        )
    try:
        teacher = directory.load_config(train.teacher)
        checkpoint.require_checkpoint(train.teacher)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"config.train.teacher={train.teacher!r}: {error}") from None
    _check_teacher_model(config, teacher)
    _check_same_tokenizer(student_tokenizer, _tokenizer_of(train.teacher, teacher))


def _check_teacher_model(config: ml_collections.ConfigDict, teacher: ml_collections.ConfigDict) -> None:
    where = f"the teacher config.train.teacher={config.train.teacher!r}"
    if teacher.model.vocab_size != config.model.vocab_size:
        raise ConfigError(
            f"{where} has model.vocab_size={teacher.model.vocab_size} but the student config.model.vocab_size="
            f"{config.model.vocab_size}: distillation compares the two distributions id by id."
        )
    if context_length(teacher.model) < config.data.seq_len:
        raise ConfigError(
            f"{where} reads at most {context_length(teacher.model)} tokens, fewer than config.data.seq_len="
            f"{config.data.seq_len}."
        )
    if config.train.teacher_quantization != "none" and ptq.is_quantized(teacher):
        raise ConfigError(
            f"{where} is already quantized ({teacher.quantization.mode}); set config.train.teacher_quantization="
            "'none' or give the float run it was made from."
        )


def _tokenizer_of(run_dir: str, config: ml_collections.ConfigDict) -> str | None:
    try:
        return directory.find_tokenizer(run_dir, config)
    except FileNotFoundError:
        return None


def _check_same_tokenizer(student: str | None, teacher: str | None) -> None:
    if student is None and teacher is None:
        return  # Data made without a tokenizer (bare token ids): the model vocabularies were compared.
    if student is None or teacher is None:
        missing, other = ("the student", teacher) if student is None else ("the teacher", student)
        raise ConfigError(
            f"Cannot check that teacher and student share a tokenizer: {missing} has none (the other has {other!r})."
        )
    check_same_pieces(load_tokenizer(student), load_tokenizer(teacher))


def check_same_pieces(student: AnyTokenizer, teacher: AnyTokenizer) -> None:
    """Raises ConfigError unless every id is the same piece in both tokenizers, naming the first id that is not
    (with both pieces; an id beyond a vocabulary's end reads as None)."""
    for token_id in range(max(student.vocab_size, teacher.vocab_size)):
        mine = student.piece(token_id) if token_id < student.vocab_size else None
        theirs = teacher.piece(token_id) if token_id < teacher.vocab_size else None
        if mine != theirs:
            raise ConfigError(
                f"The teacher's tokenizer {teacher.path!r} differs from the student's {student.path!r} at id "
                f"{token_id}: the student's piece is {mine!r}, the teacher's {theirs!r}. Distillation compares the "
                "two models' next-token distributions id by id, so they must share the tokenizer."
            )


def load_teacher(config: ml_collections.ConfigDict, mesh: Mesh) -> Teacher:
    """The teacher of `config.train.teacher` (latest checkpoint), as configured, placed on `mesh` by the run's
    logical-axis rules."""
    model, teacher_config, step = loading.load_model(config.train.teacher, mesh_shape=config.mesh_shape)
    model, teacher_config = _as_configured(model, teacher_config, config.train)
    graphdef, params = nnx.split(model)
    shardings = sharding.tree_shardings(params, mesh, config.logical_axis_rules)
    return Teacher(graphdef, jax.device_put(params, shardings), shardings, teacher_config, step)


def _as_configured(
    model: Transformer, config: ml_collections.ConfigDict, train: ml_collections.ConfigDict
) -> tuple[Transformer, ml_collections.ConfigDict]:
    """The loaded teacher in `train.teacher_dtype` (parameters and compute), quantized if asked."""
    dtype = train.teacher_dtype
    if (config.model.dtype, config.model.param_dtype) != (dtype, dtype):
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.update(dtype=dtype, param_dtype=dtype)
        # The compute dtype is part of the graph: rebuild it, and cast each parameter to its new dtype there.
        graphdef, target = nnx.split(nnx.eval_shape(lambda: _structure(config)))
        cast = jax.tree.map(lambda x, t: x.astype(t.dtype), nnx.state(model), target)
        model = nnx.merge(graphdef, cast)
    if train.teacher_quantization != "none":
        qconfig = ptq.QuantConfig(train.teacher_quantization)
        model, config = ptq.quantize_model(model, qconfig), ptq.quantized_config(config, qconfig)
    return model, config


def _structure(config: ml_collections.ConfigDict) -> Transformer:
    """The model `loading.load_model` returns for a run config it returned (a soft prompt stays on its base)."""
    return ptq.model_from_config(config) if config.train.trainable == "all" else build.trained_model(config, None)
