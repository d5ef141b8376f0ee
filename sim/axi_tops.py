"""Simulation tops for the AXI masters and the DDR model, and their builds.

* `AxiMastersTop`: one `AxiReadMaster` and one `AxiWriteMaster` sharing the
  full AXI4 port ``hp0`` (for cocotbext-axi's `AxiRam`); the command and data
  streams are top-level ports driven by the cocotb test.
* `DdrReadBench`: `ports` read masters on the ports of ``hp_ddr_model``
  (instance ``ddr``), each drained by a hardware sink that folds the data into
  an order-sensitive checksum (so long transfers need no Python per beat), plus
  one write master on port 0's write channels. Used for the throughput numbers.

`run_top` builds once per build name and serialises runs of one build across
pytest-xdist workers (the runner keeps one results file per build and module).
"""

from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from pathlib import Path

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, ResetSignal, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from rtl.axi import (AxiReadMaster, AxiWriteMaster, axi4_signature, connect_read_channels,
                     connect_write_channels, read_data_layout, transfer_command_layout, write_data_layout)

from .ddr import MODEL_SOURCE, DdrModelConfig, model_port_widths, wrapper_verilog

REPO = Path(__file__).resolve().parent.parent
SIM_DIR = REPO / "sim"


def _forward_status(m, self, prefix, master, names):
    for name in names:
        port = getattr(self, f"{prefix}_{name}")
        inner = getattr(master, name)
        if master.signature.members[name].flow == Out:
            m.d.comb += port.eq(inner)
        else:
            m.d.comb += inner.eq(port)


