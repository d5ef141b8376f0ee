"""The fabric golden decoder (sw/fabric.py): quality against the float reference and
the hybrid golden model, and bit-reproducibility.

Quality is measured as in tests/test_golden.py: synthetic `tiny` checkpoints
(seeds 0, 1, 2), 256 tokens sampled from the float model itself, AWQ INT4 g64
with an INT4 LM head, KL(ref || model), top-1 agreement and the perplexity
ratio on next-token targets. Measured (docs/numerics.md, "The fabric ops"):

| seed | hybrid KL | fabric KL | ratio | hybrid top-1 | fabric top-1 | hybrid ppl ratio | fabric ppl ratio | KL(hybrid || fabric) |
|---|---|---|---|---|---|---|---|---|
| 0 | 0.0830 | 0.0833 | 1.004 | 0.714 | 0.714 | 1.132 | 1.132 | 0.00062 |
| 1 | 0.1005 | 0.1001 | 0.997 | 0.639 | 0.655 | 1.124 | 1.128 | 0.00062 |
| 2 | 0.0610 | 0.0608 | 0.996 | 0.792 | 0.800 | 1.089 | 1.088 | 0.00051 |

Re-measured after the P.V contract became block fixed point (integer W x int8 MACs, one
rounding per output): ratio 1.0040, 0.9967, 0.9962, KL(hybrid || fabric) 0.000615, 0.000615,
0.000514, top-1(hybrid, fabric) 0.973, 0.961, 0.984 -- every number above is unchanged at the
precision shown. Re-measured after the P.V block exponent came from the value scales (B before
the exps, the fused exp2 + P.V pass): the same numbers to the digits given here (the value
scales spread over 1.3-2.8 octaves per layer and KV head). Re-measured after the sigmoid became
integer (6.9e-8 relative error instead of 2.5e-7): ratio 1.0038, 0.9967, 0.9962, KL(hybrid ||
fabric) 0.000613, 0.000615, 0.000514, top-1(hybrid, fabric) 0.973, 0.961, 0.984. Re-measured
after exp2 and reciprocal became integer (0.54 / 0.52 ulp instead of 1.06 / 1.25): the same but
KL(hybrid || fabric) 0.000513 on seed 2.

The issue's acceptance is KL(fabric) <= 1.2 KL(hybrid) on every model; the
tighter measured bounds below (ratio 1.05, KL(hybrid || fabric) 0.0015, about
2.5x the worst seed) catch a regression of the fabric ops long before that.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sw.checkpoint import load_checkpoint
from sw.config import Qwen2Config
from sw.contract.errors import ConfigError
from sw.contract.fabric_ops import argmax_first
from sw.fabric import FabricRunner
from sw.qmodel import QuantLinear
from sw.quant import quantize_model
from sw.reference import Qwen2Runner
from sw.runtime import compare_logits, open_model, sample_tokens, sequence_logits
from sw.synth import write_synthetic_checkpoint

F32 = np.float32
ACCEPT_KL_RATIO = 1.2           # the acceptance
KL_RATIO_MAX = 1.05             # measured <= 1.004
KL_HYBRID_FABRIC_MAX = 0.0015   # measured <= 0.00062
TOP1_HYBRID_FABRIC_MIN = 0.93   # measured >= 0.961
KL_MAX = 0.14                   # fabric vs reference, measured <= 0.1001
TOP1_MIN = 0.55                 # measured >= 0.655
PPL_RATIO_MAX = 1.2             # measured <= 1.128
# full size (64 positions of a random synthetic model: flat logits, so argmax flips come easier)
FULL_KL_HYBRID_FABRIC_MAX = 0.01    # measured 0.0048
FULL_TOP1_HYBRID_FABRIC_MIN = 0.85  # measured 0.922 (59 of 64)


_MEASURED: dict[int, dict] = {}


def _measure(seed, tmp_path_factory):
    if seed in _MEASURED:
        return _MEASURED[seed]
    d = tmp_path_factory.mktemp(f"fabric{seed}") / "tiny"
    write_synthetic_checkpoint(d, "tiny", seed=seed)
    ref = open_model(d, "reference", progress=False)
    ids = sample_tokens(ref, 256, seed=seed + 100)
    ref_logits = sequence_logits(ref, ids, 256)
    ckpt = load_checkpoint(d)
    qm = quantize_model(ckpt.config, ckpt.tensors, method="awq", group_size=64, lm_head="int4", progress=False)
    hybrid = Qwen2Runner(qm.config, qm.params, qm.linear_fn())
    hyb = hybrid.forward(ids, hybrid.new_cache())
    fabric = FabricRunner(qm)
    fab = fabric.forward(ids, fabric.new_cache())
    _MEASURED[seed] = dict(seed=seed, qm=qm, ids=ids, fabric=fabric, fab=fab,
                           mh=compare_logits(hyb[:-1], ref_logits[:-1], ids[1:]),
                           mf=compare_logits(fab[:-1], ref_logits[:-1], ids[1:]),
                           mhf=compare_logits(fab[:-1], hyb[:-1], None))
    return _MEASURED[seed]


@pytest.fixture(params=[0, 1, 2])
def measured(request, tmp_path_factory):
    return _measure(request.param, tmp_path_factory)


@pytest.fixture
def seed0(tmp_path_factory):
    return _measure(0, tmp_path_factory)


def test_fabric_kl_within_the_acceptance_of_the_hybrid(measured):
    mh, mf = measured["mh"], measured["mf"]
    ratio = mf["kl_ref_test"] / mh["kl_ref_test"]
    assert ratio <= ACCEPT_KL_RATIO, (measured["seed"], mh, mf)
    assert ratio < KL_RATIO_MAX, (measured["seed"], ratio)


def test_fabric_tracks_the_hybrid_and_the_reference(measured):
    mf, mhf = measured["mf"], measured["mhf"]
    assert mhf["kl_ref_test"] < KL_HYBRID_FABRIC_MAX, mhf
    assert mhf["top1_agreement"] > TOP1_HYBRID_FABRIC_MIN, mhf
    assert mf["kl_ref_test"] < KL_MAX, mf
    assert mf["top1_agreement"] > TOP1_MIN, mf
    assert mf["perplexity"] / mf["perplexity_reference"] < PPL_RATIO_MAX, mf


def _bits(x):
    return np.ascontiguousarray(x, F32).view(np.uint32)


def test_chunking_and_cache_growth_do_not_change_a_bit(seed0):
    measured = seed0
    fabric, ids, whole = measured["fabric"], measured["ids"][:48], measured["fab"][:48]
    cache = fabric.new_cache(capacity=4)                     # grows three times on the way
    parts = [fabric.forward(ids[a:b], cache) for a, b in [(0, 13), (13, 14), (14, 40), (40, 41), (41, 48)]]
    assert cache.length == 48
    assert np.array_equal(_bits(np.concatenate(parts)), _bits(whole))
    cache = fabric.new_cache()
    steps = [fabric.forward(ids[i:i + 1], cache) for i in range(48)]
    assert np.array_equal(_bits(np.concatenate(steps)), _bits(whole))
    last = fabric.forward(ids[:48], fabric.new_cache(), last_only=True)
    assert np.array_equal(_bits(last), _bits(whole[-1:]))


def test_deterministic_and_greedy(seed0):
    measured = seed0
    fabric, ids = measured["fabric"], measured["ids"][:20]
    a = fabric.forward(ids, fabric.new_cache())
    b = FabricRunner(measured["qm"]).forward(ids, fabric.new_cache())
    assert np.array_equal(_bits(a), _bits(b))
    assert fabric.next_token(a) == int(np.argmax(a[-1])) == int(argmax_first(a)[-1])


def test_fp16_head_is_refused(seed0):
    qm = seed0["qm"]
    w = np.zeros(qm.linears["lm_head"].shape, np.float16)
    fp16 = dataclasses.replace(qm, linears={**qm.linears, "lm_head": QuantLinear("fp16", 64, weight=w)})
    with pytest.raises(ConfigError, match="fp16"):
        FabricRunner(fp16)


def _random_model(cfg: Qwen2Config, seed: int):
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (cfg.vocab_size, cfg.hidden_size)).astype(F32),
         "model.norm.weight": np.ones(cfg.hidden_size, F32)}
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}"
        t[f"{pre}.input_layernorm.weight"] = rng.uniform(0.5, 1.5, cfg.hidden_size).astype(F32)
        t[f"{pre}.post_attention_layernorm.weight"] = rng.uniform(0.5, 1.5, cfg.hidden_size).astype(F32)
        for name, (n, k) in cfg.linear_shapes().items():
            t[f"{pre}.{name}.weight"] = rng.normal(0, 1 / np.sqrt(k), (n, k)).astype(F32)
            if cfg.has_bias(name):
                t[f"{pre}.{name}.bias"] = rng.normal(0, 0.3, n).astype(F32)
    return quantize_model(cfg, t, method="rtn", group_size=64, lm_head="int4", progress=False)


@pytest.mark.parametrize("hidden, heads, kv", [(896, 14, 2), (768, 6, 2)])   # head_dim 64 (GQA 7:1), 128 (3:1)
def test_real_head_dims_chunk_invariant_and_close_to_hybrid(hidden, heads, kv):
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=256, num_hidden_layers=1, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=128)
    qm = _random_model(cfg, hidden)
    ids = np.random.default_rng(1).integers(0, 128, 40)
    fabric, hybrid = FabricRunner(qm), Qwen2Runner(qm.config, qm.params, qm.linear_fn())
    whole = fabric.forward(ids, fabric.new_cache())
    cache = fabric.new_cache(capacity=2)
    parts = np.concatenate([fabric.forward(ids[a:b], cache) for a, b in [(0, 17), (17, 18), (18, 40)]])
    assert np.array_equal(_bits(parts), _bits(whole))
    hyb = hybrid.forward(ids, hybrid.new_cache())
    m = compare_logits(whole, hyb, None)
    assert m["kl_ref_test"] < 1e-3 and m["top1_agreement"] > 0.9, m


@pytest.mark.slow
def test_long_context_1024(tmp_path):
    """Seed 0 at 1,024 tokens in one prefill: measured hybrid KL 0.0814, fabric 0.0813,
    KL(hybrid || fabric) 0.00052."""
    write_synthetic_checkpoint(tmp_path / "tiny", "tiny", seed=0)
    ref = open_model(tmp_path / "tiny", "reference", progress=False)
    ids = sample_tokens(ref, 1024, seed=100)
    ref_logits = sequence_logits(ref, ids, 1024)
    ckpt = load_checkpoint(tmp_path / "tiny")
    qm = quantize_model(ckpt.config, ckpt.tensors, method="awq", group_size=64, lm_head="int4", progress=False)
    hybrid, fabric = Qwen2Runner(qm.config, qm.params, qm.linear_fn()), FabricRunner(qm)
    hyb, fab = hybrid.forward(ids, hybrid.new_cache()), fabric.forward(ids, fabric.new_cache())
    mh = compare_logits(hyb[:-1], ref_logits[:-1], ids[1:])
    mf = compare_logits(fab[:-1], ref_logits[:-1], ids[1:])
    assert mf["kl_ref_test"] / mh["kl_ref_test"] < KL_RATIO_MAX, (mh, mf)
    assert compare_logits(fab, hyb, None)["kl_ref_test"] < KL_HYBRID_FABRIC_MAX


FULL_TOKENS = 64


@pytest.mark.slow
def test_full_size_quality(tmp_path):
    """The full-size synthetic qwen2.5-0.5b (seed 0), RTN INT4 g64 with an INT4 LM head, on 64 tokens
    sampled from the float model: the fabric decoder's KL against the float reference within the
    issue's 1.2 x the hybrid's. Measured at 7559ebb: hybrid KL 0.3850, fabric 0.3814 (ratio 0.991),
    KL(hybrid || fabric) 0.0048, top-1 agreement hybrid/fabric 0.922 (docs/numerics.md, "The fabric
    ops"; 0.3812 and 0.969 before the contract's later changes: block fixed-point P.V, integer
    sigmoid and rsqrt)."""
    write_synthetic_checkpoint(tmp_path / "q05", "qwen2.5-0.5b", seed=0)
    ref = open_model(tmp_path / "q05", "reference", progress=False)
    ids = sample_tokens(ref, FULL_TOKENS, seed=100)
    ref_logits = sequence_logits(ref, ids, FULL_TOKENS)
    del ref
    ckpt = load_checkpoint(tmp_path / "q05")
    qm = quantize_model(ckpt.config, ckpt.tensors, method="rtn", group_size=64, lm_head="int4", progress=False)
    del ckpt
    hybrid, fabric = Qwen2Runner(qm.config, qm.params, qm.linear_fn()), FabricRunner(qm)
    hyb, fab = hybrid.forward(ids, hybrid.new_cache()), fabric.forward(ids, fabric.new_cache())
    mh = compare_logits(hyb[:-1], ref_logits[:-1], ids[1:])
    mf = compare_logits(fab[:-1], ref_logits[:-1], ids[1:])
    mhf = compare_logits(fab, hyb, None)
    print(f"full-size: hybrid {mh}\nfabric {mf}\nhybrid||fabric {mhf}")
    assert mf["kl_ref_test"] / mh["kl_ref_test"] <= ACCEPT_KL_RATIO, (mh, mf)
    assert mf["kl_ref_test"] / mh["kl_ref_test"] < KL_RATIO_MAX, (mh, mf)
    assert mhf["kl_ref_test"] < FULL_KL_HYBRID_FABRIC_MAX and mhf["top1_agreement"] > FULL_TOP1_HYBRID_FABRIC_MIN, mhf
