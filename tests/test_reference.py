"""The fp32 reference forward: hand-checkable pieces, cache consistency, and
agreement with Hugging Face transformers."""

import numpy as np
import pytest

from sw.checkpoint import load_checkpoint
from sw.config import preset
from sw.contract.errors import ConfigError
from sw.reference import (KVCache, Qwen2Runner, apply_rope, reference_linears, rms_norm,
                          rope_tables, silu, softmax)
from sw.synth import write_synthetic_checkpoint

CONFIG = preset("tiny")


@pytest.fixture(scope="module")
def runner(tiny_tensors):
    return Qwen2Runner(CONFIG, tiny_tensors, reference_linears(CONFIG, tiny_tensors))


def _tokens(n, seed=5):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, n)


def test_rms_norm_by_hand():
    x = np.array([[3.0, 4.0]], np.float32)
    out = rms_norm(x, np.array([1.0, 2.0], np.float32), eps=0.0)
    rms = np.sqrt((9 + 16) / 2)
    np.testing.assert_allclose(out, [[3 / rms, 8 / rms]], rtol=1e-6)
    assert out.dtype == np.float32
    # eps keeps an all-zero row finite.
    assert np.all(rms_norm(np.zeros((1, 4), np.float32), np.ones(4), 1e-6) == 0)


