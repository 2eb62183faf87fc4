"""Prints evaluation reports side by side: one score column per labelled report of scripts/evaluate.py.

    python scripts/compare_reports.py zero-shot=runs/a/eval/report.json lora=runs/b/eval/report.json \\
        [--output=comparison.md]

Rows are the first report's figures (task, setting, metric); a figure another report lacks shows "-".
"""

import json
import os

from absl import app, flags

from llm.eval import report
from llm.io import write_text

_OUTPUT = flags.DEFINE_string("output", "", "Also write the Markdown table to this file.")


def _labelled_reports(args: list[str]) -> dict[str, dict]:
    reports = {}
    for arg in args:
        label, sep, path = arg.partition("=")
        if not sep or not label or not path:
            raise app.UsageError(f"{arg!r}: expected LABEL=REPORT.json, e.g. zero-shot=runs/tiny_es/eval/report.json.")
        if label in reports:
            raise app.UsageError(f"The label {label!r} is given twice; labels name the table's columns.")
        if not os.path.isfile(path):
            raise app.UsageError(f"{path!r} (label {label!r}) does not exist; write it with scripts/evaluate.py.")
        with open(path, encoding="utf-8") as f:
            try:
                reports[label] = json.load(f)
            except json.JSONDecodeError as error:
                raise app.UsageError(f"{path!r} is not a JSON report: {error}") from error
    return reports


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise app.UsageError("Give at least two LABEL=REPORT.json arguments.")
    reports = _labelled_reports(argv[1:])
    try:
        table = report.comparison_table(reports)
    except KeyError as error:
        raise app.UsageError(
            f"A report lacks the key {error}: compare reports written by scripts/evaluate.py."
        ) from None
    if _OUTPUT.value:
        write_text(_OUTPUT.value, table)
    print(table, end="")


if __name__ == "__main__":
    app.run(main)
