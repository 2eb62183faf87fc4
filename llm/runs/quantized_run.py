"""Quantized runs: quantize a loaded run on the fly, save it as a directory of its own, load it back.

A quantized directory (QDIR) looks like a training run to every tool that reads one:

    QDIR/config.json         the run config, with model.scan_layers off, model.kv_cache_dtype, and a
                             `quantization` section (mode, group_size, source workdir and step)
    QDIR/tokenizer.model     a copy of the run's tokenizer (tokenizer.json and its config files for a run
                             imported from Hugging Face)
    QDIR/checkpoints/STEP/   Orbax: the quantized parameters (int8/int4 values and float32 scales) only

so `llm.runs.loading.load_run(QDIR)` (and with it scripts/sample.py, chat.py and evaluate.py) returns
the quantized model: it rebuilds the quantized structure abstractly (`ptq.model_from_config` under
nnx.eval_shape: nothing materialized) and restores the arrays onto it, sharded by their logical axes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from llm.quant import ptq
from llm.runs import directory
from llm.runs.loading import Run, load_run


def quantize_run(run: Run, mode: str, group_size: int = ptq.DEFAULT_GROUP_SIZE, kv_cache: str = "auto") -> Run:
    """The run with its model quantized in memory (the float run is left untouched)."""
    qconfig = ptq.QuantConfig(mode, group_size, kv_cache)
    config = ptq.quantized_config(run.config, qconfig)
    config.quantization.update(source_workdir=os.path.abspath(run.workdir), source_step=run.step)
    return Run(ptq.quantize_model(run.model, qconfig), config, run.tokenizer, run.step, run.workdir)


def save_quantized_run(run: Run, qdir: str, overwrite: bool = False) -> None:
    """Writes a run returned by `quantize_run` to `qdir` (see the module docstring).

    The directory is written atomically (`directory.save_run`). An existing QDIR is replaced only with
    `overwrite`, and only if it is itself a quantized run.
    """
    if not ptq.is_quantized(run.config):
        raise ValueError("save_quantized_run needs a quantized run (from quantize_run).")
    qdir = os.path.abspath(qdir)
    if os.path.exists(qdir):
        if not overwrite:
            raise FileExistsError(
                f"{qdir!r} already exists; choose another output or pass overwrite=True (--overwrite)."
            )
        if not is_quantized_dir(qdir):
            raise FileExistsError(f"{qdir!r} exists and is not a quantized run; refusing to overwrite it.")
    directory.save_run(qdir, run.config, run.tokenizer.path, run.step, run.model, overwrite=overwrite)


def is_quantized_dir(path: str) -> bool:
    """Whether `path` holds a run written by `save_quantized_run`."""
    if not os.path.isfile(os.path.join(path, directory.CONFIG_FILE)):
        return False
    return ptq.is_quantized(directory.load_config(path))


def load_quantized_run(qdir: str, step: int | None = None, mesh_shape: Sequence[int] = (1, -1, 1)) -> Run:
    """Restores a quantized directory onto a mesh of the local devices; `run.model` is the quantized model.

    Same as `load_run(qdir)`, which recognises quantized runs itself, but refuses a float run.
    """
    if not is_quantized_dir(qdir):
        raise ValueError(
            f"{qdir!r} is not a quantized run (its config.json has no quantization.mode); "
            "write one with scripts/quantize.py."
        )
    return load_run(qdir, step, mesh_shape)


def load_source_run(run: Run, mesh_shape: Sequence[int] = (1, -1, 1)) -> Run:
    """The float run a quantized run was made from (its workdir and step), for side-by-side comparisons."""
    source = run.config.quantization
    return load_run(source.source_workdir, source.source_step, mesh_shape)


def directory_bytes(path: str) -> int:
    """Total size of the files under `path` (e.g. a checkpoint directory)."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