def test_rope_tables_by_hand():
    cos, sin = rope_tables(CONFIG, np.array([0, 1]))
    hd = CONFIG.head_dim
    assert cos.shape == (2, hd) and cos.dtype == np.float32
    np.testing.assert_array_equal(cos[0], 1.0)
    np.testing.assert_array_equal(sin[0], 0.0)
    inv_freq = 1.0 / CONFIG.rope_theta ** (np.arange(0, hd, 2) / hd)
    np.testing.assert_allclose(cos[1, :hd // 2], np.cos(inv_freq), rtol=1e-6)
    np.testing.assert_array_equal(cos[1, :hd // 2], cos[1, hd // 2:])


def test_rope_rotates_pairs():
    rng = np.random.default_rng(0)
    hd = CONFIG.head_dim
    x = rng.standard_normal((3, 7, hd)).astype(np.float32)
    positions = np.arange(100, 107)
    cos, sin = rope_tables(CONFIG, positions)
    y = apply_rope(x, cos, sin)
    half = hd // 2
    # Each (i, i + half) pair is rotated, so its norm is preserved.
    pair_norm = lambda a: np.hypot(a[..., :half], a[..., half:])  # noqa: E731
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-5)
    # Relative position: <R(m) q, R(n) k> depends on m - n only.
    q, k = x[0, 0], x[1, 0]
    c1, s1 = rope_tables(CONFIG, np.array([10, 3]))
    c2, s2 = rope_tables(CONFIG, np.array([57, 50]))
    d1 = apply_rope(q, c1[0], s1[0]) @ apply_rope(k, c1[1], s1[1])
    d2 = apply_rope(q, c2[0], s2[0]) @ apply_rope(k, c2[1], s2[1])
    np.testing.assert_allclose(d1, d2, rtol=1e-4)


def test_silu_and_softmax():
    x = np.array([-1000.0, -1.0, 0.0, 2.0, 1000.0], np.float32)
    sigmoid = 0.5 * (1 + np.tanh(x.astype(np.float64) / 2))
    np.testing.assert_allclose(silu(x), x * sigmoid, atol=1e-6)
    p = softmax(np.array([[1000.0, 1000.0, -np.inf]], np.float32))
    np.testing.assert_array_equal(p, [[0.5, 0.5, 0.0]])


def test_decode_matches_prefill(runner):
    ids = _tokens(12)
    full = runner.forward(ids, runner.new_cache())
    cache = runner.new_cache()
    steps = np.concatenate([runner.forward(ids[i:i + 1], cache) for i in range(len(ids))])
    assert cache.length == len(ids)
    np.testing.assert_allclose(steps, full, atol=1e-5 * np.abs(full).max(), rtol=0)
    assert np.all(np.isfinite(full)) and full.dtype == np.float32


def test_causal(runner):
    ids = _tokens(10)
    changed = ids.copy()
    changed[7:] = (changed[7:] + 1) % CONFIG.vocab_size
    a = runner.forward(ids, runner.new_cache())
    b = runner.forward(changed, runner.new_cache())
    np.testing.assert_array_equal(a[:7], b[:7])
    assert not np.allclose(a[7:], b[7:])


def test_chunked_prefill_and_cache_growth(runner):
    ids = _tokens(40)
    full = runner.forward(ids, runner.new_cache())
    cache = runner.new_cache(capacity=3)  # forces several regrowths
    parts = [runner.forward(ids[a:b], cache) for a, b in ((0, 5), (5, 6), (6, 31), (31, 40))]
    assert cache.length == 40 and cache.capacity >= 40
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-5 * np.abs(full).max(), rtol=0)


def test_wrapped_linear_sees_exact_inputs(tiny_tensors, runner):
    base = reference_linears(CONFIG, tiny_tensors)
    calls = []

    def record(name, x):
        calls.append((name, x.copy()))
        return base(name, x)

    ids = _tokens(6)
    wrapped = Qwen2Runner(CONFIG, tiny_tensors, record)
    logits = wrapped.forward(ids, wrapped.new_cache())
    np.testing.assert_array_equal(logits, runner.forward(ids, runner.new_cache()))
    names = [n for n, _ in calls]
    assert names == CONFIG.linear_names()          # each linear once, in execution order
    by_name = dict(calls)
    pre = "model.layers.0"
    h = tiny_tensors["model.embed_tokens.weight"][ids]
    x = rms_norm(h, tiny_tensors[f"{pre}.input_layernorm.weight"], CONFIG.rms_norm_eps)
    for proj in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_array_equal(by_name[f"{pre}.self_attn.{proj}"], x)
    assert by_name["lm_head"].shape == (6, CONFIG.hidden_size)


def test_linear_is_pluggable(tiny_tensors):
    base = reference_linears(CONFIG, tiny_tensors)
    ids = _tokens(4)
    plain = Qwen2Runner(CONFIG, tiny_tensors, base)
    doubled = Qwen2Runner(CONFIG, tiny_tensors,
                          lambda n, x: 2 * base(n, x) if n == "lm_head" else base(n, x))
    np.testing.assert_allclose(doubled.forward(ids, doubled.new_cache()),
                               2 * plain.forward(ids, plain.new_cache()), rtol=1e-6)


@pytest.mark.parametrize("bad", [[-1], [CONFIG.vocab_size], [[1, 2]], [], [0.5]])
def test_token_validation(runner, bad):
    with pytest.raises(ConfigError):
        runner.forward(np.array(bad), runner.new_cache())


def test_missing_params(tiny_tensors):
    params = dict(tiny_tensors)
    del params["model.layers.1.post_attention_layernorm.weight"]
    with pytest.raises(ConfigError, match="post_attention_layernorm"):
        Qwen2Runner(CONFIG, params, reference_linears(CONFIG, tiny_tensors))


def test_kv_cache_layout():
    cache = KVCache(CONFIG, capacity=8)
    assert len(cache.keys) == CONFIG.num_hidden_layers
    assert cache.keys[0].shape == (CONFIG.num_key_value_heads, 8, CONFIG.head_dim)
    cache.reserve(20)
    assert cache.capacity >= 20 and cache.length == 0


def test_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch", reason="optional: compares against HF transformers")
    transformers = pytest.importorskip("transformers", reason="optional: HF reference model")
    out = write_synthetic_checkpoint(tmp_path / "tiny", "tiny", seed=3)
    ck = load_checkpoint(out)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(
        out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ours = Qwen2Runner(ck.config, ck.tensors, reference_linears(ck.config, ck.tensors))
    cache = ours.new_cache()
    ids = _tokens(16, seed=11)

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    with torch.no_grad():
        result = hf(torch.tensor(ids)[None], use_cache=True)
    mine = ours.forward(ids, cache)
    errors = [rel(mine, result.logits[0].numpy())]
    past = result.past_key_values
    for _ in range(3):
        token = int(np.argmax(mine[-1]))
        mine = ours.forward(np.array([token]), cache)
        with torch.no_grad():
            result = hf(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = result.past_key_values
        errors.append(rel(mine, result.logits[0].numpy()))
    print(f"max relative error vs transformers {transformers.__version__}: {max(errors):.2e}")
    assert max(errors) < 1e-4
