"""The accelerator top (rtl/top.py, rtl/engine.py, rtl/readmux.py) end to end.

Python level: the port set the board flow expects, the engine geometry, the
read arbiter in Amaranth's simulator.

cocotb + Verilator (sim/top_tb.py builds the tops, sim/tb_top.py plays the
scenarios; weight streaming runs free in Verilator, cocotb only touches the
registers, and every wait has a cycle limit). Outputs are compared as uint32
bit patterns with sw.contract.numerics.golden_linear and with the golden device's
CommandExecutor run on the same memory image. Three builds:

* SMALL: test-4x4-g32 with one engine (two array beats per port beat, 4-row
  tiles whose output rows need zero padding, a 1-beat meta block), hp0 on the
  DDR model or, switched at run time, on cocotbext-axi's AxiRam;
* LITE: the kv260 engine (R=32, C=1, g64) with 2 token lanes and 2 engines;
* FULL (slow tests only): the kv260 preset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sw.contract.config import preset
from sim.top_tb import (SIM_DDR, Scenario, Workspace, build_sim_top, compare_bits, golden_run, put_commands,
                        random_linear, run_scenario)
from sw.contract.commands import ErrorCode

pytestmark = pytest.mark.sim

SMALL = preset("test-4x4-g32").replace(engines=1)
SMALL_DDR = SIM_DDR.replace(ports=1, mem_bytes=16 << 20)
SMALL_MAX_K = 1024
LITE = preset("kv260").replace(tokens=2, engines=2)
LITE_DDR = SIM_DDR.replace(ports=2)
FULL = preset("kv260")
FULL_DDR = SIM_DDR

# Qwen2.5-0.5B linears (N, K, bias)
QWEN_LINEARS = [("q_proj", 896, 896, True), ("k_proj", 128, 896, True), ("v_proj", 128, 896, True),
                ("o_proj", 896, 896, False), ("gate_proj", 4864, 896, False), ("up_proj", 4864, 896, False),
                ("down_proj", 896, 4864, False)]
LM_HEAD_SLICE = ("lm_head_slice", 4096, 896, False)


# ---------------------------------------------------------------------------
# Python level
# ---------------------------------------------------------------------------

def _unused(obj):
    """Mark a component built only to read its facts (no UnusedElaboratable warning at exit)."""
    obj._MustUse__silence = True
    return obj


def test_ports_match_the_board_flow():
    from boards.kv260 import TopPorts
    from rtl.top import Accelerator
    for cfg in (FULL, LITE, SMALL):
        top = _unused(Accelerator(cfg))
        ports = TopPorts.from_component(top, cfg)
        assert len(ports.hp) == cfg.engines and ports.csr_data_bits == 32


def test_geometry_facts():
    from rtl.engine import Geometry
    g = Geometry(FULL)
    assert (g.meta_beats, g.weight_beats_per_group, g.group_beats) == (5, 64, 69)
    assert (g.bias_beats, g.y_beats, g.sub_beats, g.blocks, g.max_groups, g.meta_words) == (8, 8, 1, 304, 76, 19)
    s = Geometry(SMALL, max_k=SMALL_MAX_K)
    assert (s.meta_beats, s.weight_beats_per_group, s.sub_beats, s.bias_beats, s.y_beats) == (1, 4, 2, 1, 1)


def test_geometry_refusals():
    from rtl.engine import Geometry
    from sw.contract.errors import ConfigError
    with pytest.raises(ConfigError, match="128-bit"):
        Geometry(preset("test-8x16-g64"))
    with pytest.raises(ConfigError, match="max_k"):
        Geometry(FULL, max_k=100)
    from rtl.cmdproc import CommandProcessor
    from rtl.top import Accelerator
    with pytest.raises(ConfigError, match="ops_in_flight"):
        Accelerator(FULL, ops_in_flight=3)
    with pytest.raises(ConfigError, match="ops_in_flight"):
        CommandProcessor(FULL, ops_in_flight=0)
    assert _unused(Accelerator(FULL)).ops_in_flight == 2



def test_a_bad_top_is_refused_before_anything_is_built():
    """A top the RTL cannot build is refused with one ConfigError from the constructor, with no
    half-built Amaranth module left behind (no UnusedElaboratable warning on stderr).
    Run in a fresh interpreter so that no other test's objects can be collected beside it."""
    import subprocess
    import sys
    script = (
        "import gc, warnings\n"
        "warnings.simplefilter('always')\n"
        "from rtl.top import build_top\n"
        "from sw.contract.config import preset\n"
        "from sw.contract.errors import ConfigError\n"
        "try:\n"
        "    build_top(preset('kv260-fabric'), ops_in_flight=3)\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "gc.collect()\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ops_in_flight must be 1..2, got 3" in done.stdout
    assert "UnusedElaboratable" not in done.stderr, done.stderr


def test_read_arbiter_routes_by_id():
    """Three managers with distinct ARIDs share one port: every AR gets through once (round
    robin, never two in a cycle), every R beat reaches only the manager of its RID."""
    from amaranth.sim import Simulator
    from rtl.readmux import AxiReadArbiter

    arb = AxiReadArbiter([0, 1, 2], addr_width=32)

    async def bench(ctx):
        got = []
        mgrs = [arb.m0, arb.m1, arb.m2]
        for i, mg in enumerate(mgrs):
            ctx.set(mg.arvalid, 1)
            ctx.set(mg.araddr, 0x1000 * (i + 1))
            ctx.set(mg.arid, i)
            ctx.set(mg.rready, 1)
        ctx.set(arb.bus.arready, 1)
        for _ in range(8):
            taken = [i for i, mg in enumerate(mgrs) if ctx.get(mg.arvalid) and ctx.get(mg.arready)]
            assert len(taken) <= 1
            if ctx.get(arb.bus.arvalid):
                got.append((ctx.get(arb.bus.araddr), ctx.get(arb.bus.arid)))
            await ctx.tick()
            for i in taken:
                ctx.set(mgrs[i].arvalid, 0)
        assert sorted(got) == [(0x1000, 0), (0x2000, 1), (0x3000, 2)], got
        for rid in (2, 0, 1):
            ctx.set(arb.bus.rvalid, 1)
            ctx.set(arb.bus.rid, rid)
            ctx.set(arb.bus.rdata, 0xA0 + rid)
            await ctx.delay(1e-9)
            assert [ctx.get(mg.rvalid) for mg in mgrs] == [int(i == rid) for i in range(3)]
            assert ctx.get(arb.bus.rready) == 1
            await ctx.tick()

    sim = Simulator(arb)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


# ---------------------------------------------------------------------------
# Helpers for the simulation tests
# ---------------------------------------------------------------------------

def _ddr_dict(ddr):
    return dataclasses.asdict(ddr)


def _check_outputs(res, label, linears, dumps, golden_mem=None):
    run = res["runs"][label]
    assert not run["timeout"], f"{label}: timed out: {run}"
    st = run["status"]
    assert st["done"] == 1 and st["error"] == 0 and st["busy"] == 0, f"{label}: {st}"
    for lin, (addr, nbytes, path) in zip(linears, dumps):
        got = Path(path).read_bytes()
        compare_bits(got, lin.expected, f"{label}/{lin.name} vs golden_linear")
        if golden_mem is not None:
            compare_bits(got, golden_mem[addr:addr + nbytes].tobytes(), f"{label}/{lin.name} vs CommandExecutor")
    assert run["ddr"]["protocol_errors"] == 0 if "ddr" in run else True


def _small_list(ws, cfg, rng, n_cmds=8):
    shapes = [(4, 32, 1, True), (6, 64, 2, False), (13, 96, 2, True), (32, 160, 1, False), (5, 32, 2, True),
              (17, 64, 1, True), (8, 128, 2, False), (3, 96, 1, False)]
    lins = [random_linear(ws, cfg, n, k, t, rng, bias=b, name=f"c{i}")
            for i, (n, k, t, b) in enumerate(shapes[:n_cmds])]
    return lins


# ---------------------------------------------------------------------------
# SMALL build: DDR model and AxiRam
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_build():
    return build_sim_top(SMALL, SMALL_DDR, max_k=SMALL_MAX_K, external=True)


def test_small_bitexact_and_backpressure(small_build, tmp_path):
    """A list of commands with odd shapes (N not a multiple of R, one or two tokens, with and
    without bias), a read-after-write hazard (one command's bias is the previous command's
    output) and a write-after-write one (two commands share an output buffer); then the same
    list with 30 % random back-pressure on every channel of the DDR model. Bit-exact both times."""
    rng = np.random.default_rng(11)
    ws = Workspace(limit=SMALL_DDR.mem_bytes)
    lins = _small_list(ws, SMALL, rng)
    # RAW right after c0: its bias is c0's output row (N=4, T=1: 16 bytes of fp32, the bias layout)
    raw = random_linear(ws, SMALL, 4, 64, 1, rng, bias=True, name="raw")
    raw_cmd = raw.cmd.replace(bias_addr=lins[0].out_addr)
    # WAW right after c3: it writes where c3 wrote
    waw = random_linear(ws, SMALL, 32, 160, 1, rng, bias=False, name="waw")
    waw_cmd = waw.cmd.replace(out_addr=lins[3].out_addr)
    cmds = [lins[0].cmd, raw_cmd] + [lin.cmd for lin in lins[1:4]] + [waw_cmd] + [lin.cmd for lin in lins[4:]]
    base = put_commands(ws, cmds)
    result, mem = golden_run(ws, SMALL, base, len(cmds))
    assert result.error == ErrorCode.NONE

    sc = Scenario(tmp_path, ddr=_ddr_dict(SMALL_DDR))
    sc.load(ws)
    outs = [(lin.out_addr, lin.out_bytes, lin.name) for lin in lins] + [(raw.out_addr, raw.out_bytes, "raw")]
    sc.run("plain", base, len(cmds), timeout=100_000, dumps=outs)
    first = len(sc.steps) - 1
    sc.configure_ddr(gap_rate=0.3, seed=5)
    sc.run("gaps", base, len(cmds), timeout=300_000, dumps=outs)
    res = run_scenario(small_build, sc)
    for label, step in (("plain", sc.steps[first]), ("gaps", sc.steps[-1])):
        dumps = step["dumps"]
        # c3's buffer ends up holding waw's result; every other buffer its own command's.
        _check_outputs(res, label, [lin for i, lin in enumerate(lins) if i != 3],
                       [d for i, d in enumerate(dumps[:len(lins)]) if i != 3], mem)
        compare_bits(Path(dumps[3][2]).read_bytes(), mem[dumps[3][0]:dumps[3][0] + dumps[3][1]].tobytes(),
                     f"{label}/waw vs CommandExecutor")
        compare_bits(Path(dumps[-1][2]).read_bytes(),
                     mem[raw.out_addr:raw.out_addr + raw.out_bytes].tobytes(), f"{label}/raw vs CommandExecutor")
        run = res["runs"][label]
        assert run["status"]["cmd_index"] == len(cmds)
        assert sum(run["cmd_cycles"]) == run["counters"]["BUSY_CYCLES"]
        want_read = sum(lin.bytes_read for lin in lins) + raw.bytes_read + waw.bytes_read + 64 * len(cmds)
        assert run["counters"]["BYTES_READ"] == want_read == run["ddr"]["bytes_read"]
        assert run["counters"]["BYTES_WRITTEN"] == run["ddr"]["bytes_written"]
    assert res["runs"]["gaps"]["cmd_cycles"] != res["runs"]["plain"]["cmd_cycles"]


def test_small_axiram_third_party(small_build, tmp_path):
    """hp0 on cocotbext-axi's AxiRam with 30 % pauses on all five channels: bit-exact."""
    rng = np.random.default_rng(12)
    ws = Workspace(limit=1 << 20)
    lins = _small_list(ws, SMALL, rng, n_cmds=5)
    base = put_commands(ws, [lin.cmd for lin in lins])
    _, mem = golden_run(ws, SMALL, base, len(lins))
    sc = Scenario(tmp_path, ddr=_ddr_dict(SMALL_DDR), axiram={"size": 1 << 20, "pause": 0.3, "seed": 3})
    sc.load(ws)
    outs = [(lin.out_addr, lin.out_bytes, lin.name) for lin in lins]
    sc.run("axiram", base, len(lins), timeout=400_000, dumps=outs)
    res = run_scenario(small_build, sc)
    _check_outputs(res, "axiram", lins, sc.steps[-1]["dumps"], mem)


def test_small_errors_and_bad_commands(small_build, tmp_path):
    """SLVERR in a weight stream, DECERR on the activations and on the outputs: STATUS.error with
    READ_ERROR / WRITE_ERROR at the failing command (the first of the run, so the index is
    unambiguous with two commands in flight), the run stops, nothing hangs. Bad
    commands (zero shape, misaligned address, K above the activation buffer) are reported with
    their index and never executed. After a soft reset, and after each error, a run is exact."""
    rng = np.random.default_rng(13)
    ws = Workspace(limit=SMALL_DDR.mem_bytes)
    good = _small_list(ws, SMALL, rng, n_cmds=3)
    good_base = put_commands(ws, [lin.cmd for lin in good])
    victim = random_linear(ws, SMALL, 32, 160, 2, rng, bias=True, name="victim")
    after = random_linear(ws, SMALL, 8, 64, 1, rng, bias=False, name="after")
    v_base = put_commands(ws, [victim.cmd, after.cmd])
    big_k = SMALL_MAX_K + SMALL.group_size
    too_big = random_linear(ws, SMALL, 4, big_k, 1, rng, bias=False, name="too_big")
    bad = {
        "zero_shape": (good[1].cmd.replace(n=0), ErrorCode.ZERO_SHAPE),
        "misaligned": (good[1].cmd.replace(out_addr=good[1].cmd.out_addr + 16), ErrorCode.MISALIGNED_ADDRESS),
        "k_above_buffer": (too_big.cmd, ErrorCode.DATAPATH_ERROR),
    }
    fresh = {name: ws.alloc(good[2].out_bytes) for name in bad}       # never written unless executed
    bad_bases = {name: put_commands(ws, [good[0].cmd, cmd, good[2].cmd.replace(out_addr=fresh[name])])
                 for name, (cmd, _) in bad.items()}
    _, mem = golden_run(ws, SMALL, good_base, len(good))
    w_lo = victim.cmd.weight_addr + 2 * 16 * 5          # inside the first tile's groups
    o_lo = victim.cmd.out_addr

    sc = Scenario(tmp_path, ddr=_ddr_dict(SMALL_DDR))
    sc.load(ws)
    outs = [(lin.out_addr, lin.out_bytes, lin.name) for lin in good]
    limit = 100_000
    sc.run("good0", good_base, len(good), timeout=limit, dumps=outs)
    sc.configure_ddr(slverr_window=(w_lo, w_lo + 16))
    sc.run("slverr_weights", v_base, 2, timeout=limit, dumps=[(after.out_addr, after.out_bytes, "after_slverr")])
    sc.configure_ddr(slverr_window=(0, 0), decerr_window=(victim.cmd.act_addr, victim.cmd.act_addr + 16))
    sc.run("decerr_act", v_base, 2, timeout=limit)
    sc.configure_ddr(decerr_window=(o_lo + 16, o_lo + 32), gap_rate=0.2, seed=9)
    sc.run("decerr_out", v_base, 2, timeout=limit)
    sc.configure_ddr(decerr_window=(0, 0), gap_rate=0.0)
    sc.run("good1", good_base, len(good), timeout=limit, dumps=outs)
    for name, (cmd, code) in bad.items():
        sc.run(f"bad_{name}", bad_bases[name], 3, timeout=limit,
               dumps=[(fresh[name], good[2].out_bytes, f"untouched_{name}")])
    # A soft reset in the middle of a run, then a clean run.
    sc.steps.append({"kind": "run", "label": "interrupted", "base": v_base, "count": 2, "timeout": 60,
                     "dumps": [], "log": 0, "expect_timeout": True})
    sc.soft_reset()
    sc.run("good2", good_base, len(good), timeout=limit, dumps=outs)
    res = run_scenario(small_build, sc)

    def status(label):
        run = res["runs"][label]
        assert not run["timeout"], f"{label} hung: {run}"
        return run["status"]

    _check_outputs(res, "good0", good, [s for s in sc.steps if s.get("label") == "good0"][0]["dumps"], mem)
    for label, code in (("slverr_weights", ErrorCode.READ_ERROR), ("decerr_act", ErrorCode.READ_ERROR),
                        ("decerr_out", ErrorCode.WRITE_ERROR)):
        st = status(label)
        assert (st["done"], st["error"], st["error_code"], st["cmd_index"], st["busy"]) == (1, 1, int(code), 0, 0), \
            (label, st)
    # the command after the failing one never ran: its output buffer is still zero
    dump = [s for s in sc.steps if s.get("label") == "slverr_weights"][0]["dumps"][0]
    assert Path(dump[2]).read_bytes() == bytes(after.out_bytes)
    for name, (cmd, code) in bad.items():
        st = status(f"bad_{name}")
        assert (st["error"], st["error_code"], st["cmd_index"]) == (1, int(code), 1), (name, st)
        untouched = [s for s in sc.steps if s.get("label") == f"bad_{name}"][0]["dumps"][0]
        assert Path(untouched[2]).read_bytes() == bytes(good[2].out_bytes), f"{name}: a later command ran"
    assert res["runs"]["interrupted"]["timeout"]
    for label in ("good1", "good2"):
        _check_outputs(res, label, good, [s for s in sc.steps if s.get("label") == label][0]["dumps"], mem)


def test_q_proj_shape_on_axiram(small_build, tmp_path):
    """The q_proj shape (896 x 896, bias, T=1; 224 tiles of the 4-row SMALL engine, 28 groups of
    32, 32 k beats) with hp0 on cocotbext-axi's AxiRam, 30 % pauses on all five channels: bit-exact."""
    rng = np.random.default_rng(41)
    ws = Workspace(limit=8 << 20)
    lin = random_linear(ws, SMALL, 896, 896, 1, rng, bias=True, name="q_proj_like")
    base = put_commands(ws, [lin.cmd])
    _, mem = golden_run(ws, SMALL, base, 1)
    sc = Scenario(tmp_path, ddr=_ddr_dict(SMALL_DDR), axiram={"size": 8 << 20, "pause": 0.3, "seed": 4})
    sc.load(ws)
    sc.run("axiram", base, 1, timeout=2_000_000, dumps=[(lin.out_addr, lin.out_bytes, lin.name)])
    res = run_scenario(small_build, sc)
    _check_outputs(res, "axiram", [lin], sc.steps[-1]["dumps"], mem)


# ---------------------------------------------------------------------------
# LITE build: the kv260 engine, two engines, two token lanes
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite_build():
    return build_sim_top(LITE, LITE_DDR)


def test_lite_q_proj_and_backpressure(lite_build, tmp_path):
    """Full-size q_proj (896 x 896, bias, T=1) and random shapes with both token lanes, on the
    kv260 engine (R=32, C=1, g64, 5 meta beats per group); then the same list with 25 %
    random back-pressure on both ports. Bit-exact against both references."""
    rng = np.random.default_rng(21)
    ws = Workspace()
    lins = [random_linear(ws, LITE, 896, 896, 1, rng, bias=True, name="q_proj"),
            random_linear(ws, LITE, 100, 192, 2, rng, bias=True, name="r0"),
            random_linear(ws, LITE, 64, 4864, 2, rng, bias=False, name="r1"),
            random_linear(ws, LITE, 33, 64, 1, rng, bias=False, name="r2")]
    base = put_commands(ws, [lin.cmd for lin in lins])
    _, mem = golden_run(ws, LITE, base, len(lins))
    sc = Scenario(tmp_path, ddr=_ddr_dict(LITE_DDR))
    sc.load(ws)
    outs = [(lin.out_addr, lin.out_bytes, lin.name) for lin in lins]
    sc.run("plain", base, len(lins), timeout=200_000, dumps=outs)
    first = sc.steps[-1]
    sc.configure_ddr(gap_rate=0.25, seed=7)
    sc.run("gaps", base, len(lins), timeout=600_000, dumps=outs)
    res = run_scenario(lite_build, sc)
    _check_outputs(res, "plain", lins, first["dumps"], mem)
    _check_outputs(res, "gaps", lins, sc.steps[-1]["dumps"], mem)


# ---------------------------------------------------------------------------
# FULL build: every Qwen2.5-0.5B linear at full size
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_qwen_linears(tmp_path):
    """q, k, v (with bias), o, gate, up, down and a 4096-row LM-head slice at full size, T=1,
    kv260 preset, as one command list: bit-exact, and every linear at >= 90 % of the modeled
    DDR bandwidth (bytes moved / (cycles x 64 B/cycle)); then the same list with random
    back-pressure, bit-exact again."""
    build = build_sim_top(FULL, FULL_DDR)
    rng = np.random.default_rng(31)
    ws = Workspace()
    x = (rng.standard_normal((1, 896))).astype(np.float32)
    lins = [random_linear(ws, FULL, n, k, 1, rng, bias=b, name=name, x=x if k == 896 else None)
            for name, n, k, b in QWEN_LINEARS + [LM_HEAD_SLICE]]
    base = put_commands(ws, [lin.cmd for lin in lins])
    _, mem = golden_run(ws, FULL, base, len(lins))
    sc = Scenario(tmp_path, ddr=_ddr_dict(FULL_DDR))
    sc.load(ws)
    outs = [(lin.out_addr, lin.out_bytes, lin.name) for lin in lins]
    sc.run("layer", base, len(lins), timeout=1_000_000, dumps=outs)
    plain = sc.steps[-1]
    # The same run with 20 % random back-pressure on every channel of every port.
    sc.configure_ddr(gap_rate=0.2, seed=3)
    sc.run("layer_gaps", base, len(lins), timeout=3_000_000, dumps=outs)
    res = run_scenario(build, sc)
    _check_outputs(res, "layer", lins, plain["dumps"], mem)
    _check_outputs(res, "layer_gaps", lins, sc.steps[-1]["dumps"], mem)
    cycles = res["runs"]["layer"]["cmd_cycles"]
    for lin, c in zip(lins, cycles):
        util = (lin.bytes_read + lin.out_bytes + 64) / (c * FULL_DDR.cap_bytes_per_cycle)
        print(f"{lin.name}: {c} cycles, {util:.1%} of the modeled bandwidth")
        assert util >= 0.90, (lin.name, c, util)


@pytest.mark.slow
def test_full_size_qwen_linears_on_axiram(tmp_path):
    """The same full-size command list on the kv260 preset with hp0 (engine 0, the activation loader
    and the descriptor fetcher) on cocotbext-axi's AxiRam, 30 % pauses on all five of its channels,
    and the other three ports on the DDR model with 20 % back-pressure: bit-exact."""
    build = build_sim_top(FULL, FULL_DDR, external=True)
    rng = np.random.default_rng(32)
    ws = Workspace(limit=16 << 20)
    x = (rng.standard_normal((1, 896))).astype(np.float32)
    lins = [random_linear(ws, FULL, n, k, 1, rng, bias=b, name=name, x=x if k == 896 else None)
            for name, n, k, b in QWEN_LINEARS + [LM_HEAD_SLICE]]
    base = put_commands(ws, [lin.cmd for lin in lins])
    _, mem = golden_run(ws, FULL, base, len(lins))
    sc = Scenario(tmp_path, ddr=_ddr_dict(FULL_DDR), axiram={"size": 16 << 20, "pause": 0.3, "seed": 6})
    sc.load(ws)
    sc.configure_ddr(gap_rate=0.2, seed=8)
    outs = [(lin.out_addr, lin.out_bytes, lin.name) for lin in lins]
    sc.run("axiram", base, len(lins), timeout=20_000_000, dumps=outs)
    res = run_scenario(build, sc)
    _check_outputs(res, "axiram", lins, sc.steps[-1]["dumps"], mem)


# ---------------------------------------------------------------------------
# The host driver on the RTL: the `sim` device (sim/device.py)
# ---------------------------------------------------------------------------

def test_sim_device_runs_the_driver_bit_identical(lite_build, tmp_path):
    """sw/driver (AcceleratedModel: buffers, cache syncs, command lists, start/wait) decodes a tiny
    synthetic model on the reduced-kv260 RTL: the same tokens and bit-identical logits as the golden
    runtime. Register accesses go through the AXI4-Lite port, buffers through the DDR model."""
    import types

    from sim.device import SimDevice, open_sim_device
    from sw.cli import main as cli_main
    from sw.driver import open_accelerated
    from sw.runtime import generate, open_model
    from sw.sampling import Sampler, SamplingParams

    assert callable(open_sim_device)
    assert cli_main(["synth-model", "--model-preset", "tiny", "--seed", "2", "--out", str(tmp_path / "tiny")]) == 0
    kq = tmp_path / "tiny.kq"
    assert cli_main(["quantize", str(tmp_path / "tiny"), "--method", "rtn", "--group-size", "64", "--lm-head",
                     "int4", "--quiet", "--out", str(kq)]) == 0
    prompt = [7, 3, 11, 100, 42]
    ref = generate(open_model(kq, "golden", progress=False), prompt, 8, Sampler(SamplingParams()), keep_logits=True)
    dev = SimDevice(LITE, workdir=tmp_path / "sim")
    try:
        assert dev.describe()["accelerator_time"] == "modeled (RTL simulation)"
        model = open_accelerated(kq, "sim", types.SimpleNamespace(fuse=True, timeout=1.0), device=dev)
        got = generate(model, prompt, 8, Sampler(SamplingParams()), keep_logits=True)
        assert got.new_ids == ref.new_ids
        for a, b in zip(got.logits, ref.logits):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        assert model.timings[-1].runs == 4 * 2 + 1            # fused qkv, o, gate/up, down per layer + LM head
        assert model.timings[-1].accel_s > 0
    finally:
        dev.close()

