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

The fabric decoder (a config with ``max_context`` > 0, e.g. kv260-fabric): the command
processor also executes the fabric opcodes (sw/contract/fabric_commands.py) and the ARGMAX
flag. A fabric op goes out on its ``fop`` stream only when every earlier command has answered,
and the next command waits for the op's answer. ATTEND goes to a `FabricAttendEngine`
(rtl/fabric_attend.py, built for ``attn_head_dim``, ``attn_group``, ``attn_macs`` and
``max_context``), the other fabric opcodes to a `FabricVectorEngine` (rtl/fabric_vector.py, rows
up to ``fabric_max_n``). An `ArgmaxPass` (rtl/argmax_pass.py) sits between the command processor
and the linear datapath: a LINEAR with the ARGMAX flag is answered once its last output row was
read back and its argmax is in RESULT_INDEX / RESULT_VALUE. The fabric masters have their own
ARIDs and spread over the ports (FABRIC_PORTS: an op's streams on separate ports); a port's
write channels go to the fabric engine whose op runs (`AxiWriteSelect`), else to its linear
engine. CTRL.soft_reset aborts an ATTEND at once; a vector op runs to its end (a few thousand
cycles at most) and its answer is dropped.

Performance events to the command processor: memory stall (some engine
wanted a weight-stream beat and its port had none), compute stall (some
port's data waited on its engine), bytes read (every engine and activation
beat; the processor adds the descriptors) and written.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out, connect, flipped

from sw.contract.commands import CSR_ADDR_WIDTH, DEFAULT_ADDR_BITS, HP_ID_BITS, Opcode
from sw.contract.config import ArrayConfig
from sw.contract.errors import ConfigError

from .argmax_pass import ArgmaxPass
from .axi import (AxiReadMaster, AxiWriteMaster, axi4_signature, connect_read_channels,
                  connect_write_channels)
from .axilite import AxiLiteSignature
from .cmdproc import CommandProcessor, rtl_limits
from .dequant import DequantParams
from .engine import SLOTS, ActivationBuffer, Engine, Geometry
from .attention import AttentionUnit
from .fabric_attend import FabricAttendEngine
from .fabric_vector import LANES as FABRIC_VECTOR_LANES
from .fabric_vector import FabricVectorEngine
from .readmux import AxiReadArbiter, AxiWriteSelect
from .sequencer import CommandSetup, CommandSlots, ErrorDrain, TileAllocator
from .share import SharedUnits
from .vector import VectorUnit

__all__ = ["Accelerator", "build_top", "ENGINE_ARID", "ACT_ARID", "FETCH_ARID"]

ENGINE_ARID = 0
ACT_ARID = 1
FETCH_ARID = 2
ARGMAX_ARID = 3
# The fabric decoder's masters (max_context > 0): distinct ARIDs, and a port each (modulo the
# engine count), so that an op's streams run on separate ports: the vector engine reads on hp1 and
# hp2 and writes on hp3; the attention engine reads K, V and its scales/queries on hp1, hp2, hp3
# and writes on hp0; the argmax read-back uses hp3. Linear commands never run beside a fabric op.
FABRIC_ARIDS = {"vector_rd0": 4, "vector_rd1": 5, "attend_rd0": 6, "attend_rd1": 7, "attend_rd2": 8}
FABRIC_PORTS = {"vector_rd0": 1, "vector_rd1": 2, "vector_wr": 3, "attend_rd0": 1, "attend_rd1": 2,
                "attend_rd2": 3, "attend_wr": 0, "argmax": 3}
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
        self._limits = rtl_limits(self._config, addr_width)     # refused before anything is built
        if self._limits.fabric_ops:
            cfg = self._config
            FabricVectorEngine.check(addr_width=addr_width, max_n=cfg.fabric_max_n, max_tokens=cfg.tokens,
                                     head_dims=(cfg.attn_head_dim,))
            FabricAttendEngine.check(addr_width, cfg.attn_head_dim, cfg.attn_group, cfg.attn_macs,
                                     max_positions=cfg.max_context, max_tokens=cfg.tokens,
                                     exp_lanes=cfg.attn_exp_lanes)
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

    def _unit_pool(self) -> SharedUnits:
        """The fp32 units of the engines that never run at the same time (rtl/share.py): the
        command processor runs a fabric op only when every earlier command has answered, and the
        next command waits for its answer. So the linear engines' dequant adders are also the
        attention unit's adders (units 0, 1, ...) and the vector lanes' (the next ones), and the
        attention unit's multipliers are also the vector lanes' quantizer multipliers (M3)."""
        cfg = self._config
        att = AttentionUnit.unit_needs(cfg.attn_head_dim, cfg.attn_macs, cfg.attn_exp_lanes)
        vec = VectorUnit.unit_needs(FABRIC_VECTOR_LANES)
        L = DequantParams.for_config(cfg).lanes
        return SharedUnits({
            **{f"engine{e}": {"add": tuple(range(e * L, e * L + L))} for e in range(cfg.engines)},
            "attend": {"mul": att["mul"], "add": tuple(range(att["add"]))},
            "vector": {"mul": vec["mul"], "add": tuple(range(att["add"], att["add"] + vec["add"]))},
        })

    def _fabric_engines(self, m, cp, port_readers, port_writers, pool):
        """The fabric decoder's engines on the command processor's ``fop`` stream: ATTEND to the
        attention engine, every other fabric opcode to the vector engine, one op at a time (the
        command processor issues one only when every earlier command was answered, and waits for
        its answer). Their masters join the port lists (FABRIC_PORTS, FABRIC_ARIDS)."""
        cfg, aw, E = self._config, self._geom.addr_width, self._config.engines
        vec = m.submodules.fabric_vector = FabricVectorEngine(
            addr_width=aw, max_n=cfg.fabric_max_n, max_tokens=cfg.tokens, head_dims=(cfg.attn_head_dim,),
            read_ids=(FABRIC_ARIDS["vector_rd0"], FABRIC_ARIDS["vector_rd1"]), units=pool.source("vector"))
        att = m.submodules.fabric_attend = FabricAttendEngine(
            aw, cfg.attn_head_dim, cfg.attn_group, cfg.attn_macs, max_positions=cfg.max_context,
            max_tokens=cfg.tokens, read_ids=tuple(FABRIC_ARIDS[f"attend_rd{i}"] for i in range(3)),
            exp_lanes=cfg.attn_exp_lanes, units=pool.source("attend"))

        fop, fop_done = cp.fop, cp.fop_done
        to_att = fop.payload.opcode == int(Opcode.ATTEND)
        route_att = Signal()      # the op in flight is ATTEND's
        in_flight = Signal()      # an op went out and its answer has not come back
        discard = Signal()        # a soft reset left a vector op running: its answer is dropped here
        m.d.comb += [
            vec.cmd.payload.eq(fop.payload), att.cmd.payload.eq(fop.payload),
            vec.cmd.valid.eq(fop.valid & ~to_att & ~discard),
            att.cmd.valid.eq(fop.valid & to_att & ~discard),
            fop.ready.eq(Mux(to_att, att.cmd.ready, vec.cmd.ready) & ~discard),
            fop_done.payload.eq(Mux(route_att, att.done.payload, vec.done.payload)),
            fop_done.valid.eq(Mux(route_att, att.done.valid, vec.done.valid) & in_flight & ~discard),
            att.done.ready.eq(route_att & (fop_done.ready | discard)),
            vec.done.ready.eq(~route_att & (fop_done.ready | discard)),
        ]
        answered = Mux(route_att, att.done.valid & att.done.ready, vec.done.valid & vec.done.ready)
        with m.If(fop.valid & fop.ready):
            m.d.sync += [route_att.eq(to_att), in_flight.eq(1)]
        with m.Elif(answered):
            m.d.sync += [in_flight.eq(0), discard.eq(0)]
        with m.Elif(cp.soft_reset & in_flight):
            # ATTEND stops at once (abort: no answer); the vector engine finishes its op first
            with m.If(route_att):
                m.d.comb += att.abort.eq(1)
                m.d.sync += in_flight.eq(0)
            with m.Else():
                m.d.sync += discard.eq(1)

        # the write port belongs to a fabric engine from its op's start until its masters are quiet
        vec_writes = vec.busy | (in_flight & ~route_att)
        att_writes = att.busy | (in_flight & route_att)
        port_readers += [(FABRIC_PORTS["vector_rd0"] % E, FABRIC_ARIDS["vector_rd0"], vec.rd0),
                         (FABRIC_PORTS["vector_rd1"] % E, FABRIC_ARIDS["vector_rd1"], vec.rd1)]
        port_readers += [(FABRIC_PORTS[f"attend_rd{i}"] % E, FABRIC_ARIDS[f"attend_rd{i}"], getattr(att, f"rd{i}"))
                         for i in range(3)]
        port_writers += [(FABRIC_PORTS["vector_wr"] % E, vec.wr, vec_writes),
                         (FABRIC_PORTS["attend_wr"] % E, att.wr, att_writes)]
        reads = [vec.rd0, vec.rd1, att.rd0, att.rd1, att.rd2]
        return vec, att, reads, [vec.wr, att.wr]

    def elaborate(self, platform):
        m = Module()
        cfg, g = self._config, self._geom
        E, aw = cfg.engines, g.addr_width
        fabric = self._limits.fabric_ops
        master = dict(data_width=g.port_bits, addr_width=aw, id_width=HP_ID_BITS, beats_width=g.beats_width)

        # ---- control -------------------------------------------------------------------------
        cp = m.submodules.cmdproc = CommandProcessor(cfg, config_hash=self._hash, addr_width=aw,
                                                     beats_width=g.beats_width, ops_in_flight=self._ops_in_flight,
                                                     limits=self._limits)
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
        connect(m, slots.setup, setup.cmd)
        connect(m, setup.result, slots.setup_result)
        connect(m, slots.tiles, alloc.cmd)
        connect(m, slots.done, drain.done)
        if fabric:
            # A LINEAR with the ARGMAX flag: its answer waits for the read-back of its last row.
            ap = ArgmaxPass(self._limits.tile_rows, addr_width=aw, beats_width=g.beats_width, in_flight=self._ops_in_flight)
            # Between runs the pass holds nothing worth keeping (an aborted run's commands are
            # never answered): it restarts empty.
            m.submodules.argmax_pass = ResetInserter(~cp.busy)(ap)
            connect(m, cp.op, ap.op_in)
            connect(m, ap.op_out, slots.op)
            connect(m, drain.op_done, ap.done_in)
            connect(m, ap.done_out, cp.op_done)
            am = m.submodules.argmax_rd = AxiReadMaster(**master, max_outstanding=2, arid=ARGMAX_ARID)
            connect(m, ap.rd_cmd, am.cmd)
            connect(m, am.data, ap.rd_data)
            m.d.comb += [ap.rd_error.eq(am.error), ap.rd_busy.eq(am.busy),
                         am.clear.eq(ap.rd_clear | drain.abort),
                         cp.result_we.eq(ap.result_we), cp.result_index.eq(ap.result_index),
                         cp.result_value.eq(ap.result_value)]
        else:
            connect(m, cp.op, slots.op)
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
        pool = self._unit_pool() if fabric else None
        if pool is not None:
            m.submodules.fabric_units = pool
        engines, readers, writers = [], [], []
        for e in range(E):
            rd = m.submodules[f"rd{e}"] = AxiReadMaster(**master, max_outstanding=ENGINE_READ_OUTSTANDING,
                                                       arid=ENGINE_ARID)
            wr = m.submodules[f"wr{e}"] = AxiWriteMaster(**master, awid=0)
            eng = Engine(g, units=pool.source(f"engine{e}")) if pool is not None else Engine(g)
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
        quiet = datapath_readers + writers + ([am] if fabric else [])
        m.d.comb += [mst.clear.eq(drain.abort) for mst in datapath_readers + writers]
        m.d.comb += [
            drain.read_error.eq(Cat(*[rd.error for rd in datapath_readers]).any()),
            drain.write_error.eq(Cat(*[wr.error for wr in writers]).any()),
            drain.bad_command.eq(slots.bad_head),
            drain.soft_reset.eq(cp.soft_reset),
            drain.active.eq(slots.active),
            drain.busy.eq(Cat(*[mst.busy for mst in quiet]).any()),
        ]

        # ---- ports: who reads and writes through which HP port ---------------------------------------
        # (port, ARID, manager bus) for reads; (port, manager bus) for writes, the linear engine first.
        port_readers = [(0, ENGINE_ARID, readers[0].bus), (0, ACT_ARID, act_rd.bus), (0, FETCH_ARID, fetch.bus)]
        port_readers += [(e, ENGINE_ARID, readers[e].bus) for e in range(1, E)]
        port_writers = [(e, writers[e].bus, None) for e in range(E)]
        fabric_reads, fabric_writes = [], []
        if fabric:
            port_readers.append((FABRIC_PORTS["argmax"] % E, ARGMAX_ARID, am.bus))
            vec, att, fabric_reads, fabric_writes = self._fabric_engines(m, cp, port_readers, port_writers, pool)

        for e in range(E):
            hp = getattr(self, f"hp{e}")
            mine = [(arid, bus) for p, arid, bus in port_readers if p == e]
            if len(mine) == 1:
                connect_read_channels(m, mine[0][1], hp)
            else:
                arb = m.submodules[f"hp{e}_read"] = AxiReadArbiter([arid for arid, _ in mine], addr_width=aw,
                                                                   data_width=g.port_bits, id_width=HP_ID_BITS)
                for i, (_, bus) in enumerate(mine):
                    connect(m, bus, getattr(arb, f"m{i}"))
                connect_read_channels(m, arb.bus, hp)
            mine = [(bus, sel) for p, bus, sel in port_writers if p == e]
            if len(mine) == 1:
                connect_write_channels(m, mine[0][0], hp)
            else:
                # one writer at a time: the fabric engine whose op runs, else the linear engine
                ws = m.submodules[f"hp{e}_write"] = AxiWriteSelect(len(mine), addr_width=aw,
                                                                   data_width=g.port_bits, id_width=HP_ID_BITS)
                for i, (bus, _) in enumerate(mine):
                    connect(m, bus, getattr(ws, f"m{i}"))
                for i, (_, sel) in enumerate(mine):
                    if sel is not None:
                        with m.If(sel):
                            m.d.comb += ws.sel.eq(i)
                connect_write_channels(m, ws.bus, hp)

        # ---- performance events ---------------------------------------------------------------------
        r_beats = sum((bus.rvalid & bus.rready).as_unsigned()
                      for bus in [rd.bus for rd in datapath_readers] + fabric_reads)
        w_beats = sum((bus.wvalid & bus.wready).as_unsigned() for bus in [wr.bus for wr in writers] + fabric_writes)
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
