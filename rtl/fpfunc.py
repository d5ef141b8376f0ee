"""Pipelined scalar functions of the fabric contract, bit-exact with sw/contract/fabric_ops.py.

- :class:`Exp2`: ``fabric_ops.exp2`` (t <= 0, -inf included; t < -126 gives +0.0), in integer steps.
- :class:`Exp`: ``fabric_ops.exp`` (x <= 0, -inf included), in integer steps.
- :class:`Reciprocal`: ``fabric_ops.reciprocal`` (d in [2^-125, 2^125]), in integer steps.
- :class:`Rsqrt`: ``fabric_ops.rsqrt`` (v > 0, subnormals and +inf included), in integer steps.
- :class:`Sigmoid`: ``fabric_ops.sigmoid`` (every fp32 input but NaN), in integer steps.

The integer units share one RTL description of each integer core of the contract:
:func:`_log2e_steps` (U = RNE(|x| log2(e) 2^29): Exp, Sigmoid), :func:`_pow2_steps`
(``fabric_ops.pow2_q30``: Exp2, Exp, Sigmoid), :func:`_recip_core_steps`
(``fabric_ops.recip_q46``: Reciprocal, Sigmoid) and :func:`_rne24` / :func:`_pack` (the one
rounding to fp32). Their tables (the pow2 table and cubic coefficients, the reciprocal and rsqrt
seeds) are one packed word per index, read from block RAM when the step that reads them has its
register (the RAM's output register is the step's: no cycle added), else from logic.
- :class:`Fp32Divide`: a / b correctly rounded (RNE, like NumPy float32) for positive or
  negative *normal finite* a and b; the result may be normal, subnormal or overflow to inf.
  :class:`Fp32DivideSerial`: the same bits, one division at a time in 16 cycles.
- :class:`Fp32ToInt`: ``np.clip(np.rint(x), -clip, clip)`` as a signed integer.

Out-of-domain inputs give a fixed result, never X: the canonical NaN 0x7FC00000
(exp2/exp of t > 0 (not +0) or NaN; reciprocal outside [2^-125, 2^125]; rsqrt of
v <= 0 (both zeros included) or NaN; sigmoid of NaN; a divide with an operand that
is zero, subnormal, infinite or NaN) and 0 for Fp32ToInt(NaN).

Like rtl/fp32.py every unit is a free-running pipeline with a valid bit and no
back-pressure (``i_valid``, ``a`` [, ``b``] in; ``o_valid``, ``o`` out, ``o`` appearing
``latency`` cycles after its operands). The function units are chains of steps: small
integer steps (``g``, register or wire) and integer products (``imul``, up to 3 registers: a
DSP48E2's M and P registers and one more; the operand register is the step before). A latency
L is spread over the steps in rounds: every step gets a register, then every product a second
one, then a third. The default (one register per integer step, two per product) is the timing
target (250 MHz on UltraScale+); 0 is purely combinational.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value, signed
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from sw.contract import fabric_ops as fo
from sw.contract.errors import ConfigError

from .component import CheckedComponent
from .fp32 import CANONICAL_NAN, _PipelinedUnit, _round_and_pack, chain_reset_less, leading_zeros, \
    shift_right_sticky

__all__ = ["Exp2", "Exp", "Reciprocal", "Rsqrt", "Sigmoid", "Fp32Divide", "Fp32DivideSerial", "Fp32ToInt"]


def _bits(x) -> int:
    return int(np.asarray(x, np.float32).view(np.uint32))


_EXP2_MAX_MAG = _bits(-fo.EXP2_MIN)         # |t| <= 126 is live
_RECIP_LO, _RECIP_HI = _bits(2.0 ** -125), _bits(2.0 ** 125)


def _shift_round(value: Value, amount: Value, max_amount: int):
    """(value >> amount, the round-half-even increment) for an unsigned value; amount clamped."""
    q, sticky = shift_right_sticky(Cat(Const(0, 1), value), amount, max_amount)
    guard, whole = q[0], q[1:]
    return whole, guard & (sticky | whole[0])


# --- step chains ---------------------------------------------------------------------------------
_CAP = {"g": 1, "imul": 3}
_DEFAULT = {"g": 1, "imul": 2}


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
        self._reset_less = chain_reset_less(sum(latencies))
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
            s = Signal(v.shape(), name=f"f{self._i}_{name}", reset_less=self._reset_less or cycles == 0)
            if cycles == 0:
                self.m.d.comb += s.eq(v)
            else:
                self.m.d.sync += s.eq(v)
                for k in range(1, cycles):
                    s2 = Signal(v.shape(), name=f"f{self._i}_{name}_d{k}", reset_less=self._reset_less)
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

    def step(self, rom: tuple[_Rom, Value] | None = None, **new) -> None:
        """An integer step: the new values join the flow, then a register (or a wire). ``rom`` =
        (table, index): the table's entries at index join too; in a registered step they are read
        from a block RAM whose output register is the step's register, else from logic."""
        if rom is None:
            self._int_step("g", new)
            return
        table, index = rom
        if self._plan[self._i][1] == 0:
            self._int_step("g", {**new, **table.lookup(index)})
            return
        mem = Memory(shape=table.width, depth=table.depth, init=table.words, attrs={"ram_style": "block"})
        self.m.submodules[f"rom{self._i}_{table.name}"] = mem
        rd = mem.read_port()
        self.m.d.comb += rd.addr.eq(index)
        self._int_step("g", new)                      # one register (a "g" step has at most one)
        self.v.update(table.split(rd.data))

    def imul(self, **new) -> None:
        """An integer product step: like :meth:`step`, with up to 3 registers (a DSP48E2's M and P
        registers, then one more; its operand register is the previous step's)."""
        self._int_step("imul", new)

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


