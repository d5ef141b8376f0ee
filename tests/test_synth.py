"""Synthetic checkpoints: round trip, determinism, the planted outliers, sanity,
and robustness to small weight changes (docs/synthetic.md)."""

import json
import time

import numpy as np
import pytest

from sw.checkpoint import expected_shapes, load_checkpoint
from sw.config import preset
from sw.quant import fake_quant_activations, fake_quant_weight
from sw.reference import Qwen2Runner, reference_linears
from sw.runtime import compare_logits
from sw.safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits
from sw.synth import synthesize, synthetic_structure, write_synthetic_checkpoint

CONFIG = preset("tiny")


@pytest.fixture(scope="module")
def run(tiny_tensors):
    """Forward passes of tiny over 4 random sequences, recording every
    linear's input and output."""
    base = reference_linears(CONFIG, tiny_tensors)
    runs = []
    for seq in range(4):
        seen = {}

        def record(name, x, seen=seen):
            y = base(name, x)
            seen[name] = (x, y)
            return y

        ids = np.random.default_rng(100 + seq).integers(0, CONFIG.vocab_size, 32)
        runner = Qwen2Runner(CONFIG, tiny_tensors, record)
        logits = runner.forward(ids, runner.new_cache())
        runs.append((ids, logits, seen))
    return runs


def _bf16(x):
    return bf16_bits_to_f32(f32_to_bf16_bits(x))


def _residuals(tiny_tensors, ids, seen):
    """The residual stream after each layer: embedding + o_proj and down_proj outputs."""
    h = tiny_tensors["model.embed_tokens.weight"][ids]
    out = []
    for layer in range(CONFIG.num_hidden_layers):
        pre = f"model.layers.{layer}"
        h = h + seen[f"{pre}.self_attn.o_proj"][1] + seen[f"{pre}.mlp.down_proj"][1]
        out.append(h)
    return out


def _entropy(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return -(p * np.log(np.maximum(p, 1e-30))).sum(axis=-1), p


def test_write_read_round_trip(tmp_path, tiny_tensors):
    out = write_synthetic_checkpoint(tmp_path / "tiny", "tiny", seed=0)
    ck = load_checkpoint(out)
    assert ck.config == CONFIG and not ck.has_tokenizer and ck.quantization_config is None
    assert set(ck.tensors) == set(tiny_tensors) == set(expected_shapes(CONFIG))
    for name, value in tiny_tensors.items():
        np.testing.assert_array_equal(ck.tensors[name], _bf16(value))
    meta = json.loads((out / "config.json").read_text())["kriallm_synthetic"]
    s = synthetic_structure(CONFIG, 0)
    assert tuple(meta["massive_dims"]) == s.massive_dims and meta["massive_value"] > 0
    generation = json.loads((out / "generation_config.json").read_text())
    assert 0 <= generation["eos_token_id"] < CONFIG.vocab_size


def test_sharded_loads_identically(tmp_path):
    single = load_checkpoint(write_synthetic_checkpoint(tmp_path / "a", "tiny", seed=1))
    sharded = load_checkpoint(write_synthetic_checkpoint(tmp_path / "b", "tiny", seed=1,
                                                         shard_bytes=200_000))
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) > 1
    assert set(single.tensors) == set(sharded.tensors)
    for name in single.tensors:
        np.testing.assert_array_equal(single.tensors[name], sharded.tensors[name])


def test_deterministic_per_seed(tiny_tensors):
    again = synthesize(CONFIG, seed=0)
    other = synthesize(CONFIG, seed=1)
    for name in tiny_tensors:
        np.testing.assert_array_equal(again[name], tiny_tensors[name])
    assert not np.array_equal(other["model.layers.0.mlp.up_proj.weight"],
                              tiny_tensors["model.layers.0.mlp.up_proj.weight"])


def test_weight_statistics(tiny_tensors):
    for name, value in tiny_tensors.items():
        assert value.dtype == np.float32 and np.all(np.isfinite(value)), name
    w = tiny_tensors["model.layers.0.mlp.gate_proj.weight"]
    row_std = w.std(axis=1)
    assert np.percentile(row_std, 90) / np.percentile(row_std, 10) > 1.5   # per-row spread
    k_bias = tiny_tensors["model.layers.0.self_attn.k_proj.bias"]
    assert np.abs(k_bias).max() > 2.0
    assert np.abs(tiny_tensors["model.layers.0.self_attn.q_proj.bias"]).max() > 0
    assert 0.02 < tiny_tensors["model.embed_tokens.weight"].std() < 0.05


def test_outlier_input_channels(tiny_tensors, run):
    """A few q/k/v (and gate/up) input channels sit far above the rest,
    exactly at the planted channels."""
    s = synthetic_structure(CONFIG, 0)
    for layer in range(CONFIG.num_hidden_layers):
        for linear in ("self_attn.q_proj", "mlp.up_proj"):
            x = np.concatenate([seen[f"model.layers.{layer}.{linear}"][0] for _, _, seen in run])
            peak = np.abs(x).max(axis=0)
            big = set(np.flatnonzero(peak > 4 * np.median(peak)))
            assert big, (layer, linear)
            assert big <= set(s.outlier_channels) | set(s.massive_dims), (layer, linear)
            assert len(big) <= 0.05 * CONFIG.hidden_size


def test_outlier_intermediate_channels(run):
    """down_proj sees a few huge input channels, at the planted ones."""
    s = synthetic_structure(CONFIG, 0)
    ratios = []
    for layer in range(CONFIG.num_hidden_layers):
        x = np.concatenate([seen[f"model.layers.{layer}.mlp.down_proj"][0] for _, _, seen in run])
        peak = np.abs(x).max(axis=0)
        planted = list(s.intermediate_outliers[layer])
        ratios.append(np.max(peak[planted]) / np.median(peak))
        assert np.max(peak[planted]) >= np.percentile(peak, 98), layer
    assert min(ratios) > 6 and max(ratios) > 20


