"""CSR framework: builder checks and field semantics in the Amaranth simulator, then the
AXI4-Lite bridge in cocotb + Verilator against cocotbext-axi's AxiLiteMaster."""

from __future__ import annotations

from pathlib import Path

import pytest
from amaranth.hdl import Module
from amaranth.sim import Simulator

from rtl import csr
from rtl.csr import RegisterBank
from sw.contract.commands import REGISTERS

REPO = Path(__file__).resolve().parent.parent


# The structural tests build components they never elaborate; drop them quietly.
pytestmark = [pytest.mark.filterwarnings("ignore::amaranth.hdl._ir.UnusedElaboratable"),
              pytest.mark.usefixtures("collect_unelaborated")]


def test_builder_places_and_checks():
    b = csr.Builder(addr_width=8)
    r0 = b.add("A", csr.Register({"x": csr.Field(csr.RW, 8)}))
    b.add("B", csr.Register({"y": csr.Field(csr.R, 1)}))
    b.add("C", csr.Register({"z": csr.Field(csr.RW, 1)}), offset=0x40)
    b.add("D", csr.Register({"w": csr.Field(csr.RW, 1)}))
    assert {n: o for n, (o, _) in b.registers.items()} == {"A": 0, "B": 4, "C": 0x40, "D": 0x44}
    assert b.registers["A"][1] is r0
    with pytest.raises(ValueError, match="aligned"):
        b.add("E", csr.Register({"v": csr.Field(csr.RW, 1)}), offset=0x42)
    with pytest.raises(ValueError, match="collides"):
        b.add("F", csr.Register({"v": csr.Field(csr.RW, 1)}), offset=0x40)
    with pytest.raises(ValueError, match="outside"):
        b.add("G", csr.Register({"v": csr.Field(csr.RW, 1)}), offset=0x100)
    with pytest.raises(ValueError, match="already"):
        b.add("A", csr.Register({"v": csr.Field(csr.RW, 1)}))
    csr.Bridge(b)
    with pytest.raises(ValueError, match="frozen"):
        b.add("H", csr.Register({"v": csr.Field(csr.RW, 1)}))


def test_register_field_layout_checks():
    with pytest.raises(ValueError, match="does not fit"):
        csr.Register({"a": csr.Field(csr.RW, 20), "b": csr.Field(csr.RW, 13)})
    with pytest.raises(ValueError, match="overlaps"):
        csr.Register({"a": csr.Field(csr.RW, 8), "b": csr.Field(csr.RW, 8, offset=4)})

    class ReadOnly(csr.Register, access="r"):
        def __init__(self, action):
            super().__init__({"a": csr.Field(action, 1)})

    ReadOnly(csr.R)
    with pytest.raises(ValueError, match="writable"):
        ReadOnly(csr.RW)
    reg = csr.Register({"a": csr.Field("RW", 3), "b": csr.Field("W1C", 2, offset=8)})
    assert [(n, lsb) for n, (lsb, _) in reg.fields.items()] == [("a", 0), ("b", 8)]
    assert isinstance(reg.f.b, csr.W1C)


def test_bank_matches_the_shared_map():
    bank = RegisterBank()
    got = {name: offset for name, (offset, _) in bank.registers.items()}
    assert got == {r.name: r.offset for r in REGISTERS}
    for spec in REGISTERS:
        reg = bank.registers[spec.name][1]
        assert [(n, lsb, a.width, a.access) for n, (lsb, a) in reg.fields.items()] == \
            [(f.name, f.lsb, f.width, f.access) for f in spec.fields]


def _bus_sim(bank_builder, testbench):
    """Run `testbench(ctx, bus, regs)` against a Bridge in the Amaranth simulator."""
    m = Module()
    regs = bank_builder()
    b = csr.Builder(addr_width=6)
    for name, reg in regs.items():
        b.add(name, reg)
    m.submodules.bridge = bridge = csr.Bridge(b)
    sim = Simulator(m)
    sim.add_clock(1e-8)

    async def tb(ctx):
        await testbench(ctx, bridge.bus, regs)

    sim.add_testbench(tb)
    sim.run()


