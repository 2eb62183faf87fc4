"""The trainer's data, as its config names it: the training stream and the validation sets."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from llm import config_validation
from llm.data import loader
from llm.train import losses


def check_data_path(config: ml_collections.ConfigDict) -> None:
    """Fails before any compilation when the data directory or one of its splits is missing."""
    if not config.data.path:
        raise config_validation.ConfigError(
            "config.data.path is empty: pass --config.data.path=DIR, a directory made by scripts/prepare_data.py "
            "with train/ and validation/ shards."
        )
    sources = {"data.path": config.data.path}
    if config.data.replay_fraction > 0:
        sources["data.replay_path"] = config.data.replay_path
    for key, data_dir in sources.items():
        for split in ("train", "validation") if config.train.eval_every else ("train",):
            records_dir = loader.split_dir(data_dir, split)
            if not os.path.isdir(records_dir):
                raise FileNotFoundError(
                    f"config.{key}={data_dir!r} has no {split}/ directory ({records_dir!r} "
                    "is missing); prepare it with scripts/prepare_data.py."
                )
    if config.train.objective == "contrastive":
        check_contrastive_prefixes(config)


def check_contrastive_prefixes(config: ml_collections.ConfigDict) -> None:
    """Contrastive data hold their texts already prefixed (scripts/prepare_pairs.py records the prefixes in
    report.json); the run's train.query_prefix / passage_prefix, which its embedder will use, must be those."""
    report_path = os.path.join(config.data.path, "report.json")
    if not os.path.isfile(report_path):
        return
    with open(report_path, encoding="utf-8") as f:
        prefixes = json.load(f).get("prefixes")
    if prefixes is None:
        return
    train = config.train
    config_validation.require_same(
        {"query_prefix": prefixes.get("query"), "passage_prefix": prefixes.get("passage")},
        {"query_prefix": train.query_prefix, "passage_prefix": train.passage_prefix},
        source=f"the prefix the data were prepared with ({report_path})",
        advice="the embedder adds the run's prefixes, so they must be the data's: set it, or re-prepare the data.",
        prefix="config.train",
    )


def train_iterator(config: ml_collections.ConfigDict) -> loader.TrainIterator:
    """This process's share of the training batches, with the replay corpus mixed in when configured."""
    data = config.data
    return loader.TrainIterator(
        loader.split_dir(data.path, "train"),
        seq_len=data.seq_len,
        batch_size=_local_batch_size(config),
        seed=config.seed,
        num_workers=data.num_workers,
        prefetch_buffer_size=data.prefetch_buffer_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        fields=losses.OBJECTIVES[config.train.objective].fields,
        replay_dir=loader.split_dir(data.replay_path, "train") if data.replay_fraction > 0 else "",
        replay_fraction=data.replay_fraction,
    )


def validation_sets(config: ml_collections.ConfigDict) -> dict[str, list[loader.Batch]]:
    """Validation batches by metric prefix: the run's own (""), and with replay the earlier corpus's
    ("replay_"), which shows how much of the old distribution continued pretraining forgets. None without
    `train.eval_every`."""
    if not config.train.eval_every:
        return {}
    paths = {"": config.data.path}
    if config.data.replay_fraction > 0:
        paths["replay_"] = config.data.replay_path
    return {
        prefix: loader.validation_batches(
            loader.split_dir(path, "validation"),
            config.data.seq_len,
            _local_batch_size(config),
            config.train.eval_batches,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            fields=losses.OBJECTIVES[config.train.objective].fields,
        )
        for prefix, path in paths.items()
    }


def _local_batch_size(config: ml_collections.ConfigDict) -> int:
    return config.train.batch_size // jax.process_count()
