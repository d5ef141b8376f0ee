"""The fp32 units against NumPy float32, bit for bit.

Two tiers: a few hand-picked vectors per unit in Amaranth's simulator (easy to
debug), and a few hundred thousand vectors per op streamed one row per cycle
through a Verilator build of `Fp32Bank` (random bit patterns plus targeted
classes: cancellation, subnormals in and out, overflow and underflow
boundaries, ties, signed zeros, infinities and NaNs).
"""

from __future__ import annotations

import numpy as np
import pytest

from amaranth.hdl import Fragment

from rtl.fp32 import Fp16ToFp32, Fp32Add, Fp32Multiply, IntToFp32
from sim.unit_bank import BankOp, UnitBank, run_bank, run_pysim
from sw.contract.errors import ConfigError

F32 = np.float32
U32 = np.uint32


def as_f32(u):
    return np.asarray(u, dtype=U32).view(F32)


def as_bits(f):
    return np.asarray(f, dtype=F32).view(U32)


def same_bits(got, exp):
    """Bitwise equality, except that any NaN matches any NaN (payloads are CPU specific)."""
    got = np.asarray(got, dtype=U32)
    exp = np.asarray(exp, dtype=U32)
    return (got == exp) | (np.isnan(as_f32(got)) & np.isnan(as_f32(exp)))


def compose(sign, exp, frac):
    return ((np.asarray(sign, dtype=np.uint64) & 1) << 31 | (np.asarray(exp, dtype=np.uint64) & 0xFF) << 23
            | (np.asarray(frac, dtype=np.uint64) & 0x7FFFFF)).astype(U32)


# ---------------------------------------------------------------------------
# Golden results
# ---------------------------------------------------------------------------

def golden(op: str, a, b=None):
    with np.errstate(all="ignore"):
        if op == "mul":
            return as_bits(np.multiply(as_f32(a), as_f32(b)))
        if op == "add":
            return as_bits(np.add(as_f32(a), as_f32(b)))
        if op == "h2f":
            return as_bits(np.asarray(a, dtype=np.uint16).view(np.float16).astype(F32))
        if op in ("i2f", "i2n"):
            return as_bits(np.asarray(a, dtype=np.int64).astype(F32))
    raise ValueError(op)


# ---------------------------------------------------------------------------
# Vector classes
# ---------------------------------------------------------------------------

SPECIALS = np.array([0x00000000, 0x80000000, 0x3F800000, 0xBF800000, 0x00000001, 0x80000001,
                     0x007FFFFF, 0x807FFFFF, 0x00800000, 0x80800000, 0x7F7FFFFF, 0xFF7FFFFF,
                     0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00400000,
                     0x34000000, 0x4B800000, 0x3F000000, 0x5F000000, 0x1F000000, 0x00000003],
                    dtype=U32)


def _rand_bits(rng, n):
    return rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(U32)


def _rand_frac(rng, n):
    return rng.integers(0, 1 << 23, n)


def _pairs_of_specials():
    a, b = np.meshgrid(SPECIALS, SPECIALS)
    return a.ravel(), b.ravel()


def mul_vectors(rng, n):
    k = n // 8
    sa = rng.integers(0, 2, (7, k))
    sb = rng.integers(0, 2, (7, k))
    parts = [(_rand_bits(rng, k), _rand_bits(rng, k))]
    # normal operands of any exponent
    parts.append((compose(sa[0], rng.integers(1, 255, k), _rand_frac(rng, k)),
                  compose(sb[0], rng.integers(1, 255, k), _rand_frac(rng, k))))
    # product exponent around the underflow boundary (subnormal and zero results)
    ea = rng.integers(1, 127, k)
    eb = np.clip(rng.integers(-30, 5, k) + 127 - ea + 1, 1, 254)
    parts.append((compose(sa[1], ea, _rand_frac(rng, k)), compose(sb[1], eb, _rand_frac(rng, k))))
    # product exponent around the overflow boundary
    ea = rng.integers(127, 255, k)
    eb = np.clip(rng.integers(-3, 3, k) + 254 - ea + 127, 1, 254)
    parts.append((compose(sa[2], ea, _rand_frac(rng, k)), compose(sb[2], eb, _rand_frac(rng, k))))
    # subnormal operands times anything finite (results normal, subnormal or zero)
    sub = compose(sa[3], 0, _rand_frac(rng, k) >> rng.integers(0, 23, k))
    other = compose(sb[3], rng.integers(0, 255, k), _rand_frac(rng, k))
    swap = rng.integers(0, 2, k).astype(bool)
    parts.append((np.where(swap, other, sub), np.where(swap, sub, other)))
    # ties: odd 13-bit significands give 25-26-bit exact products, often exactly halfway
    ma = (rng.integers(1 << 12, 1 << 13, k) | 1) << 11
    mb = (rng.integers(1 << 12, 1 << 13, k) | 1) << 11
    ea = rng.integers(1, 255, k)
    eb = np.clip(rng.integers(1, 255, k) - ea + 127, 1, 254)
    parts.append((compose(sa[4], ea, ma), compose(sb[4], eb, mb)))
    # ties in the subnormal result range
    ea = rng.integers(1, 127, k)
    eb = np.clip(rng.integers(-24, 2, k) - ea + 127, 1, 254)
    parts.append((compose(sa[5], ea, ma), compose(sb[5], eb, mb)))
    parts.append(_pairs_of_specials())
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    fill = n - len(a)
    if fill > 0:
        a = np.concatenate([a, _rand_bits(rng, fill)])
        b = np.concatenate([b, _rand_bits(rng, fill)])
    return a[:n], b[:n]


