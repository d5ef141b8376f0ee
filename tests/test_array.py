"""MacArray: config checks, the packing arithmetic, Amaranth-sim smoke tests, and
bit-exact cocotb + Verilator runs at four parameter points x packing on/off.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from sw.contract.config import ArrayConfig, PRESETS, preset
from rtl.pe import pack_bias, pack_int, split_biased_int, split_packed_int
from sw.contract.errors import ConfigError
from sw.contract.numerics import reference_group_sums

REPO = Path(__file__).resolve().parent.parent

# The four shapes the brief asks for: R x C x T, g; the kv260 point is one engine.
POINTS = {
    "4x4-g32": ("test-4x4-g32", {}),
    "8x16-g64": ("test-8x16-g64", {}),
    "16x8-g128": ("test-16x8-g128", {}),
    "32x1-g64-kv260": ("kv260", {"engines": 1}),
}


def point_config(point: str, packing: bool) -> ArrayConfig:
    name, changes = POINTS[point]
    return dataclasses.replace(preset(name), dsp_packing=packing, **changes).validate()


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def test_presets_validate_and_roundtrip(tmp_path):
    for name, cfg in PRESETS.items():
        cfg.validate()
        again = ArrayConfig.from_json(cfg.to_json())
        assert again == cfg and again.config_hash == cfg.config_hash
        p = tmp_path / f"{name}.json"
        p.write_text(cfg.to_json())
        assert ArrayConfig.from_file(p) == cfg
    assert len({c.config_hash for c in PRESETS.values()}) == len(PRESETS)


def test_kv260_derived_facts():
    kv = preset("kv260")
    assert (kv.rows, kv.cols, kv.engines, kv.port_bits, kv.beat_bits) == (32, 1, 4, 128, 128)
    assert kv.acc_width == 18 and kv.qsum_width == 14
    assert kv.multipliers_per_engine * kv.engines == 512            # 41 % of 1248 DSP48E2
    assert preset("kv260-nopack").multipliers_per_engine * kv.engines == 1024
    assert kv.weight_bytes_per_second == 16e9                       # the 4 HP ports at 250 MHz
    assert kv.dequant_keeps_up
    assert kv.packed_operand_bits + 1 <= 27 and kv.packed_acc_width <= 48


@pytest.mark.parametrize("g,bits,width", [(32, 4, 17), (64, 4, 18), (128, 4, 19), (64, 8, 22), (128, 8, 23)])
def test_acc_width_is_exact_minimum(g, bits, width):
    cfg = ArrayConfig(rows=32, cols=1, tokens=1, group_size=g, weight_bits=bits, port_bits=256)
    assert cfg.acc_width == width
    lo, hi = cfg.group_sum_range
    assert -(1 << (width - 1)) <= lo and hi < (1 << (width - 1))
    assert not (-(1 << (width - 2)) <= lo and hi < (1 << (width - 2)))


@pytest.mark.parametrize("changes,needle", [
    (dict(acc_bits=17), "too narrow"),
    (dict(cols=3), "does not divide group_size"),
    (dict(group_size=48), "not one of"),
    (dict(rows=3, dsp_packing=True), "must be even"),
    (dict(rows=64), "does not divide the 128-bit port word"),
    (dict(weight_bits=8, dsp_packing=True, port_bits=256), "needs 4-bit weights"),
    (dict(weight_bits=5), "weight_bits"),
    (dict(act_bits=4), "act_bits"),
    (dict(pipeline=3), "exceeds"),
    (dict(tokens=0), "positive integer"),
    (dict(dequant_lanes=5), "does not divide"),
])
def test_validate_refuses(changes, needle):
    base = dict(rows=32, cols=1, tokens=2, group_size=64, port_bits=128)
    with pytest.raises(ConfigError, match=needle) as e:
        ArrayConfig(**{**base, **changes}).validate()
    assert "\n" not in str(e.value)


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ArrayConfig.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{rows: 1")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ArrayConfig.from_file(bad)
    bad.write_text(json.dumps({"rows": 32, "cols": 1, "tokens": 1, "colour": "red"}))
    with pytest.raises(ConfigError, match="unknown key"):
        ArrayConfig.from_file(bad)
    bad.write_text(json.dumps({"rows": 32, "cols": 1, "tokens": 1, "acc_bits": 12}))
    with pytest.raises(ConfigError, match=f"{bad}.*too narrow"):
        ArrayConfig.from_file(bad)
    with pytest.raises(ConfigError, match="unknown hardware preset"):
        preset("kv999")


# ---------------------------------------------------------------------------
# Packing arithmetic (integer model of rtl/pe.py)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("g", [32, 64, 128])
def test_packed_split_exact_at_extremes(g):
    cfg = ArrayConfig(rows=2, cols=1, tokens=1, group_size=g, dsp_packing=True, port_bits=128)
    S = cfg.pack_shift
    rng = np.random.default_rng(g)
    cases = [(np.full(g, w0), np.full(g, w1), np.full(g, a))
             for w0 in (0, 15) for w1 in (0, 15) for a in (-128, 127, 0)]
    cases += [(rng.integers(0, 16, g), rng.integers(0, 16, g), rng.choice([-128, 127], g)) for _ in range(200)]
    for w0, w1, a in cases:
        p_plain = sum(int(x) * pack_int(int(u), int(v), S) for x, u, v in zip(a, w0, w1))
        exp = (int((w0 * a).sum()), int((w1 * a).sum()))
        assert split_packed_int(p_plain, S) == exp
        assert split_biased_int(p_plain + pack_bias(S), S) == exp
        assert -(1 << (cfg.packed_acc_width - 1)) <= p_plain + pack_bias(S) < (1 << (cfg.packed_acc_width - 1))


def test_shift_add_product_is_the_product():
    """The dequant's zero * qsum in adders (rtl.pe.shift_add_product), every 4-bit zero against
    the qsum extremes and random values, through Amaranth's simulator."""
    from amaranth.hdl import Module, Signal, signed, unsigned
    from amaranth.sim import Simulator
    from rtl.pe import shift_add_product
    m = Module()
    z, q = Signal(unsigned(4)), Signal(signed(14))
    y = Signal(signed(20))
    m.d.comb += y.eq(shift_add_product(z, q))
    rng = np.random.default_rng(5)
    qs = [-(1 << 13), (1 << 13) - 1, -1, 0, 1] + [int(v) for v in rng.integers(-(1 << 13), 1 << 13, 40)]
    seen = []

    async def bench(ctx):
        for zv in range(16):
            for qv in qs:
                ctx.set(z, zv)
                ctx.set(q, qv)
                seen.append((zv * qv, ctx.get(y)))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    assert len(seen) == 16 * len(qs)
    assert all(want == got for want, got in seen), [s for s in seen if s[0] != s[1]][:5]


