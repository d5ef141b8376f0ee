"""MacArray: the INT4 x INT8 multiply-accumulate array of one engine.

Per accepted beat the array multiplies R x C weight codes with T x C int8
activations (every weight serves all T token lanes in the same cycle), sums
over the C columns in an adder tree and accumulates over the G/C beats of a
group. After the beat flagged `last` it emits the T x R exact group partial
sums and starts the next group. See docs/rtl.md for why this shape.

Flow control: one global clock enable `en` advances every register stage.
The only thing that can stop the array is a finished group that cannot move
into the output register (out full and not ready); until then beats keep
flowing, so the consumer has G/C - 1 cycles of slack for free.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.data import ArrayLayout, StructLayout
from amaranth.lib.wiring import In, Out

from sw.contract.config import ArrayConfig
from .dsp import mac_slice
from .pe import pack_bias, packed_operand, packed_product, product, split_biased

__all__ = ["MacArray", "beat_layout", "partials_layout"]


def weight_shape(config: ArrayConfig):
    return signed(config.weight_bits) if config.weight_signed else unsigned(config.weight_bits)


def beat_layout(config: ArrayConfig, tag_width: int = 0) -> StructLayout:
    """Payload of the array input: w[c*R + r], a[t*C + c], last (+ optional tag)."""
    R, C, T = config.rows, config.cols, config.tokens
    fields = {
        "w": ArrayLayout(weight_shape(config), R * C),
        "a": ArrayLayout(signed(config.act_bits), T * C),
        "last": 1,
    }
    if tag_width:
        fields["tag"] = tag_width
    return StructLayout(fields)


def partials_layout(config: ArrayConfig, tag_width: int = 0) -> StructLayout:
    """Payload of the array output: acc[t*R + r] (+ the tag of the group's last beat)."""
    fields = {"acc": ArrayLayout(signed(config.acc_width), config.tokens * config.rows)}
    if tag_width:
        fields["tag"] = tag_width
    return StructLayout(fields)


class MacArray(wiring.Component):
    """R x C x T INT4 x INT8 MAC array with exact per-group partial sums.

    Parameters
    ----------
    config : ArrayConfig
    tag_width : int
        Optional side band carried from the last beat of a group to that
        group's output (the core uses it for first/last-group flags).
    """

    def __init__(self, config: ArrayConfig, *, tag_width: int = 0):
        self._config = config.validate()
        self._tag_width = tag_width
        super().__init__({
            "inp": In(stream.Signature(beat_layout(config, tag_width))),
            "out": Out(stream.Signature(partials_layout(config, tag_width))),
        })

    @property
    def config(self) -> ArrayConfig:
        return self._config

    @property
    def latency(self) -> int:
        """Edges from accepting a group's last beat to its `out.valid`."""
        return self._config.array_latency

    @property
    def acc_width(self) -> int:
        return self._config.acc_width

    def elaborate(self, platform):
        cfg = self._config
        R, C, T = cfg.rows, cfg.cols, cfg.tokens
        S = cfg.pack_shift
        packed = cfg.dsp_packing
        stages = cfg.pipeline_stages
        tag_width = self._tag_width

        m = Module()
        en = Signal()          # global clock enable of every stage
        m.d.comb += self.inp.ready.eq(en)

        # Control travelling with the data: valid, last, tag.
        ctrl_v, ctrl_last = self.inp.valid, self.inp.payload.last
        ctrl_tag = self.inp.payload.tag if tag_width else None

        def advance(values, name):
            """Register `values` (and the control) under `en`: one pipeline stage."""
            nonlocal ctrl_v, ctrl_last, ctrl_tag
            regs = []
            for i, v in enumerate(values):
                r = Signal(v.shape(), name=f"{name}_{i}", reset_less=True)
                with m.If(en):
                    m.d.sync += r.eq(v)
                regs.append(r)
            v_r = Signal(name=f"{name}_valid")
            last_r = Signal(name=f"{name}_last", reset_less=True)
            with m.If(en):
                m.d.sync += [v_r.eq(ctrl_v), last_r.eq(ctrl_last)]
            if tag_width:
                tag_r = Signal(tag_width, name=f"{name}_tag", reset_less=True)
                with m.If(en):
                    m.d.sync += tag_r.eq(ctrl_tag)
                ctrl_tag = tag_r
            ctrl_v, ctrl_last = v_r, last_r
            return regs

        w = [self.inp.payload.w[i] for i in range(R * C)]
        a = [self.inp.payload.a[i] for i in range(T * C)]
        lanes_per_token = R // 2 if packed else R
        n_lanes = T * lanes_per_token
        acc_w = cfg.packed_acc_width if packed else cfg.acc_width
        fresh = Signal(init=1)    # accumulators hold no partial group: the next beat restarts them
        done = Signal()           # accumulators hold a complete group not yet moved to `out`
        done_tag = Signal(tag_width, reset_less=True) if tag_width else None
        # A group starts from 0, or packed from the bias that pre-pays the borrow
        # correction (rtl/pe.py): the DSP48E2 accumulator form, P = (P or W) + M.
        start = pack_bias(S) if packed else 0

        if C == 1 and {"broadcast", "product"} <= set(stages):
            # One column, operand and product registers: each lane is exactly a DSP48E2's
            # multiply-accumulate slice (A2/B2, M, P), rtl/dsp.py; the control rides alongside.
            advance([], "bcast")
            advance([], "prod")
            accs = []
            for t in range(T):
                for j in range(lanes_per_token):
                    if packed:
                        op = Cat(packed_operand(w[2 * j], w[2 * j + 1], S), Const(0, 1)).as_signed()
                    else:
                        op = w[j] if w[j].shape().signed else Cat(w[j], Const(0, 1)).as_signed()
                    accs.append(mac_slice(m, f"mac_{t}_{j}", a=op, b=a[t], ce_ab=en, ce_m=en,
                                          ce_p=en & ctrl_v, load=fresh, rnd=start, width=acc_w))
        else:
            # ---- operand broadcast register -------------------------------------------
            if "broadcast" in stages:
                regs = advance(w + a, "bcast")
                w, a = regs[:R * C], regs[R * C:]

            # ---- products, ordered [t][j][c] --------------------------------------------
            # j indexes rows (plain) or row pairs sharing one multiplier (packed).
            prods = []
            for t in range(T):
                for j in range(lanes_per_token):
                    for c in range(C):
                        act = a[t * C + c]
                        if packed:
                            prods.append(packed_product(w[c * R + 2 * j], w[c * R + 2 * j + 1], act, S))
                        else:
                            prods.append(product(w[c * R + j], act))
            if "product" in stages:
                prods = advance(prods, "prod")

            # ---- adder tree over C ---------------------------------------------------------
            level_vals = [prods[i * C:(i + 1) * C] for i in range(n_lanes)]
            level = 0
            while any(len(v) > 1 for v in level_vals):
                level += 1
                level_vals = [[v[k] + v[k + 1] if k + 1 < len(v) else v[k] for k in range(0, len(v), 2)]
                              for v in level_vals]
                if level in cfg.tree_cuts:
                    flat = advance([x for v in level_vals for x in v], f"tree{level}")
                    width = len(level_vals[0])
                    level_vals = [flat[i * width:(i + 1) * width] for i in range(n_lanes)]
            sums = [v[0] for v in level_vals]

            # ---- group accumulator: starts from `start` on a group's first beat ---------
            accs = [Signal(signed(acc_w), name=f"acc_{i}", reset_less=True) for i in range(n_lanes)]
            with m.If(en & ctrl_v):
                for acc, s_ in zip(accs, sums):
                    m.d.sync += acc.eq(Mux(fresh, start, acc) + s_)

        # ---- group control (both forms) -------------------------------------------------
        with m.If(en):
            m.d.sync += done.eq(ctrl_v & ctrl_last)
            with m.If(ctrl_v):
                m.d.sync += fresh.eq(ctrl_last)
                if tag_width:
                    m.d.sync += done_tag.eq(ctrl_tag)
        self._output(m, accs, en, done, done_tag, lanes_per_token)
        return m

    def _output(self, m, accs, en, done, done_tag, lanes_per_token) -> None:
        """The output register: a finished group's sums (split if packed) and its tag."""
        cfg, tag_width = self._config, self._tag_width
        R, T, S, packed = cfg.rows, cfg.tokens, cfg.pack_shift, cfg.dsp_packing
        # A reset-less copy drives the port: data registers need no reset.
        out_reg = Signal(partials_layout(cfg, tag_width), reset_less=True)
        m.d.comb += self.out.payload.eq(out_reg)
        can_move = ~self.out.valid | self.out.ready
        m.d.comb += en.eq(~(done & ~can_move))
        with m.If(done & can_move):
            m.d.sync += self.out.valid.eq(1)
            for t in range(T):
                for j in range(lanes_per_token):
                    acc = accs[t * lanes_per_token + j]
                    if packed:
                        lo, hi = split_biased(acc, S)
                        m.d.sync += [out_reg.acc[t * R + 2 * j].eq(lo),
                                     out_reg.acc[t * R + 2 * j + 1].eq(hi)]
                    else:
                        m.d.sync += out_reg.acc[t * R + j].eq(acc)
            if tag_width:
                m.d.sync += out_reg.tag.eq(done_tag)
        with m.Elif(self.out.ready):
            m.d.sync += self.out.valid.eq(0)
