"""FabricAttendEngine: the ATTEND fabric op (sw/contract/fabric_commands.py), DDR to DDR,
around one :class:`rtl.attention.AttentionUnit`.

The spec is ``sw.driver.fabric_exec.FabricOps._attend``: for each token row t (position
RUN_POS + t) and KV head g, the unit attends the g_op query heads g*g_op .. g*g_op+g_op-1 of
row t (g_op = heads / p1, the op's GQA ratio) over cache positions 0 .. RUN_POS + t (causal
inside a prefill chunk) and the g_op x head_dim fp32 outputs go to
``dst + t * dst_stride + 4 * g * g_op * head_dim``.

Parameters: ``addr_width``; ``head_dim`` D (32, 64 or 128) and ``group`` G are the unit's
build-time shape: D is the only head_dim the engine takes, G the largest GQA ratio (an op with
g_op < G runs the unit with G - g_op phantom heads: zero query codes and scales, outputs
dropped; it costs the unit's exp2 pass G cycles per position, and the MAC passes
ceil(G / heads per step) steps, whatever g_op is); ``macs`` the unit's multipliers;
``max_positions`` N the largest KV capacity (p0) it takes; ``max_tokens`` the largest T;
``exp_lanes`` the unit's heads per cycle in its exp pass (rtl/attention.py).

Ports
-----
cmd : In(stream of rtl.fabric_cmd.fabric_op_layout(addr_width)): a validated ATTEND descriptor
    (the opcode is not looked at) with RUN_POS.
done : Out(stream of fabric_done_layout()): one answer per command; ``code`` 0, or an
    sw.contract.commands.ErrorCode:

    * BAD_FIELD (17): aux != D, heads / p1 > G (n != D * g_op * p1 for every g_op in 1 .. G) or
      p0 > N; nothing is read;
    * TOO_MANY_TOKENS (9): tokens > max_tokens (validation with this design's token count
      rejects it first); nothing is read;
    * CONTEXT_FULL (18): RUN_POS + tokens > p0; nothing is read;
    * READ_ERROR (14) / WRITE_ERROR (15): SLVERR/DECERR on a read / a write (a read error wins
      when both happen). Rows written before the error stay written (the golden model writes
      nothing): on an error the op's dst rows are undefined, nothing else is touched.
rd0, rd1, rd2 : Out(axi4_read_signature(addr_width, 128, HP_ID_BITS)): rd0 reads the K codes,
    rd1 the V scales and the V codes, rd2 the query scales, the query codes and the K scales (in
    that order per unit command). The integrating top gives each its own HP port (or arbitrates
    them by ``read_ids``).
wr : Out(axi4_write_signature(...)): the outputs.
busy : Out(1): a command is being worked on (or answered).
perf_unit_busy, perf_unit_wait : Out(32): of the last (or current) op, the cycles the
    AttentionUnit worked on a command, and of those the cycles it waited on one of its input
    streams or on the writer (cleared at each op's start, and by a flush).
abort : In(1): a pulse that stops the current command without an answer: the datapath is
    held in reset while every master drains its bursts; ``busy`` falls when the buses are
    quiet. After that (busy low) a ResetInserter on the whole engine is safe; a reset while
    bursts are in flight is not (the masters would lose track of them).

Per command (one AttentionUnit command per row t and KV head g), an issuer pushes the
transfers into small command FIFOs, as far ahead as they have room (the next commands' rows
stream into the masters' buffers while the unit computes):

* rd0: K codes of KV head g, positions 0 .. n-1 (n = RUN_POS + t + 1), one contiguous read
  ``src1 + (g * p0) * D``, n * D / 16 beats;
* rd1: the beats holding the n V scales (the unit reads them in its pass 1, beside the K rows:
  they set the P.V block exponent), then the V codes, like the K codes at ``src1 + codes_bytes``;
* rd2: the beats holding s_q of heads g*g_op .. g*g_op+g_op-1 (row t of the scales section of
  the activation buffer, commands.activation_layout(n, D, T)), the g_op*D query codes (row t of
  the codes section, at g*g_op*D), the beats holding the n K scales (scales' first word is at any
  4-byte offset: the leading words are skipped).

A feeder splits rd2's stream into the unit's ``cmd`` (n, s_q), ``q`` and ``k_scale`` streams, a
splitter rd1's into ``v_scale`` and ``v``; rd0 feeds ``k`` directly; ``out`` goes to the write
master. The addresses of a command follow from the previous one by additions; the three
products of a descriptor (T * codes_stride, p1 * p0) are made by a shift-add multiplier
before the first command (at most 32 cycles).

Memory order: every read of the op may happen after some of its writes, so dst must not
overlap src0 or the cache (the driver's buffers never do).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out, connect

from sw.contract.commands import BEAT_BYTES, DEFAULT_ADDR_BITS, HP_ID_BITS, ErrorCode
from sw.contract.errors import ConfigError
from sw.contract.fabric_commands import HEAD_DIMS

from .attention import AttentionUnit
from .axi import (BEATS_WIDTH, AxiReadMaster, AxiWriteMaster, axi4_read_signature, axi4_write_signature,
                  read_data_layout, transfer_command_layout, write_data_layout)
from .component import CheckedComponent
from .fabric_cmd import fabric_done_layout, fabric_op_layout
from .pe import const_product
from .share import LOCAL_UNITS, UnitSource
from .storage import Fifo

__all__ = ["FabricAttendEngine", "READ_PORTS", "READ_OUTSTANDING"]

READ_PORTS = 3                    # rd0 K codes, rd1 V codes, rd2 queries and scales
READ_OUTSTANDING = (8, 8, 4)      # bursts in flight per read master (8 x 16 beats cover the latency)
CMD_FIFO_DEPTH = 4                # unit commands the issuer may run ahead
BEAT_BITS = 8 * BEAT_BYTES
WORDS = BEAT_BYTES // 4


def _align(value, a: int):
    return (value + (a - 1)) & ~(a - 1)


def _log2(n: int) -> int:
    return n.bit_length() - 1


class _AttendPipe(wiring.Component):
    """Everything of one ATTEND op that a flush resets: set-up products, issuer, command FIFOs,
    the rd2 feeder, the AttentionUnit and the output path. ``start`` (one cycle, with ``op``
    held) begins; ``finished`` rises when every output beat went to the write master and every
    transfer command left its FIFO."""

    def __init__(self, *, addr_width, head_dim, group, macs, max_positions, max_tokens, exp_lanes=1,
                 units=LOCAL_UNITS):
        self._aw, self._D, self._G, self._N, self._T = addr_width, head_dim, group, max_positions, max_tokens
        self.unit = AttentionUnit(head_dim, group, macs, max_positions, exp_lanes, units=units)
        tc = stream.Signature(transfer_command_layout(addr_width, BEATS_WIDTH))
        rdata = stream.Signature(read_data_layout(BEAT_BITS))
        super().__init__({
            "op": In(fabric_op_layout(addr_width)),
            "group": In(range(group + 1)),   # the op's query heads per KV head, 1 .. group (held with op)
            "start": In(1),
            "finished": Out(1),
            "k_cmd": Out(tc), "v_cmd": Out(tc), "m_cmd": Out(tc), "w_cmd": Out(tc),
            "k_data": In(rdata), "v_data": In(rdata), "m_data": In(rdata),
            "w_data": Out(stream.Signature(write_data_layout(BEAT_BITS))),
            "unit_cmds": Out(32),            # unit commands completed (all outputs to the writer)
            "unit_busy": Out(32),            # cycles the unit worked on a command (since start)
            "unit_wait": Out(32),            # of those, cycles it waited on an input or on the writer
        })

    def elaborate(self, platform):
        m = Module()
        AW, D, G, N = self._aw, self._D, self._G, self._N
        op = self.op
        m.submodules.unit = unit = self.unit
        q_beats = G * D // BEAT_BYTES                # what the unit takes: the built group's heads
        out_beats = G * D // 4
        grp = self.group                             # the op's heads: the others are phantoms
        head_beats = D // BEAT_BYTES                 # query beats of one head
        q_real = Signal(range(q_beats + 1))          # query beats read (grp heads)
        out_real = Signal(range(out_beats + 1))      # output beats written (grp heads)
        grp_bytes = Signal(range(G * D + 1))         # grp * D: one KV head's query codes
        m.d.comb += [q_real.eq(grp * head_beats), out_real.eq(grp * (D // 4)), grp_bytes.eq(grp * D)]
        row_shift = _log2(D // BEAT_BYTES)          # K/V beats per position = 1 << row_shift

        # ---- transfer-command FIFOs (to the masters) ------------------------------------------
        fifos = {}
        for name in ("k", "v", "m", "w"):
            depth = CMD_FIFO_DEPTH * {"m": 4, "v": 2}.get(name, 1)
            f = fifos[name] = m.submodules[f"{name}_fifo"] = Fifo(width=AW + BEATS_WIDTH, depth=depth)
            port = getattr(self, f"{name}_cmd")
            m.d.comb += [port.valid.eq(f.r_rdy), port.payload.addr.eq(f.r_data[:AW]),
                         port.payload.beats.eq(f.r_data[AW:]), f.r_en.eq(port.ready)]
        info_layout = data.StructLayout({"n": range(N + 1), "sq_skip": 2, "ks_skip": 2})
        m.submodules.info_fifo = info = Fifo(width=info_layout.size, depth=CMD_FIFO_DEPTH)
        vinfo_layout = data.StructLayout({"n": range(N + 1), "vs_skip": 2})         # for rd1's splitter
        m.submodules.vinfo_fifo = vinfo = Fifo(width=vinfo_layout.size, depth=CMD_FIFO_DEPTH)

        # ---- set-up: the descriptor's products (shift-add, one multiplier bit per cycle) -------
        W = AW + 2
        mul_a = [Signal(W, name=f"mul{i}_a") for i in range(2)]
        mul_b = [Signal(32, name=f"mul{i}_b") for i in range(2)]
        mul_p = [Signal(W, name=f"mul{i}_p") for i in range(2)]
        for a, b, p in zip(mul_a, mul_b, mul_p):
            with m.If(b != 0):
                m.d.sync += [a.eq(a << 1), b.eq(b >> 1)]
                with m.If(b[0]):
                    m.d.sync += p.eq(p + a)
        mul_busy = (mul_b[0] != 0) | (mul_b[1] != 0)

        codes_stride = Signal(33)                   # activation codes row: align16(n) bytes
        meta_stride = Signal(W)                     # activation scales row: align16(4 * heads)
        m.d.comb += codes_stride.eq(_align(op.n, BEAT_BYTES))
        m.d.comb += meta_stride.eq(_align(op.n >> (_log2(D) - 2), BEAT_BYTES))     # n = heads * D
        cache_prod = mul_p[1]                       # p1 * p0: positions of all KV heads
        codes_bytes = Signal(AW)
        scales_bytes = Signal(AW)
        m.d.comb += [codes_bytes.eq(_align(cache_prod << _log2(D), 64)),
                     scales_bytes.eq(_align(cache_prod << 2, 64))]
        scales_offset = Signal(AW)
        m.d.comb += scales_offset.eq(_align(mul_p[0], 64))

        # ---- the issuer ---------------------------------------------------------------------
        t = Signal(16)
        g = Signal(32)
        n_vis = Signal(range(N + 2))
        q_row, q_cur = Signal(AW), Signal(AW)
        sq_row, sq_cur = Signal(AW), Signal(AW)
        d_row, d_cur = Signal(AW), Signal(AW)
        k_cur, ks_cur = Signal(AW), Signal(AW)
        k_base, ks_base = Signal(AW), Signal(AW)
        kv_step = Signal(AW)                        # p0 * D: one KV head's codes
        sub = Signal(range(6))
        issued = Signal(32)
        done_cmds = Signal(32)
        m.d.comb += self.unit_cmds.eq(done_cmds)
        issue_done = Signal()
        m.d.comb += kv_step.eq(op.p0 << _log2(D))

        vs_cur = Signal(AW)
        m.d.comb += vs_cur.eq(ks_cur + scales_bytes)
        sq_skip, ks_skip, vs_skip = sq_cur[2:4], ks_cur[2:4], vs_cur[2:4]
        kv_beats = n_vis << row_shift
        push = {name: Signal(name=f"push_{name}") for name in fifos}
        push_addr = {name: Signal(AW, name=f"push_{name}_addr") for name in fifos}
        push_beats = {name: Signal(BEATS_WIDTH, name=f"push_{name}_beats") for name in fifos}
        for name, f in fifos.items():
            m.d.comb += [f.w_en.eq(push[name]), f.w_data.eq(Cat(push_addr[name], push_beats[name]))]
        info_w = Signal(info_layout)
        m.d.comb += [info.w_data.eq(info_w), info_w.n.eq(n_vis), info_w.sq_skip.eq(sq_skip),
                     info_w.ks_skip.eq(ks_skip)]
        vinfo_w = Signal(vinfo_layout)
        m.d.comb += [vinfo.w_data.eq(vinfo_w), vinfo_w.n.eq(n_vis), vinfo_w.vs_skip.eq(vs_skip)]

        def words_beats(skip, count):
            return (skip + count + (WORDS - 1)) >> _log2(WORDS)

        def beat_addr(a):
            return Cat(Const(0, _log2(BEAT_BYTES)), a[_log2(BEAT_BYTES):])

        with m.FSM(name="issuer"):
            with m.State("IDLE"):                   # before the first op, and after each op's last command
                with m.If(self.start):
                    m.d.sync += [mul_a[0].eq(codes_stride), mul_b[0].eq(op.tokens), mul_p[0].eq(0),
                                 mul_a[1].eq(op.p0), mul_b[1].eq(op.p1), mul_p[1].eq(0),
                                 issued.eq(0), issue_done.eq(0)]
                    m.next = "SETUP"
            with m.State("SETUP"):
                with m.If(~mul_busy):
                    m.d.sync += [q_row.eq(op.src0), q_cur.eq(op.src0),
                                 sq_row.eq(op.src0 + scales_offset), sq_cur.eq(op.src0 + scales_offset),
                                 d_row.eq(op.dst), d_cur.eq(op.dst),
                                 k_base.eq(op.src1), k_cur.eq(op.src1),
                                 ks_base.eq(op.src1 + (codes_bytes << 1)), ks_cur.eq(op.src1 + (codes_bytes << 1)),
                                 n_vis.eq(op.run_pos + 1), t.eq(0), g.eq(0), sub.eq(0)]
                    m.next = "ISSUE"
            with m.State("ISSUE"):
                with m.Switch(sub):
                    with m.Case(0):
                        m.d.comb += [push["k"].eq(fifos["k"].w_rdy), push_addr["k"].eq(k_cur),
                                     push_beats["k"].eq(kv_beats)]
                        with m.If(fifos["k"].w_rdy):
                            m.d.sync += sub.eq(1)
                    with m.Case(1):                 # the V scales (the unit's pass 1), then the V codes
                        m.d.comb += [push["v"].eq(fifos["v"].w_rdy), push_addr["v"].eq(beat_addr(vs_cur)),
                                     push_beats["v"].eq(words_beats(vs_skip, n_vis))]
                        with m.If(fifos["v"].w_rdy):
                            m.d.sync += sub.eq(2)
                    with m.Case(2):
                        m.d.comb += [push["v"].eq(fifos["v"].w_rdy), push_addr["v"].eq(k_cur + codes_bytes),
                                     push_beats["v"].eq(kv_beats)]
                        with m.If(fifos["v"].w_rdy):
                            m.d.sync += sub.eq(3)
                    with m.Case(3):
                        m.d.comb += [push["m"].eq(fifos["m"].w_rdy), push_addr["m"].eq(beat_addr(sq_cur)),
                                     push_beats["m"].eq(words_beats(sq_skip, grp))]
                        with m.If(fifos["m"].w_rdy):
                            m.d.sync += sub.eq(4)
                    with m.Case(4):
                        m.d.comb += [push["m"].eq(fifos["m"].w_rdy), push_addr["m"].eq(q_cur),
                                     push_beats["m"].eq(q_real)]
                        with m.If(fifos["m"].w_rdy):
                            m.d.sync += sub.eq(5)
                    with m.Case(5):
                        room = fifos["m"].w_rdy & fifos["w"].w_rdy & info.w_rdy & vinfo.w_rdy
                        m.d.comb += [push["m"].eq(room), push_addr["m"].eq(beat_addr(ks_cur)),
                                     push_beats["m"].eq(words_beats(ks_skip, n_vis)),
                                     push["w"].eq(room), push_addr["w"].eq(d_cur), push_beats["w"].eq(out_real),
                                     info.w_en.eq(room), vinfo.w_en.eq(room)]
                        with m.If(room):
                            m.d.sync += [sub.eq(0), issued.eq(issued + 1)]
                            with m.If(g + 1 == op.p1):
                                m.d.sync += [g.eq(0), k_cur.eq(k_base), ks_cur.eq(ks_base),
                                             q_row.eq(q_row + codes_stride), q_cur.eq(q_row + codes_stride),
                                             sq_row.eq(sq_row + meta_stride), sq_cur.eq(sq_row + meta_stride),
                                             d_row.eq(d_row + op.dst_stride), d_cur.eq(d_row + op.dst_stride),
                                             t.eq(t + 1), n_vis.eq(n_vis + 1)]
                                with m.If(t + 1 == op.tokens):
                                    m.d.sync += issue_done.eq(1)
                                    m.next = "IDLE"
                            with m.Else():
                                m.d.sync += [g.eq(g + 1), k_cur.eq(k_cur + kv_step), ks_cur.eq(ks_cur + (op.p0 << 2)),
                                             q_cur.eq(q_cur + grp_bytes), sq_cur.eq(sq_cur + (grp << 2)),
                                             d_cur.eq(d_cur + (grp_bytes << 2))]

        # ---- the rd2 feeder: s_q -> unit cmd, q beats, K scales -----------------------------------
        cur = Signal(info_layout)
        widx = Signal(2)
        cnt = Signal(range(N + 1))
        qcnt = Signal(range(q_beats + 1))
        sq_regs = Signal(data.ArrayLayout(32, G))
        ucmd_valid = Signal()
        info_r = Signal(info_layout)
        m.d.comb += info_r.eq(info.r_data)
        word = self.m_data.payload.data.word_select(widx, 32)
        m.d.comb += [unit.cmd.valid.eq(ucmd_valid), unit.cmd.payload.n.eq(cur.n),
                     unit.cmd.payload.s_q.eq(sq_regs)]
        with m.If(unit.cmd.valid & unit.cmd.ready):
            m.d.sync += ucmd_valid.eq(0)
        m.d.comb += unit.k_scale.payload.eq(word)
        with m.FSM(name="feeder"):
            with m.State("INFO"):
                with m.If(info.r_rdy & ~ucmd_valid):
                    m.d.comb += info.r_en.eq(1)
                    m.d.sync += [cur.eq(info_r), widx.eq(info_r.sq_skip), cnt.eq(0), sq_regs.eq(0)]
                    m.next = "SQ"
            with m.State("SQ"):
                last = cnt == grp - 1
                m.d.comb += self.m_data.ready.eq((widx == WORDS - 1) | last)
                with m.If(self.m_data.valid):
                    m.d.sync += [widx.eq(widx + 1), cnt.eq(cnt + 1)]
                    for i in range(G):
                        with m.If(cnt == i):
                            m.d.sync += sq_regs[i].eq(word)
                    with m.If(last):
                        m.d.sync += [ucmd_valid.eq(1), qcnt.eq(0)]
                        m.next = "Q"
            with m.State("Q"):                     # grp heads from rd2, then zeros for the phantoms
                real = qcnt < q_real
                m.d.comb += [unit.q.valid.eq(~real | self.m_data.valid), self.m_data.ready.eq(real & unit.q.ready),
                             unit.q.payload.eq(Mux(real, self.m_data.payload.data, 0))]
                with m.If(unit.q.valid & unit.q.ready):
                    m.d.sync += qcnt.eq(qcnt + 1)
                    with m.If(qcnt == q_beats - 1):
                        m.d.sync += [widx.eq(cur.ks_skip), cnt.eq(0)]
                        m.next = "KS"
            with m.State("KS"):
                last = cnt == cur.n - 1
                m.d.comb += [unit.k_scale.valid.eq(self.m_data.valid),
                             self.m_data.ready.eq(unit.k_scale.ready & ((widx == WORDS - 1) | last))]
                with m.If(self.m_data.valid & unit.k_scale.ready):
                    m.d.sync += [widx.eq(widx + 1), cnt.eq(cnt + 1)]
                    with m.If(last):
                        m.d.sync += cnt.eq(0)
                        m.next = "INFO"

        # ---- the rd1 splitter: V scales -> unit v_scale (read in the unit's pass 1), V codes -> v
        vn = Signal(range(N + 1))
        vwidx = Signal(2)
        vcnt = Signal(range(N * (D // BEAT_BYTES) + 1))
        vinfo_r = Signal(vinfo_layout)
        m.d.comb += [vinfo_r.eq(vinfo.r_data), unit.v_scale.payload.eq(self.v_data.payload.data.word_select(vwidx, 32)),
                     unit.v.payload.eq(self.v_data.payload.data)]
        with m.FSM(name="v_splitter"):
            with m.State("INFO"):
                with m.If(vinfo.r_rdy):
                    m.d.comb += vinfo.r_en.eq(1)
                    m.d.sync += [vn.eq(vinfo_r.n), vwidx.eq(vinfo_r.vs_skip), vcnt.eq(0)]
                    m.next = "VS"
            with m.State("VS"):
                last = vcnt == vn - 1
                m.d.comb += [unit.v_scale.valid.eq(self.v_data.valid),
                             self.v_data.ready.eq(unit.v_scale.ready & ((vwidx == WORDS - 1) | last))]
                with m.If(self.v_data.valid & unit.v_scale.ready):
                    m.d.sync += [vwidx.eq(vwidx + 1), vcnt.eq(vcnt + 1)]
                    with m.If(last):
                        m.d.sync += vcnt.eq(0)
                        m.next = "V"
            with m.State("V"):
                m.d.comb += [unit.v.valid.eq(self.v_data.valid), self.v_data.ready.eq(unit.v.ready)]
                with m.If(self.v_data.valid & unit.v.ready):
                    m.d.sync += vcnt.eq(vcnt + 1)
                    with m.If(vcnt == (vn << row_shift) - 1):
                        m.next = "INFO"

        # ---- K rows, outputs -------------------------------------------------------------------
        m.d.comb += [unit.k.valid.eq(self.k_data.valid), unit.k.payload.eq(self.k_data.payload.data),
                     self.k_data.ready.eq(unit.k.ready)]
        ocnt = Signal(range(out_beats))
        keep = ocnt < out_real                      # the phantom heads' outputs are dropped
        m.d.comb += [self.w_data.valid.eq(unit.out.valid & keep), self.w_data.payload.data.eq(unit.out.payload),
                     self.w_data.payload.strb.eq(Const((1 << BEAT_BYTES) - 1, BEAT_BYTES)),
                     unit.out.ready.eq(~keep | self.w_data.ready)]
        with m.If(unit.out.valid & unit.out.ready):
            m.d.sync += ocnt.eq(Mux(ocnt == out_beats - 1, 0, ocnt + 1))
            with m.If(ocnt == out_beats - 1):
                m.d.sync += done_cmds.eq(done_cmds + 1)
        with m.If(self.start):
            m.d.sync += done_cmds.eq(0)

        # ---- performance: the unit's busy cycles and its waits on the streams ---------------------
        busy = ~unit.cmd.ready
        wait = Cat(*[st.ready & ~st.valid for st in (unit.q, unit.k, unit.v, unit.k_scale, unit.v_scale)],
                   unit.out.valid & ~unit.out.ready).any()
        with m.If(self.start):
            m.d.sync += [self.unit_busy.eq(0), self.unit_wait.eq(0)]
        with m.Elif(busy):
            m.d.sync += [self.unit_busy.eq(self.unit_busy + 1), self.unit_wait.eq(self.unit_wait + wait)]

        m.d.comb += self.finished.eq(issue_done & ~self.start & (done_cmds == issued)
                                     & ~Cat(*[f.r_rdy for f in fifos.values()]).any())
        return m


class FabricAttendEngine(CheckedComponent):
    """See the module docstring."""

    @classmethod
    def check(cls, addr_width: int = DEFAULT_ADDR_BITS, head_dim: int = 64, group: int = 7, macs: int = 128,
              max_positions: int = 4096, max_tokens: int = 16, *, read_ids=(0, 0, 0), write_id: int = 0,
              exp_lanes: int = 1, units: UnitSource = LOCAL_UNITS) -> None:
        if head_dim not in HEAD_DIMS:
            raise ConfigError(f"FabricAttendEngine: head_dim must be one of {HEAD_DIMS}, got {head_dim!r}")
        AttentionUnit.check(head_dim, group, macs, max_positions, exp_lanes)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens < 1 << 16:
            raise ConfigError(f"FabricAttendEngine: max_tokens must be 1..65535, got {max_tokens!r}")
        if not 13 <= addr_width <= 64:
            raise ConfigError(f"FabricAttendEngine: addr_width must be 13..64, got {addr_width!r}")
        if len(read_ids) != READ_PORTS:
            raise ConfigError(f"FabricAttendEngine: read_ids needs {READ_PORTS} ARIDs, got {read_ids!r}")

    def __init__(self, addr_width: int = DEFAULT_ADDR_BITS, head_dim: int = 64, group: int = 7, macs: int = 128,
                 max_positions: int = 4096, max_tokens: int = 16, *, read_ids=(0, 0, 0), write_id: int = 0,
                 exp_lanes: int = 1, units: UnitSource = LOCAL_UNITS):
        self._units = units
        self.addr_width, self.head_dim, self.group, self.macs = addr_width, head_dim, group, macs
        self.exp_lanes = exp_lanes
        self.max_positions, self.max_tokens = max_positions, max_tokens
        self._read_ids, self._write_id = tuple(read_ids), write_id
        members = {
            "cmd": In(stream.Signature(fabric_op_layout(addr_width))),
            "done": Out(stream.Signature(fabric_done_layout())),
            "busy": Out(1),
            "abort": In(1),
            "perf_unit_busy": Out(32),
            "perf_unit_wait": Out(32),
        }
        for i in range(READ_PORTS):
            members[f"rd{i}"] = Out(axi4_read_signature(addr_width, BEAT_BITS, HP_ID_BITS))
        members["wr"] = Out(axi4_write_signature(addr_width, BEAT_BITS, HP_ID_BITS))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        AW, D, G, N = self.addr_width, self.head_dim, self.group, self.max_positions
        common = dict(addr_width=AW, data_width=BEAT_BITS, id_width=HP_ID_BITS)
        rds = [AxiReadMaster(**common, max_outstanding=READ_OUTSTANDING[i], arid=self._read_ids[i])
               for i in range(READ_PORTS)]
        for i, rd in enumerate(rds):
            m.submodules[f"rd{i}_master"] = rd
            connect(m, rd.bus, wiring.flipped(getattr(self, f"rd{i}")))
        m.submodules.wr_master = wr = AxiWriteMaster(**common, awid=self._write_id)
        connect(m, wr.bus, wiring.flipped(self.wr))

        flush = Signal()
        pipe = _AttendPipe(addr_width=AW, head_dim=D, group=G, macs=self.macs, max_positions=N,
                           max_tokens=self.max_tokens, exp_lanes=self.exp_lanes, units=self._units)
        m.submodules.pipe = ResetInserter(flush)(pipe)
        for name, rd in zip(("k", "v", "m"), rds):
            connect(m, getattr(pipe, f"{name}_cmd"), rd.cmd)
            connect(m, rd.data, getattr(pipe, f"{name}_data"))
        connect(m, pipe.w_cmd, wr.cmd)
        connect(m, pipe.w_data, wr.data)

        op = Signal(fabric_op_layout(AW))
        m.d.comb += [pipe.op.eq(op), self.perf_unit_busy.eq(pipe.unit_busy), self.perf_unit_wait.eq(pipe.unit_wait)]
        code = Signal.like(self.done.payload.code)
        silent = Signal()
        masters = rds + [wr]
        read_error = Cat(*[rd.error for rd in rds]).any()
        write_error = wr.error
        masters_busy = Cat(*[x.busy for x in masters]).any()
        clear = Signal()
        m.d.comb += [x.clear.eq(clear) for x in masters]

        bad_field = Signal()
        too_many = Signal()
        op_group = Signal(range(G + 1))
        m.d.comb += pipe.group.eq(op_group)
        # heads / p1 = k for one k in 1 .. G: n == k * p1 * D (n, p1 > 0 after validation)
        kv_row = Signal(32 + _log2(D))
        m.d.comb += kv_row.eq(op.p1 << _log2(D))
        group_match = [Signal(name=f"group_is_{k}") for k in range(1, G + 1)]
        m.d.comb += [match.eq(op.n == const_product(kv_row, k)) for k, match in zip(range(1, G + 1), group_match)]
        context_full = Signal()

        def on_abort(drain: bool = False):
            """`abort` in a state: answer nothing; states before the drain go to FLUSH."""
            with m.If(self.abort):
                m.d.sync += silent.eq(1)
                if not drain:
                    m.next = "FLUSH"

        with m.FSM(name="engine") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += op.eq(self.cmd.payload)
                    m.next = "CHECK"
            with m.State("CHECK"):          # registered checks (one cycle of comparisons)
                m.d.sync += [
                    bad_field.eq((op.aux != D) | ~Cat(*group_match).any() | (op.p0 > N)),
                    op_group.eq(0),
                    too_many.eq(op.tokens > self.max_tokens),
                    context_full.eq(op.run_pos + op.tokens > op.p0),
                ]
                for k, match in zip(range(1, G + 1), group_match):
                    with m.If(match):
                        m.d.sync += op_group.eq(k)
                m.next = "DECIDE"
                on_abort()
            with m.State("DECIDE"):
                with m.If(bad_field):
                    m.d.sync += code.eq(ErrorCode.BAD_FIELD)
                    m.next = "ANSWER"
                with m.Elif(too_many):
                    m.d.sync += code.eq(ErrorCode.TOO_MANY_TOKENS)
                    m.next = "ANSWER"
                with m.Elif(context_full):
                    m.d.sync += code.eq(ErrorCode.CONTEXT_FULL)
                    m.next = "ANSWER"
                with m.Else():
                    m.d.comb += pipe.start.eq(1)
                    m.next = "RUN"
                on_abort()
            with m.State("RUN"):
                with m.If(read_error | write_error):
                    m.d.sync += code.eq(Mux(read_error, ErrorCode.READ_ERROR, ErrorCode.WRITE_ERROR))
                    m.next = "FLUSH"
                with m.Elif(pipe.finished & ~masters_busy):
                    m.d.sync += code.eq(ErrorCode.NONE)
                    m.next = "ANSWER"
                on_abort()
            with m.State("FLUSH"):          # the pipe is in reset before the masters are cleared
                m.d.comb += flush.eq(1)
                m.next = "CLEAR"
                on_abort(drain=True)
            with m.State("CLEAR"):          # masters forget their commands and errors, then drain
                m.d.comb += [flush.eq(1), clear.eq(1)]
                m.next = "DRAIN"
                on_abort(drain=True)
            with m.State("DRAIN"):
                m.d.comb += flush.eq(1)
                with m.If(~masters_busy):
                    m.next = "DRAINED"
                on_abort(drain=True)
            with m.State("DRAINED"):
                m.d.comb += flush.eq(1)
                with m.If(silent | self.abort):
                    m.d.sync += silent.eq(0)
                    m.next = "IDLE"
                with m.Else():
                    m.next = "ANSWER"
            with m.State("ANSWER"):
                m.d.comb += [self.done.valid.eq(1), self.done.payload.code.eq(code)]
                with m.If(self.done.ready):
                    m.next = "IDLE"
                on_abort()
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m
