"""Reader and writer of the safetensors format, with bfloat16.

NumPy has no bfloat16 and real Qwen checkpoints are BF16, so the official
``safetensors.numpy`` cannot read them. The format is small enough to own:

    8 bytes   little-endian u64 N, the length of the JSON header
    N bytes   JSON: {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
              "__metadata__": {str: str}} (optional), padded with spaces
    rest      the data area; offsets are relative to its start

Files are memory-mapped: tensors are read-only views into the mapping, except
BF16, which is widened to float32 exactly (bits << 16) into a new array.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import numpy as np

from .contract.errors import CheckpointError
from .fileio import safe_writer

_HEADER_ALIGN = 8
# Elements converted per step when writing BF16: bounds the temporaries.
_CHUNK_ELEMS = 1 << 22

# safetensors dtype name -> little-endian NumPy dtype. BF16 is stored as its
# raw 16-bit pattern and widened on read.
_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
_NAMES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items() if k != "BF16"}


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of raw bfloat16 bit patterns (uint16) to float32."""
    out = np.empty(bits.shape, dtype=np.float32)
    wide = out.view(np.uint32)
    wide[...] = bits
    wide <<= 16
    return out


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest, ties to even.

    NaNs stay NaN (quiet, sign kept); values past the bf16 range round to inf,
    as IEEE rounding requires.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    quiet_nan = (u >> 16) | 0x0040
    return np.where(nan, quiet_nan, rounded).astype(np.uint16)


def _fail(path, what: str):
    raise CheckpointError(f"{path}: {what}")


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        _fail(path, f"safetensors header is not valid JSON ({e})")
    if not isinstance(header, dict):
        _fail(path, "safetensors header is not a JSON object")
    return header


def _tensor_entry(path: Path, name: str, entry, data_len: int):
    """Validated (dtype name, shape, begin, end) of one header entry."""
    if not isinstance(entry, dict):
        _fail(path, f"header entry {name!r} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        _fail(path, f"tensor {name!r} has unsupported dtype {dtype!r:.40}; "
                    f"supported: {', '.join(_DTYPES)}")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        _fail(path, f"tensor {name!r} has an invalid shape {shape!r:.60}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        _fail(path, f"tensor {name!r} spans bytes {begin}..{end} but the data area holds "
                    f"{data_len} bytes (truncated or corrupt file)")
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize       # exact: a shape of [2**70] must not overflow
    if end - begin != nbytes:
        _fail(path, f"tensor {name!r} occupies {end - begin} bytes but shape {shape} of "
                    f"{dtype} needs {nbytes}")
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, by name.

    BF16 tensors come back as float32 (exact); every other dtype as a
    read-only view into the memory-mapped file.
    """
    path = Path(path)
    if not path.is_file():
        _fail(path, "safetensors file does not exist")
    size = path.stat().st_size
    if size < 8:
        _fail(path, f"file is {size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            _fail(path, f"safetensors header length {header_len} exceeds the file size {size}")
        header = _parse_header(path, f.read(header_len))
        data_start = 8 + header_len
        data_len = size - data_start
        entries = {name: _tensor_entry(path, name, entry, data_len)
                   for name, entry in header.items() if name != "__metadata__"}
        # mmap of an empty data area is an error on Linux; nothing to map then.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if data_len else b""

    tensors: dict[str, np.ndarray] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        dt = _DTYPES[dtype]
        count = (end - begin) // dt.itemsize
        arr = np.frombuffer(buf, dtype=dt, count=count, offset=data_start + begin) \
            if count else np.empty(0, dtype=dt)
        arr = arr.reshape(shape)
        tensors[name] = bf16_bits_to_f32(arr) if dtype == "BF16" else arr
    return tensors


def _as_bf16(name: str, bf16: set | bool, arr: np.ndarray) -> bool:
    wanted = bf16 if isinstance(bf16, bool) else name in bf16
    if wanted and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"tensor {name!r} of dtype {arr.dtype} cannot be stored as BF16")
    return wanted


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      bf16: set | bool = False, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (sorted by name, as Hugging Face does) to one file.

    bf16: True stores every floating tensor as BF16 (round to nearest even);
    a set stores just the named ones; False keeps every native dtype.
    """
    arrays = {name: np.asarray(tensors[name]) for name in sorted(tensors)}
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    plan = []
    offset = 0
    for name, arr in arrays.items():
        if _as_bf16(name, bf16, arr):
            dtype_name, itemsize = "BF16", 2
        else:
            key = arr.dtype.newbyteorder("=")
            if key not in _NAMES:
                raise TypeError(f"tensor {name!r} has dtype {arr.dtype}, which safetensors "
                                f"cannot store")
            dtype_name, itemsize = _NAMES[key], arr.dtype.itemsize
        nbytes = arr.size * itemsize
        header[name] = {"dtype": dtype_name, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        plan.append((arr, dtype_name))
        offset += nbytes

    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % _HEADER_ALIGN)
    with safe_writer(path, "safetensors file") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr, dtype_name in plan:
            flat = arr.reshape(-1)
            for start in range(0, flat.size, _CHUNK_ELEMS):
                chunk = flat[start:start + _CHUNK_ELEMS]
                if dtype_name == "BF16":
                    chunk = f32_to_bf16_bits(chunk.astype(np.float32, copy=False))
                else:
                    chunk = chunk.astype(_DTYPES[dtype_name], copy=False)
                f.write(np.ascontiguousarray(chunk).tobytes())
