"""Corpus pipeline and data loading: sources -> clean -> langid -> pii -> dedup -> tokenize+pack -> loader."""
