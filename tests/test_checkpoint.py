"""safetensors reader/writer and HF checkpoint loading."""

import json
import struct

import numpy as np
import pytest

from sw.checkpoint import expected_shapes, load_checkpoint, save_checkpoint
from sw.config import preset
from sw.contract.errors import CheckpointError, ConfigError
from sw.safetensors_io import f32_to_bf16_bits, read_safetensors, write_safetensors

CONFIG = preset("tiny")


def _random_tensors(config=CONFIG, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in expected_shapes(config).items()}


def _bf16_value(bits: np.ndarray) -> np.ndarray:
    """float64 value of 16-bit bf16 patterns, with the exponent range
    unbounded (0x7F80 means 2^128), as IEEE rounding decisions require."""
    bits = bits.astype(np.int64)
    sign = np.where(bits & 0x8000, -1.0, 1.0)
    exp = (bits >> 7) & 0xFF
    mant = (bits & 0x7F).astype(np.float64)
    normal = np.ldexp(1.0 + mant / 128, (exp - 127).astype(np.int32))
    subnormal = np.ldexp(mant / 128, -126)
    return sign * np.where(exp == 0, subnormal, normal)


def _manual_bf16(x: np.ndarray) -> np.ndarray:
    """Independent RNE for finite x: pick the nearer of the two bf16
    neighbours in float64, the even one on a tie; past the range is inf."""
    top = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
    xf = x.astype(np.float64)
    err_lo = np.abs(xf - _bf16_value(top))
    err_hi = np.abs(_bf16_value(top + 1) - xf)
    pick_hi = (err_hi < err_lo) | ((err_hi == err_lo) & (top % 2 == 1))
    bits = np.where(pick_hi, top + 1, top).astype(np.uint32)
    return (bits << 16).view(np.float32)


# ---- safetensors -----------------------------------------------------------

def test_reads_official_files(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(1)
    tensors = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.i32": rng.integers(-1000, 1000, (2, 3, 4)).astype(np.int32),
        "d.scalar": np.array(2.5, np.float32),
        "e.empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "official.safetensors"
    st.save_file(tensors, str(path))
    ours = read_safetensors(path)
    assert set(ours) == set(tensors)
    for name, value in tensors.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape
        np.testing.assert_array_equal(ours[name], value)


def test_official_reader_reads_ours(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tensors = {"z": np.arange(6, dtype=np.int64).reshape(2, 3),
               "a": np.linspace(-1, 1, 9, dtype=np.float32), "m": np.array([True, False])}
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, tensors)
    back = st.load_file(str(path))
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)


