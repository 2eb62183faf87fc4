"""A Hugging Face checkpoint directory -> an ordinary run directory (config.json, checkpoint at step 0).

The run is then used like any trained run: `init_from` for fine-tuning, sampling, evaluation, serving. The
HF tokenizer files are copied in unchanged beside config.json (the run has no tokenizer.model). The supported
architectures are those of `llm.hf.architectures.ARCHITECTURES`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import ml_collections

from configs import base
from llm import config_validation, io, sharding
from llm.hf import architectures, weights
from llm.hf_tokenizer import COMPANION_FILES, TOKENIZER_JSON
from llm.runs import directory

# Copied unchanged into the run when present: what loading the HF tokenizer and its chat template needs.
TOKENIZER_FILES = (TOKENIZER_JSON, *COMPANION_FILES)
# Packed training rows default to the model's context, capped: longer rows rarely pay for their memory.
MAX_DATA_SEQ_LEN = 2048
DTYPES = ("float32", "bfloat16")


def read_hf_config(model_dir: str) -> dict:
    """MODEL_DIR/config.json as a dict; a missing directory or file is named."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"Model directory {model_dir!r} does not exist.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: a Hugging Face model directory has a config.json.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_config(hf_config: dict, dtype: str = "float32", scan_layers: bool = False) -> ml_collections.ConfigDict:
    """configs/base.py defaults with the converted model keys; stored and computed in `dtype`, the blocks
    stacked and scanned with `scan_layers` (model.scan_layers). Validated.

    The mesh stays the default: the import's mesh is where the weights are streamed, not a choice for the runs
    that start from them."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}.")
    config = base.get_config()
    config.model.update(architectures.model_keys(hf_config))
    config.model.update(dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    config.data.seq_len = min(config.model.max_seq_len, MAX_DATA_SEQ_LEN)
    config.train.trainable = "all"
    config_validation.validate(config)
    return config


def check_output(output_dir: str, overwrite: bool) -> str:
    """The absolute output path; an existing one is replaced only with `overwrite`, and only if it is a run
    directory (has config.json): a mistyped path must not delete anything else."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir!r} already exists; choose another directory or overwrite it.")
    if os.path.exists(output_dir) and not os.path.isfile(os.path.join(output_dir, directory.CONFIG_FILE)):
        raise FileExistsError(f"{output_dir!r} exists and is not a run directory; refusing to overwrite it.")
    return output_dir


def check_tokenizer(model_dir: str) -> None:
    """Refuses a model directory without tokenizer.json: nearly every tool needs the run's tokenizer. A
    directory with only a SentencePiece tokenizer.model (a "slow" tokenizer) is told how to convert it."""
    if os.path.isfile(os.path.join(model_dir, TOKENIZER_JSON)):
        return
    hint = (
        " It has only the slow tokenizer.model: write tokenizer.json with transformers, "
        "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)."
        if os.path.isfile(os.path.join(model_dir, "tokenizer.model"))
        else ""
    )
    raise FileNotFoundError(
        f"{os.path.join(model_dir, TOKENIZER_JSON)!r} not found: the run would have no tokenizer.{hint} "
        "(--weights_only imports the weights alone.)"
    )


def import_hf(
    model_dir: str,
    output_dir: str,
    dtype: str = "float32",
    mesh_shape: Sequence[int] = (1, -1, 1),
    overwrite: bool = False,
    scan_layers: bool = False,
) -> str:
    """Writes the run directory `output_dir` from the HF checkpoint in `model_dir`; returns its absolute path.

    Unsupported architectures and config keys are refused before any weight is read. The run appears
    complete or not at all: it is assembled in OUTPUT.importing and renamed at the end. With `scan_layers` the
    run's blocks are stacked (model.scan_layers: compile time flat in depth); it computes the same function.
    """
    output_dir = check_output(output_dir, overwrite)
    hf_config = read_hf_config(model_dir)
    config = run_config(hf_config, dtype, scan_layers)
    mesh = sharding.create_mesh(mesh_shape)
    with sharding.use_mesh(mesh, config.logical_axis_rules):
        model = weights.load_model(model_dir, architectures.architecture(hf_config), config, mesh)
        staging = output_dir + ".importing"
        shutil.rmtree(staging, ignore_errors=True)
        directory.save_run(staging, config, "", step=0, model=model)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(staging, name))
    io.replace_dir(staging, output_dir)
    return output_dir
