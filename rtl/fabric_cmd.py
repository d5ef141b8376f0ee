"""The decoded fabric-op command the fabric engines receive, and their answer.

The command processor fetches a 64-byte fabric descriptor (sw/contract/fabric_commands.py,
FABRIC_FIELDS), validates it with ``validate_fabric_command``'s static checks and hands the
datapath :func:`fabric_op_layout`: every descriptor field, addresses cut to the design's
``addr_width``, plus the run registers RUN_POS and RUN_TOKEN as they were at the start.
The run-time checks (CONTEXT_FULL: RUN_POS + tokens > p0 for ROPE, KV_STORE and ATTEND;
BAD_TOKEN: an EMBED id >= p0) and the bus errors (READ_ERROR, WRITE_ERROR) are the
engine's: it answers each command with one :func:`fabric_done_layout` beat, code 0 when
the op completed and every write was acknowledged.
"""

from __future__ import annotations

import struct

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sw.contract.commands import ALIGN, DEFAULT_ADDR_BITS, DESCRIPTOR_VERSION, ErrorCode, HardwareLimits, Opcode, \
    register
from sw.contract.errors import ConfigError
from .pe import const_product
from sw.contract.fabric_commands import (FABRIC_FIELDS, FABRIC_FLAGS_DEFINED, FABRIC_MAX_N, FABRIC_OPCODES,
                                         HEAD_DIMS, QUANT_GROUPS)

__all__ = ["FabricDescriptorChecker", "fabric_op_layout", "fabric_done_layout", "fabric_descriptor_layout", "ADDRESS_FIELDS",
           "RUN_POS_BITS", "RUN_TOKEN_BITS", "ERROR_CODE_BITS"]

ADDRESS_FIELDS = ("src0", "src1", "dst")
RUN_POS_BITS = register("RUN_POS").field("pos").width
RUN_TOKEN_BITS = register("RUN_TOKEN").field("token").width
ERROR_CODE_BITS = register("STATUS").field("error_code").width


def _field_widths() -> dict[str, tuple[int, int]]:
    return {name: (8 * off, 8 * struct.calcsize(fmt)) for name, off, fmt, _ in FABRIC_FIELDS}


def fabric_descriptor_layout() -> data.StructLayout:
    """The 512-bit fabric descriptor word as FABRIC_FIELDS lays it out (byte 0 in bits 7..0)."""
    fields = _field_widths()
    layout = data.StructLayout({name: unsigned(width) for name, (_, width) in fields.items()})
    for name, (offset, _) in fields.items():
        assert layout[name].offset == offset, name
    return layout


def fabric_op_layout(addr_width: int = DEFAULT_ADDR_BITS) -> data.StructLayout:
    """A validated fabric op as the datapath receives it."""
    members = {}
    for name, (_, width) in _field_widths().items():
        if name in ("version",):
            continue
        members[name] = unsigned(addr_width if name in ADDRESS_FIELDS else width)
    members["run_pos"] = unsigned(RUN_POS_BITS)
    members["run_token"] = unsigned(RUN_TOKEN_BITS)
    return data.StructLayout(members)


def fabric_done_layout() -> data.StructLayout:
    """One answer per fabric op: ``code`` is an sw.contract.commands.ErrorCode (0 = done)."""
    return data.StructLayout({"code": unsigned(ERROR_CODE_BITS)})


