"""Quantizers: RTN / INT8 / fp16 numbers, AWQ search and folding, calibration tokens."""

import json

import numpy as np
import pytest

from sw.calibration import calibration_tokens, read_token_file, synthetic_tokens
from sw.config import PRESETS
from sw.contract.errors import ConfigError, KriaError
from sw.quant import (HeadTie, awq_scale_model, awq_scales, fake_quant_weight, quantize_fp16,
                      quantize_int8_per_channel, quantize_model, quantize_rtn, round_to_bf16,
                      search_clip, search_scales, apply_clip)
from sw.reference import Qwen2Runner, reference_linears

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def calib():
    return calibration_tokens(None, TINY, 128, seed=1)


@pytest.fixture(scope="module")
def tiny_models(tiny_tensors, calib):
    """(method, group) -> QuantModel of the tiny synthetic model, fp16 LM head."""
    return {(m, g): quantize_model(TINY, tiny_tensors, method=m, group_size=g, lm_head="fp16",
                                   calib_tokens=calib, progress=False, n_grid=10)
            for m in ("rtn", "awq") for g in (64, 128)}


def outlier_layer(seed=0, n=512, k=1024, t=512, n_outliers=8):
    """W ~ N(0, 0.02); inputs N(0, 1) with a handful of channels 20-50x larger."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    x = rng.standard_normal((t, k)).astype(np.float32)
    ch = rng.choice(k, n_outliers, replace=False)
    x[:, ch] *= rng.uniform(20, 50, n_outliers).astype(np.float32)
    return w, x


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ RTN / INT8 / fp16

@pytest.mark.parametrize("g", [32, 64, 128])
def test_rtn_codes_zeros_and_error_bound(g):
    rng = np.random.default_rng(g)
    w = (rng.standard_normal((48, 256)) * 0.02).astype(np.float32)
    q = quantize_rtn(w, g)
    n, k = w.shape
    assert q.kind == "int4" and q.group_size == g
    assert q.codes.dtype == np.uint8 and q.codes.shape == (n, k)
    assert q.zeros.dtype == np.uint8 and q.zeros.shape == (n, k // g)
    assert q.scales.dtype == np.float16 and q.scales.shape == (n, k // g)
    assert q.codes.max() <= 15 and q.zeros.max() <= 15
    # Self-consistent with the stored fp16 scale.
    s = q.scales.astype(np.float32)
    wg = w.reshape(n, k // g, g)
    codes = np.clip(np.rint(wg / s[..., None]) + q.zeros[..., None], 0, 15)
    assert np.array_equal(codes.reshape(n, k), q.codes)
    assert np.array_equal(q.zeros, np.clip(np.rint(-wg.min(-1) / s), 0, 15))
    # Every group straddles 0 here, so the error is at most half a step, plus
    # the fp16 rounding of the scale (2^-11 relative) over at most 15 steps.
    err = np.abs(q.dequantized() - w).reshape(n, k // g, g).max(-1)
    assert np.all(err <= s * (0.5 + 15 * 2.0 ** -11) + 1e-7)
    assert np.array_equal(fake_quant_weight(w, g), q.dequantized())


def test_rtn_matches_autoawq_formula_on_a_hand_example():
    w = np.linspace(-0.3, 0.45, 32, dtype=np.float32)[None, :]
    q = quantize_rtn(w, 32)
    scale = np.float16((0.45 - (-0.3)) / 15)
    assert q.scales[0, 0] == scale
    zero = np.clip(np.rint(0.3 / np.float32(scale)), 0, 15)
    assert q.zeros[0, 0] == zero
    assert q.codes[0, 0] == 0 and q.codes[0, -1] == 15


def test_rtn_constant_group_is_guarded_and_clip_ratio_shrinks_the_range():
    w = np.zeros((2, 64), np.float32)
    w[1] = 0.5
    q = quantize_rtn(w, 64)
    assert np.all(np.isfinite(q.scales.astype(np.float32))) and np.all(q.scales > 0)
    assert np.allclose(q.dequantized()[0], 0)
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    full, clipped = quantize_rtn(w, 64), quantize_rtn(w, 64, clip_ratio=0.8)
    assert np.all(clipped.scales.astype(np.float32) < full.scales.astype(np.float32))


def test_int8_per_channel_and_fp16():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 128)) * 0.05).astype(np.float32)
    q = quantize_int8_per_channel(w, 64, bias=np.ones(16))
    assert q.kind == "int8" and q.codes.dtype == np.int8 and q.scales.shape == (16,)
    assert np.abs(q.codes.astype(int)).max() <= 127
    assert np.array_equal(q.scales, (np.abs(w).max(1) / 127).astype(np.float16))
    s = q.scales.astype(np.float32)[:, None]
    assert np.all(np.abs(q.dequantized() - w) <= 0.5 * s + 1e-7)
    assert np.array_equal(fake_quant_weight(w, 64, "int8"), q.dequantized())
    h = quantize_fp16(w, 64)
    assert h.kind == "fp16" and h.weight.dtype == np.float16


def test_group_size_and_shape_errors():
    w = np.zeros((4, 96), np.float32)
    with pytest.raises(ConfigError, match="32, 64, 128"):
        quantize_rtn(w, 48)
    with pytest.raises(ConfigError, match="not a multiple"):
        quantize_rtn(w, 64)
    with pytest.raises(KriaError, match="NaN"):
        quantize_rtn(np.full((2, 64), np.nan, np.float32), 64)


def test_round_to_bf16():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -3.14159], np.float32)
    r = round_to_bf16(x)
    assert np.all(r.view(np.uint32) & 0xFFFF == 0)
    assert r[0] == 1.0 and r[1] == 1.0 and r[2] == 1.0 + 2 ** -6  # ties to even


# ------------------------------------------------------------------ AWQ on one layer

@pytest.mark.parametrize("g", [64, 128])
def test_awq_beats_rtn_on_a_layer_with_outlier_channels(g, record_property):
    w, x = outlier_layer()
    x_cal, x_eval = x[:256], x[256:]          # calibrate and evaluate on different tokens
    y = x_eval @ w.T
    res = search_scales(x_cal, [w], g)
    rtn, awq = quantize_rtn(w, g), quantize_rtn(w * res.scales, g)
    xs = x_eval / res.scales
    weight_only = (rel(x_eval @ rtn.dequantized().T, y), rel(xs @ awq.dequantized().T, y))
    golden = (rel(rtn(x_eval), y), rel(awq(xs), y))   # with the hardware's INT8 activations
    print(f"\ng{g}: alpha {res.alpha}; relative output error RTN vs AWQ: weight-only "
          f"{weight_only[0]:.4f} vs {weight_only[1]:.4f}, golden {golden[0]:.4f} vs {golden[1]:.4f}")
    record_property(f"g{g}", {"alpha": res.alpha, "weight_only": weight_only, "golden": golden})
    assert 0 < res.alpha < 1
    assert res.losses[0] == res.rtn_loss and res.loss == min(res.losses)
    assert weight_only[1] < 0.7 * weight_only[0]
    assert golden[1] < 0.7 * golden[0]


def test_awq_scales_normalisation_and_alpha_zero_is_rtn():
    stat = np.array([0.5, 1.0, 2.0, 40.0])
    assert np.array_equal(awq_scales(stat, 0.0), np.ones(4, np.float32))
    s = awq_scales(stat, 0.5)
    assert np.isclose(s.max() * s.min(), 1.0, rtol=1e-6)
    assert np.all(np.diff(s) > 0)


def test_head_tie_matches_repeat_kv_order():
    tie = HeadTie(n_kv=2, rep=3, head_dim=4)
    s = np.arange(8, dtype=np.float32)
    e = tie.expand(s)
    # query head h reads kv head h // rep
    for h in range(6):
        assert np.array_equal(e[h * 4:(h + 1) * 4], s[(h // 3) * 4:(h // 3 + 1) * 4])
    assert np.array_equal(tie.reduce(e), s) and np.array_equal(tie.first(e), s)


@pytest.mark.parametrize("act_quant", [False, True])
def test_clip_search_equals_the_direct_error(act_quant):
    """The quadratic form picks what AutoAWQ's direct partial-sum error picks."""
    from sw.quant import fake_quant_activations
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((32, 128)) * 0.02).astype(np.float32)
    x = rng.standard_normal((64, 128)).astype(np.float32)
    x[:, 5] *= 30
    got = search_clip(w, x, 64, act_quant=act_quant)
    xq = fake_quant_activations(x, 64) if act_quant else x
    wg = w.reshape(32, 2, 64)
    org = np.abs(wg).max(-1)
    errs = []
    for i in range(10):
        mv = org * np.float32(1 - i / 20)
        q = fake_quant_weight(np.clip(wg, -mv[..., None], mv[..., None]).reshape(32, 128), 64)
        q = q.reshape(32, 2, 64)
        out_q = np.einsum("tgk,ngk->ntg", xq.reshape(64, 2, 64).astype(np.float64), q)
        out = np.einsum("tgk,ngk->ntg", x.reshape(64, 2, 64).astype(np.float64), wg)
        errs.append(((out_q - out) ** 2).mean(1))
    best = np.argmin(np.stack(errs), axis=0)
    want = org * (1 - best / 20).astype(np.float32)
    assert np.mean(np.isclose(got, want, rtol=1e-6)) > 0.95   # float ties aside


