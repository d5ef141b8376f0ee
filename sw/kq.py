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
from .contract.layout import BEAT_BYTES, TileLayout, pack_linear, unpack_linear
from .contract.numerics import SUPPORTED_GROUP_SIZES
from .fileio import safe_writer
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
    with safe_writer(path, "quantized model") as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw), zlib.crc32(raw)))
        f.write(raw)
        for t, (_, data) in zip(header["tensors"], items):
            f.seek(t["offset"])
            f.write(data.reshape(-1).view(np.uint8).tobytes())
        f.truncate(off)
    return header


# ---------------------------------------------------------------------------
# Header schema: everything is checked before anything is sized or read from it
# ---------------------------------------------------------------------------

_ROLES = ("tokenizer", "param", "linear")
_KINDS = {"int4": 4, "int8": 8, "fp16": None}
_PARTS = {"packed": "u8", "weight": "f16", "bias": "f32"}
_LM_HEAD_KINDS = ("int4", "int8", "fp16")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_header(h, size: int, data_start: int, p: Path) -> tuple[Qwen2Config, dict]:
    """The model config and the tensor table of a .kq header, or FormatError naming the first bad field.

    Checks types and ranges of every field, that the tensor table holds exactly what the model
    config implies (every parameter, every linear, a bias on exactly the linears that have one), the
    size of every entry against its shape and layout, and that no two entries share bytes; sizes are
    bounded by the file's size before anything is allocated from them.
    """
    def bad(what: str, problem: str = "malformed .kq header"):
        return FormatError(f"{p}: {problem}: {what}")

    if not isinstance(h, dict):
        raise bad("the header is not a JSON object")
    if h.get("format") != "kriallm-kq" or h.get("version") != FORMAT_VERSION:
        raise bad(f"format/version are {h.get('format')!r:.40}/{h.get('version')!r:.20}, "
                  f"not 'kriallm-kq'/{FORMAT_VERSION}")
    want = h.get("file_size")
    if want != size:
        raise FormatError(f"{p}: truncated or padded .kq file (header says {want!r:.20} bytes, file has {size})")
    for key, kind in (("model", dict), ("quant", dict), ("layout", dict), ("tensors", list)):
        if not isinstance(h.get(key), kind):
            raise bad(f"{key} must be a JSON {'object' if kind is dict else 'array'}, got {h.get(key)!r:.60}")
    try:
        cfg = Qwen2Config.from_hf_dict(h["model"], source=f"{p} header")
    except ConfigError as e:
        raise FormatError(str(e)) from None

    quant = h["quant"]
    group = quant.get("group_size")
    if not _is_int(group) or group not in SUPPORTED_GROUP_SIZES:
        raise bad(f"quant.group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group!r:.40}")
    if not isinstance(quant.get("method"), str):
        raise bad(f"quant.method must be a string, got {quant.get('method')!r:.40}")
    if not isinstance(quant.get("lm_head"), str) or quant["lm_head"] not in _LM_HEAD_KINDS:
        raise bad(f"quant.lm_head must be one of {_LM_HEAD_KINDS}, got {quant.get('lm_head')!r:.40}")

    layout = h["layout"]
    tile_rows = layout.get("tile_rows")
    if not _is_int(tile_rows) or not 2 <= tile_rows <= 1024 or tile_rows % 2:
        raise bad(f"layout.tile_rows must be an even integer from 2 to 1024, got {tile_rows!r:.40}")
    if layout.get("beat_bytes") != BEAT_BYTES or layout.get("align") != ALIGN:
        raise bad(f"layout beat_bytes/align must be {BEAT_BYTES}/{ALIGN}, got "
                  f"{layout.get('beat_bytes')!r:.20}/{layout.get('align')!r:.20}")

    tensors = h["tensors"]
    # what the config implies, counted before any per-layer list is built from it
    implied = 2 + 2 * cfg.num_hidden_layers + len(cfg.linear_shapes()) * cfg.num_hidden_layers + 1
    if len(tensors) < implied:
        raise bad(f"the tensor table has {len(tensors)} entries but the model config implies at least {implied}")
    entries: dict[tuple[str, str], dict] = {}
    for i, t in enumerate(tensors):
        where = f"tensors[{i}]"
        if not isinstance(t, dict):
            raise bad(f"{where} is not a JSON object")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"{where}.name must be a non-empty string, got {name!r:.40}")
        where = f"tensor {name:.80}"
        role = t.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise bad(f"{where}: role must be one of {_ROLES}, got {role!r:.40}")
        dtype = t.get("dtype")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"{where}: dtype must be one of {tuple(_DTYPES)}, got {dtype!r:.40}")
        shape = t.get("shape")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
                or not all(_is_int(d) and 0 < d <= size for d in shape)):
            raise bad(f"{where}: shape must be a list of 1 or 2 positive integers, got {shape!r:.60}")
        for key in ("offset", "nbytes", "crc32"):
            if not _is_int(t.get(key)) or t[key] < 0:
                raise bad(f"{where}: {key} must be a non-negative integer, got {t.get(key)!r:.40}")
        if t["crc32"] >= 1 << 32:
            raise bad(f"{where}: crc32 {t['crc32']} is not a 32-bit value")
        count = shape[0] * (shape[1] if len(shape) == 2 else 1)
        if t["nbytes"] != count * np.dtype(_DTYPES[dtype]).itemsize:
            raise bad(f"{where}: nbytes {t['nbytes']} does not match shape {shape} of {dtype}")
        if t["offset"] % ALIGN or t["offset"] < data_start or t["offset"] + t["nbytes"] > size:
            raise FormatError(f"{p}: tensor {name:.80} lies outside the file's data area")
        part = ""
        if role == "linear":
            part = t.get("part")
            if not isinstance(part, str) or part not in _PARTS:
                raise bad(f"{where}: part must be one of {tuple(_PARTS)}, got {part!r:.40}")
            if dtype != _PARTS[part]:
                raise bad(f"{where} {part}: dtype must be {_PARTS[part]}, got {dtype}")
            _check_linear_entry(t, name, part, cfg, tile_rows, bad)
        elif "part" in t:
            raise bad(f"{where}: only linear entries have a part")
        elif role == "tokenizer" and (name != "tokenizer.json" or dtype != "u8"):
            raise bad(f"{where}: the tokenizer entry must be tokenizer.json of u8")
        key = (name, part)
        if key in entries:
            raise bad(f"{where} {part}: listed twice")
        entries[key] = t

    spans = sorted((t["offset"], t["offset"] + t["nbytes"], t["name"]) for t in tensors)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise bad(f"tensors {an} and {bn} share bytes ({b0} < {a1})")

    _check_against_config(cfg, entries, group, quant["lm_head"], bad)
    return cfg, entries


