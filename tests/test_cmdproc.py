"""CommandProcessor: the descriptor decoder and checker against sw.contract.commands (Amaranth sim),
then whole runs in cocotb + Verilator with AxiRamRead holding the command lists."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
from amaranth.hdl import Const
from amaranth.sim import Simulator

from rtl.cmdproc import CommandProcessor, DescriptorChecker, descriptor_layout, op_layout
from sw.contract.config import preset
from sw.contract.commands import (DESCRIPTOR_FIELDS, WEIGHT_KIND_INT4, WEIGHT_KIND_INT8, HardwareLimits,
                         LinearCommand, linear_command, pack_command, validate_command)

REPO = Path(__file__).resolve().parent.parent


# The structural tests build components they never elaborate; drop them quietly.
pytestmark = [pytest.mark.filterwarnings("ignore::amaranth.hdl._ir.UnusedElaboratable"),
              pytest.mark.usefixtures("collect_unelaborated")]


def test_descriptor_layout_is_the_sw_table():
    layout = descriptor_layout()
    for name, off, _, _ in DESCRIPTOR_FIELDS:
        assert layout[name].offset == 8 * off
    cmd = linear_command(n=896, k=4864, group_size=64, tokens=8, tile_rows=32, weight_addr=0x1234_5640,
                         act_addr=0x80, out_addr=0xFFFF_FFC0, bias_addr=0x4000, tag=0xA5A5_0001)
    value = int.from_bytes(pack_command(cmd), "little")
    view = Const(value, layout.size)
    for name, off, fmt, _ in DESCRIPTOR_FIELDS:
        sl = layout[name]
        assert (value >> sl.offset) & ((1 << sl.width) - 1) == getattr(cmd, name), name
    assert len(view) == 512


def _random_descriptor(rng: random.Random, hw: HardwareLimits) -> LinearCommand:
    g, a = hw.group_size, lambda: rng.randrange(0, 1 << hw.addr_bits, 64)

    def far():   # an aligned address out of range (or, when every address is in range, a misaligned one)
        return 1 << rng.randint(hw.addr_bits, 63) if hw.addr_bits < 64 else 1 << rng.randint(0, 5)

    cmd = linear_command(n=rng.randint(1, 200_000), k=g * rng.randint(1, 80), group_size=g,
                         tokens=rng.randint(1, hw.tokens), tile_rows=hw.tile_rows, weight_addr=a(), act_addr=a(),
                         out_addr=a(), bias_addr=a() if rng.random() < 0.5 else None,
                         weight_int8=rng.random() < 0.2, tag=rng.randrange(1 << 32))
    mutations = {
        "opcode": lambda: rng.choice([0, 2, 255]),
        "version": lambda: rng.choice([0, 2, 255]),
        "flags": lambda: cmd.flags | (1 << rng.randint(2, 15)),
        "reserved0": lambda: 1 << rng.randint(0, 15),
        "reserved1": lambda: 1 << rng.randint(0, 63),
        "n": lambda: 0,
        "k": lambda: rng.choice([0, cmd.k + rng.randint(1, g - 1), g // 2]),
        "tokens": lambda: rng.choice([0, hw.tokens + rng.randint(1, 5), 0xFFFF]),
        "group_size": lambda: rng.choice([16, 32, 64, 128, 0, g * 2, g + 1]),
        "tile_rows": lambda: rng.choice([0, hw.tile_rows * 2, hw.tile_rows + 2]),
        "weight_addr": lambda: rng.choice([cmd.weight_addr | rng.randint(1, 63), far()]),
        "act_addr": lambda: rng.choice([cmd.act_addr | rng.randint(1, 63), far()]),
        "out_addr": lambda: rng.choice([cmd.out_addr | rng.randint(1, 63), far()]),
        "bias_addr": lambda: rng.choice([cmd.bias_addr | rng.randint(1, 63), far() | 64]),
    }
    for name in rng.sample(list(mutations), rng.choice([0, 1, 1, 1, 2, 3])):
        cmd = cmd.replace(**{name: mutations[name]()})
    return cmd


@pytest.mark.parametrize("kinds,addr_bits", [(WEIGHT_KIND_INT4, 40), (WEIGHT_KIND_INT8, 32),
                                             (WEIGHT_KIND_INT4 | WEIGHT_KIND_INT8, 64)])
def test_checker_equals_validate_command(kinds, addr_bits):
    hw = HardwareLimits(tile_rows=32, tokens=8, group_size=64, weight_kinds=kinds, addr_bits=addr_bits)
    rng = random.Random(kinds * 100 + addr_bits)
    cmds = [_random_descriptor(rng, hw) for _ in range(1500)]
    want = [int(validate_command(c, hw)) for c in cmds]
    assert len(set(want)) >= 10, f"the random descriptors cover too few outcomes: {sorted(set(want))}"
    dut = DescriptorChecker(hw)
    got = []

    async def tb(ctx):
        for c in cmds:
            ctx.set(dut.desc.as_value(), int.from_bytes(pack_command(c), "little"))
            got.append(ctx.get(dut.code))

    sim = Simulator(dut)
    sim.add_testbench(tb)
    sim.run()
    bad = [(i, cmds[i], w, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"


def test_processor_facts():
    cfg = preset("test-4x4-g32")
    cp = CommandProcessor(cfg)
    assert cp.config_hash == cfg.config_hash
    assert cp.descriptor_beats == 4
    assert cp.limits == HardwareLimits(tile_rows=4, tokens=2, group_size=32, weight_kinds=WEIGHT_KIND_INT4,
                                       addr_bits=40)
    assert CommandProcessor(preset("test-8x16-g64")).descriptor_beats == 1
    assert op_layout(40)["out_addr"].width == 40


# ---------------------------------------------------------------------------
# cocotb
# ---------------------------------------------------------------------------

CASES = {
    # config, address bits, tests (None = all but the fabric decoder's), ops in flight
    "4x4-g32-128b": ("test-4x4-g32", 32, None, 1),
    "8x16-g64-512b": ("test-8x16-g64", 36, "runs_log_counters_irq|bad_commands_not_executed", 1),
    # kv260-fabric's command processor (limits with max_context), two ops in flight as in the top
    "kv260-fabric": ("kv260-fabric", 32, "fabric_ops|bad_commands_not_executed", 2),
}


@pytest.mark.sim
@pytest.mark.parametrize("case", list(CASES))
def test_cmdproc_cocotb(case, tmp_path):
    from amaranth.back import verilog

    from sim.runner import run_cocotb, write_verilog
    from sim.tb_cmdproc import cmdproc_harness
    from sw.contract.commands import register

    from rtl.fabric_cmd import fabric_op_layout
    from sw.contract.commands import HardwareLimits

    name, addr_width, filt, in_flight = CASES[case]
    cfg = preset(name)
    limits = HardwareLimits.from_config(cfg, addr_bits=addr_width)   # the RTL top refuses fabric configs yet
    top = cmdproc_harness(cfg, addr_width=addr_width, limits=limits, ops_in_flight=in_flight)
    lim = top.cmdproc.limits
    spec = {
        "op_fields": {k: [f.offset, f.width] for k, f in op_layout(addr_width)
                      if lim.fabric_ops or k != "argmax"},
        "ops_in_flight": in_flight,
        "limits": dataclasses.asdict(lim),
        "config_hash": cfg.config_hash,
        "hw_params0": {"rows": cfg.rows, "cols": cfg.cols, "tokens": cfg.tokens, "group_size": cfg.group_size},
        "hw_params1": {"engines": cfg.engines, "weight_kinds": lim.weight_kinds, "cmd_log_depth": 32,
                       "beat_bytes": cfg.port_bits // 8},
        "hw_params2": {"addr_bits": addr_width, "clock_mhz": cfg.clock_mhz},
    }
    assert set(spec["hw_params0"]) == {f.name for f in register("HW_PARAMS0").fields}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    src = write_verilog(verilog.convert(top, name="cmdproc_harness"), "cmdproc_harness")
    env = {"CMDPROC_SPEC": str(tmp_path / "spec.json")}
    if lim.fabric_ops:
        spec["fabric_fields"] = {k: [f.offset, f.width] for k, f in fabric_op_layout(addr_width)}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
    env["COCOTB_TEST_FILTER"] = filt or "^(?!.*fabric_ops)"
    run_cocotb(sources=[src], toplevel="cmdproc_harness", test_module="tb_cmdproc",
               build_name=f"cmdproc-{case}", extra_env=env, test_dir=REPO / "sim")
