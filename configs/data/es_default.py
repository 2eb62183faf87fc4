"""Corpus pipeline config: the embedded default Spanish corpus, cleaned, filtered, deduplicated, tokenized."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Sources (llm/data/sources.py): with no paths, tfds_name or hf_name, the embedded Debian corpus is read.
    config.sources = ml_collections.ConfigDict()
    config.sources.paths = ""  # Comma-separated files, directories or globs (.txt/.md, .jsonl, .parquet; .gz ok).
    config.sources.format = "auto"  # "auto" (by extension), or "text", "jsonl", "parquet" for every file.
    config.sources.text_mode = "file"  # Text files: "file" = one document each, "paragraph" = per blank line.
    config.sources.text_field = "text"  # JSONL field / Parquet column / TFDS or HF feature holding the text.
    config.sources.licence = "unknown"  # Licence recorded for documents from paths/TFDS/HF (model card).
    config.sources.tfds_name = ""  # TFDS dataset prepared as ArrayRecord, read with tfds.data_source.
    config.sources.tfds_split = "train"  # TFDS split to read.
    config.sources.tfds_data_dir = ""  # TFDS data_dir; "" = the TFDS default (~/tensorflow_datasets).
    config.sources.hf_name = ""  # Hugging Face dataset, streamed (extra [hf]; needs network or the HF cache).
    config.sources.hf_config = ""  # Hugging Face dataset config name, if it has several.
    config.sources.hf_split = "train"  # Hugging Face split to read.
    config.sources.on_error = "skip"  # Malformed input: "raise" (error naming file:line) or "skip" (counted).
    config.sources.max_document_bytes = 8 * 1024 * 1024  # Larger documents/lines are malformed input.
    config.sources.debian_cache_dir = "~/.cache/spanish_llm/debian"  # Where the .debs are fetched and unpacked.
    config.sources.debian_packages = (  # Comma-separated packages of the embedded corpus (a subset is fine).
        "sword-text-sparv,fortunes-es,libreoffice-help-es,lilypond-doc-html-es,manpages-es,debian-reference-es"
    )
    return config
