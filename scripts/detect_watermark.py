"""Tests a text for the green-list watermark of scripts/sample.py or scripts/serve.py --watermark_key.

    python scripts/detect_watermark.py --tokenizer=runs/tiny_es --watermark_key=K (--text="..." | --file=F.txt)
        [--watermark_gamma=0.25 --z_threshold=4 --json]

Needs only the text, the tokenizer and the key (and the gamma the text was generated with): no model. Prints the
tokens scored (distinct token bigrams: a repeated bigram counts once), the green fraction, the z-score, its one-sided
p-value and the verdict at --z_threshold. Texts with fewer than 16 scored tokens are refused: their z says nothing.
"""

import json
import os

import watermark_flags
from absl import app, flags

from llm.infer import watermark as watermark_lib
from llm.runs import directory
from llm.tokenizer import AnyTokenizer, load_tokenizer

_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "The generating run's directory, or a SentencePiece .model / tokenizer.json.", required=True
)
_TEXT = flags.DEFINE_string("text", None, "Text to test.")
_FILE = flags.DEFINE_string("file", None, "UTF-8 file whose text to test.")
_Z_THRESHOLD = flags.DEFINE_float("z_threshold", 4.0, "z-score above which the text is called watermarked.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of lines of text.")
flags.adopt_module_key_flags(watermark_flags)


def _text() -> str:
    """The --text or --file text (exactly one of them), refused when empty."""
    if (_TEXT.value is None) == (_FILE.value is None):
        raise app.UsageError("Give exactly one of --text or --file.")
    if _FILE.value is not None:
        if not os.path.isfile(_FILE.value):
            raise app.UsageError(f"--file={_FILE.value!r} does not exist.")
        with open(_FILE.value, encoding="utf-8") as f:
            text = f.read()
    else:
        text = _TEXT.value
    if not text.strip():
        raise app.UsageError(f"{'--file=' + repr(_FILE.value) if _FILE.value else '--text'} is empty: nothing to test.")
    return text


def _tokenizer(path: str) -> AnyTokenizer:
    """The tokenizer file, or the one of a model directory, or a run's (which may sit in its data directory)."""
    if not os.path.exists(path):
        raise app.UsageError(f"--tokenizer={path!r} does not exist.")
    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise app.UsageError(f"--tokenizer={path!r} holds no tokenizer file and is no run directory.") from None
        return load_tokenizer(directory.find_tokenizer(path, directory.load_config(path)))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    params = watermark_flags.watermark()
    if params is None:
        raise app.UsageError("--watermark_key is required: the key the text was generated with.")
    text = _text()
    ids = _tokenizer(_TOKENIZER.value).encode(text)
    try:
        found = watermark_lib.detect(ids, params)
    except ValueError as error:
        raise SystemExit(f"Error: {error}") from None
    result = {
        "tokens": len(ids),
        "scored": found.scored,
        "green": found.green,
        "green_fraction": found.green_fraction,
        "gamma": params.gamma,
        "z": found.z,
        "p_value": found.p_value,
        "z_threshold": _Z_THRESHOLD.value,
        "watermarked": found.z > _Z_THRESHOLD.value,
    }
    if _JSON.value:
        print(json.dumps(result))
        return
    print(f"tokens scored    {found.scored} (of {len(ids)} tokens; repeated bigrams count once)")
    print(f"green fraction   {found.green_fraction:.3f} (gamma {params.gamma:g} without a watermark)")
    print(f"z-score          {found.z:.2f}")
    print(f"p-value          {found.p_value:.3g}")
    verdict = "watermarked" if result["watermarked"] else "not watermarked"
    print(f"verdict          {verdict} (z {'>' if result['watermarked'] else '<='} {_Z_THRESHOLD.value:g})")


if __name__ == "__main__":
    app.run(main)
