"""Every config key with its default, documented once. Recipes start from `get_config()` and override.

Any key may be overridden from the command line, e.g. `--config.model.num_layers=4`. This file is the schema
that `llm/config_validation.py` checks every config against before a run starts: a key it lacks is refused, a
value must have its default's type, and a choice key must take one of its `CHOICES`.
"""

import ml_collections

# Logical axis -> mesh axes. The single sharding table of the project (MaxText style): model code names
# the logical axes of each parameter and activation, this table decides where they live on the mesh.
# Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded, ZeRO-3 style),
# `tensor` (Megatron-style tensor parallel).
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    # The KV cache of generation has no names of its own: it is split by batch, kv_heads, length and head_dim, as
    # the keys and values it stores are (other names would reshard it at every decoding step).
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # Mixture of experts: the experts of a layer are split over the fsdp devices (expert parallelism), so the
    # embed axis of the experts' weights, `expert_embed`, stays unsplit (a mesh axis may be used once per array).
    ("expert", "fsdp"),
    ("expert_embed", None),
)

# The allowed values of every choice key; the code that dispatches on a key has exactly these cases (tested).
CHOICES = {
    "model.mlp_activation": ("gelu", "swiglu"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.position_encoding": ("rope", "learned", "sinusoidal"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.remat_policy": ("none", "full", "save_dots"),
    "model.attention_impl": ("auto", "xla", "blocked", "cudnn", "splash"),
    "model.kv_cache_dtype": ("auto", "int8"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.moe_impl": ("dropless", "megablox", "masked"),
    "optimizer.schedule": ("cosine", "linear", "constant"),
    "train.objective": ("lm", "dpo", "contrastive", "distill"),
    "train.contrastive_pooling": ("mean", "last"),
    "train.trainable": ("all", "lora", "soft_prompt"),
    "train.quantize_base": ("none", "int8", "int4"),
    "train.teacher_dtype": ("float32", "bfloat16"),
    "train.teacher_quantization": ("none", "int8"),
    "quantization.mode": ("none", "int8", "int4", "int8_act"),
}

# Keys whose value is a comma-separated list of these values (checked at start-up by llm/train/tracking.py).
LIST_CHOICES = {
    "train.trackers": ("tensorboard", "mlflow"),
}


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seeds parameter init, data order and dropout; a resumed run reuses it.
    # A run directory (scripts/train.py) whose latest checkpoint gives the starting weights: fine-tuning,
    # LoRA, DPO and continued pretraining. The model config must match it (LoRA settings aside).
    config.init_from = ""
    # Chat-tuned: every tool prompts the run through the chat template (llm/chat_template.py). Training sets
    # it when its data are chat rows (scripts/prepare_sft.py, prepare_dpo.py) or init_from is chat-tuned.
    config.chat = False

    # Devices form a (data, fsdp, tensor) mesh; one entry may be -1 ("all remaining devices").
    config.mesh_shape = (1, -1, 1)
    config.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES  # See DEFAULT_LOGICAL_AXIS_RULES above.

    config.model = model = ml_collections.ConfigDict()
    model.vocab_size = 32000  # Must cover every id of the tokenizer (pad, bos, eos, unk, chat markers included).
    model.max_seq_len = 1024  # Longest context; sizes the learned position table and bounds RoPE positions.
    model.num_layers = 12  # Transformer blocks.
    model.embed_dim = 768  # Width of the residual stream.
    model.num_heads = 12  # Query heads.
    model.num_kv_heads = 12  # Key/value heads: = num_heads is MHA, 1 is MQA, in between is GQA.
    model.head_dim = 0  # Per-head width; 0 means embed_dim // num_heads.
    model.mlp_dim = 3072  # Hidden width of the feed-forward block.
    # "gelu" (GPT-2; the tanh approximation, transformers' gelu_new) or "swiglu" (Llama: gated, three matrices).
    model.mlp_activation = "gelu"
    model.norm = "layernorm"  # "layernorm" or "rmsnorm"; pre-norm in every block plus one final norm.
    model.norm_eps = 1e-5  # Epsilon of the normalization layers.
    model.position_encoding = "rope"  # "rope", "learned" (absolute table) or "sinusoidal".
    model.rope_theta = 10000.0  # RoPE base frequency.
    # RoPE frequency scaling for contexts longer than pretraining's: "none", "linear" (every frequency divided
    # by rope_scaling_factor) or "llama3" (Llama 3.1: low frequencies divided, high ones kept, smooth between).
    model.rope_scaling = "none"
    model.rope_scaling_factor = 1.0  # "linear" and "llama3": the factor frequencies are divided by.
    model.rope_low_freq_factor = 1.0  # "llama3": wavelengths above rope_original_max_len / this are divided.
    model.rope_high_freq_factor = 4.0  # "llama3": wavelengths below rope_original_max_len / this are kept.
    model.rope_original_max_len = 8192  # "llama3": the context length the model was pretrained with.
    model.qk_norm = False  # RMSNorm over head_dim on every query and key head before RoPE (Qwen3).
    model.tie_embeddings = True  # Output projection shares the token embedding matrix.
    model.use_bias = False  # Biases in attention and MLP projections.
    model.qkv_bias = False  # Biases on the query, key and value projections only (Qwen2); implied by use_bias.
    model.dropout_rate = 0.0  # Dropout on embeddings, attention output and MLP output (training only).
    model.lora_rank = 0  # >0: LoRA adapters of this rank beside the layers matched by lora_targets.
    model.lora_alpha = 16.0  # LoRA scale numerator: updates are scaled by lora_alpha / lora_rank.
    model.lora_dropout = 0.0  # Dropout on the adapters' inputs (training only).
    # Regex over the layer paths attention/{query,key,value,out} and mlp/{up,gate,down} that get adapters.
    model.lora_targets = "attention/(query|key|value|out)"
    model.soft_prompt_length = 0  # >0: prompt tuning's learned embeddings read before every document.
    model.scan_layers = False  # Stack the blocks and run them with lax.scan: compile time flat in depth.
    model.remat_policy = "none"  # Activation rematerialization: "none", "full" or "save_dots" (keep matmul outputs).
    # "auto" (cudnn on GPU, splash on TPU, blocked on CPU), "xla" (the reference), "blocked" (XLA attention
    # that skips key blocks above the causal diagonal), "cudnn" (GPU flash attention) or "splash" (TPU Pallas).
    model.attention_impl = "auto"
    model.kv_cache_dtype = "auto"  # KV cache for decoding: "auto" (the compute dtype) or "int8" (per-token scales).
    model.dtype = "float32"  # Compute dtype: "float32", "bfloat16" (on accelerators) or "float16".
    model.param_dtype = "float32"  # Storage dtype of parameters and optimizer state: "float32" or "bfloat16".
    # Mixture of experts (llm/model/moe.py): >0 replaces the MLP of every moe_every-th layer by this many experts.
    model.num_experts = 0  # Routed experts per MoE layer; 0 is a dense model.
    model.experts_per_token = 2  # Top-k: experts each token is routed to (their weights renormalized to sum to 1).
    model.moe_every = 1  # Layers i with (i + 1) % moe_every == 0 are MoE (1: all); must divide num_layers.
    model.moe_mlp_dim = 0  # Hidden width of each expert (0: model.mlp_dim).
    model.num_shared_experts = 0  # Experts every token uses (DeepSeek style): one MLP of this many times moe_mlp_dim.
    model.router_aux_loss_coef = (
        0.01  # Weight of the Switch load-balancing loss (1 when balanced) in the training loss.
    )
    model.router_z_loss_coef = 0.001  # Weight of the ST-MoE router z-loss (mean logsumexp(router logits)^2).
    # "dropless" (tokens sorted by expert, grouped matmuls: jax.lax.ragged_dot), "megablox" (the same with TPUs'
    # Pallas grouped-matmul kernel, per device; interpreted, slowly, elsewhere) or "masked" (the reference: every
    # expert on every token, weighted by the routing; num_experts times the FLOPs).
    model.moe_impl = "dropless"

    config.data = data = ml_collections.ConfigDict()
    data.path = ""  # Directory with train/ and validation/ ArrayRecord shards (scripts/prepare_data.py).
    data.seq_len = 1024  # Row length of the packed shards; must equal the shards' and be <= max_seq_len.
    data.num_workers = 0  # Grain worker processes (0 is fastest for pre-tokenized shards on few cores).
    data.prefetch_buffer_size = 4  # Batches each Grain worker reads ahead (with num_workers > 0).
    data.replay_path = ""  # Continued pretraining: earlier data mixed back in against catastrophic forgetting.
    data.replay_fraction = 0.0  # Share of training rows drawn from replay_path (0 to 1).

    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 1000  # Optimizer steps.
    # "lm" (next-token cross-entropy), "dpo" (preference pairs, needs init_from), "contrastive" (a sentence
    # embedder from (query, positive, negative?) triples: scripts/prepare_pairs.py) or "distill" (knowledge
    # distillation from train.teacher: llm/train/teacher.py).
    train.objective = "lm"
    # "all" parameters, "lora" (only the adapters; needs model.lora_rank > 0) or "soft_prompt" (only the
    # prompt-tuning embeddings; needs model.soft_prompt_length > 0).
    train.trainable = "all"
    # The frozen base in "int8" or "int4" (Qwix, per-group scales) or "none"; int4 with LoRA is QLoRA.
    train.quantize_base = "none"
    train.quantize_group_size = 128  # Inputs per int4 scale (0: one scale per output channel).
    train.dpo_beta = 0.1  # DPO: strength of the KL constraint to the reference model.
    train.dpo_label_smoothing = 0.0  # DPO: assumed probability that a preference label is wrong (cDPO).
    # Distill: the frozen teacher, any run directory (trained here, fine-tuned, LoRA, quantized or imported from
    # Hugging Face); it must share the student's tokenizer. Loaded at start-up, never checkpointed.
    train.teacher = ""
    # Distill: weight of the teacher term; loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE.
    train.distill_alpha = 0.5
    train.distill_temperature = 1.0  # Distill: T, dividing both models' logits before the KL (Hinton et al.).
    train.teacher_dtype = "float32"  # Distill: the teacher's parameters and compute: "float32" or "bfloat16".
    train.teacher_quantization = "none"  # Distill: "none" or "int8" (Qwix weight-only, as scripts/quantize.py).
    train.contrastive_temperature = 0.05  # Contrastive: logits are cosine similarity / this (the start if learned).
    train.contrastive_learn_temperature = False  # Contrastive: train the temperature too (CLIP), floored at 0.01.
    # Contrastive: comma-separated Matryoshka widths below embed_dim, e.g. "32,64": the loss is averaged over
    # the full embedding and each re-normalised prefix, so a prefix serves as a smaller embedding ("": none).
    train.matryoshka_dims = ""
    train.contrastive_pooling = "mean"  # Contrastive: "mean" of the final hidden states or the "last" token's.
    train.query_prefix = "consulta: "  # Contrastive: text before every query (the data and the embedder add it).
    train.passage_prefix = "pasaje: "  # Contrastive: text before every positive and negative passage.
    train.batch_size = 32  # Global batch in sequences (all hosts, all microbatches).
    train.grad_accum_steps = 1  # Microbatches per step; the batch is split and gradients summed in one jit.
    train.z_loss = 0.0  # Coefficient of the z-loss (log Z)^2 that keeps logits from drifting (PaLM: 1e-4).
    train.loss_chunk_size = 0  # >0: cross-entropy over this many positions at a time; full logits never stored.
    train.log_every = 10  # Steps between metrics.jsonl / TensorBoard entries.
    train.eval_every = 200  # Steps between validation passes (0: never).
    train.eval_batches = 10  # Validation batches per pass (the first N of the split, in order).
    train.checkpoint_every = 200  # Steps between checkpoints; the final step is always saved.
    train.keep_checkpoints = 3  # Most recent checkpoints kept on disk.
    train.peak_tflops_per_device = 0.0  # Peak for MFU; 0 looks the device kind up (unknown kinds: no MFU).
    train.trackers = "tensorboard"  # Comma-separated: "tensorboard", "mlflow" (needs the [mlflow] extra), or both.
    train.mlflow_experiment = ""  # MLflow experiment of the run ("": the run directory's name).
    # Energy and CO2eq of training with codecarbon's offline tracker into RUN/emissions.json and the model card
    # (about 3 s to start; measured from energy counters where it can read them, else estimated and labelled so).
    train.track_emissions = True
    train.emissions_country = "ESP"  # ISO 3166-1 alpha-3 code of the grid whose carbon intensity codecarbon uses.

    config.optimizer = opt = ml_collections.ConfigDict()
    opt.learning_rate = 6e-4  # Peak learning rate.
    opt.schedule = "cosine"  # After warmup: "cosine", "linear" (to the final value) or "constant".
    opt.warmup_steps = 100  # Linear warmup from 0 to the peak.
    opt.final_lr_ratio = 0.1  # Final learning rate as a fraction of the peak (cosine and linear).
    opt.b1 = 0.9  # AdamW beta1.
    opt.b2 = 0.95  # AdamW beta2.
    opt.eps = 1e-8  # AdamW epsilon.
    opt.weight_decay = 0.1  # Decoupled weight decay; applied to weight matrices only (not norms, biases, embeddings).
    opt.grad_clip_norm = 1.0  # Clip the global gradient norm to this (0: no clipping).

    # Post-training quantization (written by scripts/quantize.py into the quantized run's config.json).
    config.quantization = quant = ml_collections.ConfigDict()
    quant.mode = "none"  # "none" (a float run), "int8", "int4" (grouped) or "int8_act" (weights and activations).
    quant.group_size = 128  # int4: inputs per scale (a layer the group does not divide uses the largest that does).
    quant.source_workdir = ""  # The float run it was made from, and its step (-1: none).
    quant.source_step = -1

    return config


# The machines of the pod-scale recipes (configs/llama3_8b_es.py, salamandra_7b_es.py): the mesh, the batch
# (sequences per step, accumulated over grad_accum_steps microbatches) and the rematerialization that fit one,
# checked with `scripts/train.py --dry_run` (README "Pod-scale recipes"). `devices` is what JAX sees: a v5p chip
# (two TensorCores) is one device, so a v5p-64 slice has 32.
MACHINES = {
    "v5p-64": dict(devices=32, mesh_shape=(1, -1, 1), batch_size=128, grad_accum_steps=1, remat_policy="full"),
    "8xh100": dict(devices=8, mesh_shape=(1, -1, 1), batch_size=64, grad_accum_steps=4, remat_policy="full"),
}


def for_machine(config: ml_collections.ConfigDict, machine: str) -> ml_collections.ConfigDict:
    """`config` with the mesh, batch and rematerialization of a `MACHINES` entry; an unknown name is refused."""
    if machine not in MACHINES:
        raise ValueError(f"Unknown machine {machine!r} (the config's argument): one of {sorted(MACHINES)}.")
    recipe = MACHINES[machine]
    config.mesh_shape = recipe["mesh_shape"]
    config.train.batch_size = recipe["batch_size"]
    config.train.grad_accum_steps = recipe["grad_accum_steps"]
    config.model.remat_policy = recipe["remat_policy"]
    return config
