"""cocotb benches for rtl/axi.py's masters.

Two toplevels (see sim/axi_tops.py):

* ``axi_masters_top``: a read and a write master on one AXI4 port ``hp0``,
  checked against cocotbext-axi's `AxiRam` (a third-party slave) with random
  pauses on all five channels, random consumer/producer gaps, random command
  sizes and addresses including 4 KiB crossings; SLVERR handling.
* ``ddr_read_bench``: read masters on every port of hp_ddr_model with hardware
  checksum sinks: exact data with back-pressure, throughput under the cap,
  the shared HP1/HP2 port, latency-bound single-outstanding reads, SLVERR and
  DECERR, and writes checked by dumping the model's memory.

Every wait has a cycle limit. The pytest side selects a test with
COCOTB_TEST_FILTER and passes AXI_PARAMS (JSON) and AXI_WORKDIR.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge, Timer

from rtl.axi import AXI_PAGE_BYTES, RESP_DECERR, RESP_SLVERR, split_bursts
from sim.axi_tops import checksum
from sim.ddr import DdrModelConfig, DdrModelHandle, write_image
from sw.contract.errors import DeviceError

PERIOD_NS = 4
BEAT = 16


def params() -> dict:
    return json.loads(os.environ.get("AXI_PARAMS", "{}"))


def workdir() -> Path:
    return Path(os.environ.get("AXI_WORKDIR", "."))


async def wait_until(clk, cond, limit: int, what: str, poll: int = 16) -> int:
    """Poll `cond` every `poll` cycles; fail after `limit` cycles (the no-hang guarantee).

    A Timer, not ClockCycles: ClockCycles wakes Python on every edge, a Timer
    lets Verilator run `poll` cycles on its own.
    """
    waited = 0
    while not cond():
        if waited >= limit:
            raise DeviceError(f"timeout after {limit} cycles waiting for {what}")
        await Timer(poll * PERIOD_NS, "ns")
        waited += poll
    return waited


async def reset(dut, cycles=4):
    dut.rst.value = 1
    await ClockCycles(dut.clk, cycles)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    await FallingEdge(dut.clk)


def pause_pattern(rng: random.Random, rate: float):
    while True:
        yield rng.random() < rate


def word_bytes(mem: bytes, addr: int) -> int:
    return int.from_bytes(mem[addr:addr + BEAT], "little")


class StreamDriver:
    """Drives a valid/ready stream on falling edges, with random idle cycles."""

    def __init__(self, clk, prefix_handle_valid, handle_payload, handle_ready, rng=None, idle=0.0):
        self.clk, self.valid, self.payload, self.ready = clk, prefix_handle_valid, handle_payload, handle_ready
        self.rng = rng or random.Random(0)
        self.idle = idle

    async def send(self, values, limit=200000):
        self.valid.value = 0
        await FallingEdge(self.clk)
        for v in values:
            while self.rng.random() < self.idle:
                await FallingEdge(self.clk)
            self.payload.value = v
            self.valid.value = 1
            waited = 0
            while True:
                await RisingEdge(self.clk)
                took = int(self.ready.value)
                await FallingEdge(self.clk)
                if took:
                    break
                waited += 1
                if waited > limit:
                    raise DeviceError("stream driver: no ready for too long")
            self.valid.value = 0


def pack_cmd(addr: int, beats: int, addr_width: int = 40) -> int:
    return addr | (beats << addr_width)


# ===========================================================================
# axi_masters_top + AxiRam
# ===========================================================================

class RamTB:
    def __init__(self, dut, *, pause=0.3, mem_size=1 << 22):
        from cocotbext.axi import AxiBus, AxiRam
        self.dut = dut
        self.p = params()
        self.rng = random.Random(self.p.get("seed", 1))
        Clock(dut.clk, PERIOD_NS, unit="ns").start()
        self.ram = AxiRam(AxiBus.from_prefix(dut, "hp0", bus_separator="__"), dut.clk, dut.rst, size=mem_size)
        for name in ("cocotb.axi_masters_top.hp0",):
            logging.getLogger(name).setLevel(logging.WARNING)
        prng = random.Random(self.rng.random())
        self.ram.read_if.ar_channel.set_pause_generator(pause_pattern(prng, pause))
        self.ram.read_if.r_channel.set_pause_generator(pause_pattern(prng, pause))
        self.ram.write_if.aw_channel.set_pause_generator(pause_pattern(prng, pause))
        self.ram.write_if.w_channel.set_pause_generator(pause_pattern(prng, pause))
        self.ram.write_if.b_channel.set_pause_generator(pause_pattern(prng, pause))
        for sig in ("rd_cmd__valid", "rd_data__ready", "wr_cmd__valid", "wr_data__valid", "rd_clear", "wr_clear"):
            getattr(dut, sig).value = 0
        self.max_outstanding = self.p.get("max_outstanding", 8)
        self.max_burst = self.p.get("max_burst", 16)
        self.protocol = {"ar": 0, "aw": 0, "max_reads_in_flight": 0, "max_writes_in_flight": 0}
        self.violations: list[str] = []

    async def monitor(self):
        """Per-cycle AXI rule checks on hp0: burst length, 4 KiB, size/type, outstanding limit."""
        d = self.dut
        reads = writes = 0
        while True:
            await RisingEdge(d.clk)
            if int(d.rst.value):
                reads = writes = 0
                continue
            if int(d.hp0__arvalid.value) and int(d.hp0__arready.value):
                self._check_burst("AR", int(d.hp0__araddr.value), int(d.hp0__arlen.value),
                                  int(d.hp0__arsize.value), int(d.hp0__arburst.value))
                reads += 1
                self.protocol["ar"] += 1
            if int(d.hp0__rvalid.value) and int(d.hp0__rready.value) and int(d.hp0__rlast.value):
                reads -= 1
            if int(d.hp0__awvalid.value) and int(d.hp0__awready.value):
                self._check_burst("AW", int(d.hp0__awaddr.value), int(d.hp0__awlen.value),
                                  int(d.hp0__awsize.value), int(d.hp0__awburst.value))
                writes += 1
                self.protocol["aw"] += 1
            if int(d.hp0__bvalid.value) and int(d.hp0__bready.value):
                writes -= 1
            self.protocol["max_reads_in_flight"] = max(self.protocol["max_reads_in_flight"], reads)
            self.protocol["max_writes_in_flight"] = max(self.protocol["max_writes_in_flight"], writes)
            if reads > self.max_outstanding or writes > self.max_outstanding:
                self.violations.append(f"outstanding {reads} reads / {writes} writes")

    def _check_burst(self, ch, addr, alen, size, burst):
        if alen >= self.max_burst:
            self.violations.append(f"{ch} burst of {alen + 1} beats at {addr:#x}")
        if addr % BEAT or size != 4 or burst != 1:
            self.violations.append(f"{ch} addr {addr:#x} size {size} burst {burst}")
        if addr // AXI_PAGE_BYTES != (addr + (alen + 1) * BEAT - 1) // AXI_PAGE_BYTES:
            self.violations.append(f"{ch} burst at {addr:#x} of {alen + 1} beats crosses 4 KiB")

    async def start(self):
        cocotb.start_soon(self.monitor())
        await reset(self.dut)

    async def consume(self, n_beats, ready_rate=0.7, limit=400000):
        """Take `n_beats` from rd_data with random ready; returns [(data, last)]."""
        d = self.dut
        got = []
        cycles = 0
        while len(got) < n_beats:
            await FallingEdge(d.clk)
            ready = self.rng.random() < ready_rate
            d.rd_data__ready.value = int(ready)
            if ready and int(d.rd_data__valid.value):
                v = int(d.rd_data__payload.value)
                got.append((v & ((1 << 128) - 1), v >> 128))
            cycles += 1
            if cycles > limit:
                raise DeviceError(f"read data: {len(got)} of {n_beats} beats after {limit} cycles")
        await FallingEdge(d.clk)
        d.rd_data__ready.value = 0
        return got


def random_commands(rng: random.Random, n: int, span: int, max_beats: int) -> list[tuple[int, int]]:
    """(addr, beats) with a third starting 0..8 beats before a 4 KiB boundary."""
    out = []
    for _ in range(n):
        beats = rng.choice([1, 2, 3, 15, 16, 17, 31, 33, rng.randrange(1, max_beats + 1)])
        if rng.random() < 0.35:
            page = rng.randrange(1, span // AXI_PAGE_BYTES - 2)
            addr = page * AXI_PAGE_BYTES - BEAT * rng.randrange(0, 9)
        else:
            addr = BEAT * rng.randrange(0, (span - max_beats * BEAT) // BEAT)
        out.append((addr, beats))
    return out


@cocotb.test()
async def ram_read_random(dut):
    """Random read commands against AxiRam with random pauses: data and `last` exact, AXI rules kept."""
    tb = RamTB(dut, pause=tb_pause())
    await tb.start()
    span = 1 << 20
    image = bytes(np.random.default_rng(tb.p.get("seed", 1)).integers(0, 256, span, dtype=np.uint8))
    tb.ram.write(0, image)
    cmds = random_commands(tb.rng, tb.p.get("commands", 60), span, tb.p.get("max_beats", 300))
    expect = []
    for addr, beats in cmds:
        for k in range(beats):
            expect.append((word_bytes(image, addr + k * BEAT), int(k == beats - 1)))
    drv = StreamDriver(dut.clk, dut.rd_cmd__valid, dut.rd_cmd__payload, dut.rd_cmd__ready, tb.rng, idle=0.2)
    sender = cocotb.start_soon(drv.send([pack_cmd(a, b) for a, b in cmds]))
    got = await tb.consume(len(expect), ready_rate=tb.p.get("ready_rate", 0.7))
    await sender
    for i, (g, e) in enumerate(zip(got, expect)):
        assert g == e, f"beat {i}: got data {g[0]:#x} last {g[1]}, expected {e[0]:#x} last {e[1]}"
    await wait_until(dut.clk, lambda: not int(dut.rd_busy.value), 1000, "read master idle")
    assert not tb.violations, tb.violations[:5]
    assert int(dut.rd_error.value) == 0
    assert int(dut.rd_beats_received.value) == len(expect)
    n_bursts = sum(len(split_bursts(a, b, max_burst=tb.max_burst)) for a, b in cmds)
    assert tb.protocol["ar"] == n_bursts
    assert 1 <= tb.protocol["max_reads_in_flight"] <= tb.max_outstanding
    dut._log.info("reads: %d commands, %d bursts, %d beats, max %d in flight, %s",
                  len(cmds), n_bursts, len(expect), tb.protocol["max_reads_in_flight"], tb.protocol)


def tb_pause() -> float:
    return params().get("pause", 0.3)


def random_write_job(rand: random.Random, rng: np.random.Generator, expect: bytearray, base: int,
                     commands: int, max_beats: int, full_strobe: float):
    """Random non-overlapping write commands over `expect` (the image at `base`), so the expected image
    does not depend on their order, and their data words (128 data bits, 16 strobe bits above them;
    all strobes set with probability `full_strobe`). Applies the writes to `expect`; returns
    (commands as (address, beats), data words)."""
    cmds, used, words = [], set(), []
    for off, beats in random_commands(rand, commands, len(expect), max_beats):
        span = set(range(off // BEAT, off // BEAT + beats))
        if not span & used:
            used |= span
            cmds.append((base + off, beats))
    for addr, beats in cmds:
        for k in range(beats):
            data = int.from_bytes(rng.integers(0, 256, BEAT, dtype=np.uint8).tobytes(), "little")
            strb = 0xFFFF if rand.random() < full_strobe else rand.getrandbits(16)
            words.append(data | (strb << 128))
            off, raw = addr - base + k * BEAT, data.to_bytes(BEAT, "little")
            for i in range(BEAT):
                if strb >> i & 1:
                    expect[off + i] = raw[i]
    return cmds, words


@cocotb.test()
async def ram_write_random(dut):
    """Random write commands and data (random strobes, random producer gaps) land exactly in AxiRam."""
    tb = RamTB(dut, pause=tb_pause())
    await tb.start()
    span = 1 << 20
    rng = np.random.default_rng(tb.p.get("seed", 1) + 5)
    before = bytes(rng.integers(0, 256, span, dtype=np.uint8))
    tb.ram.write(0, before)
    expect = bytearray(before)
    cmds, data_words = random_write_job(tb.rng, rng, expect, 0, tb.p.get("commands", 40),
                                        tb.p.get("max_beats", 200), full_strobe=0.7)
    cmd_drv = StreamDriver(dut.clk, dut.wr_cmd__valid, dut.wr_cmd__payload, dut.wr_cmd__ready, tb.rng, idle=0.1)
    dat_drv = StreamDriver(dut.clk, dut.wr_data__valid, dut.wr_data__payload, dut.wr_data__ready,
                           random.Random(3), idle=tb.p.get("idle", 0.3))
    c = cocotb.start_soon(cmd_drv.send([pack_cmd(a, b) for a, b in cmds]))
    await dat_drv.send(data_words)
    await c
    await ClockCycles(dut.clk, 4)
    await wait_until(dut.clk, lambda: not int(dut.wr_busy.value), 100000, "write master done")
    assert int(dut.wr_error.value) == 0
    assert not tb.violations, tb.violations[:5]
    got = tb.ram.read(0, span)
    if got != bytes(expect):
        bad = next(i for i in range(span) if got[i] != expect[i])
        raise AssertionError(f"memory differs first at {bad:#x}")
    n_bursts = sum(len(split_bursts(a, b, max_burst=tb.max_burst)) for a, b in cmds)
    assert tb.protocol["aw"] == n_bursts
    assert int(dut.wr_bursts_acknowledged.value) == n_bursts
    assert int(dut.wr_beats_written.value) == len(data_words)


@cocotb.test()
async def ram_read_slverr(dut):
    """SLVERR in the middle of a long read: sticky error with resp and burst address, clean stop, clear, reuse."""
    tb = RamTB(dut, pause=0.2)
    await tb.start()
    span = 1 << 20
    image = bytes(np.random.default_rng(9).integers(0, 256, span, dtype=np.uint8))
    tb.ram.write(0, image)
    bad_lo, bad_hi = 0x23450, 0x23460                      # one beat answers SLVERR
    plain_read = tb.ram.read_if._read

    async def failing_read(address, length):
        if bad_lo <= address < bad_hi:
            raise IOError("injected")
        return await plain_read(address, length)
    tb.ram.read_if._read = failing_read

    drv = StreamDriver(dut.clk, dut.rd_cmd__valid, dut.rd_cmd__payload, dut.rd_cmd__ready, tb.rng)
    start = 0x20000
    beats = 2048
    await drv.send([pack_cmd(start, beats)])
    # consume whatever comes (it stops at the error), never more than the command
    got = []
    for _ in range(40000):
        await FallingEdge(dut.clk)
        dut.rd_data__ready.value = 1
        if int(dut.rd_data__valid.value):
            got.append(int(dut.rd_data__payload.value))
        if int(dut.rd_error.value) and not int(dut.rd_busy.value):
            break
    assert int(dut.rd_error.value) == 1, "no error flagged"
    assert not int(dut.rd_busy.value), "master did not drain after the error"
    assert int(dut.rd_error_resp.value) == RESP_SLVERR
    burst = [a for a, n in split_bursts(start, beats) if a <= bad_lo < a + n * BEAT][0]
    assert int(dut.rd_error_addr.value) == burst
    assert len(got) < beats and all(v >> 128 == 0 for v in got)       # no `last` was delivered
    for i, v in enumerate(got):                                       # what came before is exact
        assert v & ((1 << 128) - 1) == word_bytes(image, start + i * BEAT)
    # commands while in error are accepted and dropped, nothing is issued
    ar_before = tb.protocol["ar"]
    await drv.send([pack_cmd(0x1000, 8)])
    await ClockCycles(dut.clk, 100)
    assert tb.protocol["ar"] == ar_before and int(dut.rd_data__valid.value) == 0
    # clear, then a normal command works
    await FallingEdge(dut.clk)
    dut.rd_clear.value = 1
    await FallingEdge(dut.clk)
    dut.rd_clear.value = 0
    await wait_until(dut.clk, lambda: not int(dut.rd_busy.value), 2000, "drain after clear")
    assert int(dut.rd_error.value) == 0
    tb.ram.read_if._read = plain_read
    await drv.send([pack_cmd(0x30000, 40)])
    got = await tb.consume(40, ready_rate=0.8)
    assert [g[0] for g in got] == [word_bytes(image, 0x30000 + k * BEAT) for k in range(40)]
    assert [g[1] for g in got] == [0] * 39 + [1]
    assert not tb.violations, tb.violations[:5]


@cocotb.test()
async def ram_write_slverr(dut):
    """A write burst answered SLVERR: error with resp and address, master drains, clear, next write lands."""
    tb = RamTB(dut, pause=0.2)
    await tb.start()
    plain_write = tb.ram.write_if._write
    bad = 0x8040

    async def failing_write(address, data):
        if address <= bad < address + len(data):
            raise IOError("injected")
        return await plain_write(address, data)
    tb.ram.write_if._write = failing_write
    cmd = StreamDriver(dut.clk, dut.wr_cmd__valid, dut.wr_cmd__payload, dut.wr_cmd__ready, tb.rng)
    dat = StreamDriver(dut.clk, dut.wr_data__valid, dut.wr_data__payload, dut.wr_data__ready, tb.rng)
    beats = 256
    c = cocotb.start_soon(cmd.send([pack_cmd(0x8000, beats)]))
    await dat.send([(k + 1) | (0xFFFF << 128) for k in range(beats)])     # accepted even after the error
    await c
    await wait_until(dut.clk, lambda: int(dut.wr_error.value) and not int(dut.wr_busy.value), 20000,
                     "write error and drain")
    assert int(dut.wr_error_resp.value) == RESP_SLVERR
    assert int(dut.wr_error_addr.value) == 0x8000                       # the first 16-beat burst
    await FallingEdge(dut.clk)
    dut.wr_clear.value = 1
    await FallingEdge(dut.clk)
    dut.wr_clear.value = 0
    await wait_until(dut.clk, lambda: not int(dut.wr_busy.value), 2000, "drain after clear")
    tb.ram.write_if._write = plain_write
    c = cocotb.start_soon(cmd.send([pack_cmd(0x9000, 4)]))
    await dat.send([(0xAB00 + k) | (0xFFFF << 128) for k in range(4)])
    await c
    await ClockCycles(dut.clk, 4)
    await wait_until(dut.clk, lambda: not int(dut.wr_busy.value), 5000, "write done")
    assert int(dut.wr_error.value) == 0
    for k in range(4):
        assert word_bytes(tb.ram.read(0x9000, 64), k * BEAT) == 0xAB00 + k
    assert not tb.violations, tb.violations[:5]


# ===========================================================================
# ddr_read_bench + hp_ddr_model
# ===========================================================================

class DdrTB:
    def __init__(self, dut):
        self.dut = dut
        self.p = params()
        self.cfg = DdrModelConfig.from_json(self.p["ddr"])
        self.ports = self.cfg.ports
        self.model = DdrModelHandle(dut.ddr, self.cfg, clock=dut.clk)
        self.rng = random.Random(self.p.get("seed", 1))
        Clock(dut.clk, PERIOD_NS, unit="ns").start()
        for p in range(self.ports):
            getattr(dut, f"cmd{p}__valid").value = 0
        for sig in ("wr_cmd__valid", "wr_data__valid", "clear", "counters_clear", "sink_gap"):
            getattr(dut, sig).value = 0

    async def start(self, **changes):
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 2)
        self.model.configure(self.cfg.replace(**changes))
        await reset(self.dut)
        await self.model.clear_stats()

    def sig(self, name, p):
        return int(getattr(self.dut, f"{name}{p}").value)

    async def pulse(self, name):
        await FallingEdge(self.dut.clk)
        getattr(self.dut, name).value = 1
        await FallingEdge(self.dut.clk)
        getattr(self.dut, name).value = 0

    def drivers(self, idle=0.0):
        return [StreamDriver(self.dut.clk, getattr(self.dut, f"cmd{p}__valid"),
                             getattr(self.dut, f"cmd{p}__payload"), getattr(self.dut, f"cmd{p}__ready"),
                             random.Random(p + 11), idle=idle) for p in range(self.ports)]

    async def idle(self, limit, what="all masters idle"):
        await wait_until(self.dut.clk, lambda: all(not self.sig("busy", p) for p in range(self.ports)),
                         limit, what, poll=64)


def expected_stream(image: bytes, base: int, cmds):
    words = []
    for addr, beats in cmds:
        off = addr - base
        words.extend(int.from_bytes(image[off + k * BEAT: off + (k + 1) * BEAT], "little") for k in range(beats))
    return words


@cocotb.test()
async def ddr_read_exact(dut):
    """Random commands on every port with model and sink back-pressure: checksums, counts and lasts exact."""
    tb = DdrTB(dut)
    await tb.start(gap_rate=tb.p.get("gap", 0.2))
    dut.sink_gap.value = int(256 * tb.p.get("sink_gap", 0.3))
    span = 1 << 21
    base = tb.cfg.mem_base + 0x100000
    image = np.random.default_rng(5).integers(0, 256, span, dtype=np.uint8).tobytes()
    await tb.model.load(write_image(workdir() / "image.hex", [(base, image)], tb.cfg))
    await tb.pulse("counters_clear")
    all_cmds = []
    for p in range(tb.ports):
        cmds = [(base + a, b) for a, b in random_commands(tb.rng, tb.p.get("commands", 25), span,
                                                           tb.p.get("max_beats", 400))]
        all_cmds.append(cmds)
    tasks = [cocotb.start_soon(d.send([pack_cmd(a, b) for a, b in cmds]))
             for d, cmds in zip(tb.drivers(idle=0.1), all_cmds)]
    for t in tasks:
        await t
    total = sum(b for cmds in all_cmds for _, b in cmds)
    await tb.idle(40 * total + 10000)
    for p, cmds in enumerate(all_cmds):
        words = expected_stream(image, base, cmds)
        assert tb.sig("sink_beats", p) == len(words), f"port {p}: beats"
        assert tb.sig("lasts", p) == len(cmds), f"port {p}: lasts"
        assert tb.sig("sum", p) == checksum(words), f"port {p}: checksum"
        assert tb.sig("error", p) == 0
    s = tb.model.stats()
    assert s["protocol_errors"] == 0, s
    assert s["bytes_read"] == total * BEAT


THROUGHPUT_SCENARIOS = {
    # name: (active ports, model changes)
    "one_port": (1, {}),
    "four_ports": (None, {}),
    "four_ports_outstanding1": (None, {"outstanding": 1}),
    "four_ports_shared_hp12": (None, {"shared_hp12": True}),
    "four_ports_cap40": (None, {"cap_bytes_per_cycle": 40.0}),
    "four_ports_latency100": (None, {"read_latency": 100}),
}


@cocotb.test()
async def ddr_throughput(dut):
    """Long reads on 1..4 ports under several model settings; writes bytes/cycle to AXI_RESULTS."""
    tb = DdrTB(dut)
    beats = tb.p.get("beats", 8192)
    names = tb.p.get("scenarios", list(THROUGHPUT_SCENARIOS))
    results = {}
    for name in names:
        active, changes = THROUGHPUT_SCENARIOS[name]
        active = active or tb.ports
        cfg = tb.cfg.replace(**changes)
        await tb.start(**changes)
        dut.sink_gap.value = 0
        await tb.pulse("counters_clear")
        # All ports start in the same cycle; addresses 1 MiB apart.
        await FallingEdge(dut.clk)
        for p in range(active):
            getattr(dut, f"cmd{p}__payload").value = pack_cmd(tb.cfg.mem_base + p * (1 << 20), beats)
            getattr(dut, f"cmd{p}__valid").value = 1
            assert int(getattr(dut, f"cmd{p}__ready").value) == 1     # idle masters take it at the next edge
        start = int(dut.cycle.value)
        await FallingEdge(dut.clk)
        for p in range(active):
            getattr(dut, f"cmd{p}__valid").value = 0
        await tb.idle(64 * beats + 10000, f"{name}: transfers done")
        end = max(tb.sig("last_cycle", p) for p in range(active))
        cycles = end - start + 1
        nbytes = active * beats * BEAT
        s = tb.model.stats()
        assert s["bytes_read"] == nbytes and s["protocol_errors"] == 0, s
        per_port = []
        for p in range(active):
            assert tb.sig("sink_beats", p) == beats and tb.sig("lasts", p) == 1
            span = tb.sig("last_cycle", p) - start + 1
            per_port.append({"beats": beats, "cycles": span, "bytes_per_cycle": beats * BEAT / span,
                             "stall_memory_cycles": tb.sig("stall_memory", p),
                             "stall_consumer_cycles": tb.sig("stall_consumer", p)})
        results[name] = {
            "ports": active, "beats_per_port": beats, "bytes": nbytes, "cycles": cycles,
            "bytes_per_cycle": nbytes / cycles,
            "sum_of_port_rates": sum(pp["bytes_per_cycle"] for pp in per_port), "peak_bytes_per_cycle": min(cfg.peak_bytes_per_cycle,
                                                                             active * BEAT),
            "latency_bound_bytes_per_cycle": active * cfg.latency_bound_bytes_per_cycle(),
            "ddr": cfg.describe(), "per_port": per_port,
            "token_starved_cycles": s["token_starved_cycles"],
        }
        dut._log.info("%s: %.2f B/cycle over %d cycles", name, nbytes / cycles, cycles)
    out = os.environ.get("AXI_RESULTS")
    if out:
        Path(out).write_text(json.dumps(results, indent=2))


@cocotb.test()
async def ddr_read_errors(dut):
    """SLVERR on port 1 and DECERR on port 2 mid-transfer; ports 0 and 3 unaffected; clear and reuse."""
    tb = DdrTB(dut)
    base = tb.cfg.mem_base
    slv = (base + 0x100000 + 0x3000, base + 0x100000 + 0x3010)
    dec = (base + 0x200000 + 0x5000, base + 0x200000 + 0x5400)
    await tb.start(gap_rate=0.1, gap_ports=0b0110, slverr_window=slv, decerr_window=dec)
    dut.sink_gap.value = 40
    image = np.random.default_rng(2).integers(0, 256, 1 << 22, dtype=np.uint8).tobytes()
    await tb.model.load(write_image(workdir() / "image.hex", [(base, image)], tb.cfg))
    await tb.pulse("counters_clear")
    beats = 4096
    cmds = [(base + p * 0x100000, beats) for p in range(tb.ports)]
    tasks = [cocotb.start_soon(d.send([pack_cmd(a, b)])) for d, (a, b) in zip(tb.drivers(), cmds)]
    for t in tasks:
        await t
    await tb.idle(200000, "all ports done or drained")
    expect = {1: (RESP_SLVERR, slv[0]), 2: (RESP_DECERR, dec[0])}
    for p in range(tb.ports):
        if p in expect:
            resp, bad = expect[p]
            assert tb.sig("error", p) == 1, f"port {p}: no error"
            assert tb.sig("error_resp", p) == resp
            a0 = cmds[p][0]
            burst = [a for a, n in split_bursts(a0, beats) if a <= bad < a + n * BEAT][0]
            assert tb.sig("error_addr", p) == burst
            assert tb.sig("lasts", p) == 0 and tb.sig("sink_beats", p) < beats
        else:
            words = expected_stream(image, base, [cmds[p]])
            assert tb.sig("error", p) == 0 and tb.sig("sum", p) == checksum(words)
    # clear everything, remove the windows, rerun the failed ports exactly
    tb.model.configure(slverr_window=(0, 0), decerr_window=(0, 0))
    await tb.pulse("clear")
    await tb.idle(5000, "drain after clear")
    await tb.pulse("counters_clear")
    for p in range(tb.ports):
        assert tb.sig("error", p) == 0
    tasks = [cocotb.start_soon(d.send([pack_cmd(a, 300)])) for d, (a, _) in zip(tb.drivers(), cmds)]
    for t in tasks:
        await t
    await tb.idle(100000)
    for p in range(tb.ports):
        words = expected_stream(image, base, [(cmds[p][0], 300)])
        assert tb.sig("sum", p) == checksum(words) and tb.sig("lasts", p) == 1


@cocotb.test()
async def ddr_write_and_dump(dut):
    """The write master (port 0) writes with strobes and gaps; the model's dump equals the expected image."""
    tb = DdrTB(dut)
    await tb.start(gap_rate=0.2)
    base = tb.cfg.mem_base + 0x300000
    span = 0x20000
    rng = np.random.default_rng(4)
    before = rng.integers(0, 256, span, dtype=np.uint8).tobytes()
    await tb.model.load(write_image(workdir() / "before.hex", [(base, before)], tb.cfg))
    expect = bytearray(before)
    cmds, data = random_write_job(tb.rng, rng, expect, base, 30, 200, full_strobe=0.8)
    cd = StreamDriver(dut.clk, dut.wr_cmd__valid, dut.wr_cmd__payload, dut.wr_cmd__ready, tb.rng, idle=0.1)
    dd = StreamDriver(dut.clk, dut.wr_data__valid, dut.wr_data__payload, dut.wr_data__ready,
                      random.Random(8), idle=0.2)
    c = cocotb.start_soon(cd.send([pack_cmd(a, b) for a, b in cmds]))
    await dd.send(data)
    await c
    await ClockCycles(dut.clk, 4)
    await wait_until(dut.clk, lambda: not int(dut.wr_busy.value), 100000, "writes acknowledged")
    assert int(dut.wr_error.value) == 0
    got = await tb.model.dump(workdir() / "after.hex", base, span)
    if got != bytes(expect):
        bad = next(i for i in range(span) if got[i] != expect[i])
        raise AssertionError(f"model memory differs first at {base + bad:#x}")
    s = tb.model.stats()
    assert s["protocol_errors"] == 0 and s["bytes_written"] == len(data) * BEAT
    # and the read masters see the new data
    await tb.pulse("counters_clear")
    a, b = cmds[0]
    await tb.drivers()[0].send([pack_cmd(a, b)])
    await tb.idle(20000)
    words = [int.from_bytes(bytes(expect[a - base + k * BEAT: a - base + (k + 1) * BEAT]), "little")
             for k in range(b)]
    assert tb.sig("sum", 0) == checksum(words)


