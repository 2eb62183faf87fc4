"""Import of Hugging Face checkpoints (Llama 2/3 with RoPE scaling, Mistral, Qwen2, Qwen3, GPT-2) into ordinary
run directories."""
