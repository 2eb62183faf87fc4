"""Import of Hugging Face checkpoints (Llama, Mistral, Qwen2) into ordinary run directories."""
