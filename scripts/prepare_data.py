"""Prepares a Spanish training corpus: sources -> cleaning and filters -> dedup -> tokenizer -> packed shards.

    python scripts/prepare_data.py --output_dir=/tmp/es_data [--config=configs/data/es_default.py] \
        [--config.pack.seq_len=256 --config.tokenizer.vocab_size=8000 ...] [--runner=local|beam]

With --tokenizer=RUN_OR_HF_DIR (or a tokenizer.model / tokenizer.json file) no tokenizer is trained: the corpus
is tokenized with that one (ours, or a Hugging Face model's tokenizer.json), whose files are copied into DIR so
that training on DIR (or fine-tuning the run or imported model it came from) finds them.

Writes DIR/tokenizer.model (and .vocab), DIR/train/, DIR/validation/ and DIR/report.json; every step's
own output stays under DIR/stages/. Re-running with the same DIR skips the finished steps, so an
interrupted run resumes where it stopped. With --runner=beam, the arguments after `--` are Beam pipeline
options (default runner: the in-process FnApiRunner), e.g. for Dataflow:

    python scripts/prepare_data.py --runner=beam --until=dedup --output_dir=gs://BUCKET/es_data \
        --config.sources.paths=... -- --runner=DataflowRunner --project=PROJECT --region=REGION \
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from llm.corpus import local_runner, pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "data", "es_default.py"), "Data pipeline config (configs/data/*.py)."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory (re-use it to resume a run).")
_RUNNER = flags.DEFINE_string("runner", "local", f"Runner of the corpus steps: one of {list(pipeline.RUNNERS)}.")
_UNTIL = flags.DEFINE_string("until", pipeline.STEPS[-1], f"Last step to run: one of {list(pipeline.STEPS)}.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars (documents, MB, ETA).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer",
    None,
    "Tokenize with this tokenizer instead of training one: a run or Hugging Face model directory, or a "
    "tokenizer.model / tokenizer.json file (sets --config.tokenizer.path).",
)


def main(argv: list[str]) -> None:
    beam_args = argv[1:]  # what follows "--" on the command line
    if beam_args and _RUNNER.value != "beam":
        raise app.UsageError(f"Unexpected arguments {beam_args}: only --runner=beam takes options after '--'.")
    config = _CONFIG.value
    if _TOKENIZER.value:
        config.tokenizer.path = os.path.abspath(os.path.expanduser(_TOKENIZER.value))
    try:
        pipeline.validate(config, _OUTPUT_DIR.value, _RUNNER.value, _UNTIL.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    if _RUNNER.value == "beam":
        from llm.corpus import beam_runner

        runner = beam_runner.BeamRunner(config, beam_args)
    else:
        runner = local_runner.LocalRunner(config, progress=_PROGRESS.value)
    try:
        pipeline.prepare(config, _OUTPUT_DIR.value, runner, until=_UNTIL.value, progress=_PROGRESS.value)
    except pipeline.ConfigChanged as error:
        raise app.UsageError(str(error)) from error
    logging.info("Done: %s", _OUTPUT_DIR.value)


if __name__ == "__main__":
    app.run(main)
