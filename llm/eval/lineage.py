"""Whether a run's training data was decontaminated, along its `init_from` chain.

A fine-tuned run saw its own data and, through its starting weights, the data of every run it started from: an
SFT run on decontaminated conversations can still have memorised XQuAD-es in pretraining. So the status of each
run's data is read, from the evaluated run back to the first, from the `report.json` that the data builders
(scripts/prepare_data.py, prepare_sft.py, prepare_dpo.py) write beside the data: its "decontamination" entry says
whether the check ran, with which n-gram against which evaluation sets, and how much it dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from llm.io import read_json
from llm.runs import directory

MAX_DEPTH = 16  # init_from links followed at most (a chain that loops is cut here, not followed forever)
DECONTAMINATED, NOT_DECONTAMINATED, UNKNOWN = "decontaminated", "not decontaminated", "unknown"


def data_status(data_path: str) -> dict[str, Any]:
    """One data directory's decontamination: {"status", "data", ...the report's entry, "reason" when unknown}."""
    if not data_path:
        return {"status": UNKNOWN, "data": "", "reason": "no training data of its own (an imported checkpoint)"}
    path = os.path.join(data_path, "report.json")
    report = read_json(path)
    if report is None:
        return {"status": UNKNOWN, "data": data_path, "reason": f"no {path}"}
    entry = report.get("decontamination")
    if entry is None:
        return {"status": UNKNOWN, "data": data_path, "reason": f"{path} predates the decontamination step"}
    status = DECONTAMINATED if entry.get("enabled") else NOT_DECONTAMINATED
    return {"status": status, "data": data_path, **{key: value for key, value in entry.items() if key != "enabled"}}


def decontamination_lineage(workdir: str, config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The status of the run's data, then of each `init_from` run's data in turn, each tagged with its "run"."""
    lineage = []
    run, run_config = os.path.abspath(workdir), config
    while len(lineage) < MAX_DEPTH:
        lineage.append({"run": run, **data_status(run_config.data.path)})
        if not run_config.init_from:
            break
        run = os.path.abspath(run_config.init_from)
        try:
            run_config = directory.load_config(run)
        except FileNotFoundError:
            lineage.append({"run": run, "status": UNKNOWN, "data": "", "reason": "its run directory is gone"})
            break
    return lineage


def overall_status(lineage: list[Mapping[str, Any]]) -> str:
    """decontaminated only when every run's data was; not decontaminated when any run's was not; else unknown."""
    statuses = {entry["status"] for entry in lineage}
    if NOT_DECONTAMINATED in statuses:
        return NOT_DECONTAMINATED
    return DECONTAMINATED if statuses == {DECONTAMINATED} else UNKNOWN


def describe(lineage: list[Mapping[str, Any]]) -> list[str]:
    """One Markdown line per run of the chain, for the report and the model card."""
    lines = [f"Training data decontamination: **{overall_status(lineage)}**."]
    for entry in lineage:
        name = os.path.basename(entry["run"])
        if entry["status"] == DECONTAMINATED:
            sets = ", ".join(sorted(entry.get("eval_sets", {}))) or "no sets"
            dropped = f"; {entry['dropped']:,} dropped" if "dropped" in entry else ""
            detail = f"{entry['ngram']}-gram overlap with {sets}{dropped}"
        elif entry["status"] == NOT_DECONTAMINATED:
            detail = "the check was turned off"
        else:
            detail = entry["reason"]
        lines.append(f"- `{name}` (data `{entry['data'] or '-'}`): {entry['status']}: {detail}.")
    return lines
