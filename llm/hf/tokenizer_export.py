"""TEMPORARY stand-in (branch export only) for the tokenizer export another branch writes: the run's tokenizer
files copied as they are, so that exported folders carry a tokenizer until the real conversion is merged."""

from __future__ import annotations

import os
import shutil

from llm import hf_tokenizer
from llm.runs import directory


def write_tokenizer_files(run_dir: str, output_dir: str, chat_template: str | None) -> None:
    """Copies RUN's tokenizer.json with its companion files, or its tokenizer.model (`chat_template` unused)."""
    path = directory.find_tokenizer(run_dir, directory.load_config(run_dir))
    source = os.path.dirname(path)
    names = (hf_tokenizer.TOKENIZER_JSON, *hf_tokenizer.COMPANION_FILES, directory.SENTENCEPIECE_FILE)
    for name in names:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(output_dir, name))
