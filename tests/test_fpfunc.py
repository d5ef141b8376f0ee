"""The scalar function units (rtl/fpfunc.py) against sw/contract/fabric_ops.py, bit for bit.

Two tiers: a few hand-picked vectors per unit in Amaranth's simulator (easy to debug),
and a bank of every unit at two latencies (the default and 0) streamed with a few
hundred thousand vectors through Verilator (random bit patterns within each domain
plus targeted classes: domain edges, subnormals, seed and table interval ends, ties,
shift clamps, signed zeros, infinities, out-of-domain inputs). The exhaustive sweeps
(every significand of Reciprocal, every significand and parity of Rsqrt) are `slow`.
"""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.hdl import Fragment

from rtl.fpfunc import Exp, Exp2, Fp32Divide, Fp32ToInt, Reciprocal, Rsqrt, Sigmoid
from sim.unit_bank import BankOp, UnitBank, run_bank, run_pysim
from sw.contract import fabric_ops as fo
from sw.contract.errors import ConfigError

F32 = np.float32
U32 = np.uint32
NAN = 0x7FC00000
CLIP, INT_WIDTH = 127, 8


def as_f32(u):
    return np.asarray(u, dtype=np.uint64).astype(U32).view(F32)


def as_bits(f):
    return np.asarray(f, dtype=F32).view(U32)


def compose(sign, exp, frac):
    return ((np.asarray(sign, dtype=np.uint64) & 1) << 31 | (np.asarray(exp, dtype=np.uint64) & 0xFF) << 23
            | (np.asarray(frac, dtype=np.uint64) & 0x7FFFFF)).astype(U32)


# ---------------------------------------------------------------------------
# Golden results: the contract inside its domain, the documented value outside
# ---------------------------------------------------------------------------

def _masked(fn, x, ok, outside=NAN):
    x = np.asarray(x, dtype=np.uint64).astype(U32)
    out = np.full(x.shape, outside, dtype=U32)
    if ok.any():
        out[ok] = as_bits(fn(as_f32(x[ok])))
    return out


def golden(op: str, a, b=None):
    a = np.asarray(a, dtype=np.uint64).astype(U32)
    x = as_f32(a)
    with np.errstate(all="ignore"):
        if op == "exp2":
            return _masked(fo.exp2, a, x <= 0)
        if op == "exp":
            return _masked(fo.exp, a, x <= 0)
        if op == "recip":
            return _masked(fo.reciprocal, a, (x >= F32(2.0 ** -125)) & (x <= F32(2.0 ** 125)))
        if op == "rsqrt":
            return _masked(fo.rsqrt, a, x > 0)
        if op == "sigmoid":
            return _masked(fo.sigmoid, a, ~np.isnan(x))
        if op == "div":
            y = as_f32(np.asarray(b, dtype=np.uint64).astype(U32))
            ok = np.isfinite(x) & np.isfinite(y) & (np.abs(x) >= F32(2.0 ** -126)) & (np.abs(y) >= F32(2.0 ** -126))
            out = np.full(a.shape, NAN, dtype=U32)
            out[ok] = as_bits(np.divide(x[ok], y[ok]))
            return out
        if op == "toint":
            return golden_int(a)
    raise ValueError(op)


def golden_int(a, width=INT_WIDTH, clip=CLIP):
    """np.clip(np.rint(x), -clip, clip) (NaN: 0) as width-bit two's complement patterns."""
    x = as_f32(a)
    with np.errstate(all="ignore"):
        q = np.clip(np.rint(np.where(np.isnan(x), F32(0.0), x)), -clip, clip).astype(np.int64)
    return (q & ((1 << width) - 1)).astype(U32)


def _check(op, got, exp, *ins):
    got = np.asarray(got, dtype=np.uint64).astype(U32)
    ok = got == exp
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        args = ", ".join(f"{int(x[i]) & 0xFFFFFFFF:#010x}" for x in ins)
        raise AssertionError(f"{op}({args}) = {int(got[i]):#010x}, the contract says {int(exp[i]):#010x} "
                             f"({(~ok).sum()} of {len(ok)} wrong)")


# ---------------------------------------------------------------------------
# Vector classes
# ---------------------------------------------------------------------------

def _rand_bits(rng, n):
    return rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(U32)