# --- the integer cores: 2^x and 1/x in fixed point (fabric_ops.pow2_q30, recip_q46) -------------
class _Rom:
    """Unsigned integer tables of one depth, read with one index: each as wide as its largest
    entry, packed side by side into one word per index (one block-RAM read, `_Flow.step`)."""

    def __init__(self, name: str, **tables):
        self.name = name
        self._fields = []                              # (name, offset, width)
        offset, depth = 0, None
        for key, values in tables.items():
            values = [int(v) for v in values]
            assert depth in (None, len(values)) and min(values) >= 0
            depth = len(values)
            width = max(values).bit_length()
            self._fields.append((key, offset, width, values))
            offset += width
        self.width, self.depth = offset, depth
        self.words = [sum(values[i] << off for _, off, _, values in self._fields) for i in range(depth)]

    def lookup(self, index: Value) -> dict[str, Value]:
        """The entries at `index`, from logic."""
        return {key: Array(Const(v, width) for v in values)[index] for key, _, width, values in self._fields}

    def split(self, word: Value) -> dict[str, Value]:
        return {key: word[off:off + width] for key, off, width, _ in self._fields}


# Exp2's and Sigmoid's 2^(j/64) table and cubic coefficients (31, 26, 19, 11 bits)
_POW2 = _Rom("pow2", tj=fo.POW2_TJ, c1=fo.POW2_C1, c2=fo.POW2_C2, c3=fo.POW2_C3)
# the reciprocal seeds: i = 0..255 (SEED[256] = SEED[255] - STEP[255]), 17 and 8 bits (STEP[0] = 255)
_RECIP = _Rom("recip", s=fo.RECIP_SEED[:-1], ds=fo.RECIP_SEED_STEP)
_FRAC = fo.EXP2_FRAC_BITS                        # 29
_POW2_L = fo.POW2_L_BITS                         # 23
_ERR_BITS = 18                                   # e = E >> 15 is in [-99823, 30336] (every den)
_LOG2E_Q31 = fo.LOG2E_Q31

_LOG2E_SLOTS = ("g", "imul", "g", "g")           # U (the caller's next step registers it)
_POW2_SLOTS = ("g", "imul", "g", "imul", "g", "imul", "g")
_RECIP_CORE_SLOTS = ("g", "imul", "g", "imul", "g", "imul", "g")
_ROUND_SLOTS = ("g", "g")


