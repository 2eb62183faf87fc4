"""safetensors checkpoints, single-file or sharded: tensors memory-mapped with numpy alone, and written tensor by
tensor (export).

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets)
and the raw data. We map each file once and hand out lazy views into it, so reading a slice touches only
the pages it covers, and `release` hands a tensor's pages back once it has been copied where it goes: the
import then holds little more than the placed parameters, instead of those plus every page it has read.

safetensors' own numpy reader would do for float32 and float16, but it cannot return
bfloat16 (numpy has no such type), the dtype most released checkpoints are stored in; ml_dtypes (a JAX
dependency) provides it here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np

from llm import io

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
WRITE_DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16")}  # dtype -> (numpy, code)
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
        tensors |= _mapped(path, [name for name in names if files[name] == file])
    return tensors


def open_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (e.g. a PEFT adapter's), memory-mapped."""
    return _mapped(path, list(_header(path)))


def _mapped(path: str, names: list[str]) -> dict[str, np.ndarray]:
    header = _header(path)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # The mapping outlives the descriptor.
    return {name: _view(mapping, _data_offset(path), header, name, path) for name in names}


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


@dataclasses.dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its name, shape, and how to gather it (called when its turn comes, then dropped)."""

    name: str
    shape: tuple[int, ...]
    values: Callable[[], np.ndarray]


def write_safetensors(
    output_dir: str, tensors: list[OutTensor], dtype: str, shard_bytes: int = SHARD_BYTES, file_name: str | None = None
) -> None:
    """Writes `tensors` in `dtype` as OUTPUT/`file_name` (default model.safetensors) or, when they exceed
    `shard_bytes`, as model-0000K-of-0000N.safetensors shards with model.safetensors.index.json."""
    itemsize = np.dtype(WRITE_DTYPES[dtype][0]).itemsize
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = math.prod(tensor.shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:  # A tensor larger than a shard gets one of its own.
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    if len(shards) == 1:
        _write_file(os.path.join(output_dir, file_name or SINGLE_FILE), shards[0], dtype)
        return
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, shard in zip(files, shards):
        _write_file(os.path.join(output_dir, file), shard, dtype)
    total = sum(math.prod(tensor.shape) * itemsize for tensor in tensors)
    weight_map = {tensor.name: file for file, shard in zip(files, shards) for tensor in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    io.write_json(os.path.join(output_dir, INDEX_FILE), index)


def _write_file(path: str, tensors: list[OutTensor], dtype: str) -> None:
    np_dtype, code = WRITE_DTYPES[dtype]
    itemsize, header, offset = np.dtype(np_dtype).itemsize, {}, 0
    for tensor in tensors:
        end = offset + math.prod(tensor.shape) * itemsize
        header[tensor.name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it.
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # The data start 8-byte aligned, as safetensors writes them.
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors:
            array = np.ascontiguousarray(tensor.values(), dtype=np_dtype)
            if array.shape != tensor.shape:
                raise ValueError(f"Tensor {tensor.name!r} came out {array.shape}, expected {tensor.shape}.")
            f.write(array.tobytes())
