"""How a run starts: its config checked, its state resumed from the workdir's latest checkpoint or fresh
(from the weights of `init_from` when set), then its config recorded in the workdir."""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections

from llm import checkpoint, config_validation
from llm.data import loader
from llm.runs import directory
from llm.tokenizer import load_tokenizer
from llm.train import inputs, step as step_lib, teacher as teacher_lib, tracking

# Model keys that change how the model runs, not what it computes or holds: a run may set them anew.
RUNTIME_MODEL_KEYS = ("dropout_rate", "remat_policy", "scan_layers", "attention_impl", "dtype")


def checked_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config after every check that needs no device (so a typo costs a second, not a compilation);
    a run whose data or `init_from` are chat becomes a chat run."""
    config_validation.validate(config)
    tracking.check_config(config)
    inputs.check_data_path(config)
    check_init_from(config)
    check_vocabulary(config)
    teacher_lib.check_teacher(config, _tokenizer_source(config))
    if not config.chat and directory.chat_tuned(config):
        config = ml_collections.ConfigDict(config.to_dict())
        config.chat = True  # Recorded in config.json, so every tool prompts the run through the chat template.
    return config


def write_run_files(config: ml_collections.ConfigDict, workdir: str) -> None:
    """WORKDIR/config.json and the tokenizer, once the run is known to be this workdir's (`restore_or_init`)."""
    if jax.process_index() == 0:
        # A run directory is self-contained: inference and evaluation find the tokenizer next to the weights.
        directory.write_run_files(workdir, config, _tokenizer_source(config))


def check_vocabulary(config: ml_collections.ConfigDict) -> None:
    """The model must have an embedding for every id of the tokenizer its data were made with (or its
    `init_from`'s): a larger id would be clipped to the last row in silence, not refused."""
    path = _tokenizer_source(config)
    vocab = path and load_tokenizer(path).vocab_size
    if vocab and vocab > config.model.vocab_size:
        raise config_validation.ConfigError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the {vocab} ids of the tokenizer "
            f"{path!r}; set config.model.vocab_size >= {vocab}."
        )


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """`init_from` must be a full run whose model is this one's (adapters and runtime settings aside)."""
    if not config.init_from:
        return
    try:
        source = directory.load_config(config.init_from)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"config.init_from={config.init_from!r}: {error}") from None
    if source.train.trainable != "all":
        raise config_validation.ConfigError(
            f"config.init_from={config.init_from!r} is a {source.train.trainable} run whose checkpoints hold only "
            "what it trained; start from a full run (a LoRA run can be merged first: scripts/merge_lora.py)."
        )
    config_validation.require_same(
        {"model": directory.config_dict(source)["model"]},
        {"model": directory.config_dict(config)["model"]},
        source=f"the run in config.init_from={config.init_from!r}",
        advice="fine-tuning keeps the pretrained architecture.",
        ignore=_adapter_or_runtime_key,
    )


def _adapter_or_runtime_key(key: str) -> bool:
    name = key.removeprefix("model.")
    return name.startswith("lora_") or name == "soft_prompt_length" or name in RUNTIME_MODEL_KEYS


def restore_or_init(
    config: ml_collections.ConfigDict,
    steps: step_lib.Steps,
    checkpointer: checkpoint.Checkpointer,
    data: loader.TrainIterator,
    teacher: teacher_lib.Teacher | None = None,
) -> tuple[int, step_lib.TrainState, step_lib.Frozen]:
    """(start step, train state, frozen parameters): the workdir's latest checkpoint, data position included,
    or step 0. Frozen parameters (the pretrained base, the DPO reference, the distillation `teacher`, loaded
    by the caller) are rebuilt, never checkpointed."""
    base = _load_base_params(config, steps.abstract_base)
    start = checkpointer.latest_step()
    if start is None:
        state, frozen = steps.init(base)
        return 0, state, _with_teacher(frozen, teacher)
    config_validation.require_same(
        # A run saved before a config key existed ran with its default.
        _identity(directory.over_defaults(checkpointer.restore_config(start))),
        _identity(directory.config_dict(config)),
        source="the config saved with the workdir's checkpoint",
        advice="the workdir holds another run: use a new --workdir, or restore the saved value.",
    )
    frozen = steps.init_frozen(base)
    state, data_state, _ = checkpointer.restore(start, steps.abstract_state)
    data.set_state(data_state)
    logging.info("Resumed from step %d in %s.", start, checkpointer.directory)
    return start, state, _with_teacher(frozen, teacher)


def _with_teacher(frozen: step_lib.Frozen, teacher: teacher_lib.Teacher | None) -> step_lib.Frozen:
    return frozen if teacher is None else {**frozen, "teacher": teacher.params}


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes a run the same run on resume: its architecture and its seed (data order, dropout)."""
    return {"model": config.get("model", {}), "seed": config.get("seed")}


def _load_base_params(config: ml_collections.ConfigDict, abstract_base: Any) -> Any:
    """The parameters of `init_from`'s latest checkpoint, placed as `abstract_base` says; None without it."""
    if not config.init_from:
        return None
    params, step = checkpoint.restore_run_params(config.init_from, abstract_base)
    logging.info("Initialized from step %d of %s.", step, config.init_from)
    return params


def _tokenizer_source(config: ml_collections.ConfigDict) -> str | None:
    """The tokenizer of the training data, else that of the `init_from` run; None if neither has one."""
    for source_dir in (config.data.path, config.init_from):
        path = source_dir and directory.tokenizer_in(source_dir)
        if path:
            return path
    return None
