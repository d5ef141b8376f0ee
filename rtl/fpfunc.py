"""Pipelined scalar functions of the fabric contract, bit-exact with sw/contract/fabric_ops.py.

- :class:`Exp2`: ``fabric_ops.exp2`` (t <= 0, -inf included; t < -126 gives +0.0).
- :class:`Exp`: ``fabric_ops.exp`` (x <= 0, -inf included), through the same fixed-point
  core as Exp2 (``_pow2_fixed``: one RTL description, :func:`_pow2_core`).
- :class:`Reciprocal`: ``fabric_ops.reciprocal`` (d in [2^-125, 2^125]).
- :class:`Rsqrt`: ``fabric_ops.rsqrt`` (v > 0, subnormals and +inf included).
- :class:`Sigmoid`: ``fabric_ops.sigmoid`` (every fp32 input but NaN), in integer steps only.
- :class:`Fp32Divide`: a / b correctly rounded (RNE, like NumPy float32) for positive or
  negative *normal finite* a and b; the result may be normal, subnormal or overflow to inf.
- :class:`Fp32ToInt`: ``np.clip(np.rint(x), -clip, clip)`` as a signed integer.

Out-of-domain inputs give a fixed result, never X: the canonical NaN 0x7FC00000
(exp2/exp of t > 0 (not +0) or NaN; reciprocal outside [2^-125, 2^125]; rsqrt of
v <= 0 (both zeros included) or NaN; sigmoid of NaN; a divide with an operand that
is zero, subnormal, infinite or NaN) and 0 for Fp32ToInt(NaN).

Like rtl/fp32.py every unit is a free-running pipeline with a valid bit and no
back-pressure (``i_valid``, ``a`` [, ``b``] in; ``o_valid``, ``o`` out, ``o`` appearing
``latency`` cycles after its operands). The function units are chains of steps:
Fp32Multiply / Fp32Add sub-units (``mul``/``add``), small integer steps (``g``,
register or wire) and integer products (``imul``, up to 3 registers: a DSP48E2's M and
P registers and one more; the operand register is the step before). A latency L is
spread over the steps in rounds: every step gets a register, then every fp32 unit and
product a second one, and so on up to its maximum. The default (one register per
integer step, two per product, every fp32 unit at its own default latency 4) is the
timing target (250 MHz on UltraScale+); 0 is purely combinational.
"""

from __future__ import annotations

import math

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value, signed
from amaranth.lib.wiring import In, Out

from sw.contract import fabric_ops as fo
from sw.contract.errors import ConfigError

from .fp32 import (CANONICAL_NAN, Fp32Add, Fp32Multiply, _PipelinedUnit, _round_and_pack, leading_zeros,
                   shift_right_sticky)

__all__ = ["Exp2", "Exp", "Reciprocal", "Rsqrt", "Sigmoid", "Fp32Divide", "Fp32ToInt"]


def _bits(x) -> int:
    return int(np.asarray(x, np.float32).view(np.uint32))


_ONE, _ONE_HALF = _bits(1.0), _bits(1.5)
_EXP2_MAX_MAG = _bits(-fo.EXP2_MIN)         # |t| <= 126 is live
_RECIP_LO, _RECIP_HI = _bits(2.0 ** -125), _bits(2.0 ** 125)


def _rom(values) -> Array:
    return Array(Const(_bits(v), 32) for v in np.asarray(values, np.float32).ravel())


def _shift_round(value: Value, amount: Value, max_amount: int):
    """(value >> amount, the round-half-even increment) for an unsigned value; amount clamped."""
    q, sticky = shift_right_sticky(Cat(Const(0, 1), value), amount, max_amount)
    guard, whole = q[0], q[1:]
    return whole, guard & (sticky | whole[0])


def _negate_sign(x: Value) -> Value:
    return Cat(x[0:31], ~x[31])