def test_header_layout(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"b": np.ones(3, np.float32), "a": np.ones(2, np.float32)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"]["data_offsets"] == [0, 8] and header["b"]["data_offsets"] == [8, 20]


def test_bf16_round_trip_is_rne(tmp_path):
    rng = np.random.default_rng(2)
    specials = np.array([0.0, -0.0, 1.0, 3.39e38, 3.397e38, 3.4e38, -3.4e38, 1e-40, -1e-45,
                         1.00390625, 1.01171875, 1.0 + 2 ** -8 + 2 ** -20], np.float32)
    # Exact ties between two bf16 values: bit 15 set, bits 0-14 clear.
    ties = (rng.integers(0, 2 ** 15, 64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    wide = rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000)
    x = np.concatenate([wide, specials, ties]).astype(np.float32)
    path = tmp_path / "bf16.safetensors"
    write_safetensors(path, {"x": x, "keep": x.copy()}, bf16={"x"})
    back = read_safetensors(path)
    assert back["x"].dtype == np.float32 and back["keep"].dtype == np.float32
    np.testing.assert_array_equal(back["x"].view(np.uint32), _manual_bf16(x).view(np.uint32))
    np.testing.assert_array_equal(back["keep"], x)


def test_bf16_specials():
    nan_payload = np.uint32(0x7F800001).view(np.float32)
    x = np.array([np.nan, -np.nan, nan_payload, np.inf, -np.inf], np.float32)
    back = (f32_to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    assert np.all(np.isnan(back[:3]))
    assert back[3] == np.inf and back[4] == -np.inf


def test_non_float_cannot_be_bf16(tmp_path):
    with pytest.raises(TypeError):
        write_safetensors(tmp_path / "x.safetensors", {"i": np.arange(3)}, bf16={"i"})


def _valid_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    write_safetensors(path, {"w": np.arange(64, dtype=np.float32)})
    return path


def _with_header(tmp_path, header: dict, data: bytes = b"") -> str:
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("short", "too short"),
    ("huge_header", "exceeds the file size"),
    ("garbage_json", "not valid JSON"),
    ("not_object", "not a JSON object"),
    ("unknown_dtype", "unsupported dtype"),
    ("outside", "truncated or corrupt"),
    ("size_mismatch", "needs"),
    ("truncated", "truncated or corrupt"),
    ("shape_2_70", "needs"),
    ("list_dtype", "unsupported dtype"),
])
def test_bad_safetensors(tmp_path, case, message):
    if case == "missing":
        path = tmp_path / "nope.safetensors"
    elif case == "short":
        path = tmp_path / "short.safetensors"
        path.write_bytes(b"\x01\x02")
    elif case == "huge_header":
        path = tmp_path / "huge.safetensors"
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif case == "garbage_json":
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(struct.pack("<Q", 6) + b"{nope!")
    elif case == "not_object":
        path = _with_header(tmp_path, [1, 2])
    elif case == "unknown_dtype":
        path = _with_header(tmp_path, {"w": {"dtype": "F8_E4M3", "shape": [2],
                                              "data_offsets": [0, 2]}}, b"\0\0")
    elif case == "outside":
        path = _with_header(tmp_path, {"w": {"dtype": "F32", "shape": [4],
                                              "data_offsets": [0, 16]}}, b"\0" * 8)
    elif case == "shape_2_70":          # used to overflow into a traceback
        path = _with_header(tmp_path, {"w": {"dtype": "F32", "shape": [2 ** 70],
                                              "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "list_dtype":
        path = _with_header(tmp_path, {"w": {"dtype": ["F32"], "shape": [4],
                                              "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "size_mismatch":
        path = _with_header(tmp_path, {"w": {"dtype": "F32", "shape": [3],
                                              "data_offsets": [0, 16]}}, b"\0" * 16)
    else:
        path = _valid_file(tmp_path)
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=message) as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


def test_reads_are_memory_mapped_views(tmp_path):
    path = _valid_file(tmp_path)
    w = read_safetensors(path)["w"]
    assert not w.flags.owndata and not w.flags.writeable


# ---- checkpoints -------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    tensors = _random_tensors()
    save_checkpoint(tmp_path / "ck", CONFIG, tensors, bf16=False)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.config == CONFIG and ck.quantization_config is None and not ck.has_tokenizer
    assert set(ck.tensors) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(ck.tensors[name], value)


def test_bf16_checkpoint_matches_rounding(tmp_path):
    tensors = _random_tensors()
    save_checkpoint(tmp_path / "ck", CONFIG, tensors)
    ck = load_checkpoint(tmp_path / "ck")
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(ck.tensors[name], _manual_bf16(tensors[name]))


def test_sharded_round_trip(tmp_path):
    tensors = _random_tensors()
    save_checkpoint(tmp_path / "single", CONFIG, tensors)
    save_checkpoint(tmp_path / "sharded", CONFIG, tensors, shard_bytes=100_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    a = load_checkpoint(tmp_path / "single").tensors
    b = load_checkpoint(tmp_path / "sharded").tensors
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_resave_replaces_old_weights(tmp_path):
    tensors = _random_tensors()
    save_checkpoint(tmp_path / "ck", CONFIG, tensors, shard_bytes=100_000)
    save_checkpoint(tmp_path / "ck", CONFIG, tensors)
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors")) == ["model.safetensors"]
    load_checkpoint(tmp_path / "ck")


def test_any_safetensors_name(tmp_path):
    tensors = _random_tensors()
    names = sorted(tensors)
    root = tmp_path / "ck"
    save_checkpoint(root, CONFIG, {})
    (root / "model.safetensors").unlink()
    write_safetensors(root / "part-a.safetensors", {n: tensors[n] for n in names[:10]})
    write_safetensors(root / "part-b.safetensors", {n: tensors[n] for n in names[10:]})
    assert set(load_checkpoint(root).tensors) == set(tensors)


def test_tokenizer_detected(tmp_path):
    save_checkpoint(tmp_path, CONFIG, _random_tensors())
    (tmp_path / "tokenizer.json").write_text("{}")
    assert load_checkpoint(tmp_path).has_tokenizer


def test_untied_needs_lm_head(tmp_path):
    import dataclasses
    config = dataclasses.replace(CONFIG, tie_word_embeddings=False)
    tensors = _random_tensors()            # tied layout: no lm_head.weight
    save_checkpoint(tmp_path, config, tensors)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, config, _random_tensors(config))
    assert load_checkpoint(tmp_path).tensors["lm_head.weight"].shape == (512, 128)


def test_awq_layout_accepted(tmp_path):
    tensors = _random_tensors()
    for layer in range(CONFIG.num_hidden_layers):
        for linear, (n, k) in CONFIG.linear_shapes().items():
            base = f"model.layers.{layer}.{linear}"
            del tensors[f"{base}.weight"]
            tensors[f"{base}.qweight"] = np.zeros((k, n // 8), np.int32)
            tensors[f"{base}.qzeros"] = np.zeros((k // 64, n // 8), np.int32)
            tensors[f"{base}.scales"] = np.ones((k // 64, n), np.float16)
    quant = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}
    save_checkpoint(tmp_path, CONFIG, tensors, bf16=False,
                    extra_config={"quantization_config": quant})
    ck = load_checkpoint(tmp_path)
    assert ck.is_awq and ck.quantization_config == quant
    assert ck.tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == np.int32

    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_checkpoint(tmp_path, CONFIG, tensors, bf16=False,
                    extra_config={"quantization_config": quant})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.scales"):
        load_checkpoint(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "f")


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        load_checkpoint(tmp_path)


def test_no_weights(tmp_path):
    save_checkpoint(tmp_path, CONFIG, {})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)


def test_index_names_missing_shard(tmp_path):
    save_checkpoint(tmp_path, CONFIG, _random_tensors(), shard_bytes=100_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(tmp_path)


def test_missing_tensors_listed(tmp_path):
    tensors = _random_tensors()
    del tensors["model.norm.weight"]
    del tensors["model.layers.0.self_attn.k_proj.bias"]
    save_checkpoint(tmp_path, CONFIG, tensors)
    with pytest.raises(CheckpointError, match="missing 2 expected") as info:
        load_checkpoint(tmp_path)
    assert "model.norm.weight" in str(info.value)
    assert "model.layers.0.self_attn.k_proj.bias" in str(info.value)


def test_shape_mismatch(tmp_path):
    tensors = _random_tensors()
    tensors["model.layers.1.mlp.gate_proj.weight"] = np.zeros((384, 64), np.float32)
    save_checkpoint(tmp_path, CONFIG, tensors)
    with pytest.raises(CheckpointError,
                       match=r"gate_proj.weight is \(384, 64\), expected \(384, 128\)"):
        load_checkpoint(tmp_path)


# config.json values that used to pass (or crash later): each is now one sentence naming the field,
# through the CLI as a user meets it: exit status 2, no traceback.
@pytest.mark.parametrize("patch, words", [
    ({"rope_theta": "1000000.0"}, "rope_theta"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"architectures": 5}, "architectures"),
    ({"head_dim": None, "hidden_size": None}, "missing required key"),
    ({"quantization_config": "awq"}, "quantization_config"),
    ({"num_hidden_layers": 10 ** 8}, "num_hidden_layers"),
    ({"vocab_size": True}, "vocab_size"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    pytest.param(b"\xff\xfe{not utf-8", "not UTF-8", id="not-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deeply-nested"),
])
def test_bad_config_json_through_the_cli(tmp_path, patch, words):
    import subprocess
    import sys
    from sw.config import preset
    d = tmp_path / "ckpt"
    save_checkpoint(d, preset("tiny"), {})
    cfg = d / "config.json"
    if isinstance(patch, bytes):
        cfg.write_bytes(patch)
    else:
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **patch}))
    r = subprocess.run([sys.executable, "-m", "sw.cli", "quantize", str(d), "--quiet", "--out",
                        str(tmp_path / "x.kq")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x.kq").exists()
