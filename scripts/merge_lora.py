"""Merges a LoRA or QLoRA run's adapters into its base weights and writes a standalone run directory.

    python scripts/merge_lora.py --workdir=runs/lora_es --output=runs/lora_es_merged

A QLoRA run's adapters are merged into its dequantized int4 base (what they were trained against), in float.

The output holds config.json (the architecture without adapters), tokenizer.model and one checkpoint
with the merged parameters: load it for inference, serve it, quantize it, or start further fine-tuning
from it with --config.init_from. It carries no optimizer state, so it is not a run to resume.
"""

import os

from absl import app, flags

from llm import checkpoint
from llm.runs import directory, loading

_WORKDIR = flags.DEFINE_string("workdir", None, "LoRA or QLoRA run directory (train.trainable='lora').", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the merged run (must not exist).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = directory.load_config(_WORKDIR.value)
    if config.train.trainable != "lora":
        raise app.UsageError(
            f"--workdir={_WORKDIR.value!r} is not a LoRA run (train.trainable="
            f"{config.train.trainable!r}); its checkpoints already hold full weights."
        )
    if os.path.exists(_OUTPUT.value):
        raise app.UsageError(f"--output={_OUTPUT.value!r} already exists; choose a new directory.")
    checkpoint.quiet_orbax_logs()
    run = loading.load_run(_WORKDIR.value, _STEP.value)  # Loads base + adapters and merges them.
    merged_config = run.config
    merged_config.update(init_from="")
    merged_config.train.trainable = "all"
    directory.save_run(_OUTPUT.value, merged_config, run.tokenizer.path, run.step, run.model)
    print(f"Merged step {run.step} of {_WORKDIR.value} into {_OUTPUT.value}.")


if __name__ == "__main__":
    app.run(main)
