"""Simulation top for rtl.fabric_vector.FabricVectorEngine on sim/hdl/hp_ddr_model.v.

`FabricVectorBench`: the engine with ``rd0`` on DDR port 0, ``rd1`` on port 1 and ``wr`` on port
2 (the unused halves tied off); top ports ``cmd`` / ``done`` (the engine's streams), ``busy``,
``soft_reset`` (a ResetInserter around the engine, as the integrating top has), ``cycle`` and the latched cycles of the last command handshake (``t_cmd``) and of the first cycle
its ``done`` was valid (``t_done``), so the testbench measures an op without Python per cycle.
The DDR model instance is ``ddr`` (sim/ddr.py's DdrModelHandle drives it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from amaranth.hdl import Module, ResetInserter, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from rtl.fabric_cmd import fabric_done_layout, fabric_op_layout
from rtl.fabric_vector import FabricVectorEngine

from .axi_tops import ddr_model
from .ddr import MODEL_SOURCE, DdrModelConfig

TOP_NAME = "fvec_bench"
# Three ports (rd0, rd1, wr), 16 MiB at 0, 32-bit addresses: every test of the engine uses this build.
FVEC_DDR = DdrModelConfig(ports=3, addr_width=32, mem_bytes=16 << 20, mem_base=0)
FVEC_PARAMS = dict(max_n=8960, max_tokens=8)


class FabricVectorBench(wiring.Component):
    def __init__(self, ddr: DdrModelConfig = FVEC_DDR, **engine):
        self._ddr = ddr.validate()
        self.engine = FabricVectorEngine(addr_width=ddr.addr_width, **engine)
        super().__init__({
            "cmd": In(stream.Signature(fabric_op_layout(ddr.addr_width))),
            "done": Out(stream.Signature(fabric_done_layout())),
            "busy": Out(1),
            "soft_reset": In(1),
            "cycle": Out(64),
            "t_cmd": Out(64),
            "t_done": Out(64),
        })

    def elaborate(self, platform):
        m = Module()
        ddr = self._ddr
        eng = self.engine
        m.submodules.engine = ResetInserter(self.soft_reset)(eng)     # as an integrating top resets it
        wiring.connect(m, wiring.flipped(self.cmd), eng.cmd)
        wiring.connect(m, eng.done, wiring.flipped(self.done))
        m.d.comb += self.busy.eq(eng.busy)
        m.d.sync += self.cycle.eq(self.cycle + 1)
        prev = Signal()
        m.d.sync += prev.eq(eng.done.valid)
        with m.If(eng.cmd.valid & eng.cmd.ready):
            m.d.sync += self.t_cmd.eq(self.cycle)
        with m.If(eng.done.valid & ~prev):
            m.d.sync += self.t_done.eq(self.cycle)

        buses = [eng.rd0, eng.rd1, eng.wr]

        def member(name, p):      # rd0, rd1 on ports 0 and 1, the writer on port 2
            is_read = name.startswith(("ar", "r"))
            return getattr(buses[p], name) if p < len(buses) and (p < 2) == is_read else None
        ddr_model(m, ddr, member)
        return m


def bench_sources(ddr: DdrModelConfig = FVEC_DDR, **engine) -> tuple[list[Path], str, FabricVectorBench]:
    """(sources, build name, the bench) for one engine parameter point; the Verilog is content-hashed."""
    from amaranth.back import verilog

    from .runner import write_verilog
    engine = {**FVEC_PARAMS, **engine}
    bench = FabricVectorBench(ddr, **engine)
    src = write_verilog(verilog.convert(bench, name=TOP_NAME), TOP_NAME)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:10]
    return [MODEL_SOURCE, src], f"{TOP_NAME}-{ddr.build_key}-{digest}", bench
