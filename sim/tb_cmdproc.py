"""cocotb bench for the CommandProcessor (rtl/cmdproc.py).

The device under test is :func:`cmdproc_harness`: the CommandProcessor with
rtl/axi.py's AxiReadMaster fetching descriptors from cocotbext-axi's
AxiRamRead (random AR/R pauses, and an address window answering SLVERR),
the control window on AxiLiteMaster, and a stand-in datapath here that takes
`op` with random back-pressure, answers `op_done` after a random delay and
strobes the perf events. Every test has a time limit (cycles = ns / 10).

The pytest side (tests/test_cmdproc.py) passes CMDPROC_SPEC, a JSON file
with the op payload's field offsets, the hardware limits and the config hash.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sw.contract.commands import (DESCRIPTOR_BYTES, ID_MAGIC, REGMAP_VERSION, ErrorCode,  # noqa: E402
                         HardwareLimits, LinearCommand, REGISTERS, Reg, config_hash_from_words, linear_command,
                         pack_command_list, register, validate_cmd_base, validate_command)
from sw.contract import fabric_commands as fc  # noqa: E402
from sw.contract.fabric_commands import pack_any_list  # noqa: E402

try:                    # inside the simulator, sim/ is the test directory
    from tb_csr import OKAY, SLVERR, CsrPort, cycles, reset, start_clock
except ImportError:     # imported from pytest for cmdproc_harness
    from sim.tb_csr import OKAY, SLVERR, CsrPort, cycles, reset, start_clock

RAM_BYTES = 1 << 20
ERROR_WINDOW = (0x80000, 0x81000)     # descriptor reads here answer SLVERR
CYCLE_LIMIT = 20_000                  # per wait for a run to finish


# ---------------------------------------------------------------------------
# The device (elaborated on the pytest side)
# ---------------------------------------------------------------------------

def cmdproc_harness(config, *, addr_width: int = 32, config_hash: str | None = None, limits=None,
                    ops_in_flight: int = 1):
    """CommandProcessor + AxiReadMaster with the AXI read port, `op`, `op_done` and `perf` at the top
    (and, for limits with the fabric decoder, `fop`, `fop_done` and the result inputs)."""
    from amaranth.hdl import Module
    from amaranth.lib import stream, wiring
    from amaranth.lib.wiring import In, Out, connect, flipped

    from rtl.axi import AxiReadMaster, axi4_read_signature
    from rtl.axilite import AxiLiteSignature
    from rtl.cmdproc import CommandProcessor, PerfEventSignature, op_done_layout, op_layout
    from rtl.fabric_cmd import fabric_done_layout, fabric_op_layout
    from sw.contract.commands import CSR_ADDR_WIDTH

    class CmdprocHarness(wiring.Component):
        def __init__(self):
            self.cmdproc = CommandProcessor(config, config_hash=config_hash, addr_width=addr_width, limits=limits,
                                            ops_in_flight=ops_in_flight)
            self.reader = AxiReadMaster(data_width=config.port_bits, addr_width=addr_width, max_outstanding=2)
            self.fabric = self.cmdproc.limits.fabric_ops
            fabric = {"fop": Out(stream.Signature(fabric_op_layout(addr_width))),
                      "fop_done": In(stream.Signature(fabric_done_layout())),
                      "result_we": In(1), "result_index": In(24), "result_value": In(32)} if self.fabric else {}
            super().__init__({
                **fabric,
                "csr": In(AxiLiteSignature(addr_width=CSR_ADDR_WIDTH)),
                "m_axi": Out(axi4_read_signature(addr_width, config.port_bits)),
                "op": Out(stream.Signature(op_layout(addr_width))),
                "op_done": In(stream.Signature(op_done_layout())),
                "perf": In(PerfEventSignature()),
                "irq": Out(1), "busy": Out(1), "soft_reset": Out(1),
            })

        def elaborate(self, platform):
            m = Module()
            cp, rd = self.cmdproc, self.reader
            m.submodules.cmdproc, m.submodules.reader = cp, rd
            connect(m, flipped(self.csr), cp.csr)
            connect(m, cp.fetch_cmd, rd.cmd)
            connect(m, rd.data, cp.fetch_data)
            connect(m, flipped(self.m_axi), rd.bus)
            connect(m, flipped(self.op), cp.op)
            connect(m, flipped(self.op_done), cp.op_done)
            connect(m, flipped(self.perf), cp.perf)
            if self.fabric:
                connect(m, flipped(self.fop), cp.fop)
                connect(m, flipped(self.fop_done), cp.fop_done)
                m.d.comb += [cp.result_we.eq(self.result_we), cp.result_index.eq(self.result_index),
                             cp.result_value.eq(self.result_value)]
            m.d.comb += [cp.fetch_error.eq(rd.error), rd.clear.eq(cp.fetch_clear),
                         self.irq.eq(cp.irq), self.busy.eq(cp.busy), self.soft_reset.eq(cp.soft_reset)]
            return m

    return CmdprocHarness()


# ---------------------------------------------------------------------------
# Bench pieces
# ---------------------------------------------------------------------------

def _spec() -> dict:
    return json.loads(Path(os.environ["CMDPROC_SPEC"]).read_text())


class Datapath:
    """Stand-in datapath: accepts up to `in_flight` ops, answers op_done in order after a random
    delay, strobes perf events while it works, and forgets its ops on the soft_reset pulse. With
    the fabric ports it also takes `fop` (never while a LINEAR is unanswered, and no LINEAR while
    a fabric op is) and answers `fop_done` with the code in `fabric_answers` (0 by default)."""

    def __init__(self, dut, fields: dict, rng: random.Random, *, in_flight: int = 1, fabric_fields=None):
        self.dut, self.fields, self.rng = dut, fields, rng
        self.in_flight = in_flight
        self.fabric_fields = fabric_fields
        self.delay = (1, 30)
        self.ready_prob = 0.5
        self.answers: dict[int, tuple[int, int]] = {}     # index -> (error, error_code)
        self.fabric_answers: dict[int, int] = {}           # tag -> code
        self.ops: list[dict] = []
        self.sequence: list[tuple[str, dict]] = []         # ("op" | "fop", payload) in acceptance order
        self.done_cycles: list[int] = []
        self.busy_cycles: list[int] = []
        self.soft_resets = 0
        self.reset_totals()
        self.cycle = 0
        self._pending: list[tuple[dict, int]] = []
        self._fpending = None
        dut.op__ready.value = 0
        dut.op_done__valid.value = 0
        dut.op_done__payload.value = 0
        if fabric_fields:
            dut.fop__ready.value = 0
            dut.fop_done__valid.value = 0
            dut.fop_done__payload.value = 0
            dut.result_we.value = 0
        for s in ("mem_stall", "compute_stall", "bytes_read", "bytes_written"):
            getattr(dut, f"perf__{s}").value = 0
        self._task = cocotb.start_soon(self._run())

    def reset_totals(self):
        self.totals = {"MEM_STALL": 0, "COMPUTE_STALL_CYCLES": 0, "BYTES_READ": 0, "BYTES_WRITTEN": 0}

    def clear_log(self):
        self.ops.clear()
        self.sequence.clear()
        self.done_cycles.clear()
        self.busy_cycles.clear()

    @staticmethod
    def _decode(fields: dict, value: int) -> dict:
        return {k: (value >> off) & ((1 << w) - 1) for k, (off, w) in fields.items()}

    def decode(self, value: int) -> dict:
        return self._decode(self.fields, value)

    async def _run(self):
        dut, rng = self.dut, self.rng
        fabric = self.fabric_fields is not None
        while True:
            await FallingEdge(dut.clk)
            ready = len(self._pending) < self.in_flight and self._fpending is None and rng.random() < self.ready_prob
            dut.op__ready.value = int(ready)
            answering = bool(self._pending) and self.cycle >= self._pending[0][1]
            dut.op_done__valid.value = int(answering)
            if answering:
                err, code = self.answers.get(self._pending[0][0]["index"], (0, 0))
                dut.op_done__payload.value = err | (code << 1)
            fready = fanswer = False
            if fabric:
                fready = self._fpending is None and not self._pending and rng.random() < self.ready_prob
                dut.fop__ready.value = int(fready)
                fanswer = self._fpending is not None and self.cycle >= self._fpending[1]
                dut.fop_done__valid.value = int(fanswer)
                if fanswer:
                    dut.fop_done__payload.value = self.fabric_answers.get(self._fpending[0]["tag"], 0)
            working = bool(self._pending) or self._fpending is not None
            events = {
                "mem_stall": int(working and rng.random() < 0.3),
                "compute_stall": int(working and rng.random() < 0.2),
                "bytes_read": rng.randrange(0, 65) if working else 0,
                "bytes_written": rng.randrange(0, 17) if working else 0,
            }
            for k, v in events.items():
                getattr(dut, f"perf__{k}").value = v
            await ReadOnly()
            if int(dut.busy.value):
                self.busy_cycles.append(self.cycle)
            if int(dut.soft_reset.value):
                self.soft_resets += 1
                self._pending = []
                self._fpending = None
                self.reset_totals()
            else:
                self.totals["MEM_STALL"] += events["mem_stall"]
                self.totals["COMPUTE_STALL_CYCLES"] += events["compute_stall"]
                self.totals["BYTES_READ"] += events["bytes_read"]
                self.totals["BYTES_WRITTEN"] += events["bytes_written"]
                if len(self._pending) >= self.in_flight:
                    assert not int(dut.op__valid.value), "more ops offered than may be in flight"
                if any(op.get("argmax") for op, _ in self._pending):
                    assert not int(dut.op__valid.value), "an op was offered before the ARGMAX op's answer"
                if fabric:
                    if self._pending:
                        assert not int(dut.fop__valid.value), "a fabric op was offered while a LINEAR was unanswered"
                    if self._fpending is not None:
                        assert not int(dut.op__valid.value), "a LINEAR was offered while a fabric op was unanswered"
                        assert not int(dut.fop__valid.value), "a fabric op was offered before fop_done"
                if answering and int(dut.op_done__ready.value):
                    self.done_cycles.append(self.cycle)
                    self._pending.pop(0)
                if ready and int(dut.op__valid.value):
                    op = self.decode(int(dut.op__payload.value))
                    self.ops.append(op)
                    self.sequence.append(("op", op))
                    due = max([self.cycle + rng.randint(*self.delay)] + [d for _, d in self._pending])
                    self._pending.append((op, due))
                if fabric:
                    if fanswer and int(dut.fop_done__ready.value):
                        self.done_cycles.append(self.cycle)
                        self._fpending = None
                    if fready and int(dut.fop__valid.value):
                        fop = self._decode(self.fabric_fields, int(dut.fop__payload.value))
                        self.sequence.append(("fop", fop))
                        self._fpending = (fop, self.cycle + rng.randint(*self.delay))
            self.cycle += 1


class TB:
    def __init__(self, dut, seed: int):
        from cocotbext.axi import AxiRamRead, AxiReadBus

        class FaultyRam(AxiRamRead):
            async def _read(self, address, length):
                if ERROR_WINDOW[0] <= address < ERROR_WINDOW[1]:
                    raise ValueError("address in the error window")
                return await super()._read(address, length)

        self.dut = dut
        self.spec = _spec()
        self.rng = random.Random(seed)
        start_clock(dut)
        self.csr = CsrPort(dut)
        self.ram = FaultyRam(AxiReadBus.from_prefix(dut, "m_axi", bus_separator="__"), dut.clk, dut.rst,
                             size=RAM_BYTES)
        self.ram.log.setLevel(logging.WARNING)     # per-burst logging costs more than the simulation
        fabric = self.spec.get("fabric_fields")
        self.dp = Datapath(dut, {k: tuple(v) for k, v in self.spec["op_fields"].items()}, self.rng,
                           in_flight=self.spec.get("ops_in_flight", 1),
                           fabric_fields={k: tuple(v) for k, v in fabric.items()} if fabric else None)
        lim = self.spec["limits"]
        self.hw = HardwareLimits(**lim)

    async def start(self):
        await reset(self.dut)

    def ram_pauses(self, prob: float | None):
        for ch in (self.ram.ar_channel, self.ram.r_channel):
            if prob is None:
                ch.clear_pause_generator()
                ch.pause = False      # clearing the generator keeps its last value
            else:
                rng = random.Random(self.rng.randrange(1 << 30))

                def gen(rng=rng, p=prob):
                    while True:
                        yield rng.random() < p
                ch.set_pause_generator(gen())

    # ---- register helpers --------------------------------------------------------
    async def rd(self, name: str, expect_resp: int = OKAY) -> int:
        return await self.csr.read(Reg[name], expect_resp)

    async def wr(self, name: str, value: int) -> None:
        await self.csr.write(Reg[name], value)

    async def status(self) -> dict:
        return register("STATUS").unpack(await self.rd("STATUS"))

    async def counter(self, name: str) -> int:
        lo = await self.rd(f"{name}_LO")
        hi = await self.rd(f"{name}_HI")
        return lo | hi << 32

    async def cmd_log(self, n: int) -> list[int]:
        out = []
        for i in range(n):
            await self.wr("CMD_LOG_INDEX", i)
            out.append(await self.rd("CMD_LOG_CYCLES"))
        return out

    # ---- command lists -------------------------------------------------------------
    def random_command(self, tag: int) -> LinearCommand:
        rng, hw = self.rng, self.hw
        a = lambda: rng.randrange(0, 1 << hw.addr_bits, 64)   # noqa: E731
        return linear_command(n=rng.randint(1, 300), k=hw.group_size * rng.randint(1, 8), group_size=hw.group_size,
                              tokens=rng.randint(1, hw.tokens), tile_rows=hw.tile_rows, weight_addr=a(),
                              act_addr=a(), out_addr=a(), bias_addr=a() if rng.random() < 0.5 else None, tag=tag)

    async def run(self, cmds: list[LinearCommand], *, base: int = 0x1000, start_extra: int = 0,
                  expect_busy: bool = True, limit: int = CYCLE_LIMIT) -> dict:
        """Write the list at `base`, start, wait for STATUS.done; returns STATUS."""
        self.ram.write(base, pack_any_list(cmds))
        await self.wr("CMD_BASE_LO", base & 0xFFFFFFFF)
        await self.wr("CMD_BASE_HI", base >> 32)
        await self.wr("CMD_COUNT", len(cmds))
        self.dp.clear_log()
        ctrl = register("CTRL")
        await self.wr("CTRL", ctrl.pack(start=1) | start_extra)
        return await self.wait_done(limit)

    async def wait_done(self, limit: int = CYCLE_LIMIT) -> dict:
        start = self.dp.cycle
        while True:
            st = await self.status()
            if st["done"]:
                assert not st["busy"]
                return st
            assert self.dp.cycle - start < limit, f"run did not finish within {limit} cycles: {st}"
            await cycles(self.dut, 8)

    def expected_op(self, cmd: LinearCommand, index: int) -> dict:
        return {"index": index, "tag": cmd.tag, "has_bias": int(cmd.has_bias), "weight_int8": int(cmd.weight_int8),
                **({"argmax": (cmd.flags >> 2) & 1} if "argmax" in self.dp.fields else {}),
                "n": cmd.n, "k": cmd.k, "groups": cmd.k // cmd.group_size, "tokens": cmd.tokens,
                "weight_addr": cmd.weight_addr, "act_addr": cmd.act_addr, "bias_addr": cmd.bias_addr,
                "out_addr": cmd.out_addr}

    def check_ops(self, cmds: list[LinearCommand]) -> None:
        got = self.dp.ops
        assert len(got) == len(cmds), f"datapath saw {len(got)} ops, expected {len(cmds)}"
        for i, (op, cmd) in enumerate(zip(got, cmds)):
            assert op == self.expected_op(cmd, i), f"op {i}: {op} != {self.expected_op(cmd, i)}"


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

@cocotb.test(timeout_time=300, timeout_unit="us")
async def identity_and_registers(dut):
    tb = TB(dut, 1)
    await tb.start()
    spec = tb.spec
    assert await tb.rd("ID") == ID_MAGIC
    assert (await tb.rd("ID")).to_bytes(4, "little") == b"KRIA"
    assert register("VERSION").unpack(await tb.rd("VERSION")) == {"minor": REGMAP_VERSION[1],
                                                                  "major": REGMAP_VERSION[0]}
    p0 = register("HW_PARAMS0").unpack(await tb.rd("HW_PARAMS0"))
    p1 = register("HW_PARAMS1").unpack(await tb.rd("HW_PARAMS1"))
    p2 = register("HW_PARAMS2").unpack(await tb.rd("HW_PARAMS2"))
    assert p0 == spec["hw_params0"] and p1 == spec["hw_params1"] and p2 == spec["hw_params2"], (p0, p1, p2)
    assert HardwareLimits.from_registers(await tb.rd("HW_PARAMS0"), await tb.rd("HW_PARAMS1"),
                                         await tb.rd("HW_PARAMS2")) == tb.hw
    words = [await tb.rd(f"CONFIG_HASH{i}") for i in range(8)]
    assert config_hash_from_words(words) == spec["config_hash"]
    # RW registers keep what is written; W1C/R/PULSE fields ignore writes of 0.
    for name, value in (("CMD_BASE_LO", 0xDEADBEC0), ("CMD_BASE_HI", 0x12), ("CMD_COUNT", 0x1234)):
        await tb.wr(name, value)
        assert await tb.rd(name) == value
    await tb.wr("CMD_COUNT", 0xABCD5678)
    assert await tb.rd("CMD_COUNT") == 0x5678        # 16-bit field
    await tb.wr("CMD_LOG_INDEX", 0xFF)
    assert await tb.rd("CMD_LOG_INDEX") == 31
    assert await tb.rd("CTRL") == 0
    await tb.wr("CTRL", register("CTRL").pack(irq_enable=1))
    assert await tb.rd("CTRL") == register("CTRL").pack(irq_enable=1)
    await tb.wr("ID", 0)
    assert await tb.rd("ID") == ID_MAGIC
    st = await tb.status()
    assert st == {"busy": 0, "done": 0, "error": 0, "error_code": 0, "cmd_index": 0}, st
    # Unmapped offsets answer SLVERR.
    for off in (0x1C, 0x4C, 0x5C, 0x70, 0x7C, 0xA8, 0xD0, 0xFFC):
        assert off not in {r.offset for r in REGISTERS}, hex(off)
        assert await tb.csr.read(off, expect_resp=SLVERR) == 0
        await tb.csr.write(off, 0xFFFFFFFF, expect_resp=SLVERR)
    # An empty run ends at once, successfully, with the irq.
    await tb.wr("CMD_BASE_HI", 0)
    st = await tb.run([], start_extra=register("CTRL").pack(irq_enable=1))
    assert st == {"busy": 0, "done": 1, "error": 0, "error_code": 0, "cmd_index": 0}, st
    assert int(dut.irq.value) == 1
    assert tb.dp.ops == []


@cocotb.test(timeout_time=3000, timeout_unit="us")
async def runs_log_counters_irq(dut):
    tb = TB(dut, 2)
    await tb.start()
    tb.ram_pauses(0.3)
    ctrl = register("CTRL")
    for n_cmds, irq_enable in ((6, 1), (40, 0)):
        tb.dp.delay = (1, 40) if n_cmds < 10 else (0, 6)
        cmds = [tb.random_command(tag=1000 + i) for i in range(n_cmds)]
        assert all(validate_command(c, tb.hw) == ErrorCode.NONE for c in cmds)
        await tb.wr("IRQ_STATUS", 0b11)
        tb.dp.reset_totals()
        st = await tb.run(cmds, base=0x2000 + 64 * n_cmds,
                          start_extra=ctrl.pack(perf_clear=1, irq_enable=irq_enable))
        assert st == {"busy": 0, "done": 1, "error": 0, "error_code": 0, "cmd_index": n_cmds}, st
        tb.check_ops(cmds)
        # irq: level, gated by irq_enable, cleared by W1C.
        assert register("IRQ_STATUS").unpack(await tb.rd("IRQ_STATUS")) == {"done": 1, "error": 0}
        assert int(dut.irq.value) == irq_enable
        await tb.wr("IRQ_STATUS", 0b10)          # clearing "error" leaves "done"
        assert (await tb.rd("IRQ_STATUS")) == 0b01
        await tb.wr("IRQ_STATUS", 0b01)
        assert (await tb.rd("IRQ_STATUS")) == 0
        await cycles(dut, 1)
        assert int(dut.irq.value) == 0

        # Cycles per command against the bench's own view of the handshakes.
        busy = tb.dp.busy_cycles
        assert busy == list(range(busy[0], busy[0] + len(busy))), "busy was not one contiguous stretch"
        done = tb.dp.done_cycles
        want = [done[0] - busy[0] + 1] + [b - a for a, b in zip(done, done[1:])]
        assert busy[-1] == done[-1], "busy did not end with the last op_done"
        log = await tb.cmd_log(min(n_cmds, 32))
        depth = 32
        expect_log = [want[max(i for i in range(n_cmds) if i % depth == s)] for s in range(min(n_cmds, depth))]
        assert log == expect_log, f"cycle log {log} != {expect_log}"
        assert await tb.rd("LAST_CMD_CYCLES") == want[-1]
        busy_cycles = await tb.counter("BUSY_CYCLES")
        assert busy_cycles == len(busy) == sum(want), (busy_cycles, len(busy), sum(want))
        dut._log.info(f"{n_cmds} commands: {busy_cycles} busy cycles, per command {want[:8]}...")

        # Counters.
        assert await tb.counter("COMPUTE_STALL_CYCLES") == tb.dp.totals["COMPUTE_STALL_CYCLES"]
        assert await tb.counter("BYTES_WRITTEN") == tb.dp.totals["BYTES_WRITTEN"]
        assert await tb.counter("BYTES_READ") == tb.dp.totals["BYTES_READ"] + DESCRIPTOR_BYTES * n_cmds
        mem = await tb.counter("MEM_STALL_CYCLES")
        assert tb.dp.totals["MEM_STALL"] < mem < busy_cycles, (mem, tb.dp.totals["MEM_STALL"])

    # LO/HI latching and the snapshot: a counter that moves between reads.
    tb.dp.delay = (3000, 3000)
    tb.ram_pauses(None)
    cmds = [tb.random_command(tag=7)]
    tb.ram.write(0x1000, pack_command_list(cmds))
    await tb.wr("CMD_BASE_LO", 0x1000)
    await tb.wr("CMD_COUNT", 1)
    tb.dp.clear_log()
    await tb.wr("CTRL", ctrl.pack(start=1, perf_clear=1))
    # Writes during a run do not derail it: a second start is ignored, CMD_BASE/COUNT are latched.
    await tb.wr("CMD_COUNT", 5)
    await tb.wr("CMD_BASE_LO", 0x10)
    await tb.wr("CTRL", ctrl.pack(start=1))
    await cycles(dut, 50)
    a = await tb.counter("BUSY_CYCLES")
    b = await tb.counter("BUSY_CYCLES")
    assert 50 < a < b, (a, b)
    perf = register("PERF_CTRL")
    await tb.wr("PERF_CTRL", perf.pack(snapshot=1, hold=1))
    snap = [await tb.counter("BUSY_CYCLES") for _ in range(3)]
    assert snap[0] == snap[1] == snap[2] > b, snap
    await cycles(dut, 20)
    assert await tb.counter("BUSY_CYCLES") == snap[0]            # held
    await tb.wr("PERF_CTRL", perf.pack(snapshot=1, hold=1))
    assert await tb.counter("BUSY_CYCLES") > snap[0] + 20        # a fresh snapshot
    await tb.wr("PERF_CTRL", 0)
    c = await tb.counter("BUSY_CYCLES")
    assert await tb.counter("BUSY_CYCLES") > c                   # live again
    st = await tb.wait_done()
    assert st == {"busy": 0, "done": 1, "error": 0, "error_code": 0, "cmd_index": 1}, st
    tb.check_ops(cmds)


BAD_CASES = [
    ("zero n", dict(n=0), ErrorCode.ZERO_SHAPE),
    ("zero k", dict(k=0), ErrorCode.ZERO_SHAPE),
    ("zero tokens", dict(tokens=0), ErrorCode.ZERO_SHAPE),
    ("misaligned weights", dict(weight_addr=0x10020), ErrorCode.MISALIGNED_ADDRESS),
    ("misaligned activations", dict(act_addr=0x10004), ErrorCode.MISALIGNED_ADDRESS),
    ("misaligned output", dict(out_addr=0x10001), ErrorCode.MISALIGNED_ADDRESS),
    ("misaligned bias", dict(bias_addr=0x10008, flags=1), ErrorCode.MISALIGNED_ADDRESS),
    ("bad group size", dict(group_size=16), ErrorCode.BAD_GROUP_SIZE),
    ("k not a group multiple", dict(k="+half"), ErrorCode.K_NOT_GROUP_MULTIPLE),
    ("bad opcode", dict(opcode=0), ErrorCode.BAD_OPCODE),
    ("bad version", dict(version=2), ErrorCode.BAD_VERSION),
    ("reserved flag", dict(flags=0x80), ErrorCode.RESERVED_NONZERO),
    ("reserved field", dict(reserved1=1), ErrorCode.RESERVED_NONZERO),
    ("bad tile rows", dict(tile_rows="+2"), ErrorCode.BAD_TILE_ROWS),
    ("int8 weights", dict(flags=2), ErrorCode.UNSUPPORTED_WEIGHT_KIND),
    ("too many tokens", dict(tokens="+1"), ErrorCode.TOO_MANY_TOKENS),
    ("address out of range", dict(out_addr="range"), ErrorCode.ADDRESS_RANGE),
    ("two faults: first check wins", dict(n=0, weight_addr=0x10020), ErrorCode.ZERO_SHAPE),
]


@cocotb.test(timeout_time=3000, timeout_unit="us")
async def bad_commands_not_executed(dut):
    tb = TB(dut, 3)
    await tb.start()
    tb.ram_pauses(0.2)
    hw = tb.hw
    for name, changes, code in BAD_CASES:
        good = [tb.random_command(tag=i) for i in range(4)]
        bad = good[2]
        resolved = {}
        for k, v in changes.items():
            if v == "+half":
                v = bad.k + hw.group_size // 2
            elif v == "+2":
                v = hw.tile_rows + 2
            elif v == "+1":
                v = hw.tokens + 1
            elif v == "range":
                v = 1 << hw.addr_bits
            resolved[k] = v
        good[2] = bad.replace(**resolved)
        assert validate_command(good[2], hw) == code, (name, validate_command(good[2], hw))
        st = await tb.run(good)
        assert st == {"busy": 0, "done": 1, "error": 1, "error_code": int(code), "cmd_index": 2}, (name, st)
        tb.check_ops(good[:2])                       # the bad one never reached the datapath
        assert (await tb.rd("IRQ_STATUS")) == 0b11
        await tb.wr("IRQ_STATUS", 0b11)
        dut._log.info(f"{name}: {ErrorCode(code).name} at index 2, not executed")
    # A bad first command: nothing executes.
    cmds = [tb.random_command(tag=0).replace(n=0)]
    st = await tb.run(cmds)
    assert (st["error_code"], st["cmd_index"]) == (ErrorCode.ZERO_SHAPE, 0) and tb.dp.ops == []


@cocotb.test(timeout_time=3000, timeout_unit="us")
async def fetch_errors_and_bad_base(dut):
    tb = TB(dut, 4)
    await tb.start()
    tb.ram_pauses(0.3)
    # CMD_BASE misaligned / out of range: reported at start, index 0, nothing fetched.
    for base in (0x1010, 1 << tb.hw.addr_bits):
        assert validate_cmd_base(base, tb.hw) == ErrorCode.BAD_CMD_BASE
        await tb.wr("CMD_BASE_LO", base & 0xFFFFFFFF)
        await tb.wr("CMD_BASE_HI", base >> 32)
        await tb.wr("CMD_COUNT", 3)
        tb.dp.clear_log()
        await tb.wr("CTRL", register("CTRL").pack(start=1))
        st = await tb.wait_done()
        assert st == {"busy": 0, "done": 1, "error": 1, "error_code": int(ErrorCode.BAD_CMD_BASE),
                      "cmd_index": 0}, st
        assert tb.dp.ops == []
    # A list running into the SLVERR window: commands before it run, the failing one does not.
    for n_before in (0, 1, 3):
        base = ERROR_WINDOW[0] - DESCRIPTOR_BYTES * n_before
        cmds = [tb.random_command(tag=i) for i in range(n_before + 2)]
        tb.ram.write(base, pack_command_list(cmds[:n_before]))
        await tb.wr("CMD_BASE_LO", base)
        await tb.wr("CMD_BASE_HI", 0)
        await tb.wr("CMD_COUNT", len(cmds))
        tb.dp.clear_log()
        await tb.wr("CTRL", register("CTRL").pack(start=1))
        st = await tb.wait_done()
        assert st == {"busy": 0, "done": 1, "error": 1, "error_code": int(ErrorCode.FETCH_ERROR),
                      "cmd_index": n_before}, st
        tb.check_ops(cmds[:n_before])
        # The read master was cleared: the next run works.
        good = [tb.random_command(tag=i) for i in range(3)]
        st = await tb.run(good)
        assert st == {"busy": 0, "done": 1, "error": 0, "error_code": 0, "cmd_index": 3}, st
        tb.check_ops(good)


@cocotb.test(timeout_time=2000, timeout_unit="us")
async def datapath_errors(dut):
    tb = TB(dut, 5)
    await tb.start()
    for answer, code in (((1, int(ErrorCode.READ_ERROR)), ErrorCode.READ_ERROR),
                         ((1, int(ErrorCode.WRITE_ERROR)), ErrorCode.WRITE_ERROR),
                         ((1, 0), ErrorCode.DATAPATH_ERROR)):
        tb.dp.answers = {1: answer}
        cmds = [tb.random_command(tag=i) for i in range(4)]
        st = await tb.run(cmds)
        assert st == {"busy": 0, "done": 1, "error": 1, "error_code": int(code), "cmd_index": 1}, st
        tb.check_ops(cmds[:2])                # command 1 was executed and failed; 2 and 3 were not
    tb.dp.answers = {}
    st = await tb.run([tb.random_command(tag=0)])
    assert not st["error"]


@cocotb.test(timeout_time=5000, timeout_unit="us")
async def soft_reset_and_rerun(dut):
    tb = TB(dut, 6)
    await tb.start()
    ctrl = register("CTRL")
    # Soft reset at random points of runs: while fetching, issuing, waiting for op_done.
    for trial in range(12):
        tb.ram_pauses(tb.rng.choice([None, 0.5, 0.8]))
        tb.dp.delay = (0, 60)
        cmds = [tb.random_command(tag=i) for i in range(5)]
        tb.ram.write(0x4000, pack_command_list(cmds))
        await tb.wr("CMD_BASE_LO", 0x4000)
        await tb.wr("CMD_COUNT", len(cmds))
        await tb.wr("CTRL", ctrl.pack(start=1, irq_enable=1))
        await cycles(dut, tb.rng.randrange(1, 150))
        resets = tb.dp.soft_resets
        await tb.wr("CTRL", ctrl.pack(soft_reset=1, start=1, irq_enable=1))   # soft_reset wins over start
        assert tb.dp.soft_resets == resets + 1
        st = await tb.status()
        assert st == {"busy": 0, "done": 0, "error": 0, "error_code": 0, "cmd_index": 0}, (trial, st)
        assert await tb.rd("IRQ_STATUS") == 0 and int(dut.irq.value) == 0
        assert await tb.counter("BUSY_CYCLES") == 0 and await tb.counter("BYTES_READ") == 0
        assert await tb.rd("LAST_CMD_CYCLES") == 0
        assert await tb.rd("CMD_COUNT") == len(cmds)      # configuration survives
        # A second run works completely.
        good = [tb.random_command(tag=100 + i) for i in range(4)]
        tb.dp.delay = (0, 10)
        st = await tb.run(good, base=0x6000, start_extra=ctrl.pack(irq_enable=1))
        assert st == {"busy": 0, "done": 1, "error": 0, "error_code": 0, "cmd_index": 4}, (trial, st)
        tb.check_ops(good)
        assert int(dut.irq.value) == 1
        await tb.wr("IRQ_STATUS", 0b11)


# ---------------------------------------------------------------------------
# The fabric decoder's opcodes (a design with HW_PARAMS3.max_context > 0)
# ---------------------------------------------------------------------------

def random_fabric_command(rng: random.Random, hw: HardwareLimits, tag: int) -> "fc.FabricCommand":
    """A valid descriptor of a random fabric op (validate_fabric_command says NONE), within the
    shapes the design's engines were built for (HW_PARAMS4: head_dim, kv_group, max_row)."""
    op = rng.choice(fc.FABRIC_OPCODES)
    if op == fc.Opcode.QUANT or not hw.head_dim:
        aux = rng.choice(fc.QUANT_GROUPS if op == fc.Opcode.QUANT else fc.HEAD_DIMS)
    else:
        aux = hw.head_dim
    most = 8
    if op == fc.Opcode.ATTEND and hw.kv_group:
        most = min(most, hw.kv_group)
    if hw.max_row:
        most = min(most, hw.max_row // aux)
    heads = rng.randint(1, most)
    n = aux * heads
    row = -(-4 * n // 64) * 64
    a = lambda: rng.randrange(0, 1 << hw.addr_bits, 64)   # noqa: E731
    kw = dict(opcode=op, n=n, tokens=rng.randint(1, hw.tokens), src0=a(), src1=a(), dst=a(), src_stride=row,
              dst_stride=row, aux=aux, p0=rng.randint(1, hw.max_context), p1=1, tag=tag)
    if op == fc.Opcode.EMBED:
        kw.update(aux=0, n=8 * heads, src_stride=0, p1=0, flags=int(fc.FabricFlags.TOKEN_REG), src0=0, tokens=1)
    elif op == fc.Opcode.QUANT:
        kw.update(p0=0, p1=0, src1=0, dst_stride=0)
    elif op == fc.Opcode.KV_STORE:
        kw.update(p1=heads, src1=0, dst_stride=0, flags=rng.choice([0, int(fc.FabricFlags.VALUE)]))
    elif op == fc.Opcode.ATTEND:
        kw.update(src_stride=0)
    elif op in (fc.Opcode.ADD, fc.Opcode.SILU_MUL):
        kw.update(aux=0, p1=0, p0=row)
    else:       # RMSNORM, ROPE
        kw.update(aux=0 if op == fc.Opcode.RMSNORM else aux, p1=0)
    cmd = fc.FabricCommand(**kw)
    assert fc.validate_fabric_command(cmd, hw) == ErrorCode.NONE, cmd
    return cmd


def expected_fop(cmd, run_pos: int, run_token: int) -> dict:
    out = {name: getattr(cmd, name) for name, _, _, _ in fc.FABRIC_FIELDS if name != "version"}
    out.update(run_pos=run_pos, run_token=run_token)
    return out


@cocotb.test(timeout_time=6000, timeout_unit="us")
async def fabric_ops(dut):
    tb = TB(dut, 11)
    await tb.start()
    tb.ram_pauses(0.2)
    hw = tb.hw
    assert hw.max_context > 0
    p3 = register("HW_PARAMS3").unpack(await tb.rd("HW_PARAMS3"))
    assert p3 == {"max_context": hw.max_context}, p3
    assert HardwareLimits.from_registers(await tb.rd("HW_PARAMS0"), await tb.rd("HW_PARAMS1"),
                                         await tb.rd("HW_PARAMS2"), await tb.rd("HW_PARAMS3"),
                                         await tb.rd("HW_PARAMS4")) == hw
    for run, (pos, token) in enumerate(((123, 4567), (0, 0), (4095, (1 << 24) - 1))):
        await tb.wr("RUN_POS", pos)
        await tb.wr("RUN_TOKEN", token)
        assert (await tb.rd("RUN_POS"), await tb.rd("RUN_TOKEN")) == (pos, token)
        cmds = []
        for i in range(30):
            if tb.rng.random() < 0.4:
                c = tb.random_command(tag=i)
                cmds.append(c.replace(flags=c.flags | (4 if tb.rng.random() < 0.3 else 0)))
            else:
                cmds.append(random_fabric_command(tb.rng, hw, tag=i))
        st = await tb.run(cmds)
        assert st == {"busy": 0, "done": 1, "error": 0, "error_code": 0, "cmd_index": len(cmds)}, st
        want, lin = [], 0
        for c in cmds:
            if isinstance(c, fc.FabricCommand):
                want.append(("fop", expected_fop(c, pos, token)))
            else:
                want.append(("op", tb.expected_op(c, cmds.index(c))))
                lin += 1
        got = tb.dp.sequence
        assert len(got) == len(want), (len(got), len(want))
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"run {run} command {i}: {g} != {w}"
        dut._log.info(f"run {run}: {len(cmds)} commands ({lin} LINEAR) in order, RUN_POS {pos}, RUN_TOKEN {token}")

    # A fabric op's run-time error stops the run at its index; nothing after it executes.
    cmds = [random_fabric_command(tb.rng, hw, tag=100 + i) for i in range(5)]
    tb.dp.fabric_answers = {102: int(ErrorCode.CONTEXT_FULL)}
    st = await tb.run(cmds)
    assert st == {"busy": 0, "done": 1, "error": 1, "error_code": int(ErrorCode.CONTEXT_FULL), "cmd_index": 2}, st
    assert [k for k, _ in tb.dp.sequence] == ["fop"] * 3
    tb.dp.fabric_answers = {}
    # Bad fabric descriptors are reported with the contract's code and never executed.
    for changes in (dict(n=0), dict(version=3), dict(p2=1), dict(tokens=hw.tokens + 1), dict(dst=0x1010),
                    dict(aux=48), dict(n=(1 << 16) + 64)):
        cmds = [random_fabric_command(tb.rng, hw, tag=200 + i) for i in range(4)]
        cmds[1] = tb.random_command(tag=201)
        cmds[2] = cmds[2].replace(**changes)
        code = fc.validate_fabric_command(cmds[2], hw)
        assert code != ErrorCode.NONE, changes
        st = await tb.run(cmds)
        assert st == {"busy": 0, "done": 1, "error": 1, "error_code": int(code), "cmd_index": 2}, (changes, st)
        assert [k for k, _ in tb.dp.sequence] == ["fop", "op"], (changes, tb.dp.sequence)
    # RESULT_INDEX / RESULT_VALUE hold what the datapath strobes.
    await FallingEdge(dut.clk)
    dut.result_index.value, dut.result_value.value, dut.result_we.value = 151_935, 0x4049_0FDB, 1
    await FallingEdge(dut.clk)
    dut.result_we.value = 0
    dut.result_index.value, dut.result_value.value = 7, 7
    assert (await tb.rd("RESULT_INDEX"), await tb.rd("RESULT_VALUE")) == (151_935, 0x4049_0FDB)