def _log2e_steps(f: _Flow, x: Value, **extra) -> Value:
    """U = RNE(|x| log2(e) 2^29) (fabric_ops._log2e_argument), returned as a value to register in
    the caller's next step; f.v["big"]: |x| >= 128, inf or NaN (e^-|x| below 2^-126, or NaN).
    `extra` joins the flow at the first step."""
    e = x[23:31]
    # |x| = mant * 2^(E - 150): shift by 152 - E (clamped at 62, beyond which everything rounds to 0)
    f.step(mant=Cat(x[0:23], e != 0), sh=Mux(e > 152 - 62, 152 - e, 62)[0:6], big=e >= 134, **extra)
    # P = mant * LOG2E_Q31 as two 24 x 17 / 24 x 15 products (one DSP48E2 each), summed next
    mant = f.v.pop("mant")
    f.imul(plo=mant * Const(_LOG2E_Q31 & 0x1FFFF, 17), phi=mant * Const(_LOG2E_Q31 >> 17, 15))
    f.step(p=f.v.pop("plo") + (f.v.pop("phi") << 17))
    whole, up = _shift_round(f.v.pop("p")[0:56], f.v.pop("sh"), 62)
    f.step(whole=whole[0:38], up=up)
    return f.v.pop("whole") + f.v.pop("up")


def _pow2_steps(f: _Flow) -> None:
    """fabric_ops.pow2_q30 (u = -f.v["mag"], unsigned): f.v["y"] = Y (Q1.30, 31 bits) and f.v["n"]
    (signed, 8 bits) replace "mag". Outside [-126 * 2^29, 0] the values are garbage (unused)."""
    mag = f.v.pop("mag")
    u = Signal(signed(len(mag) + 1), name="pow2_u")
    f.m.d.comb += u.eq(-mag)
    j = u[_POW2_L:_FRAC]
    f.step(n=u[_FRAC:_FRAC + 8].as_signed(), big_l=u[0:_POW2_L], rom=(_POW2, j))
    f.imul(p=f.v["big_l"][13:_POW2_L] * f.v.pop("c3"))
    f.step(h=(f.v.pop("c2") + (f.v.pop("p") >> 10))[0:19])          # h2 < 2^19
    f.imul(p=f.v["big_l"][6:_POW2_L] * f.v.pop("h"))
    f.step(h=(f.v.pop("c1") + (f.v.pop("p") >> 18))[0:26])          # h1 < 2^26
    f.imul(p=f.v.pop("big_l") * f.v.pop("h"))
    f.step(y=(f.v.pop("tj") + (f.v.pop("p") >> 24))[0:31])          # Y < 2^31


def _recip_core_steps(f: _Flow, fx: Value, den_zeros: int = 0, **extra) -> None:
    """fabric_ops.recip_q46: fx = den - 2^30 (in [0, 2^30]; its low `den_zeros` bits are zero),
    the numerator f.v["ym"] (Q1.30), or 1.0 when there is no "ym"; f.v["t"] = T (47 bits).
    `extra` joins the flow at the first step."""
    top = fx[30] if len(fx) > 30 else Const(0, 1)                    # fx = 2^30 (den = 2)
    i = Mux(top, 2 ** fo.RECIP_SEED_BITS - 1, fx[22:30])
    den = fx + (1 << 30)
    f.step(dm=den[den_zeros:32], dx=Cat(fx[12:22], top), rom=(_RECIP, i), **extra)
    f.imul(p=f.v.pop("ds") * f.v.pop("dx"))
    f.step(y0=(f.v.pop("s") - (f.v.pop("p") >> 10))[0:17])
    y0 = f.v.pop("y0")
    if "ym" in f.v:
        f.imul(dy=f.v.pop("dm") * y0, z=f.v.pop("ym") * y0)
        z = f.v.pop("z")
    else:                                                            # Z = 2^30 * y0: a shift
        f.imul(dy=f.v.pop("dm") * y0, y0=y0)
        z = f.v.pop("y0") << 30
    err = Const(1 << 46, 49) - (f.v.pop("dy") << den_zeros)
    f.step(err=err[15:15 + _ERR_BITS].as_signed(), zt=z[31:47], z=z[0:47])
    f.imul(c=f.v.pop("zt") * f.v.pop("err"))                          # unsigned x signed
    f.step(t=(f.v.pop("z") + f.v.pop("c"))[0:47])                       # T < 2^47, positive


def _rne24(t: Value, top: int, hi: Value) -> Value:
    """The 24-bit significand of unsigned t rounded half to even (25 bits: 2^24 on a carry), the
    leading one at bit `top` if `hi`, else at `top - 1`."""
    mant = Mux(hi, t[top - 23:top + 1], t[top - 24:top])
    guard = Mux(hi, t[top - 24], t[top - 25])
    sticky = Mux(hi, t[0:top - 24] != 0, t[0:top - 25] != 0)
    return mant + (guard & (sticky | mant[0]))


