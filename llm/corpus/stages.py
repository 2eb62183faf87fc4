"""The per-document stages of the corpus pipeline, built from the data config.

`document_stages` returns, in order, the named stages clean, archaic, quality, langid, pii and offensive
(each section's `enabled` key can leave one out) of the filter step; `decontamination_stage` the one stage
of the decontaminate step, run after dedup (so that it checks each kept document once). Every stage is a
module-level function bound to its settings with functools.partial, so Beam and multiprocessing can
pickle it; the language ID model is not part of it and loads lazily in each worker on first use.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections

from llm.corpus import clean, langid, offensive, pii, quality, report
from llm.corpus.document import Document, DocumentStage, Dropped
from llm.data import decontamination

_KEYS = {
    "clean": {"enabled", "strip_html", "boilerplate_patterns", "boilerplate_max_words", "archaic_orthography"},
    "quality": {"enabled", *(field.name for field in dataclasses.fields(quality.QualityThresholds))},
    "langid": {"enabled", "min_score"},
    "pii": {"enabled", *pii.PLACEHOLDERS},
    "offensive": {"enabled", "max_fraction", "extra_words", "words_file"},
}
_DECONTAMINATE_KEYS = {"enabled", "ngram", "shipped", "extra"}
DECONTAMINATE = report.DECONTAMINATE  # the stage; its drop reasons are "decontaminate.<evaluation set>"


def _section(config: ml_collections.ConfigDict, name: str, keys: set[str] | None = None) -> ml_collections.ConfigDict:
    """The config section `name`, checked to have exactly the keys its stage reads."""
    if name not in config:
        raise ValueError(f"data config has no section {name!r} (see configs/data/es_default.py)")
    section, keys = config[name], _KEYS[name] if keys is None else keys
    missing, unknown = keys - set(section.keys()), set(section.keys()) - keys
    if missing or unknown:
        raise ValueError(
            f"data config section {name!r}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
            f"expected {sorted(keys)}"
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


def decontaminate_stage(document: Document, index: decontamination.NgramIndex) -> Document | Dropped:
    """Drops a document that shares an n-gram with an evaluation set, under "decontaminate.<set>"."""
    eval_set = index.match(document.text)
    return document if eval_set is None else Dropped(document.id, f"{DECONTAMINATE}.{eval_set}")


def decontamination_index(config: ml_collections.ConfigDict) -> decontamination.NgramIndex | None:
    """The n-gram index of the evaluation sets the `decontaminate` section names; None when it is disabled.

    Built in every worker from the files (as the offensive-word list is), so a Beam job carries the
    config, not the index; the files must be readable where the workers run.
    """
    cfg = _section(config, DECONTAMINATE, _DECONTAMINATE_KEYS)
    if not cfg.enabled:
        return None
    if not isinstance(cfg.ngram, int) or cfg.ngram < 1:
        raise ValueError(f"data config decontaminate.ngram={cfg.ngram!r}: expected an integer >= 1.")
    files = decontamination.eval_files(cfg.shipped, cfg.extra)
    if not files:
        raise ValueError(
            "data config decontaminate: no evaluation set (shipped=False and extra empty); "
            "set decontaminate.enabled=False to skip the step."
        )
    try:
        return decontamination.load_index(files, cfg.ngram)
    except (OSError, ValueError) as error:
        raise ValueError(f"data config decontaminate (shipped={cfg.shipped}, extra={cfg.extra!r}): {error}") from error


def decontamination_stage(config: ml_collections.ConfigDict) -> DocumentStage | None:
    """The decontaminate step's stage, bound to its index; None when the step is disabled."""
    index = decontamination_index(config)
    return None if index is None else functools.partial(decontaminate_stage, index=index)