# --- step chains ---------------------------------------------------------------------------------
_CAP = {"g": 1, "imul": 3, "mul": Fp32Multiply.max_latency(), "add": Fp32Add.max_latency()}
_DEFAULT = {"g": 1, "imul": 2, "mul": 4, "add": 4}


def _spread(slots: tuple[str, ...], latency: int) -> list[int]:
    """Per-step latencies: registers are handed out in rounds (see the module docstring)."""
    out = [0] * len(slots)
    level = 0
    while latency:
        level += 1
        for i, kind in enumerate(slots):
            if latency and _CAP[kind] >= level:
                out[i] += 1
                latency -= 1
    return out


class _Flow:
    """Named values flowing through the steps of a chain; every step delays all of them alike."""

    def __init__(self, m: Module, valid: Value, slots: tuple[str, ...], latencies: list[int]):
        self.m = m
        self.valid = valid
        self.v: dict[str, Value] = {}
        self._plan = list(zip(slots, latencies))
        self._i = 0

    def _take(self, kind: str) -> int:
        got, lat = self._plan[self._i]
        assert got == kind, f"step {self._i} is {got}, the datapath uses {kind}"
        self._i += 1
        return lat

    def _delay(self, cycles: int, new: dict) -> None:
        vals = {**self.v, **new}
        out = {}
        for name, v in vals.items():
            v = Value.cast(v)
            s = Signal(v.shape(), name=f"f{self._i}_{name}", reset_less=True)
            if cycles == 0:
                self.m.d.comb += s.eq(v)
            else:
                self.m.d.sync += s.eq(v)
                for k in range(1, cycles):
                    s2 = Signal(v.shape(), name=f"f{self._i}_{name}_d{k}", reset_less=True)
                    self.m.d.sync += s2.eq(s)
                    s = s2
            out[name] = s
        self.v = out

    def _int_step(self, kind: str, new: dict) -> None:
        lat = self._take(kind)
        self._delay(lat, new)
        for k in range(lat):
            valid = Signal(name=f"f{self._i}_valid" + (f"_d{k}" if k else ""))
            self.m.d.sync += valid.eq(self.valid)
            self.valid = valid

    def step(self, **new) -> None:
        """An integer step: the new values join the flow, then a register (or a wire)."""
        self._int_step("g", new)

    def imul(self, **new) -> None:
        """An integer product step: like :meth:`step`, with up to 3 registers (a DSP48E2's M and P
        registers, then one more; its operand register is the previous step's)."""
        self._int_step("imul", new)

    def _unit(self, kind: str, unit, a: Value, b: Value, name: str) -> None:
        self.m.submodules[f"{kind}{self._i}"] = unit
        self.m.d.comb += [unit.i_valid.eq(self.valid), unit.a.eq(a), unit.b.eq(b)]
        self._delay(unit.latency, {})
        self.valid = unit.o_valid
        self.v[name] = unit.o

    def mul(self, name: str, a: Value, b: Value, *, normal_a: bool = False) -> None:
        """v[name] = a * b (``normal_a``: a is never subnormal)."""
        self._unit("mul", Fp32Multiply(latency=self._take("mul"), normal_a=normal_a), a, b, name)

    def add(self, name: str, a: Value, b: Value) -> None:
        self._unit("add", Fp32Add(latency=self._take("add")), a, b, name)

    def keep(self, *names: str) -> None:
        """Drop every value but `names`."""
        self.v = {k: v for k, v in self.v.items() if k in names}

    def finish(self) -> None:
        assert self._i == len(self._plan), "datapath has fewer steps than planned"


