"""VectorUnit: the decoder's element-wise and per-vector fp32 ops on `lanes` lanes.

Bit-exact with the contract (sw/contract/fabric_ops.py, sw/contract/numerics.py):

======== ================================================= ===========================================
op       result                                            spec
======== ================================================= ===========================================
ADD      out = a + b                                       fabric_ops.residual_add
SILU_MUL out = fp32(a * sigmoid(a)) * b                    fabric_ops.silu_mul (a = gate, b = up)
RMSNORM  out = (x * rsqrt(fixed_sum(x*x)*c0 + c1)) * g     fabric_ops.rms_norm (c0 = fp32(1/n),
                                                           c1 = fp32(eps): fabric_ops.rms_constants)
ROPE     one head vector, rotate-half                      fabric_ops.apply_rope (one row)
QUANT    per-group symmetric INT8 codes, scale, qsum       numerics.quantize_activations(x, group);
                                                           group = head_dim is fabric_ops.quantize_heads
BF16     out = bf16 bits << 16                             fabric_ops.embedding (one row)
======== ================================================= ===========================================

Fused quantization: RMSNORM, SILU_MUL and ROPE with the command's ``quant`` bit set quantize their
result per group of ``group`` (G) instead of sending it out: ``codes`` and ``stats`` carry exactly
what a QUANT of the result with group G would (numerics.quantize_activations(result, G); a ROPE
head with G = head_dim is one group), and ``out`` stays silent. The arithmetic is that of the two
ops in sequence, bit for bit.

Interface (every valid/ready port is an ``amaranth.lib.stream`` of the payload given; L = lanes;
"lane l" of a beat is bits [32 l, 32 l + 32) of the payload unless stated):

``cmd`` (In): one beat per command, :func:`command_layout`:
    ``op`` (:class:`VecOp`), ``length`` (n, the elements of the command), ``c0``, ``c1`` (fp32 bit
    patterns; RMSNORM only: c0 = fp32(1/n), c1 = fp32(eps)), ``group`` (QUANT, and a fused op: the
    group size G), ``quant`` (RMSNORM, SILU_MUL, ROPE: quantize the result, see above; ignored on
    the other ops).
``a``, ``b``, ``c``, ``d`` (In): operand streams, L fp32 lanes per beat (``ArrayLayout(32, L)``).
``out`` (Out): L fp32 lanes per beat (``unsigned(32 L)``).
``codes`` (Out): QUANT's (or a fused op's) int8 codes, L per beat (``unsigned(8 L)``, lane l = bits [8 l, 8 l + 8), two's
    complement). The output payloads are plain bit vectors, not ArrayLayouts: see the note in
    ``VectorUnit.__init__`` (Yosys's abc9 cannot synthesize the unit alone with array output ports).
``stats`` (Out): QUANT's (or a fused op's) per-group {``scale``: fp32 s_a bits, ``qsum``: signed(32)},
    one beat per group.

Beat orders (every stream is one or two contiguous fp32 arrays read in ascending element order, L
elements per beat, element j of an array in lane j mod L of beat j // L):

======== ==================================================================== ============================
op       operand beats (in command order)                                     output beats
======== ==================================================================== ============================
ADD      a: h[0..n)   b: y[0..n)                                              out: (h + y)[0..n)
SILU_MUL a: gate[0..n)   b: up[0..n)                                          out: n values
RMSNORM  a: x[0..n) twice (pass 1: sum of squares; pass 2 after the rsqrt)    out: n values
         b: gamma[0..n) (taken with pass 2's a beats)
ROPE     n = head_dim, h = n/2, one head per command:                         out: the rotated head [0..n)
         a: x[0..n)   b: x[h..n) then x[0..h)   c: cos[0..h) twice   d: sin[0..h) twice
QUANT    a: x[0..n)  (n = T * K for T rows of K: the groups run across rows)  codes: q[0..n) (int8),
                                                                              stats: group g -> (s_a, qsum)
BF16     a: bf16 bit patterns row[0..n): lane l of a beat is bits [16 l, 16 l + 16)  out: n fp32 values
         (the upper half of the beat is ignored)
fused    the producer's operand beats (RMSNORM, SILU_MUL, ROPE above)         codes: q[0..n), stats: one
         (``quant`` = 1)                                                      beat per group (as QUANT)
======== ==================================================================== ============================

So QUANT's ``codes`` are the int8 [T][K] codes section of sw.contract.commands.ActivationLayout
byte for byte, and the ``stats`` beats split into its fp32 [T][ng] scales and int32 [T][ng] qsums
sections (beat g = row g // ng, group g % ng). Operand beats of one op are taken together (one
handshake cycle for all the streams the op uses); streams an op does not use are never taken.

Preconditions (the unit does not check them): n is a multiple of L and at least L; ROPE: n is a
multiple of 2 L; QUANT and fused: G is one of ``groups`` and n a multiple of G (fused ROPE: G = n); RMSNORM: c0, c1 as
fabric_ops.rms_constants gives them (the sum of squares times c0 plus c1 must be > 0, the
rsqrt domain). Finite inputs (and, fused, finite results).

Datapath: per lane three Fp32Multiply (M1, M2 for the ops, M3 for the quantizer), one Fp32Add (A)
and an Fp32ToInt; a Sigmoid per lane pair (``shared_sigmoid``, the default at 2 lanes or more; at
1 lane, or with it off, one per lane); Rsqrt and two Fp32DivideSerial (scalar). RMSNORM's scalar add and
multiply run in its reduce phase, when the lanes are idle, on lane 0's A and M2 (time-shared). M3
and A come from ``units`` (rtl/share.py): new units, or, in the fabric top, a pool shared with
the engines that never run beside this one. Per op:

* ADD: A(a, b). BF16: a register.
* SILU_MUL: Sigmoid(a); M1(a, sig); M2(., b) (a, b delayed in reset-less shift registers). Shared
  sigmoids take a beat every other cycle: lane 2k's operand in the beat's first cycle, lane 2k+1's
  in the next, so the op streams L/2 elements per cycle (12 DSP48E2 and about 1,500 LUT saved per
  Sigmoid; SILU_MUL is the only op that needs it).
* ROPE: M1(a, c) and M2(+-b, d) (b negated in the first half: -x[i+h]) side by side; A(M1, M2).
* RMSNORM pass 1: M1(x, x); A(partial[p], .) into ``P = 32`` partials, element i into partial
  i mod 32, which is lane i mod L's partial slot (i // L) mod (32/L): a partial comes back every
  32/L beats, and the adder's result is forwarded to a read in the cycle it leaves the adder, so any
  add latency <= 32/L is hazard-free. Then the fixed balanced tree on the scalar adder, level by level
  (pairs (2j, 2j+1) -> j, in place), s*c0 (scalar multiply), + c1 (scalar add), Rsqrt. Pass 2:
  M1(x, r), M2(., gamma). This is fabric_ops.fixed_sum's order exactly.
* QUANT (the quantizer): groups are written into a ring of ``quant_slots`` group buffers (a memory
  per lane) while their amax = max |x| (exact, on the magnitude bits) is found; a loaded group gets
  inv = 127/safe and s_a = safe/127 from two serial dividers side by side (safe = amax, or 1.0
  below numerics.AMAX_MIN; a division every 16 cycles, so groups of G <= 16 L elements wait for
  them, larger ones never); then its beats are read back: M3(x, inv), Fp32ToInt (round half even, clip
  to +-127), codes forced to 0 for a dead group, qsum summed exactly. Loading overlaps the division
  and the quantization of earlier groups. The ring loads QUANT's a beats, or, fused, the beats the
  producer's pipelines put into the out FIFO (its read side feeds the ring instead of ``out``), so
  the producer's M1 and the quantizer's M3 work at the same time.

Flow control: every fixed-latency pipeline writes into an output FIFO; a beat is issued only when
the FIFO has room for it counting every beat already in flight (a credit counter per output FIFO:
beats taken and not yet read out of it), so back-pressure on an output never loses data and never
stalls a pipeline. Fused, the out FIFO is read by the ring, so a full ring (``codes`` or ``stats``
back-pressured, or the divider behind) fills the out FIFO and the credits stall the producer.

Between commands: a command is complete when its pipelines have drained (``latency`` cycles after
the last issue) and the quantizer is empty (no loaded or partly loaded group, no read-back in
flight), fused also the out FIFO. The next command follows without that drain when it has the same
op, the same ``quant`` and (QUANT or fused) the same group, and is not RMSNORM (so ROPE heads
stream back to back); a fused command after a fused one with the same group waits only for the
pipelines (an RMSNORM row's sums start while the previous row's last groups are quantized). A
fused command never starts while the out FIFO still holds an unfused command's results.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from sw.contract.errors import ConfigError
from sw.contract.fabric_ops import P_PARTIALS
from sw.contract.numerics import AMAX_MIN, QMAX_A, SUPPORTED_GROUP_SIZES

from .component import CheckedComponent
from .fp32 import Fp32Add, Fp32Multiply, time_shared
from .fp32 import delay as _delay
from .fpfunc import Fp32DivideSerial, Fp32ToInt, Rsqrt, Sigmoid
from .share import LOCAL_UNITS, UnitSource
from .storage import Fifo

__all__ = ["VecOp", "VectorUnit", "command_layout", "stats_layout", "LANE_CHOICES"]

LANE_CHOICES = (1, 2, 4, 8)
_AMAX_MIN_BITS = int(np.asarray(AMAX_MIN, np.float32).view(np.uint32))
_F32_ONE = 0x3F800000
_F32_QMAX = int(np.float32(QMAX_A).view(np.uint32))


class VecOp(enum.Enum, shape=3):
    ADD = 0
    SILU_MUL = 1
    RMSNORM = 2
    ROPE = 3
    QUANT = 4
    BF16 = 5


def command_layout(length_width: int, group_width: int) -> data.StructLayout:
    return data.StructLayout({"op": VecOp, "length": unsigned(length_width), "c0": unsigned(32),
                              "c1": unsigned(32), "group": unsigned(group_width), "quant": 1})


def stats_layout() -> data.StructLayout:
    return data.StructLayout({"scale": unsigned(32), "qsum": signed(32)})


class _State(enum.Enum, shape=3):
    IDLE = 0
    RUN = 1          # ADD, SILU_MUL, ROPE, BF16, QUANT loads, RMSNORM pass 2
    RMS_SUM = 2      # RMSNORM pass 1
    RMS_REDUCE = 3   # tree, scale, eps, rsqrt
    DRAIN = 4


class VectorUnit(CheckedComponent):
    """See the module docstring. Parameters: ``lanes`` (1, 2, 4, 8), ``max_length`` (the largest
    n), ``groups`` (QUANT group sizes, powers of two, each >= 2 lanes), ``quant_slots`` (group
    buffers, >= 2), ``mul_latency`` / ``add_latency`` (the fp32 units'; add_latency <= 32 / lanes),
    ``shared_sigmoid`` (default: on at 2 lanes or more: one Sigmoid per lane pair, SILU_MUL at one
    beat per two cycles; off: a Sigmoid per lane, one beat per cycle)."""

    @classmethod
    def check(cls, lanes: int, *, max_length: int = 8960, groups=SUPPORTED_GROUP_SIZES, quant_slots: int = 4,
              mul_latency: int | None = None, add_latency: int | None = None,
              shared_sigmoid: bool | None = None, units: UnitSource = LOCAL_UNITS) -> None:
        if lanes not in LANE_CHOICES:
            raise ConfigError(f"VectorUnit: lanes must be one of {LANE_CHOICES}, got {lanes!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2 * lanes:
            raise ConfigError(f"VectorUnit: max_length must be an integer >= 2 * lanes, got {max_length!r}")
        groups = tuple(groups)
        if not groups or any(not isinstance(g, int) or g < 2 * lanes or g & (g - 1) for g in groups):
            raise ConfigError(f"VectorUnit: groups must be powers of two >= 2 * lanes, got {groups!r}")
        if not isinstance(quant_slots, int) or quant_slots < 2:
            raise ConfigError(f"VectorUnit: quant_slots must be an integer >= 2, got {quant_slots!r}")
        if shared_sigmoid and lanes < 2:
            raise ConfigError("VectorUnit: shared_sigmoid needs at least 2 lanes (one Sigmoid per lane pair)")
        Fp32Multiply.check(mul_latency)
        Fp32Add.check(add_latency)
        if Fp32Add.resolve_latency(add_latency) > P_PARTIALS // lanes:
            raise ConfigError(f"VectorUnit: add_latency {Fp32Add.resolve_latency(add_latency)} exceeds "
                              f"{P_PARTIALS // lanes}, the partial-sum revisit distance at {lanes} lanes")

    def __init__(self, lanes: int, *, max_length: int = 8960, groups=SUPPORTED_GROUP_SIZES, quant_slots: int = 4,
                 mul_latency: int | None = None, add_latency: int | None = None,
                 shared_sigmoid: bool | None = None, units: UnitSource = LOCAL_UNITS):
        self._lanes = lanes
        self._units = units
        # lanes per Sigmoid: 2 (a pair shares one; SILU_MUL issues every other cycle) or 1
        self._sig_share = 2 if (lanes >= 2 if shared_sigmoid is None else shared_sigmoid) else 1
        self._max_length = max_length
        self._groups = tuple(groups)
        self._slots = quant_slots
        self._mul_latency = Fp32Multiply.resolve_latency(mul_latency)
        self._add_latency = Fp32Add.resolve_latency(add_latency)
        L = lanes
        lanes_f32 = data.ArrayLayout(unsigned(32), L)
        super().__init__({
            "cmd": In(stream.Signature(command_layout(max_length.bit_length(), max(self._groups).bit_length()))),
            "a": In(stream.Signature(lanes_f32)),
            "b": In(stream.Signature(lanes_f32)),
            "c": In(stream.Signature(lanes_f32)),
            "d": In(stream.Signature(lanes_f32)),
            # The output payloads are plain bit vectors (lane l = bits [32 l, 32 l + 32), resp.
            # [8 l, 8 l + 8)), not ArrayLayouts: Amaranth names an ArrayLayout port's lanes
            # `out__payload[0]` ..., and Yosys 0.70's abc9 (ABC_OPS_REINTEGRATE) asserts on an
            # output port `x` next to a wire `x[0]` when this unit is synthesized alone.
            "out": Out(stream.Signature(unsigned(32 * L))),
            "codes": Out(stream.Signature(unsigned(8 * L))),
            "stats": Out(stream.Signature(stats_layout())),
        })
        self._sig_latency = Sigmoid.resolve_latency(None)
        self._toint_latency = Fp32ToInt.resolve_latency(None)
        self._div_latency = Fp32DivideSerial.latency

    @staticmethod
    def unit_needs(lanes: int) -> dict[str, int]:
        """The fp32 units the unit takes from its ``units`` source (rtl/share.py): per lane the
        quantizer's multiplier M3 and the adder A."""
        return {"mul": lanes, "add": lanes}

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def sigmoid_share(self) -> int:
        """Lanes per Sigmoid (2: SILU_MUL takes a beat every other cycle; 1: every cycle)."""
        return self._sig_share

    @property
    def groups(self) -> tuple[int, ...]:
        return self._groups

    def op_latency(self, op: VecOp) -> int:
        """Cycles from an operand beat's handshake to its result entering the output FIFO (the
        FIFO adds up to two more before ``out.valid``). QUANT: from the group's last a beat to its
        last codes beat in the FIFO when the unit is otherwise idle."""
        m, a = self._mul_latency, self._add_latency
        return {VecOp.ADD: 1 + a, VecOp.SILU_MUL: self._sig_share + self._sig_latency + 2 * m, VecOp.RMSNORM: 1 + 2 * m,
                VecOp.ROPE: 1 + m + a, VecOp.BF16: 1,
                VecOp.QUANT: 1 + self._div_latency + self._group_beats_max() + 1 + m + self._toint_latency}[op]

    def _group_beats_max(self) -> int:
        return max(self._groups) // self._lanes

    def _pipe_latency(self) -> int:
        """The longest issue-to-FIFO latency of the lane pipelines."""
        m, a = self._mul_latency, self._add_latency
        return max(1 + a + m, self._sig_share + self._sig_latency + 2 * m, 1 + 2 * m, 1 + m + a)

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        lane_bits = L.bit_length() - 1
        P_lane = P_PARTIALS // L              # partial slots per lane
        M, A = self._mul_latency, self._add_latency
        S, T = self._sig_latency, self._toint_latency
        pipe = self._pipe_latency()

        # --- command registers -------------------------------------------------------------------
        state = Signal(_State)
        op = Signal(VecOp)
        beats = Signal(range(self._max_length + 1))         # beats of the current pass
        beat = Signal(range(self._max_length + 1))          # beats issued in the current pass
        half_beats = Signal(range(self._max_length + 1))
        c0, c1 = Signal(32), Signal(32)
        group_beats = Signal(range(self._group_beats_max() + 1))
        timer = Signal(range(pipe + self._toint_latency + M + 4))
        with m.If(timer != 0):
            m.d.sync += timer.eq(timer - 1)

        # --- output FIFOs and credits ----------------------------------------------------------------
        out_depth = pipe + 4
        m.submodules.out_fifo = out_fifo = Fifo(width=32 * L, depth=out_depth)
        q_lat = 1 + M + T
        codes_depth = q_lat + 4
        m.submodules.codes_fifo = codes_fifo = Fifo(width=8 * L, depth=codes_depth)
        stats_depth = 4
        m.submodules.stats_fifo = stats_fifo = Fifo(width=64, depth=stats_depth)
        fused = Signal()          # the current command's result goes to the quantizer, not to `out`
        q_load_fused = Signal()   # fused: the quantizer takes the out FIFO's head beat
        for fifo, port in ((codes_fifo, self.codes), (stats_fifo, self.stats)):
            m.d.comb += [port.valid.eq(fifo.r_rdy), port.payload.eq(fifo.r_data), fifo.r_en.eq(port.ready)]
        m.d.comb += [self.out.valid.eq(out_fifo.r_rdy & ~fused), self.out.payload.eq(out_fifo.r_data),
                     out_fifo.r_en.eq(Mux(fused, q_load_fused, self.out.ready))]

        def credit(name, depth, fifo):
            """Beats taken and not yet read out of `fifo` (in flight or in it)."""
            used = Signal(range(depth + 1), name=f"{name}_used")
            take = Signal(name=f"{name}_take")
            m.d.sync += used.eq(used + take - (fifo.r_rdy & fifo.r_en))
            return used, take

        out_used, out_take = credit("out", out_depth, out_fifo)
        codes_used, codes_take = credit("codes", codes_depth, codes_fifo)
        stats_used, stats_take = credit("stats", stats_depth, stats_fifo)
        out_room, codes_room, stats_room = out_used < out_depth, codes_used < codes_depth, stats_used < stats_depth

        # --- which streams the current step takes -------------------------------------------------
        run = state == _State.RUN
        is_ = {o: op == o for o in VecOp}
        uses_b = is_[VecOp.ADD] | is_[VecOp.SILU_MUL] | is_[VecOp.ROPE] | (is_[VecOp.RMSNORM] & run)
        uses_cd = is_[VecOp.ROPE]
        to_out = ~is_[VecOp.QUANT]
        lane_step = (run | (state == _State.RMS_SUM)) & (beat != beats) & ~is_[VecOp.QUANT]
        q_load_ok = Signal()                                 # QUANT: the ring has a free slot
        in_ok = (self.a.valid & (~uses_b | self.b.valid) & (~uses_cd | (self.c.valid & self.d.valid)))
        issue = Signal()      # lane pipelines take a beat
        q_load_a = Signal()   # QUANT takes an a beat into the group ring
        q_load = Signal()     # the group ring takes a beat (an a beat, or fused: an out FIFO beat)
        silu_hold = Signal()  # shared Sigmoid: the cycle after a SILU_MUL beat, the pair's odd lane uses it
        m.d.comb += [
            issue.eq(lane_step & in_ok & ((state == _State.RMS_SUM) | out_room) & ~silu_hold),
            q_load_a.eq(run & is_[VecOp.QUANT] & (beat != beats) & self.a.valid & q_load_ok),
            q_load_fused.eq(fused & out_fifo.r_rdy & q_load_ok),
            q_load.eq(q_load_a | q_load_fused),
            out_take.eq(issue & to_out & run),
            self.a.ready.eq(issue | q_load_a),
            self.b.ready.eq(issue & uses_b),
            self.c.ready.eq(issue & uses_cd),
            self.d.ready.eq(issue & uses_cd),
        ]
        with m.If(issue | q_load_a):
            m.d.sync += beat.eq(beat + 1)
        with m.If(issue):       # the cycles until this beat's result is in its FIFO (or partial)
            m.d.sync += timer.eq(Mux(state == _State.RMS_SUM, 1 + M + A, Array(
                [self.op_latency(o) if o != VecOp.QUANT else 0 for o in VecOp])[op]))

        # --- stage 0: the taken beat, registered ---------------------------------------------------
        v0 = Signal()
        first_half0 = Signal()
        slot0 = Signal(range(P_lane))
        m.d.comb += silu_hold.eq(v0 & is_[VecOp.SILU_MUL] if self._sig_share == 2 else 0)
        m.d.sync += [v0.eq(issue), first_half0.eq(beat < half_beats), slot0.eq(beat[:max(1, 5 - lane_bits)]
                                                                                   if P_lane > 1 else 0)]
        a0 = [Signal(32, name=f"a0_{l}", reset_less=True) for l in range(L)]
        b0 = [Signal(32, name=f"b0_{l}", reset_less=True) for l in range(L)]
        c0r = [Signal(32, name=f"c0_{l}", reset_less=True) for l in range(L)]
        d0 = [Signal(32, name=f"d0_{l}", reset_less=True) for l in range(L)]
        for l in range(L):
            m.d.sync += [a0[l].eq(self.a.payload[l]), b0[l].eq(self.b.payload[l]),
                         c0r[l].eq(self.c.payload[l]), d0[l].eq(self.d.payload[l])]
        a_raw0 = Signal(32 * L, reset_less=True)
        m.d.sync += a_raw0.eq(self.a.payload.as_value())

        # --- RMSNORM state -------------------------------------------------------------------------------
        partials = [Signal(32, name=f"partial{p}", reset_less=True) for p in range(P_PARTIALS)]
        r_scale = Signal(32)                                # rsqrt(v), broadcast in pass 2
        sum0 = Signal()          # the beat at stage 0 belongs to RMSNORM pass 1 (a flag that travels with it)
        m.d.sync += sum0.eq(state == _State.RMS_SUM)
        sum_m = _delay(m, sum0, M, "sum_m")

        # --- QUANT: per-group buffers, M1 inputs of the read side ----------------------------------
        gbm = self._group_beats_max()
        q_v1 = Signal()
        q_x1 = [Signal(32, name=f"qx1_{l}") for l in range(L)]
        q_inv1 = Signal(32)

        # --- the lanes ----------------------------------------------------------------------------------
        out_lanes, codes_lanes = [], []
        out_valid = Signal()
        codes_valid = Signal()
        # SILU_MUL's sigmoids: one per lane, or (shared) one per lane pair (2k, 2k+1), which takes
        # lane 2k's operand in the beat's stage-0 cycle and lane 2k+1's (held one more register) in
        # the next; lane 2k's result waits one register, so M1 starts both lanes SH cycles after v0.
        SH = self._sig_share
        silu0 = v0 & is_[VecOp.SILU_MUL]
        sig_out = []
        for k in range(L // SH):
            sig = m.submodules[f"sig{k}"] = Sigmoid()
            if SH == 1:
                m.d.comb += [sig.i_valid.eq(silu0), sig.a.eq(a0[k])]
                sig_out.append(sig.o)
            else:
                odd_a = _delay(m, a0[2 * k + 1], 1, f"a_odd{k}")
                odd_v = _delay(m, silu0, 1, f"silu_odd{k}", reset=True)
                m.d.comb += [sig.i_valid.eq(silu0 | odd_v), sig.a.eq(Mux(silu0, a0[2 * k], odd_a))]
                sig_out += [_delay(m, sig.o, 1, f"sig_even{k}"), sig.o]
        silu_m1 = _delay(m, silu0, S + SH - 1, "silu_m1", reset=True)
        # RMSNORM's scalar multiply and add (the reduce phase, when no lane pipeline holds a beat)
        # share lane 0's M2 and A: lane 0's are time-shared by two uses, the others by one
        for l in range(L):
            uses = 2 if l == 0 else 1
            m1 = m.submodules[f"lane{l}_m1"] = Fp32Multiply(M)
            m2, *scalar_mul = time_shared(m, f"lane{l}_m2", Fp32Multiply(M), uses)
            m3 = m.submodules[f"lane{l}_m3"] = self._units.make("mul", M)
            add, *scalar_add = time_shared(m, f"lane{l}_add", self._units.make("add", A), uses)
            toint = m.submodules[f"lane{l}_toint"] = Fp32ToInt(8, QMAX_A)
            if l == 0:
                s_mul, s_add = scalar_mul[0], scalar_add[0]
            a_s = _delay(m, a0[l], S + SH - 1, f"a_sig{l}")
            b_m = _delay(m, b0[l], M, f"b_mul{l}")
            b_sm = _delay(m, b_m, S + SH - 1, f"b_sigmul{l}")
            # M1
            with m.Switch(op):
                with m.Case(VecOp.SILU_MUL):
                    m.d.comb += [m1.i_valid.eq(silu_m1), m1.a.eq(a_s), m1.b.eq(sig_out[l])]
                with m.Case(VecOp.RMSNORM):
                    m.d.comb += [m1.i_valid.eq(v0), m1.a.eq(a0[l]), m1.b.eq(Mux(sum0, a0[l], r_scale))]
                with m.Case(VecOp.ROPE):
                    m.d.comb += [m1.i_valid.eq(v0), m1.a.eq(a0[l]), m1.b.eq(c0r[l])]
            # M2
            with m.Switch(op):
                with m.Case(VecOp.SILU_MUL):
                    m.d.comb += [m2.i_valid.eq(m1.o_valid), m2.a.eq(m1.o), m2.b.eq(b_sm)]
                with m.Case(VecOp.RMSNORM):
                    m.d.comb += [m2.i_valid.eq(m1.o_valid & ~sum_m), m2.a.eq(m1.o), m2.b.eq(b_m)]
                with m.Case(VecOp.ROPE):
                    m.d.comb += [m2.i_valid.eq(v0), m2.a.eq(b0[l] ^ (first_half0 << 31)), m2.b.eq(d0[l])]
            # A, and the partial sums of RMSNORM pass 1
            slot_m = _delay(m, slot0, M, f"slot_m{l}")
            slot_a = _delay(m, slot_m, A, f"slot_a{l}")
            mine = [partials[s * L + l] for s in range(P_lane)]
            wb = add.o_valid & is_[VecOp.RMSNORM]
            read = Mux(wb & (slot_a == slot_m), add.o, Array(mine)[slot_m])
            with m.Switch(op):
                with m.Case(VecOp.ADD):
                    m.d.comb += [add.i_valid.eq(v0), add.a.eq(a0[l]), add.b.eq(b0[l])]
                with m.Case(VecOp.ROPE):
                    m.d.comb += [add.i_valid.eq(m1.o_valid), add.a.eq(m1.o), add.b.eq(m2.o)]
                with m.Case(VecOp.RMSNORM):
                    m.d.comb += [add.i_valid.eq(m1.o_valid & sum_m), add.a.eq(read), add.b.eq(m1.o)]
            with m.If(wb):
                m.d.sync += Array(mine)[slot_a].eq(add.o)
            # the quantizer's read side (QUANT, or a fused producer's result): M3(x, inv) -> int8
            m.d.comb += [m3.i_valid.eq(q_v1), m3.a.eq(q_x1[l]), m3.b.eq(q_inv1),
                         toint.i_valid.eq(m3.o_valid), toint.a.eq(m3.o)]
            codes_lanes.append(toint.o)
            # the lane's result
            res = Signal(32, name=f"res{l}")
            with m.Switch(op):
                with m.Case(VecOp.ADD, VecOp.ROPE):
                    m.d.comb += res.eq(add.o)
                    if l == 0:
                        m.d.comb += out_valid.eq(add.o_valid)
                with m.Case(VecOp.SILU_MUL, VecOp.RMSNORM):
                    m.d.comb += res.eq(m2.o)
                    if l == 0:
                        m.d.comb += out_valid.eq(m2.o_valid)
                with m.Case(VecOp.BF16):
                    m.d.comb += res.eq(Cat(Const(0, 16), a_raw0[16 * l:16 * l + 16]))
                    if l == 0:
                        m.d.comb += out_valid.eq(v0)
            out_lanes.append(res)
            if l == 0:
                m.d.comb += codes_valid.eq(toint.o_valid)
        m.d.comb += [out_fifo.w_en.eq(out_valid), out_fifo.w_data.eq(Cat(*out_lanes))]

        # --- RMSNORM: tree, scale, eps, rsqrt (scalar units) ---------------------------------------------
        m.submodules.rsqrt = rsqrt = Rsqrt()
        level_pairs = Signal(range(P_PARTIALS // 2 + 1))    # pairs of the current tree level (0: done)
        t_issued = Signal(range(P_PARTIALS // 2 + 1))
        t_done = Signal(range(P_PARTIALS // 2 + 1))
        t_phase = Signal(range(5))    # 0 wait for pass 1 to drain, 1 tree, 2 scale, 3 eps, 4 rsqrt
        t_go = Signal()
        pa = Array(partials)
        t_issue = (state == _State.RMS_REDUCE) & (t_phase == 1) & (t_issued != level_pairs)
        m.d.comb += [s_add.i_valid.eq(t_issue), s_add.a.eq(pa[Cat(Const(0, 1), t_issued)]),
                     s_add.b.eq(pa[Cat(Const(1, 1), t_issued)])]
        t_tag = _delay(m, t_issued, A, "tree_tag")
        with m.If(t_issue):
            m.d.sync += t_issued.eq(t_issued + 1)

        # --- the command sequencer ----------------------------------------------------------------------
        cmd = self.cmd.payload
        beats_of = (cmd.length >> lane_bits)
        cmd_fused = cmd.quant & ((cmd.op == VecOp.RMSNORM) | (cmd.op == VecOp.SILU_MUL) | (cmd.op == VecOp.ROPE))
        same_group = cmd.group == Cat(Const(0, lane_bits), group_beats)
        # the quantizer's configuration (fused or not, G) may change only when it is empty
        same_quant = (cmd_fused == fused) & ((~fused & (op != VecOp.QUANT)) | same_group)
        same_op = (cmd.op == op) & (op != VecOp.RMSNORM) & same_quant
        out_empty = out_used == 0             # nothing in flight to the out FIFO nor in it
        lane_quiet = timer == 0
        quiet = Signal()          # the command is complete
        q_busy = Signal()         # the quantizer holds a group (loaded, partly loaded or being read)
        m.d.comb += quiet.eq(lane_quiet & ~q_busy & (~fused | out_empty))
        # A fused command after an unfused one: the out FIFO must be empty of the earlier results
        # (they belong to `out`). After a fused one with the same G: the quantizer may still be busy.
        fifo_ok = ~cmd_fused | fused | out_empty
        follow = (fused & cmd_fused & same_group & lane_quiet) | same_op
        can_start = ((quiet & fifo_ok) | follow)

        def start_command():
            m.d.sync += [op.eq(cmd.op), beats.eq(beats_of), beat.eq(0),
                         half_beats.eq(cmd.length >> (lane_bits + 1)), c0.eq(cmd.c0), c1.eq(cmd.c1),
                         group_beats.eq(cmd.group >> lane_bits), fused.eq(cmd_fused)]
            with m.If(cmd.op == VecOp.RMSNORM):
                m.d.sync += [state.eq(_State.RMS_SUM)] + [p.eq(0) for p in partials]
            with m.Else():
                m.d.sync += state.eq(_State.RUN)

        with m.Switch(state):
            with m.Case(_State.IDLE):
                m.d.comb += self.cmd.ready.eq(fifo_ok)
                with m.If(self.cmd.valid & fifo_ok):
                    start_command()
            with m.Case(_State.RUN):
                with m.If(beat == beats):
                    m.d.sync += state.eq(_State.DRAIN)
            with m.Case(_State.RMS_SUM):
                with m.If(beat == beats):
                    m.d.sync += [state.eq(_State.RMS_REDUCE), t_phase.eq(0)]
            with m.Case(_State.RMS_REDUCE):
                with m.Switch(t_phase):
                    with m.Case(0):
                        with m.If(timer == 0):
                            m.d.sync += [t_phase.eq(1), level_pairs.eq(P_PARTIALS // 2), t_issued.eq(0),
                                         t_done.eq(0)]
                    with m.Case(1):
                        with m.If(s_add.o_valid):
                            m.d.sync += [pa[t_tag].eq(s_add.o), t_done.eq(t_done + 1)]
                            with m.If(t_done + 1 == level_pairs):
                                m.d.sync += [level_pairs.eq(level_pairs >> 1), t_issued.eq(0), t_done.eq(0)]
                                with m.If(level_pairs == 1):
                                    m.d.sync += [t_phase.eq(2), t_go.eq(1)]
                    with m.Case(2):       # ms = s * c0
                        m.d.comb += [s_mul.i_valid.eq(t_go), s_mul.a.eq(partials[0]), s_mul.b.eq(c0)]
                        m.d.sync += t_go.eq(0)
                        with m.If(s_mul.o_valid):
                            m.d.sync += [partials[0].eq(s_mul.o), t_phase.eq(3), t_go.eq(1)]
                    with m.Case(3):       # v = ms + c1
                        m.d.comb += [s_add.i_valid.eq(t_go), s_add.a.eq(partials[0]), s_add.b.eq(c1)]
                        m.d.sync += t_go.eq(0)
                        with m.If(s_add.o_valid):
                            m.d.sync += [partials[0].eq(s_add.o), t_phase.eq(4), t_go.eq(1)]
                    with m.Case(4):       # r = rsqrt(v)
                        m.d.comb += [rsqrt.i_valid.eq(t_go), rsqrt.a.eq(partials[0])]
                        m.d.sync += t_go.eq(0)
                        with m.If(rsqrt.o_valid):
                            m.d.sync += [r_scale.eq(rsqrt.o), state.eq(_State.RUN), beat.eq(0)]
            with m.Case(_State.DRAIN):
                m.d.comb += self.cmd.ready.eq(can_start)
                with m.If(self.cmd.valid & can_start):
                    start_command()
                with m.Elif(quiet):
                    m.d.sync += state.eq(_State.IDLE)

        # --- QUANT: load side ------------------------------------------------------------------------------
        slots = self._slots
        slot_bits = max(1, (slots - 1).bit_length())
        gb_bits = max(1, (gbm - 1).bit_length())
        mems = []
        for l in range(L):
            mem = Memory(shape=unsigned(32), depth=slots << gb_bits, init=[])
            m.submodules[f"qbuf{l}"] = mem
            mems.append(mem)
        full = Signal(slots)       # loaded (and not yet read back)
        ready_ = Signal(slots)     # inv and s_a are in
        amax_slot = Array(Signal(31, name=f"amax{s}") for s in range(slots))
        inv_slot = Array(Signal(32, name=f"inv{s}") for s in range(slots))
        sa_slot = Array(Signal(32, name=f"sa{s}") for s in range(slots))
        w_slot = Signal(range(slots))
        w_beat = Signal(range(gbm))
        amax_run = Signal(31)
        m.d.comb += q_load_ok.eq(~full.bit_select(w_slot, 1))
        q_src = [Mux(fused, out_fifo.r_data[32 * l:32 * l + 32], self.a.payload[l]) for l in range(L)]
        mags = [q_src[l][0:31] for l in range(L)]
        beat_max = mags[0]
        for v in mags[1:]:
            beat_max = Mux(v > beat_max, v, beat_max)
        run_max = Mux(w_beat == 0, 0, amax_run)
        new_max = Mux(beat_max > run_max, beat_max, run_max)
        for l, mem in enumerate(mems):
            wp = mem.write_port()
            m.d.comb += [wp.en.eq(q_load), wp.addr.eq(Cat(w_beat[:gb_bits], w_slot[:slot_bits])),
                         wp.data.eq(q_src[l])]
        group_done = q_load & (w_beat + 1 == group_beats)
        with m.If(q_load):
            m.d.sync += [amax_run.eq(new_max), w_beat.eq(w_beat + 1)]
            with m.If(group_done):
                m.d.sync += [w_beat.eq(0), amax_slot[w_slot].eq(new_max),
                             w_slot.eq(Mux(w_slot == slots - 1, 0, w_slot + 1))]
        set_full = Mux(group_done, 1 << w_slot, 0)

        # two serial dividers, side by side: inv = 127 / safe and s_a = safe / 127. They take the
        # loaded groups in ring order, one every `div_latency` cycles (a group of G loads in G / L).
        div_todo = Signal(range(slots + 1))       # loaded groups not yet divided
        div_slot = Signal(range(slots))           # the next group to divide
        busy_slot = Signal(range(slots))          # the group being divided
        m.submodules.div_inv = div_inv = Fp32DivideSerial()
        m.submodules.div_sa = div_sa = Fp32DivideSerial()
        safe = Mux(amax_slot[div_slot] >= _AMAX_MIN_BITS, amax_slot[div_slot], _F32_ONE)
        div_start = (div_todo != 0) & div_inv.ready
        m.d.comb += [div_inv.i_valid.eq(div_start), div_inv.a.eq(_F32_QMAX), div_inv.b.eq(safe),
                     div_sa.i_valid.eq(div_start), div_sa.a.eq(safe), div_sa.b.eq(_F32_QMAX)]
        m.d.sync += div_todo.eq(div_todo + group_done - div_start)
        with m.If(div_start):
            m.d.sync += [busy_slot.eq(div_slot), div_slot.eq(Mux(div_slot == slots - 1, 0, div_slot + 1))]
        set_ready = Signal(slots)
        with m.If(div_inv.o_valid):
            m.d.sync += [inv_slot[busy_slot].eq(div_inv.o), sa_slot[busy_slot].eq(div_sa.o)]
            m.d.comb += set_ready.eq(1 << busy_slot)

        # --- QUANT: read side ------------------------------------------------------------------------------
        r_slot = Signal(range(slots))
        r_beat = Signal(range(gbm))
        r_first = r_beat == 0
        r_last = r_beat + 1 == group_beats
        q_issue = (ready_.bit_select(r_slot, 1) & codes_room & (~r_first | stats_room))
        m.d.comb += [codes_take.eq(q_issue), stats_take.eq(q_issue & r_first)]
        clear = Mux(q_issue & r_last, 1 << r_slot, 0)
        m.d.sync += [full.eq((full | set_full) & ~clear), ready_.eq((ready_ | set_ready) & ~clear)]
        q_timer = Signal(range(q_lat + 3))          # cycles until the last issued read is in the FIFOs
        with m.If(q_timer != 0):
            m.d.sync += q_timer.eq(q_timer - 1)
        with m.If(q_issue):
            m.d.sync += [r_beat.eq(r_beat + 1), q_timer.eq(q_lat + 2)]
            with m.If(r_last):
                m.d.sync += [r_beat.eq(0), r_slot.eq(Mux(r_slot == slots - 1, 0, r_slot + 1))]
        m.d.comb += q_busy.eq(full.any() | (w_beat != 0) | (q_timer != 0))
        for l, mem in enumerate(mems):
            rp = mem.read_port()
            m.d.comb += [rp.addr.eq(Cat(r_beat[:gb_bits], r_slot[:slot_bits])), rp.en.eq(1),
                         q_x1[l].eq(rp.data)]
        live = amax_slot[r_slot] >= _AMAX_MIN_BITS
        q_info = Signal(data.StructLayout({"first": 1, "last": 1, "live": 1, "sa": 32}))
        m.d.sync += [q_v1.eq(q_issue), q_inv1.eq(inv_slot[r_slot]),
                     q_info.eq(Cat(r_first, r_last, live, sa_slot[r_slot]))]
        info = _delay(m, q_info, M + T, "q_info")
        info = data.View(q_info.shape(), info)
        codes = [Mux(info.live, c, 0) for c in codes_lanes]
        beat_sum = sum(c.as_signed() if hasattr(c, "as_signed") else c for c in codes)
        qsum = Signal(signed(32))
        qsum_new = Mux(info.first, 0, qsum) + beat_sum
        with m.If(codes_valid):
            m.d.sync += qsum.eq(qsum_new)
        m.d.comb += [codes_fifo.w_en.eq(codes_valid), codes_fifo.w_data.eq(Cat(*[c[:8] for c in codes])),
                     stats_fifo.w_en.eq(codes_valid & info.last),
                     stats_fifo.w_data.eq(Cat(Mux(info.live, info.sa, 0), qsum_new[:32]))]
        return m
