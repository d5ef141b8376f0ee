"""rtl/attention.py (AttentionUnit, ScaledIntToFp32) against sw.contract.fabric_ops, bit for bit.

The unit's outputs for every command must equal
``attention_values(*softmax2(attention_scores(q8, s_q, k8, s_k, D), visible), v8, s_v)``
(the golden decoder's path, sw/fabric.py) as uint32 patterns. Commands mix realistic
scales with extreme ones (scores 2^±60 apart, so exp2 flushes; subnormal w and outputs;
all-zero rows with scale 0; equal scores; n = 1 and n across the 32 fixed_sum partials),
at head_dim 32/64/128 with their GQA ratios (2, 7, 6), several MAC counts and 1 or 2 exp lanes
(pass 2 on exp_lanes heads per cycle), with random gaps on every input stream and random
back-pressure on the output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from amaranth.sim import Simulator

from rtl.attention import AttentionGeometry, AttentionUnit, ScaledIntToFp32, accumulator_bits
from sw.contract import fabric_ops as fo
from sw.contract.errors import ConfigError

F32 = np.float32
SIM_DIR = Path(__file__).resolve().parent.parent / "sim"


def _bits(x):
    return np.ascontiguousarray(x, F32).view(np.uint32)


# ---- commands and the golden outputs ---------------------------------------------------------
def _codes(rng, shape, zero_rows=0.0):
    x = rng.integers(-127, 128, shape).astype(np.int8)
    if zero_rows:
        x[rng.random(shape[0]) < zero_rows] = 0
    return x


def _pow2(rng, lo, hi, n):
    return (np.exp2(rng.uniform(lo, hi, n)) * rng.uniform(1, 2, n)).astype(F32)


def make_command(rng, head_dim: int, group: int, n: int, kind: str) -> dict:
    D, G = head_dim, group
    q8, k8, v8 = _codes(rng, (G, D)), _codes(rng, (n, D)), _codes(rng, (n, D))
    if kind == "realistic":
        # quantized Gaussian vectors (each has a +-127) with scales like a model's
        q8, s_q = fo.quantize_heads(rng.standard_normal((G, D)).astype(F32) * 3)
        k8, s_k = fo.quantize_heads(rng.standard_normal((n, D)).astype(F32) * 3)
        v8, s_v = fo.quantize_heads(rng.standard_normal((n, D)).astype(F32))
    elif kind == "extreme":
        # scores up to 2^60 apart (exp2 flushes to +0.0), value scales from subnormal w to 2^60,
        # all-zero rows with scale +0.0
        s_q, s_k = _pow2(rng, -30, 30, G), _pow2(rng, -30, 30, n)
        s_v = _pow2(rng, -140, 60, n)
        zk, zv = rng.random(n) < 0.1, rng.random(n) < 0.1
        k8[zk], s_k[zk], v8[zv], s_v[zv] = 0, 0.0, 0, 0.0
    elif kind == "subnormal":
        # every w subnormal (B = 1): outputs near or below 2^-126
        s_q, s_k = _pow2(rng, -8, -4, G), _pow2(rng, -8, -4, n)
        s_v = _pow2(rng, -149, -128, n)
    elif kind == "equal":
        # equal scores (q . k the same for every row): a uniform softmax, sums of equal e
        k8[:] = k8[0]
        s_q, s_k = _pow2(rng, -6, -3, G), np.full(n, F32(0.01))
        s_v = _pow2(rng, -12, -4, n)
    else:
        raise ValueError(kind)
    return dict(n=n, q8=q8, s_q=np.asarray(s_q, F32), k8=k8, s_k=np.asarray(s_k, F32), v8=v8,
                s_v=np.asarray(s_v, F32), kind=kind)


def golden(cmd: dict, head_dim: int) -> np.ndarray:
    scores = fo.attention_scores(cmd["q8"], cmd["s_q"], cmd["k8"], cmd["s_k"], head_dim)
    visible = np.ones(scores.shape, bool)
    e, r = fo.softmax2(scores, visible)
    return fo.attention_values(e, r, cmd["v8"], cmd["s_v"], visible)


def _spec(unit: AttentionUnit, cmds: list[dict], seed: int, p_valid: float, p_ready: float) -> dict:
    total = sum(c["n"] for c in cmds)
    cycles = sum(c["n"] * unit.cycles_per_position + 2 * unit.group * unit.head_dim + 600 for c in cmds)
    return dict(group=unit.group, head_dim=unit.head_dim, n_bits=unit.max_positions.bit_length(),
                n=np.array([c["n"] for c in cmds]), s_q=np.stack([_bits(c["s_q"]) for c in cmds]),
                q8=np.concatenate([c["q8"].ravel() for c in cmds]),
                k8=np.concatenate([c["k8"].ravel() for c in cmds]) if total else np.zeros(0, np.int8),
                v8=np.concatenate([c["v8"].ravel() for c in cmds]),
                s_k=np.concatenate([_bits(c["s_k"]) for c in cmds]),
                s_v=np.concatenate([_bits(c["s_v"]) for c in cmds]),
                seed=seed, p_ready=p_ready, max_cycles=int(cycles / min(p_valid, p_ready) ** 2) + 2000,
                **{f"p_valid_{k}": p_valid for k in ("cmd", "q", "k", "k_scale", "v_scale", "v")})


def run_unit(point: dict, cmds: list[dict], tmp_path: Path, seed: int, p_valid=0.6, p_ready=0.6):
    """Run `cmds` through a Verilator build of the unit; returns (unit, results npz)."""
    from amaranth.back import verilog

    from sim.runner import run_cocotb, write_verilog

    unit = AttentionUnit(**point)
    name = "attn_d{head_dim}_g{group}_m{macs}_n{max_positions}".format(**point)
    if point.get("exp_lanes", 1) != 1:
        name += f"_e{point['exp_lanes']}"
    src = write_verilog(verilog.convert(unit, name=name), name)
    spec, res = tmp_path / "spec.npz", tmp_path / "res.npz"
    np.savez(spec, **_spec(unit, cmds, seed, p_valid, p_ready))
    # the build is keyed by the Verilog's hash (checkouts with different RTL share the cache);
    # -O0: the design is wide and the runs are short
    run_cocotb(sources=[src], toplevel=name, test_module="tb_attention", build_name=src.parent.name,
               test_dir=SIM_DIR, fast_compile=True, extra_env={"ATTN_SPEC": str(spec), "ATTN_RESULTS": str(res)})
    return unit, np.load(res)


def check_outputs(cmds, res, head_dim):
    for i, c in enumerate(cmds):
        want = _bits(golden(c, head_dim)).ravel()
        got = res["out"][i]
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (f"command {i} ({c['kind']}, n={c['n']}): {bad.size} of {want.size} outputs "
                               f"differ, first at {bad[:4]}: got {got[bad[:4]]}, want {want[bad[:4]]}")


def _mix(rng, head_dim, group, ns, kinds):
    return [make_command(rng, head_dim, group, n, kinds[i % len(kinds)]) for i, n in enumerate(ns)]


KINDS = ["realistic", "extreme", "subnormal", "equal"]
# (point, positions of the commands). Default: tiny's shape (2 chunks per head, a short build);
# exp_lanes = 2 at head_dim 32 / group 2 / 64 MACs (2 heads per step: one pass-2 issue per position).
# slow: qwen2.5-0.5b's shape (2 heads per step, one phantom), 1.5b's, other MAC counts, long contexts.
POINTS = [
    (dict(head_dim=32, group=2, macs=16, max_positions=64), [1, 2, 33, 64, 31, 32, 5, 17]),
    (dict(head_dim=32, group=2, macs=64, max_positions=128, exp_lanes=2), [1, 2, 33, 128, 31, 32, 5, 17]),
]
SLOW_POINTS = [
    (dict(head_dim=64, group=7, macs=128, max_positions=512), [1, 40, 300, 33, 2, 64]),
    (dict(head_dim=128, group=6, macs=64, max_positions=256), [3, 200, 1, 64, 256]),
    (dict(head_dim=32, group=2, macs=64, max_positions=128), [1, 128, 77, 2, 33, 100]),
    (dict(head_dim=64, group=7, macs=64, max_positions=4096), [1, 700, 2048, 65]),
    (dict(head_dim=128, group=6, macs=128, max_positions=1024), [1, 1024, 500, 32]),
    (dict(head_dim=64, group=7, macs=128, max_positions=512, exp_lanes=2), [1, 40, 300, 33, 2, 64]),
    (dict(head_dim=128, group=6, macs=256, max_positions=256, exp_lanes=2), [3, 200, 1, 64, 256]),
]


@pytest.mark.sim
@pytest.mark.slow     # the default run has this unit at tiny's shape inside tests/test_fabric_attend.py
@pytest.mark.parametrize("point, ns", POINTS, ids=lambda p: str(p))
def test_attention_unit_bit_exact(point, ns, tmp_path):
    rng = np.random.default_rng(point["head_dim"] * 100 + point["macs"])
    cmds = _mix(rng, point["head_dim"], point["group"], ns, KINDS)
    _, res = run_unit(point, cmds, tmp_path, seed=point["macs"] + point["group"])
    check_outputs(cmds, res, point["head_dim"])


@pytest.mark.sim
@pytest.mark.slow
@pytest.mark.parametrize("point, ns", SLOW_POINTS, ids=lambda p: str(p))
def test_attention_unit_bit_exact_slow(point, ns, tmp_path):
    rng = np.random.default_rng(point["head_dim"] * 100 + point["macs"] + 1)
    cmds = _mix(rng, point["head_dim"], point["group"], ns, KINDS[::-1])
    _, res = run_unit(point, cmds, tmp_path, seed=point["macs"] + 7)
    check_outputs(cmds, res, point["head_dim"])


@pytest.mark.sim
@pytest.mark.parametrize("point, ns, per_position, overhead", [
    # cycles_per_position = max(P, D/16) (pass 1) + max(P, D/16, ceil(G/E)) (pass 2: exp2 and P.V)
    # tiny: P = ceil(2/1) * 2 chunks = 4 steps, max(4, 32/16) + max(4, 2) = 8 (204 besides, measured)
    pytest.param(dict(head_dim=32, group=2, macs=16, max_positions=64), [40, 64, 40], 8, None,
                 marks=pytest.mark.slow),
    # qwen2.5-0.5b: P = ceil(7/2) = 4, max(4, 64/16) + max(4, 7) = 11; 487 cycles besides measured
    # (the one exp lane's fixed_sum tree and reciprocals for 7 heads after pass 2)
    pytest.param(dict(head_dim=64, group=7, macs=128, max_positions=512), [100, 300, 100], 11, 500,
                 marks=pytest.mark.slow),
    # exp_lanes = 2: max(1, 32/16) + max(1, 2, ceil(2/2)) = 4
    (dict(head_dim=32, group=2, macs=64, max_positions=128, exp_lanes=2), [80, 128, 80], 4, None),
    # qwen2.5-0.5b with exp_lanes = 2: max(4, 64/16) + max(4, ceil(7/2)) = 8; 394 cycles besides
    # measured (451 with the fp32-op Exp2 and Reciprocal, latencies 33 and 50 instead of 14 and 12)
    pytest.param(dict(head_dim=64, group=7, macs=128, max_positions=512, exp_lanes=2), [100, 300, 100], 8, 420,
                 marks=pytest.mark.slow),
    # qwen2.5-0.5b at 256 MACs (4 heads per step), exp_lanes = 4: max(2, 64/16) + max(4, ceil(7/4)) = 8;
    # 326 cycles besides measured
    pytest.param(dict(head_dim=64, group=7, macs=256, max_positions=512, exp_lanes=4), [100, 300, 100], 8, 350,
                 marks=pytest.mark.slow),
], ids=["tiny", "0.5b", "d32g2m64e2", "0.5b-e2", "0.5b-m256-e4"])
def test_attention_unit_cycles_per_position(point, ns, per_position, overhead, tmp_path):
    """Without stalls the command time grows by cycles_per_position per visible position."""
    hd, g = point["head_dim"], point["group"]
    rng = np.random.default_rng(5)
    cmds = _mix(rng, hd, g, ns, ["realistic"])
    unit, res = run_unit(point, cmds, tmp_path, seed=3, p_valid=1.0, p_ready=1.0)
    check_outputs(cmds, res, hd)
    took = res["done_cycles"] - res["cmd_cycles"]
    slope = (took[1] - took[0]) / (ns[1] - ns[0])
    print(f"cycles per command {took} at n = {ns}: {slope} per position, "
          f"overhead {took[0] - ns[0] * unit.cycles_per_position}")
    assert slope == unit.cycles_per_position == per_position, (took, slope)
    assert took[0] == took[2]
    if overhead is not None:
        # the overhead: q load, drains, fixed_sum's tree and the reciprocals, outputs
        assert took[0] - ns[0] * unit.cycles_per_position <= overhead, took


# ---- no simulator needed -----------------------------------------------------------------------
def test_geometry_and_refusals():
    u = AttentionGeometry(64, 7, 64, 4096)
    assert (u.heads_per_step, u.lanes_per_head, u.chunks, u.steps, u.acc_bits) == (1, 64, 1, 7, 44)
    assert u.cycles_per_position == 7 + 7
    u = AttentionGeometry(64, 7, 128, 4096)
    assert (u.heads_per_step, u.steps, u.cycles_per_position) == (2, 4, 4 + 7)
    u = AttentionGeometry(32, 2, 16, 64)
    assert (u.heads_per_step, u.chunks, u.steps, u.cycles_per_position) == (1, 2, 4, 4 + 4)
    u = AttentionGeometry(64, 7, 128, 4096, exp_lanes=2)
    assert (u.exp_lanes, u.exp_issues, u.cycles_per_position) == (2, 4, 4 + 4)
    u = AttentionGeometry(128, 6, 256, 4096, exp_lanes=2)
    assert (u.heads_per_step, u.steps, u.exp_issues, u.cycles_per_position) == (2, 3, 3, 8 + 8)
    assert AttentionGeometry(16, 5, 64, 64, exp_lanes=4).cycles_per_position == 2 + 2
    assert AttentionGeometry(128, 6, 64, 32768).acc_bits == 47 == accumulator_bits(32768)
    assert accumulator_bits(fo.PV_MAX_POSITIONS) == 52
    for bad in [dict(head_dim=48, group=2, macs=16, max_positions=8),
                dict(head_dim=64, group=0, macs=64, max_positions=8),
                dict(head_dim=64, group=2, macs=24, max_positions=8),
                dict(head_dim=64, group=2, macs=256, max_positions=8),
                dict(head_dim=64, group=2, macs=64, max_positions=0),
                dict(head_dim=64, group=2, macs=64, max_positions=fo.PV_MAX_POSITIONS + 1),
                dict(head_dim=64, group=2, macs=64, max_positions=8, exp_lanes=2),     # H = 1
                dict(head_dim=64, group=7, macs=128, max_positions=8, exp_lanes=4),    # H = 2
                dict(head_dim=16, group=7, macs=64, max_positions=8, exp_lanes=3),     # not a divisor
                dict(head_dim=64, group=2, macs=64, max_positions=8, exp_lanes=0)]:
        with pytest.raises(ConfigError):
            AttentionUnit(**bad)
    with pytest.raises(ConfigError):
        ScaledIntToFp32(20)


def _scaled_golden(a: int, e: int) -> int:
    with np.errstate(over="ignore"):
        return int(np.float32(np.ldexp(np.float64(a), e - 150)).view(np.uint32))


def test_scaled_int_to_fp32_hand_vectors():
    """acc * 2^(B - 150) rounded once: zero, exact subnormals, the subnormal/normal edge, ties,
    carries into the exponent, overflow to inf, negative values."""
    width = 44
    top = (1 << (width - 1)) - 1
    cases = [(0, 1), (0, 254), (1, 1), (-1, 1), (3, 5), ((1 << 23) - 1, 1), (1 << 23, 1), (1 << 22, 2),
             ((1 << 24) + 1, 127), ((1 << 24) + 3, 127), ((1 << 25) - 1, 127), (-((1 << 24) + 1), 140),
             (top, 254), (-top, 254), (top, 1), (-top, 100), (12345678901, 60), ((1 << 24) - 1, 230),
             ((1 << 24) - 1, 231), (5, 127), (0x5555_5555_555, 90), (-7, 2)]
    unit = ScaledIntToFp32(width)
    out = []

    async def bench(ctx):
        for a, e in cases:
            ctx.set(unit.i_valid, 1)
            ctx.set(unit.a, a)
            ctx.set(unit.e, e)
            await ctx.tick()
            if ctx.get(unit.o_valid):
                out.append(ctx.get(unit.o))
        ctx.set(unit.i_valid, 0)
        for _ in range(unit.latency):
            await ctx.tick()
            if ctx.get(unit.o_valid):
                out.append(ctx.get(unit.o))

    sim = Simulator(unit)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    want = [_scaled_golden(a, e) for a, e in cases]
    assert out == want, [(c, hex(g), hex(w)) for c, g, w in zip(cases, out, want) if g != w]


# ---- Amaranth's simulator: a small unit, no Verilator needed -----------------------------------
def _beats128(codes) -> list[int]:
    b = np.ascontiguousarray(codes, np.int8).view(np.uint8).reshape(-1, 16)
    return [int.from_bytes(row.tobytes(), "little") for row in b]


def run_pysim(point: dict, cmds: list[dict], vcd: str | None = None) -> np.ndarray:
    """The commands through Amaranth's simulator, each stream with a fixed gap pattern."""
    unit = AttentionUnit(**point)
    G, D, nbits = point["group"], point["head_dim"], point["max_positions"].bit_length()
    beats = {
        "cmd": [c["n"] | sum(int(s) << (nbits + 32 * g) for g, s in enumerate(_bits(c["s_q"]))) for c in cmds],
        "q": sum((_beats128(c["q8"]) for c in cmds), []),
        "k": sum((_beats128(c["k8"]) for c in cmds), []),
        "k_scale": [int(x) for c in cmds for x in _bits(c["s_k"])],
        "v_scale": [int(x) for c in cmds for x in _bits(c["s_v"])],
        "v": sum((_beats128(c["v8"]) for c in cmds), []),
    }
    out = []
    total = len(cmds) * G * D

    def source(name, gap):
        async def proc(ctx):
            port = getattr(unit, name)
            for i, b in enumerate(beats[name]):
                for _ in range(gap if i % 3 == 1 else 0):
                    await ctx.tick()
                ctx.set(port.valid, 1)
                ctx.set(port.payload, b) if name != "cmd" else ctx.set(port.payload.as_value(), b)
                await ctx.tick().until(port.ready)
                ctx.set(port.valid, 0)
        return proc

    async def sink(ctx):
        i = 0
        while len(out) < total:
            ctx.set(unit.out.ready, i % 4 != 2)
            _, _, payload, valid, ready = await ctx.tick().sample(unit.out.payload, unit.out.valid, unit.out.ready)
            if valid and ready:
                out.extend((payload >> (32 * w)) & 0xFFFFFFFF for w in range(4))
            i += 1

    sim = Simulator(unit)
    sim.add_clock(1e-8)
    for k, gap in zip(beats, (0, 1, 2, 1, 3, 1)):
        sim.add_testbench(source(k, gap), background=True)
    sim.add_testbench(sink)
    if vcd:
        with sim.write_vcd(vcd):
            sim.run()
    else:
        sim.run()
    return np.array(out, np.uint32).reshape(len(cmds), G * D)


