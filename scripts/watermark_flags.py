"""The watermark flags that scripts/sample.py, scripts/serve.py and scripts/detect_watermark.py share
(llm/infer/watermark.py), checked before anything is loaded."""

from __future__ import annotations

from absl import app, flags

from llm.infer.watermark import WatermarkParams

KEY = flags.DEFINE_integer(
    "watermark_key", None, "Secret key of the green-list watermark, an integer in [0, 2**64) (unset: no watermark)."
)
GAMMA = flags.DEFINE_float("watermark_gamma", 0.25, "Green fraction of the vocabulary (detection must use the same).")
DELTA = flags.DEFINE_float("watermark_delta", 2.0, "Bias added to the green logits when sampling (larger: stronger).")


def watermark(default_key: int | None = None) -> WatermarkParams | None:
    """The watermark the flags describe; without --watermark_key, the one of `default_key`, or None (then
    --watermark_gamma and --watermark_delta are refused). UsageError naming a bad flag."""
    key = default_key if KEY.value is None else KEY.value
    if key is None:
        if GAMMA.present or DELTA.present:
            raise app.UsageError("--watermark_gamma and --watermark_delta need --watermark_key.")
        return None
    try:
        return WatermarkParams(key, GAMMA.value, DELTA.value)
    except ValueError as error:
        raise app.UsageError(f"--watermark_key/--watermark_gamma/--watermark_delta: {error}") from None
