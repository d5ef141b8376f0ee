"""cocotb bench for hp_ddr_model alone (one port), driven by cocotbext-axi's AxiMaster.

A third-party AXI master checks the model: reads and writes of random sizes
land exactly (with strobes), an image loads and dumps, error windows answer
SLVERR/DECERR, the read latency and the bandwidth cap are what was set, and
illegal bursts are counted as protocol errors.

The pytest side passes the model config as JSON in DDR_CONFIG and a scratch
directory in DDR_WORKDIR.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, ReadOnly, RisingEdge, with_timeout
from cocotbext.axi import AxiBus, AxiMaster, AxiResp

from sim.ddr import DdrModelConfig, DdrModelHandle, write_image

PERIOD_NS = 4


class TB:
    def __init__(self, dut, max_burst_len=16):
        self.dut = dut
        self.cfg = DdrModelConfig.from_json(os.environ["DDR_CONFIG"])
        self.work = Path(os.environ["DDR_WORKDIR"])
        self.model = DdrModelHandle(dut.ddr, self.cfg, clock=dut.clk)
        self.axi = AxiMaster(AxiBus.from_prefix(dut, "s_axi"), dut.clk, dut.rst, max_burst_len=max_burst_len)
        logging.getLogger("cocotb.ddr_top.s_axi").setLevel(logging.WARNING)

    async def start(self, **changes):
        if not getattr(self.dut, "_clock_started", False):
            Clock(self.dut.clk, PERIOD_NS, unit="ns").start()
            self.dut._clock_started = True
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 3)
        self.model.configure(**changes)
        await ClockCycles(self.dut.clk, 2)
        self.dut.rst.value = 0
        await ClockCycles(self.dut.clk, 2)
        await self.model.clear_stats()


def with_timeout_cycles(n):
    return n * PERIOD_NS, "ns"


@cocotb.test()
async def read_write_exact(dut):
    """Random writes (random strobes via unaligned byte writes) and reads against a Python copy."""
    tb = TB(dut)
    await tb.start(gap_rate=0.25)
    rng = random.Random(7)
    ref = bytearray(1 << 16)
    base = 0x10000
    for _ in range(40):
        off = rng.randrange(0, len(ref) - 600)
        n = rng.randrange(1, 600)
        data = bytes(rng.getrandbits(8) for _ in range(n))
        ref[off:off + n] = data
        res = await with_timeout(tb.axi.write(base + off, data), *with_timeout_cycles(20000))
        assert res.resp == AxiResp.OKAY
    for _ in range(40):
        off = rng.randrange(0, len(ref) - 600)
        n = rng.randrange(1, 600)
        res = await with_timeout(tb.axi.read(base + off, n), *with_timeout_cycles(20000))
        assert res.resp == AxiResp.OKAY
        assert bytes(res.data) == bytes(ref[off:off + n]), f"read at {base + off:#x}+{n} differs"
    s = tb.model.stats()
    assert s["protocol_errors"] == 0, s
    assert s["bytes_written"] > 0 and s["bytes_read"] > 0


@cocotb.test()
async def image_load_and_dump(dut):
    """An image written by sim/ddr.py loads at run time and reads back; a dump returns it."""
    tb = TB(dut)
    await tb.start()
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, 4096 + 48, dtype=np.uint8)
    b = rng.integers(0, 256, 512, dtype=np.uint8)
    path = write_image(tb.work / "image.hex", [(0x200000, a), (0x300010, b)], tb.cfg)
    await tb.model.load(path)
    res = await with_timeout(tb.axi.read(0x200000, a.size), *with_timeout_cycles(50000))
    assert bytes(res.data) == a.tobytes()
    res = await with_timeout(tb.axi.read(0x300010, b.size), *with_timeout_cycles(50000))
    assert bytes(res.data) == b.tobytes()
    # write over part of it and dump
    await tb.axi.write(0x200100, b"\xAA" * 40)
    expect = bytearray(a.tobytes())
    expect[0x100:0x100 + 40] = b"\xAA" * 40
    got = await tb.model.dump(tb.work / "dump.hex", 0x200000, a.size)
    assert got == bytes(expect)


@cocotb.test()
async def error_windows(dut):
    """SLVERR and DECERR windows, and DECERR outside the modelled memory."""
    tb = TB(dut)
    await tb.start(slverr_window=(0x40000, 0x41000), decerr_window=(0x50000, 0x50100))
    ok = await tb.axi.read(0x3FF00, 256)
    assert ok.resp == AxiResp.OKAY
    r = await with_timeout(tb.axi.read(0x40F00, 512), *with_timeout_cycles(20000))     # tail in the window
    assert r.resp == AxiResp.SLVERR
    r = await with_timeout(tb.axi.read(0x50080, 64), *with_timeout_cycles(20000))
    assert r.resp == AxiResp.DECERR
    r = await with_timeout(tb.axi.read(tb.cfg.mem_base + tb.cfg.mem_bytes, 64), *with_timeout_cycles(20000))
    assert r.resp == AxiResp.DECERR
    w = await with_timeout(tb.axi.write(0x40000, b"x" * 64), *with_timeout_cycles(20000))
    assert w.resp == AxiResp.SLVERR
    w = await with_timeout(tb.axi.write(0x500F0, b"y" * 32), *with_timeout_cycles(20000))
    assert w.resp == AxiResp.DECERR
    # nothing was written in the error window
    tb.model.configure(slverr_window=(0, 0), decerr_window=(0, 0))
    await RisingEdge(dut.clk)
    r = await tb.axi.read(0x40000, 64)
    assert r.resp == AxiResp.OKAY and bytes(r.data) != b"x" * 64
    assert tb.model.stats()["error_responses"] >= 4


@cocotb.test()
async def latency_is_as_set(dut):
    """The first R beat comes cfg_latency cycles after the AR handshake."""
    tb = TB(dut)
    for latency in (5, 30, 77):
        await tb.start(read_latency=latency)
        ar_cycle = r_cycle = None
        cycle = 0
        task = cocotb.start_soon(tb.axi.read(0x1000, 16))
        while r_cycle is None and cycle < 1000:
            await RisingEdge(dut.clk)
            await ReadOnly()
            if ar_cycle is None and dut.s_axi_arvalid.value == 1 and dut.s_axi_arready.value == 1:
                ar_cycle = cycle
            if dut.s_axi_rvalid.value == 1:
                r_cycle = cycle
            cycle += 1
        await task
        # handshake seen after edge i happens at edge i + 1; rvalid seen after edge r was set at edge r
        assert r_cycle - (ar_cycle + 1) == latency, (latency, ar_cycle, r_cycle)


@cocotb.test()
async def cap_limits_one_port(dut):
    """At a cap of 4 B/cycle a 128-bit port gets one beat every 4 cycles."""
    tb = TB(dut, max_burst_len=16)
    await tb.start(cap_bytes_per_cycle=4.0)
    n = 16 * 1024
    await with_timeout(tb.axi.read(0x0, n), *with_timeout_cycles(200000))
    s = tb.model.stats()
    span = s["last_r_cycle"] - s["first_ar_cycle"]
    rate = n / span
    assert 3.8 <= rate <= 4.05, (rate, s)


@cocotb.test()
async def protocol_errors_are_flagged(dut):
    """A 64-beat burst and a 4 KiB crossing are counted (and still answered)."""
    tb = TB(dut, max_burst_len=64)
    await tb.start()
    await with_timeout(tb.axi.read(0x8000, 64 * 16), *with_timeout_cycles(20000))
    assert tb.model.stats()["protocol_errors"] >= 1


@cocotb.test()
async def idle_for_plusargs(dut):
    """Runs a few cycles only: the pytest side checks +ddr_init (time 0) and +ddr_dump ($finish)."""
    Clock(dut.clk, PERIOD_NS, unit="ns").start()
    dut.rst.value = 1
    await ClockCycles(dut.clk, 3)
