"""The arithmetic contract of the accelerator: the golden linear layer.

Every function here is the *specification* the RTL must equal bit for bit.
docs/numerics.md states the same rules in prose; keep the two in step.

Summary (per linear y = W x + b, W: N x K, group size G along K, ng = K / G):

1. Activations: per group of G, symmetric INT8.
     amax  = max |x_k|                                  (exact)
     if amax < AMAX_MIN: s_a = 0, q_k = 0
     else: inv = fp32(127 / amax); q_k = clip(rint(fp32(x_k * inv)), -127, 127)
           s_a = fp32(amax / 127)
     qsum  = sum q_k                                    (exact integer)
2. Weights: INT4 unsigned codes w in [0, 15], zero point z in [0, 15] and an
   fp16 scale s_w per (row, group). INT8 per-channel weights are the special
   case: codes in [-127, 127], z = 0, the row's scale repeated for every group.
3. Exact integer partial sum per (row, group):
     acc  = sum_k w_k * q_k                             (exact; |acc| < 2^18 for INT4)
     corr = acc - z * qsum                              (exact; = sum (w_k - z) q_k)
4. Dequant and accumulation, IEEE-754 binary32, round-to-nearest-even, no
   fused multiply-add, subnormals kept, in this exact order:
     y = +0.0 + fp32(bias)  (so -0.0 becomes +0.0; +0.0 when the layer has no bias)
     for g in 0 .. ng-1:
         s = fp32(s_w[g]) * s_a[g]
         t = fp32(corr[g]) * s
         y = y + t
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

F32 = np.float32
# Below this group maximum the group quantizes to zero: 127/amax would overflow fp32.
AMAX_MIN = F32(2.0 ** -120)
QMAX_A = 127
INT4_MAX = 15
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def check_group_size(k: int, group_size: int, what: str = "linear") -> int:
    if group_size <= 0 or k % group_size:
        raise ConfigError(f"{what}: input size {k} is not a multiple of group size {group_size}")
    return k // group_size


def quantize_activations(x: np.ndarray, group_size: int):
    """Per-group symmetric INT8 quantization of activations.

    x: float32 [..., K]. Returns (q int8 [..., K], s_a float32 [..., ng],
    qsum int32 [..., ng]).
    """
    x = np.asarray(x, dtype=F32)
    k = x.shape[-1]
    ng = check_group_size(k, group_size, "activation")
    xg = x.reshape(*x.shape[:-1], ng, group_size)
    amax = np.max(np.abs(xg), axis=-1)
    live = amax >= AMAX_MIN
    safe = np.where(live, amax, F32(1.0)).astype(F32)
    with np.errstate(over="ignore", invalid="ignore"):
        inv = (F32(QMAX_A) / safe).astype(F32)
        q = np.rint((xg * inv[..., None]).astype(F32))
    q = np.clip(q, -QMAX_A, QMAX_A)
    q = np.where(live[..., None], q, 0).astype(np.int8)
    s_a = np.where(live, (safe / F32(QMAX_A)).astype(F32), F32(0.0)).astype(F32)
    qsum = q.astype(np.int32).sum(axis=-1, dtype=np.int32)
    return q.reshape(x.shape), s_a, qsum


def group_partial_sums(q_a: np.ndarray, w_centered: np.ndarray) -> np.ndarray:
    """Exact integer group partial sums corr[..., n, g] = sum_k (w - z)[n, k] * q_a[k].

    w_centered: float32 [ng, G, N] holding exact small integers (w - z); see
    :func:`center_weights`. q_a: int8 [T, K]. Every partial sum of integers
    stays below 2^24 in magnitude, so float32 BLAS computes it exactly in any
    order; the result is returned as int32 [T, N, ng].
    """
    ng, g, n = w_centered.shape
    t = q_a.shape[0]
    qa = q_a.astype(F32).reshape(t, ng, g).transpose(1, 0, 2)  # [ng, T, G]
    out = np.matmul(qa, w_centered)                             # [ng, T, N]
    return np.rint(out).astype(np.int32).transpose(1, 2, 0)


def center_weights(codes: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """(w - z) as float32 [ng, G, N] for :func:`group_partial_sums`.

    codes: [N, K] integer codes; zeros: [N, ng].
    """
    n, k = codes.shape
    ng = check_group_size(k, group_size)
    c = codes.astype(np.int16).reshape(n, ng, group_size) - zeros.astype(np.int16)[:, :, None]
    return np.ascontiguousarray(c.transpose(1, 2, 0).astype(F32))


def dequant_accumulate(corr: np.ndarray, w_scale: np.ndarray, a_scale: np.ndarray,
                       bias: np.ndarray | None) -> np.ndarray:
    """Step 4 of the contract. corr int32 [T, N, ng]; w_scale fp16 [N, ng];
    a_scale fp32 [T, ng]; bias fp32 [N] or None. Returns fp32 [T, N]."""
    t, n, ng = corr.shape
    y = np.zeros((t, n), dtype=F32)
    if bias is not None:
        y += np.asarray(bias, dtype=F32)[None, :]
    ws = w_scale.astype(F32)
    cf = corr.astype(F32)  # exact: |corr| < 2^24
    for g in range(ng):
        s = ws[None, :, g] * a_scale[:, g, None]
        y = y + cf[:, :, g] * s
    return y


def golden_linear(x: np.ndarray, w_centered: np.ndarray, w_scale: np.ndarray,
                  bias: np.ndarray | None, group_size: int) -> np.ndarray:
    """The whole contract: fp32 activations [T, K] in, fp32 outputs [T, N] out."""
    q, s_a, _ = quantize_activations(x, group_size)
    corr = group_partial_sums(q, w_centered)
    return dequant_accumulate(corr, w_scale, s_a, bias)


def reference_group_sums(codes, zeros, q_a, qsum, group_size):
    """Slow, obviously-correct integer form (acc and z*qsum separately), used by
    tests and testbenches to cross-check the fast path. Returns (acc, corr)
    int64 [T, N, ng]."""
    n, k = codes.shape
    ng = k // group_size
    w = codes.astype(np.int64).reshape(n, ng, group_size)
    qa = q_a.astype(np.int64).reshape(-1, ng, group_size)
    acc = np.einsum("ngk,tgk->tng", w, qa)
    corr = acc - zeros.astype(np.int64)[None] * qsum.astype(np.int64)[:, None, :]
    return acc, corr
