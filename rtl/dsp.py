"""The multiply-accumulate slice of a DSP48E2 (and its multiply-add form, :func:`madd_slice`), in two
forms with one behaviour.

    P <= (load ? RND : P) + A2 * B2,   A2 <= A, B2 <= B, M <= A2 * B2  (each under its clock enable)

* **Amaranth** (the default): registers, a product and an adder. Simulation
  (Verilator, Amaranth's simulator) always elaborates this form.
* **The DSP48E2 primitive** (:func:`xilinx_primitives`): an ``Instance("DSP48E2")``
  configured as exactly that slice (AREG = BREG = MREG = PREG = 1, W multiplexer =
  RND or P, X and Y = M, Z = 0, ALUMODE add). The synthesis flows (`kriallm
  resources`, `elaborate`, `build`) elaborate this form: Yosys 0.70's `xilinx_dsp`
  folds an accumulator into DSP48E1 only, so on xcup the Amaranth form leaves the
  accumulator, its adder and the product register in fabric (about 4,600 LUT and
  8,000 FF per kv260 engine) where Vivado would have used the DSP's own.

The primitive's configuration was checked against Xilinx's simulation model
(XilinxUnisimLibrary 2020.1, ``DSP48E2.v``) in Verilator, cycle for cycle, with
random operands and enables (docs/rtl.md, "DSP48E2 accumulators");
tests/test_dsp.py checks the Amaranth form against a Python model of the slice,
and that the array built on it keeps its bit-exact results.
"""

from __future__ import annotations

import contextlib
import contextvars

from amaranth.hdl import C, ClockSignal, Instance, Module, Mux, Signal, Value, signed

__all__ = ["xilinx_primitives", "primitives_enabled", "mac_slice", "madd_slice", "dsp48e2_stub_verilog",
           "DSP48E2_PORTS"]

_PRIMITIVES = contextvars.ContextVar("kriallm_xilinx_primitives", default=False)

A_BITS, B_BITS, P_BITS = 27, 18, 48          # the multiplier's signed A and B, the 48-bit P

# Every input port of the DSP48E2 and its width (UG579, table 2-1): the Instance ties each one,
# and boards/xilinx_stubs.v declares the same list for Verilator's lint.
DSP48E2_PORTS = {
    "A": 30, "ACIN": 30, "ALUMODE": 4, "B": 18, "BCIN": 18, "C": 48, "CARRYCASCIN": 1, "CARRYIN": 1,
    "CARRYINSEL": 3, "CEA1": 1, "CEA2": 1, "CEAD": 1, "CEALUMODE": 1, "CEB1": 1, "CEB2": 1, "CEC": 1,
    "CECARRYIN": 1, "CECTRL": 1, "CED": 1, "CEINMODE": 1, "CEM": 1, "CEP": 1, "CLK": 1, "D": 27,
    "INMODE": 5, "MULTSIGNIN": 1, "OPMODE": 9, "PCIN": 48, "RSTA": 1, "RSTALLCARRYIN": 1, "RSTALUMODE": 1,
    "RSTB": 1, "RSTC": 1, "RSTCTRL": 1, "RSTD": 1, "RSTINMODE": 1, "RSTM": 1, "RSTP": 1,
}

# OPMODE = W[8:7] Z[6:4] Y[3:2] X[1:0]: X = Y = M (01, 01), Z = 0 (000), W = P (01) or RND (10)
OPMODE_ACCUMULATE = 0b01_000_01_01
OPMODE_LOAD = 0b10_000_01_01
# madd_slice: W = C (11) or 0 (00); X = Y = M (01, 01) or 0 (00, 00); Z = 0
OPMODE_W_C = 0b11_000_00_00
OPMODE_XY_M = 0b00_000_01_01
# INMODE (with AMULTSEL = AD): [2] D into the pre-adder, [1] A zeroed: AD = D; or AD = A2
INMODE_D = 0b00110
INMODE_A = 0b00000


@contextlib.contextmanager
def xilinx_primitives(enabled: bool = True):
    """Within this block, :func:`mac_slice` elaborates to DSP48E2 primitives (the synthesis form)."""
    token = _PRIMITIVES.set(enabled)
    try:
        yield
    finally:
        _PRIMITIVES.reset(token)


def primitives_enabled() -> bool:
    return _PRIMITIVES.get()


