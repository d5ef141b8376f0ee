"""ArgmaxPass: the greedy token of a LINEAR with the ARGMAX flag, read back from DDR.

The LM head's outputs leave the engines tile by tile, on four ports and out of
order, so the argmax is not taken on the way out. Instead, when the datapath
answers a LINEAR whose ``argmax`` bit is set, this pass reads the first ``n``
outputs of its last token row back (one read of ceil(n/4) 128-bit beats at
``out_addr + (tokens - 1) * stride``, the row layout of
sw.contract.commands.OutputLayout), streams them through an
:class:`~rtl.argmax.ArgmaxUnit` (``fabric_ops.argmax_first``: first index of the
largest value, NaN as -inf), strobes ``result_we`` with the index and value (the
command processor's RESULT_INDEX / RESULT_VALUE), and only then passes the answer on.
At 16 bytes per cycle the Qwen2.5 LM head's 151,936 logits take about 38 k cycles
(0.15 ms at 250 MHz), next to about 4.6 M cycles for its weights.

It sits between the command processor and the datapath: ``op_in`` -> ``op_out`` passes the
commands through and remembers, per command in flight, whether it has the flag and where
its row is; ``done_in`` -> ``done_out`` passes the answers through in order, holding an
ARGMAX command's until its pass is done. The command processor presents nothing after an
ARGMAX command before its answer (rtl/cmdproc.py), so the row is read while no later
command can write it. A read error answers READ_ERROR (after the read master drained);
an error answer from the datapath passes through without a pass.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, ResetInserter, Signal
from amaranth.lib import data, stream
from amaranth.lib.wiring import In, Out

from sw.contract.commands import ALIGN, BEAT_BYTES, DEFAULT_ADDR_BITS, ErrorCode, register
from sw.contract.errors import ConfigError

from .argmax import ArgmaxUnit
from .axi import BEATS_WIDTH, read_data_layout, transfer_command_layout
from .cmdproc import op_done_layout, op_layout
from .component import CheckedComponent
from .pe import shift_add_product
from .storage import Fifo

__all__ = ["ArgmaxPass"]

LANES = BEAT_BYTES // 4
INDEX_BITS = register("RESULT_INDEX").field("index").width


class ArgmaxPass(CheckedComponent):
    """Ports: ``op_in`` (In) / ``op_out`` (Out): op_layout streams; ``done_in`` (In) / ``done_out``
    (Out): op_done_layout streams; ``rd_cmd`` (Out) / ``rd_data`` (In) / ``rd_error`` (In) /
    ``rd_clear`` (Out) / ``rd_busy`` (In): an AxiReadMaster's; ``result_we``, ``result_index``,
    ``result_value`` (Out); ``busy`` (Out). Parameters: ``tile_rows`` (a power of two: the output
    rows are padded to it), ``addr_width``, ``beats_width``, ``in_flight`` (commands between
    op_out and done_in, the command processor's ops_in_flight)."""

    @classmethod
    def check(cls, tile_rows: int, *, addr_width: int = DEFAULT_ADDR_BITS, beats_width: int = BEATS_WIDTH,
              in_flight: int = 2) -> None:
        if not isinstance(tile_rows, int) or tile_rows < 1 or tile_rows & (tile_rows - 1):
            raise ConfigError(f"ArgmaxPass: tile_rows must be a power of two, got {tile_rows!r}")
        if not isinstance(in_flight, int) or not 1 <= in_flight <= 15:
            raise ConfigError(f"ArgmaxPass: in_flight must be 1..15, got {in_flight!r}")

    def __init__(self, tile_rows: int, *, addr_width: int = DEFAULT_ADDR_BITS, beats_width: int = BEATS_WIDTH,
                 in_flight: int = 2):
        self._rows, self._aw, self._bw, self._in_flight = tile_rows, addr_width, beats_width, in_flight
        super().__init__({
            "op_in": In(stream.Signature(op_layout(addr_width))),
            "op_out": Out(stream.Signature(op_layout(addr_width))),
            "done_in": In(stream.Signature(op_done_layout())),
            "done_out": Out(stream.Signature(op_done_layout())),
            "rd_cmd": Out(stream.Signature(transfer_command_layout(addr_width, beats_width))),
            "rd_data": In(stream.Signature(read_data_layout(8 * BEAT_BYTES))),
            "rd_error": In(1),
            "rd_clear": Out(1),
            "rd_busy": In(1),
            "result_we": Out(1),
            "result_index": Out(INDEX_BITS),
            "result_value": Out(32),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        aw, R = self._aw, self._rows
        rec = data.StructLayout({"argmax": 1, "addr": aw, "n": 32})

        # ---- commands: pass through, remember the ARGMAX ones' rows ------------------------------
        q = m.submodules.q = Fifo(width=rec.size, depth=self._in_flight + 1)
        op = self.op_in.payload
        r_bits = (R - 1).bit_length()
        padded = Signal(33)
        m.d.comb += padded.eq(((op.n + R - 1) >> r_bits) << r_bits)
        stride = Signal(36)
        lo = (ALIGN - 1).bit_length()
        m.d.comb += stride.eq((((padded << 2) + ALIGN - 1) >> lo) << lo)
        w = Signal(rec)
        m.d.comb += [w.argmax.eq(op.argmax), w.n.eq(op.n),
                     w.addr.eq(op.out_addr + shift_add_product(op.tokens, stride) - stride)]
        m.d.comb += [
            self.op_out.payload.eq(op),
            self.op_out.valid.eq(self.op_in.valid & q.w_rdy),
            self.op_in.ready.eq(self.op_out.ready & q.w_rdy),
            q.w_data.eq(w),
            q.w_en.eq(self.op_in.valid & self.op_in.ready),
        ]

        # ---- answers ---------------------------------------------------------------------------
        head = Signal(rec)
        m.d.comb += head.eq(q.r_data)
        unit = ArgmaxUnit(LANES, INDEX_BITS)
        restart = Signal()              # a failed pass leaves the unit mid-vector: start it over
        m.submodules.argmax = ResetInserter(restart)(unit)
        beats = Signal(32)
        m.d.comb += beats.eq((head.n + LANES - 1) >> 2)
        taken = Signal(32)
        tail = Signal(range(LANES + 1))
        m.d.comb += tail.eq(Mux(head.n[:2] == 0, LANES, head.n[:2]))
        last_beat = taken == beats - 1

        PASS, CMD, DATA, RESULT, DRAIN = range(5)
        state = Signal(range(5))
        answer_code = Signal(len(self.done_out.payload.error_code))
        m.d.comb += [self.rd_cmd.payload.addr.eq(head.addr), self.rd_cmd.payload.beats.eq(beats),
                     unit.inp.payload.data.eq(self.rd_data.payload.data),
                     unit.inp.payload.count.eq(Mux(last_beat, tail, LANES)),
                     unit.inp.payload.last.eq(last_beat),
                     self.result_index.eq(unit.out.payload.index),
                     self.result_value.eq(unit.out.payload.value),
                     self.busy.eq(q.r_rdy | (state != PASS))]
        with m.Switch(state):
            with m.Case(PASS):
                argmax = q.r_rdy & head.argmax & ~self.done_in.payload.error
                m.d.comb += [self.done_out.payload.eq(self.done_in.payload),
                             self.done_out.valid.eq(self.done_in.valid & q.r_rdy & ~argmax),
                             self.done_in.ready.eq(self.done_out.ready & q.r_rdy & ~argmax),
                             q.r_en.eq(self.done_in.valid & self.done_in.ready)]
                with m.If(self.done_in.valid & argmax):
                    m.d.sync += [state.eq(CMD), taken.eq(0)]
            with m.Case(CMD):
                m.d.comb += self.rd_cmd.valid.eq(1)
                with m.If(self.rd_cmd.ready):
                    m.d.sync += state.eq(DATA)
            with m.Case(DATA):
                m.d.comb += [unit.inp.valid.eq(self.rd_data.valid), self.rd_data.ready.eq(unit.inp.ready)]
                with m.If(self.rd_data.valid & self.rd_data.ready):
                    m.d.sync += taken.eq(taken + 1)
                    with m.If(last_beat):
                        m.d.sync += state.eq(RESULT)
                with m.If(self.rd_error):
                    m.d.comb += self.rd_clear.eq(1)
                    m.d.sync += [state.eq(DRAIN), answer_code.eq(ErrorCode.READ_ERROR)]
            with m.Case(RESULT):
                # the unit's result and the datapath's answer leave together
                m.d.comb += [self.done_out.valid.eq(unit.out.valid), self.done_out.payload.error.eq(0),
                             unit.out.ready.eq(self.done_out.ready),
                             self.result_we.eq(unit.out.valid & self.done_out.ready)]
                with m.If(unit.out.valid & self.done_out.ready):
                    m.d.comb += [self.done_in.ready.eq(1), q.r_en.eq(1)]
                    m.d.sync += state.eq(PASS)
            with m.Case(DRAIN):
                # the read master drops the rest of the failed transfer by itself
                m.d.comb += [self.rd_data.ready.eq(1), restart.eq(1)]
                with m.If(~self.rd_busy):
                    m.d.comb += [self.done_out.valid.eq(1), self.done_out.payload.error.eq(1),
                                 self.done_out.payload.error_code.eq(answer_code)]
                    with m.If(self.done_out.ready):
                        m.d.comb += [self.done_in.ready.eq(1), q.r_en.eq(1)]
                        m.d.sync += state.eq(PASS)
        return m
