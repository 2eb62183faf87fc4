"""Evaluation: bits-per-byte with a unigram baseline, Spanish multiple-choice and generation tasks, text
metrics, robustness to typos and missing accents, the JSON/Markdown report and the model card."""