class AxiMastersTop(wiring.Component):
    """A read and a write master on one full AXI4 port ``hp0``."""

    def __init__(self, *, read: dict | None = None, write: dict | None = None,
                 addr_width: int = 40, data_width: int = 128, id_width: int = 6):
        read = dict(read or {})
        write = dict(write or {})
        common = dict(addr_width=addr_width, data_width=data_width, id_width=id_width)
        self.rd = AxiReadMaster(**common, **read)
        self.wr = AxiWriteMaster(**common, **write, awid=1)
        cw = 48
        super().__init__({
            "hp0": Out(axi4_signature(addr_width, data_width, id_width)),
            "rd_cmd": In(stream.Signature(transfer_command_layout(addr_width, self.rd.beats_width))),
            "rd_data": Out(stream.Signature(read_data_layout(data_width))),
            "wr_cmd": In(stream.Signature(transfer_command_layout(addr_width, self.rd.beats_width))),
            "wr_data": In(stream.Signature(write_data_layout(data_width))),
            "rd_clear": In(1), "rd_busy": Out(1), "rd_error": Out(1), "rd_error_resp": Out(2),
            "rd_error_addr": Out(addr_width), "rd_beats_received": Out(cw),
            "rd_stall_memory_cycles": Out(cw), "rd_stall_consumer_cycles": Out(cw),
            "wr_clear": In(1), "wr_busy": Out(1), "wr_error": Out(1), "wr_error_resp": Out(2),
            "wr_error_addr": Out(addr_width), "wr_beats_written": Out(cw), "wr_bursts_acknowledged": Out(cw),
            "wr_stall_memory_cycles": Out(cw),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.rd = rd = self.rd
        m.submodules.wr = wr = self.wr
        wiring.connect(m, wiring.flipped(self.rd_cmd), rd.cmd)
        wiring.connect(m, rd.data, wiring.flipped(self.rd_data))
        wiring.connect(m, wiring.flipped(self.wr_cmd), wr.cmd)
        wiring.connect(m, wiring.flipped(self.wr_data), wr.data)
        connect_read_channels(m, rd.bus, self.hp0)
        connect_write_channels(m, wr.bus, self.hp0)
        _forward_status(m, self, "rd", rd, ["clear", "busy", "error", "error_resp", "error_addr",
                                            "beats_received", "stall_memory_cycles", "stall_consumer_cycles"])
        _forward_status(m, self, "wr", wr, ["clear", "busy", "error", "error_resp", "error_addr",
                                            "beats_written", "bursts_acknowledged", "stall_memory_cycles"])
        return m


class ChecksumSink(wiring.Component):
    """Consumes a read-data stream: ``sum = rotl(sum, 1) ^ data``, counts beats and `last` flags.

    ``ready`` is withheld with probability ``gap / 256`` per cycle (an xorshift32),
    a stand-in for a consumer that stalls. `last_cycle` is the cycle of the
    most recent `last` beat.
    """

    def __init__(self, data_width: int = 128, seed: int = 1):
        self._dw = data_width
        self._seed = seed
        super().__init__({
            "data": In(stream.Signature(read_data_layout(data_width))),
            "gap": In(8),
            "cycle": In(64),
            "clear": In(1),
            "checksum": Out(data_width),
            "beats": Out(48),
            "lasts": Out(32),
            "last_cycle": Out(64),
        })

    def elaborate(self, platform):
        m = Module()
        x = Signal(32, init=self._seed)
        y1 = x ^ (x << 13)[:32]
        y2 = y1 ^ (y1 >> 17)
        y3 = y2 ^ (y2 << 5)[:32]
        m.d.sync += x.eq(y3)
        m.d.comb += self.data.ready.eq(x[8:16] >= self.gap)
        fire = self.data.valid & self.data.ready
        dw = self._dw
        rot = Cat(self.checksum[dw - 1], self.checksum[:dw - 1])
        with m.If(self.clear):
            m.d.sync += [self.checksum.eq(0), self.beats.eq(0), self.lasts.eq(0), self.last_cycle.eq(0)]
        with m.Elif(fire):
            m.d.sync += [self.checksum.eq(rot ^ self.data.payload.data), self.beats.eq(self.beats + 1)]
            with m.If(self.data.payload.last):
                m.d.sync += [self.lasts.eq(self.lasts + 1), self.last_cycle.eq(self.cycle)]
        return m


def checksum(words, data_width: int = 128) -> int:
    """The `ChecksumSink` fold of a sequence of integer beats."""
    mask = (1 << data_width) - 1
    s = 0
    top = data_width - 1
    for w in words:
        s = (((s << 1) | (s >> top)) & mask) ^ w
    return s


def ddr_model(m: Module, ddr: DdrModelConfig, member) -> None:
    """Instantiate hp_ddr_model as ``m.submodules.ddr``: ``member(name, port)`` gives the manager
    signal of AXI member `name` (araddr, rvalid, ...) on HP port `port`, or None for a channel no
    manager drives (parked: nothing valid, R and B always taken)."""
    conns = {}
    for name, (direction, width) in model_port_widths(ddr).items():
        per_port = [member(name, p) for p in range(ddr.ports)]
        if direction == "input":                     # model input = manager output
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


class DdrReadBench(wiring.Component):
    """`ports` read masters + a write master (port 0) on `hp_ddr_model`, hardware sinks."""

    def __init__(self, ddr: DdrModelConfig, *, read: dict | None = None, write: dict | None = None):
        self._ddr = ddr.validate()
        read = dict(read or {})
        common = dict(addr_width=ddr.addr_width, data_width=ddr.data_bits, id_width=ddr.id_width,
                      max_burst=ddr.max_burst)
        self.readers = [AxiReadMaster(**common, **read) for _ in range(ddr.ports)]
        self.writer = AxiWriteMaster(**common, **dict(write or {}), awid=1)
        self.sinks = [ChecksumSink(ddr.data_bits, seed=0x1234567 * (p + 1) + 1) for p in range(ddr.ports)]
        bw = self.readers[0].beats_width
        members = {
            "cycle": Out(64),
            "sink_gap": In(8),
            "clear": In(1),            # masters' clear
            "counters_clear": In(1),   # masters' counters and the sinks
            "wr_cmd": In(stream.Signature(transfer_command_layout(ddr.addr_width, bw))),
            "wr_data": In(stream.Signature(write_data_layout(ddr.data_bits))),
            "wr_busy": Out(1), "wr_error": Out(1), "wr_error_resp": Out(2), "wr_error_addr": Out(ddr.addr_width),
        }
        for p in range(ddr.ports):
            members.update({
                f"cmd{p}": In(stream.Signature(transfer_command_layout(ddr.addr_width, bw))),
                f"busy{p}": Out(1), f"error{p}": Out(1), f"error_resp{p}": Out(2),
                f"error_addr{p}": Out(ddr.addr_width),
                f"beats{p}": Out(48), f"stall_memory{p}": Out(48), f"stall_consumer{p}": Out(48),
                f"sum{p}": Out(ddr.data_bits), f"sink_beats{p}": Out(48), f"lasts{p}": Out(32),
                f"last_cycle{p}": Out(64),
            })
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        ddr = self._ddr
        m.d.sync += self.cycle.eq(self.cycle + 1)
        for p, (rd, sink) in enumerate(zip(self.readers, self.sinks)):
            m.submodules[f"rd{p}"] = rd
            m.submodules[f"sink{p}"] = sink
            wiring.connect(m, wiring.flipped(getattr(self, f"cmd{p}")), rd.cmd)
            wiring.connect(m, rd.data, sink.data)
            m.d.comb += [
                rd.clear.eq(self.clear), rd.counters_clear.eq(self.counters_clear),
                sink.gap.eq(self.sink_gap), sink.cycle.eq(self.cycle), sink.clear.eq(self.counters_clear),
                getattr(self, f"busy{p}").eq(rd.busy), getattr(self, f"error{p}").eq(rd.error),
                getattr(self, f"error_resp{p}").eq(rd.error_resp),
                getattr(self, f"error_addr{p}").eq(rd.error_addr),
                getattr(self, f"beats{p}").eq(rd.beats_received),
                getattr(self, f"stall_memory{p}").eq(rd.stall_memory_cycles),
                getattr(self, f"stall_consumer{p}").eq(rd.stall_consumer_cycles),
                getattr(self, f"sum{p}").eq(sink.checksum), getattr(self, f"sink_beats{p}").eq(sink.beats),
                getattr(self, f"lasts{p}").eq(sink.lasts), getattr(self, f"last_cycle{p}").eq(sink.last_cycle),
            ]
        m.submodules.wr = wr = self.writer
        wiring.connect(m, wiring.flipped(self.wr_cmd), wr.cmd)
        wiring.connect(m, wiring.flipped(self.wr_data), wr.data)
        m.d.comb += [wr.clear.eq(self.clear), wr.counters_clear.eq(self.counters_clear),
                     self.wr_busy.eq(wr.busy), self.wr_error.eq(wr.error),
                     self.wr_error_resp.eq(wr.error_resp), self.wr_error_addr.eq(wr.error_addr)]

        def member(name, p):
            if name.startswith(("ar", "r")):
                return getattr(self.readers[p].bus, name)
            return getattr(wr.bus, name) if p == 0 else None
        ddr_model(m, ddr, member)
        return m


# ---------------------------------------------------------------------------
# Builds and runs
# ---------------------------------------------------------------------------

def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


def masters_top_sources(read: dict | None = None, write: dict | None = None, **widths) -> tuple[list[Path], str]:
    from amaranth.back import verilog
    from .runner import write_verilog
    top = AxiMastersTop(read=read, write=write, **widths)
    src = write_verilog(verilog.convert(top, name="axi_masters_top"), "axi_masters_top")
    return [src], f"axi_masters_top-{_digest(read, write, widths)}"


def ddr_bench_sources(ddr: DdrModelConfig, read: dict | None = None,
                      write: dict | None = None) -> tuple[list[Path], str]:
    from amaranth.back import verilog
    from .runner import write_verilog
    bench = DdrReadBench(ddr, read=read, write=write)
    src = write_verilog(verilog.convert(bench, name="ddr_read_bench"), "ddr_read_bench")
    return [MODEL_SOURCE, src], f"ddr_read_bench-{ddr.build_key}-{_digest(read, write, ddr.verilog_parameters())}"


def ddr_wrapper_sources(ddr: DdrModelConfig) -> tuple[list[Path], str]:
    from .runner import write_verilog
    src = write_verilog(wrapper_verilog(ddr, "ddr_top"), "ddr_top")
    return [MODEL_SOURCE, src], f"ddr_top-{ddr.build_key}-{_digest(ddr.verilog_parameters())}"


@contextmanager
def _build_lock(build_name: str):
    from .runner import BUILD_ROOT
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(BUILD_ROOT / f".{build_name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_top(*, sources, build_name: str, toplevel: str, test_module: str, test_filter: str | None = None,
            extra_env: dict[str, str] | None = None) -> Path:
    """`sim.runner.run_cocotb` for one build, one run at a time per build."""
    from .runner import run_cocotb
    env = dict(extra_env or {})
    if test_filter:
        env["COCOTB_TEST_FILTER"] = test_filter
    with _build_lock(build_name):
        return run_cocotb(sources=sources, toplevel=toplevel, test_module=test_module, build_name=build_name,
                          extra_env=env, test_dir=SIM_DIR)
