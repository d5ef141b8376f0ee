"""VectorUnit against sw.contract.fabric_ops / numerics, bit for bit, on Verilator.

Every parameter point (lanes, a Qwen2 preset's shapes, an activation group size)
builds once and runs command programs through one simulation: every op at the
preset's sizes (hidden, intermediate, head_dim; QUANT over the hidden size with
the group size and over heads with group = head_dim), realistic values plus edge
cases (zeros, -0.0, subnormals, rint ties, groups below AMAX_MIN, eps dominating
the mean square, overflow to inf), with random gaps on every input stream and
random back-pressure on every output. A stall-free program per op measures
throughput and latency.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import Fragment, unsigned

from rtl.vector import VecOp, VectorUnit, command_layout, stats_layout
from sw.config import PRESETS
from sw.contract import fabric_ops as fo
from sw.contract.errors import ConfigError
from sw.contract.numerics import AMAX_MIN, quantize_activations

F32 = np.float32
U32 = np.uint32
SIM_DIR = Path(__file__).resolve().parent.parent / "sim"
IN_STREAMS = ("cmd", "a", "b", "c", "d")
OUT_STREAMS = ("out", "codes", "stats")


# ---------------------------------------------------------------------------
# Parameters (no simulator)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(lanes=3), "lanes"),
    (dict(lanes=16), "lanes"),
    (dict(lanes=4, max_length=4), "max_length"),
    (dict(lanes=8, groups=(8,)), "groups"),
    (dict(lanes=4, groups=(48,)), "groups"),
    (dict(lanes=4, quant_slots=1), "quant_slots"),
    (dict(lanes=8, add_latency=5), "revisit"),
    (dict(lanes=4, mul_latency=99), "latency"),
])
def test_impossible_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VectorUnit(**kwargs)


def test_layouts():
    assert command_layout(14, 8).size == 3 + 14 + 32 + 32 + 8 + 1
    assert stats_layout().size == 64
    unit = VectorUnit(4)
    Fragment.get(unit, None)
    assert unit.lanes == 4 and unit.groups == (32, 64, 128)
    assert unit.op_latency(VecOp.BF16) == 1 and unit.op_latency(VecOp.ADD) == 5
    # Plain output payloads: an ArrayLayout output port makes Yosys 0.70's abc9 assert (rtl/vector.py).
    assert unit.out.payload.shape() == unsigned(32 * 4) and unit.codes.payload.shape() == unsigned(8 * 4)


# ---------------------------------------------------------------------------
# Programs: commands, operand beats and the golden results
# ---------------------------------------------------------------------------

def bits(x) -> np.ndarray:
    return np.asarray(x, F32).reshape(-1).view(U32).reshape(np.shape(x))


def f32(b) -> np.ndarray:
    return np.asarray(b, U32).view(F32)


class Program:
    """A list of commands with the beats of every stream and the expected outputs."""

    def __init__(self, lanes: int):
        self.L = lanes
        self.cmds: list[dict] = []
        self.ins = {s: [] for s in "abcd"}          # per stream, uint32 arrays (or uint16 for BF16's a)
        self.out: list[np.ndarray] = []             # expected fp32 bits
        self.codes: list[np.ndarray] = []
        self.scales: list[np.ndarray] = []
        self.qsums: list[np.ndarray] = []
        self.ops: list[str] = []
        self.out_len: list[int] = []                # out values per command (0: QUANT, fused)

    def _cmd(self, op: VecOp, n: int, c0=0, c1=0, group=0, quant=0):
        self.cmds.append(dict(op=op.value, length=n, c0=int(c0), c1=int(c1), group=group, quant=int(bool(quant))))
        self.ops.append(op.name + (f"+QUANT(g{group})" if quant else ""))
        self.out_len.append(0 if quant or op == VecOp.QUANT else n)

    def _result(self, y, quant: int):
        """The producer's result: to `out`, or (quant = the group G) quantized as a following QUANT."""
        if quant:
            q, s, qsum = quantize_activations(np.asarray(y, F32)[None], quant)
            self.codes.append(np.asarray(q, np.int8).reshape(-1))
            self.scales.append(bits(s).reshape(-1))
            self.qsums.append(np.asarray(qsum, np.int64).reshape(-1))
        else:
            self.out.append(bits(y))

    def add(self, h, y):
        self._cmd(VecOp.ADD, len(h))
        self.ins["a"].append(bits(h))
        self.ins["b"].append(bits(y))
        self.out.append(bits(fo.residual_add(h, y)))

    def silu_mul(self, g, u, quant: int = 0):
        self._cmd(VecOp.SILU_MUL, len(g), group=quant, quant=quant)
        self.ins["a"].append(bits(g))
        self.ins["b"].append(bits(u))
        self._result(fo.silu_mul(g, u), quant)

    def rms_norm(self, x, gamma, eps, quant: int = 0):
        inv_n, eps32 = fo.rms_constants(len(x), eps)
        self._cmd(VecOp.RMSNORM, len(x), bits(inv_n), bits(eps32), group=quant, quant=quant)
        self.ins["a"] += [bits(x), bits(x)]
        self.ins["b"].append(bits(gamma))
        self._result(fo.rms_norm(x, gamma, eps), quant)

    def rope(self, x, cos_h, sin_h, quant: bool = False):
        """One head; quant: quantize it as one group (G = head_dim, QUANT with aux = head_dim)."""
        n = len(x)
        h = n // 2
        self._cmd(VecOp.ROPE, n, group=n if quant else 0, quant=quant)
        self.ins["a"].append(bits(x))
        self.ins["b"].append(bits(np.concatenate([x[h:], x[:h]])))
        self.ins["c"].append(bits(np.concatenate([cos_h, cos_h])))
        self.ins["d"].append(bits(np.concatenate([sin_h, sin_h])))
        self._result(fo.apply_rope(x[None], cos_h[None], sin_h[None])[0], n if quant else 0)

    def quant(self, x, group, heads=False):
        self._cmd(VecOp.QUANT, len(x), group=group)
        self.ins["a"].append(bits(x))
        if heads:     # the KV-cache / query rule: one group per head
            q, s = fo.quantize_heads(x.reshape(-1, group))
            qsum = q.astype(np.int64).sum(axis=-1)
        else:
            q, s, qsum = quantize_activations(x[None], group)
        self.codes.append(np.asarray(q, np.int8).reshape(-1))
        self.scales.append(bits(s).reshape(-1))
        self.qsums.append(np.asarray(qsum, np.int64).reshape(-1))

    def bf16(self, row_bits):
        self._cmd(VecOp.BF16, len(row_bits))
        self.ins["a"].append(_bf16_row(row_bits, self.L))
        self.out.append(bits(fo.embedding(np.asarray(row_bits, np.uint16)[None], np.array([0]))[0]))

    # -- packing ----------------------------------------------------------------------------------
    def beats(self, unit: VectorUnit) -> dict[str, np.ndarray]:
        """Payload bytes per stream: cmd beats, and L uint32 lanes per operand beat."""
        layout = unit.cmd.payload.shape()          # packed here: the cocotb side's codec needs cocotb
        nbytes = -(-layout.size // 8)
        words = []
        for c in self.cmds:
            v = 0
            for k in ("op", "length", "c0", "c1", "group", "quant"):
                f = layout[k]
                v |= (int(c[k]) & ((1 << f.width) - 1)) << f.offset
            words.append(list(v.to_bytes(nbytes, "little")))
        out = {"cmd": np.array(words, np.uint8).reshape(len(self.cmds), nbytes)}
        for s in "abcd":
            w = np.concatenate(self.ins[s]).astype(U32) if self.ins[s] else np.zeros(0, U32)
            out[s] = np.ascontiguousarray(w).view(np.uint8).reshape(-1, 4 * self.L)
        return out

    def expected(self):
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
        return (cat(self.out, U32), cat(self.codes, np.int8), cat(self.scales, U32), cat(self.qsums, np.int64))


def _bf16_row(row_bits: np.ndarray, L: int) -> np.ndarray:
    """BF16's a beats: lane l of a beat holds element l in bits [16 l, 16 l + 16)."""
    r = np.asarray(row_bits, np.uint16).reshape(-1, L)
    packed = np.zeros((len(r), 2 * L), np.uint16)
    packed[:, :L] = r
    packed[:, L:] = 0xABCD        # junk in the ignored upper half
    return packed.view(U32).reshape(-1)


def realistic(rng, n, scale=1.0):
    return (rng.standard_normal(n) * scale).astype(F32)


def edge_values(rng, n):
    """Signed zeros, subnormals, tiny and huge normals, mixed in with ordinary values."""
    pool = np.array([0.0, -0.0, 1e-45, -1e-45, 1.2e-38, -3e-39, 1e-30, 3e38, -3e38, 1e20, 65504.0,
                     1.0, -1.0, 0.5, 2.5, -3.5], F32)
    x = realistic(rng, n, 4.0)
    idx = rng.choice(n, size=min(n, len(pool) * 2), replace=False)
    x[idx] = np.resize(pool, len(idx))
    return x


def quant_input(rng, n, group):
    """Activations with a different scale per group and every edge group."""
    ng = n // group
    scales = (10.0 ** rng.uniform(-3, 3, ng)).astype(F32)
    x = (rng.standard_normal((ng, group)) * scales[:, None]).astype(F32)
    specials = [
        np.zeros(group, F32),                                               # all zero -> s_a 0
        np.full(group, -0.0, F32),                                          # negative zeros
        np.resize(np.array([1e-38, -2e-38, 1e-45], F32), group),           # below AMAX_MIN: dead group
        np.resize(np.array([127.0, 0.5, -0.5, 1.5, -2.5, 3.5, 126.5, -126.5], F32), group),  # rint ties (inv = 1)
        np.resize(np.array([AMAX_MIN, -AMAX_MIN * F32(0.5), 1e-45], F32), group),  # amax = AMAX_MIN: live
        np.resize(np.array([3e38, -1e38, 1.0, -2.9e38], F32), group),       # huge
        np.resize(np.array([1e-44, 1e-45, -3e-45], F32), group),            # subnormal only: dead
    ]
    for k, s in enumerate(specials[:ng]):
        x[(k * 3 + 1) % ng] = s
    return x.reshape(-1)


@np.errstate(over="ignore")      # the edge cases overflow on purpose (x*x, gate*up to inf)
def make_program(lanes, preset, group, rng, full_intermediate=True) -> Program:
    cfg = PRESETS[preset]
    hidden, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    eps = cfg.rms_norm_eps
    ffn = inter if full_intermediate else 2 * hidden
    p = Program(lanes)
    table_row = rng.integers(0, 1 << 16, hidden).astype(np.uint16)
    table_row[:4] = [0x0000, 0x8000, 0x0001, 0x7F80]
    p.bf16(table_row)
    x = realistic(rng, hidden, 0.5)
    gamma = realistic(rng, hidden, 0.2) + F32(1.0)
    p.rms_norm(x, gamma, eps)
    p.rms_norm(np.zeros(hidden, F32), gamma, eps)                            # eps only
    p.rms_norm(realistic(rng, hidden, 1e-5), gamma, eps)                     # eps dominates
    p.rms_norm(edge_values(rng, hidden) * F32(1e-18), gamma, eps)            # subnormal squares
    cos_h, sin_h = fo.rope_half_tables(hd, cfg.rope_theta, rng.integers(0, 32768, 3))
    for k in range(3):                                                        # back to back
        p.rope(realistic(rng, hd, 2.0) if k != 1 else edge_values(rng, hd), cos_h[k], sin_h[k])
    p.quant(quant_input(rng, 3 * hd, hd), hd, heads=True)                   # three heads (KV / query)
    p.quant(quant_input(rng, hidden, group), group)
    p.quant(quant_input(rng, 2 * hidden, group), group)                     # two rows, same group: no gap
    p.add(realistic(rng, hidden, 3.0), realistic(rng, hidden, 0.5))
    p.add(edge_values(rng, hidden), edge_values(rng, hidden))
    gate = realistic(rng, ffn, 3.0)
    gate[:8] = [0.0, -0.0, 1e-45, -1e-40, 90.0, -90.0, 3e38, -3e38]
    p.silu_mul(gate, realistic(rng, ffn, 1.0))
    p.silu_mul(edge_values(rng, hidden), edge_values(rng, hidden))
    p.bf16(rng.integers(0, 1 << 16, hidden).astype(np.uint16))
    return p


TIMED_OPS = ("ADD", "SILU_MUL", "RMSNORM", "ROPE", "QUANT", "BF16", "RMSNORM+Q", "SILU_MUL+Q", "ROPE+Q")


def timed_program(lanes, op, n, hd, group, rng) -> Program:
    """One op, no edge cases: its stall-free cycle count."""
    p = Program(lanes)
    op, fused = op.removesuffix("+Q"), op.endswith("+Q")       # "+Q": with the quantizer fused (group)
    g = group if fused else 0
    if op == "ADD":
        p.add(realistic(rng, n), realistic(rng, n))
    elif op == "SILU_MUL":
        p.silu_mul(realistic(rng, n, 3.0), realistic(rng, n), quant=g)
    elif op == "RMSNORM":
        p.rms_norm(realistic(rng, n), realistic(rng, n) + F32(1), 1e-6, quant=g)
    elif op == "ROPE":
        cos_h, sin_h = fo.rope_half_tables(hd, 1e6, np.arange(4))
        for k in range(4):
            p.rope(realistic(rng, hd), cos_h[k], sin_h[k], quant=fused)
    elif op == "QUANT":
        p.quant(realistic(rng, n), group)
    else:
        p.bf16(rng.integers(0, 1 << 16, n).astype(np.uint16))
    return p


@np.errstate(over="ignore", under="ignore")
def fused_program(lanes, n, hd, group, rng, rows=2, eps=1e-6) -> Program:
    """The fused ops (RMSNORM, SILU_MUL, ROPE with QUANT) over `rows` token rows (one command per row,
    one per head for ROPE), interleaved with unfused ops and standalone QUANTs so that every switch
    (unfused -> fused and back, one group to another, QUANT -> fused) is crossed; dead groups (a zero
    row segment, tiny gates) and results in every magnitude range."""
    p = Program(lanes)
    gamma = realistic(rng, n, 0.2) + F32(1.0)
    other = 64 if group != 64 and 64 >= 2 * lanes and n % 64 == 0 else group
    p.add(realistic(rng, n), realistic(rng, n))                                  # unfused -> fused
    for r in range(rows):
        x = realistic(rng, n, 10.0 ** (r - 1))
        if r == 1:
            x[n - group:] = 0.0                                                  # a dead group
        p.rms_norm(x, gamma, eps, quant=group)
    p.rms_norm(realistic(rng, n), gamma, eps, quant=other)                       # another group
    p.rms_norm(realistic(rng, n), gamma, eps)                                    # fused -> unfused
    for r in range(rows):
        gate = realistic(rng, n, 3.0)
        gate[:group] = F32(1e-38) * realistic(rng, group)                        # silu -> below AMAX_MIN
        gate[-1] = F32(90.0)
        p.silu_mul(gate, realistic(rng, n, 10.0 ** (2 - 2 * r)), quant=group)
    p.silu_mul(realistic(rng, n, 3.0), realistic(rng, n))                        # fused -> unfused
    p.quant(quant_input(rng, n, group), group)                                   # QUANT -> fused
    p.silu_mul(realistic(rng, n, 3.0), realistic(rng, n), quant=group)
    cos_h, sin_h = fo.rope_half_tables(hd, 1e6, rng.integers(0, 32768, 2 * rows + 2))
    for k in range(2 * rows):                                                    # heads back to back
        x = realistic(rng, hd, 2.0) if k != 1 else np.zeros(hd, F32)
        p.rope(x, cos_h[k], sin_h[k], quant=True)
    p.rope(realistic(rng, hd), cos_h[-2], sin_h[-2])                             # fused -> unfused
    p.rope(realistic(rng, hd), cos_h[-1], sin_h[-1], quant=True)                 # unfused -> fused
    p.rms_norm(realistic(rng, n), gamma, eps, quant=group)                       # ROPE(g=hd) -> RMSNORM(g)
    p.silu_mul(realistic(rng, 2 * n, 3.0), realistic(rng, 2 * n), quant=group)   # the quantizer still busy
    p.rms_norm(realistic(rng, 2 * n), realistic(rng, 2 * n), eps, quant=group)   # with SILU_MUL's groups
    p.add(realistic(rng, n), realistic(rng, n))
    return p


# ---------------------------------------------------------------------------
# Amaranth's simulator (the default tier)
# ---------------------------------------------------------------------------

def run_pysim(unit: VectorUnit, prog: Program, p_in: float, p_out: float, seed: int, max_cycles: int = 20000):
    """The program through Amaranth's simulator with random valid gaps on every input stream
    (a valid beat is held until taken) and random ready on every output; returns what `out`,
    `codes`, `stats` delivered (uint32, int8, (scale bits, qsum)) and the cycles used."""
    from amaranth.sim import Simulator
    beats = prog.beats(unit)
    ins = {s: [int.from_bytes(bytes(row), "little") for row in beats[s]] for s in IN_STREAMS}
    out, codes, scales, _ = prog.expected()
    want = {"out": len(out) // unit.lanes, "codes": len(codes) // unit.lanes, "stats": len(scales)}
    got = {s: [] for s in OUT_STREAMS}
    rng = np.random.default_rng(seed)
    cycles = [0]

    async def bench(ctx):
        idx = {s: 0 for s in IN_STREAMS}
        valid = {s: 0 for s in IN_STREAMS}
        extra = 0
        for cyc in range(max_cycles):
            for s in IN_STREAMS:
                port = getattr(unit, s)
                if not valid[s] and idx[s] < len(ins[s]) and rng.random() < p_in:
                    valid[s] = 1
                    ctx.set(port.payload.as_value() if s == "cmd" else port.payload.as_value(), ins[s][idx[s]])
                ctx.set(port.valid, valid[s])
            for s in OUT_STREAMS:
                ctx.set(getattr(unit, s).ready, int(rng.random() < p_out))
            for s in IN_STREAMS:
                if valid[s] and ctx.get(getattr(unit, s).ready):
                    idx[s] += 1
                    valid[s] = 0
            for s in OUT_STREAMS:
                port = getattr(unit, s)
                if ctx.get(port.valid) and ctx.get(port.ready):
                    got[s].append(ctx.get(port.payload.as_value() if s == "stats" else port.payload))
            await ctx.tick()
            if all(len(got[s]) >= want[s] for s in OUT_STREAMS) and all(
                    idx[s] == len(ins[s]) for s in IN_STREAMS):
                extra += 1
                if extra == 40:          # a few more cycles: nothing more may come out
                    break
            cycles[0] = cyc + 1

    sim = Simulator(unit)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    L = unit.lanes
    got_out = np.array([(v >> (32 * l)) & 0xFFFFFFFF for v in got["out"] for l in range(L)], U32)
    got_codes = np.array([(v >> (8 * l)) & 0xFF for v in got["codes"] for l in range(L)], np.uint8).view(np.int8)
    st = [(v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF) for v in got["stats"]]
    got_scale = np.array([a for a, _ in st], U32)
    got_qsum = np.array([b for _, b in st], np.uint32).view(np.int32).astype(np.int64)
    return got_out, got_codes, got_scale, got_qsum, cycles[0]


def check_results(prog: Program, got, name: str = "") -> None:
    out, codes, scales, qsums = prog.expected()
    got_out, got_codes, got_scale, got_qsum = got[:4]
    assert got_out.shape == out.shape and np.array_equal(got_out, out), \
        f"{name}: out {got_out.shape} vs {out.shape}, first differences at {np.flatnonzero(got_out[:len(out)] != out[:len(got_out)])[:8]}"
    assert got_codes.shape == codes.shape and np.array_equal(got_codes, codes), \
        f"{name}: codes {got_codes.shape} vs {codes.shape}, differ at {np.flatnonzero(got_codes[:len(codes)] != codes[:len(got_codes)])[:8]}"
    assert got_scale.shape == scales.shape and np.array_equal(got_scale, scales) and np.array_equal(got_qsum, qsums), \
        f"{name}: stats {got_scale.shape} vs {scales.shape}: got {got_scale[:8]} / {got_qsum[:8]}, " \
        f"expected {scales[:8]} / {qsums[:8]}"


@pytest.mark.parametrize("lanes, n, hd, group, p_in, p_out", [
    (4, 128, 64, 64, 0.7, 0.6),
    (2, 128, 32, 32, 0.9, 0.4),
    (8, 256, 128, 128, 0.6, 0.9),
    pytest.param(1, 64, 32, 32, 1.0, 1.0, marks=pytest.mark.slow),
], ids=["L4-g64", "L2-g32", "L8-g128", "L1-g32-nostall"])
def test_vector_unit_fused_pysim(lanes, n, hd, group, p_in, p_out):
    """RMSNORM / SILU_MUL / ROPE fused with QUANT in Amaranth's simulator, mixed with unfused ops
    and standalone QUANTs, bit for bit against fabric_ops + quantize_activations."""
    unit = VectorUnit(lanes, max_length=2 * n)
    rng = np.random.default_rng(100 + lanes)
    prog = fused_program(lanes, n, hd, group, rng)
    check_results(prog, run_pysim(unit, prog, p_in, p_out, seed=lanes), f"L{lanes}")


# ---------------------------------------------------------------------------
# Verilator runs
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def build_unit(lanes: int):
    """The unit and its Verilog, once per lane count and process (elaborating it takes seconds)."""
    from amaranth.back import verilog

    from sim.runner import write_verilog
    unit = VectorUnit(lanes)
    name = f"vector_l{lanes}"
    src = write_verilog(verilog.convert(unit, name=name), name)
    return unit, src, name


def _scenario_spec(unit, name, prog, p_in, p_out, rng):
    beats = prog.beats(unit)
    out, codes, scales, _ = prog.expected()
    spec = {}
    for s in IN_STREAMS:
        spec[f"{name}__{s}"] = beats[s]
        spec[f"{name}__p_{s}"] = p_in if s != "cmd" else max(p_in, 0.5)
    n_out = {"out": len(out) // unit.lanes, "codes": len(codes) // unit.lanes, "stats": len(scales)}
    for s in OUT_STREAMS:
        spec[f"{name}__p_{s}"] = p_out
        spec[f"{name}__n_{s}"] = n_out[s]
    total = sum(len(beats[s]) for s in "abcd") + sum(n_out.values())
    spec[f"{name}__max_cycles"] = int(total / min(p_in, p_out) * 4) + 400 * len(prog.cmds) + 1000
    return spec


def _check_scenario(unit, res_dir: Path, name: str, prog: Program):
    from sim.tb_array import unpack_payloads
    out, codes, scales, qsums = prog.expected()
    got = {s: np.load(res_dir / f"{name}_{s}.npz") for s in OUT_STREAMS}
    got_out = got["out"]["payload"].view(U32).reshape(-1)
    got_codes = got["codes"]["payload"].view(np.int8).reshape(-1)
    st = unpack_payloads(stats_layout(), got["stats"]["payload"])
    got_scale, got_qsum = st["scale"].reshape(-1).astype(U32), st["qsum"].reshape(-1)
    # Attribute a mismatch to its command for the message.
    where = []
    for k, op in enumerate(prog.ops):
        where += [f"cmd {k} {op}"] * prog.out_len[k]
    bad = np.flatnonzero(got_out != out)
    assert got_out.shape == out.shape and not len(bad), (
        f"{name}: {len(bad)} of {len(out)} out values differ; first at {bad[:1]} ({where[bad[0]] if len(bad) else ''}): "
        f"got {f32(got_out[bad[:4]])} expected {f32(out[bad[:4]])}")
    bad = np.flatnonzero(got_codes != codes)
    assert got_codes.shape == codes.shape and not len(bad), \
        f"{name}: codes differ at {bad[:8]}: got {got_codes[bad[:8]]} expected {codes[bad[:8]]}"
    bad = np.flatnonzero((got_scale != scales) | (got_qsum != qsums))
    assert got_scale.shape == scales.shape and not len(bad), \
        f"{name}: group stats differ at {bad[:8]}: got {f32(got_scale[bad[:4]])} / {got_qsum[bad[:4]]} " \
        f"expected {f32(scales[bad[:4]])} / {qsums[bad[:4]]}"


def run_programs(unit, src, name, scenarios, tmp_path, seed):
    """scenarios: {name: (program, p_in, p_out)}; runs them in one simulation and checks every one."""
    from sim.runner import run_cocotb
    rng = np.random.default_rng(seed)
    spec = {"seed": seed, "scenarios": np.array(list(scenarios)),
            "out_bytes": 4 * unit.lanes, "codes_bytes": unit.lanes, "stats_bytes": 8}
    for sname, (prog, p_in, p_out) in scenarios.items():
        spec.update(_scenario_spec(unit, sname, prog, p_in, p_out, rng))
    vec = tmp_path / "vectors.npz"
    res_dir = tmp_path / "results"
    res_dir.mkdir()
    np.savez(vec, **spec)
    run_cocotb(sources=[src], toplevel=name, test_module="tb_vector", build_name=name, test_dir=SIM_DIR,
               fast_compile=True, extra_env={"VECTOR_VECTORS": str(vec), "VECTOR_RESULTS": str(res_dir)})
    for sname, (prog, _, _) in scenarios.items():
        _check_scenario(unit, res_dir, sname, prog)
    return res_dir


# (lanes, presets with their group size, full intermediate size)
POINTS = [
    # under slow: the default run has the unit at 4 lanes inside the vector engine's test
    # (tests/test_fabric_vector.py: every op bit-exact through DDR, random stalls)
    pytest.param(4, [("qwen2.5-0.5b", 64)], False, id="L4-0.5b", marks=pytest.mark.slow),
    pytest.param(1, [("tiny", 128)], True, id="L1-tiny", marks=pytest.mark.slow),
    pytest.param(8, [("tiny", 32)], False, id="L8-tiny", marks=pytest.mark.slow),
    pytest.param(8, [("qwen2.5-1.5b", 128), ("tiny", 64)], False, id="L8-1.5b-tiny", marks=pytest.mark.slow),
    pytest.param(4, [("tiny", 32), ("qwen2.5-1.5b", 32)], True, id="L4-tiny-1.5b-full", marks=pytest.mark.slow),
    pytest.param(1, [("qwen2.5-0.5b", 64)], True, id="L1-0.5b-full", marks=pytest.mark.slow),
    pytest.param(8, [("qwen2.5-0.5b", 128), ("qwen2.5-1.5b", 64)], True, id="L8-full", marks=pytest.mark.slow),
    pytest.param(2, [("tiny", 64), ("qwen2.5-0.5b", 32)], True, id="L2-full", marks=pytest.mark.slow),
]


@pytest.mark.sim
@pytest.mark.parametrize("lanes, presets, full", POINTS)
def test_vector_unit_verilator(lanes, presets, full, tmp_path):
    unit, src, name = build_unit(lanes)
    seed = 4242 + lanes
    rng = np.random.default_rng(seed)
    scenarios = {}
    for k, (preset, group) in enumerate(presets):
        p_in, p_out = [(0.7, 0.6), (0.9, 0.4), (0.5, 0.9)][k % 3]
        sname = f"{preset.replace('.', '_').replace('-', '_')}_g{group}"
        scenarios[sname] = (make_program(lanes, preset, group, rng, full_intermediate=full), p_in, p_out)
        cfg = PRESETS[preset]            # the fused ops at the preset's hidden size and head_dim
        scenarios[f"{sname}_fused"] = (fused_program(lanes, cfg.hidden_size, cfg.head_dim, group, rng),
                                      p_out, p_in)
    run_programs(unit, src, name, scenarios, tmp_path, seed)


@pytest.mark.sim
@pytest.mark.slow     # the L4 build is slow-tier (see POINTS); the engine's cycles are in test_fabric_vector
def test_vector_unit_cycles(tmp_path):
    """Stall-free cycle counts per op at L = 4 (0.5b shapes): throughput and latency."""
    lanes = 4
    unit, src, name = build_unit(lanes)
    rng = np.random.default_rng(7)
    n, hd, group = 896, 64, 64
    scenarios = {op.lower(): (timed_program(lanes, op, n, hd, group, rng), 1.0, 1.0) for op in TIMED_OPS}
    res_dir = run_programs(unit, src, name, scenarios, tmp_path, 7)
    report = {}
    for op in TIMED_OPS:
        sink = "codes" if op == "QUANT" or op.endswith("+Q") else "out"
        r = np.load(res_dir / f"{op.lower()}_{sink}.npz")
        elements = 4 * hd if op.startswith("ROPE") else n
        span = int(r["cycles"][-1] - r["first_input"] + 1)
        report[op] = (span, elements)
        in_beats = elements // lanes * (2 if op.startswith("RMSNORM") else 1)
        print(f"{op}: {elements} elements, {span} cycles first input to last output, "
              f"{span / elements:.3f} cycles per element, {span - in_beats} over the input beats")
        # Throughput: one beat per cycle plus a bounded fixed cost per command.
        assert span <= in_beats + 4 * 100, f"{op}: {span} cycles for {in_beats} input beats"
    for op in ("RMSNORM", "SILU_MUL", "ROPE"):
        # Fused: the quantizer follows the producer at full rate, so it costs about QUANT's latency
        # (the last group's divide and read-back), not a second pass over the elements.
        fused, alone = report[f"{op}+Q"][0], report[op][0]
        print(f"{op}+Q: {fused} cycles; {op} {alone} then QUANT {report['QUANT'][0]} unfused")
        assert fused <= alone + unit.op_latency(VecOp.QUANT) + 40, (op, fused, alone)
