"""One linear engine per HP port, and the activation buffer they share.

`Engine` streams row tiles of one or more LINEAR commands through a
`LinearCore` (rtl/core.py). It owns no AXI master; the top gives it the
command/data streams of its port's `AxiReadMaster` and `AxiWriteMaster`:

* **tile sequencer**: asks the top's tile allocator for a tile whenever its
  read master can take a new command (so tiles are handed out as late as
  possible and ports that fall behind simply take fewer tiles), then issues
  one read for the tile's bias (R fp32, only with HAS_BIAS) and one contiguous
  read for the tile's weight stream (sw/contract/layout.py: per group, the meta beats
  then the weight-column beats);
* **unpacker**: splits the read stream into bias -> `core.bias` (+0.0 words
  when the command has no bias), meta -> `core.meta` (R fp16 scales, R 4-bit
  zero points) and weight beats -> `core.beats`, each array beat paired with
  the activation codes of its columns for every token lane, with the
  `first`/`final`/`last` flags;
* **code and activation-meta prefetchers**: read the shared activation
  buffer ahead of the unpacker (16 columns x T tokens per read) and the
  per-group s_a/qsum (`core.act`);
* **writer**: turns each tile's `core.y` (T x R fp32) into one write per token
  row at out_addr + t*stride + tile*4R (sw.contract.commands.OutputLayout), pads the
  last tile's rows with zeros up to the 64-byte row stride, splits at 4 KiB
  and 16 beats itself (so one write command is one AXI burst) and counts the
  B responses, so the top knows when each tile is in memory.

`ActivationBuffer` loads a command's activation buffer (sw.contract.commands.
ActivationLayout) from DDR through its own read master: s_a, then qsum, then
the int8 codes, into two slots (double buffering, so a command's load can
overlap the previous command's tail). Engines read it through one arbitrated
read port per memory; each read returns 16 columns x T tokens, which the
engine consumes over 16/C array beats, so four engines need far less than
one read per cycle. A block of codes is readable as soon as the last token's
beat of it has been written, so decode (T = 1) starts computing while the
codes still stream in.

docs/engine.md describes the sequencing, the port sharing and the counters.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Elaboratable, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from sw.contract.commands import ALIGN, BEAT_BYTES, DEFAULT_ADDR_BITS
from sw.contract.config import ArrayConfig
from sw.contract.errors import ConfigError
from sw.contract.layout import TileLayout

from .axi import read_data_layout, transfer_command_layout, write_data_layout
from .core import LinearCore, make_dequant
from .readmux import round_robin
from .share import LOCAL_UNITS, UnitSource

__all__ = ["Geometry", "Engine", "ActivationBuffer", "op_params_layout", "tile_grant_layout", "load_layout",
           "SLOTS", "TILES_IN_FLIGHT", "BLOCK_COLS"]

BLOCK_COLS = BEAT_BYTES    # int8 codes in one port beat of a token row: one activation-buffer block
SLOTS = 2                  # commands whose activations the buffer holds at once
TILES_IN_FLIGHT = 8        # tiles an engine has requested and not yet seen acknowledged in memory
MAX_BURST = 16             # beats of one AXI burst the writer issues
PAGE_BYTES = 4096          # AXI: no burst crosses a 4 KiB boundary


def _w(n: int) -> int:
    """Bits to hold 0..n."""
    return max(1, int(n).bit_length())


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class Geometry:
    """Every number the engine, the activation buffer and the top derive from the config."""

    config: ArrayConfig
    max_k: int = 4864
    addr_width: int = DEFAULT_ADDR_BITS
    beats_width: int = 28

    def __post_init__(self):
        cfg = self.config.validate()
        R, C, bits = cfg.rows, cfg.cols, cfg.weight_bits
        if cfg.port_bytes != BEAT_BYTES:
            raise ConfigError(f"the accelerator top drives {8 * BEAT_BYTES}-bit HP ports (sw.contract.commands."
                              f"BEAT_BYTES); config port_bits is {cfg.port_bits}")
        if not _pow2(R) or R < 4:
            raise ConfigError(f"the engine needs rows to be a power of two >= 4 (whole 16-byte bias and output "
                              f"beats), got {R}")
        if not _pow2(C) or C > BLOCK_COLS:
            raise ConfigError(f"the engine needs cols to be a power of two <= {BLOCK_COLS}, got {C}")
        if R * bits < 8 or cfg.port_bits % (R * C * bits):
            raise ConfigError(f"an array beat of {R}x{C} {bits}-bit codes must divide the {cfg.port_bits}-bit "
                              f"port beat")
        TileLayout(rows=R, cols=cfg.group_size, group_size=cfg.group_size, tile_rows=R, bits=bits)
        if self.max_k <= 0 or self.max_k % cfg.group_size or self.max_k % BLOCK_COLS:
            raise ConfigError(f"max_k {self.max_k} must be a positive multiple of the group size "
                              f"{cfg.group_size} and of {BLOCK_COLS}")
        if not 13 <= self.addr_width <= 64:
            raise ConfigError(f"addr_width must be 13..64 bits, not {self.addr_width}")

    # -- the array ------------------------------------------------------------------
    R = property(lambda self: self.config.rows)
    C = property(lambda self: self.config.cols)
    T = property(lambda self: self.config.tokens)
    G = property(lambda self: self.config.group_size)
    bits = property(lambda self: self.config.weight_bits)

    @property
    def layout(self) -> TileLayout:
        """The .kq layout of one group of one tile (sw/contract/layout.py)."""
        return TileLayout(rows=self.R, cols=self.G, group_size=self.G, tile_rows=self.R, bits=self.bits)

    # -- the port ------------------------------------------------------------------------
    port_bits = property(lambda self: self.config.port_bits)      # one HP port beat
    port_bytes = property(lambda self: self.config.port_bytes)
    row_align = property(lambda self: ALIGN)                       # output rows and buffer sections

    @property
    def port_shift(self) -> int:
        """log2(port_bytes): a byte count to port beats and back."""
        return self.port_bytes.bit_length() - 1

    @property
    def page_beats(self) -> int:
        """Port beats in the 4 KiB an AXI burst must not cross."""
        return PAGE_BYTES // self.port_bytes

    # -- the weight stream -------------------------------------------------------------
    @property
    def meta_beats(self) -> int:
        return self.layout.meta_bytes // self.port_bytes

    @property
    def weight_beats_per_group(self) -> int:
        return self.layout.group_weight_bytes // self.port_bytes

    @property
    def group_beats(self) -> int:
        """Port beats of one group block: meta then weights."""
        return self.meta_beats + self.weight_beats_per_group

    @property
    def beat_bits(self) -> int:
        return self.config.beat_bits

    @property
    def sub_beats(self) -> int:
        """Array beats per port beat."""
        return self.port_bits // self.beat_bits

    @property
    def tile_row_bytes(self) -> int:
        """Bytes of one tile's bias, and of one token row of its outputs: R fp32."""
        return self.R * 4

    @property
    def bias_beats(self) -> int:
        return self.tile_row_bytes // self.port_bytes

    @property
    def y_beats(self) -> int:
        """Output beats per token row of a tile."""
        return self.tile_row_bytes // self.port_bytes

    # -- the activation buffer --------------------------------------------------------
    @property
    def blocks(self) -> int:
        """Code blocks (16 columns) per slot."""
        return self.max_k // BLOCK_COLS

    @property
    def max_groups(self) -> int:
        return self.max_k // self.G

    @property
    def groups_per_meta_word(self) -> int:
        """fp32 s_a (or qsum) entries of one token in one port beat."""
        return self.port_bytes // 4

    @property
    def meta_words(self) -> int:
        """s_a / qsum words (4 groups of every token) per slot."""
        return -(-self.max_groups // self.groups_per_meta_word)

    @property
    def meta_sel_bits(self) -> int:
        """Bits that pick a group's entry in a meta word."""
        return self.groups_per_meta_word.bit_length() - 1

    @property
    def qsum_width(self) -> int:
        return self.config.qsum_width

    @property
    def code_addr_width(self) -> int:
        return _w(SLOTS * self.blocks - 1)

    @property
    def meta_addr_width(self) -> int:
        return _w(SLOTS * self.meta_words - 1)

    # -- widths of counts ----------------------------------------------------------------
    @property
    def tokens_width(self) -> int:
        return _w(self.T)

    @property
    def groups_width(self) -> int:
        return _w(self.max_groups)

    @property
    def kb_width(self) -> int:
        return _w(self.blocks)

    @property
    def tile_beats_width(self) -> int:
        return _w(self.max_groups * self.group_beats)

    @property
    def code_count_width(self) -> int:
        return _w(self.T * self.blocks)

    @property
    def act_layout(self) -> data.StructLayout:
        return make_dequant(self.config, facts_only=True).act_layout


def op_params_layout(g: Geometry) -> data.StructLayout:
    """What an engine needs to know about a command (one copy per slot, driven by the top)."""
    return data.StructLayout({
        "has_bias": 1,
        "tokens": unsigned(g.tokens_width),
        "groups": unsigned(g.groups_width),
        "kb": unsigned(g.kb_width),                    # code blocks per token row = K / 16
        "tile_beats": unsigned(g.tile_beats_width),    # port beats of one tile's weight stream
        "stride": unsigned(g.addr_width),              # output row stride in bytes
        "pad_beats": unsigned(2),                      # zero beats after the last tile of every row
        "code_base": unsigned(g.code_count_width),     # (tokens - 1) * kb: code beats before the last row
    })


def tile_grant_layout(g: Geometry) -> data.StructLayout:
    return data.StructLayout({
        "slot": 1,
        "last": 1,                                   # the command's last tile (writes the row padding)
        "weight_addr": unsigned(g.addr_width),
        "bias_addr": unsigned(g.addr_width),
        "out_addr": unsigned(g.addr_width),          # out_addr + tile * 4R
    })


def load_layout(g: Geometry) -> data.StructLayout:
    return data.StructLayout({
        "slot": 1,
        "tokens": unsigned(g.tokens_width),
        "kb": unsigned(g.kb_width),
        "msb": unsigned(_w(g.meta_words)),             # beats per token row of s_a (and of qsum)
        "codes_addr": unsigned(g.addr_width),
        "scales_addr": unsigned(g.addr_width),
        "qsums_addr": unsigned(g.addr_width),
        "code_beats": unsigned(g.code_count_width),
        "meta_beats": unsigned(_w(g.T * g.meta_words)),
    })


def _walk(m: Module, step, index: Signal, last, queue) -> None:
    """A prefetcher's counter: `index` runs 0 .. `last` on `step`; at `last` it starts over and
    the tile record at the head of `queue` is done."""
    with m.If(step):
        with m.If(index == last):
            m.d.sync += index.eq(0)
            m.d.comb += queue.r_en.eq(1)
        with m.Else():
            m.d.sync += index.eq(index + 1)


def act_req_layout(g: Geometry) -> data.StructLayout:
    return data.StructLayout({"addr": unsigned(g.meta_addr_width), "sel": unsigned(g.meta_sel_bits)})


# ---------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------

class Engine(wiring.Component):
    """See the module docstring. Reset it (ResetInserter) to abandon everything in flight;
    its AXI masters live outside and are cleared separately.

    Ports
    -----
    tile : In(stream tile_grant_layout). ``ready`` is the engine's request for a tile.
    params : In(ArrayLayout(op_params_layout, SLOTS)), per command slot.
    codes_written, meta_loaded : In, the activation buffer's progress per slot.
    code_req / code_rsp, act_req / act_rsp : the activation buffer's read ports.
    rd_cmd / rd_data : the read master's command and data streams.
    wr_cmd / wr_data : the write master's. b_ack : In, one B response this cycle.
    tile_done : Out(SLOTS), one-hot pulse: a tile of that slot is acknowledged in memory.
    busy, mem_stall, compute_stall : Out.
    """

    def __init__(self, geom: Geometry, *, units: UnitSource = LOCAL_UNITS):
        self._g = geom
        self._units = units
        g = geom
        aw, bw = g.addr_width, g.beats_width
        super().__init__({
            "tile": In(stream.Signature(tile_grant_layout(g))),
            "params": In(data.ArrayLayout(op_params_layout(g), SLOTS)),
            "codes_written": In(data.ArrayLayout(unsigned(g.code_count_width), SLOTS)),
            "meta_loaded": In(SLOTS),
            "code_req": Out(stream.Signature(unsigned(g.code_addr_width))),
            "code_rsp": In(stream.Signature(unsigned(g.T * g.port_bits))),
            "act_req": Out(stream.Signature(act_req_layout(g))),
            "act_rsp": In(stream.Signature(g.act_layout)),
            "rd_cmd": Out(stream.Signature(transfer_command_layout(aw, bw))),
            "rd_data": In(stream.Signature(read_data_layout(g.port_bits))),
            "wr_cmd": Out(stream.Signature(transfer_command_layout(aw, bw))),
            "wr_data": Out(stream.Signature(write_data_layout(g.port_bits))),
            "b_ack": In(1),
            "tile_done": Out(SLOTS),
            "busy": Out(1),
            "mem_stall": Out(1),
            "compute_stall": Out(1),
        })

    @property
    def geometry(self) -> Geometry:
        return self._g

    def elaborate(self, platform):
        m = Module()
        g = self._g
        R, C, T = g.R, g.C, g.T
        P = g.sub_beats
        # The core hands y over in port beats (item order = the DDR order of a token row), so the
        # writer needs neither a T*R x 32-bit register nor a mux over it.
        core = m.submodules.core = LinearCore(g.config, y_beat_bits=g.port_bits, units=self._units)

        # ---- tile records ---------------------------------------------------------------
        # A tile granted to this engine is recorded once per stage that walks it: the
        # unpacker, the two prefetchers and the writer. `inflight` bounds them all.
        inflight = Signal(range(TILES_IN_FLIGHT + 1))
        m.submodules.up_q = up_q = SyncFIFO(width=1, depth=TILES_IN_FLIGHT)
        m.submodules.cp_q = cp_q = SyncFIFO(width=1, depth=TILES_IN_FLIGHT)
        m.submodules.mp_q = mp_q = SyncFIFO(width=1, depth=TILES_IN_FLIGHT)
        wr_rec = data.StructLayout({"slot": 1, "last": 1, "out_addr": unsigned(g.addr_width)})
        m.submodules.wr_q = wr_q = SyncFIFO(width=wr_rec.size, depth=TILES_IN_FLIGHT)
        burst_bits = 8
        ack_rec = data.StructLayout({"slot": 1, "bursts": unsigned(burst_bits)})
        m.submodules.ack_q = ack_q = SyncFIFO(width=ack_rec.size, depth=TILES_IN_FLIGHT)

        # ---- tile sequencer -----------------------------------------------------------------
        grant = Signal(tile_grant_layout(g))
        rs_bias, rs_weights = Signal(), Signal()      # the bias / weight read is still to be issued
        rs_idle = ~rs_bias & ~rs_weights
        m.d.comb += self.tile.ready.eq(rs_idle & self.rd_cmd.ready & (inflight < TILES_IN_FLIGHT))
        take = self.tile.valid & self.tile.ready
        tp = self.params[self.tile.payload.slot]
        with m.If(take):
            m.d.sync += [grant.eq(self.tile.payload), rs_bias.eq(tp.has_bias), rs_weights.eq(1)]
        rec = Signal(wr_rec)
        m.d.comb += [
            rec.slot.eq(self.tile.payload.slot), rec.last.eq(self.tile.payload.last),
            rec.out_addr.eq(self.tile.payload.out_addr),
            up_q.w_en.eq(take), up_q.w_data.eq(self.tile.payload.slot),
            cp_q.w_en.eq(take), cp_q.w_data.eq(self.tile.payload.slot),
            mp_q.w_en.eq(take), mp_q.w_data.eq(self.tile.payload.slot),
            wr_q.w_en.eq(take), wr_q.w_data.eq(rec),
        ]
        gp = self.params[grant.slot]
        with m.If(rs_bias):
            m.d.comb += [self.rd_cmd.valid.eq(1), self.rd_cmd.payload.addr.eq(grant.bias_addr),
                         self.rd_cmd.payload.beats.eq(g.bias_beats)]
            with m.If(self.rd_cmd.ready):
                m.d.sync += rs_bias.eq(0)
        with m.Elif(rs_weights):
            m.d.comb += [self.rd_cmd.valid.eq(1), self.rd_cmd.payload.addr.eq(grant.weight_addr),
                         self.rd_cmd.payload.beats.eq(gp.tile_beats)]
            with m.If(self.rd_cmd.ready):
                m.d.sync += rs_weights.eq(0)

        # ---- unpacker -------------------------------------------------------------------------
        # Both FIFOs in flip-flops (_ShiftFIFO) rather than wide LUT RAM: with the activation
        # buffer's response FIFOs, 1.95 k LUTs less on kv260 for 13.5 k more flip-flops.
        # Two biases (a deeper FIFO only helps tiles of a single group); four groups' meta.
        m.submodules.bias_q = bias_q = _ShiftFIFO(32 * R, 2)
        meta_width = core.meta.payload.shape().size
        m.submodules.meta_q = meta_q = _ShiftFIFO(meta_width, 4)
        m.d.comb += [
            core.bias.valid.eq(bias_q.r_rdy), core.bias.payload.eq(bias_q.r_data), bias_q.r_en.eq(core.bias.ready),
            core.meta.valid.eq(meta_q.r_rdy), core.meta.payload.eq(meta_q.r_data), meta_q.r_en.eq(core.meta.ready),
        ]
        wiring.connect(m, wiring.flipped(self.act_rsp), core.act)

        START, BIAS, META, WEIGHTS = range(4)
        phase = Signal(2)
        cnt = Signal(range(max(g.bias_beats, g.meta_beats, g.weight_beats_per_group, 2)))
        grp = Signal(g.groups_width)
        sub = Signal(range(max(P, 2)))
        col = Signal(4)                       # column of the current array beat inside its code block
        up_slot = up_q.r_data[0]
        upp = self.params[up_slot]
        rd = self.rd_data
        beat = rd.payload.data
        fire_rd = rd.valid & rd.ready

        # The FIFOs' write data is assigned unconditionally (only w_en is conditional): a comb
        # assignment inside a branch would AND every data bit with the branch condition.
        # Every bias beat is shifted into bias_reg and written one cycle after the last one; a
        # tile without bias clears bias_reg instead (a synchronous reset, no multiplexer).
        bias_reg = Signal(32 * R)
        bias_put = Signal()
        meta_sr = Signal(max(1, g.port_bits * (g.meta_beats - 1)))
        meta_all = Cat(meta_sr, beat) if g.meta_beats > 1 else beat
        if g.bits == 4:
            meta_word = meta_all[:20 * R]               # R fp16 scales, then R nibbles of zero points
        else:
            meta_word = Cat(meta_all[:16 * R], Const(0, 4 * R))
        assert meta_word.shape().width == meta_width
        m.d.comb += [bias_q.w_data.eq(bias_reg), bias_q.w_en.eq(bias_put), meta_q.w_data.eq(meta_word)]
        m.d.sync += bias_put.eq(0)

        # The array beat: its payload is assigned unconditionally, only `valid` depends on the phase.
        wlast = cnt == g.weight_beats_per_group - 1
        sub_last = sub == P - 1
        bp = core.beats.payload
        m.d.comb += [
            bp.w.eq(beat.word_select(sub, g.beat_bits) if P > 1 else beat),
            bp.last.eq(wlast & sub_last),
            bp.first.eq(grp == 0),
            bp.final.eq(grp == upp.groups - 1),
        ]
        # The code block being consumed: a register loaded from code_rsp (the activation buffer's
        # one-entry buffer holds the next block), so neither side needs a T x 128-bit LUT-RAM FIFO
        # and the next block is already there when this one ends.
        block = Signal(T * g.port_bits, reset_less=True)
        block_valid = Signal()
        block_done = Signal()             # the last array beat of the block is taken this cycle
        m.d.comb += self.code_rsp.ready.eq(~block_valid | block_done)
        with m.If(self.code_rsp.valid & self.code_rsp.ready):
            m.d.sync += [block.eq(self.code_rsp.payload), block_valid.eq(1)]
        with m.Elif(block_done):
            m.d.sync += block_valid.eq(0)
        csel = col[(C - 1).bit_length():] if C > 1 else col
        for t in range(T):
            lane = block[t * g.port_bits:(t + 1) * g.port_bits]
            m.d.comb += bp.a.as_value()[t * 8 * C:(t + 1) * 8 * C].eq(lane.word_select(csel, 8 * C))

        with m.Switch(phase):
            with m.Case(START):
                with m.If(up_q.r_rdy):
                    with m.If(upp.has_bias):
                        m.d.sync += [phase.eq(BIAS), cnt.eq(0)]
                    with m.Elif(bias_q.w_rdy & ~bias_put):
                        # y starts at +0.0 for a layer without bias (numerics contract)
                        m.d.sync += [bias_reg.eq(0), bias_put.eq(1), phase.eq(META), cnt.eq(0)]
            with m.Case(BIAS):
                last = cnt == g.bias_beats - 1
                m.d.comb += rd.ready.eq(~last | bias_q.w_rdy & ~bias_put)
                with m.If(fire_rd):
                    m.d.sync += bias_reg.eq(Cat(bias_reg[g.port_bits:], beat))
                    with m.If(last):
                        m.d.sync += [bias_put.eq(1), phase.eq(META), cnt.eq(0)]
                    with m.Else():
                        m.d.sync += cnt.eq(cnt + 1)
            with m.Case(META):
                last = cnt == g.meta_beats - 1
                m.d.comb += rd.ready.eq(~last | meta_q.w_rdy)
                with m.If(fire_rd):
                    if g.meta_beats > 1:
                        m.d.sync += meta_sr.eq(Cat(meta_sr[g.port_bits:], beat))
                    with m.If(last):
                        m.d.comb += meta_q.w_en.eq(1)
                        m.d.sync += [phase.eq(WEIGHTS), cnt.eq(0), sub.eq(0)]
                    with m.Else():
                        m.d.sync += cnt.eq(cnt + 1)
            with m.Case(WEIGHTS):
                m.d.comb += [
                    core.beats.valid.eq(rd.valid & block_valid),
                    rd.ready.eq(core.beats.ready & block_valid & sub_last),
                ]
                fire_core = core.beats.valid & core.beats.ready
                m.d.comb += block_done.eq(fire_core & (col == BLOCK_COLS - C))
                with m.If(fire_core):
                    m.d.sync += [col.eq(col + C), sub.eq(Mux(sub_last, 0, sub + 1))]
                    with m.If(sub_last):
                        with m.If(wlast):
                            m.d.sync += cnt.eq(0)
                            with m.If(grp == upp.groups - 1):
                                m.d.sync += [grp.eq(0), phase.eq(START)]
                                m.d.comb += up_q.r_en.eq(1)
                            with m.Else():
                                m.d.sync += [grp.eq(grp + 1), phase.eq(META)]
                        with m.Else():
                            m.d.sync += cnt.eq(cnt + 1)

        # ---- code prefetcher: blocks 0 .. kb-1 of the slot, once per tile ------------------
        cp_slot = cp_q.r_data[0]
        cpp = self.params[cp_slot]
        blk = Signal(g.kb_width)
        written = self.codes_written[cp_slot]
        m.d.comb += [
            self.code_req.valid.eq(cp_q.r_rdy & (written > cpp.code_base + blk)),
            self.code_req.payload.eq(Mux(cp_slot, g.blocks + blk, blk)),
        ]
        _walk(m, self.code_req.valid & self.code_req.ready, blk, cpp.kb - 1, cp_q)

        # ---- activation-meta prefetcher: groups 0 .. ng-1, once per tile ------------------------
        mp_slot = mp_q.r_data[0]
        mpp = self.params[mp_slot]
        gidx = Signal(g.groups_width)
        m.d.comb += [
            self.act_req.valid.eq(mp_q.r_rdy & self.meta_loaded.bit_select(mp_slot, 1)),
            self.act_req.payload.addr.eq(Mux(mp_slot, g.meta_words, 0) + (gidx >> g.meta_sel_bits)),
            self.act_req.payload.sel.eq(gidx[:g.meta_sel_bits]),
        ]
        _walk(m, self.act_req.valid & self.act_req.ready, gidx, mpp.groups - 1, mp_q)

        # ---- writer ------------------------------------------------------------------------------
        head = Signal(wr_rec)
        m.d.comb += head.eq(wr_q.r_data)
        wpp = self.params[head.slot]
        W_IDLE, W_CMD, W_DATA, W_FIN = range(4)
        wstate = Signal(2)
        tok = Signal(g.tokens_width)
        row_base = Signal(g.addr_width)
        addr = Signal(g.addr_width)
        row_len = Signal(range(g.y_beats + 4))
        row_rem = Signal(range(g.y_beats + 4))
        j = Signal(range(g.y_beats + 4))
        burst_rem = Signal(range(MAX_BURST + 1))
        bursts = Signal(burst_bits)
        page_left = Signal(range(g.page_beats + 1))
        n_burst = Signal(range(MAX_BURST + 1))
        m.d.comb += page_left.eq(g.page_beats - addr[g.port_shift:(PAGE_BYTES - 1).bit_length()])
        with m.If((row_rem <= MAX_BURST) & (row_rem <= page_left)):
            m.d.comb += n_burst.eq(row_rem)
        with m.Elif(page_left < MAX_BURST):
            m.d.comb += n_burst.eq(page_left)
        with m.Else():
            m.d.comb += n_burst.eq(MAX_BURST)
        y = core.y.payload.data            # the tile's y, one port beat at a time, in DDR order
        y_total = T * g.y_beats            # beats of y per tile: every token lane, used or not
        y_taken = Signal(range(y_total + 1))
        in_row = j < g.y_beats
        # data: y inside a token row, zeros in the padding after the last tile (assigned outside
        # the state machine, so that only `valid` depends on the state)
        m.d.comb += [self.wr_data.payload.data.eq(Mux(in_row, y, 0)),
                     self.wr_data.payload.strb.eq(Const(-1, g.port_bytes))]
        with m.Switch(wstate):
            with m.Case(W_IDLE):
                with m.If(core.y.valid & wr_q.r_rdy):
                    length = g.y_beats + Mux(head.last, wpp.pad_beats, 0)
                    m.d.sync += [tok.eq(0), row_base.eq(head.out_addr), addr.eq(head.out_addr), j.eq(0),
                                 row_len.eq(length), row_rem.eq(length), bursts.eq(0), y_taken.eq(0),
                                 wstate.eq(W_CMD)]
            with m.Case(W_CMD):
                m.d.comb += [self.wr_cmd.valid.eq(1), self.wr_cmd.payload.addr.eq(addr),
                             self.wr_cmd.payload.beats.eq(n_burst)]
                with m.If(self.wr_cmd.ready):
                    m.d.sync += [burst_rem.eq(n_burst), bursts.eq(bursts + 1), wstate.eq(W_DATA)]
            with m.Case(W_DATA):
                # y beats are taken as they are written; the core holds its y valid until the last
                m.d.comb += [
                    self.wr_data.valid.eq(~in_row | core.y.valid),
                    core.y.ready.eq(in_row & self.wr_data.ready),
                ]
                with m.If(core.y.valid & core.y.ready):
                    m.d.sync += y_taken.eq(y_taken + 1)
                with m.If(self.wr_data.valid & self.wr_data.ready):
                    m.d.sync += [j.eq(j + 1), addr.eq(addr + g.port_bytes), row_rem.eq(row_rem - 1),
                                 burst_rem.eq(burst_rem - 1)]
                    with m.If(burst_rem == 1):
                        m.d.sync += wstate.eq(W_CMD)
                        with m.If(row_rem == 1):
                            with m.If(tok == wpp.tokens - 1):
                                m.d.sync += wstate.eq(W_FIN)
                            with m.Else():
                                m.d.sync += [tok.eq(tok + 1), row_base.eq(row_base + wpp.stride),
                                             addr.eq(row_base + wpp.stride), j.eq(0), row_rem.eq(row_len)]
            with m.Case(W_FIN):
                arec = Signal(ack_rec)
                m.d.comb += [arec.slot.eq(head.slot), arec.bursts.eq(bursts), ack_q.w_data.eq(arec)]
                with m.If(y_taken != y_total):
                    # drop the beats of the token lanes this command does not use
                    m.d.comb += core.y.ready.eq(1)
                    with m.If(core.y.valid):
                        m.d.sync += y_taken.eq(y_taken + 1)
                with m.Else():
                    m.d.comb += [wr_q.r_en.eq(1), ack_q.w_en.eq(1)]
                    m.d.sync += wstate.eq(W_IDLE)

        # ---- B acknowledgements -> tile_done -----------------------------------------------------
        acked = Signal(burst_bits + 2)
        ahead = Signal(ack_rec)
        m.d.comb += ahead.eq(ack_q.r_data)
        pop = Signal()
        m.d.comb += [pop.eq(ack_q.r_rdy & (acked >= ahead.bursts)), ack_q.r_en.eq(pop)]
        m.d.sync += acked.eq(acked + self.b_ack - Mux(pop, ahead.bursts, 0))
        m.d.comb += self.tile_done.eq(Mux(pop, Mux(ahead.slot, 0b10, 0b01), 0))
        m.d.sync += inflight.eq(inflight + take - pop)

        # ---- status and perf events ------------------------------------------------------------------
        m.d.comb += [
            self.busy.eq((inflight != 0) | ~rs_idle),
            self.mem_stall.eq(up_q.r_rdy & (phase != START) & ~rd.valid),
            self.compute_stall.eq(rd.valid & ~rd.ready),
        ]
        return m


class _ShiftFIFO(Elaboratable):
    """A FIFO of `depth` registers in a row: no memory and no read multiplexer, so it costs
    flip-flops, not LUTs, however wide it is (LUT RAM costs a LUT per ~7 bits of width).

    An entry moves one stage on whenever the next stage is empty or moving; the last stage is the
    output. Like SyncFIFO it takes a write every cycle while ``level`` < depth (stage 0 is then
    empty or moving), which `ActivationBuffer._serve`'s credits rely on; unlike it, an entry needs
    up to `depth` cycles to ripple through an empty FIFO. Ports: SyncFIFO's w_en, w_data, w_rdy,
    r_en, r_data, r_rdy and level.
    """

    def __init__(self, width: int, depth: int):
        self._depth = depth
        self.w_en, self.w_rdy, self.w_data = Signal(), Signal(), Signal(width)
        self.r_en, self.r_rdy, self.r_data = Signal(), Signal(), Signal(width)
        self.level = Signal(range(depth + 1))

    def elaborate(self, platform):
        m = Module()
        D = self._depth
        stage = [Signal(self.w_data.shape(), name=f"stage{i}", reset_less=True) for i in range(D)]
        valid = [Signal(name=f"stage{i}_valid") for i in range(D)]
        leave = [Signal(name=f"stage{i}_leave") for i in range(D)]    # stage i's entry moves on
        m.d.comb += leave[D - 1].eq(valid[D - 1] & self.r_en)
        for i in reversed(range(D - 1)):
            m.d.comb += leave[i].eq(valid[i] & (~valid[i + 1] | leave[i + 1]))
        m.d.comb += [self.w_rdy.eq(~valid[0] | leave[0]),
                     self.r_rdy.eq(valid[D - 1]), self.r_data.eq(stage[D - 1])]
        write = self.w_en & self.w_rdy
        with m.If(write):
            m.d.sync += [stage[0].eq(self.w_data), valid[0].eq(1)]
        with m.Elif(leave[0]):
            m.d.sync += valid[0].eq(0)
        for i in range(1, D):
            with m.If(leave[i - 1]):
                m.d.sync += [stage[i].eq(stage[i - 1]), valid[i].eq(1)]
            with m.Elif(leave[i]):
                m.d.sync += valid[i].eq(0)
        m.d.sync += self.level.eq(self.level + write - leave[D - 1])
        return m


# ---------------------------------------------------------------------------
# Activation buffer
# ---------------------------------------------------------------------------

class ActivationBuffer(wiring.Component):
    """Loads activation buffers into two slots and serves the engines' reads. See the module docstring.

    Ports
    -----
    load : In(stream load_layout): start loading a command's activations into a slot.
        The slot's progress (codes_written, meta_loaded) is cleared when the load is taken.
    rd_cmd / rd_data : its read master's streams.
    codes_written : Out, code beats written per slot (token-major, the DDR order).
    meta_loaded : Out, per slot: every s_a and qsum is in.
    busy : Out, a load is in progress.
    code_req<e> / code_rsp<e>, act_req<e> / act_rsp<e> : per engine.
    """

    CODE_FIFO_DEPTH = 1           # a register; the engine holds the block it works on in another
    ACT_FIFO_DEPTH = 4

    def __init__(self, geom: Geometry, engines: int):
        self._g = geom
        self._engines = engines
        g = geom
        members = {
            "load": In(stream.Signature(load_layout(g))),
            "rd_cmd": Out(stream.Signature(transfer_command_layout(g.addr_width, g.beats_width))),
            "rd_data": In(stream.Signature(read_data_layout(g.port_bits))),
            "codes_written": Out(data.ArrayLayout(unsigned(g.code_count_width), SLOTS)),
            "meta_loaded": Out(SLOTS),
            "busy": Out(1),
        }
        for e in range(engines):
            members[f"code_req{e}"] = In(stream.Signature(unsigned(g.code_addr_width)))
            members[f"code_rsp{e}"] = Out(stream.Signature(unsigned(g.T * g.port_bits)))
            members[f"act_req{e}"] = In(stream.Signature(act_req_layout(g)))
            members[f"act_rsp{e}"] = Out(stream.Signature(g.act_layout))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        g = self._g
        T, E = g.T, self._engines
        qw = g.qsum_width
        gpm = g.groups_per_meta_word

        # Block RAM for all three: s_a and qsum are shallow (2 x 19 words on kv260) but wide, so
        # Yosys would otherwise pick LUT RAM for them (1.7 k LUTs on kv260).
        block = {"ram_style": "block"}
        codes = m.submodules.codes = Memory(shape=unsigned(T * g.port_bits), depth=SLOTS * g.blocks, init=[],
                                            attrs=block)
        scales = m.submodules.scales = Memory(shape=unsigned(T * g.port_bits), depth=SLOTS * g.meta_words, init=[],
                                              attrs=block)
        qsums = m.submodules.qsums = Memory(shape=unsigned(T * gpm * qw), depth=SLOTS * g.meta_words, init=[],
                                            attrs=block)
        c_wr = codes.write_port(granularity=g.port_bits)
        s_wr = scales.write_port(granularity=g.port_bits)
        q_wr = qsums.write_port(granularity=gpm * qw)

        # ---- loader ------------------------------------------------------------------------
        ld = Signal(load_layout(g))
        active = Signal()
        cmd_step = Signal(2)            # 0: s_a, 1: qsum, 2: codes, 3: all issued
        sec = Signal(2)                 # section the data belongs to (same order)
        tok = Signal(g.tokens_width)
        word = Signal(g.kb_width)
        m.d.comb += [self.load.ready.eq(~active), self.busy.eq(active)]
        with m.If(self.load.valid & self.load.ready):
            m.d.sync += [ld.eq(self.load.payload), active.eq(1), cmd_step.eq(0), sec.eq(0), tok.eq(0),
                         word.eq(0)]
            for s in range(SLOTS):
                with m.If(self.load.payload.slot == s):
                    m.d.sync += [self.codes_written[s].eq(0), self.meta_loaded[s].eq(0)]

        cmd = self.rd_cmd
        with m.If(active & (cmd_step != 3)):
            m.d.comb += cmd.valid.eq(1)
            with m.Switch(cmd_step):
                with m.Case(0):
                    m.d.comb += [cmd.payload.addr.eq(ld.scales_addr), cmd.payload.beats.eq(ld.meta_beats)]
                with m.Case(1):
                    m.d.comb += [cmd.payload.addr.eq(ld.qsums_addr), cmd.payload.beats.eq(ld.meta_beats)]
                with m.Default():
                    m.d.comb += [cmd.payload.addr.eq(ld.codes_addr), cmd.payload.beats.eq(ld.code_beats)]
            with m.If(cmd.ready):
                m.d.sync += cmd_step.eq(cmd_step + 1)

        beat = self.rd_data.payload.data
        m.d.comb += self.rd_data.ready.eq(1)
        lanes = Cat(*[tok == t for t in range(T)])
        meta_addr = Mux(ld.slot, g.meta_words, 0) + word
        m.d.comb += [
            s_wr.addr.eq(meta_addr), s_wr.data.eq(Cat(*[beat] * T)),
            q_wr.addr.eq(meta_addr), q_wr.data.eq(Cat(*[Cat(*[beat[32 * i:32 * i + qw] for i in range(gpm)])] * T)),
            c_wr.addr.eq(Mux(ld.slot, g.blocks, 0) + word), c_wr.data.eq(Cat(*[beat] * T)),
        ]
        row_len = Mux(sec == 2, ld.kb, ld.msb)
        with m.If(self.rd_data.valid & active):
            with m.If(sec == 0):
                m.d.comb += s_wr.en.eq(lanes)
            with m.Elif(sec == 1):
                m.d.comb += q_wr.en.eq(lanes)
            with m.Else():
                m.d.comb += c_wr.en.eq(lanes)
                for s in range(SLOTS):
                    with m.If(ld.slot == s):
                        m.d.sync += self.codes_written[s].eq(self.codes_written[s] + 1)
            with m.If(word == row_len - 1):
                m.d.sync += word.eq(0)
                with m.If(tok == ld.tokens - 1):
                    m.d.sync += [tok.eq(0), sec.eq(sec + 1)]
                    with m.If(sec == 1):
                        for s in range(SLOTS):
                            with m.If(ld.slot == s):
                                m.d.sync += self.meta_loaded[s].eq(1)
                    with m.If(sec == 2):
                        m.d.sync += active.eq(0)
                with m.Else():
                    m.d.sync += tok.eq(tok + 1)
            with m.Else():
                m.d.sync += word.eq(word + 1)

        # ---- engine reads: codes ------------------------------------------------------------
        c_rd = codes.read_port()
        reqs = [getattr(self, f"code_req{e}") for e in range(E)]
        rsps = [getattr(self, f"code_rsp{e}") for e in range(E)]
        self._serve(m, "code", c_rd, reqs, rsps, lambda rdata, sel: rdata, None,
                    self.CODE_FIFO_DEPTH, T * g.port_bits)

        # ---- engine reads: s_a and qsum of one group ----------------------------------------
        s_rd = scales.read_port()
        q_rd = qsums.read_port()
        m.d.comb += q_rd.addr.eq(s_rd.addr)
        reqs = [getattr(self, f"act_req{e}") for e in range(E)]
        rsps = [getattr(self, f"act_rsp{e}") for e in range(E)]

        def act_word(_rdata, sel):
            sc = [s_rd.data[t * g.port_bits:(t + 1) * g.port_bits].word_select(sel, 32) for t in range(T)]
            qs = [q_rd.data[t * gpm * qw:(t + 1) * gpm * qw].word_select(sel, qw) for t in range(T)]
            return Cat(*sc, *qs)

        self._serve(m, "act", s_rd, reqs, rsps, act_word, g.meta_sel_bits, self.ACT_FIFO_DEPTH, g.act_layout.size)
        return m

    @staticmethod
    def _serve(m, name, port, reqs, rsps, shape_data, sel_bits, depth, width):
        """One memory read port shared by the engines: round-robin among requesters whose
        response FIFO has room; the read returns the next cycle into that FIFO."""
        E = len(reqs)
        fifos = []
        for e in range(E):
            # It must take a write every cycle while level < depth, which the credit check
            # below relies on (SyncFIFOBuffered refuses back-to-back writes while its output
            # register fills); _ShiftFIFO does, in flip-flops rather than wide LUT RAM.
            f = _ShiftFIFO(width, depth)
            m.submodules[f"{name}_rsp{e}"] = f
            fifos.append(f)
        pend = Signal(name=f"{name}_pend")
        pend_e = Signal(range(max(E, 2)), name=f"{name}_pend_e")
        pend_sel = Signal(max(1, sel_bits or 1), name=f"{name}_pend_sel")
        room = []
        for e, f in enumerate(fifos):
            mine = pend & (pend_e == e)
            room.append(reqs[e].valid & (f.level + mine < depth))
        grants, index, anyreq = round_robin(m, room, f"{name}_rr")
        for e in range(E):
            m.d.comb += reqs[e].ready.eq(grants[e])
        with m.Switch(index):
            for e in range(E):
                with m.Case(e):
                    a = reqs[e].payload.addr if sel_bits else reqs[e].payload
                    m.d.comb += port.addr.eq(a)
                    if sel_bits:
                        m.d.sync += pend_sel.eq(reqs[e].payload.sel)
        m.d.sync += [pend.eq(anyreq), pend_e.eq(index)]
        word = shape_data(port.data, pend_sel)
        for e, (f, rsp) in enumerate(zip(fifos, rsps)):
            m.d.comb += [
                f.w_en.eq(pend & (pend_e == e)), f.w_data.eq(word),
                rsp.valid.eq(f.r_rdy), rsp.payload.eq(f.r_data), f.r_en.eq(rsp.ready),
            ]