async def _access(ctx, bus, addr, *, write=None, mask=0xFFFFFFFF):
    ctx.set(bus.addr, addr)
    if write is None:
        ctx.set(bus.r_stb, 1)
    else:
        ctx.set(bus.w_stb, 1)
        ctx.set(bus.w_data, write)
        ctx.set(bus.w_mask, mask)
    await ctx.tick()
    ctx.set(bus.r_stb, 0)
    ctx.set(bus.w_stb, 0)
    return ctx.get(bus.r_data), ctx.get(bus.err)


def test_field_semantics_amaranth_sim():
    def regs():
        return {
            "rw": csr.Register({"a": csr.Field(csr.RW, 16, init=0xABCD), "b": csr.Field(csr.RW, 8, offset=24)}),
            "ev": csr.Register({"c": csr.Field(csr.W1C, 4), "s": csr.Field(csr.W1S, 4)}),
            "go": csr.Register({"p": csr.Field(csr.Pulse, 2)}),
        }

    async def tb(ctx, bus, r):
        assert await _access(ctx, bus, 0) == (0xABCD, 0)
        await _access(ctx, bus, 0, write=0x12345678, mask=0xFF0000FF)   # byte lanes 0 and 3
        assert (await _access(ctx, bus, 0))[0] == 0x1200AB78
        # W1C: a hardware set in the same cycle as a clearing write wins.
        ctx.set(r["ev"].f.c.set, 0b0011)
        await ctx.tick()
        ctx.set(r["ev"].f.c.set, 0b0100)
        await _access(ctx, bus, 1, write=0b0111)
        ctx.set(r["ev"].f.c.set, 0)
        assert (await _access(ctx, bus, 1))[0] & 0xF == 0b0100
        ctx.set(r["ev"].f.c.clr, 1)
        await ctx.tick()
        ctx.set(r["ev"].f.c.clr, 0)
        assert (await _access(ctx, bus, 1))[0] & 0xF == 0
        # W1S
        await _access(ctx, bus, 1, write=0b1001 << 4)
        assert ctx.get(r["ev"].f.s.data) == 0b1001
        ctx.set(r["ev"].f.s.clr, 0b0001)
        await ctx.tick()
        ctx.set(r["ev"].f.s.clr, 0)
        assert ctx.get(r["ev"].f.s.data) == 0b1000
        # Pulse: high only in the strobe cycle, masked by byte lanes.
        ctx.set(bus.addr, 2)
        ctx.set(bus.w_stb, 1)
        ctx.set(bus.w_data, 0b11)
        ctx.set(bus.w_mask, 0xFFFFFFFF)
        assert ctx.get(r["go"].f.p.pulse) == 0b11
        await ctx.tick()
        ctx.set(bus.w_stb, 0)
        assert ctx.get(r["go"].f.p.pulse) == 0
        await _access(ctx, bus, 2, write=0b11, mask=0xFFFFFF00)
        assert (await _access(ctx, bus, 2))[0] == 0
        # Unmapped word: err, reads 0
        assert await _access(ctx, bus, 9) == (0, 1)
        assert (await _access(ctx, bus, 9, write=1))[1] == 1

    _bus_sim(regs, tb)


@pytest.mark.sim
def test_csr_axilite_cocotb():
    from amaranth.back import verilog

    from sim.runner import run_cocotb, write_verilog
    from sim.tb_csr import csr_demo

    src = write_verilog(verilog.convert(csr_demo(), name="csr_demo"), "csr_demo")
    run_cocotb(sources=[src], toplevel="csr_demo", test_module="tb_csr", build_name="csr_demo",
               test_dir=REPO / "sim")