class _ChainUnit(_PipelinedUnit):
    """A unit built as a chain of steps (`_SLOTS`); `_build` returns the result value."""

    _SLOTS: tuple[str, ...] = ()

    @classmethod
    def max_latency(cls) -> int:
        return sum(_CAP[s] for s in cls._SLOTS)

    @classmethod
    def default_latency(cls) -> int:
        return sum(_DEFAULT[s] for s in cls._SLOTS)

    @classmethod
    def resolve_latency(cls, latency: int | None) -> int:
        if latency is None:
            return cls.default_latency()
        if not isinstance(latency, int) or isinstance(latency, bool) or not 0 <= latency <= cls.max_latency():
            raise ConfigError(f"{cls.__name__}: latency must be an integer from 0 to "
                              f"{cls.max_latency()}, got {latency!r}")
        return latency

    def __init__(self, latency: int | None = None):
        super().__init__({"i_valid": In(1), "a": In(32), "o_valid": Out(1), "o": Out(32)}, latency)

    def elaborate(self, platform):
        m = Module()
        f = _Flow(m, self.i_valid, self._SLOTS, _spread(self._SLOTS, self.latency))
        result = self._build(f, self.a)
        f.finish()
        m.d.comb += [self.o.eq(result), self.o_valid.eq(f.valid)]
        return m


# --- 2^x: the fixed-point core and its two front ends ---------------------------------------------
_CORE_SLOTS = ("g", "g", "mul", "add", "mul", "add", "mul", "mul", "add", "g")
_EXP2_TABLE = _rom(fo.EXP2_TABLE)
_FRAC = fo.EXP2_FRAC_BITS
_R_BITS = fo.EXP2_FRAC_BITS - fo.EXP2_TABLE_BITS    # 24


def _pow2_core(f: _Flow) -> Value:
    """fabric_ops._pow2_fixed on f.v: ``mag`` = -u (unsigned, <= 126 * 2^29), ``live`` (else +0.0),
    ``bad`` (else the canonical NaN). Returns the result; the other values flow through."""
    u = Signal(signed(_FRAC + 9), name="pow2_u")
    f.m.d.comb += u.eq(-f.v.pop("mag"))
    fr = u[0:_FRAC]
    f.step(n=u[_FRAC:_FRAC + 8].as_signed(), tj=_EXP2_TABLE[fr[_R_BITS:_FRAC]], rf=fr[0:_R_BITS])
    # r = rf * 2^-29 as fp32 (exact): the leading one of rf moved to the hidden bit
    rf = f.v.pop("rf")
    lz = leading_zeros(rf)
    norm = (rf << lz)[0:_R_BITS]
    f.step(r=Mux(rf == 0, 0, Cat(norm[0:23], (Const(127 - 1 - _FRAC + _R_BITS, 8) - lz)[0:8], Const(0, 1))))
    r = f.v["r"]
    f.mul("q", Const(_bits(fo.EXP2_C3), 32), r, normal_a=True)
    f.add("q", f.v["q"], Const(_bits(fo.EXP2_C2), 32))
    f.mul("q", f.v["q"], f.v["r"], normal_a=True)
    f.add("q", f.v["q"], Const(_bits(fo.EXP2_C1), 32))
    f.mul("q", f.v["q"], f.v["r"], normal_a=True)
    del f.v["r"]
    f.mul("q", f.v["tj"], f.v["q"], normal_a=True)
    f.add("y", f.v.pop("tj"), f.v.pop("q"))
    # y in [1, 2] and n in [-126, 0]: y * 2^n is normal, an exponent add
    y, n = f.v.pop("y"), f.v.pop("n")
    f.step(res=Mux(f.v.pop("bad"), CANONICAL_NAN,
                   Mux(f.v.pop("live"), Cat(y[0:23], (y[23:31] + n)[0:8], Const(0, 1)), 0)))
    return f.v.pop("res")


def _nonpositive_bad(x: Value) -> Value:
    """NaN, or above +0.0 (outside exp2's and exp's domain)."""
    nan = (x[23:31] == 0xFF) & (x[0:23] != 0)
    return nan | (~x[31] & (x[0:31] != 0))


_EXP2_SLOTS = ("g", "g") + _CORE_SLOTS