def _pack(m: Value, ex: Value) -> Value:
    """A positive normal fp32 from _rne24's m and the biased exponent of its leading one."""
    carry = m[24]                                                    # m = 2^24: frac 0, exponent + 1
    return Cat(Mux(carry, 0, m[0:23]), (ex + carry)[0:8], Const(0, 1))


def _pow2_result(f: _Flow) -> Value:
    """Y * 2^(n - 30) rounded once to fp32 (Y in [2^30, 2^31), n in [-126, 0]: always normal);
    f.v["live"] (else +0.0) and f.v["bad"] (else the canonical NaN)."""
    y, n = f.v.pop("y"), f.v.pop("n")
    f.step(m=_rne24(y, 30, Const(1, 1)), ex=n + 127)
    m, ex = f.v.pop("m"), f.v.pop("ex")
    f.step(res=Mux(f.v.pop("bad"), CANONICAL_NAN, Mux(f.v.pop("live"), _pack(m, ex), 0)))
    return f.v.pop("res")


# --- exp2 and exp --------------------------------------------------------------------------------
def _nonpositive_bad(x: Value) -> Value:
    """NaN, or above +0.0 (outside exp2's and exp's domain)."""
    nan = (x[23:31] == 0xFF) & (x[0:23] != 0)
    return nan | (~x[31] & (x[0:31] != 0))


class Exp2(_ChainUnit):
    """``fabric_ops.exp2``: 2^t for t <= 0 (-inf gives +0.0, t < -126 gives +0.0), in integer steps:
    u = RNE(t 2^29), Y = 2^(u 2^-29) in Q1.30 (Sigmoid's table and cubic), one round-half-even to
    fp32. t > +0.0 or NaN gives the canonical NaN.

    Three integer products (10 x 11, 17 x 19, 23 x 26 bits); default latency 14 (8 integer
    steps, 3 product steps). YoWASP Yosys ``synth_xilinx -family xcup`` of the unit alone at the
    default latency, at 36cf963: 342 LUT, 1,018 FF, 4 DSP48E2, 3 RAMB18E2 (the table; in LUTs 411 LUT;
    the first integer form, with its delay lines in SRL16E, 544 LUT and 363 FF; the fp32-op form it
    replaced, latency 33: 3,154 LUT, 1,423 FF, 8 DSP)."""

    _SLOTS = ("g", "g") + _POW2_SLOTS + _ROUND_SLOTS

    def _build(self, f, t):
        # u = RNE(t * 2^29): |t| = M * 2^(E - 150), so |t| * 2^29 = (M * 2^12) >> (133 - E)
        e = t[23:31]
        mant = Cat(t[0:23], e != 0)
        whole, up = _shift_round(Cat(Const(0, 12), mant), Mux(e >= 133, 0, 133 - e), 38)
        f.step(whole=whole[0:36], up=up, live=t[0:31] <= _EXP2_MAX_MAG, bad=_nonpositive_bad(t))
        f.step(mag=f.v.pop("whole") + f.v.pop("up"))
        _pow2_steps(f)
        return _pow2_result(f)


_EXP_MAX_U = 126 << _FRAC


class Exp(_ChainUnit):
    """``fabric_ops.exp``: e^x for x <= 0 (Sigmoid's U = RNE(|x| log2(e) 2^29), then Exp2's integer
    core and rounding). x > +0.0 or NaN gives the canonical NaN. Default latency 18; YoWASP
    Yosys: 691 LUT, 559 FF, 6 DSP48E2. Not used by the decoder."""

    _SLOTS = _LOG2E_SLOTS + ("g",) + _POW2_SLOTS + _ROUND_SLOTS

    def _build(self, f, x):
        mag = _log2e_steps(f, x, bad=_nonpositive_bad(x))
        f.step(mag=mag[0:37], live=~f.v.pop("big") & (mag <= _EXP_MAX_U))
        _pow2_steps(f)
        return _pow2_result(f)


