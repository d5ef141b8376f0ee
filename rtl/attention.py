"""AttentionUnit: one query position of one KV group over an INT8 KV cache, bit-exact with
``sw.contract.fabric_ops`` (``attention_scores``, ``softmax2``, ``attention_values``).

Parameters: ``head_dim`` D (a power of two, 16..256), ``group`` G (query heads per KV head,
1..32), ``macs`` M (a power of two >= 16 that divides D or that D divides, at most G*D rounded
up), ``max_positions`` N (1..2^20), ``exp_lanes`` E (default 1: heads per cycle in pass 2; a
divisor of H below, so 1 .. H).

Geometry: the M multipliers are M lanes. ``heads_per_step`` H = max(1, M/D) heads are worked
on at once, ``lanes_per_head`` L = min(M, D) dims of each, ``chunks`` K = max(1, D/M) steps per
head; a position takes ``steps`` P = ceil(G/H) * K cycles in each MAC pass. Step s = (head
block hb = s / K, chunk c = s mod K); lane l works on head hb*H + l/L, dim c*L + l mod L. A
step with H > 1 may name heads >= G ("phantom" heads: they compute on zeros and are dropped).

One command (``cmd``) = one query position of one KV group: n visible positions 0..n-1
(1 <= n <= N; causal prefill is a different n per query row), the G query heads' int8
vectors (``q``) and fp32 scales (in ``cmd``), and the cache rows of positions 0..n-1.

Streams (``amaranth.lib.stream``, valid/ready; a beat moves when both are high):

* ``cmd`` (In): payload ``n`` (unsigned), ``s_q`` (G fp32 words, head g in bits 32g..32g+31).
* ``q`` (In): 128-bit beats, G*D/16 per command: the int8 codes q8 in row-major [G][D] order,
  byte i of a beat in bits 8i..8i+7 (little-endian memory order).
* ``k`` (In): 128-bit beats, n*D/16 per command: K codes of positions 0..n-1, row-major
  [position][D] (one KV head's slice of FabricKVCache.keys: codes[kv, 0:n, :], contiguous).
* ``k_scale`` (In): 32-bit fp32, n per command: key_scales[kv, 0:n].
* ``v_scale`` (In): 32-bit fp32, n per command: value_scales[kv, 0:n] (read in pass 1, beside
  the K rows and their scales, at up to one per cycle).
* ``v`` (In): 128-bit beats, n*D/16 per command: V codes, like ``k``.
* ``out`` (Out): 128-bit beats of 4 fp32, G*D/4 per command: the outputs in row-major [G][D]
  order (word i of a beat in bits 32i..32i+31).

The unit takes ``cmd`` and the G*D/16 ``q`` beats first, then K rows with their scales and the
n V scales (side by side), then the V rows; a source may present them all at once (each stream
is read only in its phase). Every stream may stall at any beat.

Passes of one command ("position" = one of the n visible positions):

1. q.k: each K row is read once for all G heads; M int8 x int8 MACs per cycle, an adder tree
   per head, then ``score = fp32(acc) * fp32(fp32(s_q*C) * s_k)`` (C = score_scale(D)) into
   the score buffer (G x N fp32, BRAM) and the running max per head. max(P, D/16) cycles per
   position (D/16: the 128-bit K beats). Beside it the V scales go into a buffer (N fp32) and
   the P.V block exponent ``B = max(1, exponent fields of s_v)`` is formed
   (``fabric_ops.pv_block_exponent``: every w = e * s_v <= s_v, so B is known before any exp).
2. exp2 and P.V, one pass: the E exp lanes (each with its own subtract, Exp2, multiply and
   partial adder) run ahead of the MACs: issue i of a position reads the score word of head
   block (i*E) / H and works on heads i*E .. i*E + E-1 of it (lanes on heads >= G compute and are
   dropped): ``e = exp2(score - m)``, ``w = e * s_v`` (s_v from the buffer), ``e`` summed into
   fixed_sum's 32 partials per head (read-modify-write; E banks, bank k holding heads
   h = k mod E at row h // E, so each lane updates its own bank). ceil(G/E) issues per position.
   The w words (one per head block and position) wait in a small FIFO; a position's issues
   start only when it has room for the position's words. Each V row is read once; per step the
   H weights W = RNE(M(w) >> (B - x(w))) (24 bits) multiply L V codes each in the same M
   multipliers (25 x 8 bits) into exact accumulators (44 bits at N = 4096) kept in a ring of P
   registers per lane. max(P, D/16, ceil(G/E)) cycles per position. Each lane is one DSP48E2
   (rtl.dsp.madd_slice): its P register is the ring's first register and its ALU the
   accumulator's adder, the ring closing through C from P - 1 fabric shift registers; in pass 1
   the same P register holds the q.k product for the adder tree.
3. fixed_sum's tree (the E banks side by side, one bank row of E heads at a time, each head in
   the contract's pair order) and one reciprocal per head (in head order): about
   31 ceil(G/E) + 35 + G + 50 cycles after pass 2.
4. out: per accumulator ``y = fp32(acc * 2^(B - 150))`` (:class:`ScaledIntToFp32`) and
   ``out = y * r``: 4 per cycle, G*D/4 cycles.

The fp32 multiplies of the phases (q load: s_q * C; pass 1: the H score scales and scores; pass 2:
the E w = e * s_v; out: the 4 y * r) never overlap, so they share max(2H, E, 4) Fp32Multiply
units (``rtl.fp32.time_shared``: each use has its own operands and valid, an owner tag gates
its results). These multipliers and the exp lanes' 2E adders come from ``units``
(rtl/share.py): new units, or, in the fabric top, a pool shared with the engines that never run
beside this one.

Cycles per command ~ n * cycles_per_position + a fixed part (q load, pipeline drains, the tree
and the reciprocals, the outputs), with cycles_per_position = max(P, D/16) + max(P, D/16,
ceil(G/E)). At D = 64, G = 7: M = 64 gives P = 7, 14 cycles per position; M = 128 gives P = 4,
11 cycles per position, and with E = 2 (H = 2) 8; M = 256 (H = 4), E = 4: 8.
(The previous contract's block exponent, the largest w's, was known only after every exp: the
exp2 pass and the P.V pass ran one after the other, 2 max(P, D/16) + ceil(G/E) cycles per
position: 15 and 12 at M = 128 with E = 1 and 2.)
The second exp lane costs about 4,500 LUT, 1,900 FF, 10 DSP and a RAMB18 pair at D = 64, G = 7,
M = 128 (Yosys, docs/rtl.md, measured before the fused pass).

The score buffer holds one word per (head block, position): the H scores.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from sw.contract import fabric_ops as fo
from sw.contract.errors import ConfigError

from .component import CheckedComponent
from .fp32 import IntToFp32, _PipelinedUnit, _round_and_pack, chain_reset_less, leading_zeros, \
    shift_right_sticky, time_shared
from .fp32 import delay as _delay
from .dsp import madd_slice
from .fpfunc import Exp2, Reciprocal
from .share import LOCAL_UNITS, UnitSource
from .storage import Fifo

__all__ = ["AttentionUnit", "AttentionGeometry", "ScaledIntToFp32", "accumulator_bits"]

BEAT_BITS = 128
BEAT_BYTES = BEAT_BITS // 8
OUT_WORDS = BEAT_BITS // 32
_NEG_INF = 0xFF800000
_SIGN = 0x80000000


def _f32_bits(x) -> int:
    import numpy as np
    return int(np.asarray(x, np.float32).view(np.uint32))


def accumulator_bits(max_positions: int) -> int:
    """Signed width of a P.V accumulator: |acc| < 2^24 * 127 * n (W < 2^24, |v8| <= 127)."""
    return ((1 << fo.PV_W_BITS) * 127 * max_positions - 1).bit_length() + 1


class ScaledIntToFp32(_PipelinedUnit):
    """fp32 of ``a * 2^(e - 150)``, round to nearest even, for a signed ``width``-bit integer a
    and an exponent 1 <= e <= 254 (the P.V output rule of ``fabric_ops.attention_values``).

    Results below 2^-126 are subnormal and exact (a * 2^(e-1) is then an integer below 2^23);
    results beyond the fp32 range are +-inf; 0 gives +0.0.
    Ports: ``i_valid``, ``a`` (signed(width)), ``e`` (8 bits) in; ``o_valid``, ``o`` out.
    Steps: magnitude, leading zeros, normalise, round + pack. Default latency 3.
    """

    _PRIORITY = (3, 1, 2, 0)
    _DEFAULT_LATENCY = 3

    @classmethod
    def check(cls, width: int, latency: int | None = None) -> None:
        if not isinstance(width, int) or not 26 <= width <= 64:
            raise ConfigError(f"ScaledIntToFp32: width must be an integer from 26 to 64, got {width!r}")
        super().check(latency)

    def __init__(self, width: int, latency: int | None = None):
        self._width = width
        super().__init__({"i_valid": In(1), "a": In(signed(width)), "e": In(8),
                          "o_valid": Out(1), "o": Out(32)}, latency)

    def elaborate(self, platform):
        m = Module()
        w = self._width
        st = self._stages(m)
        a = self.a
        s = st.boundary(sign=a[w - 1], mag=Mux(a[w - 1], -a, a)[0:w], e=self.e)
        s = st.boundary(sign=s.sign, mag=s.mag, e=s.e, lz=leading_zeros(s.mag))
        # the leading one at bit w-1-lz: the biased exponent of the result is (w-1-lz) + e - 23
        field = Signal(signed(12), name="field")
        m.d.comb += field.eq(Const(w - 1 - 23, signed(12)) + s.e - s.lz)
        s = st.boundary(sign=s.sign, norm=(s.mag << s.lz)[0:w], zero=s.mag == 0, field=field,
                        sub=(s.mag[0:23] << (s.e - 1)[0:5])[0:23])
        normal = s.field >= 1
        frac = s.norm[w - 24:w - 1]
        up = s.norm[w - 25] & (s.norm[0:w - 25].any() | frac[0])
        flags = SimpleNamespace(sign=s.sign, nan=Const(0, 1), inf=Const(0, 1))
        # below the normal range the value is an exact multiple of 2^-149: no rounding
        packed = _round_and_pack(flags, normal, s.field, Mux(normal, frac, s.sub), normal & up)
        return self._output(m, st, Mux(s.zero, 0, packed))


def _check_pow2(name, v, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi or v & (v - 1):
        raise ConfigError(f"AttentionUnit: {name} must be a power of two from {lo} to {hi}, got {v!r}")


def _delay_fields(m: Module, fields: dict, cycles: int, name: str) -> SimpleNamespace:
    """Every value of `fields` `cycles` cycles later; ``valid`` (if present) is a reset register
    chain, the rest travel packed in one reset-less chain (one wide signal per stage)."""
    out = {}
    if "valid" in fields:
        out["valid"] = _delay(m, fields["valid"], cycles, f"{name}_valid", reset=True)
    rest = {k: Value.cast(v) for k, v in fields.items() if k != "valid"}
    packed = _delay(m, Cat(*rest.values()), cycles, name)
    pos = 0
    for k, v in rest.items():
        part = packed[pos:pos + len(v)]
        out[k] = part.as_signed() if v.shape().signed else part
        pos += len(v)
    return SimpleNamespace(**out)


def _bits_of(value, width: int) -> Value:
    """`value` zero-extended or cut to exactly `width` bits (a field of an address)."""
    return Cat(Value.cast(value), Const(0, width))[0:width]


def _fp32_key(x: Value) -> Value:
    """An unsigned key whose order is fp32's order on non-NaN values (-0.0 just below +0.0)."""
    return Mux(x[31], ~x, x | _SIGN)[0:32]


