"""Pipelined IEEE-754 binary32 arithmetic, bit-exact with NumPy float32.

Four small components for the dequant unit (docs/dequant.md):

- :class:`Fp16ToFp32`: fp16 bits to fp32 bits (exact; fp16 subnormals become fp32 normals).
- :class:`IntToFp32`: signed integer to fp32, round to nearest even (exact for |v| <= 2^24).
- :class:`Fp32Multiply`: a * b, round to nearest even.
- :class:`Fp32Add`: a + b, round to nearest even.

All finite inputs, subnormals included (never flushed), give the same bits as
NumPy's ``np.multiply`` / ``np.add`` / ``astype(np.float32)``, including the
signed-zero rules (x + (-x) = +0, -0 + -0 = -0, the sign of a zero product is the
xor of the operand signs) and overflow to +-inf. Infinities follow IEEE-754; any
NaN input, inf * 0 and inf - inf give the canonical quiet NaN 0x7FC00000 (NumPy's
NaN sign and payload depend on the CPU, so only "is a NaN" is part of the contract).

Every component is a free-running pipeline with a valid bit (no back-pressure):
drive ``i_valid`` and the operands in cycle c; the result and ``o_valid`` appear in
cycle c + ``latency``. The latency is a constructor parameter: the datapath is
written as a chain of steps, and a latency of L puts a register on the L most
useful step boundaries (the output first), so 0 is purely combinational.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib.wiring import In, Out

from sw.contract.errors import ConfigError

from .component import CheckedComponent

__all__ = ["Fp16ToFp32", "IntToFp32", "Fp32Multiply", "Fp32Add", "time_shared", "delay",
           "CANONICAL_NAN", "leading_zeros", "FF_CHAIN_DEPTH", "chain_reset_less"]

CANONICAL_NAN = 0x7FC00000
_INF = 0x7F800000

#: Delay lines and register rings up to this many registers deep stay in flip-flops. Synthesis
#: (Yosys' xilinx_srl, Vivado's shift-register extraction) packs a chain of 3 or more reset-less
#: registers into shift-register LUTs (SRL16E, 16 deep), one LUT per bit; on the K26 the LUTs
#: are the scarce resource and the flip-flops are not (two per LUT, under half used), so such
#: chains get a reset, which a shift-register LUT cannot have. Deeper chains (the 29-cycle
#: divider and sigmoid) stay reset-less: a flip-flop per stage would cost too many.
FF_CHAIN_DEPTH = 16


def chain_reset_less(depth: int) -> bool:
    """Whether the data registers of a chain `depth` registers deep are reset-less (may become
    shift-register LUTs): only beyond FF_CHAIN_DEPTH."""
    return depth > FF_CHAIN_DEPTH


def leading_zeros(value: Value) -> Value:
    """Number of leading zeros of an unsigned value (its width when it is zero).

    A balanced tree (log2 levels of 2:1 muxes), not a priority chain, so it
    stays shallow for the 48-bit product.
    """
    value = Value.cast(value)
    width = len(value)
    size = 1
    while size < max(width, 2):
        size *= 2
    # Ones padded below the LSB stop the count at `width` for an all-zero value.
    padded = Cat(Const((1 << (size - width)) - 1, size - width), value)

    def tree(v):
        if len(v) == 2:
            return ~(v[0] | v[1]), ~v[1]
        half = len(v) // 2
        lo_zero, lo_count = tree(v[:half])
        hi_zero, hi_count = tree(v[half:])
        return lo_zero & hi_zero, Mux(hi_zero, Cat(lo_count, Const(1, 1)), Cat(hi_count, Const(0, 1)))

    _, count = tree(padded)
    return count


def shift_right_sticky(value: Value, amount: Value, max_amount: int):
    """(value >> amount, OR of the bits shifted out); amount is clamped to max_amount."""
    value = Value.cast(value)
    width = len(value)
    clamped = Mux(amount > max_amount, max_amount, amount)[0:max_amount.bit_length()]
    ext = Cat(Const(0, max_amount), value) >> clamped
    return ext[max_amount:max_amount + width], ext[:max_amount].any()


class _Stages:
    """Carries named values through the steps of a datapath, registering at chosen boundaries.

    Data registers are reset-less (they may map to shift-register LUTs) when `reset_less`,
    else reset (flip-flops, see FF_CHAIN_DEPTH); the valid bit is always reset.
    """

    def __init__(self, m: Module, valid: Value, registered: list[bool], prefix: str,
                 reset_less: bool = True):
        self._m = m
        self._reset_less = reset_less
        self._registered = registered
        self._prefix = prefix
        self._index = 0
        self.valid = valid

    def boundary(self, **values) -> SimpleNamespace:
        reg = self._registered[self._index]
        self._index += 1
        # Unregistered boundaries still get named signals: readable Verilog, and
        # expressions are not duplicated into every use downstream.
        domain = self._m.d.sync if reg else self._m.d.comb
        out = {}
        for name, v in values.items():
            v = Value.cast(v)
            s = Signal(v.shape(), name=f"{self._prefix}{self._index}_{name}",
                       reset_less=self._reset_less or not reg)
            domain += s.eq(v)
            out[name] = s
        if not reg:
            return SimpleNamespace(**out)
        valid = Signal(name=f"{self._prefix}{self._index}_valid")
        self._m.d.sync += valid.eq(self.valid)
        self.valid = valid
        return SimpleNamespace(**out)

    def finish(self):
        assert self._index == len(self._registered), "datapath has fewer steps than boundaries"


def _round_and_pack(s, normal, exp, frac, up) -> Value:
    """The result word: `frac` rounded up by `up` (a carry out of the fraction bumps the exponent)
    and packed with `exp` (0 unless `normal`) and ``s.sign``; or the canonical NaN (``s.nan``), or
    infinity (``s.inf``, or `exp` beyond the normal range)."""
    exp_field = Mux(normal, exp, 0)
    overflow = normal & (exp >= 255)
    packed = (Cat(frac, exp_field[0:8]) + up)[0:31]
    return Mux(s.nan, CANONICAL_NAN,
               Mux(s.inf | overflow, Cat(Const(_INF, 31), s.sign), Cat(packed, s.sign)))


class _PipelinedUnit(CheckedComponent):
    """Common parameter handling: `latency` picks registered boundaries by priority."""

    #: Step boundaries in the order registers are added as latency grows.
    _PRIORITY: tuple[int, ...] = ()
    _DEFAULT_LATENCY = 1

    @classmethod
    def check(cls, latency: int | None = None) -> None:
        cls.resolve_latency(latency)

    def __init__(self, signature: dict, latency: int | None):
        self._latency = latency = self.resolve_latency(latency)
        chosen = set(self._PRIORITY[:latency])
        self._registered = [k in chosen for k in range(len(self._PRIORITY))]
        super().__init__(signature)

    @property
    def latency(self) -> int:
        """Cycles from i_valid to o_valid."""
        return self._latency

    @classmethod
    def max_latency(cls) -> int:
        return len(cls._PRIORITY)

    @classmethod
    def resolve_latency(cls, latency: int | None) -> int:
        """The latency a unit built with `latency` has (None: the default); validates it."""
        if latency is None:
            return cls._DEFAULT_LATENCY
        if not isinstance(latency, int) or isinstance(latency, bool) or not 0 <= latency <= len(cls._PRIORITY):
            raise ConfigError(f"{cls.__name__}: latency must be an integer from 0 to "
                              f"{len(cls._PRIORITY)}, got {latency!r}")
        return latency

    def _stages(self, m: Module) -> _Stages:
        return _Stages(m, self.i_valid, self._registered, prefix="st",
                       reset_less=chain_reset_less(self.latency))

    def _output(self, m: Module, st: _Stages, result: Value) -> Module:
        """The last step: `result` drives ``o`` with ``o_valid``."""
        s = st.boundary(o=result)
        st.finish()
        m.d.comb += [self.o.eq(s.o), self.o_valid.eq(st.valid)]
        return m


def delay(m: Module, value, cycles: int, name: str, reset: bool = False) -> Value:
    """`value` `cycles` cycles later, through registers named ``{name}_d1`` ...: with a reset when
    `reset` (control bits) or when the chain stays in flip-flops (`chain_reset_less`); else
    reset-less, so synthesis may make them shift-register LUTs."""
    value = Value.cast(value)
    reset_less = not reset and chain_reset_less(cycles)
    for k in range(cycles):
        reg = Signal(value.shape(), name=f"{name}_d{k + 1}", reset_less=reset_less)
        m.d.sync += reg.eq(value)
        value = reg
    return value


def time_shared(m: Module, name: str, unit: _PipelinedUnit, uses: int) -> list[SimpleNamespace]:
    """`unit` (added to `m` as `name`) shared by `uses` users that never issue in the same cycle.

    Each use is a port bundle like the unit's own: ``i_valid`` and the operands are signals the
    use drives; ``o`` is the unit's result and ``o_valid`` is high only for the use's own results
    (an owner tag travels beside the pipeline, so a result of one use never looks like another's).
    The unit takes the operands of the use whose ``i_valid`` is high (the last one listed, if two
    were: the caller's contract is that they never are). ``latency`` is the unit's.
    """
    m.submodules[name] = unit
    members = unit.signature.members
    operands = [k for k, v in members.items() if v.flow == In and k != "i_valid"]
    if uses == 1:
        return [unit]
    out = []
    for u in range(uses):
        use = SimpleNamespace(latency=unit.latency, o=unit.o,
                              i_valid=Signal(name=f"{name}_u{u}_i_valid"), o_valid=Signal(name=f"{name}_u{u}_o_valid"))
        for k in operands:
            setattr(use, k, Signal(members[k].shape, name=f"{name}_u{u}_{k}"))
        out.append(use)
    tag, sel = Const(0, range(uses)), {k: getattr(out[0], k) for k in operands}
    for u, use in enumerate(out[1:], 1):
        tag = Mux(use.i_valid, u, tag)
        sel = {k: Mux(use.i_valid, getattr(use, k), v) for k, v in sel.items()}
    m.d.comb += unit.i_valid.eq(Cat(*[use.i_valid for use in out]).any())
    m.d.comb += [getattr(unit, k).eq(v) for k, v in sel.items()]
    owner = Value.cast(tag)
    for d in range(unit.latency):
        reg = Signal(range(uses), name=f"{name}_owner_d{d + 1}", reset_less=True)
        m.d.sync += reg.eq(owner)
        owner = reg
    m.d.comb += [use.o_valid.eq(unit.o_valid & (owner == u)) for u, use in enumerate(out)]
    return out


def _unpack(x: Value):
    """Sign, biased exponent, fraction, significand with hidden bit, effective exponent, class."""
    sign, exp, frac = x[31], x[23:31], x[0:23]
    normal = exp != 0
    return SimpleNamespace(
        sign=sign, exp=exp, frac=frac,
        mant=Cat(frac, normal),                 # 24 bits; subnormals have no hidden one
        eff=Mux(normal, exp, 1),                # subnormals share exponent 1 with the hidden bit 0
        zero=(exp == 0) & (frac == 0),
        inf=(exp == 0xFF) & (frac == 0),
        nan=(exp == 0xFF) & (frac != 0))


class Fp16ToFp32(_PipelinedUnit):
    """IEEE binary16 bits to binary32 bits (always exact).

    Ports: ``i_valid``, ``a`` (16 bits) in; ``o_valid``, ``o`` (32 bits) out.
    Steps: unpack + leading-zero count, normalise + pack. Default latency 1.
    """

    _PRIORITY = (1, 0)
    _DEFAULT_LATENCY = 1

    def __init__(self, latency: int | None = None):
        super().__init__({"i_valid": In(1), "a": In(16), "o_valid": Out(1), "o": Out(32)}, latency)

    def elaborate(self, platform):
        m = Module()
        st = self._stages(m)
        a = self.a
        s = st.boundary(sign=a[15], exp=a[10:15], frac=a[0:10], lz=leading_zeros(a[0:10]))
        # Subnormal f * 2^-24: shift the leading one out of the 10-bit field.
        sub_frac = (s.frac << (s.lz + 1))[0:10]
        exp32 = Mux(s.exp == 0x1F, 0xFF,
                    Mux(s.exp != 0, s.exp + 112,
                        Mux(s.frac == 0, 0, 112 - s.lz)))
        frac32 = Mux((s.exp == 0) & (s.frac != 0), Cat(Const(0, 13), sub_frac), Cat(Const(0, 13), s.frac))
        return self._output(m, st, Cat(frac32, exp32[0:8], s.sign))


class IntToFp32(_PipelinedUnit):
    """Signed ``width``-bit integer to binary32, round to nearest even.

    Exact for |a| <= 2^24 (every such integer is an fp32); wider values round
    like NumPy's ``astype(np.float32)``. 0 gives +0.0.
    Ports: ``i_valid``, ``a`` (signed(width)) in; ``o_valid``, ``o`` out.
    Steps: magnitude, leading zeros, normalise, round + pack. Default latency 2.
    """

    _PRIORITY = (3, 1, 0, 2)
    _DEFAULT_LATENCY = 2

    @classmethod
    def check(cls, width: int, latency: int | None = None) -> None:
        if not isinstance(width, int) or not 2 <= width <= 64:
            raise ConfigError(f"IntToFp32: width must be an integer from 2 to 64, got {width!r}")
        super().check(latency)

    def __init__(self, width: int, latency: int | None = None):
        self._width = width
        super().__init__({"i_valid": In(1), "a": In(signed(width)), "o_valid": Out(1), "o": Out(32)},
                         latency)

    @property
    def width(self) -> int:
        return self._width

    def elaborate(self, platform):
        m = Module()
        w = self._width
        st = self._stages(m)
        a = self.a
        s = st.boundary(sign=a[w - 1], mag=Mux(a[w - 1], -a, a)[0:w])
        s = st.boundary(sign=s.sign, mag=s.mag, lz=leading_zeros(s.mag))
        norm = (s.mag << s.lz)[0:w]            # leading one (if any) at bit w-1
        s = st.boundary(sign=s.sign, norm=norm, zero=s.mag == 0,
                        exp=Const(127 + w - 1, 8) - s.lz)
        if w <= 24:
            frac = Cat(Const(0, 24 - w), s.norm[0:w - 1])
            up = Const(0, 1)
        else:
            frac = s.norm[w - 24:w - 1]
            guard = s.norm[w - 25]
            sticky = s.norm[0:w - 25].any() if w > 25 else Const(0, 1)
            up = guard & (sticky | frac[0])
        packed = (Cat(frac, s.exp[0:8]) + up)[0:31]   # a carry out of the fraction bumps the exponent
        return self._output(m, st, Mux(s.zero, 0, Cat(packed, s.sign)))


class Fp32Multiply(_PipelinedUnit):
    """a * b in binary32, round to nearest even, subnormals in and out.

    Steps: unpack, with the subnormal operand (if any) normalised by its leading
    zeros (boundary 0 = DSP input registers), 24x24 significand product (boundary
    1 = DSP product register), normalise by one (the leading one is at bit 47 or
    46), shift right with sticky for subnormal results (26 bits), round + pack.
    Default latency 4. Only one operand of a product that does not round to zero
    can be subnormal (two multiply to less than 2^-252), so the unit puts a
    subnormal ``a`` on ``b``'s side (two subnormals then shift out to zero):
    a 24-bit shift before the product instead of a 48-bit leading-zero count and
    shift after it (YoWASP Yosys xcup, the unit alone: 478 LUT instead of 679, 2 DSP48E2).

    ``normal_a=True`` is for callers whose ``a`` is never subnormal (zero,
    normal, inf or NaN; the dequant unit's operands are an fp16 scale converted
    to fp32 and an exact integer): it skips the swap.
    ``a_bits`` (with ``normal_a``) says that only the top ``a_bits`` bits of
    a's 24-bit significand can be nonzero (11 for an fp16 value), which makes
    the product narrower (one DSP48E2). The result is the correctly rounded
    product in every case the precondition allows, so it equals the general
    unit bit for bit; a subnormal ``a`` gives a wrong result.
    """

    _PRIORITY = (4, 1, 0, 3, 2)
    _DEFAULT_LATENCY = 4

    @classmethod
    def check(cls, latency: int | None = None, *, normal_a: bool = False, a_bits: int = 24) -> None:
        if not isinstance(a_bits, int) or not 1 <= a_bits <= 24 or (a_bits != 24 and not normal_a):
            raise ConfigError(f"Fp32Multiply: a_bits must be 1..24 (and below 24 only with normal_a), "
                              f"got {a_bits!r}")
        super().check(latency)

    def __init__(self, latency: int | None = None, *, normal_a: bool = False, a_bits: int = 24):
        self._normal_a, self._a_bits = bool(normal_a), a_bits
        super().__init__({"i_valid": In(1), "a": In(32), "b": In(32), "o_valid": Out(1), "o": Out(32)},
                         latency)

    @property
    def normal_a(self) -> bool:
        return self._normal_a

    @property
    def a_bits(self) -> int:
        return self._a_bits

    def _elaborate_normal_a(self, m, st, a, b, nan, inf):
        """The product with `a` not subnormal (unpacked `a`, `b`). Two subnormals give an exponent
        below -124, which the right shift turns into a zero product (all sticky, guard 0)."""
        # b normalised: its leading one at bit 23 (a zero b stays zero)
        lzb = leading_zeros(b.mant)[0:5]
        mb = (b.mant << lzb)[0:24]
        # Biased exponent of the result if the product's leading one sat at bit 47.
        e0 = a.eff + b.eff - lzb - Const(126, signed(10))
        ka = self._a_bits
        s = st.boundary(ma=a.mant[24 - ka:24], mb=mb, e0=e0, sign=a.sign ^ b.sign, nan=nan, inf=inf)

        # ka + 24 bits; the leading one at the top bit or the one below (zero for a zero operand)
        s = st.boundary(prod=s.ma * s.mb, e0=s.e0, sign=s.sign, nan=s.nan, inf=s.inf)

        pw = ka + 24
        top = s.prod[pw - 1]
        n = Mux(top, s.prod, s.prod << 1)[0:pw]          # leading one at pw - 1
        e = Mux(top, s.e0, s.e0 - 1)
        # 26 bits: hidden one, 23 fraction bits, guard, and a sticky of everything below
        if pw > 26:
            v = Cat(n[0:pw - 25].any(), n[pw - 25:pw])
        else:
            v = Cat(Const(0, 26 - pw), n)
        s = st.boundary(v=v, e=e, sign=s.sign, nan=s.nan, inf=s.inf)

        # results under the normal range: shift right by 1 - e (exponent field 0), keeping a sticky
        shr = Mux(s.e < 1, Const(1, 2) - s.e, 0)
        norm, sticky = shift_right_sticky(s.v, shr, 26)
        s = st.boundary(norm=norm, sticky=sticky, e=s.e, sign=s.sign, nan=s.nan, inf=s.inf)

        frac = s.norm[2:25]
        guard = s.norm[1]
        rest = s.norm[0] | s.sticky
        up = guard & (rest | frac[0])
        return _round_and_pack(s, s.norm[25], s.e, frac, up)

    def elaborate(self, platform):
        m = Module()
        st = self._stages(m)
        a, b = _unpack(self.a), _unpack(self.b)
        nan = a.nan | b.nan | (a.inf & b.zero) | (a.zero & b.inf)
        inf = (a.inf | b.inf) & ~nan
        if self._normal_a:
            return self._output(m, st, self._elaborate_normal_a(m, st, a, b, nan, inf))
        # At most one operand of a nonzero product below 2^-149 can be subnormal: two subnormals
        # multiply to less than 2^-252, which rounds to zero. So a subnormal a goes to the normalised
        # side (b); if b is subnormal too, the exponent sends the product to zero.
        a_sub = (self.a[23:31] == 0) & (self.a[0:23] != 0)
        x = _unpack(Mux(a_sub, self.b, self.a))
        y = _unpack(Mux(a_sub, self.a, self.b))
        return self._output(m, st, self._elaborate_normal_a(m, st, x, y, nan, inf))


class Fp32Add(_PipelinedUnit):
    """a + b in binary32, round to nearest even, subnormals in and out.

    Classic single-path adder: order the operands by magnitude, align the
    smaller one with guard, round and sticky bits, add or subtract, normalise
    (right by one on carry, left by the leading zeros but never below exponent
    1), round + pack. An exact zero sum is +0 unless both operands are -0.
    Steps: swap, align, add, leading-zero count, normalise, round.
    Default latency 4 (registers after round, add, swap and normalise).
    """

    _PRIORITY = (5, 2, 0, 4, 1, 3)
    _DEFAULT_LATENCY = 4

    def __init__(self, latency: int | None = None):
        super().__init__({"i_valid": In(1), "a": In(32), "b": In(32), "o_valid": Out(1), "o": Out(32)},
                         latency)

    def elaborate(self, platform):
        m = Module()
        st = self._stages(m)
        swap = self.a[0:31] < self.b[0:31]
        x = _unpack(Mux(swap, self.b, self.a))     # larger magnitude
        y = _unpack(Mux(swap, self.a, self.b))
        sub = x.sign ^ y.sign
        nan = x.nan | y.nan | (x.inf & y.inf & sub)
        s = st.boundary(mx=x.mant, my=y.mant, ex=x.eff, d=(x.eff - y.eff)[0:8], sx=x.sign, sy=y.sign,
                        nan=nan, inf=x.inf)        # if either is inf, x is (NaN aside)

        ymag, sticky = shift_right_sticky(Cat(Const(0, 3), s.my), s.d, 27)
        s = st.boundary(xs=Cat(Const(0, 3), s.mx), ys=ymag | sticky, ex=s.ex, sx=s.sx, sy=s.sy,
                        nan=s.nan, inf=s.inf)

        total = Mux(s.sx ^ s.sy, s.xs - s.ys, s.xs + s.ys)[0:28]   # never negative: |x| >= |y|
        s = st.boundary(total=total, ex=s.ex, sx=s.sx, sy=s.sy, nan=s.nan, inf=s.inf)

        s = st.boundary(total=s.total, lz=leading_zeros(s.total[0:27]), ex=s.ex, sx=s.sx, sy=s.sy,
                        nan=s.nan, inf=s.inf)

        carry = s.total[27]
        limit = s.ex - 1
        shl = Mux(s.lz < limit, s.lz, limit)[0:5]
        left = (s.total[0:27] << shl)[0:27]
        right = Cat(s.total[1] | s.total[0], s.total[2:28])
        norm = Mux(carry, right, left)
        exp = Mux(carry, s.ex + 1, s.ex - shl)[0:9]
        # Exact zero: +0 in round-to-nearest unless both addends are -0.
        sign = Mux(s.total == 0, s.sx & s.sy, s.sx)
        s = st.boundary(norm=norm, exp=exp, sign=sign, nan=s.nan, inf=s.inf)

        frac = s.norm[3:26]
        up = s.norm[2] & (s.norm[1] | s.norm[0] | frac[0])
        return self._output(m, st, _round_and_pack(s, s.norm[26], s.exp, frac, up))
