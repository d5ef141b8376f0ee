"""The golden arithmetic against slow, obviously-correct scalar forms."""

import numpy as np
import pytest

from sw.contract.errors import ConfigError
from sw.contract.numerics import (center_weights, dequant_accumulate, golden_linear, group_partial_sums,
                         quantize_activations, reference_group_sums)

F32 = np.float32


def _scalar_dequant(corr, ws, sa, bias):
    """One fp32 operation at a time, in the documented order."""
    t, n, ng = corr.shape
    y = np.zeros((t, n), F32)
    for ti in range(t):
        for ni in range(n):
            acc = F32(bias[ni]) if bias is not None else F32(0.0)
            for g in range(ng):
                s = F32(F32(ws[ni, g]) * F32(sa[ti, g]))
                acc = F32(acc + F32(F32(corr[ti, ni, g]) * s))
            y[ti, ni] = acc
    return y


@pytest.mark.parametrize("g", [32, 64, 128])
def test_fast_group_sums_equal_integer_form(g):
    rng = np.random.default_rng(g)
    n, k, t = 48, 4 * g, 3
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    zeros = rng.integers(0, 16, (n, k // g)).astype(np.uint8)
    q = rng.integers(-127, 128, (t, k)).astype(np.int8)
    qsum = q.astype(np.int32).reshape(t, -1, g).sum(-1)
    fast = group_partial_sums(q, center_weights(codes, zeros, g))
    _, slow = reference_group_sums(codes, zeros, q, qsum, g)
    assert np.array_equal(fast, slow)


def test_group_sums_exact_at_extremes():
    g = 128
    codes = np.full((4, g), 15, np.uint8)
    zeros = np.zeros((4, 1), np.uint8)
    q = np.full((1, g), -127, np.int8)
    fast = group_partial_sums(q, center_weights(codes, zeros, g))
    assert fast[0, 0, 0] == 15 * -127 * g


def test_dequant_matches_scalar_order():
    rng = np.random.default_rng(1)
    t, n, ng = 2, 7, 9
    corr = rng.integers(-200000, 200000, (t, n, ng)).astype(np.int32)
    ws = (rng.random((n, ng)) * 1e-2).astype(np.float16)
    sa = (rng.random((t, ng)) * 0.1).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    for b in (bias, None):
        fast = dequant_accumulate(corr, ws, sa, b)
        slow = _scalar_dequant(corr, ws, sa, b)
        assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))


def test_activation_quantization_rules():
    x = np.zeros((1, 64), F32)
    x[0, 0] = 2.0
    x[0, 1] = -2.0
    x[0, 2] = 2.0 * 0.5 / 127 * 1  # exactly half a step: ties to even -> 0
    q, s, qsum = quantize_activations(x, 64)
    assert q[0, 0] == 127 and q[0, 1] == -127 and q[0, 2] == 0
    assert s[0, 0] == F32(2.0) / F32(127)
    assert qsum[0, 0] == 0


def test_zero_and_tiny_groups_quantize_to_zero():
    x = np.zeros((1, 128), F32)
    x[0, 64:] = 1e-38  # below AMAX_MIN: would overflow 127/amax
    q, s, qsum = quantize_activations(x, 64)
    assert not q.any() and not s.any() and not qsum.any()


def test_quantization_error_is_within_half_a_step():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((4, 256)) * rng.choice([1e-3, 1, 1e3], (4, 1))).astype(F32)
    q, s, _ = quantize_activations(x, 64)
    err = np.abs(q.reshape(4, 4, 64) * s[..., None] - x.reshape(4, 4, 64))
    assert np.all(err <= 0.5001 * s[..., None])
    assert q.min() >= -127 and q.max() <= 127


def test_golden_linear_close_to_float():
    rng = np.random.default_rng(3)
    n, k, g = 32, 256, 64
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    zeros = rng.integers(6, 10, (n, k // g)).astype(np.uint8)
    ws = (rng.random((n, k // g)) * 0.01 + 0.001).astype(np.float16)
    x = rng.standard_normal((2, k)).astype(F32)
    y = golden_linear(x, center_weights(codes, zeros, g), ws, None, g)
    w = ((codes.reshape(n, -1, g).astype(F32) - zeros[..., None]) * ws.astype(F32)[..., None]).reshape(n, k)
    ref = x @ w.T
    assert np.max(np.abs(y - ref)) < 0.02 * np.max(np.abs(ref))


def test_group_size_must_divide():
    with pytest.raises(ConfigError, match="not a multiple of group size"):
        quantize_activations(np.zeros((1, 100), F32), 64)
