"""Processing-element arithmetic: plain and DSP-packed INT4 x INT8 products.

The packed form follows the idea of Xilinx WP521 (INT4 optimisation on
DSP48E2): two products that share one operand are computed by one multiplier
by placing the two other operands S bits apart in the wide port,

    P = a * ((w1 << S) + w0) = (a*w1) * 2^S + a*w0 .

Here the shared operand is the INT8 activation a (signed, B port) and the
pair is two rows' INT4 weight codes (unsigned 0..15, A port). Because the
codes are unsigned, (w1 << S) + w0 is plain wiring, {w1, 0..0, w0}: no
pre-adder and no LUT. Packed values add like integers, so the adder tree and
the accumulator work on them unchanged; the pair is split only once per group:

    lo = P[S-1:0] read as signed S bits          (= sum a*w0)
    hi = (P >> S) + P[S-1]                        (= sum a*w1)

The `+ P[S-1]` is the sign-borrow correction: a negative low field borrowed
one from the high field when the two were added. The split is exact whenever
the low field's true value lies in [-2^(S-1), 2^(S-1)), so S is the exact
width of a whole group's sum (ArrayConfig.pack_shift).

The array folds that correction into the accumulator instead of paying an
S-bit incrementer per pair at the output: each group starts from the bias
2^(S-1) rather than 0 (the DSP48E2 can inject it through its W multiplexer;
in fabric the mux-to-constant costs what the mux-to-zero cost). The low
field then holds lo + 2^(S-1), which is never negative, so nothing borrows:

    hi = P' >> S                                  (no adder)
    lo = P'[S-1:0] - 2^(S-1) = {~P'[S-1], P'[S-2:0]} as signed (one inverter)

Both forms are tested against each other in tests/test_array.py.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Mux, Value

__all__ = ["product", "shift_add_product", "const_product", "packed_operand", "packed_product", "split_packed", "split_biased",
           "pack_bias", "split_packed_int", "split_biased_int", "pack_int"]


def product(w: Value, a: Value) -> Value:
    """One INT4 (or INT8) x INT8 product, exact (Amaranth widens mixed-sign operands)."""
    return w * a


def shift_add_product(z: Value, q: Value) -> Value:
    """z * q for a small unsigned z, as the sum of q << i over z's set bits: adders, not a multiplier.

    Yosys's synth_xilinx puts every $mul whose operands are at least 2 bits wide into a DSP48E2;
    a 4-bit zero point times a qsum is worth a few LUTs, not a DSP slice. Exact: the result is
    signed and wide enough for len(z) + len(q) + 1 bits.
    """
    z = Value.cast(z)
    assert not z.shape().signed, "shift_add_product takes an unsigned small factor"
    q = Value.cast(q).as_signed() if Value.cast(q).shape().signed else Cat(q, Const(0, 1)).as_signed()
    terms = [Mux(z[i], q, 0) << i for i in range(len(z))]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def const_product(x: Value, k: int) -> Value:
    """x * k for an unsigned x and a constant k >= 0, as shifted copies of x added (no $mul: see
    :func:`shift_add_product`). Unsigned, exact."""
    x = Value.cast(x)
    assert not x.shape().signed and isinstance(k, int) and k >= 0
    terms = [x << i for i in range(k.bit_length()) if k >> i & 1]
    if not terms:
        return Const(0, 1)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def packed_operand(w0: Value, w1: Value, shift: int) -> Value:
    """(w1 << shift) + w0 for unsigned 4-bit codes: a concatenation, zero logic."""
    assert len(w0) <= shift, "low code must fit below the shift"
    return Cat(w0, Const(0, shift - len(w0)), w1)


def packed_product(w0: Value, w1: Value, a: Value, shift: int) -> Value:
    """a * ((w1 << shift) + w0): one multiplier (one DSP48E2) for two products."""
    return packed_operand(w0, w1, shift) * a


def split_packed(p: Value, shift: int) -> tuple[Value, Value]:
    """Recover (sum a*w0, sum a*w1) from an accumulated packed value.

    Both are signed Values; assigning them to a signed(acc_width) signal is
    exact because each true sum fits acc_width bits.
    """
    lo = p[:shift].as_signed()
    hi = p[shift:].as_signed() + p[shift - 1]
    return lo, hi


def pack_bias(shift: int) -> int:
    """Initial accumulator value of a packed group: pre-pays the borrow correction."""
    return 1 << (shift - 1)


def split_biased(p: Value, shift: int) -> tuple[Value, Value]:
    """Split a packed sum accumulated from :func:`pack_bias`: pure wiring plus one inverter."""
    lo = Cat(p[:shift - 1], ~p[shift - 1]).as_signed()
    hi = p[shift:].as_signed()
    return lo, hi


# ---- integer reference (used by tests and docs) ------------------------------
def pack_int(w0: int, w1: int, shift: int) -> int:
    return (w1 << shift) + w0


def split_packed_int(p: int, shift: int) -> tuple[int, int]:
    """Python model of :func:`split_packed` on an exact integer."""
    mask = (1 << shift) - 1
    lo = p & mask
    sign = lo >> (shift - 1)
    if sign:
        lo -= 1 << shift
    hi = (p >> shift) + sign
    return lo, hi



def split_biased_int(p: int, shift: int) -> tuple[int, int]:
    """Python model of :func:`split_biased`; p includes the pack_bias start value."""
    field = p & ((1 << shift) - 1)
    return field - (1 << (shift - 1)), p >> shift
