"""Experiment trackers of a training run (`config.train.trackers`): TensorBoard and MLflow.

MLflow gets every metric metrics.jsonl gets, at its step; the flattened config as parameters at the start; and
at the end config.json, emissions.json and whatever evaluation report and model card the run has, as artifacts.
The run's MLflow coordinates are kept in RUN/mlflow_run.json, so a resumed run (and scripts/evaluate.py) logs to
the same MLflow run. The store is $MLFLOW_TRACKING_URI, else a SQLite database in RUN/mlruns/ (MLflow 3 refuses
its file store unless told otherwise, and mlflow-skinny reads SQLite through SQLAlchemy, both in the [mlflow]
extra). Only process 0 logs.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections

from configs import base
from llm import config_validation, io
from llm.train import emissions, metrics

MLFLOW_RUN_FILE = "mlflow_run.json"
LOCAL_STORE = "mlruns"  # RUN/mlruns/mlflow.db and RUN/mlruns/artifacts/ when $MLFLOW_TRACKING_URI is unset.
TRUNCATED = " ... [truncated; the whole config is the config.json artifact]"
# Files of the run directory logged as artifacts when they exist (evaluation writes the last three).
MODEL_CARD = "MODEL_CARD.md"
RUN_ARTIFACTS = ("config.json", emissions.EMISSIONS_FILE, "eval/report.json", "eval/report.md", MODEL_CARD)
_EXTRA = "pip install -e '.[mlflow]'"


def tracker_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The names in `config.train.trackers` ("tensorboard,mlflow"); an unknown one is a ConfigError."""
    value, allowed = config.train.trackers, base.LIST_CHOICES["train.trackers"]
    names = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise config_validation.ConfigError(
            f"config.train.trackers={value!r}: {unknown[0]!r} is not one of {allowed} (comma-separated; '' for none)."
        )
    return names


def check_config(config: ml_collections.ConfigDict) -> None:
    """The tracker names, and the packages the chosen trackers and emissions need, before any device work."""
    if "mlflow" in tracker_names(config):
        require("mlflow", "config.train.trackers includes 'mlflow'")
    emissions.check_config(config)


def require(module: str, reason: str) -> Any:
    """Imports an optional package of the [mlflow] extra, or fails saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{reason}, which needs the {module} package: {_EXTRA}.") from error


def open_trackers(config: ml_collections.ConfigDict, workdir: str) -> list[metrics.Tracker]:
    """The trackers `config.train.trackers` names, opened for this run (none off process 0)."""
    if jax.process_index() != 0:
        return []
    return [TRACKERS[name](config, workdir) for name in tracker_names(config)]


def read_run_info(workdir: str) -> dict[str, str] | None:
    """RUN/mlflow_run.json ({"tracking_uri", "experiment", "run_id"}), or None for a run never tracked by MLflow."""
    path = os.path.join(workdir, MLFLOW_RUN_FILE)
    info = io.read_json(path)
    if info is None:
        return None
    missing = [key for key in ("tracking_uri", "experiment", "run_id") if key not in info]
    if missing:
        raise ValueError(f"{path} lacks {missing[0]!r}; delete it to start a new MLflow run.")
    return info


class MlflowTracker:
    """One MLflow run per run directory: created on the first start, reopened on every resume."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        from mlflow import MlflowClient

        self._workdir = os.path.abspath(workdir)
        info = read_run_info(self._workdir)
        if info is None:
            info = _create_run(config, self._workdir)
        self._client, self._run_id = MlflowClient(info["tracking_uri"]), info["run_id"]
        # The last step of each metric already in the run: an interrupted run logged steps past its last
        # checkpoint, which the resumed run replays; MLflow cannot delete a metric, so they are not logged twice.
        self._logged = _last_steps(self._client, self._run_id, os.path.join(self._workdir, MLFLOW_RUN_FILE))
        self._client.update_run(self._run_id, status="RUNNING")
        _log_params(self._client, self._run_id, _flatten(config.to_dict()))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in scalars.items() if step > self._logged.get(k, -1)]
        if batch:
            self._client.log_batch(self._run_id, metrics=batch)

    def close(self, succeeded: bool) -> None:
        _log_run_files(self._client, self._run_id, self._workdir)
        self._client.set_terminated(self._run_id, "FINISHED" if succeeded else "FAILED")


