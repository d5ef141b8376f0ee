"""Command sequencing of the accelerator top: what runs between the command processor's
``op`` stream and the engines.

* `CommandSetup`: four pipelined cycles that turn a LINEAR op into everything
  its slot holds (engine parameters, activation load, tile count, the byte
  ranges it reads and writes);
* `CommandSlots`: the two command slots, each a `slot_layout` record with a
  `SlotState`; accepts ops, checks hazards between the slots, starts the
  activation load and the tiles, counts acknowledged tiles and answers in
  command order;
* `TileAllocator`: hands a running command's tiles to whichever engine asks
  first;
* `ErrorDrain`: on an AXI error, a command the datapath cannot hold or a soft
  reset, holds the datapath in reset until every master has drained, then
  answers with the error (or, for a soft reset, not at all).

docs/engine.md describes the sequence; rtl/top.py wires these to the engines.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from sw.contract.commands import ErrorCode

from .cmdproc import op_done_layout, op_layout
from .engine import BLOCK_COLS, SLOTS, Geometry, load_layout, op_params_layout, tile_grant_layout
from .pe import const_product, shift_add_product
from .readmux import round_robin

__all__ = ["SlotState", "DrainState", "CommandSetup", "CommandSlots", "TileAllocator", "ErrorDrain",
           "footprint_layout", "slot_setup_layout", "slot_layout", "tile_command_layout"]


class SlotState(enum.Enum, shape=3):
    FREE = 0          # holds no command
    SETUP = 1         # CommandSetup works on its op
    WAIT = 2          # set up; waits for the older command or a hazard
    LOAD = 3          # its activation load is offered to the activation buffer
    RUN = 4           # tiles being handed out or in flight
    DONE = 5          # every tile is in memory: its answer is due
    BAD = 6           # the datapath cannot hold it (DATAPATH_ERROR, not executed)


class DrainState(enum.Enum, shape=2):
    IDLE = 0
    DRAIN = 1         # datapath in reset, masters draining their bursts
    RESPOND = 2       # op_done carries the error


def _align(value, a: int):
    return (value + (a - 1)) & ~(a - 1)


def _log2(n: int) -> int:
    return n.bit_length() - 1


def _tile_count_width(g: Geometry) -> int:
    """Tiles of a command: ceil(n / R) of the op's n."""
    return op_layout(g.addr_width)["n"].shape.width


def _range_layout(width: int) -> data.StructLayout:
    return data.StructLayout({"lo": unsigned(width), "hi": unsigned(width)})


def footprint_layout(g: Geometry) -> data.StructLayout:
    """The byte ranges [lo, hi) a command reads (weights, activations, bias) and writes (outputs).
    Two bits above the address width: the end of a buffer may lie past the address space."""
    r = _range_layout(g.addr_width + 2)
    return data.StructLayout({"weights": r, "acts": r, "bias": r, "out": r})


def slot_setup_layout(g: Geometry) -> data.StructLayout:
    """What `CommandSetup` hands `CommandSlots` for one command."""
    return data.StructLayout({
        "slot": 1,
        "bad": 1,                                      # K above max_k or too many tokens
        "params": op_params_layout(g),
        "load": load_layout(g),
        "tiles": unsigned(_tile_count_width(g)),
        "footprint": footprint_layout(g),
    })


def slot_layout(g: Geometry) -> data.StructLayout:
    """One command slot."""
    return data.StructLayout({
        "state": SlotState,
        "granted": 1,                                  # every tile handed out
        "tiles": unsigned(_tile_count_width(g)),
        "acked": unsigned(_tile_count_width(g)),       # tiles acknowledged in memory
        "params": op_params_layout(g),
        "load": load_layout(g),
        "footprint": footprint_layout(g),
    })


def tile_command_layout(g: Geometry) -> data.StructLayout:
    """A running command, as the tile allocator starts on it."""
    return data.StructLayout({
        "slot": 1,
        "tiles": unsigned(_tile_count_width(g)),
        "tile_beats": unsigned(g.tile_beats_width),
        "weight_addr": unsigned(g.addr_width),
        "bias_addr": unsigned(g.addr_width),
        "out_addr": unsigned(g.addr_width),
    })


def _setup_command_layout(g: Geometry) -> data.StructLayout:
    return data.StructLayout({"slot": 1, "op": op_layout(g.addr_width)})


