"""Imports a Hugging Face checkpoint (safetensors) as an ordinary run directory: LlamaForCausalLM (Llama 2 and 3,
with Llama 3.x "llama3" or "linear" RoPE scaling), MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and
GPT2LMHeadModel.

    python scripts/import_hf.py --model_dir=DIR --output=RUN_DIR [--dtype=float32|bfloat16] [--scan_layers]
        [--overwrite] [--weights_only]

DIR is a local model directory (config.json, model.safetensors or sharded model-*.safetensors with
model.safetensors.index.json, tokenizer files). RUN_DIR gets config.json, a checkpoint at step 0 and the
tokenizer files unchanged; it serves as `init_from` for fine-tuning like any trained run. --scan_layers stacks
the blocks (config.model.scan_layers: compile time independent of depth, for deep models). A DIR without
tokenizer.json is refused unless --weights_only: a run without a tokenizer can only be an `init_from` for training
on data tokenized elsewhere.
"""

import os

from absl import app, flags

from llm import checkpoint
from llm.hf import importer

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Hugging Face model directory (local).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Run directory to write.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(importer.DTYPES), "Parameter and compute dtype of the run.")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False, "Stack the blocks and run them with lax.scan.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing run directory at --output.")
_WEIGHTS_ONLY = flags.DEFINE_bool("weights_only", False, "Import a DIR that has no tokenizer.json.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        # Everything that can be wrong with the flags or the checkpoint's config, before any weight is read.
        importer.check_output(_OUTPUT.value, _OVERWRITE.value)
        config = importer.run_config(importer.read_hf_config(_MODEL_DIR.value), _DTYPE.value, _SCAN_LAYERS.value)
        if not _WEIGHTS_ONLY.value:
            importer.check_tokenizer(_MODEL_DIR.value)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise app.UsageError(str(error)) from error
    checkpoint.quiet_orbax_logs()
    run_dir = importer.import_hf(
        _MODEL_DIR.value, _OUTPUT.value, _DTYPE.value, overwrite=_OVERWRITE.value, scan_layers=_SCAN_LAYERS.value
    )
    model = config.model
    print(
        f"Imported {os.path.abspath(_MODEL_DIR.value)} into {run_dir}: {model.num_layers} layers, "
        f"embed {model.embed_dim}, {model.num_heads}/{model.num_kv_heads} heads, vocab {model.vocab_size}, "
        f"context {model.max_seq_len}, {_DTYPE.value}."
    )


if __name__ == "__main__":
    app.run(main)