TRACKERS: dict[str, Callable[[ml_collections.ConfigDict, str], metrics.Tracker]] = {
    "tensorboard": lambda config, workdir: metrics.TensorBoardTracker(workdir),
    "mlflow": MlflowTracker,
}  # The keys are exactly configs.base.LIST_CHOICES["train.trackers"] (tested).


def log_evaluation(workdir: str, report: Mapping[str, Any], step: int, report_path: str) -> None:
    """scripts/evaluate.py's report into the run's MLflow run, when it has one: its numbers as eval/... metrics
    at the evaluated step; the report (JSON and Markdown) and the run's model card as artifacts."""
    info = read_run_info(workdir)
    if info is None:
        return
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH
    except ImportError:
        logging.warning("%s has an MLflow run, but mlflow is not installed (%s): not logged.", workdir, _EXTRA)
        return
    client, now = MlflowClient(info["tracking_uri"]), int(time.time() * 1000)
    values = _numbers(report, "eval/", skip=("settings", "workdir", "step"))
    batch = [Metric(key, value, now, step) for key, value in values.items()]
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        client.log_batch(info["run_id"], metrics=batch[i : i + MAX_METRICS_PER_BATCH])
    for path in (report_path, os.path.splitext(report_path)[0] + ".md"):
        client.log_artifact(info["run_id"], path, "eval")
    card = os.path.join(workdir, MODEL_CARD)
    if os.path.isfile(card):
        client.log_artifact(info["run_id"], card)


def _create_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """A new MLflow run in the configured store and experiment, recorded in RUN/mlflow_run.json."""
    from mlflow import MlflowClient
    from mlflow.tracking.context import registry

    os.makedirs(workdir, exist_ok=True)
    name = os.path.basename(workdir)
    uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
    if not uri:
        local = os.path.join(workdir, LOCAL_STORE)
        os.makedirs(local, exist_ok=True)
        uri, artifacts = f"sqlite:///{local}/mlflow.db", pathlib.Path(local, "artifacts").as_uri()
    client = MlflowClient(uri)
    experiment_name = config.train.mlflow_experiment or name
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name, artifacts)
    # MLflow's own tags for the run (user, source script, git commit), as mlflow.start_run would set them.
    run = client.create_run(experiment_id, run_name=name, tags=registry.resolve_tags({}))
    info = {"tracking_uri": uri, "experiment": experiment_name, "run_id": run.info.run_id}
    io.write_json(os.path.join(workdir, MLFLOW_RUN_FILE), info)
    logging.info("MLflow run %s in experiment %r at %s.", run.info.run_id, experiment_name, uri)
    return info


def _last_steps(client: Any, run_id: str, info_path: str) -> dict[str, int]:
    """The highest step logged of each metric of the run; a run its store lacks is an error naming the file."""
    from mlflow.exceptions import MlflowException

    try:
        keys = client.get_run(run_id).data.metrics
    except MlflowException as error:
        raise ValueError(
            f"{info_path} names MLflow run {run_id}, which its store does not have ({error.message}); "
            "delete the file to start a new MLflow run."
        ) from None
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def _log_params(client: Any, run_id: str, flat: dict[str, str]) -> None:
    """The flattened config as parameters. Parameters are immutable in MLflow: a resumed run logs the keys the
    run lacks, and a value changed since (e.g. train.num_steps raised to train further) as a tag."""
    from mlflow.entities import Param, RunTag
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    values = {
        k: v if len(v) <= MAX_PARAM_VAL_LENGTH else v[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
        for k, v in flat.items()
    }
    logged = client.get_run(run_id).data.params
    params = [Param(k, v) for k, v in values.items() if k not in logged]
    tags = [RunTag(f"changed_on_resume.{k}", v) for k, v in values.items() if k in logged and logged[k] != v]
    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    if tags:
        client.log_batch(run_id, tags=tags)


def _log_run_files(client: Any, run_id: str, workdir: str) -> None:
    for name in RUN_ARTIFACTS:
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            client.log_artifact(run_id, path, os.path.dirname(name) or None)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"num_layers": 2}} -> {"model.num_layers": "2"}; lists as JSON."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def _numbers(tree: Mapping[str, Any], prefix: str, skip: Iterable[str] = ()) -> dict[str, float]:
    """The numeric leaves of a nested report as {"eval/xnli/accuracy": 41.2}; keys MLflow refuses are cleaned."""
    found = {}
    for key, value in tree.items():
        if key in skip:
            continue
        name = prefix + re.sub(r"[^\w./\- :]", "_", str(key))
        if isinstance(value, Mapping):
            found.update(_numbers(value, name + "/", skip))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found