def _check_linear_entry(t: dict, name: str, part: str, cfg: Qwen2Config, tile_rows: int, bad) -> None:
    kind, group, rows, cols = t.get("kind"), t.get("group_size"), t.get("rows"), t.get("cols")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise bad(f"linear {name}: kind must be one of {tuple(_KINDS)}, got {kind!r:.40}")
    if not _is_int(group) or group not in SUPPORTED_GROUP_SIZES:
        raise bad(f"linear {name}: group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group!r:.40}")
    for key, v in (("rows", rows), ("cols", cols)):
        if not _is_int(v):
            raise bad(f"linear {name}: {key} must be an integer, got {v!r:.40}")
    expect = cfg.linear_shape(name)
    if expect is None:
        raise bad(f"linear {name:.80} is not part of the model the header describes")
    if (rows, cols) != expect:
        raise bad(f"linear {name} is {rows!r:.20}x{cols!r:.20} but the model config needs {expect[0]}x{expect[1]}",
                  "mismatched .kq")
    if part == "packed":
        if kind == "fp16":
            raise bad(f"linear {name}: an fp16 linear is stored as a weight, not packed")
        try:
            layout = TileLayout(rows=rows, cols=cols, group_size=group, tile_rows=tile_rows, bits=_KINDS[kind])
        except ConfigError as e:
            raise bad(f"linear {name}: {e}") from None
        if t["shape"] != [layout.total_bytes]:
            raise bad(f"linear {name}: packed size {t['shape']} is not the layout's {layout.total_bytes} bytes")
    elif part == "weight":
        if kind != "fp16" or t["shape"] != [rows, cols]:
            raise bad(f"linear {name}: a weight entry must be fp16 of shape [{rows}, {cols}]")
    elif t["shape"] != [rows]:
        raise bad(f"linear {name}: bias shape must be [{rows}], got {t['shape']}")


def _check_against_config(cfg: Qwen2Config, entries: dict, group: int, lm_head: str, bad) -> None:
    """The tensor table holds exactly what the model config implies, nothing more."""
    params = {n: t for (n, _), t in entries.items() if t["role"] == "param"}
    want_params = {n: [cfg.hidden_size] for n in _required_params(cfg)}
    want_params["model.embed_tokens.weight"] = [cfg.vocab_size, cfg.hidden_size]
    for n, shape in want_params.items():
        if n not in params:
            raise bad(f"missing parameter {n}, which the model config implies", "mismatched .kq")
        if params[n]["shape"] != shape:
            raise bad(f"parameter {n} has shape {params[n]['shape']} but the model config needs {shape}",
                      "mismatched .kq")
    extra = sorted(set(params) - set(want_params))
    if extra:
        raise bad(f"parameter {extra[0]:.80} is not part of the model the header describes")
    for n in cfg.linear_names():
        packed, weight, bias = (entries.get((n, part)) for part in ("packed", "weight", "bias"))
        head = packed or weight
        if head is None:
            raise bad(f"linear {n} is missing from the tensor table", "mismatched .kq")
        if packed and weight:
            raise bad(f"linear {n} is stored both packed and as a weight")
        if n == "lm_head":
            if head["kind"] != lm_head:
                raise bad(f"lm_head is {head['kind']} but quant.lm_head says {lm_head}")
        elif head["kind"] != "int4" or head["group_size"] != group:
            raise bad(f"linear {n} is {head['kind']} g{head['group_size']}, not int4 g{group} as quant says")
        if cfg.has_bias(n) != (bias is not None):
            raise bad(f"linear {n} {'needs a bias entry' if bias is None else 'has a bias the architecture lacks'}")
        if bias is not None and (bias["kind"], bias["group_size"]) != (head["kind"], head["group_size"]):
            raise bad(f"linear {n}: its bias entry disagrees with its weights on kind or group_size")


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
        except (ValueError, RecursionError):
            raise FormatError(f"{p}: corrupt .kq header (not valid JSON)") from None
        self.config, self.entries = _validate_header(self.header, size, _PREFIX.size + hlen, p)
        self.layout = self.header["layout"]
        self.tile_rows = self.layout["tile_rows"]
        self.quant = self.header["quant"]
        if verify:
            for t in self.header["tensors"]:
                if zlib.crc32(self._view(t)) != t["crc32"]:
                    raise FormatError(f"{p}: corrupt .kq file: tensor {t['name']} {t.get('part', '')} "
                                      f"fails its checksum")

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
