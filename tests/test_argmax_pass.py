"""ArgmaxPass (rtl/argmax_pass.py) in Amaranth's simulator: ARGMAX commands' last output row read
back from a modeled memory with random stalls, reduced, and answered in order; other answers
pass through untouched; a read error answers READ_ERROR and the next pass is right again."""

from __future__ import annotations

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from rtl.argmax_pass import ArgmaxPass
from sw.contract.commands import ErrorCode, output_layout
from sw.contract.fabric_ops import argmax_first

R = 32
MEM = 1 << 20


def _logits(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32) * 4
    if kind == "ties":                       # the maximum several times: the first index wins
        x[rng.choice(n, 5, replace=False)] = np.float32(100.0)
    elif kind == "nan":                      # NaN counts as -inf
        x[rng.choice(n, 3, replace=False)] = np.float32(np.nan)
    elif kind == "all-neg-inf":
        x[:] = np.float32(-np.inf)
    elif kind == "zeros":                    # +0.0 and -0.0 are equal
        x[:] = np.float32(-0.0)
        x[n // 2] = np.float32(0.0)
    return x


def _cases(rng: np.random.Generator):
    """(op fields, logits or None, datapath error) for a run of commands."""
    cases, addr = [], 0x1000
    for i, (n, t, kind, argmax) in enumerate([
            (151, 1, "normal", True), (64, 3, "normal", False), (1000, 8, "ties", True), (5, 2, "nan", True),
            (33, 1, "all-neg-inf", True), (96, 4, "zeros", True), (700, 1, "normal", True)]):
        lay = output_layout(n, t, R)
        x = _logits(rng, n, kind) if argmax else None
        cases.append(dict(index=i, n=n, tokens=t, out_addr=addr, argmax=int(argmax), stride=lay.stride, x=x))
        addr += lay.total_bytes + 64 * int(rng.integers(0, 4))
    return cases


@pytest.mark.parametrize("seed, stall", [(1, 0.0), (2, 0.4), (3, 0.7)])
def test_argmax_pass(seed, stall):
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    mem = np.zeros(MEM, np.uint8)
    cases = _cases(rng)
    fail_read = seed == 3                     # the first ARGMAX pass of this run gets a read error
    for c in cases:
        if c["x"] is not None:
            row = c["out_addr"] + (c["tokens"] - 1) * c["stride"]
            mem[row:row + 4 * c["n"]] = c["x"].view(np.uint8)
            # the padded rows and the other token rows hold values that must not count
            mem[row + 4 * c["n"]:row + 4 * c["n"] + 64] = np.full(16, 1e30, np.float32).view(np.uint8)
            if c["tokens"] > 1:
                mem[c["out_addr"]:c["out_addr"] + 4 * c["n"]] = np.full(c["n"], 1e30, np.float32).view(np.uint8)
    dut = ArgmaxPass(R, addr_width=32, in_flight=2)
    answers, results = [], []
    state = {"reads": 0, "error_sent": False}

    async def bench(ctx):
        """One process plays the command processor, the datapath and the read master, cycle by
        cycle: inputs are set, the design's outputs sampled after settling, then the clock ticks."""
        to_send = list(cases)
        queue = []                   # commands the datapath holds, oldest first
        read = None                  # [addr, beats, beat, error_at] of the transfer in progress
        drain = 0
        holding = False              # a valid answer stays valid until it is taken (stream rule)
        data_held = False
        for _ in range(20_000):
            if len(answers) == len(cases):
                break
            # command processor side
            ctx.set(dut.op_in.valid, int(bool(to_send)))
            if to_send:
                c = to_send[0]
                for f in ("index", "n", "tokens", "out_addr", "argmax"):
                    ctx.set(getattr(dut.op_in.payload, f), c[f])
            ctx.set(dut.op_out.ready, int(prng.random() > stall))
            ctx.set(dut.done_out.ready, int(prng.random() > stall))
            # datapath side: answer the oldest held command (command 1 fails)
            answer = bool(queue) and (holding or prng.random() > stall)
            holding = answer
            err = bool(queue) and queue[0] == 1
            ctx.set(dut.done_in.valid, int(answer))
            ctx.set(dut.done_in.payload.error, int(err))
            ctx.set(dut.done_in.payload.error_code, int(ErrorCode.WRITE_ERROR) if err else 0)
            # read master side
            ctx.set(dut.rd_cmd.ready, int(read is None and drain == 0))
            ctx.set(dut.rd_error, 0)
            go = False
            if read is not None:
                addr, beats, b, error_at = read
                if b == error_at:
                    ctx.set(dut.rd_error, 1)
                    ctx.set(dut.rd_data.valid, 0)
                else:
                    go = data_held or prng.random() > stall
                    data_held = go
                    ctx.set(dut.rd_data.valid, int(go))
                    ctx.set(dut.rd_data.payload.data,
                            int.from_bytes(mem[addr + 16 * b:addr + 16 * b + 16].tobytes(), "little"))
                    ctx.set(dut.rd_data.payload.last, int(b == beats - 1))
            else:
                ctx.set(dut.rd_data.valid, 0)
            ctx.set(dut.rd_busy, int(read is not None or drain > 0))
            # sample
            op_fire = ctx.get(dut.op_out.valid) and ctx.get(dut.op_out.ready)
            in_fire = ctx.get(dut.op_in.valid) and ctx.get(dut.op_in.ready)
            assert op_fire == in_fire
            if op_fire:
                queue.append(ctx.get(dut.op_out.payload.index))
                assert ctx.get(dut.op_out.payload.n) == to_send[0]["n"]
                to_send.pop(0)
            if answer and ctx.get(dut.done_in.ready):
                queue.pop(0)
                holding = False
            if ctx.get(dut.done_out.valid) and ctx.get(dut.done_out.ready):
                answers.append((ctx.get(dut.done_out.payload.error), ctx.get(dut.done_out.payload.error_code)))
            if ctx.get(dut.result_we):
                results.append((ctx.get(dut.result_index), ctx.get(dut.result_value)))
            if read is None and ctx.get(dut.rd_cmd.valid) and ctx.get(dut.rd_cmd.ready):
                beats = ctx.get(dut.rd_cmd.payload.beats)
                error_at = beats // 2 if fail_read and not state["error_sent"] else -1
                state["error_sent"] |= error_at >= 0
                read = [ctx.get(dut.rd_cmd.payload.addr), beats, 0, error_at]
                state["reads"] += 1
            elif read is not None:
                if read[2] == read[3]:
                    assert ctx.get(dut.rd_clear)
                    read, drain = None, 5          # the master drains a few cycles more
                elif go and ctx.get(dut.rd_data.ready):
                    read[2] += 1
                    data_held = False
                    if read[2] == read[1]:
                        read = None
            drain = max(0, drain - 1)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()

    want_answers, want_results = [], []
    failed_once = False
    for c in cases:
        if c["index"] == 1:
            want_answers.append((1, int(ErrorCode.WRITE_ERROR)))
        elif c["argmax"] and fail_read and not failed_once:
            failed_once = True
            want_answers.append((1, int(ErrorCode.READ_ERROR)))
        else:
            want_answers.append((0, 0))
            if c["argmax"]:
                i = int(argmax_first(c["x"]))
                v = c["x"][i]
                bits = 0xFF800000 if np.isnan(v) else int(np.float32(v).view(np.uint32))
                want_results.append((i, bits))
    assert answers == want_answers
    assert results == want_results
    assert state["reads"] == sum(1 for c in cases if c["argmax"])
