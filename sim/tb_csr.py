"""cocotb bench for the CSR framework (rtl/csr.py) behind the AXI4-Lite bridge (rtl/axilite.py).

The device under test is :func:`csr_demo`, a small peripheral in the
amaranth-soc idiom with one register of every access mode, driven through
cocotbext-axi's AxiLiteMaster with random pauses on all five channels. The
`CsrPort` helper here is shared with sim/tb_cmdproc.py.

Sync ports are clk/rst; the bench drives and samples on falling edges.
"""

from __future__ import annotations

import logging
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly

CLOCK_NS = 10
OKAY, SLVERR = 0, 2


# ---------------------------------------------------------------------------
# The device (elaborated on the pytest side)
# ---------------------------------------------------------------------------

def csr_demo():
    """A peripheral exercising every field action, for the CSR bench."""
    from amaranth.hdl import Module, Signal
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out, connect, flipped

    from rtl import csr
    from rtl.axilite import AxiLiteSignature, AxiLiteToCsr

    class CsrDemo(wiring.Component):
        class Scratch(csr.Register, access="rw"):
            def __init__(self):
                super().__init__({"value": csr.Field(csr.RW, 32, init=0x12345678)})

        class Status(csr.Register, access="r"):
            def __init__(self):
                super().__init__({"level": csr.Field(csr.R, 8), "pulses": csr.Field(csr.R, 8),
                                  "reads": csr.Field(csr.R, 8)})

        class Events(csr.Register, access="rw"):
            def __init__(self):
                super().__init__({"flags": csr.Field(csr.W1C, 4), "arm": csr.Field(csr.W1S, 4, offset=8)})

        class Command(csr.Register, access="w"):
            def __init__(self):
                super().__init__({"go": csr.Field(csr.Pulse, 4)})

        class Bytes(csr.Register, access="rw"):
            def __init__(self):
                super().__init__({f"b{i}": csr.Field(csr.RW, 8, init=0x11 * (i + 1)) for i in range(4)})

        class Far(csr.Register, access="rw"):
            def __init__(self):
                super().__init__({"value": csr.Field(csr.RW, 16, init=0xBEEF)})

        def __init__(self):
            regs = csr.Builder(addr_width=8)
            self._scratch = regs.add("Scratch", self.Scratch())
            self._status = regs.add("Status", self.Status())
            self._events = regs.add("Events", self.Events())
            self._command = regs.add("Command", self.Command())
            self._bytes = regs.add("Bytes", self.Bytes())
            self._far = regs.add("Far", self.Far(), offset=0x80)
            self._bridge = csr.Bridge(regs)
            super().__init__({
                "csr": In(AxiLiteSignature(addr_width=8)),
                "level": In(8), "flags_set": In(4), "arm_clr": In(4),
                "go": Out(4), "flags": Out(4), "arm": Out(4),
            })

        def elaborate(self, platform):
            m = Module()
            m.submodules.axil = axil = AxiLiteToCsr(8)
            m.submodules.bridge = self._bridge
            connect(m, flipped(self.csr), axil.axil)
            connect(m, axil.csr, self._bridge.bus)
            pulses, reads = Signal(8), Signal(8)
            st = self._status.f
            with m.If(self.go != 0):
                m.d.sync += pulses.eq(pulses + 1)
            with m.If(st.level.r_stb):
                m.d.sync += reads.eq(reads + 1)
            m.d.comb += [
                st.level.r_data.eq(self.level), st.pulses.r_data.eq(pulses), st.reads.r_data.eq(reads),
                self._events.f.flags.set.eq(self.flags_set), self._events.f.arm.clr.eq(self.arm_clr),
                self.go.eq(self._command.f.go.pulse),
                self.flags.eq(self._events.f.flags.data), self.arm.eq(self._events.f.arm.data),
            ]
            return m

    return CsrDemo()


DEMO = {"Scratch": 0x00, "Status": 0x04, "Events": 0x08, "Command": 0x0C, "Bytes": 0x10, "Far": 0x80}


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------