def mac_slice(m: Module, name: str, *, a: Value, b: Value, ce_ab: Value, ce_m: Value, ce_p: Value,
              load: Value, rnd: int, width: int) -> Value:
    """The accumulator P (its low `width` bits, signed) of one slice; see the module docstring.

    a: signed, at most 27 bits (unsigned values need a zero sign bit); b: signed, at most 18 bits.
    The caller guarantees that the true value of P fits `width` bits (the rest is its sign)."""
    a, b = Value.cast(a), Value.cast(b)
    if len(a) > A_BITS or len(b) > B_BITS or not a.shape().signed or not b.shape().signed:
        raise ValueError(f"mac_slice {name}: A and B must be signed, at most {A_BITS} and {B_BITS} bits")
    if not 0 < width <= P_BITS or not 0 <= rnd < 1 << (width - 1):
        raise ValueError(f"mac_slice {name}: width {width} or RND {rnd} does not fit the {P_BITS}-bit P")
    p = Signal(signed(width), name=f"{name}_p", reset_less=True)
    if primitives_enabled():
        p48 = _dsp48e2(m, name, dict(A=a, B=b, CEA2=ce_ab, CEB2=ce_ab, CEM=ce_m, CEP=ce_p,
                                     OPMODE=Mux(load, OPMODE_LOAD, OPMODE_ACCUMULATE)),
                       MREG=1, RND=C(rnd, P_BITS))
        m.d.comb += p.eq(p48[:width])
        return p
    a2 = Signal(a.shape(), name=f"{name}_a2", reset_less=True)
    b2 = Signal(b.shape(), name=f"{name}_b2", reset_less=True)
    prod = Signal(signed(len(a) + len(b)), name=f"{name}_m", reset_less=True)
    with m.If(ce_ab):
        m.d.sync += [a2.eq(a), b2.eq(b)]
    with m.If(ce_m):
        m.d.sync += prod.eq(a2 * b2)
    with m.If(ce_p):
        m.d.sync += p.eq(Mux(load, rnd, p) + prod)
    return p


def madd_slice(m: Module, name: str, *, a: Value, b: Value, c: Value, ce_ab: Value, ce_p: Value,
               use_c: Value, use_m: Value, width: int, d: Value | None = None, use_d: Value = C(0)) -> Value:
    """P (its low `width` bits, signed) of a DSP48E2 used as a multiply-add with the addend on C:

        P <= (use_c ? C : 0) + (use_m ? X2 * B2 : 0)   under ce_p;   X2 = use_d ? D2 : A2;
        A2 <= A, D2 <= D, B2 <= B under ce_ab

    (AREG = BREG = DREG = 1, MREG = 0, PREG = 1, CREG = 0: the product is not registered, C is taken
    as it is). With `d`, the multiplier's first operand is chosen between the A and D registers by
    the pre-adder (AMULTSEL = AD, INMODE: D on and A zeroed, or D off: AD = D or A2), so two operand
    sources cost no fabric multiplexer. An accumulator ring closes through C (the attention unit's P.V
    accumulators: P is the ring's first register, the rest are fabric shift registers); use_m = 0
    rotates the ring, use_c = 0 starts a sum. a, d: signed, at most 27 bits; b: signed, at most 18
    bits; c: signed, at most `width` bits. The caller guarantees that the true value of P fits `width`
    bits."""
    a, b, c = Value.cast(a), Value.cast(b), Value.cast(c)
    if len(a) > A_BITS or len(b) > B_BITS or not a.shape().signed or not b.shape().signed:
        raise ValueError(f"madd_slice {name}: A and B must be signed, at most {A_BITS} and {B_BITS} bits")
    if d is not None:
        d = Value.cast(d)
        if len(d) > A_BITS or not d.shape().signed:
            raise ValueError(f"madd_slice {name}: D must be signed, at most {A_BITS} bits")
    if not 0 < width <= P_BITS or len(c) > width or not c.shape().signed:
        raise ValueError(f"madd_slice {name}: width {width} or C ({len(c)} bits) does not fit the {P_BITS}-bit P")
    p = Signal(signed(width), name=f"{name}_p", reset_less=True)
    if primitives_enabled():
        ports = dict(A=a, B=b, C=c, CEA2=ce_ab, CEB2=ce_ab, CEP=ce_p,
                     OPMODE=Mux(use_c, OPMODE_W_C, 0) | Mux(use_m, OPMODE_XY_M, 0))
        params = dict(MREG=0)
        if d is not None:      # INMODE[2] D into the pre-adder, INMODE[1] A zeroed
            ports.update(D=d, CED=ce_ab, INMODE=Mux(use_d, INMODE_D, INMODE_A))
            params.update(DREG=1, AMULTSEL="AD")
        p48 = _dsp48e2(m, name, ports, **params)
        m.d.comb += p.eq(p48[:width])
        return p
    a2 = Signal(a.shape(), name=f"{name}_a2", reset_less=True)
    b2 = Signal(b.shape(), name=f"{name}_b2", reset_less=True)
    with m.If(ce_ab):
        m.d.sync += [a2.eq(a), b2.eq(b)]
    x2 = a2
    if d is not None:
        d2 = Signal(d.shape(), name=f"{name}_d2", reset_less=True)
        with m.If(ce_ab):
            m.d.sync += d2.eq(d)
        x2 = Mux(use_d, d2, a2)
    with m.If(ce_p):
        m.d.sync += p.eq(Mux(use_c, c, 0) + Mux(use_m, x2 * b2, 0))
    return p