def test_clip_search_lowers_weight_error():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 256)) * 0.02).astype(np.float32)
    x = rng.standard_normal((256, 256)).astype(np.float32)
    mv = search_clip(w, x, 64, act_quant=False)
    ratio = mv / np.abs(w).reshape(256, 4, 64).max(-1)
    assert ratio.min() >= 0.5 and ratio.max() <= 1.0 and ratio.mean() < 1.0
    y = x @ w.T
    before = rel(x @ fake_quant_weight(w, 64).T, y)
    after = rel(x @ fake_quant_weight(apply_clip(w, mv, 64), 64).T, y)
    assert after < before


# ------------------------------------------------------------------ AWQ on a model

def logits(config, params, linear, tokens):
    runner = Qwen2Runner(config, params, linear)
    return runner.forward(tokens, runner.new_cache())


def test_awq_folding_is_an_identity_of_the_float_model(tiny_tensors, calib):
    cfg2, scaled, info = awq_scale_model(TINY, tiny_tensors, calib, 64, lm_head="int4", n_grid=5)
    assert not cfg2.tie_word_embeddings and "lm_head.weight" in scaled
    tokens = calibration_tokens(None, TINY, 64, seed=5)
    y0 = logits(TINY, tiny_tensors, reference_linears(TINY, tiny_tensors), tokens)
    y1 = logits(cfg2, scaled, reference_linears(cfg2, scaled), tokens)
    assert rel(y1, y0) < 1e-5
    # Something was actually scaled, the caller's tensors were not touched.
    p = "model.layers.0."
    assert not np.allclose(scaled[p + "input_layernorm.weight"], tiny_tensors[p + "input_layernorm.weight"])
    assert scaled[p + "mlp.up_proj.weight"] is not tiny_tensors[p + "mlp.up_proj.weight"]
    assert all(0 <= info[l][g]["alpha"] < 1 for l in range(TINY.num_hidden_layers)
               for g in ("attn_in", "attn_out", "mlp_in", "mlp_out"))
    # GQA: the o_proj input scale is tied across the query heads of one KV head.
    ratio = (np.linalg.norm(scaled[p + "self_attn.o_proj.weight"], axis=0)
             / np.linalg.norm(tiny_tensors[p + "self_attn.o_proj.weight"], axis=0))
    rep = TINY.num_attention_heads // TINY.num_key_value_heads
    per_head = ratio.reshape(TINY.num_key_value_heads, rep, TINY.head_dim)
    assert np.allclose(per_head, per_head[:, :1], rtol=1e-5)
    assert np.ptp(per_head) > 0.1


