"""Retrieval-augmented generation: passages of documents, lexical (BM25) search over them."""