def test_massive_activations(tiny_tensors, run):
    s = synthetic_structure(CONFIG, 0)
    for ids, _, seen in run:
        residuals = _residuals(tiny_tensors, ids, seen)
        for layer, h in enumerate(residuals):
            typical = np.median(np.abs(h))
            per_dim = np.median(np.abs(h), axis=0)
            top = set(np.argsort(per_dim)[-len(s.massive_dims):])
            if layer < s.emergence_layer:
                continue
            assert top == set(s.massive_dims)
            assert per_dim[list(s.massive_dims)].min() > 8 * typical, layer
            if layer == s.emergence_layer:
                # Fixed dims on every token, not a handful of positions.
                assert np.all(np.abs(h[:, list(s.massive_dims)]) > 5 * typical)
                # o_proj writes the same value on every token: the v_proj
                # sink channels it reads are (almost) pure bias.
                written = np.abs(seen[f"model.layers.{layer}.self_attn.o_proj"][1]
                                 [:, list(s.massive_dims)])
                assert np.all(written.std(axis=0) < 0.03 * written.mean(axis=0))


def test_numerically_sane(run):
    entropies, top_probs, argmaxes = [], [], set()
    for ids, logits, _ in run:
        assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
        entropy, p = _entropy(logits.astype(np.float64))
        entropies.append(entropy)
        top_probs.append(p.max(axis=-1))
        argmaxes |= set(p.argmax(axis=-1).tolist())
    entropy = np.concatenate(entropies)
    assert 1.0 < entropy.mean() < np.log(CONFIG.vocab_size) - 0.5
    assert np.concatenate(top_probs).mean() < 0.7
    assert len(argmaxes) >= 10
    # The next-token distribution depends on the input.
    (_, a, _), (_, b, _) = run[0], run[1]
    assert np.corrcoef(a[-1], b[-1])[0, 1] < 0.9


def _self_sample(tiny_tensors, n_tokens=128, seed=0):
    """n_tokens sampled from the float model itself at temperature 1."""
    runner = Qwen2Runner(CONFIG, tiny_tensors, reference_linears(CONFIG, tiny_tensors))
    rng = np.random.default_rng(seed)
    ids, cache = [1], runner.new_cache(n_tokens)
    logits = runner.forward(np.array(ids), cache)[-1]
    for _ in range(n_tokens - 1):
        _, p = _entropy(logits.astype(np.float64))
        ids.append(int(rng.choice(CONFIG.vocab_size, p=p)))
        logits = runner.forward(np.array(ids[-1:]), cache)[-1]
    return np.array(ids)


def test_robust_like_a_trained_model(tiny_tensors):
    """On text it writes itself, the model reacts to small weight changes
    about as a trained LLM does (docs/synthetic.md, "Robustness"): 1 %
    multiplicative noise on every linear weight barely moves the logits,
    INT8 activations hardly matter, INT4 round-to-nearest costs a real LLM's
    KL -- not nothing, not a collapse."""
    ids = _self_sample(tiny_tensors)
    base = reference_linears(CONFIG, tiny_tensors)

    def kl_top1(linear, params=tiny_tensors):
        runner = Qwen2Runner(CONFIG, params, linear)
        logits = runner.forward(ids, runner.new_cache())
        c = compare_logits(logits[:-1], ref[:-1], ids[1:])
        return c["kl_ref_test"], c["top1_agreement"]

    runner = Qwen2Runner(CONFIG, tiny_tensors, base)
    ref = runner.forward(ids, runner.new_cache())
    entropy, _ = _entropy(ref.astype(np.float64))
    assert 2.5 < entropy.mean() < 3.7
    assert len(set(ids.tolist())) > 30            # no collapse into a loop

    rng = np.random.default_rng(5)
    noisy = {k: v * (1 + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
             if k.endswith("_proj.weight") else v for k, v in tiny_tensors.items()}
    kl, top1 = kl_top1(reference_linears(CONFIG, noisy))
    assert kl < 0.01 and top1 > 0.9, (kl, top1)

    kl, _ = kl_top1(lambda name, x: base(name, fake_quant_activations(x, 64)))
    assert kl < 0.05, kl

    rtn = {k: fake_quant_weight(v, 64) if k.endswith("_proj.weight") else v
           for k, v in tiny_tensors.items()}
    kl, _ = kl_top1(reference_linears(CONFIG, rtn))
    assert 0.02 < kl < 0.5, kl


@pytest.mark.slow
def test_qwen25_05b(tmp_path):
    config = preset("qwen2.5-0.5b")
    start = time.perf_counter()
    out = write_synthetic_checkpoint(tmp_path / "q", "qwen2.5-0.5b", seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 120, f"synthesis took {elapsed:.0f} s"
    size = (out / "model.safetensors").stat().st_size
    assert abs(size - 2 * config.num_parameters()) < 1_000_000
    ck = load_checkpoint(out)
    assert ck.config == config
    std = ck.tensors["model.layers.5.self_attn.q_proj.weight"].std()
    assert 0.015 < std < 0.05
    runner = Qwen2Runner(config, ck.tensors, reference_linears(config, ck.tensors))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 16)
    logits = runner.forward(ids, runner.new_cache())
    assert np.all(np.isfinite(logits))
    entropy, p = _entropy(logits.astype(np.float64))
    assert 0.5 < entropy.mean() < np.log(config.vocab_size) - 1
    assert len(set(p.argmax(axis=-1).tolist())) >= 4