def _exp2_steps(f: _Flow, t: Value) -> Value:
    # u = RNE(t * 2^29): |t| = M * 2^(E - 150), so |t| * 2^29 = (M * 2^12) >> (133 - E)
    e = t[23:31]
    mant = Cat(t[0:23], e != 0)
    whole, up = _shift_round(Cat(Const(0, 12), mant), Mux(e >= 133, 0, 133 - e), 38)
    f.step(whole=whole[0:36], up=up, live=t[0:31] <= _EXP2_MAX_MAG, bad=_nonpositive_bad(t))
    f.step(mag=f.v.pop("whole") + f.v.pop("up"))
    return _pow2_core(f)


_EXP_SLOTS = ("g", "g", "g", "g", "g") + _CORE_SLOTS
_LOG2E_Q31 = fo.LOG2E_Q31
_EXP_MAX_U = 126 << _FRAC


def _exp_steps(f: _Flow, x: Value) -> Value:
    e = x[23:31]
    # |x| >= 128 (and -inf) is far below -126 after the multiply; smaller |x| shift by 152 - E
    # (E <= 133; the contract clamps at 62, beyond which everything rounds to 0 anyway).
    f.step(mant=Cat(x[0:23], e != 0), sh=Mux(e > 152 - 62, 152 - e, 62)[0:6], dead=e >= 134,
           bad=_nonpositive_bad(x))
    f.step(p=f.v.pop("mant") * Const(_LOG2E_Q31, 32))     # two DSP48E2s: a product and a pipeline register
    f.step()
    whole, up = _shift_round(f.v.pop("p"), f.v.pop("sh"), 62)
    f.step(whole=whole[0:38], up=up)
    mag = f.v.pop("whole") + f.v.pop("up")
    f.step(mag=mag[0:36], live=~f.v.pop("dead") & (mag <= _EXP_MAX_U))
    return _pow2_core(f)


class Exp2(_ChainUnit):
    """``fabric_ops.exp2``: 2^t for t <= 0 (-inf gives +0.0, t < -126 gives +0.0).
    t > +0.0 or NaN gives the canonical NaN. Default latency 33."""

    _SLOTS = _EXP2_SLOTS

    def _build(self, f, a):
        return _exp2_steps(f, a)


class Exp(_ChainUnit):
    """``fabric_ops.exp``: e^x for x <= 0 (the exact 24x32-bit product with LOG2E_Q31, one
    round-half-even shift, then Exp2's fixed-point core). x > +0.0 or NaN gives the canonical
    NaN. Default latency 36."""

    _SLOTS = _EXP_SLOTS

    def _build(self, f, a):
        return _exp_steps(f, a)


# --- reciprocal ----------------------------------------------------------------------------------
_RECIP_SLOTS = ("g",) + ("mul", "add", "mul", "add") * fo.RECIP_STEPS + ("g",)
_RECIP_SEED = _rom(fo.RECIP_SEED)
_SEED_LO = 23 - fo.SEED_BITS


def _recip_steps(f: _Flow, d: Value, check: bool) -> Value:
    """fabric_ops.reciprocal; without `check` the caller guarantees the domain."""
    bad = ((d < _RECIP_LO) | (d > _RECIP_HI)) if check else Const(0, 1)
    f.step(m=Cat(d[0:23], Const(127, 8), Const(0, 1)), y=_RECIP_SEED[d[_SEED_LO:23]],
           rexp=(d[23:31] - 127)[0:8].as_signed(), rbad=bad)
    for _ in range(fo.RECIP_STEPS):
        f.mul("a", f.v["m"], f.v["y"], normal_a=True)
        f.add("b", Const(_ONE, 32), _negate_sign(f.v.pop("a")))
        f.mul("c", f.v["y"], f.v.pop("b"), normal_a=True)
        f.add("y", f.v["y"], f.v.pop("c"))
    del f.v["m"]
    y, e = f.v.pop("y"), f.v.pop("rexp")
    # y is about 1/m in (1/2, 1] and e in [-125, 125]: y * 2^-e is normal, an exponent subtract
    f.step(res=Mux(f.v.pop("rbad"), CANONICAL_NAN, Cat(y[0:23], (y[23:31] - e)[0:8], Const(0, 1))))
    return f.v.pop("res")