def _frac(rng, n):
    return rng.integers(0, 1 << 23, n)


def _near(values, rng, n, spread=4):
    """n patterns a few ulps around each of `values` (bit patterns), as unsigned words."""
    v = np.asarray(values, dtype=np.int64)
    pick = v[rng.integers(0, len(v), n)] + rng.integers(-spread, spread + 1, n)
    return np.clip(pick, 0, (1 << 32) - 1).astype(U32)


def _subnormals(rng, n, sign):
    return compose(sign, 0, _frac(rng, n) >> rng.integers(0, 23, n))


SPECIAL = np.array([0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF,
                    0x00800000, 0x80800000, 0x3F800000, 0xBF800000, 0x7F7FFFFF, 0xFF7FFFFF,
                    0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001,
                    0x3F000000, 0xBF000000, 0x40000000, 0xC0000000], dtype=U32)


def _fill(parts, rng, n):
    v = np.concatenate([np.asarray(p, dtype=U32) for p in parts])
    if len(v) < n:
        v = np.concatenate([v, _rand_bits(rng, n - len(v))])
    return v[:n]


def _table_edges(scale_bits):
    """Every t = -(k + j/64) * 2^-scale_bits edge of the pow2 tables and integer parts, in bits."""
    k = np.arange(0, 127)
    j = np.arange(64)
    t = -(k[:, None] + j[None, :] / 64.0).ravel() * 2.0 ** -scale_bits
    return as_bits(t.astype(F32))


def _exp2_round_ties(rng, n):
    """t <= 0 whose Y (Q1.30) is at or next to a tie of the final rounding to 24 bits
    (Y & 127 in 63..65): the round-half-even step of the integer core."""
    t = np.concatenate([-rng.uniform(0, 126, 40 * n), -(2.0 ** rng.uniform(-30, 0, 40 * n))]).astype(F32)
    u = np.rint(t.astype(np.float64) * 2.0 ** fo.EXP2_FRAC_BITS).astype(np.int64)
    y, _ = fo.pow2_q30(u)
    return as_bits(rng.permutation(t[np.isin(y & 127, (63, 64, 65))])[:n])


def _recip_round_ties():
    """Every significand whose T (2^30 / den at 2^-46) is within 2 of a tie of the final rounding
    (T < 2^46 but at M = 2^23: the guard is bit 21), as d in [1, 2)."""
    m = np.arange(1 << 23, 1 << 24, dtype=np.int64)
    _, t = fo.recip_q46(m << 7, np.full(m.shape, 1 << 30, np.int64))
    near = np.abs((t & ((1 << 22) - 1)) - (1 << 21)) <= 2
    return compose(0, 127, m[near] - (1 << 23))


