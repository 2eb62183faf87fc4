"""Imports a PEFT LoRA adapter as a LoRA run on an existing run (e.g. one made by scripts/import_hf.py).

    python scripts/import_peft.py --adapter_dir=PEFT_DIR --base_run=RUN --output=LORA_RUN [--overwrite]

PEFT_DIR holds adapter_config.json and adapter_model.safetensors, trained on the model RUN was imported from.
LORA_RUN gets a config with the adapter's rank, alpha, dropout and targets, init_from=RUN, trainable "lora", and
one checkpoint with the adapters: sample, evaluate or serve it, merge it (scripts/merge_lora.py), or continue
training it. RUN may be a mixture of experts (Mixtral, Qwen3-MoE): the experts' adapters are read per expert
(target_modules w1 / gate_proj ..., as transformers 4 and our export name them) or fused (target_parameters
gate_up_proj / down_proj, as PEFT saves adapters of transformers 5's experts). Adapter features our LoRA lacks
(DoRA, rsLoRA, biases, modules_to_save, per-layer ranks...) are refused by their adapter_config.json key.
"""

from absl import app, flags

from llm import checkpoint
from llm.hf import importer, peft_import

_ADAPTER_DIR = flags.DEFINE_string("adapter_dir", None, "PEFT adapter folder (local).", required=True)
_BASE_RUN = flags.DEFINE_string("base_run", None, "Run directory of the adapter's base model.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "LoRA run directory to write.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing run directory at --output.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        importer.check_output(_OUTPUT.value, _OVERWRITE.value)
        settings = peft_import.read_adapter_config(_ADAPTER_DIR.value)
        config, _ = peft_import.lora_run_config(settings, _BASE_RUN.value)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise app.UsageError(str(error)) from error
    checkpoint.quiet_orbax_logs()
    run_dir = peft_import.import_adapter(_ADAPTER_DIR.value, _BASE_RUN.value, _OUTPUT.value, _OVERWRITE.value)
    model = config.model
    print(f"Imported {_ADAPTER_DIR.value} as the LoRA run {run_dir}: rank {model.lora_rank}, alpha "
          f"{model.lora_alpha}, targets {model.lora_targets!r}, on {config.init_from}.")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