def _dsp48e2(m: Module, name: str, ports: dict, **params) -> Value:
    """One DSP48E2 instance as the slices use it: every input tied to 0 unless given in `ports`,
    A/B/P registered once, C/D/AD/OPMODE/INMODE unregistered, no cascade, SIMD or pattern
    detector; `params` override those defaults. Returns the 48-bit P."""
    p48 = Signal(P_BITS, name=f"{name}_p48")
    tied = {k: C(0, w) for k, w in DSP48E2_PORTS.items()}
    tied.update(CLK=ClockSignal(), **ports)
    base = dict(
        AREG=1, BREG=1, ACASCREG=1, BCASCREG=1, MREG=1, PREG=1, CREG=0, DREG=0, ADREG=0,
        OPMODEREG=0, ALUMODEREG=0, INMODEREG=0, CARRYINREG=0, CARRYINSELREG=0,
        A_INPUT="DIRECT", B_INPUT="DIRECT", AMULTSEL="A", BMULTSEL="B", PREADDINSEL="A",
        USE_MULT="MULTIPLY", USE_SIMD="ONE48", USE_WIDEXOR="FALSE", XORSIMD="XOR24_48_96",
        USE_PATTERN_DETECT="NO_PATDET", AUTORESET_PATDET="NO_RESET", AUTORESET_PRIORITY="RESET",
        RND=C(0, P_BITS), MASK=C((1 << P_BITS) - 1, P_BITS), PATTERN=C(0, P_BITS),
        SEL_MASK="MASK", SEL_PATTERN="PATTERN",
    )
    base.update(params)
    m.submodules[name] = Instance(
        "DSP48E2",
        *[("p", k, v) for k, v in base.items()],
        *[("i", k, _port(m, f"{name}_{k}", v, DSP48E2_PORTS[k])) for k, v in tied.items()],
        ("o", "P", p48),
    )
    return p48


def _port(m: Module, name: str, v, width: int) -> Value:
    """v at exactly `width` bits: sign-extended if signed, else zero-extended (a constant as is)."""
    v = Value.cast(v)
    if len(v) == width:
        return v
    s = Signal(signed(width) if v.shape().signed else width, name=name)
    m.d.comb += s.eq(v)
    return s


def dsp48e2_stub_verilog() -> str:
    """A port-level stand-in for the DSP48E2 (every input of DSP48E2_PORTS, the P output, the
    parameters the slice sets), for `verilator --lint-only` and Yosys's hierarchy check of the
    synthesis Verilog. Not a model: P is constant. Vivado and Yosys's synth_xilinx use the primitive."""
    params = ("AREG", "BREG", "ACASCREG", "BCASCREG", "MREG", "PREG", "CREG", "DREG", "ADREG", "OPMODEREG",
              "ALUMODEREG", "INMODEREG", "CARRYINREG", "CARRYINSELREG")
    strings = ("A_INPUT", "B_INPUT", "AMULTSEL", "BMULTSEL", "PREADDINSEL", "USE_MULT", "USE_SIMD", "USE_WIDEXOR",
               "XORSIMD", "USE_PATTERN_DETECT", "AUTORESET_PATDET", "AUTORESET_PRIORITY", "SEL_MASK", "SEL_PATTERN")
    lines = ["// DSP48E2 stand-in for open-tool lint only (rtl/dsp.py); Vivado uses the primitive.",
             "/* verilator lint_off DECLFILENAME */", "/* verilator lint_off UNUSEDSIGNAL */",
             "/* verilator lint_off UNUSEDPARAM */", "module DSP48E2 #("]
    decl = [f"  parameter integer {p} = 1" for p in params]
    decl += [f'  parameter {p} = "NONE"' for p in strings]
    decl += [f"  parameter [47:0] {p} = 48'h0" for p in ("RND", "MASK", "PATTERN")]
    lines.append(",\n".join(decl))
    lines.append(") (")
    ports = [f"  input {'' if w == 1 else f'[{w - 1}:0] '}{k}" for k, w in DSP48E2_PORTS.items()]
    ports.append("  output [47:0] P")
    lines.append(",\n".join(ports))
    lines += [");", "  assign P = 48'h0;", "endmodule", "/* verilator lint_on UNUSEDPARAM */",
              "/* verilator lint_on UNUSEDSIGNAL */", "/* verilator lint_on DECLFILENAME */", ""]
    return "\n".join(lines)
