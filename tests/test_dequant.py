"""DequantUnit against sw.contract.numerics.dequant_accumulate, bit for bit, on Verilator.

Each parameter point builds once and runs two cocotb scenarios in one
simulation: many row tiles with random stalls on all five streams (values from
typical to extreme: full-scale acc, zero points 0 and 15, qsum extremes,
subnormal and overflowing scales, bias present or absent, -0.0 bias), and a
stall-free stream that pins down cycles_per_group and the fill latency.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import Fragment

from rtl.dequant import DequantUnit
from sw.contract.errors import ConfigError
from sw.contract.numerics import dequant_accumulate

F32 = np.float32
U32 = np.uint32
SIM_DIR = Path(__file__).resolve().parent.parent / "sim"


def widths_for_group(group: int) -> tuple[int, int]:
    """(acc_width, qsum_width) covering INT4 and INT8-per-channel weights for group size G."""
    acc_width = (group * 127 * 127).bit_length() + 1
    qsum_width = (group * 127).bit_length() + 1
    return acc_width, qsum_width


# ---------------------------------------------------------------------------
# Parameter validation (no simulator)
# ---------------------------------------------------------------------------

def _used(unit):
    Fragment.get(unit, None)    # elaborates, which also keeps Amaranth from warning about unused units
    return unit


def test_parameters_and_properties():
    aw, qw = widths_for_group(128)
    assert (aw, qw) == (22, 15)
    unit = _used(DequantUnit(32, 1, aw, qw))
    assert unit.lanes == 1 and unit.items_per_lane == 32 and unit.cycles_per_group == 32
    assert unit.latency == unit.items_per_lane + unit.pipeline_latency == 46
    assert _used(DequantUnit(32, 2, aw, qw, group_cycles=16)).lanes == 4
    assert _used(DequantUnit(4, 1, aw, qw, lanes=4)).cycles_per_group == unit.loop_latency == 5
    assert DequantUnit.lanes_for(32, 1, 128) == 1
    assert _used(DequantUnit(8, 2, aw, qw)).partials_layout.size == 16 * aw + 2
    assert unit.beat_bits is None and unit.out_beats == 1 and unit.out_layout.size == 32 * 32
    beats = _used(DequantUnit(8, 2, aw, qw, lanes=2, beat_bits=128))
    assert beats.out_beats == 4 and beats.out_layout.size == 128 and beats.latency == _used(
        DequantUnit(8, 2, aw, qw, lanes=2)).latency


@pytest.mark.parametrize("kwargs, match", [
    (dict(rows=4, tokens=1, acc_width=22, qsum_width=15, lanes=3), "does not divide"),
    (dict(rows=4, tokens=1, acc_width=25, qsum_width=15), "2\\^24"),
    (dict(rows=4, tokens=1, acc_width=22, qsum_width=22), "2\\^24"),
    (dict(rows=0, tokens=1, acc_width=22, qsum_width=15), "rows"),
    (dict(rows=4, tokens=1, acc_width=1, qsum_width=15), "at least 2"),
    (dict(rows=4, tokens=1, acc_width=22, qsum_width=15, add_latency=99), "latency"),
    (dict(rows=4, tokens=1, acc_width=22, qsum_width=15, group_cycles=0), "group_cycles"),
    (dict(rows=4, tokens=1, acc_width=22, qsum_width=15, beat_bits=100), "multiple of 32"),
    (dict(rows=4, tokens=1, acc_width=22, qsum_width=15, beat_bits=96), "multiple of 32"),
    (dict(rows=4, tokens=3, acc_width=22, qsum_width=15, lanes=3, beat_bits=128), "one must divide"),
])
def test_impossible_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DequantUnit(**kwargs)


# ---------------------------------------------------------------------------
# Scenario generation and the golden model
# ---------------------------------------------------------------------------

KINDS = ("typical", "extreme", "tiny", "huge", "bits", "zero_scale")


def _f16_bits(x):
    return np.asarray(x, dtype=np.float16).view(np.uint16)


def _f32_bits(x):
    return np.asarray(x, dtype=F32).view(U32)


def _finite_f32_bits(rng, shape):
    b = rng.integers(0, 1 << 32, shape, dtype=np.uint64).astype(U32)
    return np.where((b & 0x7F800000) == 0x7F800000, b & 0xBFFFFFFF, b).astype(U32)


def _finite_f16_bits(rng, shape):
    b = rng.integers(0, 1 << 16, shape).astype(np.uint16)
    return np.where((b & 0x7C00) == 0x7C00, b & 0xBFFF, b).astype(np.uint16)


def _tile_values(rng, kind, ng, R, T, aw, qw, zb):
    lo, hi = -(1 << (aw - 1)), (1 << (aw - 1)) - 1
    qlo, qhi = -(1 << (qw - 1)), (1 << (qw - 1)) - 1
    zmax = (1 << zb) - 1
    acc = rng.integers(lo >> 2, (hi >> 2) + 1, (ng, T * R))
    zero = rng.integers(0, zmax + 1, (ng, R))
    qsum = rng.integers(qlo >> 1, (qhi >> 1) + 1, (ng, T))
    wscale = _f16_bits(rng.uniform(1e-3, 3e-2, (ng, R)) * rng.choice([-1, 1], (ng, R)))
    ascale = _f32_bits(rng.uniform(1e-3, 1e-1, (ng, T)))
    if kind == "extreme":
        acc = rng.choice([lo, hi, lo + 1, hi - 1, 0], (ng, T * R))
        zero = rng.choice([0, zmax], (ng, R))
        qsum = rng.choice([qlo, qhi, 0], (ng, T))
        wscale = _f16_bits(np.ldexp(rng.uniform(1, 2, (ng, R)), rng.integers(-14, 16, (ng, R))))
        ascale = _f32_bits(np.ldexp(rng.uniform(1, 2, (ng, T)), rng.integers(-30, 30, (ng, T))))
    elif kind == "tiny":
        acc = rng.integers(-64, 65, (ng, T * R))
        wscale = (rng.integers(1, 1 << 11, (ng, R)) | (rng.integers(0, 2, (ng, R)) << 15)).astype(np.uint16)
        exps = rng.integers(-149, -110, (ng, T))
        ascale = _f32_bits(np.ldexp(rng.uniform(1, 2, (ng, T)), exps).astype(F32))
    elif kind == "huge":
        acc = rng.choice([lo, hi, lo + 1, hi - 1], (ng, T * R))
        wscale = _f16_bits(rng.uniform(3e4, 65504, (ng, R)) * rng.choice([-1, 1], (ng, R)))
        ascale = _f32_bits(np.ldexp(rng.uniform(1, 2, (ng, T)), rng.integers(90, 128, (ng, T))).astype(F32))
    elif kind == "bits":
        acc = rng.integers(lo, hi + 1, (ng, T * R))
        qsum = rng.integers(qlo, qhi + 1, (ng, T))
        wscale = _finite_f16_bits(rng, (ng, R))
        ascale = _finite_f32_bits(rng, (ng, T))
    elif kind == "zero_scale":
        ascale = np.where(rng.random((ng, T)) < 0.5, 0, ascale).astype(U32)   # all-zero groups: s_a = 0
        wscale = np.where(rng.random((ng, R)) < 0.2, 0x8000, wscale).astype(np.uint16)
    return acc, zero, qsum, wscale.astype(np.uint16), ascale.astype(U32)


def _consistent_sums(rng, kind, ng, R, T, group):
    """acc, zero, qsum of real codes (qsum = the sum of the group's codes, as the contract has it):
    for a unit built with corr_bits, whose bound holds only for such groups. "extreme" puts every
    tile near |corr| = group * 128 * 15, the bound itself, with all its significant bits in use."""
    q = rng.integers(-128, 128, (ng, T, group))
    w = rng.integers(0, 16, (ng, R, group))
    zero = rng.integers(0, 16, (ng, R))
    if kind in ("extreme", "huge"):
        q = -128 + rng.integers(0, 3, (ng, T, group))     # |corr| at the bound, with odd values
        w = rng.choice([0, 15], (ng, R, 1)) * np.ones((1, 1, group), dtype=np.int64)
        zero = np.where(w[:, :, 0] == 0, 15, 0)
    acc = np.einsum("gtk,grk->gtr", q, w).reshape(ng, T * R)
    return acc, zero, q.sum(axis=-1)


def _bias(rng, R):
    choice = rng.integers(0, 5)
    if choice == 0:
        return None
    if choice == 1:
        return np.full(R, 0x80000000, dtype=U32)          # -0.0: numerics turns it into +0.0
    if choice == 2:
        return _finite_f32_bits(rng, R)
    return _f32_bits(rng.normal(0, 0.5, R).astype(F32))


def golden_tile(acc, zero, qsum, wscale, ascale, bias, R, T):
    ng = acc.shape[0]
    corr = acc.reshape(ng, T, R).astype(np.int64) - zero[:, None, :].astype(np.int64) * qsum[:, :, None]
    assert np.abs(corr).max(initial=0) < (1 << 24)
    with np.errstate(all="ignore"):
        y = dequant_accumulate(corr.transpose(1, 2, 0).astype(np.int32),
                               wscale.T.copy().view(np.float16), ascale.T.copy().view(F32),
                               None if bias is None else bias.view(F32))
    return y.reshape(T * R).view(U32)


def make_scenario(unit: DequantUnit, rng, groups_per_tile: list[int], kinds: list[str],
                  p_valid: dict, p_ready: float, seed: int, group: int | None = None):
    R, T = unit.rows, unit.tokens
    cols = {k: [] for k in ("acc", "first", "last", "wscale", "zero", "ascale", "qsum")}
    biases, expected = [], []
    for ng, kind in zip(groups_per_tile, kinds):
        acc, zero, qsum, wscale, ascale = _tile_values(rng, kind, ng, R, T, unit.acc_width,
                                                       unit.qsum_width, unit.zero_bits)
        if unit.corr_bits < 24:
            acc, zero, qsum = _consistent_sums(rng, kind, ng, R, T, group)
        bias = _bias(rng, R)
        expected.append(golden_tile(acc, zero, qsum, wscale, ascale, bias, R, T))
        biases.append(np.zeros(R, dtype=U32) if bias is None else bias)
        cols["acc"].append(acc)
        cols["zero"].append(zero)
        cols["qsum"].append(qsum)
        cols["wscale"].append(wscale)
        cols["ascale"].append(ascale)
        cols["first"].append(np.arange(ng) == 0)
        cols["last"].append(np.arange(ng) == ng - 1)
    spec = {k: np.concatenate(v) for k, v in cols.items()}
    total_groups = sum(groups_per_tile)
    slowest = min(min(p_valid.values()), p_ready)
    work = total_groups * unit.cycles_per_group + len(groups_per_tile) * (unit.latency + unit.out_beats)
    spec.update(
        out_beats=unit.out_beats,
        bias=np.array(biases, dtype=U32), rows=R, tokens=T, acc_width=unit.acc_width,
        qsum_width=unit.qsum_width, zero_bits=unit.zero_bits, seed=seed, p_ready=p_ready,
        max_cycles=int(work / slowest ** 2 * 4) + 1000,
        **{f"p_valid_{k}": v for k, v in p_valid.items()})
    return spec, np.array(expected, dtype=U32)


def assert_same_bits(got, exp, what):
    got, exp = np.asarray(got, dtype=U32), np.asarray(exp, dtype=U32)
    assert got.shape == exp.shape, f"{what}: got {got.shape[0]} out beats, expected {exp.shape[0]}"
    ok = (got == exp) | (np.isnan(got.view(F32)) & np.isnan(exp.view(F32)))
    if not ok.all():
        tile, item = np.argwhere(~ok)[0]
        raise AssertionError(
            f"{what}: tile {tile} item {item} (t={item}//R, r={item}%R) is {got[tile, item]:#010x} "
            f"({got[tile, item].view(F32)!r}), numerics says {exp[tile, item]:#010x} "
            f"({exp[tile, item].view(F32)!r}); {(~ok).sum()} of {ok.size} values differ")


# ---------------------------------------------------------------------------
# Verilator runs
# ---------------------------------------------------------------------------

POINTS = [
    pytest.param(dict(rows=4, tokens=1, group=32, lanes=2), id="R4-T1-G32-L2"),
    # non-default fp latencies: the alignment delays and the adder loop move
    pytest.param(dict(rows=8, tokens=2, group=64, lanes=2, mul_latency=5, add_latency=6),
                 id="R8-T2-G64-L2-M5A6"),
    pytest.param(dict(rows=32, tokens=1, group=128, lanes=1), id="R32-T1-G128-L1"),
    pytest.param(dict(rows=4, tokens=1, group=32, lanes=4), id="R4-T1-G32-L4", marks=pytest.mark.slow),
    pytest.param(dict(rows=4, tokens=1, group=32, lanes=1), id="R4-T1-G32-L1", marks=pytest.mark.slow),
    pytest.param(dict(rows=32, tokens=1, group=128, lanes=2), id="R32-T1-G128-L2", marks=pytest.mark.slow),
    pytest.param(dict(rows=32, tokens=1, group=128, lanes=4), id="R32-T1-G128-L4", marks=pytest.mark.slow),
    pytest.param(dict(rows=8, tokens=2, group=64, lanes=2), id="R8-T2-G64-L2", marks=pytest.mark.slow),
    pytest.param(dict(rows=4, tokens=1, group=32, lanes=2, mul_latency=1, add_latency=0),
                 id="R4-T1-G32-L2-M1A0", marks=pytest.mark.slow),
    # beat_bits: y leaves as 128-bit beats (the engine's form): two memory words per beat (lanes 2),
    # two beats per memory word (lanes 8), one each (lanes 4, the kv260 shape), four (lanes 1)
    pytest.param(dict(rows=8, tokens=2, group=64, lanes=2, beat_bits=128), id="R8-T2-G64-L2-B128"),
    pytest.param(dict(rows=8, tokens=2, group=64, lanes=8, beat_bits=128), id="R8-T2-G64-L8-B128"),
    # one item per lane (N = 1): the out beat's only word is written in the cycle before out.valid,
    # so the y_out memory's synchronous read must be transparent (and the y memory's, cycles per
    # group = loop latency)
    pytest.param(dict(rows=4, tokens=1, group=32, lanes=4, beat_bits=128), id="R4-T1-G32-L4-B128"),
    # corr_bits: t = fp32(corr) * s as a 17 x 24 product (the kv260 dequant: one DSP48E2), on
    # groups of real codes up to the bound |corr| = 64 * 128 * 15
    pytest.param(dict(rows=8, tokens=2, group=64, lanes=4, beat_bits=128, corr_bits=17), id="R8-T2-G64-L4-B128-C17"),
    pytest.param(dict(rows=32, tokens=2, group=64, lanes=4, beat_bits=128), id="R32-T2-G64-L4-B128",
                 marks=pytest.mark.slow),
    pytest.param(dict(rows=4, tokens=2, group=32, lanes=1, beat_bits=128), id="R4-T2-G32-L1-B128",
                 marks=pytest.mark.slow),
]

STREAMS = ("partials", "meta", "act", "bias")


def build_unit(point) -> tuple[DequantUnit, Path, str]:
    from amaranth.back import verilog

    from sim.runner import write_verilog

    aw, qw = widths_for_group(point["group"])
    mul, add = point.get("mul_latency"), point.get("add_latency")
    unit = DequantUnit(point["rows"], point["tokens"], aw, qw, lanes=point["lanes"],
                       mul_latency=mul, add_latency=add, beat_bits=point.get("beat_bits"),
                       corr_bits=point.get("corr_bits"))
    name = f"dequant_r{point['rows']}_t{point['tokens']}_a{aw}_q{qw}_l{point['lanes']}"
    if mul is not None or add is not None:
        name += f"_m{unit.mul_latency}_a{unit.add_latency}"
    if unit.beat_bits is not None:
        name += f"_b{unit.beat_bits}"
    if unit.corr_bits < 24:
        name += f"_c{unit.corr_bits}"
    src = write_verilog(verilog.convert(unit, name=name), name)
    return unit, src, name


@pytest.mark.sim
@pytest.mark.parametrize("point", POINTS)
def test_dequant_unit_verilator(point, tmp_path):
    from sim.runner import run_cocotb

    unit, src, name = build_unit(point)
    seed = 1000 + point["rows"] * 10 + point["lanes"]
    rng = np.random.default_rng(seed)

    # Random stalls everywhere: 30 row tiles of 1..5 groups, every value class.
    n_tiles = 30
    kinds = [KINDS[i % len(KINDS)] for i in range(n_tiles)]
    groups = [int(g) for g in rng.integers(1, 6, n_tiles)]
    stalls, stalls_exp = make_scenario(
        unit, rng, groups, kinds, p_valid={"partials": 0.5, "meta": 0.7, "act": 0.6, "bias": 0.4},
        p_ready=0.5, seed=seed, group=point["group"])

    # No stalls: enough groups per tile that the out beat never throttles the inputs.
    ng = max(3, -(-(unit.latency + unit.out_beats) // unit.cycles_per_group) + 1)
    stream, stream_exp = make_scenario(
        unit, rng, [ng] * 4, ["typical", "extreme", "bits", "typical"],
        p_valid={k: 1.0 for k in STREAMS}, p_ready=1.0, seed=seed + 1, group=point["group"])

    paths = {k: tmp_path / f"{k}.npz" for k in ("stalls", "stalls_res", "stream", "stream_res")}
    np.savez(paths["stalls"], **stalls)
    np.savez(paths["stream"], **stream)
    run_cocotb(sources=[src], toplevel=name, test_module="tb_dequant", build_name=name, test_dir=SIM_DIR,
               extra_env={"DEQUANT_STALLS": str(paths["stalls"]),
                          "DEQUANT_STALLS_RESULTS": str(paths["stalls_res"]),
                          "DEQUANT_STREAM": str(paths["stream"]),
                          "DEQUANT_STREAM_RESULTS": str(paths["stream_res"])})

    res = np.load(paths["stalls_res"])
    assert_same_bits(res["y"], stalls_exp, "random stalls")
    # partials, meta and act of a group are taken together; bias with the first group.
    assert (res["hs_meta"] == res["hs_partials"]).all() and (res["hs_act"] == res["hs_partials"]).all()
    assert (res["hs_bias"] == res["hs_partials"][stalls["first"]]).all()

    res = np.load(paths["stream_res"])
    assert_same_bits(res["y"], stream_exp, "no stalls")
    hs = res["hs_partials"]
    cpg = unit.cycles_per_group
    assert hs[0] == cpg - 1, f"first group took {hs[0] + 1} cycles, expected {cpg}"
    assert (np.diff(hs) == cpg).all(), f"group spacing {sorted(set(np.diff(hs).tolist()))}, expected {cpg}"
    starts = hs - (cpg - 1)
    last_starts = starts[stream["last"]]
    assert (res["out_rise"] == last_starts + unit.latency).all(), \
        f"out.valid rose {(res['out_rise'] - last_starts).tolist()} cycles after the last group started, " \
        f"expected latency {unit.latency}"


# Amaranth's Verilog style: implicit widths, unused bits of internal wires, initial
# values on registers. Anything else (UNOPTFLAT, LATCH, CASEINCOMPLETE, ...) is a finding.
LINT_WAIVERS = ("WIDTHEXPAND", "WIDTHTRUNC", "UNUSEDSIGNAL", "PROCASSINIT", "DECLFILENAME")


@pytest.mark.sim
@pytest.mark.parametrize("lanes", [1, 4])
def test_dequant_unit_lint(lanes, tmp_path):
    import subprocess

    from amaranth.back import verilog

    from sim.toolchain import verilator_bin

    path = tmp_path / "dequant_unit.v"
    path.write_text(verilog.convert(DequantUnit(4, 1, 20, 13, lanes=lanes), name="dequant_unit"))
    cmd = [verilator_bin(), "--lint-only", "-Wall", *[f"-Wno-{w}" for w in LINT_WAIVERS], str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