class Reciprocal(_ChainUnit):
    """``fabric_ops.reciprocal``: 1/d for d in [2^-125, 2^125] (else the canonical NaN).
    Default latency 50."""

    _SLOTS = _RECIP_SLOTS

    def _build(self, f, a):
        return _recip_steps(f, a, check=True)


# --- rsqrt ---------------------------------------------------------------------------------------
_RSQRT_SLOTS = ("g", "g") + ("mul", "mul", "add", "mul") * fo.RSQRT_STEPS + ("g",)
_RSQRT_SEED = _rom(fo.RSQRT_SEED)      # index: parity * 32 + seed index


class Rsqrt(_ChainUnit):
    """``fabric_ops.rsqrt``: 1/sqrt(v) for v > 0, subnormals included, +inf gives +0.0.
    v <= 0 (both zeros) or NaN gives the canonical NaN. Default latency 35."""

    _SLOTS = _RSQRT_SLOTS

    def _build(self, f, v):
        e = v[23:31]
        mant = Cat(v[0:23], e != 0)
        f.step(mant=mant, lz=leading_zeros(mant)[0:5], biased=e, inf=v == 0x7F800000,
               bad=v[31] | (v[0:31] == 0) | (v[0:31] > 0x7F800000))
        mant, lz, biased = f.v.pop("mant"), f.v.pop("lz"), f.v.pop("biased")
        norm = (mant << lz)[0:24]
        # v = m * 2^ex with m in [1, 2): subnormals are normalised (ex = -126 - lz)
        ex = Mux(biased != 0, biased - 127, -126 - lz)[0:9].as_signed()
        odd = ex[0]
        f.step(h=Cat(norm[0:23], Mux(odd, 127, 126)[0:8], Const(0, 1)),
               y=_RSQRT_SEED[Cat(norm[_SEED_LO:23], odd)],
               half=((ex - odd) >> 1)[0:8].as_signed())
        for _ in range(fo.RSQRT_STEPS):
            f.mul("a", f.v["y"], f.v["y"], normal_a=True)
            f.mul("b", f.v.pop("a"), f.v["h"], normal_a=True)
            f.add("c", Const(_ONE_HALF, 32), _negate_sign(f.v.pop("b")))
            f.mul("y", f.v["y"], f.v.pop("c"), normal_a=True)
        y, half = f.v["y"], f.v["half"]
        # y is about 1/sqrt(mm) in (1/2, 1] and half in [-75, 63]: an exponent subtract
        f.step(res=Mux(f.v["bad"], CANONICAL_NAN,
                       Mux(f.v["inf"], 0, Cat(y[0:23], (y[23:31] - half)[0:8], Const(0, 1)))))
        return f.v["res"]


# --- sigmoid: the integer form ------------------------------------------------------------------
def _int_rom(values) -> Array:
    """An unsigned integer table, as wide as its largest entry."""
    values = [int(v) for v in values]
    width = max(values).bit_length()
    return Array(Const(v, width) for v in values)


_SIG_TJ = _int_rom(fo.SIG_TJ)                    # 31 bits
_SIG_C1 = _int_rom(fo.SIG_C1)                    # 26
_SIG_C2 = _int_rom(fo.SIG_C2)                    # 19
_SIG_C3 = _int_rom(fo.SIG_C3)                    # 11
_SIG_SEED = _int_rom(fo.SIG_SEED[:-1])           # 17; i = 0..255 (SEED[256] = SEED[255] - STEP[255])
_SIG_STEP = _int_rom(fo.SIG_SEED_STEP)           # 8
_SIG_L = fo.SIG_L_BITS                           # 23
_SIG_ERR_BITS = 18                               # e = E >> 15 is in [-99823, 30336] (every den)