def _subnormal(x):
    x = np.asarray(x, dtype=U32)
    return ((x >> 23) & 0xFF == 0) & (x & 0x7FFFFF != 0)


def mul_normal_a_vectors(rng, n):
    """mul_vectors with `a` never subnormal (Fp32Multiply(normal_a=True)): a subnormal `a` trades
    places with `b`; if both are, `a` gets exponent 1."""
    a, b = mul_vectors(rng, n)
    swap = _subnormal(a) & ~_subnormal(b)
    a, b = np.where(swap, b, a).astype(U32), np.where(swap, a, b).astype(U32)
    a = np.where(_subnormal(a), a | np.uint32(0x00800000), a).astype(U32)
    return a, b


def mul_half_a_vectors(rng, n):
    """`a` an fp16 value as fp32 (Fp32Multiply(normal_a=True, a_bits=11), the dequant's weight
    scale): every fp16 bit pattern, times b of any class, and b chosen so that the product lands
    around the underflow and overflow boundaries or is a tie."""
    k = n // 4
    h = np.concatenate([half_vectors(), rng.integers(0, 1 << 16, 4 * k - (1 << 16))]).astype(np.uint64)
    a = golden("h2f", h)
    a = a[rng.permutation(len(a))]
    ea = ((a >> 23) & 0xFF).astype(np.int64)[:3 * k]
    s = rng.integers(0, 2, (3, k))
    _, b0 = mul_vectors(rng, k)
    parts_b = [b0]
    # underflow boundary: product exponent from -30 to +4 below the smallest normal
    parts_b.append(compose(s[0], np.clip(rng.integers(-30, 5, k) + 127 - ea[:k] + 1, 0, 254), _rand_frac(rng, k)))
    # overflow boundary
    parts_b.append(compose(s[1], np.clip(rng.integers(-3, 3, k) + 254 - ea[k:2 * k] + 127, 1, 254),
                           _rand_frac(rng, k)))
    # subnormal b
    parts_b.append(compose(s[2], 0, _rand_frac(rng, k) >> rng.integers(0, 23, k)))
    b = np.concatenate(parts_b).astype(U32)
    m = min(len(a), len(b), n)
    return a[:m], b[:m]


