"""Post-training quantization of a trained run with Qwix, saved as a run directory of its own.

    python scripts/quantize.py --workdir=runs/tiny_es --mode=int8|int4|int8_act [--output=QDIR]
        [--group_size=128] [--kv_cache=int8] [--step=N] [--overwrite]

The output (default WORKDIR-MODE) holds config.json, tokenizer.model and an Orbax checkpoint of the
quantized parameters; sample.py, chat.py, evaluate.py and `benchmark.py decode` accept it as --workdir.
Prints the parameter memory and the checkpoint size on disk next to the original's.
"""

import os

from absl import app, flags

from llm import checkpoint
from llm.quant import ptq
from llm.runs import directory, loading, quantized_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by scripts/train.py.", required=True)
_MODE = flags.DEFINE_string("mode", None, f"Quantization mode: {', '.join(ptq.MODES)}.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory of the quantized run (default: WORKDIR-MODE).")
_GROUP_SIZE = flags.DEFINE_integer(
    "group_size", ptq.DEFAULT_GROUP_SIZE, "int4: inputs sharing one scale (0: one scale per output channel)."
)
_KV_CACHE = flags.DEFINE_string(
    "kv_cache", "auto", "KV cache dtype when decoding: auto (the compute dtype) or int8 (one scale per token and head)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to quantize (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing quantized run at --output.")

MB = 1e6


def _checked_output() -> str:
    """Everything that can be wrong with the flags, found before the model is loaded; returns the output."""
    ptq.QuantConfig(_MODE.value, _GROUP_SIZE.value, _KV_CACHE.value)
    workdir = _WORKDIR.value.rstrip("/")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir!r} does not exist.")
    config = directory.load_config(workdir)
    if ptq.is_quantized(config):
        raise ValueError(
            f"--workdir={workdir!r} is already quantized ({config.quantization.mode}); "
            "quantize the float run it came from."
        )
    checkpoint.require_checkpoint(workdir, _STEP.value)
    output = _OUTPUT.value or f"{workdir}-{_MODE.value}"
    if os.path.exists(output) and not _OVERWRITE.value:
        raise FileExistsError(f"--output={output!r} already exists; choose another or pass --overwrite.")
    if os.path.exists(output) and not quantized_run.is_quantized_dir(output):
        raise FileExistsError(f"--output={output!r} exists and is not a quantized run; refusing to overwrite it.")
    return output


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        output = _checked_output()
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise app.UsageError(str(error)) from error
    checkpoint.quiet_orbax_logs()
    run = loading.load_run(_WORKDIR.value, _STEP.value)
    quantized = quantized_run.quantize_run(run, _MODE.value, _GROUP_SIZE.value, _KV_CACHE.value)
    quantized_run.save_quantized_run(quantized, output, overwrite=_OVERWRITE.value)

    float_bytes, quantized_bytes = ptq.parameter_bytes(run.model), ptq.parameter_bytes(quantized.model)
    step_dir = str(run.step)
    float_disk = quantized_run.directory_bytes(os.path.join(run.workdir, "checkpoints", step_dir))
    quantized_disk = quantized_run.directory_bytes(os.path.join(output, "checkpoints", step_dir))
    print(
        f"Quantized {run.workdir} (step {run.step}) into {output}: mode {_MODE.value}"
        + (f", int4 groups of {_GROUP_SIZE.value}" if _MODE.value == "int4" else "")
        + f", KV cache {_KV_CACHE.value}."
    )
    print(f"{'':28}{'float':>12}{_MODE.value:>12}{'ratio':>8}")
    print(
        f"{'parameter memory (MB)':28}{float_bytes / MB:12.2f}{quantized_bytes / MB:12.2f}"
        f"{float_bytes / quantized_bytes:7.2f}x"
    )
    # The training checkpoint also holds the optimizer's two moments: about 3x its parameters.
    print(
        f"{'checkpoint on disk (MB)':28}{float_disk / MB:12.2f}{quantized_disk / MB:12.2f}"
        f"{float_disk / quantized_disk:7.2f}x  (float: parameters + optimizer state)"
    )
    print(
        "Quantized parameters by dtype (MB): "
        + ", ".join(f"{dtype} {size / MB:.2f}" for dtype, size in ptq.parameter_bytes_by_dtype(quantized.model).items())
    )


if __name__ == "__main__":
    app.run(main)