def test_vo_scaling_skip(tiny_tensors, calib):
    _, scaled, info = awq_scale_model(TINY, tiny_tensors, calib, 64, vo_scaling="skip", n_grid=4)
    assert info[0]["attn_out"]["alpha"] is None
    assert scaled["model.layers.0.self_attn.o_proj.weight"] is tiny_tensors["model.layers.0.self_attn.o_proj.weight"]


@pytest.mark.parametrize("g", [64, 128])
def test_awq_model_beats_rtn_model(tiny_tensors, tiny_models, g):
    tokens = calibration_tokens(None, TINY, 128, seed=9)
    y = logits(TINY, tiny_tensors, reference_linears(TINY, tiny_tensors), tokens)
    errs = {}
    for method in ("rtn", "awq"):
        qm = tiny_models[(method, g)]
        errs[method] = rel(logits(qm.config, qm.params, qm.linear_fn(), tokens), y)
    print(f"\ntiny model g{g}: relative logit error RTN {errs['rtn']:.4f} AWQ {errs['awq']:.4f}")
    assert errs["awq"] < 0.8 * errs["rtn"]


def test_quantize_model_output(tiny_tensors, calib, tiny_models):
    qm = quantize_model(TINY, tiny_tensors, method="awq", group_size=128, lm_head="int8",
                        calib_tokens=calib, clip=True, progress=False, n_grid=6)
    assert set(qm.linears) == set(TINY.linear_names())
    assert all(qm.linears[n].kind == "int4" for n in TINY.linear_names()[:-1])
    assert qm.linears["lm_head"].kind == "int8"
    assert qm.linears["lm_head"].shape == (TINY.vocab_size, TINY.hidden_size)
    assert qm.linears["model.layers.0.self_attn.q_proj"].bias is not None
    assert qm.linears["model.layers.0.mlp.up_proj"].bias is None
    emb = qm.params["model.embed_tokens.weight"]
    assert np.array_equal(emb, round_to_bf16(emb))
    assert set(qm.params) == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{l}.{n}.weight" for l in range(TINY.num_hidden_layers)
        for n in ("input_layernorm", "post_attention_layernorm")}
    q = qm.quant
    assert q["method"] == "awq" and q["group_size"] == 128 and q["lm_head"] == "int8"
    assert q["clip"] and q["calibration"]["tokens"] == 128
    assert "synthetic" in q["calibration"]["source"]
    assert "lm_head" in q["alpha"] and "layers.1.mlp_out" in q["alpha"]
    json.dumps(q)
    rtn = tiny_models[("rtn", 128)]
    assert rtn.quant["method"] == "rtn" and rtn.linears["lm_head"].kind == "fp16"
    assert np.array_equal(rtn.params["model.layers.0.input_layernorm.weight"],
                          tiny_tensors["model.layers.0.input_layernorm.weight"])