class Sigmoid(_ChainUnit):
    """``fabric_ops.sigmoid`` in integer steps: U = RNE(|g| log2(e) 2^29) (Exp's exact product),
    Y = 2^(-U 2^-29) in Q1.30 (a 64-entry table and a cubic in Horner form), den = 1 + e in Q1.30,
    a chord-interpolated seed and one Newton step for 1/den folded with the product Y / den, and
    one round-half-even to fp32. +inf gives 1.0, -inf +0.0, +-0 0.5; NaN gives the canonical NaN.

    Nine integer products in seven ``imul`` steps (2 registers each by default), 12 DSP48E2 in
    all (|g| x LOG2E_Q31 as a 24x17 and a 24x15 product; L x h1, den x y0 and Ym x y0 two
    each); default latency 29 (15 integer steps, 7 product steps). YoWASP Yosys ``synth_xilinx
    -family xcup`` of the unit alone at the default latency: 1,515 LUT (284 as memory),
    933 FF, 12 DSP48E2, no BRAM (the fp32-op form it replaced: 9,466 LUT, 4,278 FF, 26 DSP)."""

    _SLOTS = ("g", "imul", "g", "g", "g",             # U
              "g", "imul", "g", "imul", "g", "imul", "g",     # Y
              "g", "g", "imul", "g",                  # den, seed y0
              "imul", "g", "imul", "g",               # Newton step: T
              "g", "g")                               # round, pack

    def _build(self, f, g):
        e = g[23:31]
        # U: as Exp (|g| = mant * 2^(E - 150); |g| >= 128, inf and NaN are "big": dead or NaN)
        f.step(mant=Cat(g[0:23], e != 0), sh=Mux(e > 152 - 62, 152 - e, 62)[0:6], big=e >= 134,
               neg=g[31] & (g[0:31] != 0), nan=g[0:31] > 0x7F800000)
        # P = mant * LOG2E_Q31 as two 24 x 17 / 24 x 15 products (one DSP48E2 each), summed next
        mant = f.v.pop("mant")
        f.imul(plo=mant * Const(_LOG2E_Q31 & 0x1FFFF, 17), phi=mant * Const(_LOG2E_Q31 >> 17, 15))
        f.step(p=f.v.pop("plo") + (f.v.pop("phi") << 17))
        whole, up = _shift_round(f.v.pop("p")[0:56], f.v.pop("sh"), 62)
        f.step(whole=whole[0:38], up=up)
        mag = f.v.pop("whole") + f.v.pop("up")
        f.step(mag=mag[0:37], dead=f.v.pop("big") | (mag > fo.SIG_DEAD_U))
        # u = -U: n = u >> 29, j = the next 6 bits, L = the low 23 (u is garbage when dead: unused)
        u = Signal(signed(37), name="sig_u")
        f.m.d.comb += u.eq(-f.v.pop("mag"))
        j = u[_SIG_L:_FRAC]
        f.step(n=u[_FRAC:_FRAC + 8].as_signed(), big_l=u[0:_SIG_L], tj=_SIG_TJ[j], c1=_SIG_C1[j],
               c2=_SIG_C2[j], c3=_SIG_C3[j])
        f.imul(p=f.v["big_l"][13:_SIG_L] * f.v.pop("c3"))
        f.step(h=(f.v.pop("c2") + (f.v.pop("p") >> 10))[0:19])          # h2 < 2^19
        f.imul(p=f.v["big_l"][6:_SIG_L] * f.v.pop("h"))
        f.step(h=(f.v.pop("c1") + (f.v.pop("p") >> 18))[0:26])          # h1 < 2^26
        f.imul(p=f.v.pop("big_l") * f.v.pop("h"))
        f.step(y=(f.v.pop("tj") + (f.v.pop("p") >> 24))[0:31])          # Y < 2^31
        # den = 2^30 + fx, fx = Y >> -n (0 for a shift >= 31, or dead); Y or 1.0 for the numerator
        y, n, neg = f.v.pop("y"), f.v.pop("n"), f.v["neg"]
        nsh = (-n)[0:8]
        fx = Mux(f.v["dead"] | (nsh >= 31), 0, y >> nsh[0:5])[0:31]
        f.step(fx=fx, ym=Mux(neg, y, 1 << 30), nn=Mux(neg, n, 0))
        fx = f.v.pop("fx")
        top = fx[30]                                                     # fx = 2^30 (den = 2)
        i = Mux(top, 2 ** fo.SIG_SEED_BITS - 1, fx[22:30])
        f.step(den=fx + (1 << 30), s=_SIG_SEED[i], ds=_SIG_STEP[i], dx=Cat(fx[12:22], top))
        f.imul(p=f.v.pop("ds") * f.v.pop("dx"))
        f.step(y0=(f.v.pop("s") - (f.v.pop("p") >> 10))[0:17])
        y0 = f.v.pop("y0")
        f.imul(dy=f.v.pop("den") * y0, z=f.v.pop("ym") * y0)
        err = Const(1 << 46, 49) - f.v.pop("dy")
        z = f.v.pop("z")
        f.step(err=err[15:15 + _SIG_ERR_BITS].as_signed(), zt=z[31:47], z=z[0:47])
        f.imul(c=f.v.pop("zt") * f.v.pop("err"))                          # unsigned x signed
        f.step(t=(f.v.pop("z") + f.v.pop("c"))[0:47])                       # T < 2^47, positive
        t = f.v.pop("t")
        # T in [2^45, 2^47): the leading one at 46 or 45, then RNE to 24 bits
        hi = t[46]
        mant = Mux(hi, t[23:47], t[22:46])
        guard = Mux(hi, t[22], t[21])
        sticky = Mux(hi, t[0:22] != 0, t[0:21] != 0)
        f.step(m=mant + (guard & (sticky | mant[0])), ex=f.v.pop("nn") + 126 + hi)
        m, ex = f.v.pop("m"), f.v.pop("ex")
        carry = m[24]                                                    # m = 2^24: frac 0, exponent + 1
        packed = Cat(Mux(carry, 0, m[0:23]), (ex + carry)[0:8], Const(0, 1))
        f.step(res=Mux(f.v.pop("nan"), CANONICAL_NAN, Mux(f.v.pop("neg") & f.v.pop("dead"), 0, packed)))
        return f.v.pop("res")


