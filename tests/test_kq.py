"""The .kq container: exact round trip and one clear error per kind of damage."""

import json
import struct
import zlib

import numpy as np
import pytest

from sw.cli import main
from sw.config import PRESETS
from sw.contract.errors import FormatError
from sw.kq import ALIGN, KqFile, load_kq, save_kq
from sw.qmodel import QuantLinear, QuantModel


def random_qmodel(seed=0, lm_head="int4", g=64):
    cfg = PRESETS["tiny"]
    rng = np.random.default_rng(seed)
    lin = {}
    for name in cfg.linear_names():
        n, k = cfg.shape_of(name)
        bias = rng.standard_normal(n).astype(np.float32) if name.endswith(("q_proj", "k_proj", "v_proj")) else None
        if name == "lm_head" and lm_head == "int8":
            lin[name] = QuantLinear("int8", g, codes=rng.integers(-127, 128, (n, k)).astype(np.int8),
                                    scales=rng.random(n).astype(np.float16))
        elif name == "lm_head" and lm_head == "fp16":
            lin[name] = QuantLinear("fp16", g, weight=rng.standard_normal((n, k)).astype(np.float16))
        else:
            lin[name] = QuantLinear("int4", g, codes=rng.integers(0, 16, (n, k)).astype(np.uint8),
                                    scales=(rng.random((n, k // g)) * 0.01).astype(np.float16),
                                    zeros=rng.integers(0, 16, (n, k // g)).astype(np.uint8), bias=bias)
    params = {"model.embed_tokens.weight": rng.standard_normal((cfg.vocab_size, cfg.hidden_size)).astype(np.float32),
              "model.norm.weight": rng.random(cfg.hidden_size).astype(np.float32)}
    for i in range(cfg.num_hidden_layers):
        for nm in ("input_layernorm", "post_attention_layernorm"):
            params[f"model.layers.{i}.{nm}.weight"] = rng.random(cfg.hidden_size).astype(np.float32)
    return QuantModel(cfg, {"method": "test", "group_size": g, "lm_head": lm_head}, params, lin,
                      tokenizer_json=b'{"fake": true}')


@pytest.fixture(scope="module")
def kq_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kq") / "m.kq"
    model = random_qmodel()
    save_kq(model, path)
    return path, model


@pytest.mark.parametrize("lm_head", ["int4", "int8", "fp16"])
def test_round_trip_is_exact(tmp_path, lm_head):
    model = random_qmodel(1, lm_head)
    save_kq(model, tmp_path / "m.kq")
    back = load_kq(tmp_path / "m.kq")
    assert back.config == model.config and back.tokenizer_json == model.tokenizer_json
    x = np.random.default_rng(2).standard_normal((2, model.config.hidden_size)).astype(np.float32)
    for name, q in model.linears.items():
        b = back.linears[name]
        assert b.kind == q.kind
        assert np.array_equal(q(x if q.shape[1] == x.shape[1] else np.ones((1, q.shape[1]), np.float32)).view(np.uint32),
                              b(x if q.shape[1] == x.shape[1] else np.ones((1, q.shape[1]), np.float32)).view(np.uint32))
    emb = back.params["model.embed_tokens.weight"]
    assert np.max(np.abs(emb - model.params["model.embed_tokens.weight"])) <= 2 ** -7 * np.abs(emb).max()


def test_blobs_are_aligned(kq_file):
    kq = KqFile(kq_file[0])
    assert all(t["offset"] % ALIGN == 0 for t in kq.header["tensors"])
    blob, layout = kq.linear_blob("model.layers.0.self_attn.q_proj")
    assert blob.size == layout.total_bytes


def _damaged(tmp_path, src, fn):
    data = bytearray(src.read_bytes())
    data = fn(data)
    p = tmp_path / "bad.kq"
    p.write_bytes(bytes(data))
    return p


def _rewrite_header(data, edit):
    magic, ver, hlen, _ = struct.unpack_from("<8sIII", data, 0)
    h = json.loads(bytes(data[20:20 + hlen]))
    edit(h)
    raw = json.dumps(h).encode()
    assert len(raw) <= hlen + 40
    raw = raw.ljust(hlen)  # keep blob offsets valid
    out = bytearray(data)
    out[0:20] = struct.pack("<8sIII", magic, ver, len(raw), zlib.crc32(raw))
    out[20:20 + len(raw)] = raw
    return out


def _flip_blob_byte(data):
    data[-ALIGN - 100] ^= 0x40
    return data


def _shrink_head(h):
    h["model"]["hidden_size"] = 64
    h["model"]["num_attention_heads"] = 2
    h["model"]["num_key_value_heads"] = 1


CASES = {
    "truncated": (lambda d: d[:len(d) - 5000], "truncated"),
    "flipped blob byte": (_flip_blob_byte, "fails its checksum"),
    "flipped header byte": (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "corrupt .kq header"),
    "wrong magic": (lambda d: b"PK\x03\x04" + d[4:], "bad magic"),
    "unknown version": (lambda d: d[:8] + struct.pack("<I", 99) + d[12:], "version 99 is not supported"),
    "tiny stub": (lambda d: d[:10], "truncated"),
    "mismatched shapes": (lambda d: _rewrite_header(d, _shrink_head), "mismatched"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damage_gives_one_clear_error(tmp_path, kq_file, case, capsys):
    fn, message = CASES[case]
    bad = _damaged(tmp_path, kq_file[0], fn)
    with pytest.raises(FormatError, match=message):
        load_kq(bad)
    # The CLI turns it into one line on stderr and exit status 2, no traceback.
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0]


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load_kq(tmp_path / "nope.kq")
    with pytest.raises(FormatError, match="directory"):
        load_kq(tmp_path)


def test_no_partial_file_left_behind(tmp_path):
    save_kq(random_qmodel(), tmp_path / "m.kq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.kq"]