# --- reciprocal ----------------------------------------------------------------------------------
class Reciprocal(_ChainUnit):
    """``fabric_ops.reciprocal``: 1/d for d in [2^-125, 2^125] (else the canonical NaN), in integer
    steps: den = M 2^7 (M the 24-bit significand), Sigmoid's chord seed and Newton step for
    2^30 / den, one round-half-even to fp32, exponent -e.

    Three integer products (8 x 11, 24 x 17, 16 x 18 bits); default latency 12 (6 integer steps,
    3 product steps). YoWASP Yosys ``synth_xilinx -family xcup`` of the unit alone at the default
    latency, at 36cf963: 123 LUT, 601 FF, 3 DSP48E2, 1 RAMB18E2 (the seeds; in LUTs 301 LUT; with
    SRL16E delay lines 398 LUT and 263 FF; the fp32-op form it replaced, latency 50: 5,248 LUT,
    2,304 FF, 12 DSP)."""

    _SLOTS = _RECIP_CORE_SLOTS + _ROUND_SLOTS

    def _build(self, f, d):
        # den - 2^30 = (M - 2^23) << 7: the fraction bits, seven zeros below (so i = the top 8
        # fraction bits, dx the next 10, and den * y0 a 24 x 17 product)
        _recip_core_steps(f, Cat(Const(0, 7), d[0:23]), den_zeros=7, biased=d[23:31],
                          bad=(d < _RECIP_LO) | (d > _RECIP_HI))
        # T in [2^45, 2^46]: 1/d = T * 2^(-46 - e), e = biased - 127
        t = f.v.pop("t")
        hi = t[46]
        f.step(m=_rne24(t, 46, hi), ex=253 + hi - f.v.pop("biased"))
        m, ex = f.v.pop("m"), f.v.pop("ex")
        f.step(res=Mux(f.v.pop("bad"), CANONICAL_NAN, _pack(m, ex)))
        return f.v.pop("res")


# --- rsqrt ---------------------------------------------------------------------------------------
# the rsqrt seeds, index p * 64 + i: 17 and 10 bits
_RSQRT = _Rom("rsqrt", s=fo.RSQRT_SEED[:, :-1].ravel(), ds=fo.RSQRT_SEED_STEP.ravel())
_RSQRT_J, _RSQRT_DX = fo.RSQRT_J_BITS, fo.RSQRT_DX_BITS      # 6, 12
_RSQRT_E = fo.RSQRT_E_BITS                                  # 18


class Rsqrt(_ChainUnit):
    """``fabric_ops.rsqrt``: 1/sqrt(v) for v > 0, subnormals included, +inf gives +0.0, in integer
    steps: v = M 2^(e - 23) (subnormals normalised), a chord-interpolated seed y0 on the top 6
    fraction bits and the exponent's parity p, one Newton step e = 1 - x y0^2, Y = y0 (1 + e/2) in
    exact integer products (``fabric_ops.rsqrt_q40``), one round-half-even to fp32 with the
    exponent -(e - p)/2. v <= 0 (both zeros) or NaN gives the canonical NaN.

    Five integer products in four ``imul`` steps, one DSP48E2 each (STEP x dx 10 x 12, y0^2 17 x 17,
    (M << p) x S as 25 x 17 and 25 x 15, y0 x e 17 x 18 signed); default latency 16 (8 integer
    steps, 4 product steps). YoWASP Yosys ``synth_xilinx -family xcup`` of the unit alone at the
    default latency, at 36cf963: 279 LUT, 939 FF, 5 DSP48E2, 1 RAMB18E2 (the seeds; in LUTs 400 LUT;
    with SRL16E delay lines 482 LUT and 477 FF; the fp32-op form it replaced, latency 35: 3,474 LUT,
    1,616 FF, 124 CARRY8, 12 DSP)."""

    _SLOTS = ("g", "g", "g", "imul", "g", "imul", "imul", "g", "imul", "g", "g", "g")

    def _build(self, f, v):
        e = v[23:31]
        mant = Cat(v[0:23], e != 0)
        f.step(mant=mant, lz=leading_zeros(mant)[0:5], biased=e, inf=v == 0x7F800000,
               bad=v[31] | (v[0:31] == 0) | (v[0:31] > 0x7F800000))
        mant, lz, biased = f.v.pop("mant"), f.v.pop("lz"), f.v.pop("biased")
        # v = M 2^(ex - 23), M in [2^23, 2^24): subnormals are normalised (ex = -126 - lz)
        ex = Mux(biased != 0, biased - 127, -126 - lz)[0:9].as_signed()
        odd = ex[0]
        # the result's biased exponent: Y 2^-40 is in [1/2, 1), so 126 - (ex - p) / 2 (in [63, 201])
        f.step(norm=(mant << lz)[0:24], odd=odd, ex=(126 - ((ex - odd) >> 1))[0:8])
        norm, odd = f.v.pop("norm"), f.v.pop("odd")
        idx = Cat(norm[23 - _RSQRT_J:23], odd)
        f.step(x=Mux(odd, norm << 1, norm)[0:25], dx=norm[23 - _RSQRT_J - _RSQRT_DX:23 - _RSQRT_J],
               rom=(_RSQRT, idx))
        f.imul(q=f.v.pop("ds") * f.v.pop("dx"))
        f.step(y0=(f.v.pop("s") - (f.v.pop("q") >> _RSQRT_DX))[0:17])            # y0 < 2^17
        f.imul(sq=f.v["y0"] * f.v["y0"])
        # P = (M << p) * S, S = y0^2 >> 2 (32 bits), as 25 x 17 and 25 x 15 products
        sq, x = f.v.pop("sq"), f.v.pop("x")
        f.imul(plo=x * sq[2:19], phi=x * sq[19:34])
        # e = (2^55 - P) >> 25: |2^55 - P| < 2^42, so P's low 43 bits decide it
        p43 = f.v.pop("plo") + (f.v.pop("phi") << 17)
        f.step(e=(Const(0, 43) - p43)[25:43].as_signed())
        y0, err = f.v.pop("y0"), f.v.pop("e")
        f.imul(c=y0 * err, y0=y0)                                                 # unsigned x signed
        # Y = (y0 << 23) + ((y0 e) >> 8), in [2^39, 2^40): the leading one at bit 39
        f.step(y=((f.v.pop("y0") << 23) + (f.v.pop("c") >> 8))[0:40])
        f.step(m=_rne24(f.v.pop("y"), 39, Const(1, 1)))
        m, ex = f.v.pop("m"), f.v.pop("ex")
        f.step(res=Mux(f.v.pop("bad"), CANONICAL_NAN, Mux(f.v.pop("inf"), 0, _pack(m, ex))))
        return f.v.pop("res")


