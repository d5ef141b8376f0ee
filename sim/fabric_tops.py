"""Simulation top of the fabric engines on the DDR model, and its build.

`FabricAttendBench`: an rtl.fabric_attend.FabricAttendEngine (under a ResetInserter on
``soft_rst``) on ``hp_ddr_model`` (instance ``ddr``): rd0 (K codes) on port 0, rd1 (V codes)
on port 1, rd2 (queries and scales) on port 2, the writes on port 3. The engine's ``cmd`` and
``done`` streams, ``busy`` and ``abort`` are top-level ports for the cocotb bench
(sim/tb_fabric_attend.py); ``cycle`` counts clock cycles since reset.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from amaranth.hdl import Module, ResetInserter
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from rtl.fabric_attend import READ_PORTS, FabricAttendEngine
from rtl.fabric_cmd import fabric_done_layout, fabric_op_layout

from .axi_tops import ddr_model
from .ddr import MODEL_SOURCE, DdrModelConfig

__all__ = ["FabricAttendBench", "fabric_attend_sources", "ATTEND_DDR"]

# Four ports (K, V, queries + scales, writes), 1 MiB of memory: the benches' images are small.
ATTEND_DDR = DdrModelConfig(ports=4, mem_bytes=1 << 20)


class FabricAttendBench(wiring.Component):
    def __init__(self, ddr: DdrModelConfig, **engine):
        self._ddr = ddr.validate()
        self.engine = FabricAttendEngine(addr_width=ddr.addr_width, **engine)
        aw = ddr.addr_width
        super().__init__({
            "cmd": In(stream.Signature(fabric_op_layout(aw))),
            "done": Out(stream.Signature(fabric_done_layout())),
            "busy": Out(1),
            "abort": In(1),
            "soft_rst": In(1),
            "cycle": Out(64),
            "unit_busy": Out(32),
            "unit_wait": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        ddr, eng = self._ddr, self.engine
        m.submodules.engine = ResetInserter(self.soft_rst)(eng)
        wiring.connect(m, wiring.flipped(self.cmd), eng.cmd)
        wiring.connect(m, eng.done, wiring.flipped(self.done))
        m.d.comb += [self.busy.eq(eng.busy), eng.abort.eq(self.abort), self.unit_busy.eq(eng.perf_unit_busy),
                     self.unit_wait.eq(eng.perf_unit_wait)]
        m.d.sync += self.cycle.eq(self.cycle + 1)

        readers = [getattr(eng, f"rd{i}") for i in range(READ_PORTS)]

        def member(name, p):      # reader i on port i, the writer on the last port
            if name.startswith(("ar", "r")):
                return getattr(readers[p], name) if p < len(readers) else None
            return getattr(eng.wr, name) if p == ddr.ports - 1 else None
        ddr_model(m, ddr, member)
        return m


def fabric_attend_sources(engine: dict, ddr: DdrModelConfig = ATTEND_DDR) -> tuple[list[Path], str, str]:
    """(sources, build name, toplevel) of a FabricAttendBench with `engine`'s parameters."""
    from amaranth.back import verilog
    from .runner import write_verilog
    bench = FabricAttendBench(ddr, **engine)
    name = "fattn_d{head_dim}_g{group}_m{macs}_n{max_positions}_t{max_tokens}".format(**engine)
    src = write_verilog(verilog.convert(bench, name=name), name)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:10]
    return [MODEL_SOURCE, src], f"{name}-{ddr.build_key}-{digest}", name
