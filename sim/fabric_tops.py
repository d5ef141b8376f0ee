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

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, ResetInserter, ResetSignal, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from rtl.fabric_attend import READ_PORTS, FabricAttendEngine
from rtl.fabric_cmd import fabric_done_layout, fabric_op_layout

from .ddr import MODEL_SOURCE, DdrModelConfig, model_port_widths

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
        conns = {}
        for name, (direction, width) in model_port_widths(ddr).items():
            per_port = []
            for p in range(ddr.ports):
                if name.startswith(("ar", "r")):
                    per_port.append(getattr(readers[p], name) if p < len(readers) else None)
                else:
                    per_port.append(getattr(eng.wr, name) if p == ddr.ports - 1 else None)
            if direction == "input":
                conns[f"i_s_axi_{name}"] = Cat(*[Const(1 if name in ("rready", "bready") else 0, width)
                                                 if sig is None else sig for sig in per_port])
            else:
                vec = Signal(width * ddr.ports, name=f"ddr_{name}")
                conns[f"o_s_axi_{name}"] = vec
                for p, sig in enumerate(per_port):
                    if sig is not None:
                        m.d.comb += sig.eq(vec[p * width:(p + 1) * width])
        params = {f"p_{k}": (Const(v, 64) if k == "MEM_BASE" else v) for k, v in ddr.verilog_parameters().items()}
        m.submodules.ddr = Instance(
            "hp_ddr_model", i_clk=ClockSignal("sync"), i_rst=ResetSignal("sync"), **params, **conns,
            o_stat_bytes_read=Signal(64), o_stat_bytes_written=Signal(64), o_stat_cycles=Signal(64),
            o_stat_protocol_errors=Signal(32))
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
