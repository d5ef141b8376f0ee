"""The RTL's fabric descriptor checks (rtl/fabric_cmd.py) against the contract's
(sw.contract.fabric_commands.validate_fabric_command) on random descriptors."""

from __future__ import annotations

import random

import pytest
from amaranth.sim import Simulator

from rtl.fabric_cmd import FabricDescriptorChecker, fabric_descriptor_layout, fabric_op_layout
from sw.contract import fabric_commands as fc
from sw.contract.commands import ErrorCode, HardwareLimits, Opcode
from sw.contract.errors import ConfigError

HW = HardwareLimits(tile_rows=32, tokens=8, group_size=64, addr_bits=40, max_context=4096)
# a design whose engines were built for qwen2.5-0.5b's shapes (HW_PARAMS4)
HW_BUILT = HardwareLimits(tile_rows=32, tokens=8, group_size=64, addr_bits=40, max_context=4096, head_dim=64,
                          kv_group=7, max_row=4864)
OPS = list(fc.FABRIC_OPCODES)


def test_layouts_are_the_descriptor_table():
    layout = fabric_descriptor_layout()
    cmd = fc.FabricCommand(opcode=Opcode.ATTEND, n=896, tokens=3, src0=0x1000, src1=0x2_0000_0040,
                           dst=0x3000, dst_stride=3584, aux=64, p0=4096, p1=2, tag=0xABCD)
    value = int.from_bytes(fc.pack_fabric_command(cmd), "little")
    for name, off, _, _ in fc.FABRIC_FIELDS:
        sl = layout[name]
        assert sl.offset == 8 * off
        assert (value >> sl.offset) & ((1 << sl.width) - 1) == getattr(cmd, name), name
    op = fabric_op_layout(32)
    assert op["src1"].width == op["dst"].width == 32
    assert "version" not in {name for name, _ in op}


