"""The packed model file `.kq`: one file the accelerator streams from.

    offset 0   8 bytes   magic b"KRIAKQ\\r\\n" (the CR LF catches text-mode mangling)
    offset 8   u32 LE    format version (FORMAT_VERSION)
    offset 12  u32 LE    header length H in bytes
    offset 16  u32 LE    CRC-32 of the header bytes
    offset 20  H bytes   header, UTF-8 JSON (model config, quantization, layout, tensor table)
    then       blobs, each starting at a multiple of ALIGN (4 KiB) bytes

Every tensor entry carries its offset, size, dtype, shape and CRC-32; the header
records the total file size. docs/format.md describes the layout in full.
"""

from __future__ import annotations

import json
import mmap
import struct
import zlib
from pathlib import Path

import numpy as np

from .config import Qwen2Config
from .contract.errors import ConfigError, FormatError
from .contract.layout import TileLayout, pack_linear, unpack_linear
from .qmodel import QuantLinear, QuantModel
from .safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits

MAGIC = b"KRIAKQ\r\n"
FORMAT_VERSION = 1
ALIGN = 4096
DEFAULT_TILE_ROWS = 32
_PREFIX = struct.Struct("<8sIII")

_DTYPES = {"u8": np.uint8, "i8": np.int8, "f16": np.float16, "f32": np.float32, "bf16": np.uint16}


def _required_params(cfg: Qwen2Config) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    return names


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def linear_layout(q: QuantLinear, tile_rows: int) -> TileLayout:
    n, k = q.shape
    return TileLayout(rows=n, cols=k, group_size=q.group_size, tile_rows=tile_rows,
                      bits=4 if q.kind == "int4" else 8)


def _tensors_of(model: QuantModel, tile_rows: int):
    """Yield (entry-without-offset, bytes) for every tensor in file order."""
    if model.tokenizer_json:
        tok = np.frombuffer(model.tokenizer_json, np.uint8)
        yield {"name": "tokenizer.json", "role": "tokenizer", "dtype": "u8", "shape": [tok.size]}, tok
    for name in sorted(model.params):
        arr = model.params[name]
        if name.endswith("embed_tokens.weight"):
            data, dtype = f32_to_bf16_bits(arr), "bf16"
        else:
            data, dtype = np.ascontiguousarray(arr, np.float32), "f32"
        yield {"name": name, "role": "param", "dtype": dtype, "shape": list(arr.shape)}, data
    for name in model.config.linear_names():
        q = model.linears[name]
        n, k = q.shape
        base = {"name": name, "role": "linear", "kind": q.kind, "group_size": q.group_size,
                "rows": n, "cols": k}
        if q.kind == "fp16":
            yield {**base, "part": "weight", "dtype": "f16", "shape": [n, k]}, np.ascontiguousarray(q.weight, np.float16)
        else:
            blob = pack_linear(linear_layout(q, tile_rows), q.codes, q.scales, q.zeros)
            yield {**base, "part": "packed", "dtype": "u8", "shape": [blob.size]}, blob
        if q.bias is not None:
            yield {**base, "part": "bias", "dtype": "f32", "shape": [n]}, np.ascontiguousarray(q.bias, np.float32)


def save_kq(model: QuantModel, path: str | Path, tile_rows: int = DEFAULT_TILE_ROWS) -> dict:
    """Write `model` to `path`; returns the header. Writes to a temp file first so a
    crash never leaves a half-written model under the final name."""
    path = Path(path)
    items = list(_tensors_of(model, tile_rows))
    header = {
        "format": "kriallm-kq", "version": FORMAT_VERSION,
        "model": model.config.to_hf_dict(), "quant": model.quant,
        "layout": {"tile_rows": tile_rows, "beat_bytes": 16, "align": ALIGN},
        "tensors": [],
    }
    # Offsets depend on the header length, which depends on the offsets: reserve
    # room by sizing the header with generous placeholder numbers first.
    for entry, data in items:
        header["tensors"].append({**entry, "offset": 10**12, "nbytes": int(data.nbytes),
                                  "crc32": zlib.crc32(data.reshape(-1).view(np.uint8))})
    header["file_size"] = 10**12
    reserve = _align(_PREFIX.size + len(json.dumps(header).encode()) + 64)
    off = reserve
    for t in header["tensors"]:
        t["offset"] = off
        off = _align(off + t["nbytes"])
    header["file_size"] = off
    raw = json.dumps(header).encode()
    assert _PREFIX.size + len(raw) <= reserve
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw), zlib.crc32(raw)))
        f.write(raw)
        for t, (_, data) in zip(header["tensors"], items):
            f.seek(t["offset"])
            f.write(data.reshape(-1).view(np.uint8).tobytes())
        f.truncate(off)
    tmp.replace(path)
    return header


