"""Accelerator: the KV260 top. Command processor, activation buffer, one engine per HP port.

Ports (what boards/build.py and the block design expect):

* ``csr``: AXI4-Lite slave, 32-bit, the register window of docs/registers.md;
* ``hp0 .. hp{E-1}``: AXI4 masters, ``config.port_bits`` data (128), ``addr_width``-bit
  address, ``sw.contract.commands.HP_ID_BITS`` IDs;
* ``irq``: level interrupt (STATUS done/error, gated by CTRL.irq_enable);
* ``clk``/``rst``: the ``sync`` domain.

Per LINEAR command (the command processor's ``op`` stream, rtl/cmdproc.py), through the
components of rtl/sequencer.py:

1. **set-up** (`CommandSetup`, 4 cycles): tiles = ceil(N/R), the output row stride and the
   row padding (sw.contract.commands.OutputLayout), the three sections of the
   activation buffer (sw.contract.commands.ActivationLayout), the byte ranges the
   command reads and writes;
2. **activation load** into one of two slots of the shared activation buffer
   (rtl/engine.py, `ActivationBuffer`), through its own read master on hp0;
3. **tiles**: the tile allocator (`TileAllocator`) hands tile t (weights at weight_addr + t *
   tile bytes, bias at bias_addr + 4Rt, outputs at out_addr + 4Rt) to
   whichever engine asks first; an engine asks when its read master can take
   a new command, which is while its previous tile's last bursts are still in
   flight, so every port streams back to back and a port that falls behind
   (hp0 also carries the activations and the descriptors) takes fewer tiles;
4. **completion**: op_done once every tile's B responses are in.

Ops in flight: the datapath holds two commands (`CommandSlots`, two activation slots). It
takes a second one while the first is finishing, if the command processor
offers it, and starts it at once unless the two touch overlapping memory
with a write involved (then it waits for the first to complete). Results are
reported in command order.

Port sharing: hp0's read channels carry three managers through an
`AxiReadArbiter` (rtl/readmux.py) with distinct ARIDs: engine 0 (ARID 0), the
activation loader (ARID 1) and the descriptor fetcher (ARID 2); R beats are
routed back by RID. hp0's write channels and every other port belong to one
engine.

Errors: SLVERR/DECERR on any read master -> READ_ERROR, on any write master
-> WRITE_ERROR; a command the datapath cannot hold (K above ``max_k``) ->
DATAPATH_ERROR, without executing it. In every case (`ErrorDrain`) the engines and the
activation buffer are held in reset, every master is cleared and drained,
and only then does op_done report the error, so nothing hangs and the next
run starts clean. CTRL.soft_reset takes the same path without an answer.

Performance events to the command processor: memory stall (some engine
wanted a weight-stream beat and its port had none), compute stall (some
port's data waited on its engine), bytes read (every engine and activation
beat; the processor adds the descriptors) and written.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, ResetInserter
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out, connect, flipped

from sw.contract.commands import CSR_ADDR_WIDTH, DEFAULT_ADDR_BITS, HP_ID_BITS
from sw.contract.config import ArrayConfig
from sw.contract.errors import ConfigError

from .axi import (AxiReadMaster, AxiWriteMaster, axi4_signature, connect_read_channels,
                  connect_write_channels)
from .axilite import AxiLiteSignature
from .cmdproc import CommandProcessor, rtl_limits
from .engine import SLOTS, ActivationBuffer, Engine, Geometry
from .readmux import AxiReadArbiter
from .sequencer import CommandSetup, CommandSlots, ErrorDrain, TileAllocator

__all__ = ["Accelerator", "build_top", "ENGINE_ARID", "ACT_ARID", "FETCH_ARID"]

ENGINE_ARID = 0
ACT_ARID = 1
FETCH_ARID = 2
ENGINE_READ_OUTSTANDING = 8       # the HP ports' read acceptance (UG1085); 128 beats of buffer per engine
ACT_READ_OUTSTANDING = 4          # Little's law: 4 x 16 beats cover a 30-cycle latency at one beat/cycle
FETCH_READ_OUTSTANDING = 2        # the command processor's descriptor reads


class Accelerator(wiring.Component):
    """The accelerator top. See the module docstring.

    Parameters
    ----------
    config : ArrayConfig (port_bits must be 8 x sw.contract.commands.BEAT_BYTES).
    config_hash : shown in CONFIG_HASH0..7; default ``config.config_hash``.
    addr_width : AXI address width of the HP ports and of every buffer address.
    max_k : the largest K the activation buffer holds (Qwen2.5-0.5B: 4864, down_proj).
    ops_in_flight : commands the command processor may present before their answers (1 or 2;
        2 overlaps a command's start with the previous command's drain).
    """

    def __init__(self, config: ArrayConfig, *, config_hash: str | None = None,
                 addr_width: int = DEFAULT_ADDR_BITS, max_k: int = 4864, ops_in_flight: int = SLOTS):
        if ops_in_flight not in range(1, SLOTS + 1):
            raise ConfigError(f"Accelerator: ops_in_flight must be 1..{SLOTS}, got {ops_in_flight!r}")
        self._ops_in_flight = ops_in_flight
        self._config = config.validate()
        rtl_limits(self._config, addr_width)     # refuse what the RTL cannot execute before anything is built
        self._geom = Geometry(config, max_k=max_k, addr_width=addr_width)
        self._hash = config.config_hash if config_hash is None else config_hash
        members = {
            "csr": In(AxiLiteSignature(addr_width=CSR_ADDR_WIDTH)),
            "irq": Out(1),
        }
        for i in range(config.engines):
            members[f"hp{i}"] = Out(axi4_signature(addr_width=addr_width, data_width=config.port_bits,
                                                   id_width=HP_ID_BITS))
        super().__init__(members)

    @property
    def config(self) -> ArrayConfig:
        return self._config

    @property
    def geometry(self) -> Geometry:
        return self._geom

    @property
    def config_hash(self) -> str:
        return self._hash

    @property
    def max_k(self) -> int:
        return self._geom.max_k

    @property
    def ops_in_flight(self) -> int:
        return self._ops_in_flight

    @property
    def addr_width(self) -> int:
        return self._geom.addr_width

    @property
    def parameters(self) -> dict:
        """The constructor's keyword arguments this top was built with (the manifests record them)."""
        return {"config_hash": self._hash, "addr_width": self.addr_width, "max_k": self.max_k,
                "ops_in_flight": self._ops_in_flight}

    def elaborate(self, platform):
        m = Module()
        cfg, g = self._config, self._geom
        E, aw = cfg.engines, g.addr_width
        master = dict(data_width=g.port_bits, addr_width=aw, id_width=HP_ID_BITS, beats_width=g.beats_width)

        # ---- control -------------------------------------------------------------------------
        cp = m.submodules.cmdproc = CommandProcessor(cfg, config_hash=self._hash, addr_width=aw,
                                                     beats_width=g.beats_width, ops_in_flight=self._ops_in_flight)
        connect(m, flipped(self.csr), cp.csr)
        m.d.comb += self.irq.eq(cp.irq)
        fetch = m.submodules.fetch = AxiReadMaster(**master, max_outstanding=FETCH_READ_OUTSTANDING,
                                                   arid=FETCH_ARID)
        connect(m, cp.fetch_cmd, fetch.cmd)
        connect(m, fetch.data, cp.fetch_data)
        m.d.comb += [cp.fetch_error.eq(fetch.error), fetch.clear.eq(cp.fetch_clear)]

        setup = m.submodules.setup = CommandSetup(g)
        slots = m.submodules.slots = CommandSlots(g, E)
        alloc = m.submodules.tiles = TileAllocator(g, E)
        drain = m.submodules.drain = ErrorDrain()
        connect(m, cp.op, slots.op)
        connect(m, slots.setup, setup.cmd)
        connect(m, setup.result, slots.setup_result)
        connect(m, slots.tiles, alloc.cmd)
        connect(m, slots.done, drain.done)
        connect(m, drain.op_done, cp.op_done)
        m.d.comb += [
            slots.tiles_granted.eq(alloc.granted), slots.accept.eq(drain.accept),
            setup.abort.eq(drain.abort), slots.abort.eq(drain.abort), alloc.abort.eq(drain.abort),
        ]

        # ---- activation buffer -----------------------------------------------------------------
        act_rd = m.submodules.act_rd = AxiReadMaster(**master, max_outstanding=ACT_READ_OUTSTANDING,
                                                     arid=ACT_ARID)
        actbuf = ActivationBuffer(g, E)
        m.submodules.actbuf = ResetInserter(drain.flush)(actbuf)
        connect(m, slots.load, actbuf.load)
        connect(m, actbuf.rd_cmd, act_rd.cmd)
        connect(m, act_rd.data, actbuf.rd_data)

        # ---- engines -----------------------------------------------------------------------------
        engines, readers, writers = [], [], []
        for e in range(E):
            rd = m.submodules[f"rd{e}"] = AxiReadMaster(**master, max_outstanding=ENGINE_READ_OUTSTANDING,
                                                       arid=ENGINE_ARID)
            wr = m.submodules[f"wr{e}"] = AxiWriteMaster(**master, awid=0)
            eng = Engine(g)
            m.submodules[f"engine{e}"] = ResetInserter(drain.flush)(eng)
            connect(m, alloc.tile[e], eng.tile)
            connect(m, eng.rd_cmd, rd.cmd)
            connect(m, rd.data, eng.rd_data)
            connect(m, eng.wr_cmd, wr.cmd)
            connect(m, eng.wr_data, wr.data)
            connect(m, eng.code_req, getattr(actbuf, f"code_req{e}"))
            connect(m, getattr(actbuf, f"code_rsp{e}"), eng.code_rsp)
            connect(m, eng.act_req, getattr(actbuf, f"act_req{e}"))
            connect(m, getattr(actbuf, f"act_rsp{e}"), eng.act_rsp)
            m.d.comb += [
                eng.params.eq(slots.params), eng.codes_written.eq(actbuf.codes_written),
                eng.meta_loaded.eq(actbuf.meta_loaded),
                eng.b_ack.eq(wr.bus.bvalid & wr.bus.bready),
                slots.tile_done[e].eq(eng.tile_done),
            ]
            engines.append(eng)
            readers.append(rd)
            writers.append(wr)

        # ---- errors: every datapath master is cleared on an abort and drains by itself -----------
        datapath_readers = readers + [act_rd]
        m.d.comb += [mst.clear.eq(drain.abort) for mst in datapath_readers + writers]
        m.d.comb += [
            drain.read_error.eq(Cat(*[rd.error for rd in datapath_readers]).any()),
            drain.write_error.eq(Cat(*[wr.error for wr in writers]).any()),
            drain.bad_command.eq(slots.bad_head),
            drain.soft_reset.eq(cp.soft_reset),
            drain.active.eq(slots.active),
            drain.busy.eq(Cat(*[mst.busy for mst in datapath_readers + writers]).any()),
        ]

        # ---- ports ---------------------------------------------------------------------------------
        arb = m.submodules.hp0_read = AxiReadArbiter([ENGINE_ARID, ACT_ARID, FETCH_ARID], addr_width=aw,
                                                     data_width=g.port_bits, id_width=HP_ID_BITS)
        connect(m, readers[0].bus, arb.m0)
        connect(m, act_rd.bus, arb.m1)
        connect(m, fetch.bus, arb.m2)
        connect_read_channels(m, arb.bus, self.hp0)
        for e in range(E):
            hp = getattr(self, f"hp{e}")
            if e:
                connect_read_channels(m, readers[e].bus, hp)
            connect_write_channels(m, writers[e].bus, hp)

        # ---- performance events ---------------------------------------------------------------------
        r_beats = sum((rd.bus.rvalid & rd.bus.rready).as_unsigned() for rd in datapath_readers)
        w_beats = sum((wr.bus.wvalid & wr.bus.wready).as_unsigned() for wr in writers)
        m.d.comb += [
            cp.perf.mem_stall.eq(Cat(*[eng.mem_stall for eng in engines]).any()),
            cp.perf.compute_stall.eq(Cat(*[eng.compute_stall for eng in engines]).any()),
            cp.perf.bytes_read.eq(r_beats * g.port_bytes),
            cp.perf.bytes_written.eq(w_beats * g.port_bytes),
        ]
        return m


def build_top(config: ArrayConfig, **parameters) -> Accelerator:
    """The accelerator top for an ArrayConfig: the one constructor every consumer goes through.

    `kriallm elaborate`, `kriallm resources` (scope full) and `kriallm build` (boards/) call it with
    the config alone, so they build the same top with the same parameters: CONFIG_HASH0..7 read
    ``config.config_hash`` (what the manifests record and the driver compares) and the HP masters
    have ``DEFAULT_ADDR_BITS`` of address (the driver's DMA address limit). The simulator
    (sim/top_tb.py, hence the sim device and the engine bench) overrides ``addr_width`` and
    ``max_k`` for its DDR model. ``parameters`` are Accelerator's keyword arguments.
    """
    return Accelerator(config, **parameters)
