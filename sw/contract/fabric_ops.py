"""The arithmetic contract of the decoder ops that move onto the fabric.

The linear layers' contract is :mod:`sw.contract.numerics`; this module is the
rest of the decoder: embedding lookup, RMSNorm, RoPE, attention over an INT8
KV cache, softmax, SiLU x up, residual adds and greedy argmax. Every function
here is the *specification* the RTL must equal bit for bit; docs/numerics.md
("The fabric ops") states the same rules in prose.

Global rules:

* IEEE-754 binary32, round to nearest ties to even, subnormals kept, **no
  fused multiply-add**: every product is rounded to fp32 before it is added
  (in NumPy: products are separate float32 arrays).
* Integer arithmetic is exact (int64 here; the RTL sizes its accumulators by
  the bounds stated at each op).
* Every floating-point reduction uses :func:`fixed_sum`: ``P = 32`` interleaved
  partial sums (element i into partial i mod 32, each partial accumulated
  sequentially from +0.0 in ascending i), then the 32 partials combined by a
  fixed balanced binary tree ((p0+p1)+(p2+p3))+... . The order depends on P
  only, never on a lane count: L in {1, 2, 4, 8, 16, 32} lanes each own the
  partials p = l (mod L), and an adder of latency D <= P / L never sees a
  hazard (8 lanes: 4 cycles).
* Reductions never go through np.sum / np.dot / @ on floats; max is exact.
* Constants and tables are computed in float64 and rounded once to fp32 (RNE),
  or to integers for the integer cores (exp2, exp, reciprocal, rsqrt, sigmoid); they are listed (or their
  exact rules given) in docs/numerics.md and are part of the contract.
"""

from __future__ import annotations

import math

import numpy as np

from .numerics import quantize_activations

F32 = np.float32

# --- reduction -----------------------------------------------------------------------------------
P_PARTIALS = 32


def fixed_sum(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """The contract's fp32 reduction along `axis` (see the module docstring).

    Length 0 gives +0.0. Missing elements (length not a multiple of P) are the
    partials' initial +0.0; adding +0.0 changes no partial (a partial is never
    -0.0, because it starts at +0.0 and RNE gives +0.0 for exact cancellation).
    """
    x = np.moveaxis(np.asarray(x, F32), axis, -1)
    n = x.shape[-1]
    chunks = -(-n // P_PARTIALS)
    pad = chunks * P_PARTIALS - n
    if pad:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), F32)], axis=-1)
    xc = x.reshape(x.shape[:-1] + (chunks, P_PARTIALS))
    part = np.zeros(x.shape[:-1] + (P_PARTIALS,), F32)
    for c in range(chunks):
        part = (part + xc[..., c, :]).astype(F32)
    while part.shape[-1] > 1:
        part = (part[..., 0::2] + part[..., 1::2]).astype(F32)
    return part[..., 0]


# --- tables and constants ------------------------------------------------------------------------
EXP2_MIN = -126.0      # exp2(t) = +0.0 for t < EXP2_MIN (results stay normal)
EXP2_FRAC_BITS = 29    # t is rounded once to a fixed-point grid of 2^-29

LOG2E_Q31 = round(2 ** 31 / math.log(2.0))              # log2(e) as an unsigned Q1.31 integer (32 bits)

_TWO = F32(2.0)


def _split(v: np.ndarray):
    """v = m * 2^e with m in [1, 2) exactly (v positive, finite, nonzero)."""
    m, e = np.frexp(v)
    return (m * _TWO).astype(F32), e.astype(np.int64) - 1