class AttentionGeometry:
    """The unit's derived sizes (module docstring) and its steady-state cycles per position."""

    def __init__(self, head_dim: int, group: int, macs: int, max_positions: int, exp_lanes: int = 1):
        AttentionUnit.check(head_dim, group, macs, max_positions, exp_lanes)
        self.head_dim, self.group, self.macs, self.max_positions = head_dim, group, macs, max_positions
        self.exp_lanes = exp_lanes
        self.heads_per_step = max(1, macs // head_dim)
        self.lanes_per_head = min(macs, head_dim)
        self.chunks = max(1, head_dim // macs)
        self.head_blocks = -(-group // self.heads_per_step)
        self.steps = self.head_blocks * self.chunks
        self.acc_bits = accumulator_bits(max_positions)
        # pass-2 issues per position (exp_lanes heads of one head block each) and the partial
        # banks' rows (bank k holds the heads h with h mod exp_lanes = k, row h // exp_lanes)
        self.exp_issues = -(-group // exp_lanes)
        # pass 1 (q.k MACs; a K row is head_dim / 16 beats), then pass 2: the exp lanes and the
        # P.V MACs side by side
        mac_pass = max(self.steps, head_dim // BEAT_BYTES)
        self.cycles_per_position = mac_pass + max(mac_pass, self.exp_issues)


class AttentionUnit(CheckedComponent):
    """See the module docstring; ``geometry`` (an :class:`AttentionGeometry`) gives the sizes."""

    @classmethod
    def check(cls, head_dim: int, group: int, macs: int, max_positions: int, exp_lanes: int = 1,
              units: UnitSource = LOCAL_UNITS) -> None:
        _check_pow2("head_dim", head_dim, 16, 256)
        _check_pow2("macs", macs, 16, 4096)
        if not isinstance(group, int) or isinstance(group, bool) or not 1 <= group <= 32:
            raise ConfigError(f"AttentionUnit: group must be an integer from 1 to 32, got {group!r}")
        if macs > head_dim * (1 << (group - 1).bit_length()):
            raise ConfigError(f"AttentionUnit: {macs} MACs exceed the {group} x {head_dim} products of a "
                              f"position (rounded up to a power of two of heads)")
        if not isinstance(max_positions, int) or not 1 <= max_positions <= fo.PV_MAX_POSITIONS:
            raise ConfigError(f"AttentionUnit: max_positions must be an integer from 1 to "
                              f"{fo.PV_MAX_POSITIONS}, got {max_positions!r}")
        heads_per_step = max(1, macs // head_dim)
        if (not isinstance(exp_lanes, int) or isinstance(exp_lanes, bool) or exp_lanes < 1
                or heads_per_step % exp_lanes):
            raise ConfigError(f"AttentionUnit: exp_lanes must divide the {heads_per_step} heads per step "
                              f"(macs / head_dim, at least 1), got {exp_lanes!r}")

    @staticmethod
    def unit_needs(head_dim: int, macs: int, exp_lanes: int = 1) -> dict[str, int]:
        """The fp32 units the unit takes from its ``units`` source (rtl/share.py): the time-shared
        multipliers and, per exp lane, the subtract and the partial adder."""
        return {"mul": max(2 * max(1, macs // head_dim), exp_lanes, OUT_WORDS), "add": 2 * exp_lanes}

    def __init__(self, head_dim: int, group: int, macs: int, max_positions: int, exp_lanes: int = 1,
                 units: UnitSource = LOCAL_UNITS):
        self.geometry = geo = AttentionGeometry(head_dim, group, macs, max_positions, exp_lanes)
        for k, v in vars(geo).items():
            setattr(self, k, v)
        self._units = units
        self.cmd_layout = data.StructLayout({"n": unsigned(max_positions.bit_length()),
                                             "s_q": data.ArrayLayout(32, group)})
        super().__init__({
            "cmd": In(stream.Signature(self.cmd_layout)),
            "q": In(stream.Signature(BEAT_BITS)),
            "k": In(stream.Signature(BEAT_BITS)),
            "k_scale": In(stream.Signature(32)),
            "v_scale": In(stream.Signature(32)),
            "v": In(stream.Signature(BEAT_BITS)),
            "out": Out(stream.Signature(BEAT_BITS)),
        })

    # ------------------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        D, G, M, N = self.head_dim, self.group, self.macs, self.max_positions
        H, L, K, HB, P = self.heads_per_step, self.lanes_per_head, self.chunks, self.head_blocks, self.steps
        A = self.acc_bits
        row_beats = D // BEAT_BYTES
        jbits = max(1, (N - 1).bit_length())          # position index bits of a buffer address
        E, EI = self.exp_lanes, self.exp_issues
        rbits = max(1, (EI - 1).bit_length())         # a partial bank's rows (heads h // E)
        C = _f32_bits(fo.score_scale(D))

        # ---- units --------------------------------------------------------------------------
        def lane_units(name, make):                      # one per exp lane (lane 0 without suffix)
            units = [make() for _ in range(E)]
            for k, u in enumerate(units):
                m.submodules[name if k == 0 else f"{name}{k}"] = u
            return units

        exp2 = lane_units("exp2", Exp2)
        sub_m = lane_units("sub_m", lambda: self._units.make("add"))     # d = score - m
        add_p = lane_units("add_p", lambda: self._units.make("add"))     # fixed_sum partials and tree
        m.submodules.recip = recip = Reciprocal()
        i2f = [IntToFp32(24, latency=4) for _ in range(H)]               # fp32(acc) (exact)
        conv = [ScaledIntToFp32(A) for _ in range(OUT_WORDS)]            # y = acc * 2^(B - 150)
        for i in range(H):
            m.submodules[f"i2f{i}"] = i2f[i]
        for i in range(OUT_WORDS):
            m.submodules[f"conv{i}"] = conv[i]
        # The multiplies of the four phases (which never overlap: each phase's results are in
        # before the next phase issues) share MULS Fp32Multiply units, each use with its own
        # operands and valid (rtl.fp32.time_shared):
        #   q load:  a_h = s_q[h] * C                        (mul_a: unit 0)
        #   pass 1:  b = a_h * s_k, score = fp32(acc) * b    (mul_b[k]: unit k, mul_s[k]: unit H + k)
        #   pass 2:  w = e * s_v                             (mul_w[k]: unit k)
        #   out:     out = y * r                             (mul_r[i]: unit i)
        MULS = self.unit_needs(D, M, E)["mul"]
        owners = [["a"], *[[] for _ in range(MULS - 1)]]
        for k in range(H):
            owners[k].append(f"b{k}")
            owners[H + k].append(f"s{k}")
        for k in range(E):
            owners[k].append(f"w{k}")
        for i in range(OUT_WORDS):
            owners[i].append(f"r{i}")
        use = {}
        for u, names in enumerate(owners):
            for nm, port in zip(names, time_shared(m, f"mul{u}", self._units.make("mul"), len(names))):
                use[nm] = port
        mul_a = use["a"]
        mul_b = [use[f"b{k}"] for k in range(H)]
        mul_s = [use[f"s{k}"] for k in range(H)]
        mul_w = [use[f"w{k}"] for k in range(E)]
        mul_r = [use[f"r{i}"] for i in range(OUT_WORDS)]

        # ---- per-head state -------------------------------------------------------------------
        def head_regs(name, width, init):
            regs = [Signal(width, name=f"{name}{h}", init=init) for h in range(G)]
            padded = regs + [Const(init, width)] * (HB * H - G)          # phantom heads
            return regs, Array(padded)

        a_regs, a_arr = head_regs("a_h", 32, 0)
        m_regs, m_arr = head_regs("m_h", 32, _NEG_INF)
        bexp = Signal(8, init=1)          # the P.V block exponent B (from the V scales, pass 1)
        r_regs, r_arr = head_regs("r_h", 32, 0)

        # ---- memories ---------------------------------------------------------------------------
        m.submodules.scores = scores = Memory(shape=unsigned(32 * H), depth=HB << jbits, init=[])
        sc_rd = scores.read_port()
        sc_wr = scores.write_port()
        # fixed_sum's partials: bank k (one per exp lane) holds heads h = row * E + k, 32 words each
        pa_rd, pb_rd, p_wr = [], [], []
        for k in range(E):
            bank = Memory(shape=unsigned(32), depth=(1 << rbits) * 32, init=[])
            m.submodules["partials" if k == 0 else f"partials{k}"] = bank
            pa_rd.append(bank.read_port())
            pb_rd.append(bank.read_port())
            p_wr.append(bank.write_port())

        # the V scales, written in pass 1, read by the exp lanes in pass 2
        m.submodules.v_scales = v_scales = Memory(shape=unsigned(32), depth=1 << jbits, init=[])
        sv_rd = v_scales.read_port()
        sv_wr = v_scales.write_port()

        # ---- command, phases ---------------------------------------------------------------------
        n = Signal(range(N + 1))
        j = Signal(range(N + 1))          # position being issued (pass 1: K rows; pass 2: MAC steps)
        je = Signal(range(N + 1))         # pass 2: the position the exp lanes issue
        step = Signal(range(P))
        e_idx = Signal(range(EI))          # pass 2: the issue within a position (heads e_idx * E + k)
        phase_q, phase_k, phase_ev, phase_tree, phase_out = (Signal(name=f"in_{x}") for x in
                                                            ("q", "k", "ev", "tree", "out"))
        phase_v = phase_ev                 # pass 2 loads the V rows

        # ---- the V scales in pass 1: B = max(1, exponent fields), kept for the exp lanes --------
        v_cnt = Signal(range(N + 1))
        vs_take = phase_k & (v_cnt < n)
        vs_field = self.v_scale.payload[23:31]
        m.d.comb += [self.v_scale.ready.eq(vs_take),
                     sv_wr.en.eq(vs_take & self.v_scale.valid), sv_wr.addr.eq(v_cnt[0:jbits]),
                     sv_wr.data.eq(self.v_scale.payload)]
        with m.If(vs_take & self.v_scale.valid):
            m.d.sync += v_cnt.eq(v_cnt + 1)
            with m.If(vs_field > bexp):
                m.d.sync += bexp.eq(vs_field)

        # ---- row loader (K in pass 1, V in pass 2) -----------------------------------------------
        src_valid = Mux(phase_k, self.k.valid, self.v.valid & phase_v)
        src_data = Mux(phase_k, self.k.payload, self.v.payload)
        stage = Signal(D * 8, reset_less=True)
        stage_cnt = Signal(range(row_beats + 1))
        stage_full = stage_cnt == row_beats
        rows_in = Signal(range(N + 1))                   # rows whose last beat was taken
        stage_scale = Signal(32, reset_less=True)
        stage_scale_ok = Signal()
        scales_in = Signal(range(N + 1))
        row = Signal(D * 8, reset_less=True)
        row_scale = Signal(32, reset_less=True)
        row_valid = Signal()
        issue_mac = Signal()          # a MAC step issues this cycle (pass 1 or 3)
        row_done = issue_mac & (step == P - 1)
        # the staged row (and K scale) move to `row` when it is free or being finished; a beat or
        # scale arriving in that cycle starts the next staged row, so rows follow back to back
        take_row = stage_full & (stage_scale_ok | phase_v) & (~row_valid | row_done)
        loading = (phase_k | phase_v) & (rows_in < n)
        beat_room = loading & (~stage_full | take_row)
        beat_take = beat_room & src_valid
        slot = Mux(take_row, 0, stage_cnt)
        m.d.comb += [self.k.ready.eq(phase_k & beat_room), self.v.ready.eq(phase_v & beat_room)]
        with m.If(beat_take):
            m.d.sync += stage.word_select(slot[0:max(1, (row_beats - 1).bit_length())] if row_beats > 1
                                          else 0, BEAT_BITS).eq(src_data)
            m.d.sync += stage_cnt.eq(slot + 1)
            with m.If(slot == row_beats - 1):
                m.d.sync += rows_in.eq(rows_in + 1)
        with m.Elif(take_row):
            m.d.sync += stage_cnt.eq(0)
        scale_room = phase_k & (~stage_scale_ok | take_row) & (scales_in < n)
        m.d.comb += self.k_scale.ready.eq(scale_room)
        with m.If(scale_room & self.k_scale.valid):
            m.d.sync += [stage_scale.eq(self.k_scale.payload), stage_scale_ok.eq(1), scales_in.eq(scales_in + 1)]
        with m.Elif(take_row):
            m.d.sync += stage_scale_ok.eq(0)
        with m.If(take_row):
            m.d.sync += [row.eq(stage), row_scale.eq(stage_scale), row_valid.eq(1)]
        with m.Elif(row_done):
            m.d.sync += row_valid.eq(0)

        # ---- q ring: P steps of M bytes, step s = bytes s*M..s*M+M-1 of q8 (zero padded) ------
        q_ring = [Signal(M * 8, name=f"q_ring{i}", reset_less=chain_reset_less(P)) for i in range(P)]
        q_stage = Signal(M * 8, reset_less=True)
        q_beats_total = P * M // BEAT_BYTES
        q_real = G * D // BEAT_BYTES
        q_cnt = Signal(range(q_beats_total + 1))
        q_beat = Mux(q_cnt < q_real, self.q.payload, 0)
        q_go = phase_q & (q_cnt < q_beats_total) & ((q_cnt >= q_real) | self.q.valid)
        m.d.comb += self.q.ready.eq(phase_q & (q_cnt < q_real))
        q_new = Cat(q_stage[BEAT_BITS:], q_beat) if M > BEAT_BYTES else q_beat
        q_push = q_go & (q_cnt % (M // BEAT_BYTES) == M // BEAT_BYTES - 1)
        with m.If(q_go):
            m.d.sync += [q_stage.eq(q_new), q_cnt.eq(q_cnt + 1)]
        q_shift = q_push | (issue_mac & phase_k)
        with m.If(q_shift):
            m.d.sync += q_ring[0].eq(Mux(q_push, q_new, q_ring[P - 1]))
            m.d.sync += [q_ring[i].eq(q_ring[i - 1]) for i in range(1, P)]

        # a_h = s_q[h] * C, one per cycle while q loads
        s_q = Signal(data.ArrayLayout(32, G))
        a_cnt = Signal(range(G + 1))
        a_issue = phase_q & (a_cnt < G)
        m.d.comb += [mul_a.i_valid.eq(a_issue), mul_a.a.eq(s_q[a_cnt[0:max(1, (G - 1).bit_length())]]
                                                          if G > 1 else s_q[0]),
                     mul_a.b.eq(C)]
        with m.If(a_issue):
            m.d.sync += a_cnt.eq(a_cnt + 1)
        a_head = Signal(range(G + 1))                     # results come back in order
        with m.If(mul_a.o_valid):
            m.d.sync += [Array(a_regs)[a_head].eq(mul_a.o), a_head.eq(a_head + 1)]
        a_done = _delay(m, phase_q & (a_cnt == G), mul_a.latency + 1, "a_done", reset=True)

        # ---- the MAC pipeline (pass 1 and pass 2 share the M multipliers) ------------------------
        hb = step // K if K > 1 else step
        chunk = step % K if K > 1 else Const(0, 1)
        # pass 2: the exp lanes' w words (one per head block and position) wait in w_fifo; the
        # first step of a head block takes its word, the block's other chunks reuse it
        e_lat = sub_m[0].latency + exp2[0].latency
        pass2_lat = 1 + e_lat + mul_w[0].latency + 1
        w_depth = HB * (-(-pass2_lat // max(P, row_beats, EI)) + 3)
        m.submodules.w_fifo = w_fifo = Fifo(width=32 * H, depth=w_depth)
        need_w = phase_ev & (chunk == 0)
        m.d.comb += issue_mac.eq((phase_k | phase_ev) & row_valid & (j < n) & (~need_w | w_fifo.r_rdy))
        m.d.comb += w_fifo.r_en.eq(issue_mac & need_w)
        w_hold = Signal(32 * H, reset_less=True)
        with m.If(issue_mac & need_w):
            m.d.sync += w_hold.eq(w_fifo.r_data)
        w_cur = Mux(chunk == 0, w_fifo.r_data, w_hold) if K > 1 else w_fifo.r_data
        with m.If(issue_mac):
            with m.If(step == P - 1):
                m.d.sync += [step.eq(0), j.eq(j + 1)]
            with m.Else():
                m.d.sync += step.eq(step + 1)
        # S1: the issued step (and, in pass 2, its head block's w word)
        s1 = _delay_fields(m, dict(valid=issue_mac, pass1=phase_k, hb=hb, chunk=chunk, j=j,
                                   codes=row.word_select(chunk, L * 8) if K > 1 else row,
                                   q=q_ring[P - 1], scale=row_scale, w=w_cur), 1, "s1")
        # S2: W = RNE(M(w) >> (B - x(w))) per head slot
        w_word = s1.w
        big_w = []
        for k in range(H):
            w = w_word[32 * k:32 * k + 32]
            field = w[23:31]
            mant = Cat(w[0:23], field != 0)
            x = Mux(field == 0, 1, field)
            q, sticky = shift_right_sticky(Cat(Const(0, 1), mant), (bexp - x)[0:8], 26)
            big_w.append((q[1:] + (q[0] & (sticky | q[1])))[0:24])
        s2 = _delay_fields(m, dict(vars(s1), w=Cat(*big_w)), 1, "s2")
        # S3: multiplier operands
        # the first operand: q8 on D in pass 1, W on A in pass 2 (the DSP's pre-adder picks one)
        opq = [s2.q[8 * l:8 * l + 8].as_signed() for l in range(M)]
        opw = [Cat(s2.w.word_select(l // L, 24), Const(0, 1)).as_signed() for l in range(M)]
        opb = [s2.codes[8 * (l % L):8 * (l % L) + 8].as_signed() for l in range(M)]
        # S3: the operands in each lane's DSP48E2 (A2, D2, B2); S4: its P register. A lane is one
        # rtl.dsp.madd_slice, P <= (use_c ? C : 0) + (use_m ? X2 * B2 : 0): in pass 1 P is the
        # product (q8 x k8) for the adder tree; in pass 2 P is the first register of the lane's
        # accumulator ring (P registers: P and P - 1 fabric shift registers), closed through C,
        # so the 44-bit accumulate is the DSP's ALU, not fabric; the outputs rotate the ring (use_m 0).
        s3 = _delay_fields(m, {k: v for k, v in vars(s2).items() if k not in ("w", "q", "codes")}, 1, "s3")
        s4 = _delay_fields(m, vars(s3), 1, "s4")
        ring = [[Signal(signed(A), name=f"acc_ring{i}_{l}", reset_less=chain_reset_less(P - 1)) for l in range(M)]
                for i in range(1, P)]
        tail = [Signal(signed(A), name=f"acc_tail{l}") for l in range(M)]     # the ring's last register
        out_rotate = Signal()
        acc3 = s3.valid & ~s3.pass1                           # a pass-2 step reaches the ALU
        acc_shift = acc3 | out_rotate
        start = s3.j == 0                                    # the first position starts each sum
        p_regs = [madd_slice(m, f"lane{l}", a=opw[l], d=opq[l], b=opb[l], c=tail[l], ce_ab=Const(1),
                             ce_p=acc_shift | (s3.valid & s3.pass1), use_c=out_rotate | (acc3 & ~start),
                             use_m=~out_rotate, use_d=s3.pass1, width=A) for l in range(M)]
        for l in range(M):
            m.d.comb += tail[l].eq(ring[-1][l] if P > 1 else p_regs[l])
            if P > 1:
                with m.If(acc_shift):
                    m.d.sync += [ring[0][l].eq(p_regs[l])] + [ring[i][l].eq(ring[i - 1][l]) for i in range(1, P - 1)]

        # pass 1: adder tree per head slot (a register every 3 levels), then the chunk sum
        level = [[p_regs[k * L + i][0:16].as_signed() for i in range(L)] for k in range(H)]
        tree_regs = 0
        depth = 0
        while len(level[0]) > 1:
            level = [[a + b for a, b in zip(v[0::2], v[1::2])] for v in level]
            depth += 1
            if depth % 3 == 0 and len(level[0]) > 1:
                level = [[_delay(m, x, 1, f"tree{tree_regs}_{k}_{i}") for i, x in enumerate(v)]
                         for k, v in enumerate(level)]
                tree_regs += 1
        sums = [_delay(m, v[0], 1, f"dot{k}") for k, v in enumerate(level)]
        tree_regs += 1
        t = _delay_fields(m, vars(s4), tree_regs, "t")
        dots = [Signal(signed(24), name=f"dotacc{k}") for k in range(H)]     # |dot| <= 127^2 D < 2^23
        dot_valid = Signal()
        m.d.sync += dot_valid.eq(t.valid & t.pass1 & (t.chunk == K - 1))
        with m.If(t.valid & t.pass1):
            m.d.sync += [dots[k].eq(Mux(t.chunk == 0, 0, dots[k]) + sums[k]) for k in range(H)]
        d = _delay_fields(m, dict(hb=t.hb, j=t.j, scale=t.scale), 1, "d")
        d_hb, d_scale = d.hb, d.scale
        for k in range(H):
            m.d.comb += [i2f[k].i_valid.eq(dot_valid), i2f[k].a.eq(dots[k]),
                         mul_b[k].i_valid.eq(dot_valid), mul_b[k].a.eq(a_arr[d_hb * H + k if H > 1 else d_hb]),
                         mul_b[k].b.eq(d_scale),
                         mul_s[k].i_valid.eq(i2f[k].o_valid), mul_s[k].a.eq(i2f[k].o), mul_s[k].b.eq(mul_b[k].o)]
        assert i2f[0].latency == mul_b[0].latency
        sc_lat = i2f[0].latency + mul_s[0].latency
        o = _delay_fields(m, dict(hb=d.hb, j=d.j), sc_lat, "o")
        o_hb, o_j = o.hb, o.j
        score_valid = mul_s[0].o_valid
        for k in range(H):
            h_idx = o_hb * H + k if H > 1 else o_hb
            sc = mul_s[k].o
            for h in range(G):
                with m.If(score_valid & (h_idx == h) & (_fp32_key(sc) > _fp32_key(m_regs[h]))):
                    m.d.sync += m_regs[h].eq(sc)
        pass1_lat = 4 + tree_regs + 1 + sc_lat + 1       # issue to the last write

        # ---- pass 2, the exp lanes: e = exp2(score - m), w = e * s_v -> w_fifo, fixed_sum partials
        # E lanes: issue i of a position works on heads i*E .. i*E + E-1 (one head block's slots)
        e_hb = e_idx // (H // E) if H > E else e_idx
        e_gib = e_idx % (H // E) if H > E else Const(0, 1)     # the lane group within the block
        # a position starts only when w_fifo has room for its HB words (counting those in flight)
        w_inflight = Signal(range(w_depth + HB + 1))
        w_push = Signal()
        credit = w_inflight + w_fifo.level + HB <= w_depth
        issue_e = phase_ev & (je < n) & ((e_idx != 0) | credit)
        m.d.sync += w_inflight.eq(w_inflight + Mux(issue_e & (e_idx == 0), HB, 0) - w_push)
        with m.If(issue_e):
            with m.If(e_idx == EI - 1):
                m.d.sync += [e_idx.eq(0), je.eq(je + 1)]
            with m.Else():
                m.d.sync += e_idx.eq(e_idx + 1)
        m.d.comb += sv_rd.addr.eq(je[0:jbits])
        e1 = _delay_fields(m, dict(valid=issue_e, idx=e_idx, gib=e_gib, hb=e_hb, j=je), 1, "e1")
        for k in range(E):
            if H == E:
                score = sc_rd.data[32 * k:32 * k + 32]
            else:
                score = sc_rd.data.word_select(e1.gib * E + k if E > 1 else e1.gib, 32)
            m.d.comb += [sub_m[k].i_valid.eq(e1.valid), sub_m[k].a.eq(score),
                         sub_m[k].b.eq(m_arr[e1.idx * E + k if E > 1 else e1.idx] ^ _SIGN),
                         exp2[k].i_valid.eq(sub_m[k].o_valid), exp2[k].a.eq(sub_m[k].o)]
        ee = _delay_fields(m, dict({k: v for k, v in vars(e1).items() if k != "valid"}, sv=sv_rd.data),
                           e_lat, "ee")
        for k in range(E):
            m.d.comb += [mul_w[k].i_valid.eq(exp2[k].o_valid), mul_w[k].a.eq(exp2[k].o), mul_w[k].b.eq(ee.sv)]
        ww = _delay_fields(m, vars(ee), mul_w[0].latency, "ww")
        w_valid = mul_w[0].o_valid
        w_word_reg = Signal(32 * H, reset_less=True)
        w_new = Cat(*[Mux(ww.gib == k // E, mul_w[k % E].o, w_word_reg[32 * k:32 * k + 32]) for k in range(H)]) \
            if H > E else Cat(*[u.o for u in mul_w])
        w_last = (ww.gib == H // E - 1) | (ww.idx == EI - 1)
        with m.If(w_valid):
            m.d.sync += w_word_reg.eq(w_new)
        m.d.comb += [w_push.eq(w_valid & w_last), w_fifo.w_en.eq(w_push), w_fifo.w_data.eq(w_new)]

        # score buffer ports: pass 1 writes the scores, pass 2's exp lanes read them
        m.d.comb += [sc_wr.en.eq(score_valid), sc_wr.addr.eq(Cat(o_j[0:jbits], o_hb)),
                     sc_wr.data.eq(Cat(*[mul_s[k].o for k in range(H)])),
                     sc_rd.addr.eq(Cat(je[0:jbits], e_hb))]

        # fixed_sum partials: partial (h, j mod 32) in bank h mod E, row h // E, read-modify-write
        # through the bank's add_p
        ep = _delay_fields(m, dict(valid=exp2[0].o_valid, e=Cat(*[u.o for u in exp2]),
                                   addr=Cat(_bits_of(ee.j, 5), ee.idx), first=ee.j < 32), 1, "ep")
        tree_a = [Signal(32, name=f"tree_a{k}") for k in range(E)]
        tree_b = [Signal(32, name=f"tree_b{k}") for k in range(E)]
        tree_valid = Signal()
        tree_waddr = Signal(len(p_wr[0].addr))
        p_waddr = _delay(m, Mux(phase_tree, tree_waddr, ep.addr), add_p[0].latency, "p_waddr")
        for k in range(E):
            m.d.comb += [add_p[k].i_valid.eq(Mux(phase_tree, tree_valid, ep.valid)),
                         add_p[k].a.eq(Mux(phase_tree, tree_a[k], Mux(ep.first, 0, pa_rd[k].data))),
                         add_p[k].b.eq(Mux(phase_tree, tree_b[k], ep.e[32 * k:32 * k + 32])),
                         p_wr[k].en.eq(add_p[k].o_valid), p_wr[k].addr.eq(p_waddr), p_wr[k].data.eq(add_p[k].o)]

        # ---- the tree of fixed_sum (in place: q[k] = p[2k] + p[2k+1]) and the reciprocals -------
        # the E banks run the tree side by side, one bank row (E heads) at a time
        lvl = Signal(range(6))
        pair = Signal(range(16))
        t_head = Signal(range(G + 1))     # the tree: a bank row; the reciprocals: a head
        t_wait = Signal(range(add_p[0].latency + 4))
        t_issue = Signal()
        rd_a_addr = Signal(len(pa_rd[0].addr))
        tree_rd = Signal()            # the tree and the reciprocals read the partials
        for k in range(E):
            m.d.comb += [pa_rd[k].addr.eq(Mux(tree_rd, rd_a_addr, Cat(_bits_of(ee.j, 5), ee.idx))),
                         pb_rd[k].addr.eq(rd_a_addr + 1)]
        # in the tree phase: a read at t gives the operands at t+1
        t1 = _delay_fields(m, dict(lvl=lvl, pair=pair, head=t_head), 1, "t1")
        lvl1, idx1, head1 = t1.lvl, t1.pair, t1.head
        m.d.comb += [tree_valid.eq(_delay(m, t_issue, 1, "t_issue1", reset=True)),
                     tree_waddr.eq(Cat(_bits_of(idx1, 5), head1))]
        for k in range(E):
            m.d.comb += [tree_a[k].eq(Mux((lvl1 == 0) & (Cat(Const(0, 1), idx1) >= n), 0, pa_rd[k].data)),
                         tree_b[k].eq(Mux((lvl1 == 0) & (Cat(Const(1, 1), idx1) >= n), 0, pb_rd[k].data))]
        recip_issue = Signal()
        recip_bank = _delay(m, t_head % E, 1, "recip_bank") if E > 1 else 0
        m.d.comb += [recip.i_valid.eq(_delay(m, recip_issue, 1, "recip_issue1", reset=True)),
                     recip.a.eq(Array([r.data for r in pa_rd])[recip_bank] if E > 1 else pa_rd[0].data)]
        recip_head = Signal(range(G + 1))                 # results come back in order
        with m.If(recip.o_valid):
            m.d.sync += [Array(r_regs)[recip_head].eq(recip.o), recip_head.eq(recip_head + 1)]

        # ---- pass 4: outputs ----------------------------------------------------------------------
        groups = M // OUT_WORDS
        fifo_depth = conv[0].latency + mul_r[0].latency + 4
        m.submodules.out_fifo = fifo = Fifo(width=BEAT_BITS, depth=fifo_depth)
        inflight = Signal(range(fifo_depth + 1))
        grp = Signal(range(groups))
        o_head = hb * H + (grp * OUT_WORDS) // L if H > 1 else hb
        o_phantom = o_head >= G
        out_issue = Signal()
        conv_out = conv[0].o_valid
        m.d.sync += inflight.eq(inflight + out_issue - mul_r[0].o_valid)
        room = inflight + fifo.level < fifo_depth
        tail_words = Cat(*tail)
        for i in range(OUT_WORDS):
            m.d.comb += [conv[i].i_valid.eq(out_issue),
                         conv[i].a.eq(tail_words.word_select(grp, OUT_WORDS * A)[i * A:(i + 1) * A]),
                         conv[i].e.eq(bexp),
                         mul_r[i].i_valid.eq(conv_out), mul_r[i].a.eq(conv[i].o)]
        r_head = _delay(m, o_head, conv[0].latency, "r_head")
        for i in range(OUT_WORDS):
            m.d.comb += mul_r[i].b.eq(r_arr[r_head])
        m.d.comb += [fifo.w_en.eq(mul_r[0].o_valid), fifo.w_data.eq(Cat(*[u.o for u in mul_r])),
                     self.out.payload.eq(fifo.r_data), self.out.valid.eq(fifo.r_rdy),
                     fifo.r_en.eq(self.out.ready)]

        # ---- the sequencer ---------------------------------------------------------------------
        drain = Signal(range(max(pass1_lat, pass2_lat + add_p[0].latency + 2, 8) + 1))
        tail_start = Signal()
        with m.FSM(name="tail"):
            with m.State("IDLE"):
                with m.If(tail_start):
                    m.d.sync += [lvl.eq(0), pair.eq(0), t_head.eq(0)]
                    m.next = "TREE"
            with m.State("TREE"):
                m.d.comb += [phase_tree.eq(1), tree_rd.eq(1), t_issue.eq(1),
                             rd_a_addr.eq(Cat(Const(0, 1), _bits_of(pair, 4), t_head))]
                with m.If(pair == (Const(15, 4) >> lvl)):          # 16 >> lvl sums per head
                    m.d.sync += pair.eq(0)
                    with m.If(t_head == EI - 1):
                        m.d.sync += [t_head.eq(0), t_wait.eq(add_p[0].latency + 2)]
                        m.next = "TREE_WAIT"
                    with m.Else():
                        m.d.sync += t_head.eq(t_head + 1)
                with m.Else():
                    m.d.sync += pair.eq(pair + 1)
            with m.State("TREE_WAIT"):                              # a level's sums are written
                m.d.comb += phase_tree.eq(1)
                m.d.sync += t_wait.eq(t_wait - 1)
                with m.If(t_wait == 0):
                    m.d.sync += lvl.eq(lvl + 1)
                    with m.If(lvl == 4):
                        m.d.sync += t_head.eq(0)
                        m.next = "RECIP"
                    with m.Else():
                        m.next = "TREE"
            with m.State("RECIP"):
                m.d.comb += [recip_issue.eq(1), tree_rd.eq(1),
                             rd_a_addr.eq(Cat(Const(0, 5), t_head // E if E > 1 else t_head))]
                m.d.sync += t_head.eq(t_head + 1)
                with m.If(t_head == G - 1):
                    m.next = "IDLE"
        m.d.comb += self.cmd.ready.eq(0)
        with m.FSM(name="attn"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [n.eq(self.cmd.payload.n), s_q.eq(self.cmd.payload.s_q), q_cnt.eq(0),
                                 a_cnt.eq(0), a_head.eq(0), recip_head.eq(0), j.eq(0), step.eq(0), e_idx.eq(0),
                                 je.eq(0), v_cnt.eq(0), w_inflight.eq(0), bexp.eq(1)]
                    m.d.sync += [r.eq(_NEG_INF) for r in m_regs]
                    m.next = "LOAD_Q"
            with m.State("LOAD_Q"):
                m.d.comb += phase_q.eq(1)
                with m.If((q_cnt == q_beats_total) & a_done):
                    m.d.sync += [rows_in.eq(0), scales_in.eq(0), stage_cnt.eq(0), stage_scale_ok.eq(0),
                                 row_valid.eq(0)]
                    m.next = "PASS_K"
            with m.State("PASS_K"):
                m.d.comb += phase_k.eq(1)
                with m.If((j == n) & (v_cnt == n)):
                    m.d.sync += drain.eq(pass1_lat)
                    m.next = "DRAIN_K"
            with m.State("DRAIN_K"):
                m.d.comb += phase_k.eq(1)       # the last scores still arrive
                m.d.sync += drain.eq(drain - 1)
                with m.If(drain == 0):
                    m.d.sync += [j.eq(0), je.eq(0), e_idx.eq(0), step.eq(0), rows_in.eq(0), stage_cnt.eq(0),
                                 row_valid.eq(0)]
                    m.next = "PASS_EV"
            with m.State("PASS_EV"):
                m.d.comb += phase_ev.eq(1)
                with m.If(j == n):
                    # the exp lanes finished before the last w word was taken; their last partial
                    # sums and the last products reach the partials and the ring
                    m.d.sync += drain.eq(add_p[0].latency + 6)
                    m.next = "DRAIN_EV"
            with m.State("DRAIN_EV"):
                m.d.sync += drain.eq(drain - 1)
                with m.If(drain == 0):
                    m.d.comb += tail_start.eq(1)        # fixed_sum's tree and the reciprocals
                    m.next = "TAIL"
            with m.State("TAIL"):
                with m.If(recip_head == G):
                    m.d.sync += [step.eq(0), grp.eq(0)]
                    m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += phase_out.eq(1)
                go = o_phantom | room
                m.d.comb += out_issue.eq(room & ~o_phantom)
                with m.If(go):
                    with m.If(grp == groups - 1):
                        m.d.sync += grp.eq(0)
                        m.d.comb += out_rotate.eq(1)
                        with m.If(step == P - 1):
                            m.next = "FLUSH"
                        with m.Else():
                            m.d.sync += step.eq(step + 1)
                    with m.Else():
                        m.d.sync += grp.eq(grp + 1)
            with m.State("FLUSH"):
                with m.If(inflight == 0):
                    m.d.sync += step.eq(0)
                    m.next = "IDLE"
        return m
