"""cocotb scenario player for the accelerator top (sim/top_tb.py builds the tops and the scenarios).

cocotb only touches the AXI4-Lite registers (cocotbext-axi AxiLiteMaster) and
the DDR model's control registers; weight streaming runs free in Verilator.
The scenario (KRIALLM_TOP_JOB, JSON) is a list of steps:

* ``load``: regions [[addr, file.bin], ...] into the memory (the DDR model via a
  $readmemh image, or cocotbext-axi's AxiRam on the top's ``ext`` port when the
  scenario has ``axiram`` options: size, pause probability, seed);
* ``ddr``: DdrModelHandle.configure(**changes) (back-pressure, error windows, latency);
* ``run``: CMD_BASE/CMD_COUNT, CTRL = start | perf_clear | irq_enable, then wait for
  the irq line with a cycle limit; record STATUS, the performance counters, the
  cycle log of the first ``log`` commands, the DDR model's statistics, and dump
  the listed regions to files;
* ``soft_reset``: CTRL.soft_reset, then a few cycles.

Results go to KRIALLM_TOP_RESULTS (JSON). A run that misses its cycle limit is
recorded as ``timeout`` and ends the scenario (unless the step says ``expect_timeout``:
a run cut short on purpose, e.g. to be aborted by a following soft reset).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time

import numpy as np
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge, SimTimeoutError, with_timeout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.ddr import DdrModelConfig, DdrModelHandle, write_image  # noqa: E402
from sw.contract.commands import PERF_COUNTERS, Reg, register  # noqa: E402

try:                    # inside the simulator, sim/ is the test directory
    from tb_csr import CsrPort
except ImportError:
    from sim.tb_csr import CsrPort

PERIOD_NS = 4           # 250 MHz: simulated time reads as board time


class Bench:
    def __init__(self, dut, job: dict):
        self.dut = dut
        self.job = job
        self.csr = CsrPort(dut)
        self.ddr = None
        self.ram = None
        self.ddr_cfg = DdrModelConfig(**{k: (tuple(v) if k.endswith("_window") else v)
                                         for k, v in job["ddr"].items()})
        # hp0 may be switched to cocotbext-axi's AxiRam; the other ports stay on the DDR model, so
        # with more than one port both memories hold the image (see load/dump).
        self.ports = self.ddr_cfg.ports
        if job.get("axiram") is None or self.ports > 1:
            self.ddr = DdrModelHandle(dut.ddr, self.ddr_cfg, clock=dut.clk)
        if job.get("axiram") is None:
            if hasattr(dut, "use_ext"):
                dut.use_ext.value = 0
        else:
            from cocotbext.axi import AxiBus, AxiRam
            opts = job["axiram"]
            dut.use_ext.value = 1
            self.ram = AxiRam(AxiBus.from_prefix(dut, "ext", bus_separator="__"), dut.clk, dut.rst,
                              size=opts["size"])
            logging.getLogger(self.ram.write_if.log.name).setLevel(logging.WARNING)
            logging.getLogger(self.ram.read_if.log.name).setLevel(logging.WARNING)
            prob = opts.get("pause", 0.0)
            if prob:
                rng = random.Random(opts.get("seed", 1))
                chans = [self.ram.write_if.aw_channel, self.ram.write_if.w_channel, self.ram.write_if.b_channel,
                         self.ram.read_if.ar_channel, self.ram.read_if.r_channel]
                for ch in chans:
                    ch.set_pause_generator(_pauses(random.Random(rng.randrange(1 << 30)), prob))
        self.loaded: list[tuple[int, bytes]] = []     # what load() put into both memories
        self.workdir = Path(job.get("workdir", "."))

    async def reset(self):
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 4)
        if self.ddr is not None:
            self.ddr.configure()
        await ClockCycles(self.dut.clk, 2)
        self.dut.rst.value = 0
        await ClockCycles(self.dut.clk, 4)

    async def rd(self, name: str) -> int:
        return await self.csr.read(Reg[name])

    async def wr(self, name: str, value: int) -> None:
        await self.csr.write(Reg[name], value)

    async def load(self, regions):
        blobs = [(int(a), Path(p).read_bytes()) for a, p in regions]
        if self.ddr is not None:
            img = write_image(Path(regions[0][1]).with_suffix(".hex"), blobs, self.ddr_cfg)
            await self.ddr.load(img)
        if self.ram is not None:
            for a, b in blobs:
                self.ram.write(a, b)
            self.loaded.extend(blobs)

    def _initial(self, addr: int, nbytes: int) -> np.ndarray:
        out = np.zeros(nbytes, np.uint8)
        for a, b in self.loaded:
            lo, hi = max(a, addr), min(a + len(b), addr + nbytes)
            if lo < hi:
                out[lo - addr:hi - addr] = np.frombuffer(b[lo - a:hi - a], np.uint8)
        return out

    async def dump(self, addr: int, nbytes: int, path: str) -> None:
        if self.ram is None:
            data = await self.ddr.dump(Path(path).with_suffix(".hex"), addr, nbytes)
        elif self.ddr is None:
            data = self.ram.read(addr, nbytes)
        else:
            # Each output byte is written through exactly one port: into the AxiRam (hp0) or into
            # the DDR model (the others); the other memory keeps what was loaded there. So the
            # written value is ram ^ ddr ^ loaded, whichever memory holds it.
            ddr = np.frombuffer(await self.ddr.dump(Path(path).with_suffix(".hex"), addr, nbytes), np.uint8)
            ram = np.frombuffer(self.ram.read(addr, nbytes), np.uint8)
            data = (ram ^ ddr ^ self._initial(addr, nbytes)).tobytes()
        Path(path).write_bytes(data)

    async def counters(self) -> dict:
        await self.wr("PERF_CTRL", register("PERF_CTRL").pack(snapshot=1, hold=1))
        out = {}
        for name, _ in PERF_COUNTERS:
            lo = await self.rd(f"{name}_LO")
            hi = await self.rd(f"{name}_HI")
            out[name] = lo | (hi << 32)
        await self.wr("PERF_CTRL", 0)
        return out

    def probe(self, paths) -> dict:
        """Values of internal signals by dotted path under the top (a debugging aid)."""
        out = {}
        for path in paths:
            h = self.dut
            try:
                for part in path.split("."):
                    h = getattr(h, part)
                out[path] = str(h.value)
            except Exception as e:     # noqa: BLE001 - a missing name is reported, not fatal
                out[path] = f"<{type(e).__name__}: {e}>"
        return out

    async def run(self, step: dict) -> dict:
        dut = self.dut
        base, count = int(step["base"]), int(step["count"])
        await self.wr("CMD_BASE_LO", base & 0xFFFFFFFF)
        await self.wr("CMD_BASE_HI", base >> 32)
        await self.wr("CMD_COUNT", count)
        if self.ddr is not None:
            await self.ddr.clear_stats()
        c0 = int(dut.cycle.value) if hasattr(dut, "cycle") else None
        t0 = time.perf_counter()
        await self.wr("CTRL", register("CTRL").pack(start=1, perf_clear=1, irq_enable=1))
        res = {"label": step["label"], "timeout": False}
        if step.get("trace"):
            # Debugging aid: sample signals every cycle for a while (Python per cycle: keep it short).
            rows = []
            for _ in range(int(step["trace"]["cycles"])):
                await RisingEdge(dut.clk)
                rows.append(self.probe(step["trace"]["signals"]))
            res["trace"] = rows
        try:
            if not int(dut.irq.value):
                await with_timeout(RisingEdge(dut.irq), int(step["timeout"]) * PERIOD_NS, "ns")
        except SimTimeoutError:
            res["timeout"] = True
        res["wall_s"] = time.perf_counter() - t0
        if step.get("probe") and (res["timeout"] or step.get("probe_always")):
            res["probe"] = self.probe(step["probe"])
        if c0 is not None:
            res["sim_cycles"] = int(dut.cycle.value) - c0
        st = register("STATUS").unpack(await self.rd("STATUS"))
        res["status"] = st
        res["irq_status"] = await self.rd("IRQ_STATUS")
        await self.wr("IRQ_STATUS", 0b11)
        res["counters"] = await self.counters()
        log = []
        for i in range(min(int(step.get("log", count)), 32, count)):
            await self.wr("CMD_LOG_INDEX", i)
            log.append(await self.rd("CMD_LOG_CYCLES"))
        res["cmd_cycles"] = log
        res["last_cmd_cycles"] = await self.rd("LAST_CMD_CYCLES")
        if self.ddr is not None:
            res["ddr"] = self.ddr.stats()
        for addr, nbytes, path in step["dumps"]:
            await self.dump(int(addr), int(nbytes), path)
        return res


def _pauses(rng: random.Random, prob: float):
    while True:
        yield rng.random() < prob


@cocotb.test()
async def scenario(dut):
    job = json.loads(Path(os.environ["KRIALLM_TOP_JOB"]).read_text())
    out_path = Path(os.environ["KRIALLM_TOP_RESULTS"])
    Clock(dut.clk, PERIOD_NS, unit="ns").start()
    bench = Bench(dut, job)
    await bench.reset()
    results = {"runs": {}, "order": [], "ddr_describe": bench.ddr_cfg.describe() if bench.ddr else None}
    t_start = time.perf_counter()

    def save():
        results["wall_in_sim_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(results, indent=1))

    for step in job["steps"]:
        kind = step["kind"]
        if kind == "load":
            await bench.load(step["regions"])
        elif kind == "ddr":
            changes = dict(step["changes"])
            for k in ("slverr_window", "decerr_window"):
                if k in changes:
                    changes[k] = tuple(changes[k])
            if bench.ddr is not None:
                bench.ddr.configure(**changes)
            await ClockCycles(dut.clk, 2)
        elif kind == "run":
            res = await bench.run(step)
            results["runs"][step["label"]] = res
            results["order"].append(step["label"])
            save()
            if res["timeout"] and not step.get("expect_timeout"):
                break
        elif kind == "soft_reset":
            await bench.wr("CTRL", register("CTRL").pack(soft_reset=1))
            await ClockCycles(dut.clk, 8)
        else:
            raise ValueError(f"unknown scenario step {kind!r}")
    save()
