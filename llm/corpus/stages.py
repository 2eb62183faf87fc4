"""The per-document stages of the corpus pipeline, built from the data config.

`document_stages` returns, in order, the named stages clean, archaic, quality, langid, pii and offensive
(each section's `enabled` key can leave one out). Every stage is a module-level function bound to its
settings with functools.partial, so Beam and multiprocessing can pickle it; the language ID model is not
part of it and loads lazily in each worker on first use.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections

from llm.corpus import clean, langid, offensive, pii, quality
from llm.corpus.document import DocumentStage

_KEYS = {
    "clean": {"enabled", "strip_html", "boilerplate_patterns", "boilerplate_max_words", "archaic_orthography"},
    "quality": {"enabled", *(field.name for field in dataclasses.fields(quality.QualityThresholds))},
    "langid": {"enabled", "min_score"},
    "pii": {"enabled", *pii.PLACEHOLDERS},
    "offensive": {"enabled", "max_fraction", "extra_words", "words_file"},
}


def _section(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The config section `name`, checked to have exactly the keys its stage reads."""
    if name not in config:
        raise ValueError(f"data config has no section {name!r} (see configs/data/es_default.py)")
    section = config[name]
    missing, unknown = _KEYS[name] - set(section.keys()), set(section.keys()) - _KEYS[name]
    if missing or unknown:
        raise ValueError(
            f"data config section {name!r}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
            f"expected {sorted(_KEYS[name])}"
        )
    return section


def document_stages(config: ml_collections.ConfigDict) -> list[tuple[str, DocumentStage]]:
    """The enabled per-document stages, in pipeline order, as (name, stage) pairs."""
    sections = {name: _section(config, name) for name in _KEYS}
    stages: list[tuple[str, DocumentStage]] = []

    cfg = sections["clean"]
    if cfg.enabled:
        patterns = tuple(cfg.boilerplate_patterns)
        stages.append(
            (
                "clean",
                functools.partial(
                    clean.clean_stage,
                    strip_markup=cfg.strip_html,
                    boilerplate=clean.compile_boilerplate(patterns) if patterns else None,
                    boilerplate_max_words=cfg.boilerplate_max_words,
                ),
            )
        )
    if cfg.archaic_orthography:
        stages.append(("archaic", clean.archaic_stage))

    cfg = sections["quality"]
    if cfg.enabled:
        thresholds = quality.QualityThresholds(**{key: cfg[key] for key in _KEYS["quality"] - {"enabled"}})
        stages.append(("quality", functools.partial(quality.quality_stage, thresholds=thresholds)))

    cfg = sections["langid"]
    if cfg.enabled:
        if not 0.0 <= cfg.min_score <= 1.0:
            raise ValueError(f"data config langid.min_score must be in [0, 1], got {cfg.min_score}")
        langid.model_path()  # Fail now, not in a worker, when the model file is missing.
        stages.append(("langid", functools.partial(langid.langid_stage, min_score=cfg.min_score)))

    cfg = sections["pii"]
    if cfg.enabled:
        types = frozenset(pii_type for pii_type in pii.PLACEHOLDERS if cfg[pii_type])
        stages.append(("pii", functools.partial(pii.pii_stage, types=types)))

    cfg = sections["offensive"]
    if cfg.enabled:
        words = offensive.offensive_words(tuple(cfg.extra_words), cfg.words_file)
        stages.append(
            (
                "offensive",
                functools.partial(offensive.offensive_stage, offensive=words, max_fraction=cfg.max_fraction),
            )
        )
    return stages