# --- the integer cores: 2^x and 1/x in fixed point -----------------------------------------------
# Shared by exp2, exp, reciprocal and sigmoid: integers after the input decode, one RNE rounding to
# fp32 at the end (docs/numerics.md, "The integer cores"). Scales: Y, TJ, den: Q1.30; POW2_C1: 2^-25;
# POW2_C2: 2^-20; POW2_C3: 2^-14; the reciprocal seed y0: 2^-16; T (the quotient): 2^-46.
POW2_J_BITS = 6                        # 2^(j/64), j = the top 6 bits of the 29-bit fraction of u
POW2_L_BITS = EXP2_FRAC_BITS - POW2_J_BITS                # 23: r = L * 2^-29 in [0, 2^-6)
RECIP_SEED_BITS = 8                    # the reciprocal seed: 256 intervals of den in [1, 2]


def _pow2_table(c: float, frac_bits: int) -> np.ndarray:
    """round(2^(j/64) * c * 2^frac_bits), j = 0..63, in float64 (Python round: half-even)."""
    return np.array([round(2.0 ** (j / 2 ** POW2_J_BITS) * c * 2.0 ** frac_bits)
                     for j in range(2 ** POW2_J_BITS)], np.int64)


_LN2 = math.log(2.0)
POW2_TJ = _pow2_table(1.0, 30)                  # 2^(j/64), Q1.30 (2^30 .. 2,124,350,982 < 2^31)
POW2_C1 = _pow2_table(_LN2, 25)                 # 2^(j/64) ln2, scale 2^-25 (26 bits)
POW2_C2 = _pow2_table(_LN2 ** 2 / 2.0, 20)      # 2^(j/64) ln2^2/2, scale 2^-20 (19 bits)
POW2_C3 = _pow2_table(_LN2 ** 3 / 6.0, 14)      # 2^(j/64) ln2^3/6, scale 2^-14 (11 bits)
# 1/(1 + k/256) at the 257 interval ends, scale 2^-16 (RECIP_SEED[0] = 2^16, RECIP_SEED[256] = 2^15),
# and the chord steps RECIP_SEED[i] - RECIP_SEED[i + 1] (<= 256)
RECIP_SEED = np.array([round(2.0 ** 16 / (1.0 + k / 2 ** RECIP_SEED_BITS))
                       for k in range(2 ** RECIP_SEED_BITS + 1)], np.int64)
RECIP_SEED_STEP = RECIP_SEED[:-1] - RECIP_SEED[1:]


def pow2_q30(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Y, n) with Y * 2^(n - 30) ~= 2^(u * 2^-29), for int64 u in [-126 * 2^29, 0].

    n = u >> 29 (floor); fr = u & (2^29 - 1); j = fr >> 23 (6 bits); L = fr & (2^23 - 1);
    h2 = C2[j] + (((L >> 13) * C3[j]) >> 10); h1 = C1[j] + (((L >> 6) * h2) >> 18);
    Y = TJ[j] + ((L * h1) >> 24), every shift a floor. Y is in [2^30, 2^31 - 1]."""
    u = np.asarray(u, np.int64)
    n = u >> EXP2_FRAC_BITS
    fr = u & ((1 << EXP2_FRAC_BITS) - 1)
    j = fr >> POW2_L_BITS
    big_l = fr & ((1 << POW2_L_BITS) - 1)
    h2 = POW2_C2[j] + (((big_l >> 13) * POW2_C3[j]) >> 10)
    h1 = POW2_C1[j] + (((big_l >> 6) * h2) >> 18)
    return POW2_TJ[j] + ((big_l * h1) >> 24), n


def recip_q46(den: np.ndarray, y_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y0, T): T * 2^-46 ~= (y_m * 2^-30) / (den * 2^-30), for int64 den in [2^30, 2^31] (Q1.30)
    and y_m in [2^30, 2^31) (Q1.30).

    f = den - 2^30; i = min(f >> 22, 255); dx = (f - (i << 22)) >> 12 (0..1024);
    y0 = SEED[i] - ((SEED_STEP[i] * dx) >> 10) (chord interpolation, scale 2^-16);
    E = 2^46 - den * y0 (exact, signed); e = E >> 15 (floor: 1 - den*y0 at scale 2^-31);
    Z = y_m * y0 (exact, scale 2^-46); T = Z + (Z >> 31) * e (one Newton step, y0 (1 + e))."""
    den, y_m = np.asarray(den, np.int64), np.asarray(y_m, np.int64)
    f = den - (1 << 30)
    i = np.minimum(f >> 22, 2 ** RECIP_SEED_BITS - 1)
    dx = (f - (i << 22)) >> 12
    y0 = RECIP_SEED[i] - ((RECIP_SEED_STEP[i] * dx) >> 10)
    err = ((1 << 46) - den * y0) >> 15
    z = y_m * y0
    return y0, z + (z >> 31) * err


