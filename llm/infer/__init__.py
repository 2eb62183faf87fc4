"""Inference: load a trained run, prefill + decode with a KV cache, sampling."""
