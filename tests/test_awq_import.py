"""AutoAWQ GEMM checkpoints: bit order, exact export -> import round trip, errors."""

import json

import numpy as np
import pytest

from sw.awq_import import (AWQ_PACK_ORDER, export_awq, import_awq, is_awq_checkpoint, pack_awq,
                           unpack_awq)
from sw.checkpoint import Checkpoint, load_checkpoint
from sw.config import PRESETS
from sw.contract.errors import CheckpointError, ConfigError
from sw.quant import quantize_model, round_to_bf16
from sw.reference import Qwen2Runner, reference_linears

TINY = PRESETS["tiny"]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def autoawq_pack(intweight):
    """WQLinear_GEMM.from_linear's packing loop, restated column by column."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = intweight.shape
    q = np.zeros((rows, cols // 8), np.uint32)
    for col in range(cols // 8):
        for i in range(8):
            q[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint32) << (i * 4)
    return q.view(np.int32)


def autoawq_dequantize(qweight, qzeros, scales, group_size):
    """awq.utils.packing_utils.dequantize_gemm restated: unpack by shifts, then
    reverse_awq_order, then (w - z) * s with groups along the rows (K)."""
    def unpack(p):
        shifts = np.arange(0, 32, 4, dtype=np.uint32)
        v = (p.view(np.uint32)[:, :, None] >> shifts[None, None, :]) & 0xF
        v = v.reshape(p.shape[0], -1)
        order = np.arange(v.shape[1]).reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
        return v[:, order].astype(np.float32)
    w, z = unpack(qweight), unpack(qzeros)
    s = scales.astype(np.float32)
    return (w - np.repeat(z, group_size, 0)) * np.repeat(s, group_size, 0)   # [K, N]


def test_pack_bit_order():
    cols = np.arange(1, 9, dtype=np.uint8)[None, :]      # column j holds j + 1
    packed = pack_awq(cols)
    assert packed.dtype == np.int32 and packed.shape == (1, 1)
    # nibble i holds column AWQ_PACK_ORDER[i]: 1, 3, 5, 7, 2, 4, 6, 8 from the low end
    assert int(packed.view(np.uint32)[0, 0]) == 0x86427531
    assert AWQ_PACK_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    rng = np.random.default_rng(0)
    v = rng.integers(0, 16, (24, 64)).astype(np.uint8)
    assert np.array_equal(pack_awq(v), autoawq_pack(v))
    assert np.array_equal(unpack_awq(pack_awq(v)), v)
    with pytest.raises(ConfigError):
        pack_awq(np.full((1, 8), 16))


@pytest.fixture(scope="module")
def tiny(tiny_tensors):
    """The tiny synthetic model as a BF16 checkpoint loads (float32 of bf16 values)."""
    return {k: round_to_bf16(v) for k, v in tiny_tensors.items()}


@pytest.fixture(scope="module", params=[64, 128])
def quantized(request, tiny):
    return quantize_model(TINY, tiny, method="rtn", group_size=request.param, lm_head="fp16",
                          progress=False)


def test_export_import_round_trip_is_exact(quantized, tmp_path):
    g = quantized.quant["group_size"]
    out = export_awq(quantized, tmp_path / "awq")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": g,
                                          "zero_point": True, "version": "gemm",
                                          "modules_to_not_convert": None}
    ckpt = load_checkpoint(out)
    assert is_awq_checkpoint(ckpt)
    t = ckpt.tensors
    name = "model.layers.1.self_attn.q_proj"
    n, k = TINY.shape_of(name)
    assert t[f"{name}.qweight"].dtype == np.int32 and t[f"{name}.qweight"].shape == (k, n // 8)
    assert t[f"{name}.qzeros"].shape == (k // g, n // 8)
    assert t[f"{name}.scales"].dtype == np.float16 and t[f"{name}.scales"].shape == (k // g, n)
    assert t[f"{name}.bias"].dtype == np.float16
    # An independent restatement of AutoAWQ's dequantizer sees our weights.
    for lin in TINY.linear_names()[:-1]:
        ref = autoawq_dequantize(t[f"{lin}.qweight"], t[f"{lin}.qzeros"], t[f"{lin}.scales"], g)
        assert np.array_equal(ref.T, quantized.linears[lin].dequantized())

    back = import_awq(ckpt)
    assert back.quant["method"] == "awq-import" and back.quant["group_size"] == g
    assert back.quant["rtn_fallback"] == []
    for lin in TINY.linear_names()[:-1]:
        a, b = quantized.linears[lin], back.linears[lin]
        assert b.kind == "int4" and b.group_size == g
        assert np.array_equal(a.codes, b.codes) and np.array_equal(a.zeros, b.zeros)
        assert np.array_equal(a.scales.view(np.uint16), b.scales.view(np.uint16))
        if a.bias is None:
            assert b.bias is None
        else:
            assert np.array_equal(b.bias, a.bias.astype(np.float16).astype(np.float32))
    # The tied head comes from the embeddings, which travel as fp16 (bf16 values:
    # exact except in the fp16 subnormal range).
    assert np.allclose(back.linears["lm_head"].weight.astype(np.float32),
                       quantized.linears["lm_head"].weight.astype(np.float32), rtol=0, atol=1e-7)
    # Second hop: import -> export -> import is the identity on every stored tensor.
    again = load_checkpoint(export_awq(back, tmp_path / "awq2"))
    assert set(again.tensors) == set(t)
    for key in t:
        assert np.array_equal(np.asarray(again.tensors[key]).view(np.uint8),
                              np.asarray(t[key]).view(np.uint8)), key


def test_imported_model_runs_like_the_exported_one(tiny, tmp_path):
    qm = quantize_model(TINY, tiny, method="awq", group_size=64, lm_head="fp16",
                        calib_tokens=np.arange(64) % TINY.vocab_size, progress=False, n_grid=4)
    back = import_awq(load_checkpoint(export_awq(qm, tmp_path / "awq")))
    # Non-linear tensors travel as fp16, as AutoAWQ stores them.
    for name, arr in qm.params.items():
        assert np.array_equal(back.params[name], arr.astype(np.float16).astype(np.float32)), name
    ids = np.arange(1, 33)

    def rel_err(config, params, linear):
        r = Qwen2Runner(config, params, linear)
        y = r.forward(ids, r.new_cache())
        assert np.all(np.isfinite(y))
        return np.linalg.norm(y - ref) / np.linalg.norm(ref)

    r = Qwen2Runner(TINY, tiny, reference_linears(TINY, tiny))
    ref = r.forward(ids, r.new_cache())
    # The synthetic model amplifies small changes, so compare errors against the
    # float model rather than the two quantized models with each other.
    assert rel_err(back.config, back.params, back.linear_fn()) < \
        1.2 * rel_err(qm.config, qm.params, qm.linear_fn())


def test_untied_lm_head_and_int4_head_import(tiny, tmp_path):
    import dataclasses
    cfg = dataclasses.replace(TINY, tie_word_embeddings=False)
    t = dict(tiny, **{"lm_head.weight": tiny["model.embed_tokens.weight"][::-1].copy()})
    qm = quantize_model(cfg, t, method="rtn", group_size=128, lm_head="fp16", progress=False)
    ckpt = load_checkpoint(export_awq(qm, tmp_path / "awq"))
    assert ckpt.tensors["lm_head.weight"].dtype == np.float16
    back = import_awq(ckpt, lm_head="int4")
    assert back.linears["lm_head"].kind == "int4" and back.linears["lm_head"].group_size == 128
    assert not back.config.tie_word_embeddings


def _fake_ckpt(qc, tensors=None):
    return Checkpoint(config=TINY, tensors=tensors or {}, quantization_config=qc,
                      path="/nowhere", has_tokenizer=False)


def test_unsupported_awq_configs_raise_one_clear_error():
    bad = {"quant_method": "awq", "bits": 8, "group_size": 128, "zero_point": False,
           "version": "gemv"}
    with pytest.raises(ConfigError) as e:
        import_awq(_fake_ckpt(bad))
    msg = str(e.value)
    assert "bits 8" in msg and "gemv" in msg and "zero_point False" in msg
    with pytest.raises(ConfigError, match="group_size 256"):
        import_awq(_fake_ckpt({"quant_method": "awq", "bits": 4, "group_size": 256,
                               "zero_point": True, "version": "GEMM"}))
    with pytest.raises(ConfigError, match="not an AWQ checkpoint"):
        import_awq(_fake_ckpt(None))
    assert not is_awq_checkpoint(_fake_ckpt({"quant_method": "gptq"}))
    with pytest.raises(ConfigError, match="LM head"):
        import_awq(_fake_ckpt({"quant_method": "awq", "bits": 4, "group_size": 64}), lm_head="int3")


def test_bad_awq_tensors(quantized, tmp_path):
    ckpt = load_checkpoint(export_awq(quantized, tmp_path / "awq"))
    name = "model.layers.0.mlp.down_proj"
    t = dict(ckpt.tensors)
    t[f"{name}.qzeros"] = t[f"{name}.qzeros"][:1]
    with pytest.raises(CheckpointError, match="qzeros"):
        import_awq(Checkpoint(ckpt.config, t, ckpt.quantization_config, ckpt.path, False))
    t = dict(ckpt.tensors)
    t[f"{name}.qweight"] = t[f"{name}.qweight"].astype(np.int64)
    with pytest.raises(CheckpointError, match="dtype"):
        import_awq(Checkpoint(ckpt.config, t, ckpt.quantization_config, ckpt.path, False))
    t = {k: v for k, v in ckpt.tensors.items() if not k.startswith(name)}
    with pytest.raises(CheckpointError, match="neither"):
        import_awq(Checkpoint(ckpt.config, t, ckpt.quantization_config, ckpt.path, False))


def test_unconverted_linear_falls_back_to_rtn(quantized, tiny, tmp_path):
    ckpt = load_checkpoint(export_awq(quantized, tmp_path / "awq"))
    name = "model.layers.0.mlp.down_proj"
    t = {k: v for k, v in ckpt.tensors.items() if not k.startswith(name)}
    t[f"{name}.weight"] = tiny[f"{name}.weight"]
    back = import_awq(Checkpoint(ckpt.config, t, ckpt.quantization_config, ckpt.path, False))
    assert back.quant["rtn_fallback"] == [name]
    assert np.array_equal(back.linears[name].codes, quantized.linears[name].codes)


def test_export_rejects_non_int4_linears(quantized, tmp_path):
    import copy
    qm = copy.copy(quantized)
    qm.linears = dict(quantized.linears)
    from sw.quant import quantize_int8_per_channel
    name = "model.layers.0.mlp.up_proj"
    qm.linears[name] = quantize_int8_per_channel(quantized.linears[name].dequantized(), 64)
    with pytest.raises(ConfigError, match="INT4"):
        export_awq(qm, tmp_path / "x")