class CsrPort:
    """32-bit register access through cocotbext-axi's AxiLiteMaster on the `csr__*` ports."""

    def __init__(self, dut, prefix: str = "csr"):
        from cocotbext.axi import AxiLiteBus, AxiLiteMaster
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, prefix, bus_separator="__"), dut.clk, dut.rst)
        for side in (self.axil.write_if, self.axil.read_if):
            side.log.setLevel(logging.WARNING)    # one line per access drowns the bench's own messages

    async def read(self, addr: int, expect_resp: int = OKAY) -> int:
        r = await self.axil.read(addr, 4)
        assert int(r.resp) == expect_resp, f"read 0x{addr:03x}: resp {int(r.resp)}, expected {expect_resp}"
        return int.from_bytes(r.data, "little")

    async def write(self, addr: int, value: int, expect_resp: int = OKAY) -> None:
        r = await self.axil.write(addr, (value & 0xFFFFFFFF).to_bytes(4, "little"))
        assert int(r.resp) == expect_resp, f"write 0x{addr:03x}: resp {int(r.resp)}, expected {expect_resp}"

    async def write_bytes(self, addr: int, data: bytes, expect_resp: int = OKAY) -> None:
        r = await self.axil.write(addr, data)
        assert int(r.resp) == expect_resp, f"write 0x{addr:03x}: resp {int(r.resp)}, expected {expect_resp}"

    def set_pauses(self, rng: random.Random | None, prob: float = 0.3) -> None:
        """Random pauses on every channel (None: none)."""
        chans = [self.axil.write_if.aw_channel, self.axil.write_if.w_channel, self.axil.write_if.b_channel,
                 self.axil.read_if.ar_channel, self.axil.read_if.r_channel]
        for ch in chans:
            if rng is None:
                ch.clear_pause_generator()
                ch.pause = False      # clearing the generator keeps its last value
            else:
                seed = rng.randrange(1 << 30)
                ch.set_pause_generator(_pauses(random.Random(seed), prob))


def _pauses(rng: random.Random, prob: float):
    while True:
        yield rng.random() < prob


async def reset(dut, cycles: int = 4) -> None:
    dut.rst.value = 1
    for _ in range(cycles):
        await FallingEdge(dut.clk)
    dut.rst.value = 0
    await FallingEdge(dut.clk)


async def cycles(dut, n: int) -> None:
    for _ in range(n):
        await FallingEdge(dut.clk)


def start_clock(dut) -> None:
    Clock(dut.clk, CLOCK_NS, unit="ns").start()


# ---------------------------------------------------------------------------
# The CSR bench
# ---------------------------------------------------------------------------

async def _setup(dut) -> CsrPort:
    start_clock(dut)
    for s in (dut.level, dut.flags_set, dut.arm_clr):
        s.value = 0
    port = CsrPort(dut)
    await reset(dut)
    return port


@cocotb.test(timeout_time=200, timeout_unit="us")
async def reset_values_and_rw(dut):
    port = await _setup(dut)
    assert await port.read(DEMO["Scratch"]) == 0x12345678
    assert await port.read(DEMO["Bytes"]) == 0x44332211
    assert await port.read(DEMO["Far"]) == 0xBEEF
    assert await port.read(DEMO["Command"]) == 0
    await port.write(DEMO["Scratch"], 0xCAFEF00D)
    assert await port.read(DEMO["Scratch"]) == 0xCAFEF00D
    # Byte strobes: one byte, then the upper half.
    await port.write_bytes(DEMO["Bytes"] + 1, b"\xAA")
    assert await port.read(DEMO["Bytes"]) == 0x4433AA11
    await port.write_bytes(DEMO["Bytes"] + 2, b"\xBB\xCC")
    assert await port.read(DEMO["Bytes"]) == 0xCCBBAA11
    # Bits above a field's width read 0 and are not stored.
    await port.write(DEMO["Far"], 0xFFFF1234)
    assert await port.read(DEMO["Far"]) == 0x1234


@cocotb.test(timeout_time=200, timeout_unit="us")
async def read_only_and_read_strobe(dut):
    port = await _setup(dut)
    dut.level.value = 0x5A
    await cycles(dut, 2)
    word = await port.read(DEMO["Status"])
    assert word & 0xFF == 0x5A and (word >> 16) & 0xFF == 0, hex(word)
    # A write to a read-only register is accepted and changes nothing.
    await port.write(DEMO["Status"], 0xFFFFFFFF)
    # Each read of Status strobes r_stb once: `reads` shows the count before the read.
    seen = [(await port.read(DEMO["Status"]) >> 16) & 0xFF for _ in range(4)]
    assert seen == [1, 2, 3, 4], seen
    await FallingEdge(dut.clk)
    dut.level.value = 0xC3
    await cycles(dut, 1)
    assert (await port.read(DEMO["Status"])) & 0xFF == 0xC3