def _random(rng: random.Random, hw: HardwareLimits = HW) -> fc.FabricCommand:
    """A plausible descriptor of a random op, then 0..2 random mutations of its fields."""
    op = rng.choice(OPS)
    heads_dims = [hw.head_dim] * 3 + list(fc.HEAD_DIMS) if hw.head_dim else fc.HEAD_DIMS
    aux = {Opcode.QUANT: rng.choice(fc.QUANT_GROUPS)}.get(op, rng.choice(heads_dims))
    heads = rng.randint(1, 16)
    n = aux * heads
    a = lambda: rng.randrange(0, 1 << hw.addr_bits, 64)   # noqa: E731
    row = -(-4 * n // 64) * 64
    kw = dict(opcode=op, n=n, tokens=rng.randint(1, hw.tokens), src0=a(), src1=a(), dst=a(),
              src_stride=row, dst_stride=row, aux=aux, p0=rng.randint(1, hw.max_context),
              p1=rng.choice([d for d in range(1, heads + 1) if heads % d == 0]), tag=rng.randrange(1 << 32))
    if op == Opcode.EMBED:
        kw.update(aux=0, n=8 * rng.randint(1, 200), src_stride=0, p1=0, p0=rng.randint(1, 1 << 20))
        if rng.random() < 0.5:
            kw.update(flags=int(fc.FabricFlags.TOKEN_REG), src0=0, tokens=1)
    elif op == Opcode.QUANT:
        kw.update(p0=0, p1=0, src1=0, dst_stride=0)
    elif op == Opcode.KV_STORE:
        kw.update(p1=heads, src1=0, dst_stride=0, flags=rng.choice([0, int(fc.FabricFlags.VALUE)]))
    elif op == Opcode.ATTEND:
        kw.update(src_stride=0)
    elif op == Opcode.ROPE:
        kw.update(p1=0)
    elif op in (Opcode.ADD, Opcode.SILU_MUL):
        kw.update(aux=0, p1=0, p0=row)
    else:   # RMSNORM
        kw.update(aux=0, p1=0)
    if op in fc.QUANT_OUT_OPS and rng.random() < 0.4:      # the fused quantization: dst an activation buffer
        kw.update(flags=int(fc.FabricFlags.QUANT_OUT), dst_stride=0)
        if op != Opcode.ROPE:
            kw.update(aux=rng.choice(fc.QUANT_GROUPS), n=rng.choice(fc.QUANT_GROUPS) * heads)
    cmd = fc.FabricCommand(**kw)
    mutations = {
        "version": lambda: rng.choice([0, 2, 255]),
        "flags": lambda: cmd.flags ^ (1 << rng.randint(0, 15)),
        "n": lambda: rng.choice([0, n + rng.choice([-1, 1, 8, aux]), rng.randint(1, 1 << 20), 1 << 16,
                                 (1 << 16) + 32, rng.randrange(1 << 32)]),
        "tokens": lambda: rng.choice([0, HW.tokens + 1, rng.randint(1, 0xFFFF)]),
        "aux": lambda: rng.choice([0, 16, 32, 48, 64, 96, 128, 256]),
        "src0": lambda: rng.choice([0, a() + rng.choice([1, 16, 32]), 1 << rng.randint(40, 63)]),
        "src1": lambda: rng.choice([0, a() + 8, 1 << rng.randint(40, 63)]),
        "dst": lambda: rng.choice([a() | 4, 1 << rng.randint(40, 63)]),
        "src_stride": lambda: rng.choice([0, row - 64, row + 16, rng.randrange(1 << 32)]),
        "dst_stride": lambda: rng.choice([0, row - 64, row + 4, rng.randrange(1 << 32)]),
        "p0": lambda: rng.choice([0, HW.max_context, HW.max_context + 1, row - 64, rng.randrange(1 << 32)]),
        "p1": lambda: rng.choice([0, 1, 3, heads, heads + 1, 7, rng.randrange(1 << 32)]),
        "p2": lambda: rng.randrange(1, 1 << 32),
        "p3": lambda: rng.randrange(1, 1 << 32),
    }
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        name = rng.choice(list(mutations))
        cmd = cmd.replace(**{name: mutations[name]()})
    return cmd


@pytest.mark.parametrize("hw", [HW, HW_BUILT], ids=["any-shape", "built-for-0.5b"])
def test_checker_matches_the_contract_on_random_descriptors(hw):
    rng = random.Random(20261203)
    cmds = [_random(rng, hw) for _ in range(3000)]
    want = [int(fc.validate_fabric_command(c, hw)) for c in cmds]
    outcomes = {ErrorCode(w) for w in want}
    assert outcomes >= {ErrorCode.NONE, ErrorCode.BAD_VERSION, ErrorCode.RESERVED_NONZERO, ErrorCode.ZERO_SHAPE,
                        ErrorCode.TOO_MANY_TOKENS, ErrorCode.MISALIGNED_ADDRESS, ErrorCode.ADDRESS_RANGE,
                        ErrorCode.BAD_FIELD}, outcomes
    for op in OPS:    # every op both accepted and refused
        codes = {w for c, w in zip(cmds, want) if c.opcode == op}
        assert 0 in codes and len(codes) > 1, (op, codes)
    for op in fc.QUANT_OUT_OPS:   # and with QUANT_OUT
        codes = {w for c, w in zip(cmds, want) if c.opcode == op and c.flags & fc.FabricFlags.QUANT_OUT}
        assert 0 in codes and len(codes) > 1, (op, codes)
    dut = FabricDescriptorChecker(hw)
    got = []

    async def tb(ctx):
        for c in cmds:
            ctx.set(dut.desc.as_value(), int.from_bytes(fc.pack_fabric_command(c), "little"))
            got.append(ctx.get(dut.code))

    sim = Simulator(dut)
    sim.add_testbench(tb)
    sim.run()
    bad = [(i, cmds[i], ErrorCode(w).name, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
    assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"


@pytest.mark.filterwarnings("ignore::amaranth.hdl._ir.UnusedElaboratable")
def test_checker_needs_a_fabric_design():
    with pytest.raises(ConfigError, match="max_context"):
        FabricDescriptorChecker(HardwareLimits(tile_rows=32, tokens=8, group_size=64, addr_bits=40))