@pytest.mark.parametrize("point, ns", [
    (dict(head_dim=32, group=2, macs=16, max_positions=40), [1, 35, 6, 32]),   # tiny's shape, 2 chunks per head
    (dict(head_dim=16, group=3, macs=32, max_positions=40), [1, 35, 6, 33]),   # 2 heads per step, a phantom
    # 2 exp lanes: a phantom lane in the last issue
    (dict(head_dim=16, group=3, macs=32, max_positions=40, exp_lanes=2), [1, 35, 6, 33]),
    # 4 heads per step, 2 exp lanes (2 issues per head block), 2 partial rows per bank
    (dict(head_dim=16, group=7, macs=64, max_positions=40, exp_lanes=2), [1, 35, 6, 33]),
], ids=["d32g2m16", "d16g3m32", "d16g3m32e2", "d16g7m64e2"])
def test_attention_unit_pysim(point, ns):
    """Small units in Amaranth's simulator (no Verilator): every command kind, n across the
    32 fixed_sum partials, fixed input gaps and output back-pressure."""
    D, G = point["head_dim"], point["group"]
    rng = np.random.default_rng(21 + D)
    cmds = _mix(rng, D, G, ns, KINDS)
    got = run_pysim(point, cmds)
    for i, c in enumerate(cmds):
        want = _bits(golden(c, D)).ravel()
        assert np.array_equal(got[i], want), (i, c["kind"], np.flatnonzero(got[i] != want))