class CommandSetup(wiring.Component):
    """Computes a command's slot record from its op, one command at a time (`latency` cycles).

    Tiles = ceil(N/R), the output row stride and the row padding (sw.contract.commands.
    OutputLayout), the three sections of the activation buffer (ActivationLayout) and the byte
    ranges the command touches.

    Ports
    -----
    cmd : In(stream {slot, op}); ready while no command is in the pipeline.
    result : Out(stream slot_setup_layout), always ready; valid for one cycle per command.
    abort : In(1), drops the command in the pipeline.
    """

    STAGES = 4

    def __init__(self, geom: Geometry):
        self._g = geom
        super().__init__({
            "cmd": In(stream.Signature(_setup_command_layout(geom))),
            "result": Out(stream.Signature(slot_setup_layout(geom), always_ready=True)),
            "abort": In(1),
        })

    @property
    def latency(self) -> int:
        """Cycles from taking a command to its result."""
        return self.STAGES

    def elaborate(self, platform):
        m = Module()
        g = self._g
        aw, R, A = g.addr_width, g.R, g.row_align
        shift = g.port_shift
        log_r = _log2(R)
        ld_layout = load_layout(g)

        step = Signal(range(self.STAGES + 1))      # 0: idle, 1 .. STAGES: stage
        cmd = Signal(_setup_command_layout(g))
        op = cmd.op
        nt = Signal(_tile_count_width(g))
        kb = Signal(g.kb_width + 1)
        msb = Signal(ld_layout["msb"].shape)       # meta beats per token row
        tile_beats = Signal(g.tile_beats_width)
        bad = Signal()
        npad = Signal(aw + 2)                      # bytes of one padded output row's data: 4 * N_pad
        stride = Signal(aw + 2)
        code_base = Signal(g.code_count_width + 1)
        code_beats = Signal(g.code_count_width + 1)
        meta_total = Signal(ld_layout["meta_beats"].shape)
        weight_beats = Signal(aw + 2)
        scales_off = Signal(aw + 2)
        pad = Signal(aw + 2)
        out_bytes = Signal(aw + 2 + g.tokens_width)
        tokens = op.tokens[:g.tokens_width]

        m.d.comb += self.cmd.ready.eq(step == 0)
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [cmd.eq(self.cmd.payload), step.eq(1)]
        # If/Elif rather than Switch: the step has unreachable values, and a Switch would be an
        # incomplete Verilog case (verilator -Wall CASEINCOMPLETE).
        with m.If(step == 1):
            gpm = g.groups_per_meta_word
            m.d.sync += [
                nt.eq((op.n + (R - 1)) >> log_r),
                kb.eq(op.k >> _log2(BLOCK_COLS)),
                msb.eq((op.groups + (gpm - 1)) >> _log2(gpm)),
                tile_beats.eq(const_product(op.groups[:g.groups_width], g.group_beats)),
                bad.eq((op.k > g.max_k) | (op.tokens > g.T)),
                step.eq(2),
            ]
        with m.Elif(step == 2):
            row = nt << _log2(g.tile_row_bytes)
            m.d.sync += [
                npad.eq(row),
                stride.eq(_align(row, A)),
                code_base.eq(shift_add_product(tokens, kb) - kb),
                code_beats.eq(shift_add_product(tokens, kb)),
                meta_total.eq(shift_add_product(tokens, msb)),
                weight_beats.eq(nt * tile_beats),
                step.eq(3),
            ]
        with m.Elif(step == 3):
            m.d.sync += [
                scales_off.eq(_align(code_beats << shift, A)),
                pad.eq((stride - npad) >> shift),
                out_bytes.eq(shift_add_product(tokens, stride)),
                step.eq(4),
            ]
        with m.Elif(step == 4):
            m.d.sync += step.eq(0)
        with m.If(self.abort):
            m.d.sync += step.eq(0)

        qsums_off = _align(scales_off + (meta_total << shift), A)
        act_end = _align(qsums_off + (meta_total << shift), A)
        res = self.result.payload
        p, ld, fp = res.params, res.load, res.footprint
        m.d.comb += [
            self.result.valid.eq(step == 4),
            res.slot.eq(cmd.slot), res.bad.eq(bad), res.tiles.eq(nt),
            p.has_bias.eq(op.has_bias), p.tokens.eq(op.tokens), p.groups.eq(op.groups),
            p.kb.eq(kb), p.tile_beats.eq(tile_beats), p.stride.eq(stride), p.pad_beats.eq(pad),
            p.code_base.eq(code_base),
            ld.slot.eq(cmd.slot), ld.tokens.eq(op.tokens), ld.kb.eq(kb), ld.msb.eq(msb),
            ld.codes_addr.eq(op.act_addr), ld.scales_addr.eq(op.act_addr + scales_off),
            ld.qsums_addr.eq(op.act_addr + qsums_off), ld.code_beats.eq(code_beats),
            ld.meta_beats.eq(meta_total),
            fp.weights.lo.eq(op.weight_addr), fp.weights.hi.eq(op.weight_addr + (weight_beats << shift)),
            fp.acts.lo.eq(op.act_addr), fp.acts.hi.eq(op.act_addr + act_end),
            fp.bias.lo.eq(Mux(op.has_bias, op.bias_addr, 0)),
            fp.bias.hi.eq(Mux(op.has_bias, op.bias_addr + npad, 0)),
            fp.out.lo.eq(op.out_addr), fp.out.hi.eq(op.out_addr + out_bytes),
        ]
        return m


