"""cocotb bench for rtl.fabric_vector.FabricVectorEngine (top: sim/fabric_vector_top.py).

The pytest side (tests/test_fabric_vector.py) writes FVEC_SPEC, a JSON list of cases. Per case the
bench sets the DDR model's run-time registers (back-pressure ``gap_rate``, error windows), loads
the case's memory image, plays its commands one after another (a random delay before each, a
random hold of ``done.ready``), records every answer's code and cycles (command handshake to the
first cycle ``done`` is valid, latched in hardware), and dumps the listed memory ranges. Every
wait has a cycle limit, so a hang is a failure, not a stuck run. The engine is reset once, at the
start: the cases follow each other as a command list would, errors included.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, Timer

from sim.ddr import DdrModelHandle
from sim.fabric_vector_top import FVEC_DDR

PERIOD_NS = 4


async def _wait(dut, cond, limit: int, what: str, poll: int = 8) -> None:
    waited = 0
    while not cond():
        if waited >= limit:
            raise AssertionError(f"timeout after {limit} cycles waiting for {what}")
        await Timer(poll * PERIOD_NS, "ns")
        waited += poll


async def _cycles(n: int) -> None:
    if n:
        await Timer(n * PERIOD_NS, "ns")


@cocotb.test()
async def fabric_vector_cases(dut):
    spec = json.loads(Path(os.environ["FVEC_SPEC"]).read_text())
    rng = random.Random(spec.get("seed", 1))
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, "ns").start())
    ddr = DdrModelHandle(dut.ddr, FVEC_DDR)
    dut.cmd__valid.value = 0
    dut.done__ready.value = 0
    dut.soft_reset.value = 0
    dut.rst.value = 1
    await _cycles(5)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    results = []
    for case in spec["cases"]:
        ddr.configure(FVEC_DDR, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in case["ddr"].items()})
        await FallingEdge(dut.clk)
        if case.get("image"):
            await ddr.load(Path(case["image"]))
        if case.get("soft_reset"):           # the top's reset of an idle engine after an error
            assert not int(dut.busy.value)
            dut.soft_reset.value = 1
            await _cycles(3)
            await FallingEdge(dut.clk)
            dut.soft_reset.value = 0
        out = {"name": case["name"], "codes": [], "cycles": []}
        for payload in case["cmds"]:
            await _cycles(rng.randrange(case.get("cmd_gap", 0) + 1))
            await FallingEdge(dut.clk)
            dut.cmd__payload.value = int(payload, 16)
            dut.cmd__valid.value = 1
            for _ in range(1000):
                await ReadOnly()
                accepted = bool(dut.cmd__ready.value)
                await FallingEdge(dut.clk)
                if accepted:
                    break
            else:
                raise AssertionError(f"{case['name']}: the engine did not take a command in 1000 cycles")
            dut.cmd__valid.value = 0
            await _wait(dut, lambda: bool(dut.done__valid.value), case["timeout"], f"{case['name']}: done")
            if rng.random() < case.get("done_hold", 0.0):
                await _cycles(rng.randrange(1, 12))
            await FallingEdge(dut.clk)
            dut.done__ready.value = 1
            await ReadOnly()
            assert dut.done__valid.value == 1
            code = int(dut.done__payload.value)
            await FallingEdge(dut.clk)
            dut.done__ready.value = 0
            out["codes"].append(code)
            out["cycles"].append(int(dut.t_done.value) - int(dut.t_cmd.value))
        await _wait(dut, lambda: not int(dut.busy.value), 2000, f"{case['name']}: idle after the last answer")
        out["stats"] = ddr.stats()
        for addr, nbytes, path in case.get("dumps", []):
            data = await ddr.dump(Path(path + ".hex"), addr, nbytes)
            Path(path).write_bytes(data)
        results.append(out)
        Path(spec["results"]).write_text(json.dumps(results, indent=1))