# --- divide --------------------------------------------------------------------------------------
class Fp32Divide(_PipelinedUnit):
    """a / b in binary32, round to nearest even, for normal finite a and b of either sign
    (NumPy float32 division); the quotient may be normal, subnormal or overflow to inf.
    An operand that is zero, subnormal, infinite or NaN gives the canonical NaN.

    A radix-2 restoring divider on the 24-bit significands: unpack, pre-normalise (a's
    significand doubled when below b's, so the quotient is in [1, 2)), 25 quotient bits
    (hidden bit, 23 fraction bits, guard) one per step, sticky from the remainder,
    denormalise (shift right with sticky for subnormal quotients), round + pack.
    Steps: 29; default latency 29 (a register after every step).
    """

    _ITER = 25
    _PRIORITY = tuple([28, 0, 1, 27] + list(range(2, 27, 2)) + list(range(3, 27, 2)))
    _DEFAULT_LATENCY = 29

    def __init__(self, latency: int | None = None):
        super().__init__({"i_valid": In(1), "a": In(32), "b": In(32), "o_valid": Out(1), "o": Out(32)},
                         latency)

    def elaborate(self, platform):
        m = Module()
        st = self._stages(m)
        a, b = self.a, self.b
        ea, eb = a[23:31], b[23:31]
        bad = (ea == 0) | (ea == 0xFF) | (eb == 0) | (eb == 0xFF)
        s = st.boundary(ma=Cat(a[0:23], 1), mb=Cat(b[0:23], 1), exp=ea - eb + 127,
                        sign=a[31] ^ b[31], bad=bad)
        lt = s.ma < s.mb
        s = st.boundary(rem=Mux(lt, s.ma << 1, s.ma)[0:25], mb=s.mb, exp=(s.exp - lt)[0:10].as_signed(),
                        sign=s.sign, bad=s.bad, q=Const(0, 1))
        for k in range(self._ITER):
            bit = s.rem >= s.mb
            rem = (Mux(bit, s.rem - s.mb, s.rem) << 1)[0:25]
            q = Cat(bit, s.q) if k else bit
            s = st.boundary(rem=rem, mb=s.mb, exp=s.exp, sign=s.sign, bad=s.bad, q=q)
        # q: hidden bit at 24, then 23 fraction bits and a guard bit
        shr = Mux(s.exp < 1, 1 - s.exp, 0)[0:10]
        norm, sticky = shift_right_sticky(s.q, shr, 26)
        s = st.boundary(norm=norm, sticky=sticky | (s.rem != 0), exp=s.exp, sign=s.sign, nan=s.bad,
                        inf=Const(0, 1))
        frac = s.norm[1:24]
        up = s.norm[0] & (s.sticky | frac[0])
        return self._output(m, st, _round_and_pack(s, s.norm[24], s.exp, frac, up))


