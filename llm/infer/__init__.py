"""Inference: prefill + decode with a KV cache, sampling, the decode benchmark."""
