"""cocotb bench for rtl.fabric_attend.FabricAttendEngine on the DDR model (sim/fabric_tops.py).

The pytest side (tests/test_fabric_attend.py) writes FATTN_JOB (JSON): the memory image, the
DDR model's configuration (random back-pressure), the ops (the packed fabric_op_layout payload,
DDR run-time changes such as error windows before the op, the idle cycles before the command
is offered, an optional abort) and the regions to dump. The bench offers each command with
random idle gaps (junk payloads while not valid), takes ``done`` with random ready, checks
that ``done`` holds its payload until taken and that nothing else answers, and writes the codes,
the cycles (command taken -> answer offered) and the dumps to FATTN_RESULTS (JSON).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.ddr import DdrModelConfig, DdrModelHandle  # noqa: E402


def _ddr_config(raw: dict) -> DdrModelConfig:
    return DdrModelConfig(**{k: (tuple(v) if k.endswith("_window") else v) for k, v in raw.items()})


@cocotb.test(skip=not os.environ.get("FATTN_JOB"))
async def fabric_attend_ops(dut):
    job = json.loads(Path(os.environ["FATTN_JOB"]).read_text())
    rng = random.Random(job["seed"])
    base_cfg = _ddr_config(job["ddr"])
    ddr = DdrModelHandle(dut.ddr, base_cfg, clock=dut.clk)
    p_ready = float(job["p_ready"])
    payload_bits = int(job["payload_bits"])

    Clock(dut.clk, 4, unit="ns").start()
    dut.rst.value = 1
    dut.cmd__valid.value = 0
    dut.done__ready.value = 0
    dut.abort.value = 0
    dut.soft_rst.value = 0
    await ClockCycles(dut.clk, 4)
    ddr.configure()
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 2)
    await ddr.load(Path(job["image"]))

    results = []
    for i, op in enumerate(job["ops"]):
        ddr.configure(base_cfg.replace(**{k: (tuple(v) if k.endswith("_window") else v)
                                          for k, v in op.get("ddr", {}).items()}))
        await ddr.clear_stats()
        payload = int(op["payload"], 16)
        res = {"index": i}
        # idle cycles with junk on the payload, then offer the command until it is taken
        for _ in range(int(op.get("gap", 0))):
            await FallingEdge(dut.clk)
            dut.cmd__valid.value = 0
            dut.cmd__payload.value = rng.getrandbits(payload_bits)
        await FallingEdge(dut.clk)
        dut.cmd__valid.value = 1
        dut.cmd__payload.value = payload
        while True:
            await ReadOnly()
            if int(dut.cmd__ready.value):
                break
            await FallingEdge(dut.clk)
        start = int(dut.cycle.value)
        await FallingEdge(dut.clk)
        dut.cmd__valid.value = 0
        dut.cmd__payload.value = rng.getrandbits(payload_bits)

        abort_after = op.get("abort_after")
        timeout = int(op["timeout"])
        held = None
        cycles = 0
        while True:
            if abort_after is not None and cycles == abort_after:
                dut.abort.value = 1
            else:
                dut.abort.value = 0
            ready = abort_after is None and rng.random() < p_ready
            dut.done__ready.value = int(ready)
            await ReadOnly()
            valid = int(dut.done__valid.value)
            if abort_after is not None:
                assert not valid or cycles <= abort_after, f"op {i}: an answer after the abort"
                if cycles > abort_after and not int(dut.busy.value):
                    res["aborted_after"] = int(dut.cycle.value) - start
                    break
            if held is not None:
                assert valid, f"op {i}: done.valid dropped before the answer was taken"
                assert int(dut.done__payload.value) == held, f"op {i}: done.payload changed while waiting"
            if valid and res.get("answer_cycles") is None:
                res["answer_cycles"] = int(dut.cycle.value) - start
            if valid and ready:
                res["code"] = int(dut.done__payload.value)
                break
            held = int(dut.done__payload.value) if valid else None
            cycles += 1
            assert cycles < timeout, f"op {i}: no answer after {cycles} cycles"
            await FallingEdge(dut.clk)
        await FallingEdge(dut.clk)
        dut.done__ready.value = 0
        dut.abort.value = 0
        if abort_after is not None:
            # the buses are quiet: a reset of the whole engine is now safe
            dut.soft_rst.value = 1
            await ClockCycles(dut.clk, 2)
            await FallingEdge(dut.clk)
            dut.soft_rst.value = 0
        # nothing more may answer
        for _ in range(8):
            await FallingEdge(dut.clk)
            dut.done__ready.value = 1
            await ReadOnly()
            assert not int(dut.done__valid.value), f"op {i}: a second answer"
        await FallingEdge(dut.clk)
        dut.done__ready.value = 0
        assert not int(dut.busy.value), f"op {i}: busy after the answer"
        res["unit_busy"] = int(dut.unit_busy.value)
        res["unit_wait"] = int(dut.unit_wait.value)
        stats = ddr.stats()
        res["ddr"] = {k: stats[k] for k in ("bytes_read", "bytes_written", "read_beats_per_port",
                                            "write_beats_per_port", "protocol_errors", "error_responses")}
        results.append(res)

    ddr.configure(base_cfg)
    for addr, nbytes, path in job["dumps"]:
        data = await ddr.dump(Path(path).with_suffix(".hex"), int(addr), int(nbytes))
        Path(path).write_bytes(data)
    Path(os.environ["FATTN_RESULTS"]).write_text(json.dumps(results, indent=1))