def test_quantize_model_errors(tiny_tensors):
    with pytest.raises(ConfigError, match="32, 64, 128"):
        quantize_model(TINY, tiny_tensors, method="rtn", group_size=16, progress=False)
    with pytest.raises(ConfigError, match="method"):
        quantize_model(TINY, tiny_tensors, method="gptq", progress=False)
    with pytest.raises(ConfigError, match="LM head"):
        quantize_model(TINY, tiny_tensors, method="rtn", lm_head="int2", progress=False)
    with pytest.raises(ConfigError, match="calibration token ids"):
        quantize_model(TINY, tiny_tensors, calib_tokens=np.array([0, TINY.vocab_size]), progress=False)
    with pytest.raises(KriaError, match="model.norm.weight"):
        quantize_model(TINY, {k: v for k, v in tiny_tensors.items() if k != "model.norm.weight"},
                       method="rtn", progress=False)


# ------------------------------------------------------------------ calibration

def test_synthetic_calibration_is_deterministic_zipf():
    a = calibration_tokens(None, TINY, 300, seed=3)
    assert a.shape == (300,) and a.dtype == np.int32
    assert np.array_equal(a, calibration_tokens(None, TINY, 300, seed=3))
    assert not np.array_equal(a, calibration_tokens(None, TINY, 300, seed=4))
    assert a.min() >= 0 and a.max() < TINY.vocab_size
    big = synthetic_tokens(TINY, 20000, seed=0)
    assert np.mean(big < 16) > 0.2          # head-heavy
    assert len(np.unique(big)) > 200        # but a wide spread


def test_calibration_from_token_files(tmp_path):
    ids = np.arange(100) % TINY.vocab_size
    np.save(tmp_path / "ids.npy", ids.reshape(10, 10))
    (tmp_path / "ids.txt").write_text(", ".join(map(str, ids)) + "\n")
    for name in ("ids.npy", "ids.txt"):
        got = calibration_tokens(tmp_path / name, TINY, 40, seed=0)
        assert got.shape == (40,)
        start = int(got[0])
        assert np.array_equal(got, ids[start:start + 40])
        assert name in got.description
        assert np.array_equal(read_token_file(tmp_path / name, TINY), ids)
    assert calibration_tokens(tmp_path / "ids.npy", TINY, 500).shape == (100,)
    (tmp_path / "bad.txt").write_text(f"1 2 {TINY.vocab_size}")
    with pytest.raises(ConfigError, match="vocabulary"):
        read_token_file(tmp_path / "bad.txt", TINY)
    np.save(tmp_path / "few.npy", np.arange(5))
    with pytest.raises(ConfigError, match="at least 16"):
        calibration_tokens(tmp_path / "few.npy", TINY, 64)
    with pytest.raises(ConfigError, match="does not exist"):
        calibration_tokens(tmp_path / "missing.npy", TINY, 64)
    np.save(tmp_path / "float.npy", np.ones(20))
    with pytest.raises(ConfigError, match="integer"):
        calibration_tokens(tmp_path / "float.npy", TINY, 64)


def test_calibration_from_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 10)
    with pytest.raises(ConfigError, match="tokenizer"):
        calibration_tokens(text, TINY, 32)
    with pytest.raises(ConfigError, match="tokenizer.json not found"):
        calibration_tokens(text, TINY, 32, tokenizer=tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(
        ["[UNK]", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    got = calibration_tokens(text, TINY, 32, tokenizer=tmp_path)
    assert got.shape == (32,) and set(got.tolist()) <= set(range(1, 9))
    assert "text file" in got.description


def test_default_and_multi_sequence_calibration(tiny_tensors):
    qm = quantize_model(TINY, tiny_tensors, method="awq", group_size=64, lm_head="fp16", n_grid=2,
                        progress=False)
    assert qm.quant["calibration"]["tokens"] == 512
    assert "synthetic" in qm.quant["calibration"]["source"]
    seqs = calibration_tokens(None, TINY, 96, seed=2).reshape(3, 32)
    qm = quantize_model(TINY, tiny_tensors, method="awq", group_size=64, lm_head="fp16", n_grid=2,
                        calib_tokens=seqs, progress=False)
    assert qm.quant["calibration"]["sequences"] == 3 and qm.quant["calibration"]["tokens"] == 96
