"""Coverage-guided fuzzing of the .kq loader with atheris (libFuzzer), keeping the header's CRC valid.

The fuzz input is the JSON header of a .kq file. Each run writes a real .kq: the prefix with a
freshly computed header length and CRC-32, the mutated header, then the blobs of a small valid
model at their original offsets, so a mutant always gets past the checksum and exercises the
schema. A structured mutator edits the parsed JSON (deletes keys, sets nulls, swaps types, pushes
numbers to the edges, duplicates, drops and re-points tensor entries); libFuzzer's byte mutator
runs alongside it and keeps whatever reaches new code.

The oracle, for every mutant:
- loading (`KqFile`, `to_model`), `kriallm info` and a one-token golden decode raise nothing but
  the project's own error classes (sw/contract/errors.py);
- a mutant that loads gives the same model as the original (config, every array bit for bit),
  unless the change is a legitimate header change (`LEGITIMATE`: a model hyper-parameter the
  header states, or quantization metadata);
- no process grows above 2 GB (libFuzzer's -rss_limit_mb and -malloc_limit_mb).

Run it for as long as you like (docs/format.md, "Fuzzing"):

    make fuzz FUZZ_SECONDS=600      # or: python tests/fuzz_kq.py -max_total_time=600 DIR [DIR ...]

tests/test_fuzz_kq.py replays the regression corpus in tests/fuzz_corpus/kq and runs it for a
bounded time in the default test run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import struct
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

# Header fields a user may legitimately change: the model then differs, as the header says it does.
LEGITIMATE_MODEL = {"rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                    "torch_dtype", "use_sliding_window", "attention_dropout", "initializer_range",
                    "bos_token_id", "eos_token_id", "use_cache", "architectures", "model_type"}
LEGITIMATE_QUANT = {"method", "source", "calibration", "alpha", "search_mse_rtn_vs_awq", "lm_head_awq",
                    "rtn_fallback"}

_PREFIX = struct.Struct("<8sIII")
_RESERVE = 256 * 1024          # room for a grown header before the first blob


def micro_model():
    """A deterministic small Qwen2 (every structural feature: GQA, q/k/v biases, tied head), RTN g32."""
    from sw.config import Qwen2Config
    from sw.quant import quantize_model
    from sw.synth import synthesize
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=256)
    qm = quantize_model(cfg, synthesize(cfg, seed=0), method="rtn", group_size=32, lm_head="int4",
                        progress=False)
    qm.tokenizer_json = b'{"version": "1.0"}'
    return qm


class Base:
    """The original file: its header, its blob area, and the model it loads as."""

    def __init__(self, workdir: Path):
        from sw.kq import KqFile, save_kq
        self.dir = workdir
        src = workdir / "base.kq"
        save_kq(micro_model(), src, tile_rows=8)
        kq = KqFile(src)
        self.header = kq.header
        self.model = kq.to_model()
        kq.close()
        raw = src.read_bytes()
        first = min(t["offset"] for t in self.header["tensors"])
        # move every blob up by a fixed amount so a mutated header may grow
        self.shift = _RESERVE - (first % 4096) if first < _RESERVE else 0
        for t in self.header["tensors"]:
            t["offset"] += self.shift
        self.header["file_size"] += self.shift
        self.blobs = raw[first:]
        self.first = first + self.shift
        self.seed_bytes = json.dumps(self.header).encode()
        self.path = workdir / "mutant.kq"

    def write(self, header_bytes: bytes) -> bool:
        """The .kq of this header (CRC valid); False if the header does not fit before the blobs."""
        if _PREFIX.size + len(header_bytes) > self.first:
            return False
        with open(self.path, "wb") as f:
            f.write(_PREFIX.pack(b"KRIAKQ\r\n", 1, len(header_bytes), zlib.crc32(header_bytes)))
            f.write(header_bytes)
            f.write(b"\0" * (self.first - _PREFIX.size - len(header_bytes)))
            f.write(self.blobs)
        return True


def _same_model(a, b) -> bool:
    import dataclasses
    skip = LEGITIMATE_MODEL & {f.name for f in dataclasses.fields(a.config)}
    ca = {k: v for k, v in dataclasses.asdict(a.config).items() if k not in skip}
    cb = {k: v for k, v in dataclasses.asdict(b.config).items() if k not in skip}
    if ca != cb or set(a.params) != set(b.params) or set(a.linears) != set(b.linears):
        return False
    if any(not np.array_equal(a.params[n], b.params[n], equal_nan=True) for n in a.params):
        return False
    for n, qa in a.linears.items():
        qb = b.linears[n]
        if (qa.kind, qa.group_size) != (qb.kind, qb.group_size):
            return False
        for f in ("codes", "scales", "zeros", "bias", "weight"):
            x, y = getattr(qa, f), getattr(qb, f)
            if (x is None) != (y is None) or (x is not None and (x.shape != y.shape or x.tobytes() != y.tobytes())):
                return False
    for k in ("group_size", "lm_head"):
        if a.quant.get(k) != b.quant.get(k):
            return False
    return True


def _legitimate_change(base: dict, h: dict) -> bool:
    """True if `h` differs from `base` only in fields a user may legitimately change."""
    if not isinstance(h, dict) or set(h) != set(base):
        return False
    for k in base:
        if h[k] == base[k]:
            continue
        if k == "model" and isinstance(h[k], dict):
            keys = set(h[k]) | set(base[k])
            if any(h[k].get(x) != base[k].get(x) for x in keys - LEGITIMATE_MODEL):
                return False
        elif k == "quant" and isinstance(h[k], dict):
            keys = set(h[k]) | set(base[k])
            if any(h[k].get(x) != base[k].get(x) for x in keys - LEGITIMATE_QUANT):
                return False
        elif k == "tensors":
            # dropping the (optional) tokenizer is legitimate; any other table change is not
            rest = [t for t in base[k] if not (isinstance(t, dict) and t.get("role") == "tokenizer")]
            if h[k] != rest:
                return False
        else:
            return False
    return True


class Oracle:
    """Runs one mutant through the loader, `info` and a golden decode; raises on a real defect."""

    def __init__(self, base: Base):
        self.base = base
        self.loaded = 0

    def __call__(self, header_bytes: bytes) -> None:
        from sw.cli import main
        from sw.contract.errors import KriaError
        from sw.kq import KqFile
        if not self.base.write(header_bytes):
            return
        try:
            kq = KqFile(self.base.path)
            try:
                model = kq.to_model()
            finally:
                kq.close()
        except KriaError:
            return
        self.loaded += 1
        try:
            h = json.loads(header_bytes)
        except ValueError:
            h = None
        if not _same_model(model, self.base.model) and not _legitimate_change(self.base.header, h):
            raise AssertionError("an accepted mutant loads as a different model without a legitimate "
                                 "header change")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            for argv in (["info", str(self.base.path), "--json"],
                         ["generate", str(self.base.path), "--device", "golden", "--prompt-ids", "1,2",
                          "--max-new-tokens", "1", "--json"]):
                rc = main(argv)          # anything but a KriaError propagates as a crash
                if rc not in (0, 2):
                    raise AssertionError(f"{argv[0]} exited {rc}")


# ---------------------------------------------------------------------------
# Structured mutations of the header JSON
# ---------------------------------------------------------------------------

_EDGE_VALUES = [None, True, False, 0, -1, 1, 2, 3, 7, 31, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 70, -2 ** 63, 10 ** 9,
                0.5, -0.0, 1e308, "", "x", "int4", "int8", "fp16", "packed", "bias", "weight", "param",
                "linear", "tokenizer", [], {}, [1], [2 ** 70], [0, 0], [-1], {"a": 1}]


def _nodes(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, path + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_header(h, rng: random.Random):  # noqa: C901 (one branch per kind of damage)
    """One structured mutation of the header object (in place where possible); returns the result."""
    if not isinstance(h, dict):
        return rng.choice([h, {}, {"tensors": h}])
    nodes = list(_nodes(h))
    path, node = rng.choice(nodes)
    op = rng.randrange(10)
    if not path:
        return rng.choice(_EDGE_VALUES) if op == 0 else h
    parent, key = _get(h, path[:-1]), path[-1]
    if op == 0 and isinstance(parent, dict):                       # delete a key
        del parent[key]
    elif op == 1 and isinstance(parent, list):                     # drop a list element
        del parent[key]
    elif op == 2 and isinstance(parent, list):                     # duplicate a list element
        parent.insert(key, json.loads(json.dumps(parent[key])))
    elif op == 3 and isinstance(node, (int, float)) and not isinstance(node, bool):   # arithmetic edge
        parent[key] = rng.choice([node + 1, node - 1, -node, node * 2, node // 2 if isinstance(node, int) else node / 2,
                                  node + 4096, node - 4096, 0, 2 ** 64 + node])
    elif op == 4:                                                  # type swap / edge value
        parent[key] = rng.choice(_EDGE_VALUES)
    elif op == 5:                                                  # copy another node's value here
        other = rng.choice(nodes)[1]
        parent[key] = json.loads(json.dumps(other))
    elif op == 6 and "tensors" in h and isinstance(h["tensors"], list) and len(h["tensors"]) > 1:
        a, b = rng.sample(range(len(h["tensors"])), 2)             # alias two entries' bytes
        ta, tb = h["tensors"][a], h["tensors"][b]
        if isinstance(ta, dict) and isinstance(tb, dict):
            for k in rng.sample(["offset", "nbytes", "crc32", "shape"], rng.randrange(1, 5)):
                if k in tb:
                    ta[k] = tb[k]
    elif op == 7 and isinstance(h.get("model"), dict) and h["model"]:   # a model field to another value
        k = rng.choice(sorted(h["model"]))
        h["model"][k] = rng.choice(_EDGE_VALUES + [h["model"][k]])
    elif op == 8 and isinstance(h.get("tensors"), list) and h["tensors"]:
        t = rng.choice(h["tensors"])                                # rename an entry
        if isinstance(t, dict) and isinstance(t.get("name"), str):
            t["name"] = rng.choice([t["name"].replace("0", "1"), t["name"] + "x", "lm_head",
                                    "model.layers.5.self_attn.q_proj", "model.norm.weight", "tokenizer.json"])
    elif isinstance(parent, dict):
        parent[rng.choice(["extra", "part", "role", "kind"])] = rng.choice(_EDGE_VALUES)
    return h


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris
    rng = random.Random(seed)
    try:
        h = json.loads(data)
    except ValueError:
        h = None
    if h is None or rng.random() < 0.15:
        return atheris.Mutate(data, max_size)
    try:
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            h = mutate_header(h, rng)
        return json.dumps(h).encode()[:max_size]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, RecursionError):  # does not apply
        return atheris.Mutate(data, max_size)


def main(argv: list[str]) -> None:
    import atheris
    work = Path(tempfile.mkdtemp(prefix="kq-fuzz-"))
    with atheris.instrument_imports(include=["sw"]):
        import sw.cli  # noqa: F401
        import sw.config  # noqa: F401
        import sw.kq  # noqa: F401
    base = Base(work)
    oracle = Oracle(base)
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if corpus:                    # the seed, the valid header itself, into the working (first) corpus
        Path(corpus[0]).mkdir(parents=True, exist_ok=True)
        seed = Path(corpus[0]) / "seed.json"
        if not seed.exists():
            seed.write_bytes(base.seed_bytes)
    flags = [a for a in argv[1:] if a.startswith("-")]
    for default in ("-rss_limit_mb=2048", "-malloc_limit_mb=2048", "-max_len=262144", "-timeout=30",
                    f"-artifact_prefix={work}/"):
        if not any(f.split("=")[0] == default.split("=")[0] for f in flags):
            argv.append(default)
    atheris.Setup(argv, oracle, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main(sys.argv)
