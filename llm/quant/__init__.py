"""Post-training quantization with Qwix: model -> model transforms (ptq.py, embed.py)."""