# --- sigmoid: the integer form ------------------------------------------------------------------
class Sigmoid(_ChainUnit):
    """``fabric_ops.sigmoid`` in integer steps: U = RNE(|g| log2(e) 2^29) (Exp's exact product),
    Y = 2^(-U 2^-29) in Q1.30 (a 64-entry table and a cubic in Horner form: Exp2's core), den = 1 + e
    in Q1.30, a chord-interpolated seed and one Newton step for 1/den folded with the product Y / den
    (Reciprocal's core), and one round-half-even to fp32. +inf gives 1.0, -inf +0.0, +-0 0.5; NaN
    gives the canonical NaN.

    Nine integer products in seven ``imul`` steps (2 registers each by default), 12 DSP48E2 in
    all (|g| x LOG2E_Q31 as a 24x17 and a 24x15 product; L x h1, den x y0 and Ym x y0 two
    each); default latency 29 (15 integer steps, 7 product steps). YoWASP Yosys ``synth_xilinx
    -family xcup`` of the unit alone at the default latency, at 36cf963: 779 LUT, 971 FF, 12 DSP48E2,
    4 RAMB18E2 (its tables; in LUTs 1,231 LUT; earlier, with SRL16E delay lines, 1,515 LUT; the
    fp32-op form it replaced: 9,466 LUT, 4,278 FF, 26 DSP)."""

    _SLOTS = (_LOG2E_SLOTS + ("g",)                   # U
              + _POW2_SLOTS                           # Y
              + ("g",) + _RECIP_CORE_SLOTS            # den; seed y0, Newton step: T
              + _ROUND_SLOTS)                         # round, pack

    def _build(self, f, g):
        mag = _log2e_steps(f, g, neg=g[31] & (g[0:31] != 0), nan=g[0:31] > 0x7F800000)
        f.step(mag=mag[0:37], dead=f.v.pop("big") | (mag > fo.SIG_DEAD_U))
        # u = -U (garbage when dead: unused)
        _pow2_steps(f)
        # den = 2^30 + fx, fx = Y >> -n (0 for a shift >= 31, or dead); Y or 1.0 for the numerator
        y, n, neg = f.v.pop("y"), f.v.pop("n"), f.v["neg"]
        nsh = (-n)[0:8]
        fx = Mux(f.v["dead"] | (nsh >= 31), 0, y >> nsh[0:5])[0:31]
        f.step(fx=fx, ym=Mux(neg, y, 1 << 30), nn=Mux(neg, n, 0))
        _recip_core_steps(f, f.v.pop("fx"))
        t = f.v.pop("t")
        # T in [2^45, 2^47): the leading one at 46 or 45, then RNE to 24 bits
        hi = t[46]
        f.step(m=_rne24(t, 46, hi), ex=f.v.pop("nn") + 126 + hi)
        m, ex = f.v.pop("m"), f.v.pop("ex")
        f.step(res=Mux(f.v.pop("nan"), CANONICAL_NAN, Mux(f.v.pop("neg") & f.v.pop("dead"), 0, _pack(m, ex))))
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


