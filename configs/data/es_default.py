"""Corpus pipeline config: the embedded default Spanish corpus, cleaned, filtered, deduplicated, tokenized."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    return config
