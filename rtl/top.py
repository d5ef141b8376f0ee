"""Accelerator: the KV260 top. Command processor, activation buffer, one engine per HP port.

Ports (what boards/build.py and the block design expect):

* ``csr``: AXI4-Lite slave, 32-bit, the register window of docs/registers.md;
* ``hp0 .. hp{E-1}``: AXI4 masters, 128-bit data, ``addr_width``-bit address, 6-bit IDs;
* ``irq``: level interrupt (STATUS done/error, gated by CTRL.irq_enable);
* ``clk``/``rst``: the ``sync`` domain.

Per LINEAR command (the command processor's ``op`` stream, rtl/cmdproc.py):

1. **set-up** (4 cycles): tiles = ceil(N/R), the output row stride and the
   row padding (sw.contract.commands.OutputLayout), the three sections of the
   activation buffer (sw.contract.commands.ActivationLayout), the byte ranges the
   command reads and writes;
2. **activation load** into one of two slots of the shared activation buffer
   (rtl/engine.py, `ActivationBuffer`), through its own read master on hp0;
3. **tiles**: a tile allocator hands tile t (weights at weight_addr + t *
   tile bytes, bias at bias_addr + 4Rt, outputs at out_addr + 4Rt) to
   whichever engine asks first; an engine asks when its read master can take
   a new command, which is while its previous tile's last bursts are still in
   flight, so every port streams back to back and a port that falls behind
   (hp0 also carries the activations and the descriptors) takes fewer tiles;
4. **completion**: op_done once every tile's B responses are in.

Ops in flight: the datapath holds two commands (two activation slots). It
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
DATAPATH_ERROR, without executing it. In every case the engines and the
activation buffer are held in reset, every master is cleared and drained,
and only then does op_done report the error, so nothing hangs and the next
run starts clean. CTRL.soft_reset takes the same path without an answer.

Performance events to the command processor: memory stall (some engine
wanted a weight-stream beat and its port had none), compute stall (some
port's data waited on its engine), bytes read (every engine and activation
beat; the processor adds the descriptors) and written.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, ResetInserter, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out, connect, flipped

from sw.contract.commands import CSR_ADDR_WIDTH, DEFAULT_ADDR_BITS, ErrorCode
from sw.contract.errors import ConfigError

from .axi import (AxiReadMaster, AxiWriteMaster, axi4_signature, connect_read_channels,
                  connect_write_channels)
from .axilite import AxiLiteSignature
from .cmdproc import CommandProcessor, op_layout
from sw.contract.config import ArrayConfig
from .engine import SLOTS, ActivationBuffer, Engine, Geometry, load_layout, op_params_layout
from .readmux import AxiReadArbiter, round_robin

__all__ = ["Accelerator", "build_top", "ENGINE_ARID", "ACT_ARID", "FETCH_ARID", "HP_ID_BITS"]

HP_ID_BITS = 6
ENGINE_ARID = 0
ACT_ARID = 1
FETCH_ARID = 2
ENGINE_READ_OUTSTANDING = 8       # the HP ports' read acceptance (UG1085); 128 beats of buffer per engine
ACT_READ_OUTSTANDING = 4          # Little's law: 4 x 16 beats cover a 30-cycle latency at one beat/cycle

_FREE, _SETUP, _WAIT, _LOAD, _RUN, _DONE, _BAD = range(7)


def _align(value, a: int):
    return (value + (a - 1)) & ~(a - 1)


class Accelerator(wiring.Component):
    """The accelerator top. See the module docstring.

    Parameters
    ----------
    config : ArrayConfig (port_bits must be 128).
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
        self._geom = Geometry(config, max_k=max_k, addr_width=addr_width)
        self._hash = config.config_hash if config_hash is None else config_hash
        self._addr_width = addr_width
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
        return self._addr_width

    @property
    def parameters(self) -> dict:
        """The constructor's keyword arguments this top was built with (the manifests record them)."""
        return {"config_hash": self._hash, "addr_width": self._addr_width, "max_k": self.max_k,
                "ops_in_flight": self._ops_in_flight}

    def elaborate(self, platform):
        m = Module()
        cfg, g = self._config, self._geom
        E, R, aw = cfg.engines, g.R, self._addr_width
        common = dict(data_width=cfg.port_bits, addr_width=aw, id_width=HP_ID_BITS, beats_width=g.beats_width)

        # ---- control -------------------------------------------------------------------------
        cp = m.submodules.cmdproc = CommandProcessor(cfg, config_hash=self._hash, addr_width=aw,
                                                     beats_width=g.beats_width, ops_in_flight=self._ops_in_flight)
        connect(m, flipped(self.csr), cp.csr)
        m.d.comb += self.irq.eq(cp.irq)
        fetch = m.submodules.fetch = AxiReadMaster(**common, max_outstanding=2, arid=FETCH_ARID)
        connect(m, cp.fetch_cmd, fetch.cmd)
        connect(m, fetch.data, cp.fetch_data)
        m.d.comb += [cp.fetch_error.eq(fetch.error), fetch.clear.eq(cp.fetch_clear)]

        flush = Signal()          # holds the engines and the activation buffer in reset
        clear = Signal()          # one-cycle clear of every datapath master

        # ---- activation buffer -----------------------------------------------------------------
        act_rd = m.submodules.act_rd = AxiReadMaster(**common, max_outstanding=ACT_READ_OUTSTANDING,
                                                     arid=ACT_ARID)
        actbuf = ActivationBuffer(g, E)
        m.submodules.actbuf = ResetInserter(flush)(actbuf)
        connect(m, actbuf.rd_cmd, act_rd.cmd)
        connect(m, act_rd.data, actbuf.rd_data)
        m.d.comb += act_rd.clear.eq(clear)

        # ---- engines -----------------------------------------------------------------------------
        params = Signal(data.ArrayLayout(op_params_layout(g), SLOTS))
        engines, readers, writers = [], [], []
        for e in range(E):
            rd = m.submodules[f"rd{e}"] = AxiReadMaster(**common, max_outstanding=ENGINE_READ_OUTSTANDING,
                                                       arid=ENGINE_ARID)
            wr = m.submodules[f"wr{e}"] = AxiWriteMaster(**common, awid=0)
            eng = Engine(g)
            m.submodules[f"engine{e}"] = ResetInserter(flush)(eng)
            connect(m, eng.rd_cmd, rd.cmd)
            connect(m, rd.data, eng.rd_data)
            connect(m, eng.wr_cmd, wr.cmd)
            connect(m, eng.wr_data, wr.data)
            connect(m, eng.code_req, getattr(actbuf, f"code_req{e}"))
            connect(m, getattr(actbuf, f"code_rsp{e}"), eng.code_rsp)
            connect(m, eng.act_req, getattr(actbuf, f"act_req{e}"))
            connect(m, getattr(actbuf, f"act_rsp{e}"), eng.act_rsp)
            m.d.comb += [
                eng.params.eq(params), eng.codes_written.eq(actbuf.codes_written),
                eng.meta_loaded.eq(actbuf.meta_loaded),
                eng.b_ack.eq(wr.bus.bvalid & wr.bus.bready),
                rd.clear.eq(clear), wr.clear.eq(clear),
            ]
            engines.append(eng)
            readers.append(rd)
            writers.append(wr)

        # ---- ports ---------------------------------------------------------------------------------
        arb = m.submodules.hp0_read = AxiReadArbiter([ENGINE_ARID, ACT_ARID, FETCH_ARID], addr_width=aw,
                                                     data_width=cfg.port_bits, id_width=HP_ID_BITS)
        connect(m, readers[0].bus, arb.m0)
        connect(m, act_rd.bus, arb.m1)
        connect(m, fetch.bus, arb.m2)
        connect_read_channels(m, arb.bus, self.hp0)
        for e in range(E):
            hp = getattr(self, f"hp{e}")
            if e:
                connect_read_channels(m, readers[e].bus, hp)
            connect_write_channels(m, writers[e].bus, hp)

        # ---- command slots -------------------------------------------------------------------------
        op = cp.op
        st = [Signal(3, name=f"slot{s}_state") for s in range(SLOTS)]
        raw = [Signal(op_layout(aw), name=f"slot{s}_op") for s in range(SLOTS)]
        n_tiles = [Signal(32, name=f"slot{s}_tiles") for s in range(SLOTS)]
        acked = [Signal(32, name=f"slot{s}_acked") for s in range(SLOTS)]
        loads = [Signal(load_layout(g), name=f"slot{s}_load") for s in range(SLOTS)]
        rng_names = ("w", "a", "b", "o")
        ranges = [{k: (Signal(aw + 2, name=f"slot{s}_{k}_lo"), Signal(aw + 2, name=f"slot{s}_{k}_hi"))
                   for k in rng_names} for s in range(SLOTS)]
        accept_slot = Signal()        # the slot the next op goes to
        oldest = Signal()             # the slot whose op_done is due next
        aslot = Signal()              # the slot the tile allocator serves

        ab_idle, ab_drain, ab_respond = 0, 1, 2
        ab_state = Signal(2)
        ab_code = Signal(8)
        ab_silent = Signal()

        # ---- set-up pipeline: op fields -> slot parameters ----------------------------------------
        su_step = Signal(3)           # 0: idle, 1..4: stage
        su_slot = Signal()
        su = raw[0]
        log_r = R.bit_length() - 1
        su_nt = Signal(32)
        su_kb = Signal(g.kb_width + 1)
        su_msb = Signal(8)
        su_tb = Signal(g.tile_beats_width)
        su_bad = Signal()
        su_npad = Signal(aw + 2)       # bytes of one padded output row's data: 4 * N_pad
        su_stride = Signal(aw + 2)
        su_code_base = Signal(g.code_count_width + 1)
        su_code_beats = Signal(g.code_count_width + 1)
        su_meta_total = Signal(16)
        su_wbeats = Signal(aw + 2)
        su_scales_off = Signal(aw + 2)
        su_pad = Signal(aw + 2)
        su_out_bytes = Signal(aw + 8)
        cur = Signal(op_layout(aw))
        m.d.comb += cur.eq(Mux(su_slot, raw[1].as_value(), raw[0].as_value()))
        del su

        op_fire = op.valid & op.ready
        with m.If(op_fire):
            for s in range(SLOTS):
                with m.If(accept_slot == s):
                    m.d.sync += [raw[s].eq(op.payload), st[s].eq(_SETUP)]
            m.d.sync += [su_step.eq(1), su_slot.eq(accept_slot), accept_slot.eq(~accept_slot)]
        # If/Elif rather than Switch: the 3-bit step has unreachable values, and a Switch would be
        # an incomplete Verilog case (verilator -Wall CASEINCOMPLETE).
        with m.If(su_step == 1):
            m.d.sync += [
                su_nt.eq((cur.n + (R - 1)) >> log_r),
                su_kb.eq(cur.k >> 4),
                su_msb.eq((cur.groups + 3) >> 2),
                su_tb.eq(cur.groups[:g.groups_width] * g.group_beats),
                su_bad.eq((cur.k > g.max_k) | (cur.tokens > g.T)),
                su_step.eq(2),
            ]
        with m.Elif(su_step == 2):
            tok = cur.tokens[:g.tokens_width]
            npad = su_nt << (log_r + 2)
            m.d.sync += [
                su_npad.eq(npad),
                su_stride.eq(_align(npad, 64)),
                su_code_base.eq((tok - 1) * su_kb),
                su_code_beats.eq(tok * su_kb),
                su_meta_total.eq(tok * su_msb),
                su_wbeats.eq(su_nt * su_tb),
                su_step.eq(3),
            ]
        with m.Elif(su_step == 3):
            m.d.sync += [
                su_scales_off.eq(_align(su_code_beats << 4, 64)),
                su_pad.eq((su_stride - su_npad) >> 4),
                su_out_bytes.eq(cur.tokens[:g.tokens_width] * su_stride),
                su_step.eq(4),
            ]
        with m.Elif(su_step == 4):
            qsums_off = _align(su_scales_off + (su_meta_total << 4), 64)
            act_end = _align(qsums_off + (su_meta_total << 4), 64)
            for s in range(SLOTS):
                with m.If(su_slot == s):
                    p = params[s]
                    ld = loads[s]
                    rg = ranges[s]
                    m.d.sync += [
                        p.has_bias.eq(cur.has_bias), p.tokens.eq(cur.tokens), p.groups.eq(cur.groups),
                        p.kb.eq(su_kb), p.tile_beats.eq(su_tb), p.stride.eq(su_stride), p.pad_beats.eq(su_pad),
                        p.code_base.eq(su_code_base),
                        ld.slot.eq(s), ld.tokens.eq(cur.tokens), ld.kb.eq(su_kb), ld.msb.eq(su_msb),
                        ld.codes_addr.eq(cur.act_addr), ld.scales_addr.eq(cur.act_addr + su_scales_off),
                        ld.qsums_addr.eq(cur.act_addr + qsums_off), ld.code_beats.eq(su_code_beats),
                        ld.meta_beats.eq(su_meta_total),
                        n_tiles[s].eq(su_nt),
                        rg["w"][0].eq(cur.weight_addr), rg["w"][1].eq(cur.weight_addr + (su_wbeats << 4)),
                        rg["a"][0].eq(cur.act_addr), rg["a"][1].eq(cur.act_addr + act_end),
                        rg["b"][0].eq(Mux(cur.has_bias, cur.bias_addr, 0)),
                        rg["b"][1].eq(Mux(cur.has_bias, cur.bias_addr + su_npad, 0)),
                        rg["o"][0].eq(cur.out_addr), rg["o"][1].eq(cur.out_addr + su_out_bytes),
                        st[s].eq(Mux(su_bad, _BAD, _WAIT)),
                    ]
            m.d.sync += su_step.eq(0)

        # ---- hazards between the two slots ---------------------------------------------------------
        def overlap(a, b):
            return (a[0] < b[1]) & (b[0] < a[1])

        def conflict(young, old):
            y, o = ranges[young], ranges[old]
            return (overlap(y["o"], o["o"]) | overlap(y["o"], o["a"]) | overlap(y["o"], o["w"])
                    | overlap(y["o"], o["b"]) | overlap(y["a"], o["o"]) | overlap(y["w"], o["o"])
                    | overlap(y["b"], o["o"]))

        hazard = [Signal(name=f"slot{s}_hazard") for s in range(SLOTS)]
        for s in range(SLOTS):
            m.d.comb += hazard[s].eq(conflict(s, 1 - s))

        # ---- start: activation load, then tiles --------------------------------------------------------
        for s in range(SLOTS):
            other = 1 - s
            older_running = (oldest == other) & ((st[other] == _RUN) | (st[other] == _DONE))
            with m.If(st[s] == _WAIT):
                with m.If((oldest == s) | (older_running & ~hazard[s])):
                    m.d.sync += st[s].eq(_LOAD)
        load_slot = Signal()
        m.d.comb += load_slot.eq(Mux(st[1] == _LOAD, 1, 0))
        m.d.comb += [
            actbuf.load.valid.eq((st[0] == _LOAD) | (st[1] == _LOAD)),
            actbuf.load.payload.eq(Mux(load_slot, loads[1].as_value(), loads[0].as_value())),
        ]
        with m.If(actbuf.load.valid & actbuf.load.ready):
            for s in range(SLOTS):
                with m.If(load_slot == s):
                    m.d.sync += st[s].eq(_RUN)

        # ---- tile allocator ----------------------------------------------------------------------------
        a_ready = Signal()
        a_tile = Signal(32)
        a_w = Signal(aw)
        a_b = Signal(aw)
        a_o = Signal(aw)
        a_st = Mux(aslot, st[1], st[0])
        a_nt = Mux(aslot, n_tiles[1], n_tiles[0])
        a_op = Signal(op_layout(aw))
        m.d.comb += a_op.eq(Mux(aslot, raw[1].as_value(), raw[0].as_value()))
        granted = [Signal(name=f"slot{s}_granted") for s in range(SLOTS)]   # every tile handed out
        a_granted = Mux(aslot, granted[1], granted[0])
        with m.If(~a_ready & (a_st == _RUN) & ~a_granted):
            m.d.sync += [a_ready.eq(1), a_tile.eq(0), a_w.eq(a_op.weight_addr), a_b.eq(a_op.bias_addr),
                         a_o.eq(a_op.out_addr)]
        reqs = [eng.tile.ready & a_ready for eng in engines]
        grants, _, any_grant = round_robin(m, reqs, "tiles")
        last_tile = a_tile == a_nt - 1
        for eng, gr in zip(engines, grants):
            p = eng.tile.payload
            m.d.comb += [eng.tile.valid.eq(gr), p.slot.eq(aslot), p.last.eq(last_tile),
                         p.weight_addr.eq(a_w), p.bias_addr.eq(a_b), p.out_addr.eq(a_o)]
        with m.If(any_grant):
            m.d.sync += [a_tile.eq(a_tile + 1), a_w.eq(a_w + (params[aslot].tile_beats << 4)),
                         a_b.eq(a_b + 4 * R), a_o.eq(a_o + 4 * R)]
            with m.If(last_tile):
                m.d.sync += [a_ready.eq(0), aslot.eq(~aslot)]
                for s in range(SLOTS):
                    with m.If(aslot == s):
                        m.d.sync += granted[s].eq(1)
        with m.If(op_fire):
            for s in range(SLOTS):
                with m.If(accept_slot == s):
                    m.d.sync += granted[s].eq(0)

        # ---- completion -----------------------------------------------------------------------------------
        for s in range(SLOTS):
            done_now = sum(eng.tile_done[s].as_unsigned() for eng in engines)
            with m.If(st[s] == _FREE):
                m.d.sync += acked[s].eq(0)
            with m.Else():
                m.d.sync += acked[s].eq(acked[s] + done_now)
            with m.If((st[s] == _RUN) & (acked[s] == n_tiles[s])):
                m.d.sync += st[s].eq(_DONE)

        # ---- errors, soft reset and op_done ----------------------------------------------------------------
        err_rd = Cat(*[rd.error for rd in readers], act_rd.error).any()
        err_wr = Cat(*[wr.error for wr in writers]).any()
        old_st = Mux(oldest, st[1], st[0])
        bad_head = old_st == _BAD
        trigger = Signal()
        m.d.comb += trigger.eq((ab_state == ab_idle) & (err_rd | err_wr | bad_head | cp.soft_reset))
        any_active = Cat(*[st[s] != _FREE for s in range(SLOTS)]).any()
        masters_busy = Cat(*[rd.busy for rd in readers], *[wr.busy for wr in writers], act_rd.busy).any()
        m.d.comb += [flush.eq(trigger | (ab_state == ab_drain)), clear.eq(trigger)]
        with m.If(trigger):
            m.d.sync += [
                ab_state.eq(ab_drain),
                ab_code.eq(Mux(err_rd, ErrorCode.READ_ERROR, Mux(err_wr, ErrorCode.WRITE_ERROR,
                                                                 ErrorCode.DATAPATH_ERROR))),
                ab_silent.eq(cp.soft_reset | ~any_active),
                accept_slot.eq(0), oldest.eq(0), aslot.eq(0), a_ready.eq(0), su_step.eq(0),
            ]
            for s in range(SLOTS):
                m.d.sync += st[s].eq(_FREE)
        with m.If(ab_state == ab_drain):
            with m.If(cp.soft_reset):
                m.d.sync += ab_silent.eq(1)
            with m.If(~masters_busy):
                m.d.sync += ab_state.eq(Mux(ab_silent | cp.soft_reset, ab_idle, ab_respond))

        done = cp.op_done
        with m.If(ab_state == ab_respond):
            m.d.comb += [done.valid.eq(1), done.payload.error.eq(1), done.payload.error_code.eq(ab_code)]
            with m.If(done.ready | cp.soft_reset):
                m.d.sync += ab_state.eq(ab_idle)
        with m.Elif((ab_state == ab_idle) & ~trigger & (old_st == _DONE)):
            m.d.comb += done.valid.eq(1)
            with m.If(done.ready):
                for s in range(SLOTS):
                    with m.If(oldest == s):
                        m.d.sync += st[s].eq(_FREE)
                m.d.sync += oldest.eq(~oldest)

        m.d.comb += op.ready.eq((ab_state == ab_idle) & ~trigger & (su_step == 0)
                                & (Mux(accept_slot, st[1], st[0]) == _FREE))

        # ---- performance events ---------------------------------------------------------------------------
        beat_bytes = cfg.port_bits // 8
        r_beats = sum((rd.bus.rvalid & rd.bus.rready).as_unsigned() for rd in readers + [act_rd])
        w_beats = sum((wr.bus.wvalid & wr.bus.wready).as_unsigned() for wr in writers)
        m.d.comb += [
            cp.perf.mem_stall.eq(Cat(*[eng.mem_stall for eng in engines]).any()),
            cp.perf.compute_stall.eq(Cat(*[eng.compute_stall for eng in engines]).any()),
            cp.perf.bytes_read.eq(r_beats * beat_bytes),
            cp.perf.bytes_written.eq(w_beats * beat_bytes),
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
    top = Accelerator(config, **parameters)
    top._MustUse__silence = True      # a flow that refuses the config before elaborating did not forget the top
    return top