class FabricDescriptorChecker(wiring.Component):
    """Combinational validation of a fabric descriptor: ``code`` is
    sw.contract.fabric_commands.validate_fabric_command's answer for a descriptor whose opcode is
    one of FABRIC_OPCODES (the command processor routes the others to DescriptorChecker), checks in
    the same order, the first failing one reported. tests/test_fabric_cmd.py compares the two on
    random descriptors.
    """

    def __init__(self, limits: HardwareLimits):
        if not limits.fabric_ops:
            raise ConfigError("FabricDescriptorChecker: the limits have no fabric decoder (max_context 0)")
        self._limits = limits
        super().__init__({"desc": In(fabric_descriptor_layout()), "code": Out(ERROR_CODE_BITS)})

    def elaborate(self, platform):
        m = Module()
        lim, d = self._limits, self.desc
        aw = lim.addr_bits
        lo_bits = (ALIGN - 1).bit_length()
        op = d.opcode
        is_ = {o: Signal(name=f"is_{o.name.lower()}") for o in FABRIC_OPCODES}
        for o, sig in is_.items():
            m.d.comb += sig.eq(op == o)
        token_reg = d.flags[0]
        binary = is_[Opcode.ADD] | is_[Opcode.SILU_MUL]
        can_quant_out = is_[Opcode.RMSNORM] | is_[Opcode.SILU_MUL] | is_[Opcode.ROPE]
        qout = d.flags[2] & can_quant_out                  # QUANT_OUT: dst is an activation buffer

        # _fields_used: which addresses and strides an op uses, which fields must be 0.
        use_src0 = ~(is_[Opcode.EMBED] & token_reg)
        use_src1 = ~(is_[Opcode.QUANT] | is_[Opcode.KV_STORE])
        use_src_stride = ~(is_[Opcode.EMBED] | is_[Opcode.ATTEND])
        use_dst_stride = ~(is_[Opcode.QUANT] | is_[Opcode.KV_STORE] | qout)
        use_p0 = ~is_[Opcode.QUANT]
        use_p1 = ~(is_[Opcode.EMBED] | is_[Opcode.QUANT] | is_[Opcode.ROPE] | binary)
        unused_nonzero = Cat(
            d.p2 != 0, d.p3 != 0,
            ~use_src0 & (d.src0 != 0), ~use_src1 & (d.src1 != 0),
            ~use_src_stride & (d.src_stride != 0), ~use_dst_stride & (d.dst_stride != 0),
            ~use_p0 & (d.p0 != 0), ~use_p1 & (d.p1 != 0)).any()
        defined = Signal(16)
        m.d.comb += defined.eq(Mux(is_[Opcode.EMBED], FABRIC_FLAGS_DEFINED[Opcode.EMBED],
                                   Mux(is_[Opcode.KV_STORE], FABRIC_FLAGS_DEFINED[Opcode.KV_STORE],
                                       Mux(can_quant_out, FABRIC_FLAGS_DEFINED[Opcode.RMSNORM], 0))))
        flags_bad = (d.flags & ~defined) != 0

        addrs = [(d.dst, Const(1)), (d.src0, use_src0), (d.src1, use_src1)]
        strides = [(d.src_stride, use_src_stride), (d.dst_stride, use_dst_stride), (d.p0, binary)]
        misaligned = Cat(*(u & (a[:lo_bits] != 0) for a, u in addrs + strides)).any()
        out_of_range = Cat(*(u & (a[aw:] != 0) for a, u in addrs)).any() if aw < 64 else Const(0)

        # _shape_ok
        aux_is = {v: d.aux == v for v in QUANT_GROUPS + HEAD_DIMS}
        aux_group = Cat(*(aux_is[g] for g in QUANT_GROUPS)).any()
        aux_head = Cat(*(aux_is[h] for h in HEAD_DIMS)).any()
        n_mod_aux = Signal()
        heads = Signal(range(FABRIC_MAX_N + 1))      # n / aux for a power-of-two aux in the lists
        with m.Switch(d.aux):
            for v in sorted(set(QUANT_GROUPS + HEAD_DIMS)):
                with m.Case(v):
                    sh = v.bit_length() - 1
                    m.d.comb += [n_mod_aux.eq(d.n[:sh] != 0), heads.eq(d.n[sh:])]
        # ATTEND: heads % p1 == 0, p1 > 0. p1 > heads can only divide heads = 0 (excluded by n > 0).
        hb = len(heads)
        p1_small = (d.p1 != 0) & (d.p1 <= heads)
        rem = _remainder(m, heads, d.p1[:hb], hb)
        headed = is_[Opcode.ROPE] | is_[Opcode.KV_STORE] | is_[Opcode.ATTEND]
        headed_ok = aux_head & ~n_mod_aux & (d.p0 != 0) & (d.p0 <= lim.max_context) & Mux(
            is_[Opcode.KV_STORE], d.p1 == heads,
            Mux(is_[Opcode.ATTEND], p1_small & (rem == 0), 1))
        shape_ok = Mux(is_[Opcode.QUANT] | (qout & ~is_[Opcode.ROPE]), aux_group & ~n_mod_aux,
                       Mux(headed, headed_ok,
                           Mux(is_[Opcode.EMBED], (d.aux == 0) & (d.p0 != 0) & (d.n[:3] == 0) &
                                   (~token_reg | (d.tokens == 1)),
                               d.aux == 0)))
        row = d.n * 4
        overlap = (d.tokens > 1) & Cat(*(u & (s < row) for s, u in strides)).any()
        # _built_for: the shapes of this design's engines (HW_PARAMS4; 0 = not constrained)
        built = Const(1)
        if lim.max_row:
            built = built & (d.n <= lim.max_row)
        if lim.head_dim:
            built = built & ~(headed & (d.aux != lim.head_dim))
        if lim.kv_group:
            built = built & ~(is_[Opcode.ATTEND] & (heads > const_product(d.p1[:hb], lim.kv_group)))

        checks = [
            (d.version != DESCRIPTOR_VERSION, ErrorCode.BAD_VERSION),
            (flags_bad | unused_nonzero, ErrorCode.RESERVED_NONZERO),
            ((d.n == 0) | (d.tokens == 0), ErrorCode.ZERO_SHAPE),
            (d.tokens > lim.tokens, ErrorCode.TOO_MANY_TOKENS),
            (misaligned, ErrorCode.MISALIGNED_ADDRESS),
            (out_of_range, ErrorCode.ADDRESS_RANGE),
            ((d.n > FABRIC_MAX_N) | ~shape_ok | ~built | overlap, ErrorCode.BAD_FIELD),
        ]
        for cond, code in reversed(checks):
            with m.If(cond):
                m.d.comb += self.code.eq(code)
        return m


def _remainder(m: Module, a, b, width: int):
    """a mod b for unsigned width-bit a, b (b != 0): restoring division, one stage per bit."""
    r = Const(0, width + 1)
    for i in reversed(range(width)):
        t = Signal(width + 1, name=f"rem_t{i}")
        m.d.comb += t.eq(Cat(a[i], r[:width]))
        nr = Signal(width + 1, name=f"rem_r{i}")
        m.d.comb += nr.eq(Mux(t >= b, t - b, t))
        r = nr
    return r[:width]
