"""DequantUnit: exact group sums in, fp32 layer outputs out (numerics contract, step 4).

For every token t, row r of a row tile and group g (sw.contract.numerics.dequant_accumulate):

    corr = acc[t, r] - zero[r] * qsum[t]          exact integer
    s    = fp32(scale_w[r]) * scale_a[t]          fp32 multiply
    y    = y + fp32(corr) * s                     fp32 multiply, then fp32 add
    with y = bias[r] (fp32, +0.0 for layers without bias) before the first group.

The T*R (token, row) items of a group are spread over `lanes` identical fp32
pipelines; item i = t*R + r goes to lane i % lanes as its (i // lanes)-th item.
The lanes keep their running sums y in one memory (a word per item index, one
sum per lane in it), so a group's item meets its own previous sum: the y = y + t
chain stays strictly sequential over groups and the adder latency is hidden by
the other items of the lane, never by re-association. docs/dequant.md has the schedule, latency and throughput.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from sw.contract.errors import ConfigError

from .component import CheckedComponent
from .fp32 import Fp16ToFp32, Fp32Add, Fp32Multiply, IntToFp32, chain_reset_less
from .fp32 import delay as _delay
from .pe import shift_add_product
from .share import LOCAL_UNITS, UnitSource
from .storage import ram_attrs

__all__ = ["DequantParams", "DequantUnit"]

# |corr| = |acc - z * qsum| must stay within 2^24 so that int -> fp32 is exact (docs/numerics.md).
CORR_LIMIT = 1 << 24
_CORR_LATENCY = 1   # the acc - z * qsum register


def _pick(values, index) -> Value:
    """values[index] (all of one width) as a word select, without a case statement."""
    values = [Value.cast(v) for v in values]
    return values[0] if len(values) == 1 else Cat(*values).word_select(index, len(values[0]))


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"DequantUnit: {name} must be a positive integer, got {value!r}")
    return value


class DequantParams:
    """The parameters of a `DequantUnit`, checked, and every fact derived from them (no hardware).

    Whoever needs the unit's layouts, latency or throughput without the unit
    itself (rtl/core.py's LinearCore, the engine) asks this object.

    Parameters
    ----------
    rows : R, output channels per tile.
    tokens : T, token lanes processed together.
    acc_width : width of the signed exact group sums ``acc``.
    qsum_width : signed width of the per-group activation-code sums.
    lanes : fp32 pipelines in parallel; must divide T*R. Default: the fewest
        lanes that finish a group's T*R items within ``group_cycles`` (1 when
        ``group_cycles`` is not given).
    group_cycles : cycles the MAC array needs per group (G / columns per
        cycle); only used to choose the default ``lanes``.
    zero_bits : width of the unsigned weight zero points.
    mul_latency, add_latency : latencies of the fp32 multipliers and adders.
    beat_bits : see the ``out`` stream of `DequantUnit`.
    corr_bits : an upper bound on the bit length of |corr| for every group the unit is given,
        where corr = acc - zero * qsum = sum (w_k - z) q_k (numerics: qsum is the sum of the
        group's codes, as the activation buffer holds it). Then fp32(corr) has at most corr_bits
        significant bits and t = fp32(corr) * s is a corr_bits x 24 product (one DSP48E2 at 17
        or fewer). Default 24: any corr the widths allow (|corr| < 2^24). ``for_config`` derives
        it from the group size and the code ranges (17 at g64: 64 * 128 * 15 < 2^17).
    """

    def __init__(self, rows: int, tokens: int, acc_width: int, qsum_width: int, *,
                 lanes: int | None = None, group_cycles: int | None = None, zero_bits: int = 4,
                 mul_latency: int | None = None, add_latency: int | None = None,
                 beat_bits: int | None = None, corr_bits: int | None = None):
        self._configure(rows, tokens, acc_width, qsum_width, lanes, group_cycles, zero_bits,
                        mul_latency, add_latency)
        self._configure_beats(beat_bits)
        if corr_bits is not None and (not isinstance(corr_bits, int) or isinstance(corr_bits, bool)
                                      or not 1 <= corr_bits <= 24):
            raise ConfigError(f"DequantUnit: corr_bits must be an integer from 1 to 24, got {corr_bits!r}")
        self._corr_bits = 24 if corr_bits is None else corr_bits

    @classmethod
    def for_config(cls, config, *, beat_bits: int | None = None, **unit_args):
        """The dequant unit of one LinearCore of `config` (an ArrayConfig); `unit_args` go to
        `DequantUnit` (``units``: where its lanes' adders come from, rtl/share.py)."""
        (wl, wh), (al, ah) = config.weight_range, config.act_range
        zmax = (1 << 4) - 1
        worst = config.group_size * max(-al, ah) * max(wh, zmax - wl)     # |sum (w - z) q|
        return cls(config.rows, config.tokens, config.acc_width, config.qsum_width,
                   lanes=config.dequant_lanes, beat_bits=beat_bits, corr_bits=min(24, worst.bit_length()), **unit_args)

    def _configure(self, rows, tokens, acc_width, qsum_width, lanes, group_cycles, zero_bits,
                   mul_latency, add_latency):
        self._rows = _positive_int("rows", rows)
        self._tokens = _positive_int("tokens", tokens)
        self._acc_width = _positive_int("acc_width", acc_width)
        self._qsum_width = _positive_int("qsum_width", qsum_width)
        self._zero_bits = _positive_int("zero_bits", zero_bits)
        if acc_width < 2 or qsum_width < 2:
            raise ConfigError(f"DequantUnit: acc_width and qsum_width must be at least 2 (signed), "
                              f"got {acc_width} and {qsum_width}")
        worst = (1 << (acc_width - 1)) + ((1 << zero_bits) - 1) * (1 << (qsum_width - 1))
        if worst > CORR_LIMIT:
            raise ConfigError(
                f"DequantUnit: acc_width={acc_width}, qsum_width={qsum_width} and zero_bits={zero_bits} "
                f"allow |acc - zero*qsum| up to {worst}, beyond the 2^24 that the numerics contract "
                f"needs for an exact int -> fp32 conversion")
        items = self._rows * self._tokens
        if group_cycles is not None:
            _positive_int("group_cycles", group_cycles)
        if lanes is None:
            lanes = self.lanes_for(rows, tokens, group_cycles) if group_cycles is not None else 1
        self._lanes = _positive_int("lanes", lanes)
        if items % self._lanes:
            raise ConfigError(f"DequantUnit: lanes={lanes} does not divide the {items} "
                              f"(tokens x rows) results of a group")
        self._lat_mul = Fp32Multiply.resolve_latency(mul_latency)
        self._lat_add = Fp32Add.resolve_latency(add_latency)
        self._lat_half = Fp16ToFp32.resolve_latency(None)
        self._lat_int = IntToFp32.resolve_latency(None)

    def _configure_beats(self, beat_bits):
        self._beat_bits = beat_bits
        if beat_bits is None:
            return
        _positive_int("beat_bits", beat_bits)
        items = self._rows * self._tokens
        k, L = beat_bits // 32, self._lanes
        if beat_bits % 32 or items % k:
            raise ConfigError(f"DequantUnit: beat_bits={beat_bits} must be a multiple of 32 whose items "
                              f"divide the {items} results of a row tile")
        if k % L and L % k:
            raise ConfigError(f"DequantUnit: beat_bits={beat_bits} ({k} items) and lanes={L}: one must "
                              f"divide the other")

    # -- parameters and derived facts -------------------------------------------------

    @staticmethod
    def lanes_for(rows: int, tokens: int, group_cycles: int) -> int:
        """Fewest lanes (a divisor of tokens*rows) that process one group in <= group_cycles cycles."""
        items = rows * tokens
        return next(d for d in range(1, items + 1) if items % d == 0 and items // d <= group_cycles)

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def acc_width(self) -> int:
        return self._acc_width

    @property
    def qsum_width(self) -> int:
        return self._qsum_width

    @property
    def corr_bits(self) -> int:
        return self._corr_bits

    @property
    def zero_bits(self) -> int:
        return self._zero_bits

    @property
    def mul_latency(self) -> int:
        return self._lat_mul

    @property
    def add_latency(self) -> int:
        return self._lat_add

    @property
    def corr_width(self) -> int:
        """Signed width of acc - zero*qsum inside the unit."""
        return max(self._acc_width, self._qsum_width + self._zero_bits + 1) + 1

    @property
    def items_per_lane(self) -> int:
        """Results of one group that each lane computes, one per cycle."""
        return self._rows * self._tokens // self._lanes

    @property
    def loop_latency(self) -> int:
        """Minimum cycles between an item's sum entering the adder and the next group's
        use of it: the adder latency plus the write into the lane's y memory."""
        return self._lat_add + 1

    @property
    def cycles_per_group(self) -> int:
        """Stall-free throughput: one group every this many cycles."""
        return max(self.items_per_lane, self.loop_latency)

    @property
    def _adder_entry(self) -> int:
        # Offsets from the cycle an item is issued: registered selection (1), then
        # fp16->fp32 and s = w*a in parallel with corr and int->fp32, then t = cf*s.
        scale_ready = 1 + self._lat_half + self._lat_mul
        corr_ready = 1 + _CORR_LATENCY + self._lat_int
        return max(scale_ready, corr_ready) + self._lat_mul

    @property
    def pipeline_latency(self) -> int:
        """Cycles from issuing an item to its new sum leaving the adder."""
        return self._adder_entry + self._lat_add

    @property
    def latency(self) -> int:
        """Fill latency: cycles from the cycle in which a tile's last group starts (its
        partials/meta/act beats valid, the unit idle) to the cycle in which out.valid
        is first asserted."""
        return self.items_per_lane + self.pipeline_latency

    @property
    def partials_layout(self) -> data.StructLayout:
        return data.StructLayout({
            "acc": data.ArrayLayout(signed(self._acc_width), self._tokens * self._rows),
            "first": 1,
            "last": 1,
        })

    @property
    def meta_layout(self) -> data.StructLayout:
        return data.StructLayout({
            "scale": data.ArrayLayout(16, self._rows),
            "zero": data.ArrayLayout(unsigned(self._zero_bits), self._rows),
        })

    @property
    def act_layout(self) -> data.StructLayout:
        return data.StructLayout({
            "scale": data.ArrayLayout(32, self._tokens),
            "qsum": data.ArrayLayout(signed(self._qsum_width), self._tokens),
        })

    @property
    def bias_layout(self) -> data.ArrayLayout:
        return data.ArrayLayout(32, self._rows)

    @property
    def beat_bits(self) -> int | None:
        return self._beat_bits

    @property
    def out_beats(self) -> int:
        """Out beats per row tile: 1, or T*R*32 / beat_bits with ``beat_bits``."""
        return 1 if self._beat_bits is None else self._rows * self._tokens * 32 // self._beat_bits

    @property
    def out_layout(self) -> data.StructLayout:
        if self._beat_bits is not None:
            return data.StructLayout({"data": self._beat_bits})
        return data.StructLayout({"y": data.ArrayLayout(32, self._tokens * self._rows)})



class DequantUnit(DequantParams, CheckedComponent):
    """Dequantizes and accumulates the exact group sums of one row tile.

    Parameters: those of `DequantParams`, whose facts (layouts, latency, throughput) it has.

    Streams (all with full valid/ready handshakes)
    -------
    partials : In, one beat per group: ``acc`` [T*R] (index t*R + r), ``first``, ``last``
        (first/last group of the row tile).
    meta : In, one beat per group: ``scale`` [R] fp16 bits, ``zero`` [R] unsigned.
    act : In, one beat per group: ``scale`` [T] fp32 bits of s_a, ``qsum`` [T] signed.
    bias : In, one beat per row tile (fp32 bits [R]), taken with the tile's first group.
    out : Out, one beat per row tile after its last group: ``y`` [T*R] fp32 bits (index t*R + r).
        With ``beat_bits``: ``out_beats`` beats per row tile instead, ``data`` = beat_bits / 32
        consecutive items of y (beat b holds items b*beat_bits/32 ...), from a small memory rather
        than a T*R x 32-bit register, for a consumer that writes y out in bus beats anyway.

    A group starts when partials, meta, act (and bias, on a first group) are all
    valid; the four beats are taken together, in its last cycle. The payloads must
    stay stable while valid (the stream rule), because the unit reads them over
    ``cycles_per_group`` cycles instead of copying them.
    """

    @classmethod
    def check(cls, *args, units: UnitSource = LOCAL_UNITS, **kwargs) -> None:
        DequantParams(*args, **kwargs)

    def __init__(self, *args, units: UnitSource = LOCAL_UNITS, **kwargs):
        DequantParams.__init__(self, *args, **kwargs)
        self._units = units
        CheckedComponent.__init__(self, {
            "partials": In(stream.Signature(self.partials_layout)),
            "meta": In(stream.Signature(self.meta_layout)),
            "act": In(stream.Signature(self.act_layout)),
            "bias": In(stream.Signature(self.bias_layout)),
            "out": Out(stream.Signature(self.out_layout)),
        })

    def _make_mul(self, **kwargs):
        return Fp32Multiply(latency=self._lat_mul, **kwargs)

    def _make_add(self):
        return self._units.make("add", self._lat_add)

    # -- hardware ----------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        R, T, L = self._rows, self._tokens, self._lanes
        N = self.items_per_lane
        cpg = self.cycles_per_group
        part, meta, act, bias, out = self.partials, self.meta, self.act, self.bias, self.out

        # -- group sequencer: step j = 0 .. cpg-1 over the held input beats --------------
        step = Signal(range(max(cpg, 2)))
        out_busy = Signal()     # a tile's last group has started and its out beat is not taken yet
        first, last = part.payload.first, part.payload.last
        inputs_valid = part.valid & meta.valid & act.valid & (~first | bias.valid)
        # A last group may only start once the previous tile's result has left, so
        # that its sums never overwrite an out beat that is still waiting.
        go = inputs_valid & ((step != 0) | ~(last & out_busy))
        done = go & (step == cpg - 1)
        issue = go & (step < N)
        m.d.comb += [
            part.ready.eq(done),
            meta.ready.eq(done),
            act.ready.eq(done),
            bias.ready.eq(done & first),
        ]
        with m.If(go):
            m.d.sync += step.eq(Mux(step == cpg - 1, 0, step + 1))
            with m.If((step == 0) & last):
                m.d.sync += out_busy.eq(1)
        # When L divides R, lane l's k-th item is row (k mod R/L)*L + l of token k div R/L: the
        # lanes select rows and tokens by two shared counters (row_k, tok_k) from R/L and T
        # candidates, and only acc from N.
        by_counters = R % L == 0
        if by_counters:
            RL = R // L
            row_k = Signal(range(max(RL, 2)))
            tok_k = Signal(range(max(T, 2)))
            if N > 1:
                with m.If(go):
                    with m.If(step >= N - 1):     # N - 1 <= cpg - 1: the group's last item or a wait step
                        m.d.sync += [row_k.eq(0), tok_k.eq(0)]
                    with m.Elif(row_k == RL - 1):
                        m.d.sync += [row_k.eq(0), tok_k.eq(tok_k + 1)]
                    with m.Else():
                        m.d.sync += row_k.eq(row_k + 1)
        out_last = Signal()      # the beat on `out` is the tile's last (always, without beat_bits)
        m.d.comb += out_last.eq(1)
        with m.If(out.valid & out.ready & out_last):
            m.d.sync += [out.valid.eq(0), out_busy.eq(0)]

        # -- per-item control, shared by all lanes ------------------------------------
        s1_valid = Signal()
        s1_first = Signal(reset_less=True)
        s1_last = Signal(reset_less=True)
        s1_index = Signal(range(max(N, 2)), reset_less=True)
        m.d.sync += [s1_valid.eq(issue), s1_first.eq(first), s1_last.eq(last), s1_index.eq(step)]
        entry = self._adder_entry
        e_first = _delay(m, s1_first, entry - 1, "first")
        d_index = _delay(m, s1_index, entry - 2, "index")
        e_index = _delay(m, d_index, 1, "index_e")
        e_last = _delay(m, s1_last, entry - 1, "last")
        f_index = _delay(m, e_index, self._lat_add, "windex")
        f_last = _delay(m, e_last, self._lat_add, "wlast")

        # The running sums y: one memory word per item index, lane l in bits 32 l .. 32 l + 31, read
        # synchronously one cycle before the adders take it (the memory may be UltraRAM,
        # rtl/storage.py). A group's write of an item lands loop_latency - 1 cycles after its adder
        # input; the next group's read of it is sampled cycles_per_group - 1 cycles after that
        # input: transparency only when the two meet at one clock edge.
        ymem = m.submodules.y = Memory(shape=32 * L, depth=N, init=[], attrs=ram_attrs(32 * L, N))
        y_write = ymem.write_port()
        y_read = ymem.read_port(transparent_for=(y_write,) if self.cycles_per_group < self.loop_latency + 1 else ())
        if N > 1:
            m.d.comb += [y_read.addr.eq(d_index), y_write.addr.eq(f_index)]

        final_write = Signal()
        finals = []              # per lane: (valid, index, value) of a last-group sum
        for lane in range(L):
            # Registered selection of this lane's item from the held input beats.
            acc = Signal(signed(self._acc_width), name=f"l{lane}_acc", reset_less=True)
            zero = Signal(self._zero_bits, name=f"l{lane}_zero", reset_less=True)
            qsum = Signal(signed(self._qsum_width), name=f"l{lane}_qsum", reset_less=True)
            wscale = Signal(16, name=f"l{lane}_wscale", reset_less=True)
            ascale = Signal(32, name=f"l{lane}_ascale", reset_less=True)
            bias_v = Signal(32, name=f"l{lane}_bias", reset_less=True)
            if by_counters:
                rows_l = [k * L + lane for k in range(RL)]
                b_sel = _pick([bias.payload[r] for r in rows_l], row_k)
                m.d.sync += [
                    acc.eq(_pick([part.payload.acc[k * L + lane] for k in range(N)],
                                 step[:max(1, (N - 1).bit_length())]).as_signed()),
                    zero.eq(_pick([meta.payload.zero[r] for r in rows_l], row_k)),
                    qsum.eq(_pick([act.payload.qsum[t] for t in range(T)], tok_k).as_signed()),
                    wscale.eq(_pick([meta.payload.scale[r] for r in rows_l], row_k)),
                    ascale.eq(_pick([act.payload.scale[t] for t in range(T)], tok_k)),
                    # numerics starts from +0.0 + bias, which turns a -0.0 bias into +0.0
                    bias_v.eq(Mux(b_sel == 0x80000000, 0, b_sel)),
                ]
            else:
                # The last item is the default case: steps >= N (adder-loop wait) issue nothing,
                # and a complete case keeps the Verilog free of CASEINCOMPLETE.
                with m.Switch(step):
                    for k in range(N):
                        i = k * L + lane
                        r, t = i % R, i // R
                        with (m.Case(k) if k < N - 1 else m.Default()):
                            m.d.sync += [
                                acc.eq(part.payload.acc[i]),
                                zero.eq(meta.payload.zero[r]),
                                qsum.eq(act.payload.qsum[t]),
                                wscale.eq(meta.payload.scale[r]),
                                ascale.eq(act.payload.scale[t]),
                                bias_v.eq(Mux(bias.payload[r] == 0x80000000, 0, bias.payload[r])),
                            ]

            # s = fp32(w_scale) * a_scale
            half = m.submodules[f"l{lane}_half"] = Fp16ToFp32()
            # a is an fp16 value (never subnormal in fp32, 11 significant bits): the small multiplier
            mul_s = m.submodules[f"l{lane}_mul_s"] = self._make_mul(normal_a=True, a_bits=11)
            m.d.comb += [half.i_valid.eq(s1_valid), half.a.eq(wscale)]
            m.d.comb += [mul_s.i_valid.eq(half.o_valid), mul_s.a.eq(half.o),
                         mul_s.b.eq(_delay(m, ascale, half.latency, f"l{lane}_ascale"))]

            # cf = fp32(acc - zero * qsum), exact
            corr = Signal(signed(self.corr_width), name=f"l{lane}_corr", reset_less=True)
            m.d.sync += corr.eq(acc - shift_add_product(zero, qsum))
            to_float = m.submodules[f"l{lane}_int"] = IntToFp32(self.corr_width)
            m.d.comb += [to_float.i_valid.eq(_delay(m, s1_valid, _CORR_LATENCY, f"l{lane}_cv", reset=True)),
                         to_float.a.eq(corr)]

            # t = cf * s, both operands aligned to the later of the two
            scale_ready = 1 + half.latency + mul_s.latency
            corr_ready = 1 + _CORR_LATENCY + to_float.latency
            align = max(scale_ready, corr_ready)
            # a = cf is an exact integer (zero or normal) of at most corr_bits significant bits
            mul_t = m.submodules[f"l{lane}_mul_t"] = self._make_mul(normal_a=True, a_bits=self._corr_bits)
            m.d.comb += [
                mul_t.i_valid.eq(_delay(m, mul_s.o_valid, align - scale_ready, f"l{lane}_sv", reset=True)),
                mul_t.a.eq(_delay(m, to_float.o, align - corr_ready, f"l{lane}_cf")),
                mul_t.b.eq(_delay(m, mul_s.o, align - scale_ready, f"l{lane}_s")),
            ]
            assert align + mul_t.latency == entry

            # y = y + t: the previous sum from the y memory (this lane's word), or the bias on a first group
            adder = m.submodules[f"l{lane}_add"] = self._make_add()
            e_bias = _delay(m, bias_v, entry - 1, f"l{lane}_bias")
            m.d.comb += [
                adder.i_valid.eq(mul_t.o_valid),
                adder.a.eq(Mux(e_first, e_bias, y_read.data[32 * lane:32 * lane + 32])),
                adder.b.eq(mul_t.o),
            ]
            if lane == 0:
                m.d.comb += y_write.en.eq(adder.o_valid)       # the lanes run in lockstep
            finals.append(adder.o)
            if self._beat_bits is None:
                # The last group's sums go straight into the out beat.
                with m.If(adder.o_valid & f_last):
                    with m.Switch(f_index):
                        for k in range(N):
                            with (m.Case(k) if k < N - 1 else m.Default()):
                                m.d.sync += out.payload.y[k * L + lane].eq(adder.o)
            if lane == 0:
                m.d.comb += final_write.eq(adder.o_valid & f_last & (f_index == N - 1))
                f_write = adder.o_valid & f_last

        m.d.comb += y_write.data.eq(Cat(*finals))
        if self._beat_bits is not None:
            self._out_beats(m, out, out_last, f_write, f_index, finals)
        with m.If(final_write):
            m.d.sync += out.valid.eq(1)
        return m

    def _out_beats(self, m, out, out_last, f_write, f_index, finals):
        """beat_bits: the lanes write the last group's sums, L per cycle (items k*L .. k*L+L-1 at
        index k), into one memory; `out` then reads it beat by beat, in item order."""
        L, N = self._lanes, self.items_per_lane
        k = self._beat_bits // 32                      # items per beat
        mem = m.submodules.y_out = Memory(shape=32 * L, depth=N, init=[], attrs=ram_attrs(32 * L, N))
        wr = mem.write_port()
        if N > 1:
            m.d.comb += wr.addr.eq(f_index)
        m.d.comb += [wr.en.eq(f_write), wr.data.eq(Cat(*finals))]
        beat = Signal(range(max(self.out_beats, 2)))
        m.d.comb += out_last.eq(beat == self.out_beats - 1)
        with m.If(out.valid & out.ready):
            m.d.sync += beat.eq(Mux(out_last, 0, beat + 1))
        # Synchronous reads (the memory may be UltraRAM, rtl/storage.py): the address is the beat of
        # the next cycle; a beat-0 word written in the cycle before out.valid needs transparency.
        beat_next = Mux(out.valid & out.ready, Mux(out_last, 0, beat + 1), beat)
        if k >= L:
            # q = k / L memory words per beat, through q read ports
            q = k // L
            words = []
            for j in range(q):
                rd = mem.read_port(transparent_for=(wr,) if q >= N else ())
                if N > 1:
                    m.d.comb += rd.addr.eq(beat_next * q + j)
                words.append(rd.data)
            m.d.comb += out.payload.data.eq(Cat(*words))
        else:
            # p = L / k beats per memory word
            p = L // k
            rd = mem.read_port(transparent_for=(wr,) if N == 1 else ())
            if N > 1:
                m.d.comb += rd.addr.eq(beat_next // p)
            m.d.comb += out.payload.data.eq(rd.data.word_select(beat % p, self._beat_bits))