def exp2_vectors(rng, n):
    k = n // 9
    parts = [SPECIAL, _rand_bits(rng, k),
             # t in [-128, 0): every exponent
             compose(1, rng.integers(0, 134, k), _frac(rng, k)),
             # t in [-126, -1]: the live range, uniformly
             as_bits(-rng.uniform(0, 126, k).astype(F32)),
             # around -126 (the last live value and the first dead one), around integers and table edges
             _near([as_bits(F32(-126.0))], rng, k // 4, 64),
             _near(_table_edges(0), rng, k, 3),
             _near(_table_edges(6), rng, k // 4, 3),
             _exp2_round_ties(rng, k // 2),
             # tiny |t| (u rounds to 0, +-1 ulp of 2^-29: ties at 2^-30)
             compose(1, rng.integers(90, 100, k), _frac(rng, k)),
             compose(1, 97, rng.integers(0, 4, k) << 21),
             as_bits(-((2 * rng.integers(0, 1 << 23, k) + 1) * 2.0 ** -30).astype(F32)),   # u exactly halfway
             _subnormals(rng, k // 4, 1),
             # outside: t > 0 (NaN)
             compose(0, rng.integers(0, 256, k // 8), _frac(rng, k // 8))]
    return _fill(parts, rng, n)


def exp_vectors(rng, n):
    k = n // 8
    dead = as_bits(F32(-126.0 * np.log(2.0)))
    parts = [SPECIAL, _rand_bits(rng, k),
             compose(1, rng.integers(0, 134, k), _frac(rng, k)),
             as_bits(-rng.uniform(0, 88, k).astype(F32)),
             # the last live x around -126 ln 2 = -87.34, |x| >= 128 (dead without shifting), the shift clamps
             _near([dead], rng, k, 400),
             compose(1, rng.integers(132, 136, k), _frac(rng, k)),
             compose(1, rng.integers(85, 96, k), _frac(rng, k)),
             _near(as_bits((_table_edges(0).view(F32) * F32(np.log(2.0))).astype(F32)), rng, k, 3),
             _subnormals(rng, k // 4, 1),
             compose(0, rng.integers(0, 256, k // 8), _frac(rng, k // 8))]
    return _fill(parts, rng, n)


def _seed_edges(lo_exp, hi_exp):
    """Both ends of each of 32 intervals of the significand (its top 5 fraction bits), at exponents
    lo_exp..hi_exp (biased)."""
    e = np.arange(lo_exp, hi_exp + 1)
    idx = np.arange(32)
    f_lo = (idx << 18)
    f_hi = f_lo + (1 << 18) - 1
    f = np.concatenate([f_lo, f_hi])
    return compose(0, e[:, None], f[None, :]).ravel()


def _recip_seed_edges(rng, n):
    """Both ends of the 256 chord intervals (i = the top 8 fraction bits) and of the dx steps
    (the next 10 bits), at random exponents (the result only shifts with the exponent)."""
    i = rng.integers(0, 256, n)
    dx = rng.choice([0, 1, 1022, 1023], n)
    frac = (i << 15) | (dx << 5) | rng.choice([0, 31], n)
    return compose(0, rng.integers(2, 253, n), frac)


def recip_vectors(rng, n):
    k = n // 6
    ties = _recip_round_ties()
    parts = [SPECIAL, _rand_bits(rng, k),
             compose(0, rng.integers(2, 253, k), _frac(rng, k)),
             # d in [1, 2^24] (the contract's own use) and the domain edges
             as_bits(rng.uniform(1, 2 ** 24, k).astype(F32)),
             _near([_bits(2.0 ** -125), _bits(2.0 ** 125), _bits(1.0), _bits(2.0)], rng, k // 4, 8),
             # powers of two (exact), the seed and chord interval ends, rounding ties at any exponent
             compose(0, np.arange(2, 253), 0),
             _near(_seed_edges(100, 160), rng, k // 4, 2),
             _recip_seed_edges(rng, k),
             compose(0, rng.integers(2, 253, len(ties)), ties)]
    return _fill(parts, rng, n)


def _rsqrt_seed_edges(rng, n):
    """Both ends of the 64 chord intervals per parity (i = the top 6 fraction bits) and of the dx
    steps (the next 12 bits), at random exponents (normal and subnormal)."""
    i = rng.integers(0, 64, n)
    dx = rng.choice([0, 1, 4094, 4095], n)
    frac = (i << 17) | (dx << 5) | rng.choice([0, 1, 30, 31], n)
    v = compose(0, rng.integers(1, 255, n), frac)
    sub = rng.random(n) < 0.1                           # a subnormal with the same significand
    shift = rng.integers(1, 23, n)
    v[sub] = (((frac[sub] | (1 << 23)) >> shift[sub])).astype(U32)
    return v


def _rsqrt_special_significands():
    """Every significand (both parities) whose Y is within 2 of a tie of the final rounding
    (Y's leading one at bit 39: the guard is bit 15), or at the extremes of y0, e and Y."""
    m = np.arange(1 << 23, 1 << 24, dtype=np.int64)
    out = []
    for p in (0, 1):
        y0, e, y = fo.rsqrt_q40(m, np.full(m.shape, p))
        near = np.abs((y & 0xFFFF) - 0x8000) <= 2
        ext = [int(np.argmin(x)) for x in (y0, e, y)] + [int(np.argmax(x)) for x in (y0, e, y)]
        out.append((p, m[near | np.isin(np.arange(len(m)), ext)] - (1 << 23)))
    return out


_RSQRT_SPECIAL = None


def rsqrt_vectors(rng, n):
    global _RSQRT_SPECIAL
    if _RSQRT_SPECIAL is None:
        _RSQRT_SPECIAL = _rsqrt_special_significands()
    k = n // 7
    # the special significands at random exponents of their parity (biased exponent odd: p = 0)
    ties = [compose(0, 2 * rng.integers(1, 127, len(f)) + 1 - p, f) for p, f in _RSQRT_SPECIAL]
    parts = [SPECIAL, _rand_bits(rng, k),
             compose(0, rng.integers(0, 256, k), _frac(rng, k)),
             _subnormals(rng, k, 0),
             _rsqrt_seed_edges(rng, k),
             rng.permutation(np.concatenate(ties))[:k],
             # powers of four (exact) and their neighbours
             _near(compose(0, np.arange(1, 255, 2), 0), rng, k // 4, 2),
             # rms_norm's v = ms + eps: around 1e-6 .. 1e4
             as_bits((10.0 ** rng.uniform(-7, 5, k)).astype(F32))]
    return _fill(parts, rng, n)


def sigmoid_vectors(rng, n):
    k = n // 8
    sgn = rng.integers(0, 2, k)
    # j (6-bit) table interval ends: |g| = m ln2 / 64 puts U at a multiple of 2^23 (m = 64 k: at
    # e = 2^-k, the ends of n); den table ends: e = i / 256 at |g| = ln(256 / i)
    j_edges = as_bits((np.arange(0, 126 * 64 + 1) * np.log(2.0) / 64).astype(F32))
    d_edges = as_bits(np.log(256.0 / np.arange(1, 256)).astype(F32))
    parts = [SPECIAL, _rand_bits(rng, k),
             compose(sgn, rng.integers(0, 136, k), _frac(rng, k)),
             as_bits(rng.uniform(-20, 20, k).astype(F32)),
             as_bits(rng.normal(0, 3, k).astype(F32)),
             _near(np.concatenate([j_edges, j_edges | 0x80000000]), rng, k, 3),
             _near(np.concatenate([d_edges, d_edges | 0x80000000]), rng, k // 2, 3),
             # the dead threshold (U = 126 * 2^29 at |g| = 87.33654), tiny and subnormal g
             _near([as_bits(F32(-87.33654))[()], as_bits(F32(87.33654))[()]], rng, k // 4, 400),
             compose(sgn[:k // 4], rng.integers(0, 104, k // 4), _frac(rng, k // 4)),
             _subnormals(rng, k // 4, rng.integers(0, 2, k // 4))]
    return _fill(parts, rng, n)


def div_vectors(rng, n):
    k = n // 6
    s = rng.integers(0, 2, (2, 4 * k))
    amax = np.concatenate([compose(0, rng.integers(7, 255, k), _frac(rng, k)),
                           _near([_bits(2.0 ** -120), _bits(127 * 2.0 ** -126)], rng, k // 4, 300)])
    c127 = np.full(len(amax), _bits(127.0), dtype=U32)
    a = [c127, amax,                                                   # quantize_activations' two divides
         compose(s[0, :k], rng.integers(1, 255, k), _frac(rng, k)),    # any normal / any normal
         compose(s[0, k:2 * k], rng.integers(1, 255, k), _frac(rng, k)),
         # exact quotients and ties: a = b * q with short significands
         compose(s[0, 2 * k:3 * k], rng.integers(60, 190, k), (rng.integers(0, 1 << 12, k) << 11))]
    b = [amax, c127,
         compose(s[1, :k], rng.integers(1, 255, k), _frac(rng, k)),
         # quotient near the subnormal range, and near overflow
         compose(s[1, k:2 * k], np.clip(rng.integers(1, 255, k) + rng.choice([-1, 1], k) * rng.integers(118, 131, k), 1, 254),
                 _frac(rng, k)),
         compose(s[1, 2 * k:3 * k], rng.integers(60, 190, k), (rng.integers(0, 1 << 12, k) << 11))]
    sa, sb = np.meshgrid(SPECIAL, SPECIAL)
    a.append(sa.ravel())
    b.append(sb.ravel())
    a.append(_rand_bits(rng, k))
    b.append(_rand_bits(rng, k))
    a, b = np.concatenate(a).astype(U32)[:n], np.concatenate(b).astype(U32)[:n]
    return a, b


def toint_vectors(rng, n):
    k = n // 4
    halves = (rng.integers(-300, 300, k) + 0.5).astype(F32)      # ties
    parts = [SPECIAL, _rand_bits(rng, k), as_bits(rng.uniform(-140, 140, k).astype(F32)), as_bits(halves),
             _near(as_bits(np.array([126.5, 127.5, 127, 128, 0.5, 1.5, -126.5, -127.5], F32)), rng, k // 4, 3)]
    return _fill(parts, rng, n)


def _bits(v):
    return int(np.asarray(v, F32).view(U32))


# ---------------------------------------------------------------------------
# Amaranth simulator: a few vectors, easy to debug
# ---------------------------------------------------------------------------

HAND = {
    "exp2": [0x00000000, 0x80000000, 0xBF800000, 0xBF000000, 0xC2FC0000, 0xC2FC0001, 0xC2FBFFFF,
             0xFF800000, 0x3F800000, 0x7FC00000, 0xBD000000, 0x80000001, 0xB0800000, 0xB0000000,
             0xC1200000, 0xBF7FFFFF, 0xBE99999A, 0xC0490FDB, 0xC2A8CCCD, 0xBC23D70A],
    "exp": [0x00000000, 0x80000000, 0xBF800000, 0xC2AEAC50, 0xC2AEAC4F, 0xC2AEAC51, 0xFF800000,
            0x3F800000, 0xC3000000, 0xC2FFFFFF, 0x80000001, 0xA0000000, 0xB3000000, 0xC1200000, 0xBE99999A,
            0xC0490FDB, 0xC2A8CCCD, 0xBC23D70A, 0xB2800000, 0xB2000001],
    "recip": [0x3F800000, 0x40000000, 0x3FFFFFFF, 0x3FC00000, 0x01000000, 0x7E000000, 0x00FFFFFF,
              0x7E000001, 0x4B800000, 0x40400000, 0x00000000, 0xBF800000, 0x7FC00000, 0x3F840000],
    "rsqrt": [0x3F800000, 0x40000000, 0x40800000, 0x7F800000, 0x00000001, 0x00400000, 0x007FFFFF,
              0x00800000, 0x7F7FFFFF, 0x00000000, 0x80000000, 0xBF800000, 0x7FC00000, 0x358637BD,
              0x3F800001, 0x3FFFFFFF, 0x407FFFFF, 0x3F820000, 0x4081FFFF, 0x3FC0D0F8, 0x00000002, 0x7F800001],
    "sigmoid": [0x00000000, 0x80000000, 0x3F800000, 0xBF800000, 0x7F800000, 0xFF800000, 0x7FC00000,
                0x42AEAC50, 0xC2AEAC50, 0x41A00000, 0xC1A00000, 0x00000001, 0x80000001, 0x40490FDB,
                0x3F317218, 0xBF317218, 0x3C317218, 0xBC317218, 0x41AC5C5A, 0xC1AC5C5A],
    "toint": [0x00000000, 0x80000000, 0x3F000000, 0xBF000000, 0x3FC00000, 0x42FD0000, 0x42FF0000,
              0xC2FF0000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x3F000001, 0x42FE0000, 0x00000001],
}
HAND_DIV = [(0x42FE0000, 0x0B800000), (0x0B800000, 0x42FE0000), (0x3F800000, 0x40400000),
            (0x7F7FFFFF, 0x3F000000), (0x00800000, 0x40000000), (0x00800000, 0x4B000000),
            (0xC0000000, 0x3F800000), (0x3F800000, 0x00000000), (0x40400000, 0x40400000),
            (0x3FFFFFFF, 0x3F800001), (0x00FFFFFF, 0x4B800000), (0x7F800000, 0x3F800000)]

UNITS = {"exp2": Exp2, "exp": Exp, "recip": Reciprocal, "rsqrt": Rsqrt, "sigmoid": Sigmoid}


@pytest.mark.parametrize("op", list(UNITS))
@pytest.mark.parametrize("which", ["zero", "default", "max"])
def test_function_units_pysim(op, which):
    cls = UNITS[op]
    latency = {"zero": 0, "default": None, "max": cls.max_latency()}[which]
    a = np.array(HAND[op], dtype=U32)
    _check(op, run_pysim(cls(latency=latency), {"a": a.tolist()}), golden(op, a), a)


@pytest.mark.parametrize("latency", [0, None, Rsqrt.max_latency()])
def test_rsqrt_random_pysim(latency):
    """Rsqrt in Amaranth's simulator on a few thousand vectors of the bank's classes (random
    bit patterns, subnormals, chord interval and dx ends, rounding ties, the extremes of y0, e
    and Y, powers of four and their neighbours)."""
    a = rsqrt_vectors(np.random.default_rng(20261204), 4000)
    _check("rsqrt", run_pysim(Rsqrt(latency=latency), {"a": a.tolist()}), golden("rsqrt", a), a)


@pytest.mark.parametrize("latency", [0, None, 7])
def test_divide_pysim(latency):
    a = np.array([p[0] for p in HAND_DIV], dtype=U32)
    b = np.array([p[1] for p in HAND_DIV], dtype=U32)
    _check("div", run_pysim(Fp32Divide(latency=latency), {"a": a.tolist(), "b": b.tolist()}),
           golden("div", a, b), a, b)


def test_serial_divide_pysim():
    """Fp32DivideSerial gives Fp32Divide's bits (NumPy's float32 division, the contract's NaN) on
    the hand cases and the divide vectors (quantize_activations' two divides, ties, exact and
    subnormal quotients, overflow, specials); each result comes exactly `latency` (16) cycles after
    its operands were taken, `ready` is low from then until that cycle, and issues that wait 0..3
    cycles after `ready` lose nothing."""
    from amaranth.sim import Simulator

    from rtl.fpfunc import Fp32DivideSerial

    rng = np.random.default_rng(20261204)
    va, vb = div_vectors(rng, 900)
    a = np.concatenate([np.array([p[0] for p in HAND_DIV], dtype=U32), va])
    b = np.concatenate([np.array([p[1] for p in HAND_DIV], dtype=U32), vb])
    gaps = rng.integers(0, 4, len(a))
    unit = Fp32DivideSerial()
    lat = unit.latency
    assert lat == 16
    taken, results, readies = [], [], []

    async def bench(ctx):
        i, wait, cycle = 0, int(gaps[0]), 0
        while len(results) < len(a):
            ready = ctx.get(unit.ready)
            issue = i < len(a) and ready and wait == 0
            ctx.set(unit.i_valid, int(issue))
            if i < len(a):
                ctx.set(unit.a, int(a[i]))
                ctx.set(unit.b, int(b[i]))
            if ctx.get(unit.o_valid):
                results.append((cycle, ctx.get(unit.o)))
            readies.append(ready)
            if issue:
                taken.append(cycle)
                i += 1
                wait = int(gaps[i]) if i < len(a) else 0
            elif ready and wait:
                wait -= 1
            await ctx.tick()
            cycle += 1

    sim = Simulator(unit)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    _check("div", [o for _, o in results], golden("div", a, b), a, b)
    assert [c for c, _ in results] == [c + lat for c in taken]
    for c in taken:                      # busy from the cycle after the issue to its result's cycle
        assert not any(readies[c + 1:c + lat]) and readies[c + lat]


@pytest.mark.parametrize("latency", [0, None])
@pytest.mark.parametrize("width,clip", [(INT_WIDTH, CLIP), (16, 1000), (32, (1 << 24) - 1), (2, 1)])
def test_to_int_pysim(latency, width, clip):
    a = np.concatenate([HAND["toint"], as_bits(np.array([999.5, 1000.5, -1000.5, 1e6, 16777215.0, -16777215.0,
                                                         16777216.0, 0.5, 1.5, -1.5, 2.5], F32))]).astype(U32)
    _check("toint", run_pysim(Fp32ToInt(width, clip, latency=latency), {"a": a.tolist()}),
           golden_int(a, width, clip), a)


def _latency(unit):
    Fragment.get(unit, None)
    return unit.latency


def test_parameters_are_validated():
    with pytest.raises(ConfigError, match="latency"):
        Exp2(latency=Exp2.max_latency() + 1)
    with pytest.raises(ConfigError, match="latency"):
        Sigmoid(latency=-1)
    with pytest.raises(ConfigError, match="clip"):
        Fp32ToInt(8, 128)
    with pytest.raises(ConfigError, match="width"):
        Fp32ToInt(1, 0)
    with pytest.raises(ConfigError, match="latency"):
        Fp32Divide(latency=30)
    assert [_latency(Rsqrt(latency=n)) for n in (0, 1, 5, 20)] == [0, 1, 5, 20]
    assert _latency(Exp2()) == Exp2.default_latency() == 14 and _latency(Reciprocal()) == Reciprocal.default_latency() == 12
    assert _latency(Exp()) == Exp.default_latency() == 18 and _latency(Sigmoid()) == Sigmoid.default_latency() == 29
    assert _latency(Fp32ToInt(8, 127)) == 2 and _latency(Fp32Divide()) == 29
    assert _latency(Rsqrt()) == Rsqrt.default_latency() == 16 and Rsqrt.max_latency() == 20
    with pytest.raises(ConfigError, match="latency"):
        Rsqrt(latency=21)


# ---------------------------------------------------------------------------
# Verilator: a few hundred thousand vectors per unit
# ---------------------------------------------------------------------------

BANK_OPS = {
    "exp2": BankOp(lambda lat: Exp2(latency=lat), Exp2.max_latency(), ("a",), latencies=(None, 0)),
    "exp": BankOp(lambda lat: Exp(latency=lat), Exp.max_latency(), ("a",), latencies=(None, 0)),
    "recip": BankOp(lambda lat: Reciprocal(latency=lat), Reciprocal.max_latency(), ("a",), latencies=(None, 0)),
    "rsqrt": BankOp(lambda lat: Rsqrt(latency=lat), Rsqrt.max_latency(), ("a",), latencies=(None, 0)),
    "sigmoid": BankOp(lambda lat: Sigmoid(latency=lat), Sigmoid.max_latency(), ("a",), latencies=(None, 0)),
    "div": BankOp(lambda lat: Fp32Divide(latency=lat), Fp32Divide.max_latency(), ("a", "b"), latencies=(None, 0)),
    "toint": BankOp(lambda lat: Fp32ToInt(INT_WIDTH, CLIP, latency=lat), Fp32ToInt.max_latency(), ("a",),
                    out_width=INT_WIDTH, latencies=(None, 0)),
}
BANK_LANES = 2
VECTORS = 200_000
MAKERS = {"exp2": exp2_vectors, "exp": exp_vectors, "recip": recip_vectors, "rsqrt": rsqrt_vectors,
          "sigmoid": sigmoid_vectors, "toint": toint_vectors}


def _bank_vectors(seed: int, n: int):
    rng = np.random.default_rng(seed)
    vectors = {op: {"a": make(rng, n)} for op, make in MAKERS.items()}
    a, b = div_vectors(rng, n)
    vectors["div"] = {"a": a, "b": b}
    return {op: vectors[op] for op in BANK_OPS}


def _run(tmp_path, vectors, seed):
    res = run_bank(UnitBank(BANK_OPS, BANK_LANES), vectors, tmp_path, "fpfunc_bank", seed)
    for op, ops in vectors.items():
        ins = [np.asarray(v) for v in ops.values()]
        _check(op, res[op], golden(op, *ins), *ins)


@pytest.mark.sim
@pytest.mark.slow
def test_fpfunc_units_verilator(tmp_path):
    """The bank's random vectors (slow: a long Verilator build). The default run checks these
    units in Verilator inside the vector and attention units, and here in Amaranth's simulator."""
    seed = 20261202
    _run(tmp_path, _bank_vectors(seed, VECTORS), seed)


@pytest.mark.sim
@pytest.mark.slow
def test_fpfunc_mantissa_sweep_verilator(tmp_path):
    """Every significand: Reciprocal on [1, 2) (the result only shifts with the exponent) and
    Rsqrt on [1, 4) (both exponent parities), with the bank's other ops on random vectors.
    About 8.4 M cycles: hours under cocotb."""
    seed = 20261203
    mant = np.arange(1 << 23, dtype=np.uint64)
    vectors = _bank_vectors(seed, 1 << 16)
    vectors["recip"] = {"a": compose(0, 127, mant)}
    vectors["rsqrt"] = {"a": np.concatenate([compose(0, 127, mant), compose(0, 128, mant)])}
    _run(tmp_path, vectors, seed)
