"""The fabric ops contract (sw/contract/fabric_ops.py) against independent oracles.

Error bounds: float64 references over the whole used input range. The
measured maxima (docs/numerics.md, "The fabric ops"; exhaustive where stated)
are written beside each bound; the bounds add about 20 % so a change of
method fails while a different sample does not. ulp = 2^(floor(log2|ref|) - 23)
of the float64 reference (normal range).

Everything else is bit-exact: hand-worked cases, scalar re-statements of the
documented order, and a cycle-level model of an L-lane adder with latency D
that must give the same bits as fixed_sum for every L.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from sw.contract import fabric_ops as fo

F32 = np.float32


def _ulp(ref):
    e = np.floor(np.log2(np.abs(ref)))
    return np.exp2(np.maximum(e, -126) - 23)


def _err(y, ref):
    y = np.asarray(y, np.float64)
    d = np.abs(y - ref)
    return float(np.max(d / np.abs(ref))), float(np.max(d / _ulp(ref)))


def _floats(lo, hi, step=1):
    """Every step-th fp32 in [lo, hi) (0 <= lo < hi)."""
    a, b = np.array([lo, hi], F32).view(np.uint32)
    return np.arange(a, b, step, dtype=np.uint32).view(F32)


def _bits(x):
    return np.asarray(x, F32).view(np.uint32)


# ---- measured bounds ------------------------------------------------------------------------------
# (measured max relative error, measured max ulps) -> bounds with ~20 % margin
RSQRT_REL, RSQRT_ULP = 7.2e-8, 0.63          # exhaustive [1, 4): 6.015e-8, 0.520 ulp
RECIP_REL, RECIP_ULP = 7.4e-8, 0.63          # exhaustive [1, 2): 6.119e-8, 0.519 ulp
EXP2_REL, EXP2_ULP = 7.3e-8, 0.66            # every 8th fp32 of -[2^-30, 126] and every one of [-2, -1): 6.089e-8, 0.544 ulp
EXP_REL, EXP_ULP = 8.4e-8, 0.81              # [-87.33, 0], 16M random + every 64th: 6.949e-8, 0.671 ulp
SIGMOID_REL, SIGMOID_ULP = 8.3e-8, 0.81      # [-87, 87], 16M random + every 64th: 6.949e-8, 0.671 ulp
POW2_Y_ERR = 5.0                             # |Y - 2^(u 2^-29) 2^30| (Q1.30 units): measured 4.40
RECIP_T_REL = 3.2e-9                          # T / 2^46 vs 1 / den, every den in [2^30, 2^31]: 2.615e-9
RSQRT_Y_REL = 1.7e-9                          # Y / 2^40 vs 1 / sqrt(x), every M and p: 1.390e-9


def test_rsqrt_bound():
    # rsqrt(v * 4^k) = rsqrt(v) * 2^-k exactly, so [1, 4) covers every positive normal
    v = _floats(1.0, 4.0, 5)
    rel, ulp = _err(fo.rsqrt(v), 1.0 / np.sqrt(v.astype(np.float64)))
    assert rel < RSQRT_REL and ulp < RSQRT_ULP, (rel, ulp)


def test_reciprocal_bound():
    v = _floats(1.0, 2.0, 3)
    rel, ulp = _err(fo.reciprocal(v), 1.0 / v.astype(np.float64))
    assert rel < RECIP_REL and ulp < RECIP_ULP, (rel, ulp)


def test_exp2_bound():
    t = np.concatenate([-_floats(2.0 ** b, 2.0 ** (b + 1), 1021) for b in range(-30, 6)]
                       + [-_floats(64.0, 126.0, 1021)])
    rel, ulp = _err(fo.exp2(t), np.exp2(t.astype(np.float64)))
    assert rel < EXP2_REL and ulp < EXP2_ULP, (rel, ulp)


def test_exp_bound():
    x = -(np.random.default_rng(1).random(1_000_000) * 87.33).astype(F32)
    rel, ulp = _err(fo.exp(x), np.exp(x.astype(np.float64)))
    assert rel < EXP_REL and ulp < EXP_ULP, (rel, ulp)


def test_sigmoid_bound():
    x = ((np.random.default_rng(2).random(1_000_000) * 2 - 1) * 87).astype(F32)
    ref = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    rel, ulp = _err(fo.sigmoid(x), ref)
    assert rel < SIGMOID_REL and ulp < SIGMOID_ULP, (rel, ulp)
    # below -87.34 the exp flushes to +0: sigmoid is +0.0, off by less than 2^-126 absolute
    assert np.all(fo.sigmoid(np.array([-87.5, -100.0, -1e30], F32)) == 0.0)


@pytest.mark.slow
def test_exhaustive_bounds():
    for lo, hi, fn, ref, rb, ub in [(1.0, 4.0, fo.rsqrt, lambda v: 1 / np.sqrt(v), RSQRT_REL, RSQRT_ULP),
                                    (1.0, 2.0, fo.reciprocal, lambda v: 1 / v, RECIP_REL, RECIP_ULP)]:
        for part in np.array_split(_floats(lo, hi), 16):
            rel, ulp = _err(fn(part), ref(part.astype(np.float64)))
            assert rel < rb and ulp < ub, (fn.__name__, rel, ulp)
    for lo, hi, step in [(2.0 ** b, 2.0 ** (b + 1), 8) for b in range(-30, 6)] + [(64.0, 126.0, 8), (1.0, 2.0, 1)]:
        t = -_floats(lo, hi, step)
        rel, ulp = _err(fo.exp2(t), np.exp2(t.astype(np.float64)))
        assert rel < EXP2_REL and ulp < EXP2_ULP, (lo, rel, ulp)


# ---- hand-worked cases ----------------------------------------------------------------------------
def test_exp2_exact_points():
    k = np.arange(0, 127)
    assert np.array_equal(fo.exp2(-k.astype(F32)), np.ldexp(F32(1.0), -k).astype(F32))
    # 2^(-k + j/64): L = 0, so Y = TJ[j] and the result is TJ[j] * 2^-30 rounded once, times 2^-k
    # (the same as 2^(j/64) rounded once to fp32 for these j)
    for j in (1, 2, 16, 32, 63):
        t = (-np.arange(1, 100) + j / 64).astype(F32)
        want = np.ldexp(F32(int(fo.POW2_TJ[j]) / 2.0 ** 30), np.floor(t).astype(int)).astype(F32)
        assert np.array_equal(_bits(fo.exp2(t)), _bits(want)), j
        assert np.array_equal(want, np.ldexp(F32(2.0 ** (j / 64)), np.floor(t).astype(int)).astype(F32)), j
    assert _bits(fo.exp2(np.array([-0.5], F32)))[0] == 0x3F3504F3      # fp32(sqrt(1/2))
    assert list(fo.exp2(np.array([0.0, -0.0, -1e-30, -126.0, -126.00001, -np.inf], F32))) == \
        [1.0, 1.0, 1.0, 2.0 ** -126, 0.0, 0.0]
    with pytest.raises(ValueError):
        fo.exp2(np.array([0.5], F32))


def test_exp_exact_points():
    assert list(fo.exp(np.array([0.0, -0.0, -1e-30, -88.0, -np.inf], F32))) == [1.0, 1.0, 1.0, 0.0, 0.0]
    # x = -k ln2 to fp32: e^x = 2^-k within the bound (the input carries its own rounding)
    k = np.arange(1, 120)
    x = (-k * math.log(2.0)).astype(F32)
    rel, _ = _err(fo.exp(x), np.exp(x.astype(np.float64)))
    assert rel < EXP_REL
    with pytest.raises(ValueError):
        fo.exp(np.array([1.0], F32))


def test_exp2_never_above_one():
    # the largest Y (u = -1) rounds to 2^31 (a carry): exp2 = 2^-1 * 2 = 1.0, never above
    assert fo.exp2(np.array([-2.0 ** -30, -2.0 ** -29, -1.5 * 2.0 ** -29], F32)).max() == 1.0
    y, n = fo.pow2_q30(np.array([-1]))
    assert fo._pow2(np.array([-1]))[0] == 1.0 and n[0] == -1


def test_reciprocal_steps():
    # d = M * 2^(e - 23): den = M << 7; i = the top 8 fraction bits, dx the next 10
    for d in (1.0, 2.0 ** 24, 3.0, 1.5, 1.9999999, 2.0 ** -125, 2.0 ** 125):
        m, e = np.frexp(np.float64(F32(d)))
        big_m = int(m * 2 ** 24)
        _, t = fo.recip_q46(np.array([big_m << 7]), np.array([2 ** 30]))
        assert fo.reciprocal(np.array([d], F32))[0] == F32(math.ldexp(int(t[0]), -46 - (int(e) - 1)))
    # every significand is within [2^45, 2^46] (one Newton step from below: T <= 2^46 at M = 2^23 only)
    big_m = np.arange(1 << 23, 1 << 24, 1, dtype=np.int64)
    _, t = fo.recip_q46(big_m << 7, np.full(big_m.shape, 2 ** 30))
    assert t[0] == 2 ** 46 and np.all(t[1:] < 2 ** 46) and np.all(t >= 2 ** 45)


def test_rsqrt_and_reciprocal_exact_points():
    k = np.arange(-60, 61)
    assert np.array_equal(fo.rsqrt(np.ldexp(F32(1.0), 2 * k).astype(F32)), np.ldexp(F32(1.0), -k).astype(F32))
    assert np.array_equal(fo.reciprocal(np.ldexp(F32(1.0), k).astype(F32)), np.ldexp(F32(1.0), -k).astype(F32))
    assert fo.rsqrt(np.array([np.inf], F32))[0] == 0.0
    assert fo.rsqrt(np.array([0.25], F32))[0] == 2.0
    assert fo.reciprocal(np.array([3.0], F32))[0] == F32(1.0 / 3.0)
    # subnormal input: 2^-140 -> 2^70
    assert fo.rsqrt(np.array([2.0 ** -140], F32))[0] == 2.0 ** 70
    for bad in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError):
            fo.rsqrt(np.array([bad], F32))
        with pytest.raises(ValueError):
            fo.reciprocal(np.array([bad], F32))
    with pytest.raises(ValueError):
        fo.reciprocal(np.array([2.0 ** 126], F32))


def test_rsqrt_steps():
    """The integer core over every significand of both parities (x = M 2^(p - 23) in [1, 4)): the
    widths the RTL relies on, and Y against float64."""
    big_m = np.arange(1 << 23, 1 << 24, dtype=np.int64)
    worst = 0.0
    for p in (0, 1):
        y0, e, y = fo.rsqrt_q40(big_m, np.full(big_m.shape, p))
        assert np.all(y0 >= 2 ** 16) and np.all(y0 < 2 ** 17)                          # 17 bits
        assert np.all(((y0 * y0) >> 2) < 2 ** 32)                                       # S: 32 bits
        assert np.all(np.abs(e) < 2 ** (fo.RSQRT_E_BITS - 1))                           # 18 bits signed
        assert np.all(y >= 2 ** 39) and np.all(y < 2 ** 40)                             # the leading one at 39
        x = big_m * 2.0 ** (p - 23)
        worst = max(worst, float(np.max(np.abs(y / 2.0 ** 40 * np.sqrt(x) - 1.0))))
    assert worst < RSQRT_Y_REL, worst
    # x = 1: y0 = SEED[0, 0] = 2^17 - 1; S = (2^34 - 2^18 + 1) >> 2 = 2^32 - 2^16; P = 2^55 - 2^39;
    # e = 2^39 >> 25 = 2^14; Y = 2^40 - 2^23 + ((2^31 - 2^14) >> 8) = 2^40 - 64, which rounds to 1.0
    y0, e, y = fo.rsqrt_q40(np.array([1 << 23]), np.array([0]))
    assert (y0[0], e[0], y[0]) == (2 ** 17 - 1, 2 ** 14, 2 ** 40 - 64)
    # v = M 2^(e - 23): the result is Y 2^(-40 - (e - p) / 2) rounded once
    for v in (1.0, 2.0, 3.0, 1.5, 3.9999998, 1e-6, 1e4, 2.0 ** -140, 3e38, 1e-45):
        m, ex = np.frexp(np.float64(F32(v)))
        big_m, ex = int(m * 2 ** 24), int(ex) - 1
        if big_m < 2 ** 23:                                                             # (not for fp32)
            raise AssertionError(v)
        _, _, y = fo.rsqrt_q40(np.array([big_m]), np.array([ex & 1]))
        want = F32(math.ldexp(int(y[0]), -40 - (ex - (ex & 1)) // 2))
        assert fo.rsqrt(np.array([v], F32))[0] == want, v


def test_rsqrt_tables_follow_their_rule():
    """RSQRT_SEED against its rule in 50-digit decimal arithmetic: no entry near a rounding tie."""
    from decimal import Decimal, getcontext
    getcontext().prec = 50
    for p in range(2):
        for k in range(65):
            v = Decimal(2 ** 17) / (Decimal(2 ** p) * (1 + Decimal(k) / 64)).sqrt()
            assert abs(v - int(v) - Decimal("0.5")) > Decimal("1e-6"), (p, k)
            assert int(fo.RSQRT_SEED[p, k]) == int(v + Decimal("0.5")) - 1, (p, k)
    assert fo.RSQRT_SEED[0, 0] == 2 ** 17 - 1 and fo.RSQRT_SEED[0, 64] == fo.RSQRT_SEED[1, 0] == 92681
    assert fo.RSQRT_SEED[1, 64] == 2 ** 16 - 1 and fo.RSQRT_SEED[0, 32] == 107019
    assert fo.RSQRT_SEED_STEP.min() == 258 and fo.RSQRT_SEED_STEP.max() == 1012          # 10 bits


def test_sigmoid_and_silu_points():
    x = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1e-30, -1e-30, -87.5, -100.0, 100.0, 3e38], F32)
    assert list(fo.sigmoid(x)) == [0.5, 0.5, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 1.0, 1.0]
    assert not np.any(np.signbit(fo.sigmoid(x)))
    with pytest.raises(ValueError):
        fo.sigmoid(np.array([np.nan], F32))
    x = np.linspace(-30, 30, 2001).astype(F32)
    s = fo.sigmoid(x).astype(np.float64)
    assert np.all(np.diff(s) >= 0)                                          # monotone
    assert np.max(np.abs(s + s[::-1] - 1.0)) < 2 * SIGMOID_REL              # sigma(x) + sigma(-x) = 1
    y = fo.silu_mul(np.array([0.0, -0.0, 1.0, -100.0], F32), np.array([3.0, 3.0, 2.0, 5.0], F32))
    assert y[0] == 0.0 and y[1] == 0.0 and y[3] == 0.0
    assert abs(y[2] - 2 / (1 + math.exp(-1))) < 4e-7
    # the last live point and the first dead one: U = RNE(|g| log2(e) 2^29) against 126 * 2^29
    a = np.array([87.33654, 87.336548], F32)
    u = [round(Fraction(float(v)) * fo.LOG2E_Q31 * 2 ** 29 / 2 ** 31) for v in a]
    assert u[0] <= 126 * 2 ** 29 < u[1]
    live, dead = fo.sigmoid(-a)
    assert dead == 0.0 and 0 < live < 2.0 ** -125


def test_sigmoid_tables_follow_their_rule():
    """The tables against the same rules in 50-digit decimal arithmetic (not float64): no entry
    is near a rounding tie, so the float64 construction in fabric_ops is unambiguous."""
    from decimal import Decimal, getcontext
    getcontext().prec = 50
    ln2 = Decimal(2).ln()
    for name, table, c, bits in [("TJ", fo.POW2_TJ, Decimal(1), 30), ("C1", fo.POW2_C1, ln2, 25),
                                 ("C2", fo.POW2_C2, ln2 ** 2 / 2, 20), ("C3", fo.POW2_C3, ln2 ** 3 / 6, 14)]:
        for j in range(64):
            v = (ln2 * j / 64).exp() * c * 2 ** bits
            frac = v - int(v)
            assert abs(frac - Decimal("0.5")) > Decimal("1e-6"), (name, j)
            assert int(table[j]) == int(v + Decimal("0.5")), (name, j)
    for k in range(257):
        v = Decimal(2 ** 16) / (1 + Decimal(k) / 256)
        assert int(fo.RECIP_SEED[k]) == int(v + Decimal("0.5")), k
    assert fo.RECIP_SEED[0] == 2 ** 16 and fo.RECIP_SEED[256] == 2 ** 15 and fo.RECIP_SEED[128] == 43691
    assert fo.POW2_TJ[0] == 2 ** 30 and fo.POW2_TJ[32] == 1518500250          # round(sqrt(2) 2^30)


def test_sigmoid_pow2_steps():
    # u = -k 2^29: j = L = 0, so Y = TJ[0] = 2^30 exactly and n = -k (e = 2^-k)
    k = np.arange(0, 127)
    y, n = fo.pow2_q30(-k * 2 ** 29)
    assert np.all(y == 2 ** 30) and np.array_equal(n, -k)
    # u = -1: n = -1, j = 63, L = 2^23 - 1, the largest Y: below 2^31 (no clamp needed)
    y, n = fo.pow2_q30(np.array([-1]))
    assert n[0] == -1 and 2 ** 31 - 8 <= y[0] < 2 ** 31
    # L = 0 at every j: Y = TJ[j]
    j = np.arange(64)
    y, n = fo.pow2_q30(-(2 ** 29) + j * 2 ** 23)
    assert np.array_equal(y, fo.POW2_TJ) and np.all(n == -1)
    # Y against float64 over u in [-2^29, 0] (every 37th, plus the top of every j interval)
    u = -np.concatenate([np.arange(0, 2 ** 29, 37), np.arange(64) * 2 ** 23 + 2 ** 23 - 1])
    y, n = fo.pow2_q30(u)
    ref = np.exp2(u / 2.0 ** 29 - n) * 2.0 ** 30
    assert np.max(np.abs(y - ref)) < POW2_Y_ERR


def test_sigmoid_reciprocal_steps():
    # den = 2 (g = +-0): f = 2^30, i = 255, dx = 1024: y0 = SEED[256] = 2^15, E = 0, T = 2^45 (0.5)
    y0, t = fo.recip_q46(np.array([2 ** 31]), np.array([2 ** 30]))
    assert y0[0] == 2 ** 15 and t[0] == 2 ** 45
    # den = 1 (dead or e < 2^-31): y0 = 2^16, E = 0, T = y_m 2^16 (the quotient y_m exactly)
    y0, t = fo.recip_q46(np.array([2 ** 30, 2 ** 30]), np.array([2 ** 30, 1518500250]))
    assert list(y0) == [2 ** 16] * 2 and list(t) == [2 ** 46, 1518500250 * 2 ** 16]
    # den = 1.5: i = 128, dx = 0, y0 = SEED[128] = 43691; E = 2^46 - 3 * 2^29 * 43691 = -2^29,
    # e = -2^14; T = 43691 * 2^30 + (43691 * 2^30 >> 31) * -2^14 = 43691 * 2^30 - 21845 * 2^14
    y0, t = fo.recip_q46(np.array([3 * 2 ** 29]), np.array([2 ** 30]))
    assert y0[0] == 43691 and t[0] == 43691 * 2 ** 30 - 21845 * 2 ** 14
    assert abs(Fraction(int(t[0]), 2 ** 46) - Fraction(2, 3)) < Fraction(1, 2 ** 30)
    # 1/den over [1, 2]: every 257th den and both ends of every block of 4096 (one y0 each)
    b = np.arange(2 ** 18, dtype=np.int64)
    den = np.concatenate([np.arange(2 ** 30, 2 ** 31, 257), 2 ** 30 + (b << 12), 2 ** 30 + (b << 12) + 4095,
                          [2 ** 31]])
    _, t = fo.recip_q46(den, np.full(den.shape, 2 ** 30))
    rel = np.abs(t / 2.0 ** 46 * (den / 2.0 ** 30) - 1.0)
    assert np.max(rel) < RECIP_T_REL and np.all(t <= 2 ** 46) and np.all(t >= 2 ** 45)


def test_fixed_sum_hand_cases():
    x = np.zeros(40, F32)
    x[[0, 2, 3]] = [2.0 ** 24, 1.0, 1.0]
    # partials p0 = 2^24, p2 = p3 = 1; tree: (p0+p1) = 2^24, (p2+p3) = 2, then 2^24 + 2 (exact)
    assert fo.fixed_sum(x) == 2.0 ** 24 + 2
    seq = F32(0.0)
    for v in x:
        seq = F32(seq + v)
    assert seq == 2.0 ** 24            # a sequential sum rounds both ones away: the order is the contract
    # p0 accumulates x[0], x[32]: 2^24 + 1 ties to even -> 2^24; the lone 1 in partial 1 survives the tree
    y = np.zeros(64, F32)
    y[[0, 32, 1]] = [2.0 ** 24, 1.0, 1.0]
    assert fo.fixed_sum(y) == 2.0 ** 24     # (2^24 + 1) in the tree ties to even again
    assert fo.fixed_sum(np.ones(1000, F32)) == 1000.0
    assert fo.fixed_sum(np.zeros(0, F32)) == 0.0 and _bits(fo.fixed_sum(-np.zeros(5, F32))) == 0


def _lane_machine(x, lanes, latency):
    """Cycle-level L-lane accumulator: lane l owns the partials p = l (mod L) and, each
    cycle, takes the next element for its next partial; an add issued at cycle c is
    readable at c + latency. Returns the sum (the same tree) and whether a hazard occurred."""
    p = fo.P_PARTIALS
    part = [F32(0.0)] * p
    ready = [0] * p
    hazard = False
    n = len(x)
    cycle = 0
    for base in range(0, n, lanes):
        for lane in range(lanes):
            i = base + lane
            if i >= n:
                continue
            k = i % p
            hazard |= ready[k] > cycle
            part[k] = F32(part[k] + x[i])
            ready[k] = cycle + latency
        cycle += 1
    while len(part) > 1:
        part = [F32(part[i] + part[i + 1]) for i in range(0, len(part), 2)]
    return part[0], hazard


@pytest.mark.parametrize("n", [1, 31, 64, 100, 896])
def test_fixed_sum_is_lane_count_independent(n):
    x = (np.random.default_rng(n).standard_normal(n) * np.exp(np.random.default_rng(n + 1).normal(0, 4, n))).astype(F32)
    want = _bits(fo.fixed_sum(x))
    for lanes in (1, 2, 4, 8, 16, 32):
        got, hazard = _lane_machine(x, lanes, fo.P_PARTIALS // lanes)
        assert _bits(got) == want and not hazard, lanes
    # the model's hazard check is live: 8 lanes with a 5-cycle adder stall on 32 partials
    if n > 64:
        assert _lane_machine(x, 8, 5)[1]


def test_fixed_sum_batched_rows_equal_single_rows():
    x = np.random.default_rng(3).standard_normal((5, 7, 77)).astype(F32)
    b = fo.fixed_sum(x)
    assert all(_bits(fo.fixed_sum(x[i, j])) == _bits(b[i, j]) for i in range(5) for j in range(7))
    assert np.array_equal(_bits(fo.fixed_sum(x.transpose(2, 0, 1), axis=0)), _bits(b))


def test_softmax_hand_cases():
    for s in (1, 2, 4, 64, 256):
        e, r = fo.softmax2(np.full((1, s), 3.25, F32), np.ones((1, s), bool))
        assert np.all(e == 1.0) and r[0] == F32(1.0 / s), s       # e = 1 each, sum = s exactly
    e, r = fo.softmax2(np.array([[0.0, -1.0, -200.0, 7.0]], F32), np.array([[True, True, True, False]]))
    assert list(e[0]) == [1.0, 0.5, 0.0, 0.0] and r[0] == F32(2 / 3)   # exp2(-200) flushes; 7.0 is masked
    x = np.random.default_rng(4).standard_normal((3, 300)).astype(F32) * 4
    ref = np.exp2(x.astype(np.float64) - x.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    e, r = fo.softmax2(x, np.ones(x.shape, bool))
    assert np.max(np.abs(e * r[:, None].astype(np.float64) - ref) / ref) < 1e-6


def test_rms_norm_hand_and_float64():
    # n = 128 equal entries 2^k, eps = 0: sum of squares, mean and rsqrt are exact -> y = gamma
    for k in (-10, 0, 7):
        y = fo.rms_norm(np.full((1, 128), 2.0 ** k, F32), np.full(128, 3.0, F32), 0.0)
        assert np.all(y == 3.0)
    x = (np.random.default_rng(5).standard_normal((8, 896)) * 3).astype(F32)
    x[:, 5] *= 100
    g = np.random.default_rng(6).uniform(0.5, 2, 896).astype(F32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6) * g
    assert np.max(np.abs(fo.rms_norm(x, g, 1e-6) - ref) / np.abs(ref)) < 1e-6


def test_rope_hand_cases():
    x = np.random.default_rng(7).standard_normal((3, 1, 64)).astype(F32)
    cos, sin = fo.rope_half_tables(64, 1e6, np.array([0]))
    assert np.array_equal(_bits(fo.apply_rope(x, cos, sin)), _bits(x))      # position 0 is the identity
    # head_dim 2: frequency 1, so x = [1, 0] at position p becomes [cos p, sin p] rounded once
    cos, sin = fo.rope_half_tables(2, 10000.0, np.arange(50))
    out = fo.apply_rope(np.tile(np.array([1.0, 0.0], F32), (50, 1)), cos, sin)
    assert np.array_equal(out[:, 0], np.cos(np.arange(50.0)).astype(F32))
    assert np.array_equal(out[:, 1], np.sin(np.arange(50.0)).astype(F32))


def test_attention_scores_scalar_order():
    rng = np.random.default_rng(8)
    hd, s = 64, 45
    q8 = rng.integers(-127, 128, (2, hd)).astype(np.int8)
    k8 = rng.integers(-127, 128, (s, hd)).astype(np.int8)
    sq = rng.uniform(0.001, 0.1, 2).astype(F32)
    sk = rng.uniform(0.001, 0.1, s).astype(F32)
    c = F32(math.log2(math.e) / math.sqrt(hd))
    got = fo.attention_scores(q8, sq, k8, sk, hd)
    for h in range(2):
        for j in range(s):
            acc = sum(int(a) * int(b) for a, b in zip(q8[h], k8[j]))
            want = F32(F32(acc) * F32(F32(sq[h] * c) * sk[j]))
            assert _bits(got[h, j]) == _bits(want)


# ---- P.V in block fixed point: an independent exact-rational statement -------------------------
def _fraction(x):
    return Fraction(float(x))


def _f32_rne(q: Fraction) -> np.float32:
    """The fp32 nearest to the rational q, ties to even, subnormals kept (no overflow here)."""
    if q == 0:
        return F32(0.0)
    e = max(math.floor(math.log2(abs(q))), -126)
    while abs(q) >= Fraction(2) ** (e + 1):          # log2 of a rational may be off by one
        e += 1
    while e > -126 and abs(q) < Fraction(2) ** e:
        e -= 1
    quantum = Fraction(2) ** (e - 23)
    return F32(float(round(q / quantum) * quantum))  # round(Fraction) is half-even; the result is exact


def _biased_exponent(x) -> int:
    """The exponent field of a non-negative fp32 x from its value (0 for zero and subnormals)."""
    if x == 0:
        return 0
    ex = math.frexp(float(x))[1]                      # x = m 2^ex, m in [0.5, 1)
    return max(ex + 126, 0)


def _pv_rational(e, r, v8, sv):
    """out[d] for one row (every position visible), from the prose rule with Fractions and
    Python ints only."""
    w = [F32(F32(a) * F32(b)) for a, b in zip(e, sv)]
    exps, sig = [], []
    for x in w:
        m, ex = math.frexp(float(x))                  # x = m 2^ex, m in [0.5, 1)
        if x == 0:
            exps.append(1), sig.append(0)
            continue
        xe = max(ex - 24 + 150, 1)                    # x = M 2^(xe - 150), M an integer < 2^24
        big_m = Fraction(float(x)) / Fraction(2) ** (xe - 150)
        assert big_m.denominator == 1 and big_m < 2 ** 24
        exps.append(xe), sig.append(int(big_m))
    big_b = max([1] + [_biased_exponent(x) for x in sv])     # from the value scales, not the weights
    assert max(exps) <= big_b
    big_w = [round(Fraction(mm, 2 ** (big_b - xe))) for mm, xe in zip(sig, exps)]
    out = []
    for d in range(v8.shape[1]):
        acc = sum(ww * int(v8[j, d]) for j, ww in enumerate(big_w))
        y = _f32_rne(acc * Fraction(2) ** (big_b - 150))
        out.append(F32(y * F32(r)))
    return np.array(out, F32)


def _pv_cases():
    rng = np.random.default_rng(10)
    cases = []
    for s in (1, 2, 3, 33, 70):
        e = fo.exp2(-np.abs(rng.standard_normal(s) * 6).astype(F32))
        e[rng.integers(0, s)] = 1.0
        sv = rng.uniform(1e-4, 0.05, s).astype(F32)
        v8 = rng.integers(-127, 128, (s, 5)).astype(np.int8)
        cases.append((e, sv, v8))
    # subnormal and zero weights, s_v = 0 (an all-zero V row), masked positions (e = +0.0)
    e = np.array([1.0, 2.0 ** -120, 2.0 ** -100, 0.0, 0.75, 2.0 ** -126], F32)
    sv = np.array([2.0 ** -30, 2.0 ** -20, 2.0 ** -40, 0.3, 0.0, 1.0], F32)
    cases.append((e, sv, rng.integers(-127, 128, (6, 4)).astype(np.int8)))
    # every weight subnormal: B = 1, no shift, y may be subnormal
    e = np.array([2.0 ** -100, 2.0 ** -110, 1.0], F32)
    sv = np.array([2.0 ** -40, 2.0 ** -30, 2.0 ** -140], F32)
    cases.append((e, sv, np.array([[127, -1], [-127, 1], [3, 0]], np.int8)))
    # ties of the alignment shift: M = odd/even * 2 + 1 at shift 1, and M/2^k exactly half-way
    e = np.array([1.0, 0.5 + 2.0 ** -24, 0.5 + 3 * 2.0 ** -24, 0.25 + 2.0 ** -25, 2.0 ** -25, 2.0 ** -26],
                 F32)
    sv = np.ones(6, F32)
    cases.append((e, sv, np.array([[1, 2], [1, 3], [1, 5], [1, 7], [1, -1], [1, 1]], np.int8)))
    # large cancellation: acc = 0 gives +0.0
    cases.append((np.array([1.0, 1.0], F32), np.array([0.5, 0.5], F32), np.array([[7, 1], [-7, 1]], np.int8)))
    return cases


def test_attention_values_equal_exact_rationals():
    for e, sv, v8 in _pv_cases():
        for r in (F32(1.0), F32(0.3), fo.reciprocal(fo.fixed_sum(e[None])[0:1])[0]):
            got = fo.attention_values(e[None], np.array([r], F32), v8, sv, np.ones((1, len(e)), bool))[0]
            want = _pv_rational(e, r, v8, sv)
            assert np.array_equal(_bits(got), _bits(want)), (e, sv, v8, got, want)
    # the hand cases: the tie rows, and +0.0 from an exact cancellation
    e, sv, v8 = _pv_cases()[-2]
    w, b = fo.pv_weights(e, sv, np.ones(len(e), bool))
    assert b == 127 and list(w) == [2 ** 23, 2 ** 22, 2 ** 22 + 2, 2 ** 21, 0, 0]
    out = fo.attention_values(np.array([[1.0, 1.0]], F32), np.ones(1, F32), np.array([[7, 1], [-7, 1]], np.int8),
                              np.array([0.5, 0.5], F32), np.ones((1, 2), bool))
    assert _bits(out[0, 0]) == 0 and out[0, 1] == 1.0


def test_attention_values_ignore_masked_positions():
    """Invisible positions (e = +0.0) never change B, however large their value scales, so a
    longer cache gives the same bits."""
    rng = np.random.default_rng(11)
    e = fo.exp2(-np.abs(rng.standard_normal((4, 50)) * 5).astype(F32))
    sv = np.concatenate([rng.uniform(1e-3, 0.02, 50), rng.uniform(1, 100, 30)]).astype(F32)
    v8 = rng.integers(-127, 128, (80, 16)).astype(np.int8)
    r = rng.uniform(0.1, 1, 4).astype(F32)
    vis = np.arange(80) < 50
    short = fo.attention_values(e, r, v8[:50], sv[:50], np.ones((4, 50), bool))
    e_long = np.concatenate([e, np.zeros((4, 30), F32)], -1)
    long = fo.attention_values(e_long, r, v8, sv, np.broadcast_to(vis, (4, 80)))
    assert np.array_equal(_bits(short), _bits(long))
    # B comes from the value scales of the visible positions only
    assert list(fo.pv_block_exponent(sv, np.broadcast_to(vis, (4, 80)))) == [int(np.max(
        (sv[:50].view(np.uint32) >> 23) & 0xFF))] * 4
    assert fo.pv_block_exponent(np.zeros(3, F32), np.ones(3, bool)) == 1
    with pytest.raises(ValueError):
        fo.attention_values(-e, r, v8[:50], sv[:50], np.ones((4, 50), bool))
    with pytest.raises(ValueError):              # e <= 1 is what keeps every x_j <= B
        fo.attention_values(e * F32(2.5), r, v8[:50], sv[:50], np.ones((4, 50), bool))
    with pytest.raises(ValueError):              # an invisible position must have e = +0.0
        fo.attention_values(np.ones((4, 80), F32), r, v8, sv, np.broadcast_to(vis, (4, 80)))


# |out - float64 attention| measured against (a) sum_j p_j s_v[j] |v8[j, d]|, (b) the full
# scale max_j p_j s_v[j] * 127 and (c) the block's scale max_j s_v[j] * 127 * r (r = 1 /
# sum_j e_j >= max_j p_j), over the rows below (value scales spread over 0, 3 and 20 octaves).
# Block fixed point keeps every weight to 2^-24 of 2^B, B the largest value scale's exponent:
# (c) 4.99e-6 at any spread. Where the value scales spread over a few octaves (0 and 3) that
# is also (a) 3.82e-6 and (b) 4.99e-6, as with B from the largest weight (the fp32 P.V of
# the first contract: 5.9e-7 and 1.02e-5). Over 20 octaves a peaked row whose dominant
# position has a value scale 2^-20 of the largest keeps ~4 bits of its weight: (a) 1.08e-2,
# (b) 1.04e-2 (5 octaves: 4.9e-6 / 5.7e-6; 8: 9.1e-6 / 1.06e-5).
PV_REL_SUM, PV_REL_FULL_SCALE, PV_REL_BLOCK = 4.6e-6, 6.0e-6, 6.0e-6


def test_attention_values_against_float64():
    worst_sum = worst_full = worst_block = 0.0
    for octaves in (0, 3, 20):
        rng = np.random.default_rng(12)
        for s, spread in [(64, 4), (700, 1), (2048, 8), (2048, 0.1), (300, 30), (1000, 3)]:
            x = (rng.standard_normal((3, s)) * spread).astype(F32)
            e, r = fo.softmax2(x, np.ones(x.shape, bool))
            sv = np.exp2(rng.uniform(-octaves, 0, s) - 10).astype(F32)
            v8 = rng.integers(-127, 128, (s, 32)).astype(np.int8)
            out = fo.attention_values(e, r, v8, sv, np.ones(x.shape, bool)).astype(np.float64)
            p = np.exp2(x.astype(np.float64) - x.max(-1, keepdims=True))
            a = p / p.sum(-1, keepdims=True) * sv
            err = np.abs(out - a @ v8.astype(np.float64))
            worst_block = max(worst_block, float(np.max(err / (float(sv.max()) * 127 * r[:, None]))))
            if octaves <= 3:
                worst_sum = max(worst_sum, float(np.max(err / (a @ np.abs(v8.astype(np.float64))))))
                worst_full = max(worst_full, float(np.max(err / (a.max(-1, keepdims=True) * 127))))
    print(f"P.V error: {worst_block:.3e} of max s_v 127 r; value scales within 3 octaves: "
          f"{worst_sum:.3e} of sum p s_v |v|, {worst_full:.3e} of full scale")
    assert worst_block < PV_REL_BLOCK and worst_sum < PV_REL_SUM and worst_full < PV_REL_FULL_SCALE


def test_embedding_and_argmax():
    t = np.array([[0x3F80, 0xC000], [0x0001, 0x7F7F]], np.uint16)
    e = fo.embedding(t, np.array([0, 1, 0]))
    assert list(e[0]) == [1.0, -2.0] and list(e[2]) == [1.0, -2.0]
    assert e[1, 0] == np.float32(2.0 ** -133) and e[1, 1] == np.float32(3.3895313892515355e38)
    assert np.array_equal(fo.bf16_bits(e[:2]), t)
    with pytest.raises(ValueError):
        fo.bf16_bits(np.array([1.0 + 2 ** -20], F32))
    x = np.array([[1.0, 3.0, 3.0, 2.0], [np.nan, 1.0, np.nan, 1.0], [np.nan] * 4, [-0.0, 0.0, -1.0, -0.0],
                  [-np.inf] * 4], F32)
    assert list(fo.argmax_first(x)) == [1, 1, 0, 0, 0]


def test_ops_are_deterministic():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 256)).astype(F32)
    for fn in (lambda: fo.rms_norm(x, x[0], 1e-6), lambda: fo.silu_mul(x, x[::-1]),
               lambda: fo.softmax2(x, np.ones(x.shape, bool))[0], lambda: fo.exp(-np.abs(x))):
        assert np.array_equal(_bits(fn()), _bits(fn()))
