"""Streaming greedy argmax, bit-exact with ``sw.contract.fabric_ops.argmax_first``.

:class:`ArgmaxUnit` takes a stream of beats of `lanes` fp32 logits and returns, per
vector, the first index of the largest value. NaN compares as -inf, +0.0 equals
-0.0, and a vector of only -inf/NaN gives index 0.

Input payload (`in_layout`): ``data`` (`lanes` fp32 words, element ``b * lanes + l``
of the vector in lane l of its b-th beat), ``count`` (lanes 0..count-1 of the beat
hold elements; the others are ignored, so a short last beat carries a length that is
not a multiple of `lanes`), ``last`` (the vector's final beat). Beats before the last
are normally full; a short one just leaves index gaps. A vector must have at most
2^index_bits elements.

Output payload (`out_layout`): ``index`` and ``value``, the winning element's bits
(a NaN winner, which only happens when every element is -inf or NaN, reads
0xFF800000 = -inf). A vector without any element gives index 0, value -inf.

The compare is the exact fp32 order on the bits: every element becomes a signed
integer key (the magnitude, negated when the sign is set, so -0.0 and +0.0 are both
0; NaN becomes -inf's key). A beat's lanes are reduced by a balanced tree whose every
node keeps its left (lower) input unless the right one is strictly larger; the beat's
winner then replaces the running best only if strictly larger, so the first index wins
every tie. Pipeline: key registers, one register per tree level, the running best;
one beat per cycle. Every stage advances when the result register is free or being
taken (``out.ready``), so back-pressure stalls the input only while a result waits.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream
from amaranth.lib.wiring import In, Out

from sw.contract.errors import ConfigError

from .component import CheckedComponent

__all__ = ["ArgmaxUnit"]

_NEG_INF = 0xFF800000


class ArgmaxUnit(CheckedComponent):
    """Ports: ``inp`` (stream of `in_layout`) in, ``out`` (stream of `out_layout`) out."""

    LANES = (1, 2, 4, 8)

    @classmethod
    def check(cls, lanes: int, index_bits: int) -> None:
        if lanes not in cls.LANES or isinstance(lanes, bool):
            raise ConfigError(f"ArgmaxUnit: lanes must be one of {cls.LANES}, got {lanes!r}")
        lane_bits = lanes.bit_length() - 1
        if not isinstance(index_bits, int) or isinstance(index_bits, bool) or not max(lane_bits, 1) <= index_bits <= 32:
            raise ConfigError(f"ArgmaxUnit: index_bits must be an integer from {max(lane_bits, 1)} to 32, "
                              f"got {index_bits!r}")

    def __init__(self, lanes: int, index_bits: int):
        self._lanes, self._index_bits = lanes, index_bits
        self.in_layout = data.StructLayout({"data": data.ArrayLayout(32, lanes), "count": range(lanes + 1),
                                            "last": 1})
        self.out_layout = data.StructLayout({"index": index_bits, "value": 32})
        super().__init__({"inp": In(stream.Signature(self.in_layout)),
                          "out": Out(stream.Signature(self.out_layout))})

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def index_bits(self) -> int:
        return self._index_bits

    def elaborate(self, platform):
        m = Module()
        lanes = self._lanes
        lane_bits = lanes.bit_length() - 1
        beat_bits = self._index_bits - lane_bits
        en = ~self.out.valid | self.out.ready
        m.d.comb += self.inp.ready.eq(en)

        def cand(name):
            return (Signal(signed(32), name=f"{name}_key"), Signal(32, name=f"{name}_value"),
                    Signal(max(lane_bits, 1), name=f"{name}_lane"), Signal(name=f"{name}_ok"))

        # stage 0: keys
        valid = Signal(name="s0_valid")
        last = Signal(name="s0_last")
        with m.If(en):
            m.d.sync += [valid.eq(self.inp.valid), last.eq(self.inp.payload.last)]
        level = []
        for lane in range(lanes):
            word = self.inp.payload.data[lane]
            nan = word[0:31] > 0x7F800000
            bits = Mux(nan, _NEG_INF, word)
            mag = bits[0:31]
            c = cand(f"s0_l{lane}")
            with m.If(en):
                m.d.sync += [c[0].eq(Mux(bits[31], -mag, mag)), c[1].eq(bits), c[2].eq(lane),
                             c[3].eq(self.inp.payload.count > lane)]
            level.append(c)

        # tree: a node keeps the left (lower) lane unless the right one is strictly larger
        depth = 0
        while len(level) > 1:
            depth += 1
            nxt = []
            for k in range(0, len(level), 2):
                (lk, lv, ll, lo), (rk, rv, rl, ro) = level[k], level[k + 1]
                take_r = ro & (~lo | (rk > lk))
                c = cand(f"s{depth}_n{k // 2}")
                with m.If(en):
                    m.d.sync += [c[0].eq(Mux(take_r, rk, lk)), c[1].eq(Mux(take_r, rv, lv)),
                                 c[2].eq(Mux(take_r, rl, ll)), c[3].eq(lo | ro)]
                nxt.append(c)
            v2, l2 = Signal(name=f"s{depth}_valid"), Signal(name=f"s{depth}_last")
            with m.If(en):
                m.d.sync += [v2.eq(valid), l2.eq(last)]
            valid, last = v2, l2
            level = nxt
        wk, wv, wl, wo = level[0]

        # the running best of the vector so far (earlier beats: lower indices)
        beat = Signal(max(beat_bits, 1), name="beat")
        fresh = Signal(init=1, name="fresh")
        best_key = Signal(signed(32), name="best_key")
        best_value = Signal(32, name="best_value")
        best_index = Signal(self._index_bits, name="best_index")
        best_ok = Signal(name="best_ok")
        cur_ok = best_ok & ~fresh
        take = wo & (~cur_ok | (wk > best_key))
        w_index = Cat(wl[0:lane_bits], beat[0:beat_bits]) if lane_bits else beat[0:beat_bits]
        n_key = Mux(take, wk, best_key)
        n_value = Mux(take, wv, Mux(cur_ok, best_value, _NEG_INF))
        n_index = Mux(take, w_index, Mux(cur_ok, best_index, 0))
        with m.If(en):
            with m.If(valid):
                m.d.sync += [best_key.eq(n_key), best_value.eq(n_value), best_index.eq(n_index),
                             best_ok.eq(take | cur_ok), fresh.eq(last), beat.eq(Mux(last, 0, beat + 1))]
            m.d.sync += [self.out.valid.eq(valid & last), self.out.payload.index.eq(n_index),
                         self.out.payload.value.eq(n_value)]
        return m
