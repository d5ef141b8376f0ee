"""FabricVectorEngine: the fabric decoder's vector opcodes, DDR to DDR, on one VectorUnit.

Executes EMBED, RMSNORM, QUANT, ROPE, KV_STORE, ADD and SILU_MUL, and RMSNORM, SILU_MUL and ROPE
with QUANT_OUT (sw/contract/fabric_commands.py, OP_DOCS, QUANT_OUT_DOC) exactly as sw/driver/fabric_exec.py's ``FabricOps`` does: the same bytes in memory and
the same error code. ATTEND is another engine's.

Ports
-----
``cmd``: In(stream of rtl.fabric_cmd.fabric_op_layout(addr_width)): a validated descriptor with
    RUN_POS / RUN_TOKEN. Preconditions (the validator's, plus the design's): n <= max_n, tokens <=
    max_tokens, aux one of the head dims / groups.
``done``: Out(stream of fabric_done_layout()): one beat per command, ``code`` an ErrorCode.
``rd0``, ``rd1``: AXI4 read managers (one HP port each); ``wr``: AXI4 write manager (a third port).
``busy``: a command is in progress or any master is busy.

Data movement per op (4 lanes: one 128-bit beat is one VectorUnit operand beat of 4 fp32):

======== ======================================== ================================ ======================
op       rd0                                      rd1                              wr (per token row t)
======== ======================================== ================================ ======================
ADD,     src0 row t -> a                          src1 + t*p0 -> b                 dst row t
SILU_MUL
RMSNORM  src0 row t twice -> a                    gamma (per row) -> b             dst row t
QUANT    src0 row t -> a                          --                               codes row, scales row,
                                                                                   qsums row
KV_STORE src0 row t -> a (QUANT, group = aux)     --                               per KV head: codes at
                                                                                   position pos+t, scale
ROPE     src0 row t -> head buffer -> a, b        table row pos+t -> table buffer  dst row t
                                                  -> c, d (replayed per head)
EMBED    table row id_t (8 bf16 per beat, two a   ids (once, unless TOKEN_REG)     dst row t
         beats per memory beat)
+Q       as the op                                as the op                        as QUANT (group aux)
======== ======================================== ================================ ======================

"+Q" is RMSNORM, SILU_MUL or ROPE with flag QUANT_OUT (flags bit 2): the VectorUnit command carries
``quant`` = 1 and group = aux (ROPE: the head_dim), the unit quantizes the result as it leaves
the producer's pipelines, and the write generator writes the activation buffer
commands.activation_layout(n, aux, T) exactly as QUANT does (codes, scales, qsums rows, padding
included); no fp32 row is written and dst_stride is unused.

* Four independent sequencers (rd0 commands, rd1 commands, VectorUnit commands, write segments)
  walk the same (row, head, segment) loops, so reads run ahead of the compute by the masters'
  buffers and nothing waits at a row boundary. ROPE reads x once: a two-slot head buffer plays a
  (x) and b (the rotated half) from one load, a two-slot table buffer plays cos/sin for every head
  of the row; so dst may equal src0 (every read of a head precedes its writes).
* Row tails (n not a multiple of 4) are read as whole beats with the extra lanes zeroed and
  written with byte strobes; KV_STORE's scale is one 4-byte strobe. QUANT writes the whole
  activation buffer (padding zeros included), as FabricOps does.
* Errors: CONTEXT_FULL (ROPE, KV_STORE: RUN_POS + tokens > p0) and BAD_TOKEN (EMBED, any id >= p0
  or negative; the ids are all checked first) answer before anything is read or written (ids aside).
  SLVERR/DECERR on a read -> READ_ERROR, else on a write -> WRITE_ERROR: the datapath is held in
  reset, every master is cleared and drained, then ``done`` answers. Memory written before the
  error is not restored (FabricOps writes nothing on an error; a streaming engine cannot).
* No multiplier (synth_xilinx would give each product a DSP48E2): EMBED's row offsets id * 2n
  are bit-serial, 1 + bitlen(max_n / 8) cycles per token row after the ids are checked;
  KV_STORE's p1 * p0 is shift-adds, so KV_STORE's p0 must be at most 2^20 (MAX_CONTEXT_LIMIT,
  which the descriptor checker's max_context bound enforces).
* The op completes (``done`` code 0) only after every write's B response: the next op may read it.
* Reset: the masters are inside, so a reset (an integrating top's ResetInserter) is safe whenever
  the engine is idle, which it is after every ``done``, errors included (it drains before it
  answers); a reset in the middle of an op would lose outstanding AXI bursts.
* Lanes: 4 (one 128-bit beat is one operand beat); other lane counts are not supported.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, ResetInserter, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from sw.contract.commands import DEFAULT_ADDR_BITS, HP_ID_BITS, ErrorCode, Opcode
from sw.contract.config import MAX_CONTEXT_LIMIT
from sw.contract.errors import ConfigError
from sw.contract.fabric_commands import HEAD_DIMS, QUANT_GROUPS

from .axi import AxiReadMaster, AxiWriteMaster, axi4_read_signature, axi4_write_signature
from .component import CheckedComponent
from .fabric_cmd import fabric_done_layout, fabric_op_layout
from .pe import shift_add_product
from .share import LOCAL_UNITS, UnitSource
from .storage import Fifo
from .vector import VecOp, VectorUnit

__all__ = ["FabricVectorEngine", "VECTOR_OPCODES"]

VECTOR_OPCODES = (Opcode.EMBED, Opcode.RMSNORM, Opcode.QUANT, Opcode.ROPE, Opcode.KV_STORE, Opcode.ADD,
                  Opcode.SILU_MUL)
LANES = 4
BEAT_BITS = 128

# write segment sources
_OUT, _CODES, _SCALES, _QSUMS, _KVSCALE = range(5)


def _seg_layout(beats_width: int) -> data.StructLayout:
    return data.StructLayout({"src": 3, "beats": beats_width, "dbeats": beats_width, "mask": 4, "lane": 2})


def _strobe(mask4):
    """4 lane enables -> 16 byte enables."""
    return Cat(*[mask4[i].replicate(4) for i in range(4)])


class _LoopGen:
    """Commands of a (t < n_t, g < n_g, k < n_k) loop: address base[k] + t*st_t[k] + g*st_g[k]
    (+ ``extra``), beats[k] (+ pad[k] in the last t). Parameters are registers the engine sets
    before ``go``; the loop state is the caller's module's (reset with the datapath)."""

    def __init__(self, name: str, kinds: int, aw: int, bw: int = 16):
        self.K = kinds
        self.name = name
        self.n_t = Signal(16, name=f"{name}_n_t")
        self.n_g = Signal(16, name=f"{name}_n_g")
        self.n_k = Signal(range(kinds + 1), name=f"{name}_n_k")
        mk = lambda what, w: [Signal(w, name=f"{name}_{what}{k}") for k in range(kinds)]  # noqa: E731
        self.base, self.st_t, self.st_g = mk("base", aw), mk("st_t", aw), mk("st_g", aw)
        self.beats, self.pad, self.dbeats = mk("beats", bw), mk("pad", bw), mk("dbeats", bw)
        self.src = mk("src", 3)
        self.extra = Signal(aw, name=f"{name}_extra")
        self.valid = Signal(name=f"{name}_valid")
        self.ready = Signal(name=f"{name}_ready")
        self.addr = Signal(aw, name=f"{name}_addr")
        self.out_beats = Signal(bw, name=f"{name}_out_beats")
        self.out_dbeats = Signal(bw, name=f"{name}_out_dbeats")
        self.out_src = Signal(3, name=f"{name}_out_src")
        self.t = Signal(16, name=f"{name}_t")
        self.g = Signal(16, name=f"{name}_g")
        self.k = Signal(range(max(kinds, 2)), name=f"{name}_k")
        self._aw = aw

    def elaborate(self, m: Module, go) -> None:
        K, aw = self.K, self._aw
        row = [Signal(aw, name=f"{self.name}_row{k}") for k in range(K)]
        cur = [Signal(aw, name=f"{self.name}_cur{k}") for k in range(K)]
        active = self.valid
        last_t = self.t + 1 == self.n_t
        kk = self.k if K > 1 else 0
        m.d.comb += [
            self.addr.eq(Array(cur)[kk] + self.extra),
            self.out_beats.eq(Array(self.beats)[kk] + Mux(last_t, Array(self.pad)[kk], 0)),
            self.out_dbeats.eq(Array(self.dbeats)[kk]),
            self.out_src.eq(Array(self.src)[kk]),
        ]
        with m.If(go):
            m.d.sync += [self.t.eq(0), self.g.eq(0), self.k.eq(0), active.eq((self.n_t != 0) & (self.n_g != 0))]
            m.d.sync += [r.eq(b) for r, b in zip(row, self.base)] + [c.eq(b) for c, b in zip(cur, self.base)]
        with m.Elif(active & self.ready):
            with m.If(self.k + 1 < self.n_k):
                m.d.sync += self.k.eq(self.k + 1)
            with m.Else():
                m.d.sync += self.k.eq(0)
                with m.If(self.g + 1 < self.n_g):
                    m.d.sync += self.g.eq(self.g + 1)
                    m.d.sync += [c.eq(c + s) for c, s in zip(cur, self.st_g)]
                with m.Else():
                    m.d.sync += self.g.eq(0)
                    with m.If(last_t):
                        m.d.sync += active.eq(0)
                    with m.Else():
                        m.d.sync += self.t.eq(self.t + 1)
                        m.d.sync += [r.eq(r + s) for r, s in zip(row, self.st_t)]
                        m.d.sync += [c.eq(r + s) for c, r, s in zip(cur, row, self.st_t)]


class _BlockBuffer:
    """Two slots of `depth` beats: blocks of B beats are loaded from a stream and each is played
    R times through two combinational read ports. ``rotate``: port 0 = j, port 1 = j ^ B/2 (x and
    the rotated half); else port 0 = j mod B/2, port 1 = B/2 + j mod B/2 (cos and sin)."""

    def __init__(self, name: str, depth: int):
        self.name = name
        self.depth = depth
        self.B = Signal(range(depth + 1), name=f"{name}_B")           # beats per block (power of 2)
        self.R = Signal(16, name=f"{name}_R")                         # plays per block
        self.rotate = Signal(name=f"{name}_rotate")
        self.in_valid = Signal(name=f"{name}_in_valid")
        self.in_ready = Signal(name=f"{name}_in_ready")
        self.in_data = Signal(BEAT_BITS, name=f"{name}_in_data")
        self.out_valid = Signal(name=f"{name}_out_valid")
        self.out_ready = Signal(name=f"{name}_out_ready")
        self.p0 = Signal(BEAT_BITS, name=f"{name}_p0")
        self.p1 = Signal(BEAT_BITS, name=f"{name}_p1")

    def elaborate(self, m: Module) -> None:
        d = self.depth
        jb = (d - 1).bit_length()
        mem = Memory(shape=BEAT_BITS, depth=2 * d, init=[])
        m.submodules[f"{self.name}_mem"] = mem
        wp = mem.write_port()
        r0, r1 = mem.read_port(domain="comb"), mem.read_port(domain="comb")
        full = Signal(2, name=f"{self.name}_full")
        wslot, rslot = Signal(name=f"{self.name}_wslot"), Signal(name=f"{self.name}_rslot")
        wj, rj = Signal(jb, name=f"{self.name}_wj"), Signal(jb, name=f"{self.name}_rj")
        rep = Signal(16, name=f"{self.name}_rep")
        half = self.B >> 1
        m.d.comb += [
            self.in_ready.eq(~full.bit_select(wslot, 1)),
            wp.en.eq(self.in_valid & self.in_ready), wp.addr.eq(Cat(wj, wslot)), wp.data.eq(self.in_data),
            self.out_valid.eq(full.bit_select(rslot, 1)),
        ]
        low = rj & (half - 1)
        m.d.comb += [
            r0.addr.eq(Cat(Mux(self.rotate, rj, low)[:jb], rslot)),
            r1.addr.eq(Cat(Mux(self.rotate, rj ^ half, low | half)[:jb], rslot)),
            self.p0.eq(r0.data), self.p1.eq(r1.data),
        ]
        set_, clr = Signal(2, name=f"{self.name}_set"), Signal(2, name=f"{self.name}_clr")
        with m.If(wp.en):
            m.d.sync += wj.eq(wj + 1)
            with m.If(wj + 1 == self.B):
                m.d.sync += [wj.eq(0), wslot.eq(~wslot)]
                m.d.comb += set_.eq(Mux(wslot, 2, 1))
        with m.If(self.out_valid & self.out_ready):
            m.d.sync += rj.eq(rj + 1)
            with m.If(rj + 1 == self.B):
                m.d.sync += [rj.eq(0), rep.eq(rep + 1)]
                with m.If(rep + 1 == self.R):
                    m.d.sync += [rep.eq(0), rslot.eq(~rslot)]
                    m.d.comb += clr.eq(Mux(rslot, 2, 1))
        m.d.sync += full.eq((full | set_) & ~clr)


class FabricVectorEngine(CheckedComponent):
    """See the module docstring. Parameters: ``addr_width``; ``max_n`` (the longest row);
    ``max_tokens`` (token rows per command); ``head_dims`` / ``groups`` (ROPE/KV_STORE head dims,
    QUANT groups); ``read_outstanding`` (bursts per read master); ``read_ids`` (rd0's and rd1's
    ARID: an integrating top that shares a port arbitrates by them), ``write_id`` (wr's AWID) and
    ``units`` (where the VectorUnit gets its shareable fp32 units, rtl/share.py)."""

    @classmethod
    def check(cls, *, addr_width: int = DEFAULT_ADDR_BITS, max_n: int = 4864, max_tokens: int = 8,
              head_dims=HEAD_DIMS, groups=QUANT_GROUPS, read_outstanding: int = 8, read_ids=(0, 0),
              write_id: int = 0, units: UnitSource = LOCAL_UNITS) -> None:
        if not isinstance(max_n, int) or max_n < 8:
            raise ConfigError(f"FabricVectorEngine: max_n must be an integer >= 8, got {max_n!r}")
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 64:
            raise ConfigError(f"FabricVectorEngine: max_tokens must be 1..64, got {max_tokens!r}")
        for what, vals in (("head_dims", head_dims), ("groups", groups)):
            vals = tuple(vals)
            if not vals or any(v not in (32, 64, 128) for v in vals):
                raise ConfigError(f"FabricVectorEngine: {what} must be among 32, 64, 128, got {vals!r}")
        if not 13 <= addr_width <= 64:
            raise ConfigError(f"FabricVectorEngine: addr_width must be 13..64, got {addr_width!r}")
        ids = tuple(read_ids) + (write_id,)
        if len(ids) != 3 or any(not isinstance(i, int) or not 0 <= i < 1 << HP_ID_BITS for i in ids):
            raise ConfigError(f"FabricVectorEngine: read_ids needs 2 ARIDs and write_id one AWID, each "
                              f"0..{(1 << HP_ID_BITS) - 1}, got {tuple(read_ids)!r} and {write_id!r}")

    def __init__(self, *, addr_width: int = DEFAULT_ADDR_BITS, max_n: int = 4864, max_tokens: int = 8,
                 head_dims=HEAD_DIMS, groups=QUANT_GROUPS, read_outstanding: int = 8, read_ids=(0, 0),
                 write_id: int = 0, units: UnitSource = LOCAL_UNITS):
        self._aw = addr_width
        self._units = units
        self._read_ids, self._write_id = tuple(read_ids), write_id
        self._max_n = max_n
        self._max_tokens = max_tokens
        self._head_dims = tuple(sorted(head_dims))
        self._groups = tuple(sorted(groups))
        self._read_outstanding = read_outstanding
        super().__init__({
            "cmd": In(stream.Signature(fabric_op_layout(addr_width))),
            "done": Out(stream.Signature(fabric_done_layout())),
            "rd0": Out(axi4_read_signature(addr_width, BEAT_BITS, HP_ID_BITS)),
            "rd1": Out(axi4_read_signature(addr_width, BEAT_BITS, HP_ID_BITS)),
            "wr": Out(axi4_write_signature(addr_width, BEAT_BITS, HP_ID_BITS)),
            "busy": Out(1),
        })

    addr_width = property(lambda self: self._aw)
    max_n = property(lambda self: self._max_n)
    max_tokens = property(lambda self: self._max_tokens)

    def elaborate(self, platform):
        m = Module()
        aw = self._aw
        max_n4 = -(-self._max_n // LANES) * LANES
        nw = max_n4.bit_length()
        tw = max(1, self._max_tokens.bit_length())

        # ---- masters (outside the datapath reset: they drain by themselves after `clear`) -------------
        master = dict(addr_width=aw, data_width=BEAT_BITS, id_width=HP_ID_BITS)
        rd0 = m.submodules.rd0m = AxiReadMaster(**master, max_outstanding=self._read_outstanding,
                                                arid=self._read_ids[0])
        rd1 = m.submodules.rd1m = AxiReadMaster(**master, max_outstanding=self._read_outstanding,
                                                arid=self._read_ids[1])
        wrm = m.submodules.wrm = AxiWriteMaster(**master, max_outstanding=8, buffer_beats=32, awid=self._write_id)
        wiring.connect(m, rd0.bus, wiring.flipped(self.rd0))
        wiring.connect(m, rd1.bus, wiring.flipped(self.rd1))
        wiring.connect(m, wrm.bus, wiring.flipped(self.wr))
        masters = (rd0, rd1, wrm)
        read_error = rd0.error | rd1.error
        any_error = read_error | wrm.error
        masters_busy = Cat(*[x.busy for x in masters]).any()

        # ---- the command and its derived numbers ---------------------------------------------------------
        c = Signal(fabric_op_layout(aw))
        opc = c.opcode
        is_op = {o: opc == int(o) for o in VECTOR_OPCODES}
        # QUANT_OUT (flags bit 2): the producer's result is quantized (group aux) and written as QUANT writes
        qout = c.flags[2] & (is_op[Opcode.RMSNORM] | is_op[Opcode.SILU_MUL] | is_op[Opcode.ROPE])
        n = Signal(nw)
        T = Signal(tw)
        lg = Signal(3)                        # log2(aux)
        nb = Signal(nw)                       # beats of an fp32 row: ceil(n / 4)
        tail = Signal(4)                      # lane mask of a row's last beat
        nh = Signal(nw)                       # n / aux: heads or groups per row
        hd = Signal(8)
        tn = Signal(nw + tw)                  # T * n
        ms = Signal(nw)                       # activation_layout.meta_stride
        tms = Signal(nw + tw)
        so_, qo, tot = Signal(aw), Signal(aw), Signal(aw)
        kvc = Signal(aw)                      # p1 * p0 (KV heads x capacity)
        cbytes, sbytes = Signal(aw), Signal(aw)
        code = Signal(8)
        flush = Signal()
        go = Signal()
        finished = Signal()

        def al64(x):
            return (x + 63) & ~Const(63, aw)

        # ---- datapath (held in reset by `flush`) --------------------------------------------------------
        dp = Module()
        g_rd0 = _LoopGen("g_rd0", 1, aw)
        g_rd1 = _LoopGen("g_rd1", 1, aw)
        g_vu = _LoopGen("g_vu", 1, aw)
        g_wr = _LoopGen("g_wr", 3, aw)
        gens = (g_rd0, g_rd1, g_vu, g_wr)
        for gen in gens:
            gen.elaborate(dp, go)

        vu = dp.submodules.vu = VectorUnit(LANES, max_length=max_n4, groups=self._groups, units=self._units)
        vu_op = Signal(VecOp)
        vu_len = Signal(nw)
        vu_group = Signal(8)

        # reads: generators -> masters (the ids read of EMBED is the engine's, see below)
        ids_cmd = Signal()                     # the engine drives rd1.cmd (EMBED ids)
        ids_take = Signal()
        ids_addr = Signal(aw)
        ids_beats = Signal(4)
        m.d.comb += [
            rd0.cmd.valid.eq(g_rd0.valid), rd0.cmd.payload.addr.eq(g_rd0.addr),
            rd0.cmd.payload.beats.eq(g_rd0.out_beats), g_rd0.ready.eq(rd0.cmd.ready),
            rd1.cmd.valid.eq(Mux(ids_cmd, 1, g_rd1.valid)),
            rd1.cmd.payload.addr.eq(Mux(ids_cmd, ids_addr, g_rd1.addr)),
            rd1.cmd.payload.beats.eq(Mux(ids_cmd, ids_beats, g_rd1.out_beats)),
            g_rd1.ready.eq(rd1.cmd.ready & ~ids_cmd),
            ids_take.eq(ids_cmd & rd1.cmd.ready),
        ]
        # VectorUnit commands
        dp.d.comb += [
            vu.cmd.valid.eq(g_vu.valid), g_vu.ready.eq(vu.cmd.ready),
            vu.cmd.payload.op.eq(vu_op), vu.cmd.payload.length.eq(vu_len),
            vu.cmd.payload.c0.eq(c.p0), vu.cmd.payload.c1.eq(c.p1), vu.cmd.payload.group.eq(vu_group),
            vu.cmd.payload.quant.eq(qout),
        ]

        # ROPE: head buffer (x -> a, b) and table buffer (cos, sin -> c, d)
        hbuf = _BlockBuffer("hbuf", max(self._head_dims) // LANES)
        tbuf = _BlockBuffer("tbuf", max(self._head_dims) // LANES)
        hbuf.elaborate(dp)
        tbuf.elaborate(dp)
        rope = is_op[Opcode.ROPE]
        embed = is_op[Opcode.EMBED]
        m.d.comb += [hbuf.rotate.eq(1), tbuf.rotate.eq(0)]

        def lanes_masked(payload):
            return Cat(*[Mux(~payload.last | tail[i], payload.data[32 * i:32 * i + 32], 0) for i in range(4)])

        half_sel = Signal()       # EMBED: which half of the memory beat is the a beat
        ids_phase = Signal()      # rd1 data are EMBED ids
        ids_data_take = Signal()
        dp.d.comb += [
            hbuf.in_valid.eq(rope & rd0.data.valid), hbuf.in_data.eq(rd0.data.payload.data),
            tbuf.in_valid.eq(rope & rd1.data.valid & ~ids_phase), tbuf.in_data.eq(rd1.data.payload.data),
            hbuf.out_ready.eq(rope & vu.a.ready), tbuf.out_ready.eq(rope & vu.c.ready),
            vu.c.payload.eq(tbuf.p0), vu.d.payload.eq(tbuf.p1),
            vu.c.valid.eq(tbuf.out_valid), vu.d.valid.eq(tbuf.out_valid),
        ]
        with dp.If(rope):
            dp.d.comb += [
                vu.a.valid.eq(hbuf.out_valid), vu.a.payload.eq(hbuf.p0),
                vu.b.valid.eq(hbuf.out_valid), vu.b.payload.eq(hbuf.p1),
                rd0.data.ready.eq(hbuf.in_ready), rd1.data.ready.eq(tbuf.in_ready | ids_phase),
            ]
        with dp.Elif(embed):
            dp.d.comb += [
                vu.a.valid.eq(rd0.data.valid),
                vu.a.payload.eq(Mux(half_sel, rd0.data.payload.data[64:], rd0.data.payload.data[:64])),
                rd0.data.ready.eq(vu.a.ready & half_sel),
                rd1.data.ready.eq(ids_phase),
            ]
            with dp.If(vu.a.valid & vu.a.ready):
                dp.d.sync += half_sel.eq(~half_sel)
        with dp.Else():
            dp.d.comb += [
                vu.a.valid.eq(rd0.data.valid), vu.a.payload.eq(lanes_masked(rd0.data.payload)),
                rd0.data.ready.eq(vu.a.ready),
                vu.b.valid.eq(rd1.data.valid & ~ids_phase), vu.b.payload.eq(lanes_masked(rd1.data.payload)),
                rd1.data.ready.eq(vu.b.ready | ids_phase),
            ]
        m.d.comb += ids_data_take.eq(ids_phase & rd1.data.valid)

        # QUANT / KV_STORE outputs: codes 4 x 4 -> one beat; stats -> scale and qsum beats
        quant = is_op[Opcode.QUANT] | qout           # the stats carry qsums too (not KV_STORE)
        codes_fifo = dp.submodules.codes_fifo = Fifo(width=BEAT_BITS, depth=32)
        cidx = Signal(2)
        cacc = [Signal(32, name=f"cacc{i}") for i in range(3)]
        dp.d.comb += [
            vu.codes.ready.eq((cidx != 3) | codes_fifo.w_rdy),
            codes_fifo.w_en.eq(vu.codes.valid & (cidx == 3)),
            codes_fifo.w_data.eq(Cat(*cacc, vu.codes.payload)),
        ]
        with dp.If(vu.codes.valid & vu.codes.ready):
            dp.d.sync += cidx.eq(cidx + 1)
            for i in range(3):
                with dp.If(cidx == i):
                    dp.d.sync += cacc[i].eq(vu.codes.payload)

        ng_max = max_n4 // min(self._groups)
        stat_depth = -(-ng_max // 4) + 16
        sfifo = dp.submodules.scale_fifo = Fifo(width=BEAT_BITS, depth=stat_depth)
        qfifo = dp.submodules.qsum_fifo = Fifo(width=BEAT_BITS, depth=stat_depth)
        sidx = Signal(2)
        sw_ = Signal(nw)                       # word within the row
        words_per_row = Signal(nw)
        sacc = [Signal(32, name=f"sacc{i}") for i in range(3)]
        qacc = [Signal(32, name=f"qacc{i}") for i in range(3)]
        st = vu.stats.payload
        emit = (sidx == 3) | (sw_ + 1 == words_per_row)

        def packed(acc, new):
            return Cat(*[Mux(sidx > i, acc[i], Mux(sidx == i, new, 0)) if i < 3 else Mux(sidx == 3, new, 0)
                         for i in range(4)])

        dp.d.comb += [
            vu.stats.ready.eq(~emit | (sfifo.w_rdy & (qfifo.w_rdy | ~quant))),
            sfifo.w_en.eq(vu.stats.valid & emit & vu.stats.ready), sfifo.w_data.eq(packed(sacc, st.scale)),
            qfifo.w_en.eq(vu.stats.valid & emit & vu.stats.ready & quant),
            qfifo.w_data.eq(packed(qacc, st.qsum.as_unsigned())),
        ]
        with dp.If(vu.stats.valid & vu.stats.ready):
            dp.d.sync += [sidx.eq(sidx + 1), sw_.eq(sw_ + 1)]
            with dp.If(emit):
                dp.d.sync += sidx.eq(0)
            with dp.If(sw_ + 1 == words_per_row):
                dp.d.sync += sw_.eq(0)
            for i in range(3):
                with dp.If(sidx == i):
                    dp.d.sync += [sacc[i].eq(st.scale), qacc[i].eq(st.qsum.as_unsigned())]

        # writes: segments -> (write command FIFO, segment FIFO) -> data mux
        seg_l = _seg_layout(16)
        wcmd_fifo = dp.submodules.wcmd_fifo = Fifo(width=aw + 16, depth=4)
        seg_fifo = dp.submodules.seg_fifo = Fifo(width=seg_l.size, depth=4)
        kvs = g_wr.out_src == _KVSCALE
        lane = g_wr.addr[2:4]
        seg_in = Signal(seg_l)
        dp.d.comb += [
            seg_in.src.eq(g_wr.out_src), seg_in.beats.eq(g_wr.out_beats), seg_in.dbeats.eq(g_wr.out_dbeats),
            seg_in.lane.eq(lane),
            seg_in.mask.eq(Mux(g_wr.out_src == _OUT, tail, Mux(kvs, Const(1, 4) << lane, 0xF))),
            g_wr.ready.eq(wcmd_fifo.w_rdy & seg_fifo.w_rdy),
            wcmd_fifo.w_en.eq(g_wr.valid & g_wr.ready), seg_fifo.w_en.eq(g_wr.valid & g_wr.ready),
            wcmd_fifo.w_data.eq(Cat(g_wr.addr & ~Const(15, aw), g_wr.out_beats)),
            seg_fifo.w_data.eq(seg_in),
        ]
        m.d.comb += [
            wrm.cmd.valid.eq(wcmd_fifo.r_rdy), wrm.cmd.payload.addr.eq(wcmd_fifo.r_data[:aw]),
            wrm.cmd.payload.beats.eq(wcmd_fifo.r_data[aw:]), wcmd_fifo.r_en.eq(wrm.cmd.ready),
        ]
        seg = data.View(seg_l, seg_fifo.r_data)
        wb = Signal(16)
        is_data = wb < seg.dbeats
        last_data = wb + 1 == seg.dbeats
        src_valid = Signal()
        src_data = Signal(BEAT_BITS)
        src_take = Signal()
        strb = Signal(4)
        with dp.Switch(seg.src):
            with dp.Case(_OUT):
                dp.d.comb += [src_valid.eq(vu.out.valid), src_data.eq(vu.out.payload),
                              vu.out.ready.eq(src_take), strb.eq(Mux(last_data, seg.mask, 0xF))]
            with dp.Case(_CODES):
                dp.d.comb += [src_valid.eq(codes_fifo.r_rdy), src_data.eq(codes_fifo.r_data),
                              codes_fifo.r_en.eq(src_take), strb.eq(0xF)]
            with dp.Case(_SCALES):
                dp.d.comb += [src_valid.eq(sfifo.r_rdy), src_data.eq(sfifo.r_data),
                              sfifo.r_en.eq(src_take), strb.eq(0xF)]
            with dp.Case(_QSUMS):
                dp.d.comb += [src_valid.eq(qfifo.r_rdy), src_data.eq(qfifo.r_data),
                              qfifo.r_en.eq(src_take), strb.eq(0xF)]
            with dp.Case(_KVSCALE):
                dp.d.comb += [src_valid.eq(sfifo.r_rdy),
                              src_data.eq(sfifo.r_data[:32] << Cat(Const(0, 5), seg.lane)),
                              sfifo.r_en.eq(src_take), strb.eq(seg.mask)]
        w_fire = wrm.data.valid & wrm.data.ready
        m.d.comb += [
            wrm.data.valid.eq(seg_fifo.r_rdy & (~is_data | src_valid)),
            wrm.data.payload.data.eq(Mux(is_data, src_data, 0)),
            wrm.data.payload.strb.eq(_strobe(Mux(is_data, strb, 0xF))),
        ]
        dp.d.comb += [src_take.eq(w_fire & is_data), seg_fifo.r_en.eq(w_fire & (wb + 1 == seg.beats))]
        with dp.If(w_fire):
            dp.d.sync += wb.eq(Mux(wb + 1 == seg.beats, 0, wb + 1))
        dp.d.comb += finished.eq(~Cat(*[gen.valid for gen in gens]).any() & (seg_fifo.level == 0)
                                 & (wcmd_fifo.level == 0))
        m.submodules.datapath = ResetInserter(flush)(dp)

        # ---- EMBED ids -------------------------------------------------------------------------------
        ids = [Signal(32, name=f"id{t}") for t in range(self._max_tokens)]
        emb_off = [Signal(aw, name=f"emb_off{t}") for t in range(self._max_tokens)]
        id_beat = Signal(range(-(-self._max_tokens // 4) + 1))
        m.d.comb += g_rd0.extra.eq(Mux(embed, Array(emb_off)[g_rd0.t[:tw]], 0))
        with m.If(ids_data_take):
            m.d.sync += id_beat.eq(id_beat + 1)
            for t in range(self._max_tokens):
                with m.If(id_beat == t // 4):
                    m.d.sync += ids[t].eq(rd1.data.payload.data[32 * (t % 4):32 * (t % 4) + 32])

        # ---- the sequencer -----------------------------------------------------------------------------
        mul_t = Signal(range(self._max_tokens + 1))
        flush_wait = Signal(2)
        m.d.comb += self.done.payload.code.eq(code)
        # KV_STORE's p1 * p0 as shift-adds: nh = n / head_dim < 2^nh_bits, p0 <= max_context <= 2^20
        # (the descriptor checker's bound)
        nh_bits = max(1, (self._max_n >> 5).bit_length())
        P0_BITS = MAX_CONTEXT_LIMIT.bit_length()
        MUL_BITS = max(1, (self._max_n >> 3).bit_length())
        # EMBED's row offsets id * 2n = (id << 4) * (n / 8) (n % 8 == 0), bit-serial over n / 8's
        # MUL_BITS bits: one add per cycle, 1 + MUL_BITS cycles per token row, no multiplier
        mul_bit = Signal(range(MUL_BITS + 1))
        mcand = Signal(aw)
        mplier = Signal(MUL_BITS)
        macc = Signal(aw)
        with m.FSM(name="seq") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += c.eq(self.cmd.payload)
                    m.next = "SETUP1"
            with m.State("SETUP1"):
                aux = c.aux
                m.d.sync += [
                    n.eq(c.n), T.eq(c.tokens), nb.eq((c.n + 3) >> 2),
                    tail.eq(Array([Const(0xF, 4), Const(1, 4), Const(3, 4), Const(7, 4)])[c.n[:2]]),
                    lg.eq(Mux(aux[7], 7, Mux(aux[6], 6, 5))), hd.eq(aux),
                ]
                m.next = "SETUP2"
            with m.State("SETUP2"):
                m.d.sync += [nh.eq(n >> lg), tn.eq(shift_add_product(T, n))]
                m.next = "SETUP3"
            with m.State("SETUP3"):
                m.d.sync += [ms.eq(((nh + 3) >> 2) << 4), so_.eq(al64(tn)),
                             kvc.eq(shift_add_product(nh[:nh_bits], c.p0[:P0_BITS]))]
                m.next = "SETUP4"
            with m.State("SETUP4"):
                m.d.sync += [tms.eq(shift_add_product(T, ms)), cbytes.eq(al64(kvc << lg)), sbytes.eq(al64(kvc << 2))]
                m.next = "SETUP5"
            with m.State("SETUP5"):
                m.d.sync += qo.eq(al64(so_ + tms))
                m.next = "SETUP6"
            with m.State("SETUP6"):
                m.d.sync += tot.eq(al64(qo + tms))
                m.next = "PARAMS"
            with m.State("PARAMS"):
                self._params(m, c, is_op, qout, g_rd0, g_rd1, g_vu, g_wr, n=n, T=T, lg=lg, nb=nb, nh=nh, hd=hd,
                             tn=tn, ms=ms, tms=tms, so_=so_, qo=qo, tot=tot, cbytes=cbytes, sbytes=sbytes,
                             vu_op=vu_op, vu_len=vu_len, vu_group=vu_group, words_per_row=words_per_row,
                             hbuf=hbuf, tbuf=tbuf)
                full = (c.run_pos + T) > c.p0
                with m.If((is_op[Opcode.ROPE] | is_op[Opcode.KV_STORE]) & full):
                    m.d.sync += code.eq(ErrorCode.CONTEXT_FULL)
                    m.next = "DONE"
                with m.Elif(embed & c.flags[0]):
                    m.d.sync += ids[0].eq(c.run_token)
                    m.next = "CHECK"
                with m.Elif(embed):
                    m.d.sync += [ids_addr.eq(c.src0), ids_beats.eq((T + 3) >> 2), id_beat.eq(0)]
                    m.next = "IDS_CMD"
                with m.Else():
                    m.next = "GO"
            with m.State("IDS_CMD"):
                m.d.comb += [ids_cmd.eq(1), ids_phase.eq(1)]
                with m.If(ids_take):
                    m.next = "IDS_DATA"
            with m.State("IDS_DATA"):
                m.d.comb += ids_phase.eq(1)
                with m.If(read_error):
                    m.next = "FLUSH"
                with m.Elif(id_beat == ids_beats):
                    m.next = "CHECK"
            with m.State("CHECK"):
                bad = Cat(*[(t < T) & (ids[t][31] | (ids[t] >= c.p0)) for t in range(self._max_tokens)]).any()
                with m.If(bad):
                    m.d.sync += code.eq(ErrorCode.BAD_TOKEN)
                    m.next = "DRAIN_IDS"
                with m.Else():
                    m.d.sync += [mul_t.eq(0), mul_bit.eq(0)]
                    m.next = "MUL"
            with m.State("DRAIN_IDS"):          # the ids master is idle once its data were taken
                with m.If(~masters_busy):
                    m.next = "DONE"
            with m.State("MUL"):
                with m.If(mul_bit == 0):
                    m.d.sync += [mcand.eq(Array(ids)[mul_t] << 4), mplier.eq(n[3:3 + MUL_BITS]), macc.eq(0),
                                 mul_bit.eq(1)]
                with m.Else():
                    macc_next = (macc + Mux(mplier[0], mcand, 0))[:aw]
                    m.d.sync += [macc.eq(macc_next), mcand.eq(mcand << 1), mplier.eq(mplier >> 1),
                                 mul_bit.eq(mul_bit + 1)]
                    with m.If(mul_bit == MUL_BITS):
                        m.d.sync += [Array(emb_off)[mul_t].eq(macc_next), mul_t.eq(mul_t + 1), mul_bit.eq(0)]
                        with m.If(mul_t + 1 >= T):
                            m.next = "GO"
            with m.State("GO"):
                m.d.comb += go.eq(1)
                m.next = "RUN"
            with m.State("RUN"):
                with m.If(any_error):
                    m.next = "FLUSH"
                with m.Elif(finished):
                    m.next = "FINISH"
            with m.State("FINISH"):
                with m.If(any_error):
                    m.next = "FLUSH"
                with m.Elif(~masters_busy):
                    m.d.sync += code.eq(ErrorCode.NONE)
                    m.next = "DONE"
            with m.State("FLUSH"):
                m.d.comb += flush.eq(1)
                with m.If(flush_wait == 0):
                    m.d.sync += code.eq(Mux(read_error, ErrorCode.READ_ERROR, ErrorCode.WRITE_ERROR))
                    m.d.comb += [x.clear.eq(1) for x in masters]
                with m.If(flush_wait != 3):
                    m.d.sync += flush_wait.eq(flush_wait + 1)
                with m.Elif(~masters_busy):
                    m.d.sync += flush_wait.eq(0)
                    m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.done.valid.eq(1)
                with m.If(self.done.ready):
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE") | masters_busy)
        return m

    def _params(self, m, c, is_op, qout, g_rd0, g_rd1, g_vu, g_wr, *, n, T, lg, nb, nh, hd, tn, ms, tms, so_, qo,
                tot, cbytes, sbytes, vu_op, vu_len, vu_group, words_per_row, hbuf, tbuf):
        """The generators' parameters for the op in `c` (one cycle, registered)."""
        s = m.d.sync
        # defaults: one row loop per generator, one kind, no pads, strides 0
        for gen in (g_rd0, g_rd1, g_vu, g_wr):
            s += [gen.n_t.eq(T), gen.n_g.eq(1), gen.n_k.eq(1)]
            for k in range(gen.K):
                s += [gen.base[k].eq(0), gen.st_t[k].eq(0), gen.st_g[k].eq(0), gen.beats[k].eq(nb),
                      gen.pad[k].eq(0), gen.dbeats[k].eq(nb), gen.src[k].eq(_OUT)]
        s += [g_rd1.n_t.eq(0), vu_len.eq(nb << 2), vu_group.eq(hd), words_per_row.eq(nh)]
        s += [hbuf.B.eq(hd >> 2), hbuf.R.eq(1), tbuf.B.eq(hd >> 2), tbuf.R.eq(nh)]
        row0 = [g_rd0.base[0].eq(c.src0), g_rd0.st_t[0].eq(c.src_stride)]
        out_rows = [g_wr.base[0].eq(c.dst), g_wr.st_t[0].eq(c.dst_stride)]
        # the activation buffer activation_layout(n, aux, T) per row: codes, scales, qsums (QUANT, QUANT_OUT)
        activations = [
            g_wr.n_k.eq(3),
            g_wr.base[0].eq(c.dst), g_wr.st_t[0].eq(n), g_wr.beats[0].eq(n >> 4),
            g_wr.dbeats[0].eq(n >> 4), g_wr.pad[0].eq((so_ - tn) >> 4), g_wr.src[0].eq(_CODES),
            g_wr.base[1].eq(c.dst + so_), g_wr.st_t[1].eq(ms), g_wr.beats[1].eq(ms >> 4),
            g_wr.dbeats[1].eq(ms >> 4), g_wr.pad[1].eq((qo - so_ - tms) >> 4), g_wr.src[1].eq(_SCALES),
            g_wr.base[2].eq(c.dst + qo), g_wr.st_t[2].eq(ms), g_wr.beats[2].eq(ms >> 4),
            g_wr.dbeats[2].eq(ms >> 4), g_wr.pad[2].eq((tot - qo - tms) >> 4), g_wr.src[2].eq(_QSUMS),
        ]
        with m.Switch(c.opcode):
            with m.Case(int(Opcode.ADD), int(Opcode.SILU_MUL)):
                s += row0 + out_rows
                s += [g_rd1.n_t.eq(T), g_rd1.base[0].eq(c.src1), g_rd1.st_t[0].eq(c.p0)]
                s += vu_op.eq(Mux(is_op[Opcode.ADD], VecOp.ADD, VecOp.SILU_MUL))
            with m.Case(int(Opcode.RMSNORM)):
                s += row0 + out_rows + [g_rd0.n_g.eq(2)]
                s += [g_rd1.n_t.eq(T), g_rd1.base[0].eq(c.src1)]
                s += vu_op.eq(VecOp.RMSNORM)
            with m.Case(int(Opcode.EMBED)):
                s += out_rows + [g_rd0.base[0].eq(c.src1), g_rd0.beats[0].eq(n >> 3)]
                s += [vu_op.eq(VecOp.BF16), vu_len.eq(n)]
            with m.Case(int(Opcode.ROPE)):
                s += row0 + out_rows
                s += [g_rd1.n_t.eq(T), g_rd1.base[0].eq(c.src1 + (c.run_pos << (lg + 2))),
                      g_rd1.st_t[0].eq(hd << 2), g_rd1.beats[0].eq(hd >> 2)]
                s += [vu_op.eq(VecOp.ROPE), vu_len.eq(hd), g_vu.n_g.eq(nh)]
            with m.Case(int(Opcode.QUANT)):
                s += row0 + [vu_op.eq(VecOp.QUANT), vu_len.eq(n)] + activations
            with m.Case(int(Opcode.KV_STORE)):
                value = c.flags[1]
                co = Mux(value, cbytes, 0)
                sof = (cbytes << 1) + Mux(value, sbytes, 0)
                s += row0 + [vu_op.eq(VecOp.QUANT), vu_len.eq(n), words_per_row.eq(1)]
                s += [g_wr.n_k.eq(2), g_wr.n_g.eq(nh)]
                s += [g_wr.base[0].eq(c.dst + co + (c.run_pos << lg)), g_wr.st_t[0].eq(hd),
                      g_wr.st_g[0].eq(c.p0 << lg), g_wr.beats[0].eq(hd >> 4), g_wr.dbeats[0].eq(hd >> 4),
                      g_wr.src[0].eq(_CODES)]
                s += [g_wr.base[1].eq(c.dst + sof + (c.run_pos << 2)), g_wr.st_t[1].eq(4),
                      g_wr.st_g[1].eq(c.p0 << 2), g_wr.beats[1].eq(1), g_wr.dbeats[1].eq(1),
                      g_wr.src[1].eq(_KVSCALE)]
        with m.If(qout):          # RMSNORM, SILU_MUL, ROPE with QUANT_OUT: written as QUANT writes
            s += activations