class Fp32DivideSerial(CheckedComponent):
    """:class:`Fp32Divide`'s function (the same bits for every input) in one set of registers: two
    restoring steps per cycle instead of a 29-step pipeline, for a user with a division every
    ``latency`` cycles or fewer.

    Ports: ``i_valid``, ``a``, ``b`` in; ``ready`` out (the unit takes ``i_valid`` only while it
    is high: no division in progress); ``o_valid``, ``o`` out, ``latency`` = 16 cycles after the
    operands were taken, and ``ready`` again in that cycle. Cycles: 1 unpack and pre-normalise
    (a's significand doubled when below b's), 13 of two quotient bits (26: hidden bit, 23 fraction
    bits, guard, and one more, which with the remainder gives the sticky bit), 1 denormalise
    (subnormal quotients), 1 round and pack.
    """

    _ITER = 13                    # cycles of two quotient bits
    latency = 1 + _ITER + 2

    def __init__(self):
        super().__init__({"i_valid": In(1), "a": In(32), "b": In(32), "ready": Out(1),
                          "o_valid": Out(1), "o": Out(32)})

    def elaborate(self, platform):
        m = Module()
        a, b = self.a, self.b
        phase = Signal(range(self._ITER + 3))     # 0 idle; 1 .. ITER steps; ITER + 1, + 2 the post steps
        rem, mb = Signal(25), Signal(24)
        q = Signal(2 * self._ITER)
        exp = Signal(signed(10))
        sign, bad = Signal(), Signal()
        norm, sticky = Signal(25), Signal()
        m.d.comb += self.ready.eq(phase == 0)
        m.d.sync += self.o_valid.eq(0)
        ea, eb = a[23:31], b[23:31]
        ma, mbn = Cat(a[0:23], 1), Cat(b[0:23], 1)
        lt = ma < mbn

        def step(r):
            bit = r >= mb
            return bit, (Mux(bit, r - mb, r) << 1)[0:25]

        with m.If(phase == 0):
            with m.If(self.i_valid):
                m.d.sync += [rem.eq(Mux(lt, ma << 1, ma)[0:25]), mb.eq(mbn),
                             exp.eq(Cat(ea, Const(0, 2)).as_signed() - eb - lt + 127),
                             sign.eq(a[31] ^ b[31]),
                             bad.eq((ea == 0) | (ea == 0xFF) | (eb == 0) | (eb == 0xFF)), phase.eq(1)]
        with m.Elif(phase <= self._ITER):
            b1, r1 = step(rem)
            b2, r2 = step(r1)
            m.d.sync += [rem.eq(r2), q.eq(Cat(b2, b1, q[:-2])), phase.eq(phase + 1)]
        with m.Elif(phase == self._ITER + 1):
            # q: the hidden bit at 25, 23 fraction bits, the guard at 1; q[0] | rem is the sticky
            shr = Mux(exp < 1, 1 - exp, 0)[0:10]
            shifted, out = shift_right_sticky(q[1:], shr, 26)
            m.d.sync += [norm.eq(shifted), sticky.eq(out | q[0] | (rem != 0)), phase.eq(phase + 1)]
        with m.Else():
            frac = norm[1:24]
            up = norm[0] & (sticky | frac[0])
            flags = SimpleNamespace(sign=sign, nan=bad, inf=Const(0, 1))
            m.d.sync += [self.o.eq(_round_and_pack(flags, norm[24], exp, frac, up)), self.o_valid.eq(1),
                         phase.eq(0)]
        return m


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