def _overlap(a, b):
    return (a.lo < b.hi) & (b.lo < a.hi)


def _conflict(young, old):
    """`young` must wait for `old`: one writes what the other reads or writes."""
    y, o = young.footprint, old.footprint
    return (_overlap(y.out, o.out) | _overlap(y.out, o.acts) | _overlap(y.out, o.weights)
            | _overlap(y.out, o.bias) | _overlap(y.acts, o.out) | _overlap(y.weights, o.out)
            | _overlap(y.bias, o.out))


class CommandSlots(wiring.Component):
    """The datapath's two command slots, from accepting an op to its answer.

    A slot goes FREE -> SETUP -> WAIT -> LOAD -> RUN -> DONE -> FREE (or SETUP -> BAD, which
    `ErrorDrain` answers). A command leaves WAIT when it is the oldest, or when the older one
    runs and the two touch no common memory with a write involved. Answers are in command order.

    Ports
    -----
    op : In(stream op_layout), from the command processor.
    accept : In(1), ops may be taken (`ErrorDrain.accept`).
    setup / setup_result : to and from `CommandSetup`.
    params : Out, the engines' per-slot parameters.
    load : Out(stream load_layout), to the activation buffer.
    tiles : Out(stream tile_command_layout), to the tile allocator; ``tiles_granted`` In(1):
        the allocator has handed out the last tile of that command.
    tile_done : In, per engine, the one-hot slot of a tile acknowledged in memory.
    done : Out(stream op_done_layout), the oldest command completed (error 0).
    bad_head : Out(1), the oldest command is BAD. active : Out(1), some slot holds a command.
    abort : In(1), empties every slot.
    """

    def __init__(self, geom: Geometry, engines: int):
        self._g = geom
        self._engines = engines
        super().__init__({
            "op": In(stream.Signature(op_layout(geom.addr_width))),
            "accept": In(1),
            "setup": Out(stream.Signature(_setup_command_layout(geom))),
            "setup_result": In(stream.Signature(slot_setup_layout(geom), always_ready=True)),
            "params": Out(data.ArrayLayout(op_params_layout(geom), SLOTS)),
            "load": Out(stream.Signature(load_layout(geom))),
            "tiles": Out(stream.Signature(tile_command_layout(geom))),
            "tiles_granted": In(1),
            "tile_done": In(data.ArrayLayout(unsigned(SLOTS), engines)),
            "done": Out(stream.Signature(op_done_layout())),
            "bad_head": Out(1),
            "active": Out(1),
            "abort": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._g
        slots = Signal(data.ArrayLayout(slot_layout(g), SLOTS), name="records")   # "slots" would hide the module
        accept_slot = Signal(range(SLOTS))      # the slot the next op goes to
        oldest = Signal(range(SLOTS))           # the slot whose answer is due next
        serving = Signal(range(SLOTS))          # the slot the tile allocator serves
        for s in range(SLOTS):
            m.d.comb += self.params[s].eq(slots[s].params)

        def at(index, assign):
            """m.d.sync += assign(the slot at `index`): one comparison per slot rather than a
            variable part-select on the left-hand side."""
            for s in range(SLOTS):
                with m.If(index == s):
                    m.d.sync += assign(slots[s])

        # ---- accept an op: a free slot, the set-up pipeline idle -------------------------------
        can_take = self.accept & (slots[accept_slot].state == SlotState.FREE)
        m.d.comb += [
            self.setup.valid.eq(self.op.valid & can_take),
            self.setup.payload.slot.eq(accept_slot), self.setup.payload.op.eq(self.op.payload),
            self.op.ready.eq(self.setup.ready & can_take),
        ]
        op_fire = self.op.valid & self.op.ready
        with m.If(op_fire):
            at(accept_slot, lambda sl: sl.state.eq(SlotState.SETUP))
            m.d.sync += accept_slot.eq(accept_slot + 1)

        res = self.setup_result.payload
        with m.If(self.setup_result.valid):
            for s in range(SLOTS):
                with m.If(res.slot == s):
                    slot = slots[s]
                    m.d.sync += [
                        slot.params.eq(res.params), slot.load.eq(res.load), slot.tiles.eq(res.tiles),
                        slot.footprint.eq(res.footprint),
                        slot.state.eq(Mux(res.bad, SlotState.BAD, SlotState.WAIT)),
                    ]

        # ---- start: activation load, then tiles ----------------------------------------------
        for s in range(SLOTS):
            other = slots[1 - s]
            older_running = (oldest == 1 - s) & ((other.state == SlotState.RUN) | (other.state == SlotState.DONE))
            hazard = Signal(name=f"slot{s}_hazard")
            m.d.comb += hazard.eq(_conflict(slots[s], other))
            with m.If(slots[s].state == SlotState.WAIT):
                with m.If((oldest == s) | (older_running & ~hazard)):
                    m.d.sync += slots[s].state.eq(SlotState.LOAD)
        load_slot = Signal(range(SLOTS))
        m.d.comb += [
            load_slot.eq(slots[1].state == SlotState.LOAD),
            self.load.valid.eq((slots[0].state == SlotState.LOAD) | (slots[1].state == SlotState.LOAD)),
            self.load.payload.eq(slots[load_slot].load),
        ]
        with m.If(self.load.valid & self.load.ready):
            at(load_slot, lambda sl: sl.state.eq(SlotState.RUN))

        # ---- tiles, in command order --------------------------------------------------------------
        srv = slots[serving]
        tc = self.tiles.payload
        m.d.comb += [
            self.tiles.valid.eq((srv.state == SlotState.RUN) & ~srv.granted),
            tc.slot.eq(serving), tc.tiles.eq(srv.tiles), tc.tile_beats.eq(srv.params.tile_beats),
            tc.weight_addr.eq(srv.footprint.weights.lo), tc.bias_addr.eq(srv.footprint.bias.lo),
            tc.out_addr.eq(srv.footprint.out.lo),
        ]
        with m.If(self.tiles_granted):
            at(serving, lambda sl: sl.granted.eq(1))
            m.d.sync += serving.eq(serving + 1)
        with m.If(op_fire):
            at(accept_slot, lambda sl: sl.granted.eq(0))

        # ---- completion ---------------------------------------------------------------------------
        for s in range(SLOTS):
            slot = slots[s]
            done_now = sum(self.tile_done[e][s].as_unsigned() for e in range(self._engines))
            with m.If(slot.state == SlotState.FREE):
                m.d.sync += slot.acked.eq(0)
            with m.Else():
                m.d.sync += slot.acked.eq(slot.acked + done_now)
            with m.If((slot.state == SlotState.RUN) & (slot.acked == slot.tiles)):
                m.d.sync += slot.state.eq(SlotState.DONE)

        head = slots[oldest]
        m.d.comb += [
            self.bad_head.eq(head.state == SlotState.BAD),
            self.active.eq(Cat(*[slots[s].state != SlotState.FREE for s in range(SLOTS)]).any()),
            self.done.valid.eq(head.state == SlotState.DONE),
        ]
        with m.If(self.abort):
            m.d.sync += [accept_slot.eq(0), oldest.eq(0), serving.eq(0)]
            for s in range(SLOTS):
                m.d.sync += slots[s].state.eq(SlotState.FREE)
        with m.If(self.done.valid & self.done.ready):
            at(oldest, lambda sl: sl.state.eq(SlotState.FREE))
            m.d.sync += oldest.eq(oldest + 1)
        return m


class TileAllocator(wiring.Component):
    """Hands tile t of a running command (weights at weight_addr + t x tile bytes, bias and
    outputs at + 4Rt, running sums) to whichever engine asks first (round robin).

    Ports
    -----
    cmd : In(stream tile_command_layout); ready when the previous command's tiles are all out.
    tile : Out(stream tile_grant_layout).array(engines); an engine's ``ready`` is its request.
    granted : Out(1), the command's last tile is handed out this cycle.
    abort : In(1), drops the command.
    """

    def __init__(self, geom: Geometry, engines: int):
        self._g = geom
        self._engines = engines
        super().__init__({
            "cmd": In(stream.Signature(tile_command_layout(geom))),
            "tile": Out(stream.Signature(tile_grant_layout(geom))).array(engines),
            "granted": Out(1),
            "abort": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._g
        busy = Signal()
        cmd = Signal(tile_command_layout(g))
        tile = Signal(_tile_count_width(g))
        w, b, o = Signal(g.addr_width), Signal(g.addr_width), Signal(g.addr_width)
        m.d.comb += self.cmd.ready.eq(~busy)
        with m.If(self.cmd.valid & self.cmd.ready):
            c = self.cmd.payload
            m.d.sync += [busy.eq(1), cmd.eq(c), tile.eq(0), w.eq(c.weight_addr), b.eq(c.bias_addr),
                         o.eq(c.out_addr)]
        grants, _, any_grant = round_robin(m, [t.ready & busy for t in self.tile], "tiles")
        last = tile == cmd.tiles - 1
        for t, gr in zip(self.tile, grants):
            p = t.payload
            m.d.comb += [t.valid.eq(gr), p.slot.eq(cmd.slot), p.last.eq(last),
                         p.weight_addr.eq(w), p.bias_addr.eq(b), p.out_addr.eq(o)]
        m.d.comb += self.granted.eq(any_grant & last)
        with m.If(any_grant):
            m.d.sync += [tile.eq(tile + 1), w.eq(w + (cmd.tile_beats << g.port_shift)),
                         b.eq(b + g.tile_row_bytes), o.eq(o + g.tile_row_bytes)]
            with m.If(last):
                m.d.sync += busy.eq(0)
        with m.If(self.abort):
            m.d.sync += busy.eq(0)
        return m


class ErrorDrain(wiring.Component):
    """Error and soft-reset sequencing, and the datapath's answers.

    An AXI error on a read master (READ_ERROR) or a write master (WRITE_ERROR), a BAD command
    at the head (DATAPATH_ERROR) or CTRL.soft_reset: `abort` empties the slots for one cycle,
    `flush` holds the engines and the activation buffer in reset until no master is ``busy``,
    and only then does ``op_done`` carry the error, so nothing hangs and the next run starts
    clean. A soft reset, or an error with no command in flight, is not answered. Otherwise
    ``done`` (the slots' answers) passes through to ``op_done``.

    Ports
    -----
    read_error, write_error, bad_command, soft_reset, active, busy : In(1).
    done : In(stream op_done_layout); op_done : Out(stream op_done_layout).
    abort : Out(1), one cycle. flush : Out(1). accept : Out(1), the slots may take ops.
    """

    def __init__(self):
        super().__init__({
            "read_error": In(1),
            "write_error": In(1),
            "bad_command": In(1),
            "soft_reset": In(1),
            "active": In(1),
            "busy": In(1),
            "done": In(stream.Signature(op_done_layout())),
            "op_done": Out(stream.Signature(op_done_layout())),
            "abort": Out(1),
            "flush": Out(1),
            "accept": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        state = Signal(DrainState)
        code = Signal.like(self.op_done.payload.error_code)
        silent = Signal()
        idle = state == DrainState.IDLE
        trigger = self.abort
        m.d.comb += [
            trigger.eq(idle & (self.read_error | self.write_error | self.bad_command | self.soft_reset)),
            self.flush.eq(trigger | (state == DrainState.DRAIN)),
            self.accept.eq(idle & ~trigger),
        ]
        with m.If(trigger):
            m.d.sync += [
                state.eq(DrainState.DRAIN),
                code.eq(Mux(self.read_error, ErrorCode.READ_ERROR,
                            Mux(self.write_error, ErrorCode.WRITE_ERROR, ErrorCode.DATAPATH_ERROR))),
                silent.eq(self.soft_reset | ~self.active),
            ]
        with m.If(state == DrainState.DRAIN):
            with m.If(self.soft_reset):
                m.d.sync += silent.eq(1)
            with m.If(~self.busy):
                m.d.sync += state.eq(Mux(silent | self.soft_reset, DrainState.IDLE, DrainState.RESPOND))

        with m.If(state == DrainState.RESPOND):
            m.d.comb += [self.op_done.valid.eq(1), self.op_done.payload.error.eq(1),
                         self.op_done.payload.error_code.eq(code)]
            with m.If(self.op_done.ready | self.soft_reset):
                m.d.sync += state.eq(DrainState.IDLE)
        with m.Elif(self.accept):
            m.d.comb += [self.op_done.valid.eq(self.done.valid), self.op_done.payload.eq(self.done.payload),
                         self.done.ready.eq(self.op_done.ready)]
        return m