class KqFile:
    """A validated, memory-mapped .kq file."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        p = self.path
        if not p.exists():
            raise FormatError(f"{p}: no such file")
        if p.is_dir():
            raise FormatError(f"{p}: is a directory, not a .kq file")
        size = p.stat().st_size
        if size < _PREFIX.size:
            raise FormatError(f"{p}: truncated .kq file ({size} bytes, not even a header)")
        with open(p, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, version, hlen, hcrc = _PREFIX.unpack_from(self._mm, 0)
        if magic != MAGIC:
            raise FormatError(f"{p}: not a kriallm .kq file (bad magic {magic!r})")
        if version != FORMAT_VERSION:
            raise FormatError(f"{p}: .kq format version {version} is not supported "
                              f"(this kriallm reads version {FORMAT_VERSION}); re-run `kriallm quantize`")
        if _PREFIX.size + hlen > size:
            raise FormatError(f"{p}: truncated .kq file (header needs {_PREFIX.size + hlen} bytes, file has {size})")
        raw = bytes(self._mm[_PREFIX.size:_PREFIX.size + hlen])
        if zlib.crc32(raw) != hcrc:
            raise FormatError(f"{p}: corrupt .kq header (checksum mismatch)")
        try:
            self.header = json.loads(raw)
        except ValueError:
            raise FormatError(f"{p}: corrupt .kq header (not valid JSON)") from None
        want = self.header.get("file_size")
        if want != size:
            raise FormatError(f"{p}: truncated or padded .kq file (header says {want} bytes, file has {size})")
        try:
            self.config = Qwen2Config.from_hf_dict(self.header["model"], source=f"{p} header")
            self.layout = self.header["layout"]
            self.tile_rows = int(self.layout["tile_rows"])
            self.quant = self.header["quant"]
            self.entries = {(t["name"], t.get("part", "")): t for t in self.header["tensors"]}
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{p}: malformed .kq header ({e})") from None
        except ConfigError as e:
            raise FormatError(str(e)) from None
        for t in self.header["tensors"]:
            if t["offset"] % ALIGN or t["offset"] + t["nbytes"] > size:
                raise FormatError(f"{p}: tensor {t['name']} lies outside the file")
            if verify and zlib.crc32(self._view(t)) != t["crc32"]:
                raise FormatError(f"{p}: corrupt .kq file: tensor {t['name']} {t.get('part', '')} "
                                  f"fails its checksum")
        self._check_against_config()

    def _check_against_config(self) -> None:
        """Every tensor the model config implies is present with the implied shape."""
        cfg, p = self.config, self.path
        names = {t["name"]: t for t in self.header["tensors"] if t["role"] == "param"}
        missing = [n for n in _required_params(cfg) if n not in names]
        if missing:
            raise FormatError(f"{p}: mismatched .kq: missing parameter(s) {', '.join(missing[:3])}")
        emb = names["model.embed_tokens.weight"]["shape"]
        if emb != [cfg.vocab_size, cfg.hidden_size]:
            raise FormatError(f"{p}: mismatched .kq: embedding is {emb} but the model config needs "
                              f"{[cfg.vocab_size, cfg.hidden_size]}")
        for name in cfg.linear_names():
            head = self.entries.get((name, "packed")) or self.entries.get((name, "weight"))
            if head is None:
                raise FormatError(f"{p}: mismatched .kq: linear {name} is missing from the tensor table")
            expect = cfg.shape_of(name)
            if (head["rows"], head["cols"]) != expect:
                raise FormatError(f"{p}: mismatched .kq: linear {name} is {head['rows']}x{head['cols']} but "
                                  f"the model config needs {expect[0]}x{expect[1]}")

    def _view(self, t) -> memoryview:
        return memoryview(self._mm)[t["offset"]:t["offset"] + t["nbytes"]]

    def array(self, t) -> np.ndarray:
        a = np.frombuffer(self._mm, dtype=_DTYPES[t["dtype"]], count=t["nbytes"] // np.dtype(_DTYPES[t["dtype"]]).itemsize,
                          offset=t["offset"])
        return a.reshape(t["shape"])

    def linear_blob(self, name: str) -> tuple[np.ndarray, TileLayout]:
        """The packed stream bytes of one linear and its layout (for DMA / RTL tests)."""
        t = self.entries.get((name, "packed"))
        if t is None:
            raise FormatError(f"{self.path}: no packed linear {name!r}")
        layout = TileLayout(rows=t["rows"], cols=t["cols"], group_size=t["group_size"],
                            tile_rows=self.tile_rows, bits=4 if t["kind"] == "int4" else 8)
        return self.array(t), layout

    def to_model(self) -> QuantModel:
        cfg = self.config
        params, linears = {}, {}
        for t in self.header["tensors"]:
            if t["role"] != "param":
                continue
            a = self.array(t)
            params[t["name"]] = bf16_bits_to_f32(a) if t["dtype"] == "bf16" else np.array(a)
        tok = self.entries.get(("tokenizer.json", ""))
        tokenizer_json = bytes(self._view(tok)) if tok else None
        for name in cfg.linear_names():
            packed, weight, bias = (self.entries.get((name, p)) for p in ("packed", "weight", "bias"))
            head = packed or weight
            b = np.array(self.array(bias)) if bias else None
            if packed:
                blob, layout = self.linear_blob(name)
                codes, scales, zeros = unpack_linear(layout, blob)
                linears[name] = QuantLinear(head["kind"], head["group_size"], codes=codes,
                                            scales=scales, zeros=zeros, bias=b)
            else:
                linears[name] = QuantLinear("fp16", head["group_size"], weight=np.array(self.array(weight)), bias=b)
        return QuantModel(config=cfg, quant=self.quant, params=params, linears=linears,
                          tokenizer_json=tokenizer_json)

    def close(self):
        self._mm.close()


def load_kq(path: str | Path, verify: bool = True) -> QuantModel:
    kq = KqFile(path, verify=verify)
    return kq.to_model()