# 1/sqrt(x) for x = M * 2^(p - 23) in [1, 4) (M the 24-bit significand, p the exponent's parity):
# a chord-interpolated seed y0 (scale 2^-17) on 64 intervals per parity, then one Newton step in
# exact integer products (docs/numerics.md, "The integer cores").
RSQRT_J_BITS = 6                       # i = the top 6 fraction bits of M: 64 intervals per parity
RSQRT_DX_BITS = 12                     # dx = the next 12 fraction bits
RSQRT_SEED = np.array([[round(2.0 ** 17 / math.sqrt(2.0 ** p * (1.0 + k / 2 ** RSQRT_J_BITS))) - 1
                        for k in range(2 ** RSQRT_J_BITS + 1)] for p in range(2)], np.int64)
RSQRT_SEED_STEP = RSQRT_SEED[:, :-1] - RSQRT_SEED[:, 1:]        # [2, 64], 258 .. 1,012 (10 bits)
RSQRT_E_BITS = 18                      # e = (2^55 - P) >> 25 is a signed 18-bit integer (every M, p)


def rsqrt_q40(big_m: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y0, e, Y): Y * 2^-40 ~= 1/sqrt(x), x = M * 2^(p - 23) in [1, 4), for int64 M in
    [2^23, 2^24) and p in {0, 1}.

    f = M - 2^23; i = f >> 17; dx = (f >> 5) & 4095;
    y0 = SEED[p, i] - ((SEED_STEP[p, i] * dx) >> 12) (chord interpolation, scale 2^-17, < 2^17);
    S = (y0 * y0) >> 2 (scale 2^-32, 32 bits); P = (M << p) * S (exact, < 2^57, scale 2^-55);
    e = (2^55 - P) >> 25 (1 - x y0^2 at scale 2^-30, signed, 18 bits);
    Y = (y0 << 23) + ((y0 * e) >> 8) (one Newton step y0 (1 + e/2), scale 2^-40; Y in [2^39, 2^40)).
    Every >> is a floor."""
    big_m, p = np.asarray(big_m, np.int64), np.asarray(p, np.int64)
    f = big_m - (1 << 23)
    i = f >> (23 - RSQRT_J_BITS)
    dx = (f >> (23 - RSQRT_J_BITS - RSQRT_DX_BITS)) & ((1 << RSQRT_DX_BITS) - 1)
    y0 = RSQRT_SEED[p, i] - ((RSQRT_SEED_STEP[p, i] * dx) >> RSQRT_DX_BITS)
    s = (y0 * y0) >> 2
    e = ((1 << 55) - (big_m << p) * s) >> 25
    return y0, e, (y0 << 23) + ((y0 * e) >> 8)


def _to_f32(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """t * 2^s rounded once to fp32 (RNE) for int64 0 < t < 2^53 (exact in float64, and so is the
    scaling while the result stays in float64's normal range)."""
    return np.ldexp(np.asarray(t, np.int64).astype(np.float64), s).astype(F32)


# --- elementary functions ------------------------------------------------------------------------
def rsqrt(v: np.ndarray) -> np.ndarray:
    """1/sqrt(v) for fp32 v > 0, subnormals included (+inf gives +0.0), in integers.

    v = M * 2^(e - 23), M the 24-bit significand (subnormals normalised), e the exponent;
    p = e & 1, E = e - p (even); Y = :func:`rsqrt_q40` (M, p)[2] (Y * 2^-40 ~= 1/sqrt(M 2^(p - 23)),
    Y in [2^39, 2^40)); result Y * 2^(-40 - E/2) rounded once to fp32 (RNE; always normal).
    rsqrt(4^k) = 2^-k exactly.
    """
    v = np.asarray(v, F32)
    if not np.all(v > 0):
        raise ValueError("rsqrt: the contract's domain is v > 0")
    inf = np.isinf(v)
    m, e = _split(np.where(inf, F32(1.0), v).astype(F32))
    big_m = np.ldexp(m.astype(np.float64), 23).astype(np.int64)
    p = e & 1
    _, _, y = rsqrt_q40(big_m, p)
    out = _to_f32(y, -40 - (e - p) // 2)
    return np.where(inf, F32(0.0), out).astype(F32)


def reciprocal(d: np.ndarray) -> np.ndarray:
    """1/d for fp32 d in [2^-125, 2^125] (the contract uses d in [1, 2^24]), in integers.

    d = M * 2^(e - 23), M the 24-bit integer significand (e = the unbiased exponent);
    den = M * 2^7 (Q1.30, in [2^30, 2^31)); (y0, T) = :func:`recip_q46` (den, 2^30)
    (T * 2^-46 ~= 1 / (M 2^-23), T in [2^45, 2^46]); result T * 2^(-46 - e) rounded once
    to fp32 (RNE; always normal). Powers of two are exact (M = 2^23: y0 = 2^16, E = 0, T = 2^46).
    """
    d = np.asarray(d, F32)
    if not np.all((d >= F32(2.0 ** -125)) & (d <= F32(2.0 ** 125))):
        raise ValueError("reciprocal: the contract's domain is [2^-125, 2^125]")
    m, e = _split(d)
    big_m = np.ldexp(m.astype(np.float64), 23).astype(np.int64)
    _, t = recip_q46(big_m << 7, np.full(big_m.shape, 1 << 30, np.int64))
    return _to_f32(t, -46 - e)


def _check_nonpositive(x: np.ndarray, what: str) -> None:
    if np.any(x > 0) or np.any(np.isnan(x)):
        raise ValueError(f"{what}: the contract's domain is x <= 0")


def _rne_shift(p: np.ndarray, s: np.ndarray) -> np.ndarray:
    """round_half_even(p / 2^s) for int64 p >= 0 and 1 <= s <= 62."""
    q = p >> s
    rem = p - (q << s)
    half = np.int64(1) << (s - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    return q + up.astype(np.int64)


def _log2e_argument(a: np.ndarray) -> np.ndarray:
    """U = round_half_even(a * log2(e) * 2^29) for finite fp32 a >= 0, exactly in :func:`exp` and :func:`sigmoid`:
    a = M * 2^(e-24) (M the 24-bit integer significand, e from frexp), P = M * LOG2E_Q31,
    U = round_half_even(P / 2^(26 - e)), the shift clamped to [1, 62]."""
    m, e = np.frexp(np.asarray(a, F32))
    big_m = np.ldexp(m.astype(np.float64), 24).astype(np.int64)
    return _rne_shift(big_m * np.int64(LOG2E_Q31), np.clip(26 - e.astype(np.int64), 1, 62))


def _pow2(u: np.ndarray) -> np.ndarray:
    """2^(u * 2^-29) for int64 u in [-126 * 2^29, 0]: (Y, n) = :func:`pow2_q30` (u), then
    Y * 2^(n - 30) rounded once to fp32 (RNE of Y's 31 bits to 24; always normal, at most 1.0)."""
    y, n = pow2_q30(u)
    return _to_f32(y, n - 30)


def exp2(t: np.ndarray) -> np.ndarray:
    """2^t for fp32 t <= 0 (including -inf); t < -126 gives +0.0.
    u = round_half_even(t * 2^29) (t * 2^29 is exact; the one rounding is at most
    2^-30 in t), then :func:`_pow2` (u): the integer core and one rounding to fp32."""
    t = np.asarray(t, F32)
    _check_nonpositive(t, "exp2")
    live = t >= F32(EXP2_MIN)
    ts = np.where(live, t, F32(0.0)).astype(np.float64)
    u = np.rint(ts * float(1 << EXP2_FRAC_BITS)).astype(np.int64)
    return np.where(live, _pow2(u), F32(0.0)).astype(F32)


def exp(x: np.ndarray) -> np.ndarray:
    """e^x for fp32 x <= 0 (including -inf), through the same integer core as exp2.

    |x| = M * 2^(e-24) with M the 24-bit integer significand (M = 0 for x = 0);
    P = M * LOG2E_Q31 (exact, < 2^56, LOG2E_Q31 = round(log2(e) * 2^31));
    u = -round_half_even(P / 2^(26 - e)) (shift clamped to 62; u is t * 2^29
    for t = x log2(e) with one rounding); u < -126 * 2^29 (or x = -inf) gives
    +0.0, else :func:`_pow2` (u).
    """
    x = np.asarray(x, F32)
    _check_nonpositive(x, "exp")
    u = -_log2e_argument(np.where(np.isinf(x), F32(0.0), -x).astype(F32))
    live = (u >= -126 * (1 << EXP2_FRAC_BITS)) & ~np.isinf(x)
    u = np.where(live, u, 0)
    return np.where(live, _pow2(u), F32(0.0)).astype(F32)


# --- sigmoid: integer form ----------------------------------------------------------------------
SIG_DEAD_U = 126 << EXP2_FRAC_BITS     # U above this (|g| > 87.34): e^-|g| is taken as 0


def sigmoid(g: np.ndarray) -> np.ndarray:
    """1/(1+e^-g) in integer arithmetic (every fp32 g but NaN), one rounding at the end.

    neg = g < 0 (-0.0 is not negative); U = :func:`_log2e_argument` (|g|); dead = |g| = inf or
    U > 126 * 2^29 (e^-|g| < 2^-126 is taken as 0). (Y, n) = :func:`pow2_q30` (-U) (e^-|g| =
    Y * 2^(n - 30)); den = 2^30 + (Y >> -n) (Q1.30, in [2^30, 2^31]; 2^30 if dead);
    (y0, T) = :func:`recip_q46` (den, Y if neg else 2^30). Result: T * 2^(n - 46) if neg,
    T * 2^-46 if not, rounded once to fp32 (RNE; always normal); neg and dead: +0.0.
    g = +inf gives 1.0, -inf +0.0, +-0 exactly 0.5."""
    g = np.asarray(g, F32)
    if np.any(np.isnan(g)):
        raise ValueError("sigmoid: the contract's domain is every fp32 but NaN")
    neg = g < 0
    a = np.abs(g).astype(F32)
    inf = np.isinf(a)
    big_u = _log2e_argument(np.where(inf, F32(0.0), a))
    dead = inf | (big_u > SIG_DEAD_U)
    y, n = pow2_q30(np.where(dead, 0, -big_u))
    den = np.where(dead, 1 << 30, (1 << 30) + (y >> np.minimum(-n, 31)))
    _, t = recip_q46(den, np.where(neg, y, 1 << 30))
    # T < 2^47 is exact in float64; scaling by 2^(n - 46) too; the one rounding is to fp32
    out = _to_f32(t, np.where(neg, n, 0) - 46)
    return np.where(neg & dead, F32(0.0), out).astype(F32)


# --- decoder ops ---------------------------------------------------------------------------------
def embedding(table_bf16: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bf16 bit patterns uint16 [vocab, hidden] -> fp32 rows (exact: the bits shifted up 16)."""
    rows = np.asarray(table_bf16, np.uint16)[np.asarray(ids, np.int64)]
    return (rows.astype(np.uint32) << np.uint32(16)).view(F32)


def bf16_bits(table_f32: np.ndarray) -> np.ndarray:
    """The bf16 patterns of an fp32 table whose values are all bf16 (else ValueError)."""
    u = np.ascontiguousarray(table_f32, F32).view(np.uint32)
    if np.any(u & np.uint32(0xFFFF)):
        raise ValueError("embedding table holds values that are not bf16")
    return (u >> np.uint32(16)).astype(np.uint16)


def rms_constants(n: int, eps: float) -> tuple[np.float32, np.float32]:
    """(fp32(1/n), fp32(eps)), both rounded once from float64."""
    return F32(1.0 / n), F32(eps)


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """x [..., n] fp32: s = fixed_sum(x*x); ms = s * fp32(1/n); v = ms + fp32(eps);
    r = rsqrt(v); y = (x * r) * gamma, every step rounded."""
    x = np.asarray(x, F32)
    return rms_norm_consts(x, gamma, *rms_constants(x.shape[-1], eps))


def rms_norm_consts(x: np.ndarray, gamma: np.ndarray, inv_n: np.float32, eps32: np.float32) -> np.ndarray:
    """:func:`rms_norm` with its two fp32 constants given (what the RMSNORM descriptor carries)."""
    x = np.asarray(x, F32)
    inv_n, eps32 = F32(inv_n), F32(eps32)
    s = fixed_sum((x * x).astype(F32))
    v = ((s * inv_n).astype(F32) + eps32).astype(F32)
    r = rsqrt(v)
    return ((x * r[..., None]).astype(F32) * np.asarray(gamma, F32)).astype(F32)


def rope_half_tables(head_dim: int, theta: float, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host-side, once: cos, sin fp32 [len(positions), head_dim/2].
    angle[p, i] = p * theta^(-2i/head_dim) in float64, cos/sin in float64, rounded to fp32."""
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(F32), np.sin(ang).astype(F32)


def apply_rope(x: np.ndarray, cos_h: np.ndarray, sin_h: np.ndarray) -> np.ndarray:
    """HF rotate-half RoPE. x [..., T, hd]; cos_h, sin_h [T, hd/2].
    out[i]      = x[i]*c[i] - x[i+h]*s[i]     as fp32(fp32(x[i]*c) + fp32((-x[i+h])*s))
    out[i + h]  = x[i+h]*c[i] + x[i]*s[i]     as fp32(fp32(x[i+h]*c) + fp32(x[i]*s))"""
    x = np.asarray(x, F32)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    lo = ((x1 * cos_h).astype(F32) + ((-x2) * sin_h).astype(F32)).astype(F32)
    hi = ((x2 * cos_h).astype(F32) + (x1 * sin_h).astype(F32)).astype(F32)
    return np.concatenate([lo, hi], axis=-1)


def quantize_heads(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-vector symmetric INT8 over the last axis (a head): the activation rule of
    numerics.quantize_activations with group = head_dim. Returns (int8 [..., hd], fp32 [...])."""
    x = np.asarray(x, F32)
    q, s, _ = quantize_activations(x.reshape(-1, x.shape[-1]), x.shape[-1])
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def score_scale(head_dim: int) -> np.float32:
    """fp32(log2(e) / sqrt(head_dim)) from float64: softmax works in base 2."""
    return F32(1.0 / (math.log(2.0) * math.sqrt(head_dim)))


def attention_scores(q8, s_q, k8, s_k, head_dim: int) -> np.ndarray:
    """Base-2 scores. q8 int8 [..., hd], s_q fp32 [...]; k8 int8 [S, hd], s_k fp32 [S].
    acc = sum q8*k8 (exact, |acc| <= 127*127*hd < 2^24 for hd <= 128);
    a = s_q * C; b = a * s_k[j]; score = fp32(acc) * b (each rounded). Returns [..., S]."""
    acc = np.einsum("...d,sd->...s", q8.astype(np.int64), k8.astype(np.int64))
    a = (np.asarray(s_q, F32) * score_scale(head_dim)).astype(F32)
    b = (a[..., None] * np.asarray(s_k, F32)).astype(F32)
    return (acc.astype(F32) * b).astype(F32)


def softmax2(scores: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Base-2 softmax over the last axis on the visible positions (at least one per row),
    left unnormalised: returns (e [..., S], r [...]) with p = e * r in exact arithmetic.
    m = max of visible scores (exact); d = score - m (rounded, <= 0); e = exp2(d);
    e = +0.0 where not visible; s = fixed_sum(e) (>= 1); r = reciprocal(s).
    :func:`attention_values` applies r once per output, after the integer P.V."""
    scores = np.asarray(scores, F32)
    m = np.max(np.where(visible, scores, F32(-np.inf)), axis=-1, keepdims=True)
    d = np.where(visible, (scores - m).astype(F32), F32(0.0)).astype(F32)
    e = np.where(visible, exp2(d), F32(0.0)).astype(F32)
    return e, reciprocal(fixed_sum(e))


PV_MAX_POSITIONS = 1 << 20     # |acc| < 2^24 * 127 * 2^20 < 2^52: a 52-bit signed accumulator
PV_W_BITS = 24                 # W_j < 2^24 (unsigned)


def pv_block_exponent(s_v: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """The P.V block exponent B int64 [...] of rows whose visible positions are `visible`
    (bool [..., S]) over the value scales s_v fp32 [S]: B = max(1, max over the visible j
    of the biased exponent field of s_v[j]).

    It depends on the value scales and the mask only, not on the scores: the RTL knows it
    before any exp2 (it reads the V scales beside the K rows), so the exp2 pass and the P.V
    MACs run as one pass. Every weight w_j = fp32(e_j * s_v[j]) with e_j <= 1 (exp2 of a
    d <= 0 never exceeds 1) is <= s_v[j], so its exponent x_j <= B.
    """
    s_v = np.asarray(s_v, F32)
    if np.any(np.signbit(s_v)) or not np.all(np.isfinite(s_v)):
        raise ValueError("attention_values: the contract's domain is s_v >= 0, finite")
    field = ((s_v.view(np.uint32) >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int64)
    vis = np.asarray(visible, bool)
    if vis.shape[-1] == 0:
        return np.ones(vis.shape[:-1], np.int64)
    return np.maximum(np.max(np.where(vis, field, 1), axis=-1), 1)


def pv_weights(e: np.ndarray, s_v: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The block-fixed-point P.V weights: (W int64 [..., S], B int64 [...]).

    w_j = fp32(e_j * s_v[j]) (one RNE product; e_j, s_v[j] >= 0, so w_j >= 0) is
    M_j * 2^(x_j - 150): M_j its 24-bit integer significand (hidden bit included,
    0 for subnormals), x_j = max(biased exponent field, 1). B = :func:`pv_block_exponent`
    (s_v, visible): from the visible positions' value scales, not from the weights, so it
    is known before the exps (x_j <= B since e_j <= 1; invisible positions never move B, so
    a longer cache gives the same bits). W_j = round_half_even(M_j / 2^(B - x_j)): the
    alignment shift of a float adder, with RNE instead of a sticky bit. W_j < 2^24
    (B = x_j: W_j = M_j; else W_j <= round(M_j / 2) <= 2^23); a shift >= 25 gives 0.
    """
    e = np.asarray(e, F32)
    w = (e * np.asarray(s_v, F32)).astype(F32)
    if np.any(np.signbit(e)) or np.any(e > F32(1.0)) or np.any(np.isnan(e)):
        raise ValueError("attention_values: the contract's domain is 0 <= e <= 1")
    b = pv_block_exponent(s_v, np.broadcast_to(np.asarray(visible, bool), w.shape))
    bits = w.view(np.uint32).astype(np.int64)
    field = (bits >> 23) & 0xFF
    mant = (bits & 0x7FFFFF) | np.where(field > 0, 1 << 23, 0)
    x = np.maximum(field, 1)
    # e <= 1 gives w <= s_v, so x <= B on the visible positions; elsewhere e must be +0.0
    if np.any(x > b[..., None]):
        raise ValueError("attention_values: e must be +0.0 on the positions that are not visible")
    shift = np.minimum(b[..., None] - x, 26)          # M < 2^24: any shift >= 25 gives 0
    return np.where(shift == 0, mant, _rne_shift(mant, np.maximum(shift, 1))), b


def attention_values(e: np.ndarray, r: np.ndarray, v8: np.ndarray, s_v: np.ndarray,
                     visible: np.ndarray) -> np.ndarray:
    """P.V in block fixed point. e [..., S] and r [...] from :func:`softmax2`;
    v8 int8 [S, hd]; s_v fp32 [S] (S <= PV_MAX_POSITIONS); visible bool [..., S] (the mask
    given to softmax2; it sets the block exponent). Returns fp32 [..., hd].

    (W, B) = :func:`pv_weights` (e, s_v, visible); acc_d = sum_j W_j * v8[j, d] (exact
    signed integer, |acc| < 2^24 * 127 * S); y_d = fp32 RNE of acc_d * 2^(B - 150)
    (one rounding, subnormals kept, 0 -> +0.0); out_d = fp32(y_d * r).
    """
    v8 = np.asarray(v8)
    if v8.shape[0] > PV_MAX_POSITIONS:
        raise ValueError(f"attention_values: at most {PV_MAX_POSITIONS} positions")
    w, b = pv_weights(e, s_v, visible)
    # Every product and partial sum is an integer below 2^52, so float64 matmul is exact
    # in any order (an FMA of exact integers is exact too).
    acc = (w.astype(np.float64) @ v8.astype(np.float64)).astype(np.int64)
    # acc < 2^53 is exact in float64, scaling by a power of two (>= 2^-149) too; the one
    # rounding is float64 -> fp32 (RNE, subnormals kept).
    y = np.ldexp(acc.astype(np.float64), (b - 150)[..., None]).astype(F32)
    return (y * np.asarray(r, F32)[..., None]).astype(F32)


ATTEND_BLOCK_ELEMS = 1 << 22   # scores materialised at once (memory only, not arithmetic)


def attend_kv_group(q8, s_q, k8, s_k, v8, s_v, visible, head_dim: int) -> np.ndarray:
    """One KV head's attention for the query heads that share it.

    q8 int8 [rep, T, hd], s_q fp32 [rep, T]; k8, v8 int8 [S, hd], s_k, s_v fp32 [S];
    visible bool [T, S] (row t sees positions j with visible[t, j]). Returns fp32
    [rep, T, hd]: :func:`attention_scores`, :func:`softmax2`, :func:`attention_values`
    per row. Rows are independent, so processing them in blocks changes nothing.
    """
    rep, t = q8.shape[0], q8.shape[1]
    out = np.empty((rep, t, head_dim), F32)
    block = max(1, ATTEND_BLOCK_ELEMS // max(1, rep * k8.shape[0]))
    for b0 in range(0, t, block):
        b1 = min(t, b0 + block)
        scores = attention_scores(q8[:, b0:b1], s_q[:, b0:b1], k8, s_k, head_dim)
        e, r = softmax2(scores, visible[b0:b1])
        out[:, b0:b1] = attention_values(e, r, v8, s_v, visible[b0:b1])
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """fp32(fp32(gate * sigmoid(gate)) * up)."""
    gate = np.asarray(gate, F32)
    return ((gate * sigmoid(gate)).astype(F32) * np.asarray(up, F32)).astype(F32)


def residual_add(h: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (np.asarray(h, F32) + np.asarray(y, F32)).astype(F32)


def argmax_first(logits: np.ndarray) -> np.ndarray:
    """Greedy token: the first index of the largest logit over the last axis.
    NaN compares as -inf; +0.0 and -0.0 are equal; all -inf/NaN gives index 0."""
    x = np.asarray(logits, F32)
    key = np.where(np.isnan(x), F32(-np.inf), x)
    m = np.max(key, axis=-1, keepdims=True)
    return np.argmax(key == m, axis=-1)
