"""Exports a run as a Hugging Face model folder, or a LoRA run as a PEFT adapter with its base model.

    python scripts/export_hf.py --workdir=RUN --output=DIR [--dtype=float32|bfloat16] [--step=N] [--merge]
        [--overwrite]

DIR gets config.json, model.safetensors (or 5 GB shards with model.safetensors.index.json),
generation_config.json and the tokenizer files: `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads
it. RMSNorm + SwiGLU + RoPE runs (RoPE scaling included) export as LlamaForCausalLM, with model.qkv_bias as
Qwen2ForCausalLM, with model.qk_norm as Qwen3ForCausalLM; LayerNorm + GELU + learned positions + biases runs as
GPT2LMHeadModel. Configs without a Hugging Face equivalent are refused by key before anything is written. A
quantized run is refused: export its float source run (quantization.source_workdir) instead.

A LoRA run exports as a PEFT adapter (adapter_config.json, adapter_model.safetensors) with its base model, the
run's init_from, exported into DIR/base (the adapter's base_model_name_or_path): load it with
`peft.AutoPeftModelForCausalLM.from_pretrained(DIR)`; on a GPT-2 base, adapters of query, key or value (fused
into c_attn there) are refused by model.lora_targets. With --merge it exports as one model, the adapters merged
into the base weights. DIR is written as DIR.exporting and renamed when complete; --overwrite replaces only an
earlier export. --dtype defaults to the run's param_dtype.
"""

from absl import app, flags

from llm import checkpoint
from llm.hf import exporter, peft_adapters, safetensors_files

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (scripts/train.py, import_hf.py, ...).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write (must not exist unless --overwrite).", required=True)
_DTYPE = flags.DEFINE_enum(
    "dtype", None, list(safetensors_files.WRITE_DTYPES), "Dtype of the written weights (default: the run's)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_MERGE = flags.DEFINE_bool("merge", False, "LoRA runs: export one model with the adapters merged, not a PEFT adapter.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier export at --output.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        # Everything that can be wrong with the flags or the run, before any weight is read.
        exporter.check_output(_OUTPUT.value, _OVERWRITE.value)
        config = exporter.check_run(_WORKDIR.value, _STEP.value, _DTYPE.value)
        lora = config.train.trainable == "lora"
        if _MERGE.value and not lora:
            raise ValueError(
                f"--merge is for LoRA runs; {_WORKDIR.value!r} has train.trainable={config.train.trainable!r}."
            )
        if lora and not _MERGE.value:
            peft_adapters.check_adapters(config)  # Adapters of a fused tensor (GPT-2's c_attn) are refused.
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise app.UsageError(str(error)) from error
    checkpoint.quiet_orbax_logs()
    if lora and not _MERGE.value:
        written = peft_adapters.export_adapter(
            _WORKDIR.value, _OUTPUT.value, _DTYPE.value, _STEP.value, overwrite=_OVERWRITE.value
        )
        print(f"Exported the LoRA adapters of {_WORKDIR.value} to {written} (PEFT), its base to {written}/base.")
        return
    written = exporter.export_run(
        _WORKDIR.value, _OUTPUT.value, _DTYPE.value, _STEP.value, merge=_MERGE.value, overwrite=_OVERWRITE.value
    )
    merged = " (adapters merged)" if lora else ""
    print(f"Exported step {_STEP.value or 'latest'} of {_WORKDIR.value}{merged} to {written}.")


if __name__ == "__main__":
    app.run(main)