def mul_corr_a_vectors(rng, n):
    """`a` an integer below 2^17 in magnitude as fp32 (Fp32Multiply(normal_a=True, a_bits=17), the
    dequant's t = fp32(corr) * s at group 64): odd values near the bound (all 17 bits in use),
    powers of two, zero, small and random integers; b of any class and at the fp32 boundaries."""
    k = n // 3
    near = (1 << 17) - 1 - 2 * rng.integers(0, 1 << 12, k)                  # odd, 17 significant bits
    ints = np.concatenate([near, rng.integers(-(1 << 17) + 1, 1 << 17, k),
                           1 << rng.integers(0, 17, k // 2), rng.integers(-64, 65, k // 2)])
    ints = np.where(rng.random(len(ints)) < 0.5, -ints, ints)
    a = np.asarray(ints, dtype=np.float32).view(U32)[rng.permutation(len(ints))]
    ea = ((a >> 23) & 0xFF).astype(np.int64)[:2 * k]
    s = rng.integers(0, 2, (2, k))
    _, b0 = mul_vectors(rng, len(a) - 2 * k)
    b = np.concatenate([
        b0,
        compose(s[0], np.clip(rng.integers(-30, 5, k) + 127 - ea[:k] + 1, 0, 254), _rand_frac(rng, k)),
        compose(s[1], np.clip(rng.integers(-3, 3, k) + 254 - ea[k:2 * k] + 127, 1, 254), _rand_frac(rng, k)),
    ]).astype(U32)
    b = np.concatenate([b[len(b0):], b[:len(b0)]])                           # boundaries meet the first a's
    return a[:n], b[:n]


def add_vectors(rng, n):
    k = n // 8
    s = rng.integers(0, 2, (8, k))
    parts = [(_rand_bits(rng, k), _rand_bits(rng, k))]
    # cancellation: b is -(a moved by a few ulps), across the whole range
    a = compose(s[0], rng.integers(0, 255, k), _rand_frac(rng, k))
    b = (a.astype(np.int64) + rng.integers(-8, 9, k)).astype(U32) ^ np.uint32(0x80000000)
    b = np.where(as_f32(b) == as_f32(b), b, a ^ np.uint32(0x80000000)).astype(U32)
    parts.append((a, b))
    # exponent differences 0..30, random signs
    ea = rng.integers(1, 255, k)
    eb = np.clip(ea - rng.integers(0, 31, k), 0, 254)
    swap = rng.integers(0, 2, k).astype(bool)
    x, y = compose(s[1], ea, _rand_frac(rng, k)), compose(s[2], eb, _rand_frac(rng, k))
    parts.append((np.where(swap, y, x), np.where(swap, x, y)))
    # subnormal and tiny normal operands (subnormal results, subnormal -> normal carries)
    ea = rng.integers(0, 3, k)
    eb = rng.integers(0, 3, k)
    parts.append((compose(s[3], ea, _rand_frac(rng, k)), compose(s[4], eb, _rand_frac(rng, k))))
    # near overflow, same and opposite signs
    parts.append((compose(s[5], rng.integers(250, 255, k), _rand_frac(rng, k) | 0x700000),
                  compose(s[6], rng.integers(248, 255, k), _rand_frac(rng, k))))
    # ties: the bits of b shifted out are exactly half an ulp (or zero)
    d = rng.integers(1, 26, k)
    ea = rng.integers(d + 1, 255)
    mb = (rng.integers(0, 1 << 24, k) | (1 << 23)) >> d << d
    mb = mb | ((rng.integers(0, 2, k) << (d - 1)) & 0xFFFFFF)
    eb = ea - d
    fb = np.where(eb > 0, mb & 0x7FFFFF, mb >> 1)
    parts.append((compose(s[7], ea, _rand_frac(rng, k)), compose(s[0] ^ rng.integers(0, 2, k), eb, fb)))
    # x + (-x) (must be +0), and signed zeros with anything
    x = _rand_bits(rng, k)
    zeros = np.where(rng.integers(0, 2, k).astype(bool), 0, 0x80000000).astype(U32)
    half = k // 2
    parts.append((np.concatenate([x[:half], zeros[half:]]),
                  np.concatenate([x[:half] ^ np.uint32(0x80000000), x[half:]])))
    parts.append(_pairs_of_specials())
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    fill = n - len(a)
    if fill > 0:
        a = np.concatenate([a, _rand_bits(rng, fill)])
        b = np.concatenate([b, _rand_bits(rng, fill)])
    return a[:n], b[:n]


def int_vectors(rng, n, width):
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    k = n // 4
    full = rng.integers(lo, hi + 1, k)
    scaled = rng.integers(lo, hi + 1, k) >> rng.integers(0, width, k)
    edges = np.array([lo, lo + 1, hi, hi - 1, 0, 1, -1, 2, -2] +
                     [sgn * ((1 << e) + o) for e in range(20, width - 1) for o in (-1, 0, 1)
                      for sgn in (1, -1)], dtype=np.int64)
    edges = edges[(edges >= lo) & (edges <= hi)]
    parts = [full, scaled, edges]
    if width > 25:
        # ties: odd 25-bit numbers (exactly halfway between two fp32) shifted up
        t = (rng.integers(1 << 24, 1 << 25, k) | 1) << rng.integers(0, width - 26, k)
        t = np.where(rng.integers(0, 2, k).astype(bool), t, -t)
        parts.append(t)
    v = np.concatenate(parts)
    fill = n - len(v)
    if fill > 0:
        v = np.concatenate([v, rng.integers(lo, hi + 1, fill)])
    return v[:n].astype(np.int64)


def half_vectors():
    return np.arange(1 << 16, dtype=np.uint64)


# ---------------------------------------------------------------------------
# Amaranth simulator: a few vectors, easy to debug
# ---------------------------------------------------------------------------

def _run_pysim(unit, inputs: dict[str, list[int]]):
    return run_pysim(unit, inputs).astype(U32)


def _check(op, got, exp, *ins):
    ok = same_bits(got, exp)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        args = ", ".join(f"{int(x[i]) & 0xFFFFFFFF:#010x}" for x in ins)
        raise AssertionError(f"{op}({args}) = {int(got[i]):#010x}, NumPy says {int(exp[i]):#010x} "
                             f"({(~ok).sum()} of {len(ok)} wrong)")


HAND_PAIRS = [
    (0x3F800000, 0x3F800000), (0x3F800001, 0x3F7FFFFF), (0x00000001, 0x3F000000),
    (0x00000003, 0x3F000000), (0x007FFFFF, 0x00000001), (0x7F7FFFFF, 0x40000000),
    (0x80000000, 0x00000000), (0x80000000, 0x80000000), (0x3F800000, 0xBF800000),
    (0x7F800000, 0x00000000), (0x7F800000, 0xFF800000), (0x7FC00000, 0x3F800000),
    (0x4B800001, 0x3F800000), (0x00800000, 0x80000001), (0x1F800000, 0x1F800000),
    (0x40490FDB, 0xC02DF854),
    # a subnormal times a normal with a normal product, and two subnormals (a zero product)
    (0x00000001, 0x4B000000), (0x00123457, 0x4C812345), (0x00400000, 0x40000000), (0x007FFFFF, 0x00000003),
    (0x80654321, 0x00765432),
]


@pytest.mark.parametrize("cls", [Fp32Multiply, Fp32Add])
@pytest.mark.parametrize("which", ["zero", "default", "max"])
def test_binary_units_pysim(cls, which):
    latency = {"zero": 0, "default": None, "max": cls.max_latency()}[which]
    unit = cls(latency=latency)
    a = np.array([p[0] for p in HAND_PAIRS] + [p[1] for p in HAND_PAIRS], dtype=U32)
    b = np.array([p[1] for p in HAND_PAIRS] + [p[0] for p in HAND_PAIRS], dtype=U32)
    got = _run_pysim(unit, {"a": a.tolist(), "b": b.tolist()})
    op = "mul" if cls is Fp32Multiply else "add"
    _check(op, got, golden(op, a, b), a, b)


@pytest.mark.parametrize("latency", [0, None, 4])
def test_int_to_fp32_pysim(latency):
    vals = [0, 1, -1, 7, -(1 << 31), (1 << 31) - 1, (1 << 24) + 1, (1 << 24) + 3, -(1 << 25) - 3,
            (1 << 25) + 2, 123456789, -16777215]
    got = _run_pysim(IntToFp32(32, latency=latency), {"a": vals})
    _check("i2f", got, golden("i2f", vals), np.array(vals))


@pytest.mark.parametrize("latency", [0, None, 2])
def test_fp16_to_fp32_pysim(latency):
    vals = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0200, 0x0400, 0x3C00, 0x7BFF, 0x7C00,
            0xFC00, 0x7E00, 0x7C01, 0x3555]
    got = _run_pysim(Fp16ToFp32(latency=latency), {"a": vals})
    _check("h2f", got, golden("h2f", np.array(vals)), np.array(vals))


def _latency(unit):
    Fragment.get(unit, None)   # elaborate, so that Amaranth does not warn about an unused unit
    return unit.latency


def test_latency_is_validated():
    with pytest.raises(ConfigError, match="latency"):
        Fp32Add(latency=Fp32Add.max_latency() + 1)
    with pytest.raises(ConfigError, match="width"):
        IntToFp32(1)
    with pytest.raises(ConfigError, match="a_bits"):
        Fp32Multiply(a_bits=11)                       # only with normal_a
    with pytest.raises(ConfigError, match="a_bits"):
        Fp32Multiply(normal_a=True, a_bits=25)
    assert _latency(Fp32Multiply(normal_a=True, a_bits=11)) == 4
    assert _latency(Fp32Multiply()) == 4 and _latency(Fp32Add()) == 4
    assert _latency(IntToFp32(25)) == 2 and _latency(Fp16ToFp32()) == 1
    assert [_latency(Fp32Add(latency=n)) for n in range(7)] == list(range(7))


# ---------------------------------------------------------------------------
# Verilator: a few hundred thousand vectors per op
# ---------------------------------------------------------------------------

BANK_OPS = {
    "mul": BankOp(lambda lat: Fp32Multiply(latency=lat), Fp32Multiply.max_latency(), ("a", "b")),
    "mun": BankOp(lambda lat: Fp32Multiply(latency=lat, normal_a=True), Fp32Multiply.max_latency(), ("a", "b")),
    "muh": BankOp(lambda lat: Fp32Multiply(latency=lat, normal_a=True, a_bits=11), Fp32Multiply.max_latency(),
                  ("a", "b")),
    "muc": BankOp(lambda lat: Fp32Multiply(latency=lat, normal_a=True, a_bits=17), Fp32Multiply.max_latency(),
                  ("a", "b")),
    "add": BankOp(lambda lat: Fp32Add(latency=lat), Fp32Add.max_latency(), ("a", "b")),
    "i2f": BankOp(lambda lat: IntToFp32(32, latency=lat), IntToFp32.max_latency(), ("a",)),
    "i2n": BankOp(lambda lat: IntToFp32(20, latency=lat), IntToFp32.max_latency(), ("a",), width=20),
    "h2f": BankOp(lambda lat: Fp16ToFp32(latency=lat), Fp16ToFp32.max_latency(), ("a",), width=16),
}
BANK_LANES = 4
VECTORS = {"mul": 320_000, "mun": 320_000, "muh": 320_000, "muc": 120_000, "add": 320_000, "i2f": 200_000, "i2n": 60_000,
           "h2f": 1 << 16}


def _bank_vectors(seed: int):
    rng = np.random.default_rng(seed)
    ma, mb = mul_vectors(rng, VECTORS["mul"])
    na, nb = mul_normal_a_vectors(rng, VECTORS["mun"])
    ha, hb = mul_half_a_vectors(rng, VECTORS["muh"])
    ca, cb = mul_corr_a_vectors(rng, VECTORS["muc"])
    aa, ab = add_vectors(rng, VECTORS["add"])
    return {
        "mul": {"a": ma, "b": mb},
        "mun": {"a": na, "b": nb},
        "muh": {"a": ha, "b": hb},
        "muc": {"a": ca, "b": cb},
        "add": {"a": aa, "b": ab},
        "i2f": {"a": int_vectors(rng, VECTORS["i2f"], 32)},
        "i2n": {"a": int_vectors(rng, VECTORS["i2n"], 20)},
        "h2f": {"a": half_vectors()},
    }


@pytest.mark.sim
def test_fp32_units_verilator(tmp_path):
    seed = 20250601
    vectors = _bank_vectors(seed)
    res = run_bank(UnitBank(BANK_OPS, BANK_LANES), vectors, tmp_path, "fp32_bank", seed)
    for op, ops in vectors.items():
        ins = [np.asarray(v) for v in ops.values()]
        got = res[op].astype(U32)
        exp = golden("mul" if op in ("mun", "muh", "muc") else op, *ins) if len(ins) == 2 else golden(op, ins[0])
        _check(op, got, exp, *ins)


@pytest.mark.parametrize("latency", [0, 2, 4])
def test_time_shared_multiply_pysim(latency):
    """Three uses of one Fp32Multiply, at most one issuing per cycle in random order with idle
    cycles: each use sees exactly its own products (NumPy's float32 multiply), in its issue
    order, `latency` cycles after it issued, and never another use's result as valid."""
    from amaranth.hdl import Module, Signal
    from amaranth.sim import Simulator
    from rtl.fp32 import time_shared

    rng = np.random.default_rng(latency + 11)
    n = 300
    who = rng.integers(-1, 3, n)                    # -1: nobody issues this cycle
    a = rng.standard_normal(n).astype(np.float32) * np.float32(1e3)
    b = rng.standard_normal(n).astype(np.float32)
    m = Module()
    uses = time_shared(m, "mul", Fp32Multiply(latency), 3)
    tick = Signal()
    m.d.sync += tick.eq(~tick)        # a sync domain even at latency 0
    got = {u: [] for u in range(3)}

    async def bench(ctx):
        for c in range(n + latency + 2):
            if c < n:
                for u, use in enumerate(uses):
                    ctx.set(use.i_valid, int(who[c] == u))
                    ctx.set(use.a, int(a[c].view(np.uint32)) if who[c] == u else 0x7FC00000)
                    ctx.set(use.b, int(b[c].view(np.uint32)) if who[c] == u else 0x7F800000)
            else:
                for use in uses:
                    ctx.set(use.i_valid, 0)
            await ctx.delay(1e-9)
            for u, use in enumerate(uses):
                if ctx.get(use.o_valid):
                    got[u].append((c, ctx.get(use.o)))
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    for u in range(3):
        cycles = np.flatnonzero(who == u)
        want = [(int(c) + latency, int((a[c] * b[c]).view(np.uint32))) for c in cycles]
        assert got[u] == want, u