@cocotb.test(timeout_time=200, timeout_unit="us")
async def w1c_w1s_pulse(dut):
    port = await _setup(dut)
    ev = DEMO["Events"]
    # W1C: hardware sets, software clears with ones.
    dut.flags_set.value = 0b0101
    await FallingEdge(dut.clk)
    dut.flags_set.value = 0
    await FallingEdge(dut.clk)
    assert int(dut.flags.value) == 0b0101
    assert (await port.read(ev)) & 0xF == 0b0101
    await port.write(ev, 0b0001)
    assert (await port.read(ev)) & 0xF == 0b0100
    await port.write(ev, 0)
    assert (await port.read(ev)) & 0xF == 0b0100
    await port.write(ev, 0b1111)
    assert (await port.read(ev)) & 0xF == 0
    # W1S: software sets with ones, hardware clears.
    await port.write(ev, 0b0011 << 8)
    assert (await port.read(ev)) >> 8 & 0xF == 0b0011
    await FallingEdge(dut.clk)      # the AXI master returns in a read-only phase: drive after an edge
    dut.arm_clr.value = 0b0001
    await FallingEdge(dut.clk)
    dut.arm_clr.value = 0
    await FallingEdge(dut.clk)
    assert (await port.read(ev)) >> 8 & 0xF == 0b0010
    await port.write(ev, 0b1000 << 8)
    assert (await port.read(ev)) >> 8 & 0xF == 0b1010
    # PULSE: exactly one cycle of the written ones, reads as 0.
    pulses = []

    async def watch():
        while True:
            await FallingEdge(dut.clk)
            await ReadOnly()
            v = int(dut.go.value)
            if v:
                pulses.append(v)

    w = cocotb.start_soon(watch())
    await port.write(DEMO["Command"], 0b0110)
    await port.write(DEMO["Command"], 0b1001)
    await port.write(DEMO["Command"], 0)
    await cycles(dut, 3)
    w.cancel()
    assert pulses == [0b0110, 0b1001], pulses
    assert await port.read(DEMO["Command"]) == 0
    assert (await port.read(DEMO["Status"]) >> 8) & 0xFF == 2


@cocotb.test(timeout_time=200, timeout_unit="us")
async def unmapped_addresses_slverr(dut):
    port = await _setup(dut)
    for addr in (0x14, 0x18, 0x7C, 0x84, 0xFC):
        assert await port.read(addr, expect_resp=SLVERR) == 0
        await port.write(addr, 0xFFFFFFFF, expect_resp=SLVERR)
    assert await port.read(DEMO["Scratch"]) == 0x12345678
    assert await port.read(DEMO["Far"]) == 0xBEEF
    assert (await port.read(DEMO["Events"])) & 0xF0F == 0


@cocotb.test(timeout_time=2000, timeout_unit="us")
async def random_traffic_with_pauses(dut):
    """Random reads and writes, sequential and overlapped, with every channel randomly paused.

    Checks the data against a model and that AW-before-W, W-before-AW and
    same-cycle handshakes all happened."""
    port = await _setup(dut)
    rng = random.Random(1234)
    model = {"Scratch": 0x12345678, "Bytes": 0x44332211, "Far": 0xBEEF}
    widths = {"Scratch": 0xFFFFFFFF, "Bytes": 0xFFFFFFFF, "Far": 0xFFFF}
    order = {"aw_first": 0, "w_first": 0, "same": 0}
    aw_cycle, w_cycle = [], []

    async def watch():
        cycle = 0
        while True:
            await FallingEdge(dut.clk)
            await ReadOnly()
            if int(dut.csr__awvalid.value) and int(dut.csr__awready.value):
                aw_cycle.append(cycle)
            if int(dut.csr__wvalid.value) and int(dut.csr__wready.value):
                w_cycle.append(cycle)
            cycle += 1

    w = cocotb.start_soon(watch())
    for phase in range(3):
        port.set_pauses(rng, prob=[0.2, 0.5, 0.7][phase])
        for _ in range(40):
            name = rng.choice(list(model))
            if rng.random() < 0.5:
                v = rng.randrange(1 << 32)
                await port.write(DEMO[name], v)
                model[name] = v & widths[name]
            else:
                assert await port.read(DEMO[name]) == model[name], name
        # Overlapped: a write to one register and reads of the others in flight together.
        for _ in range(20):
            wname = rng.choice(list(model))
            v = rng.randrange(1 << 32)
            others = [n for n in model if n != wname]
            ev_w = port.axil.init_write(DEMO[wname], v.to_bytes(4, "little"))
            ev_r = [port.axil.init_read(DEMO[n], 4) for n in others]
            bad = port.axil.init_read(0x40, 4)
            await ev_w.wait()
            assert int(ev_w.data.resp) == OKAY
            model[wname] = v & widths[wname]
            for n, ev in zip(others, ev_r):
                await ev.wait()
                assert int(ev.data.resp) == OKAY
                assert int.from_bytes(ev.data.data, "little") == model[n], n
            await bad.wait()
            assert int(bad.data.resp) == SLVERR
    port.set_pauses(None)
    await cycles(dut, 2)
    w.cancel()
    for a, b in zip(aw_cycle, w_cycle):
        order["aw_first" if a < b else "w_first" if b < a else "same"] += 1
    dut._log.info(f"write handshake orders: {order}")
    assert len(aw_cycle) == len(w_cycle)
    assert all(order.values()), f"not every AW/W order was exercised: {order}"