# --- fp32 to integer -----------------------------------------------------------------------------
class Fp32ToInt(_PipelinedUnit):
    """``np.clip(np.rint(x), -clip, clip)`` as a signed ``width``-bit integer (round half to even,
    +-inf saturate); NaN gives 0. ``clip`` below 2^24 and 2^(width - 1).
    Ports: ``i_valid``, ``a`` in; ``o_valid``, ``o`` (signed(width)) out.
    Steps: shift + round bits, round + saturate + sign. Default latency 2."""

    _PRIORITY = (1, 0)
    _DEFAULT_LATENCY = 2

    @classmethod
    def check(cls, width: int, clip: int, latency: int | None = None) -> None:
        if not isinstance(width, int) or isinstance(width, bool) or not 2 <= width <= 32:
            raise ConfigError(f"Fp32ToInt: width must be an integer from 2 to 32, got {width!r}")
        if (not isinstance(clip, int) or isinstance(clip, bool) or not 1 <= clip < min(1 << 24, 1 << (width - 1))):
            raise ConfigError(f"Fp32ToInt: clip must be an integer from 1 to min(2^24, 2^(width-1)) - 1, "
                              f"got {clip!r}")
        super().check(latency)

    def __init__(self, width: int, clip: int, latency: int | None = None):
        self._width, self._clip = width, clip
        super().__init__({"i_valid": In(1), "a": In(32), "o_valid": Out(1), "o": Out(signed(width))}, latency)

    @property
    def width(self) -> int:
        return self._width

    @property
    def clip(self) -> int:
        return self._clip

    def elaborate(self, platform):
        m = Module()
        st = self._stages(m)
        x = self.a
        e = x[23:31]
        cb = self._clip.bit_length()
        # |x| = M * 2^(E - 150); |x| >= 2^cb > clip saturates (cb <= 24, so no left shift is needed)
        whole, up = _shift_round(Cat(x[0:23], e != 0), Mux(e >= 150, 0, 150 - e), 26)
        s = st.boundary(whole=whole[0:cb + 1], up=up, sat=e >= 127 + cb, sign=x[31],
                        nan=(e == 0xFF) & (x[0:23] != 0))
        r = s.whole + s.up
        mag = Mux(s.sat | (r > self._clip), self._clip, r)[0:cb]
        return self._output(m, st, Mux(s.nan, 0, Mux(s.sign, -mag, mag))[0:self._width].as_signed())