@cocotb.test()
async def ddr_write_error(dut):
    """A write into the DECERR window: wr_error with resp and address, drain, clear, next write lands."""
    tb = DdrTB(dut)
    base = tb.cfg.mem_base
    await tb.start(decerr_window=(base + 0x10100, base + 0x10200))
    cd = StreamDriver(dut.clk, dut.wr_cmd__valid, dut.wr_cmd__payload, dut.wr_cmd__ready, tb.rng)
    dd = StreamDriver(dut.clk, dut.wr_data__valid, dut.wr_data__payload, dut.wr_data__ready, tb.rng)
    c = cocotb.start_soon(cd.send([pack_cmd(base + 0x10000, 128)]))
    await dd.send([k | (0xFFFF << 128) for k in range(128)])
    await c
    await wait_until(dut.clk, lambda: int(dut.wr_error.value) and not int(dut.wr_busy.value), 20000,
                     "write error and drain")
    assert int(dut.wr_error_resp.value) == RESP_DECERR
    assert int(dut.wr_error_addr.value) == base + 0x10100
    tb.model.configure(decerr_window=(0, 0))
    await tb.pulse("clear")
    await wait_until(dut.clk, lambda: not int(dut.wr_busy.value), 2000, "drain after clear")
    c = cocotb.start_soon(cd.send([pack_cmd(base + 0x10100, 2)]))
    await dd.send([0x5A5A | (0xFFFF << 128), 0xA5A5 | (0xFFFF << 128)])
    await c
    await ClockCycles(dut.clk, 4)
    await wait_until(dut.clk, lambda: not int(dut.wr_busy.value), 5000, "write done")
    assert int(dut.wr_error.value) == 0
    got = await tb.model.dump(workdir() / "w.hex", base + 0x10100, 32)
    assert int.from_bytes(got[:16], "little") == 0x5A5A and int.from_bytes(got[16:], "little") == 0xA5A5
