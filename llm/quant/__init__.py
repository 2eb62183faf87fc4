"""Post-training quantization with Qwix (ptq.py, embed.py) and quantized runs on disk (quantized_run.py)."""
