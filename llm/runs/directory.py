"""The files of a run directory, read and written in one place.

    RUN/config.json        the resolved config (configs/base.py keys; a key added later reads as its default)
    RUN/tokenizer.model    a copy of the tokenizer, so the directory is self-contained; a run imported from
                           Hugging Face has tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)
    RUN/checkpoints/STEP/  Orbax checkpoints (llm/checkpoint.py)
    RUN/metrics.jsonl, RUN/tensorboard/   written by training (llm/train/metrics.py)

Training writes the first two at start-up and checkpoints as it goes; a quantized or merged copy of a run is
written whole by `save_run`, into RUN.partial first and renamed at the end, so an interrupted save never
leaves a half-written run behind.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_collections
from flax import nnx

from configs import base
from llm import checkpoint, hf_tokenizer, io, tokenizer as tokenizer_lib

CONFIG_FILE = "config.json"
SENTENCEPIECE_FILE = tokenizer_lib.SENTENCEPIECE_FILE
# Either backend's file (llm.tokenizer.load_tokenizer loads both); a directory holds one of them.
TOKENIZER_FILES = (SENTENCEPIECE_FILE, hf_tokenizer.TOKENIZER_JSON)


def config_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values (tuples become lists): what config.json and checkpoints hold."""
    return json.loads(config.to_json())


def load_config(run_dir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to RUN/config.json, over the defaults of configs/base.py.

    A run written before a key existed gets the key's default, which is what it ran with.
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} not found: the directory must be a run written by scripts/train.py.")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return ml_collections.ConfigDict(over_defaults(saved))


def over_defaults(saved: dict) -> dict:
    """A saved config (plain JSON values) with every key it lacks set to its configs/base.py default."""
    return _merged(config_dict(base.get_config()), saved)


def _merged(defaults: dict, saved: dict) -> dict:
    merged = dict(defaults)
    for key, value in saved.items():
        nested = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        merged[key] = _merged(defaults[key], value) if nested else value
    return merged


def tokenizer_in(source_dir: str) -> str | None:
    """The tokenizer file (tokenizer.model or tokenizer.json) in a run or data directory; None if none."""
    for name in TOKENIZER_FILES:
        path = os.path.join(source_dir, name)
        if os.path.exists(path):
            return path
    return None


def find_tokenizer(run_dir: str, config: ml_collections.ConfigDict) -> str:
    """RUN's tokenizer file, or the one in the run's data directory (runs written before the copy existed)."""
    for source_dir in (run_dir, config.data.path):
        path = tokenizer_in(source_dir)
        if path:
            return path
    raise FileNotFoundError(
        f"No {' or '.join(TOKENIZER_FILES)} in {run_dir!r} or in the run's data directory {config.data.path!r}."
    )


def chat_tuned(config: ml_collections.ConfigDict) -> bool:
    """Whether a run with this config is chat-tuned: its config says so, its training data are chat rows
    (their report.json, written by scripts/prepare_sft.py or prepare_dpo.py, says "format": "chat"), or it
    continues a chat-tuned run."""
    report_path = os.path.join(config.data.path, "report.json")
    if config.data.path and os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as f:
            if json.load(f).get("format") == "chat":
                return True
    return config.chat or bool(config.init_from and load_config(config.init_from).chat)


def write_run_files(run_dir: str, config: ml_collections.ConfigDict, tokenizer_path: str | None) -> None:
    """Writes RUN/config.json and, when given, the copy of the tokenizer's files; each file atomically."""
    os.makedirs(run_dir, exist_ok=True)
    io.write_json(os.path.join(run_dir, CONFIG_FILE), config_dict(config))
    if not tokenizer_path:
        return
    tokenizer_lib.copy_tokenizer(tokenizer_path, run_dir)


def save_run(
    run_dir: str,
    config: ml_collections.ConfigDict,
    tokenizer_path: str,
    step: int,
    model: nnx.Module,
    overwrite: bool = False,
) -> None:
    """Writes a whole run directory (config, tokenizer, one checkpoint of the model's parameters) atomically.

    An existing `run_dir` is replaced only with `overwrite` (the caller checks that it may be), and only once
    the new one is complete.
    """
    save_params(run_dir, config, tokenizer_path, step, nnx.state(model, nnx.Param), overwrite)


def save_params(
    run_dir: str,
    config: ml_collections.ConfigDict,
    tokenizer_path: str | None,
    step: int,
    params: nnx.State,
    overwrite: bool = False,
) -> None:
    """`save_run` for parameters: the whole model's, or what a LoRA or prompt-tuning run trains (its base
    comes from `config.init_from`, as with training's checkpoints)."""
    run_dir = os.path.abspath(run_dir)
    if os.path.exists(run_dir) and not overwrite:
        raise FileExistsError(f"{run_dir!r} already exists; choose another directory.")
    partial = run_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_run_files(partial, config, tokenizer_path)
    saver = checkpoint.Checkpointer(os.path.join(partial, "checkpoints"), keep=1, compress=False)
    try:
        # A saved (not trained) run has no data-loader position: its data item is empty.
        saver.save(step, {"params": params}, {}, config_dict(config))
        saver.wait()
    finally:
        saver.close()
    io.replace_dir(partial, run_dir)