def test_packing_needs_whole_group_guard():
    # One bit less of shift and the extreme group no longer splits: S is tight.
    g, S = 64, ArrayConfig(rows=2, cols=1, tokens=1, group_size=64, port_bits=128).pack_shift
    w0, w1, a = np.full(g, 15), np.zeros(g, int), np.full(g, -128)
    p = sum(int(x) * pack_int(int(u), int(v), S - 2) for x, u, v in zip(a, w0, w1))
    assert split_packed_int(p, S - 2) != (int((w0 * a).sum()), 0)


# ---------------------------------------------------------------------------
# Vectors
# ---------------------------------------------------------------------------

def beats_for(cfg: ArrayConfig, w: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    """w [R, K] codes, a [T, K] int8 -> per-beat fields in the array's element order."""
    R, C, T, G = cfg.rows, cfg.cols, cfg.tokens, cfg.group_size
    K = w.shape[1]
    nb = K // C
    wb = w.reshape(R, nb, C).transpose(1, 2, 0).reshape(nb, C * R)      # index c*R + r
    ab = a.reshape(T, nb, C).transpose(1, 0, 2).reshape(nb, T * C)      # index t*C + c
    last = ((np.arange(nb) + 1) % (G // C) == 0).astype(np.int64)
    return {"w": wb, "a": ab, "last": last}


def expected_acc(cfg: ArrayConfig, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """[ng, T*R] int64, index t*R + r, via the golden model's integer path."""
    R, T, G = cfg.rows, cfg.tokens, cfg.group_size
    ng = w.shape[1] // G
    acc, _ = reference_group_sums(w, np.zeros((R, ng), np.int64), a,
                                  np.zeros((T, ng), np.int64), G)          # [T, R, ng]
    return acc.transpose(2, 0, 1).reshape(ng, T * R)


def random_operands(cfg, rng, ng):
    K = ng * cfg.group_size
    lo, hi = cfg.weight_range
    w = rng.integers(lo, hi + 1, (cfg.rows, K))
    a = rng.integers(-128, 128, (cfg.tokens, K))
    return w, a


def extreme_operands(cfg, rng):
    """Groups that hit every accumulator bound, packed-field bound and sign mix."""
    R, T, G = cfg.rows, cfg.tokens, cfg.group_size
    lo, hi = cfg.weight_range
    groups = []
    for wv in (hi, lo):
        for av in (-128, 127):
            groups.append((np.full((R, G), wv), np.full((T, G), av)))
    even_odd = np.where(np.arange(R)[:, None] % 2 == 0, hi, lo) * np.ones((1, G), int)
    for av in (-128, 127):
        groups.append((even_odd, np.full((T, G), av)))
        groups.append((hi + lo - even_odd, np.full((T, G), av)))
    # per-token opposite extremes in one beat
    a_mix = np.where(np.arange(T)[:, None] % 2 == 0, -128, 127) * np.ones((1, G), int)
    groups.append((np.full((R, G), hi), a_mix))
    for _ in range(4):
        groups.append((rng.choice([lo, hi], (R, G)), rng.choice([-128, 127], (T, G))))
    w = np.concatenate([g[0] for g in groups], axis=1)
    a = np.concatenate([g[1] for g in groups], axis=1)
    return w, a


SCENARIOS = {   # name: (groups or None for extreme, valid_prob, ready_prob)
    "nostall": (6, 1.0, 1.0),
    "stall": (8, 0.6, 0.5),
    "throttle": (5, 1.0, 0.08),
    "extreme": (None, 0.85, 0.7),
}


def write_vectors(cfg: ArrayConfig, path: Path, seed: int) -> dict[str, np.ndarray]:
    from rtl.array import beat_layout, partials_layout
    from sim.tb_array import pack_payloads
    rng = np.random.default_rng(seed)
    spec = {"scenarios": np.array(list(SCENARIOS)), "latency": np.int64(cfg.array_latency),
            "beats_per_group": np.int64(cfg.beats_per_group), "seed": np.int64(seed),
            "out_bytes": np.int64(-(-partials_layout(cfg).size // 8))}
    expected = {}
    for name, (ng, vp, rp) in SCENARIOS.items():
        w, a = extreme_operands(cfg, rng) if ng is None else random_operands(cfg, rng, ng)
        f = beats_for(cfg, w, a)
        spec[f"{name}__inp"] = pack_payloads(beat_layout(cfg), f, len(f["last"]))
        spec[f"{name}__valid_prob"] = np.float64(vp)
        spec[f"{name}__ready_prob"] = np.float64(rp)
        expected[name] = expected_acc(cfg, w, a)
        spec[f"{name}__n_out"] = np.int64(len(expected[name]))
    np.savez(path, **spec)
    return expected


# ---------------------------------------------------------------------------
# Amaranth simulator smoke tests (fast, no Verilator)
# ---------------------------------------------------------------------------

def run_amaranth(cfg: ArrayConfig, w, a, ready_pattern=None):
    from amaranth.sim import Simulator
    from rtl.array import MacArray
    dut = MacArray(cfg)
    f = beats_for(cfg, w, a)
    nb = len(f["last"])
    got = []
    n_groups = int(f["last"].sum())

    async def source(ctx):
        for b in range(nb):
            ctx.set(dut.inp.payload.w, [int(x) for x in f["w"][b]])
            ctx.set(dut.inp.payload.a, [int(x) for x in f["a"][b]])
            ctx.set(dut.inp.payload.last, int(f["last"][b]))
            ctx.set(dut.inp.valid, 1)
            await ctx.tick().until(dut.inp.ready)
        ctx.set(dut.inp.valid, 0)

    async def sink(ctx):
        cycle = 0
        while len(got) < n_groups:
            ready = 1 if ready_pattern is None else ready_pattern(cycle)
            ctx.set(dut.out.ready, ready)
            _, _, valid, acc = await ctx.tick().sample(dut.out.valid, dut.out.payload.acc)
            if ready and valid:
                got.append([int(x) for x in acc])
            cycle += 1
            assert cycle < 20 * nb + 100, "timeout"

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return np.array(got), dut


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("point", ["4x4-g32", "16x8-g128"])
def test_amaranth_sim_exact(point, packing):
    cfg = point_config(point, packing)
    rng = np.random.default_rng(1)
    w, a = random_operands(cfg, rng, 2)
    got, dut = run_amaranth(cfg, w, a, ready_pattern=lambda c: int(c % 3 != 0))
    assert dut.latency == cfg.array_latency and dut.acc_width == cfg.acc_width
    np.testing.assert_array_equal(got, expected_acc(cfg, w, a))


def test_amaranth_sim_int8_weights():
    cfg = ArrayConfig(rows=4, cols=2, tokens=2, group_size=32, weight_bits=8, port_bits=64, pipeline=3)
    rng = np.random.default_rng(2)
    w = rng.integers(-128, 128, (4, 64))
    w[:, :32] = -128
    a = rng.integers(-128, 128, (2, 64))
    a[:, :32] = -128
    got, _ = run_amaranth(cfg, w, a)
    np.testing.assert_array_equal(got, expected_acc(cfg, w, a))


@pytest.mark.parametrize("pipeline", [0, 1, 4])
def test_amaranth_sim_pipeline_depths(pipeline):
    cfg = ArrayConfig(rows=4, cols=4, tokens=1, group_size=32, port_bits=64, pipeline=pipeline, dsp_packing=True)
    rng = np.random.default_rng(pipeline)
    w, a = random_operands(cfg, rng, 3)
    got, dut = run_amaranth(cfg, w, a)
    assert dut.latency == 2 + pipeline
    np.testing.assert_array_equal(got, expected_acc(cfg, w, a))


def test_tag_follows_group():
    from amaranth.sim import Simulator
    from rtl.array import MacArray
    cfg = ArrayConfig(rows=2, cols=32, tokens=1, group_size=32, port_bits=256, pipeline=3)
    dut = MacArray(cfg, tag_width=4)
    seen = []

    async def source(ctx):
        for b in range(6):       # every beat is a whole group (G/C = 1)
            ctx.set(dut.inp.payload.w, [1] * 64)
            ctx.set(dut.inp.payload.a, [b] * 32)
            ctx.set(dut.inp.payload.last, 1)
            ctx.set(dut.inp.payload.tag, b + 3)
            ctx.set(dut.inp.valid, 1)
            await ctx.tick().until(dut.inp.ready)
        ctx.set(dut.inp.valid, 0)

    async def sink(ctx):
        cycle = 0
        while len(seen) < 6:
            ready = int(cycle % 4 == 0)          # back-pressure with G/C = 1 exercises the hold path
            ctx.set(dut.out.ready, ready)
            _, _, valid, tag, acc = await ctx.tick().sample(dut.out.valid, dut.out.payload.tag,
                                                            dut.out.payload.acc)
            if valid and ready:
                seen.append((int(tag), int(acc[0])))
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    assert seen == [(b + 3, 32 * b) for b in range(6)]


# ---------------------------------------------------------------------------
# cocotb + Verilator
# ---------------------------------------------------------------------------

@pytest.mark.sim
@pytest.mark.parametrize("packing", [False, True], ids=["nopack", "pack"])
@pytest.mark.parametrize("point", list(POINTS))
def test_array_cocotb(point, packing, tmp_path):
    from amaranth.back import verilog
    from rtl.array import MacArray, partials_layout
    from sim.runner import run_cocotb, write_verilog
    from sim.tb_array import unpack_payloads

    cfg = point_config(point, packing)
    src = write_verilog(verilog.convert(MacArray(cfg), name="mac_array"), "mac_array")
    vec = tmp_path / "vectors.npz"
    expected = write_vectors(cfg, vec, seed=zlib.crc32(point.encode()) % 1000 + packing)
    res = tmp_path / "results"
    res.mkdir()
    run_cocotb(sources=[src], toplevel="mac_array", test_module="tb_array",
               build_name=f"mac_array-{point}-{'pack' if packing else 'nopack'}",
               extra_env={"ARRAY_VECTORS": str(vec), "ARRAY_RESULTS": str(res)},
               test_dir=REPO / "sim")
    layout = partials_layout(cfg)
    for name, exp in expected.items():
        r = np.load(res / f"{name}.npz")
        got = unpack_payloads(layout, r["payload"])["acc"]
        np.testing.assert_array_equal(got, exp, err_msg=f"{point} {name}")
        if name == "nostall":
            assert int(r["span"]) == int(r["beats"]) + cfg.array_latency
