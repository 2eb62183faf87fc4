"""Memory-mapped tensors of a single-file or sharded safetensors checkpoint, read with numpy alone.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets)
and the raw data. We map each file once and hand out lazy views into it, so reading a slice touches only
the pages it covers, and `release` hands a tensor's pages back once it has been copied where it goes: the
import then holds little more than the placed parameters, instead of those plus every page it has read.

safetensors' own numpy reader would do for float32 and float16, but it cannot return
bfloat16 (numpy has no such type), the dtype most released checkpoints are stored in; ml_dtypes (a JAX
dependency) provides it here.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def weight_map(model_dir: str) -> dict[str, str]:
    """Tensor name -> the file (in model_dir) that holds it, from the shard index or the single file."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            return dict(json.load(f)["weight_map"])
    if os.path.exists(os.path.join(model_dir, SINGLE_FILE)):
        return dict.fromkeys(_header(os.path.join(model_dir, SINGLE_FILE)), SINGLE_FILE)
    raise FileNotFoundError(
        f"No {SINGLE_FILE} or {INDEX_FILE} in {model_dir!r}: only safetensors checkpoints can be imported."
    )


def open_tensors(model_dir: str, names: list[str]) -> dict[str, np.ndarray]:
    """Lazy, read-only, memory-mapped arrays for `names`; a missing shard or tensor is named in the error."""
    files = weight_map(model_dir)
    missing = [name for name in names if name not in files]
    if missing:
        raise KeyError(f"The checkpoint in {model_dir!r} has no tensor {missing[0]!r} ({len(missing)} missing).")
    tensors: dict[str, np.ndarray] = {}
    for file in sorted({files[name] for name in names}):
        path = os.path.join(model_dir, file)
        if not os.path.exists(path):
            wanted = [name for name in names if files[name] == file]
            raise FileNotFoundError(f"Shard {file!r} is missing from {model_dir!r} (it holds {wanted[0]!r}, ...).")
        header = _header(path)
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # The mapping outlives the descriptor.
        for name in names:
            if files[name] == file:
                tensors[name] = _view(mapping, _data_offset(path), header, name, path)
    return tensors


def release(tensor: np.ndarray) -> None:
    """Drops the pages of a tensor from `open_tensors` out of this process's memory. They stay in the OS page
    cache, and reading the tensor again maps them back in, so this changes memory use only, never values."""
    mapping, view = tensor, tensor
    while not isinstance(mapping, mmap.mmap):  # ndarray views lead to a memoryview of the mapping.
        mapping = mapping.base if isinstance(mapping, np.ndarray) else mapping.obj
    start = view.__array_interface__["data"][0] - np.frombuffer(mapping, np.uint8).__array_interface__["data"][0]
    first_page = start - start % mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, first_page, start + view.nbytes - first_page)


def _view(mapping: mmap.mmap, data_offset: int, header: dict, name: str, path: str) -> np.ndarray:
    if name not in header:
        raise KeyError(f"Tensor {name!r} is listed in the shard index but absent from {path!r}.")
    entry = header[name]
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"Tensor {name!r} in {path!r} has dtype {entry['dtype']}, which cannot be imported.")
    begin, end = entry["data_offsets"]
    dtype = np.dtype(DTYPES[entry["dtype"]])
    flat = np.frombuffer(mapping, dtype, (end - begin) // dtype.itemsize, data_offset + begin)
    return flat.reshape(entry["shape"])


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _data_offset(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]
