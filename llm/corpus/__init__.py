"""The offline corpus pipeline: sources -> clean -> langid -> pii -> offensive -> dedup -> tokenize + pack,
with a local (process pool) and an Apache Beam runner. It needs only llm.tokenizer, llm.io and llm.data."""
