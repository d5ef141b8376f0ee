"""ArgmaxUnit (rtl/argmax.py) against sw.contract.fabric_ops.argmax_first.

Vectors of every class (random logits, many ties across lanes and beats, NaN,
-inf only, all NaN, +0/-0, subnormals), lengths that are and are not multiples
of the lane count, streamed with random input gaps and random output
back-pressure: a few vectors in Amaranth's simulator, vocab 512 and a 151936-long
LM-head vector through Verilator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator

from rtl.argmax import ArgmaxUnit
from sw.contract import fabric_ops as fo
from sw.contract.errors import ConfigError

F32 = np.float32
U32 = np.uint32
NEG_INF = 0xFF800000


def make_vector(rng, n: int, kind: str) -> np.ndarray:
    """fp32 bit patterns (uint32) of one logit vector of class `kind`."""
    if kind == "random":
        return rng.normal(0, 4, n).astype(F32).view(U32)
    if kind == "ties":             # a handful of values: the maximum repeats across lanes and beats
        return rng.choice(np.array([-1.5, 0.0, 2.0, 3.25, 3.25], F32), n).view(U32)
    if kind == "nan":              # NaNs (any sign and payload) among finite values
        x = rng.normal(0, 1, n).astype(F32).view(U32)
        nan = rng.integers(0x7F800001, 0x80000000, n, dtype=np.int64) | (rng.integers(0, 2, n) << 31)
        return np.where(rng.random(n) < 0.3, nan, x).astype(U32)
    if kind == "neginf":
        return np.full(n, NEG_INF, U32)
    if kind == "allnan":
        return (rng.integers(0x7F800001, 0x80000000, n, dtype=np.int64) | (rng.integers(0, 2, n) << 31)).astype(U32)
    if kind == "infnan":           # only -inf and NaN: index 0
        return np.where(rng.random(n) < 0.5, NEG_INF, 0x7FC00000).astype(U32)
    if kind == "zeros":            # +0 and -0 only (equal: the first wins), maybe with negatives
        x = rng.choice(np.array([0x00000000, 0x80000000, 0xBF800000, 0x80000001], np.int64), n)
        return x.astype(U32)
    if kind == "subnormal":        # subnormals of both signs, +-0, and the smallest normals
        x = rng.integers(0, 0x00800001, n, dtype=np.int64) | (rng.integers(0, 2, n) << 31)
        return x.astype(U32)
    if kind == "bits":             # any bit pattern (+inf included)
        return rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(U32)
    if kind == "late":             # the maximum in the very last element
        x = rng.normal(0, 1, n).astype(F32)
        x[-1] = F32(100.0)
        return x.view(U32)
    raise ValueError(kind)


KINDS = ("random", "ties", "nan", "neginf", "allnan", "infnan", "zeros", "subnormal", "bits", "late")


def expected(vec: np.ndarray) -> tuple[int, int]:
    idx = int(fo.argmax_first(vec.view(F32)))
    v = int(vec[idx])
    return idx, (NEG_INF if (v & 0x7FFFFFFF) > 0x7F800000 else v)


def beats_of(vectors: list[np.ndarray], lanes: int) -> dict[str, np.ndarray]:
    """The input beats (data [n, lanes], count [n], last [n]) of the vectors in turn."""
    data, count, last = [], [], []
    for vec in vectors:
        nb = -(-len(vec) // lanes)
        padded = np.zeros(nb * lanes, np.int64)
        padded[:len(vec)] = vec
        data.append(padded.reshape(nb, lanes))
        c = np.full(nb, lanes)
        c[-1] = len(vec) - (nb - 1) * lanes
        count.append(c)
        last.append(np.arange(nb) == nb - 1)
    return {"data": np.concatenate(data), "count": np.concatenate(count),
            "last": np.concatenate(last).astype(np.int64)}


def vector_set(rng, lanes: int, count: int, max_len: int) -> list[np.ndarray]:
    vecs = []
    for k in range(count):
        n = int(rng.integers(1, max_len + 1)) if k % 3 else int(rng.integers(1, max_len // lanes + 1)) * lanes
        vecs.append(make_vector(rng, n, KINDS[k % len(KINDS)]))
    vecs += [make_vector(rng, 1, "random"), make_vector(rng, lanes + 1, "ties"), make_vector(rng, max_len, "late")]
    return vecs


# ---------------------------------------------------------------------------
# Amaranth simulator
# ---------------------------------------------------------------------------

def run_pysim(unit: ArgmaxUnit, vectors, rng, p_valid=0.7, p_ready=0.6):
    beats = beats_of(vectors, unit.lanes)
    n_beats = len(beats["count"])
    results = []

    async def source(ctx):
        for i in range(n_beats):
            while rng.random() > p_valid:
                ctx.set(unit.inp.valid, 0)
                await ctx.tick()
            ctx.set(unit.inp.valid, 1)
            ctx.set(unit.inp.payload, {"data": [int(x) for x in beats["data"][i]],
                                       "count": int(beats["count"][i]), "last": int(beats["last"][i])})
            await ctx.tick().until(unit.inp.ready)
        ctx.set(unit.inp.valid, 0)

    async def sink(ctx):
        while len(results) < len(vectors):
            ready = rng.random() < p_ready
            ctx.set(unit.out.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(unit.out.valid, unit.out.payload)
            if ready and valid:
                results.append((int(payload.index), int(payload.value) & 0xFFFFFFFF))

    sim = Simulator(unit)
    sim.add_clock(1e-6)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run_until(1e-6 * (20 * n_beats + 200))
    return results


@pytest.mark.parametrize("lanes", [1, 4, 8])
def test_argmax_pysim(lanes):
    rng = np.random.default_rng(lanes)
    vectors = vector_set(rng, lanes, 12, 3 * lanes + 3)
    got = run_pysim(ArgmaxUnit(lanes, 10), vectors, rng)
    assert got == [expected(v) for v in vectors]


def test_argmax_parameters():
    with pytest.raises(ConfigError, match="lanes"):
        ArgmaxUnit(3, 10)
    with pytest.raises(ConfigError, match="index_bits"):
        ArgmaxUnit(8, 2)
    with pytest.raises(ConfigError, match="index_bits"):
        ArgmaxUnit(4, 33)


# ---------------------------------------------------------------------------
# Verilator
# ---------------------------------------------------------------------------

def _verilator(tmp_path, lanes, index_bits, vectors, seed, p_valid, p_ready):
    from amaranth.back import verilog

    from sim.runner import run_cocotb, write_verilog
    from sim.tb_array import pack_payloads, unpack_payloads

    unit = ArgmaxUnit(lanes, index_bits)
    name = f"argmax_l{lanes}_i{index_bits}"
    src = write_verilog(verilog.convert(unit, name=name), name)
    beats = beats_of(vectors, lanes)
    n = len(beats["count"])
    out_bytes = -(-unit.out_layout.size // 8)
    vec_path, res_path = tmp_path / "vectors.npz", tmp_path / "results.npz"
    np.savez(vec_path, inp=pack_payloads(unit.in_layout, beats, n), n_out=len(vectors), seed=seed,
             p_valid=p_valid, p_ready=p_ready, out_bytes=out_bytes)
    run_cocotb(sources=[src], toplevel=name, test_module="tb_argmax", build_name=name,
               extra_env={"ARGMAX_VECTORS": str(vec_path), "ARGMAX_RESULTS": str(res_path)},
               test_dir=Path(__file__).resolve().parent.parent / "sim")
    out = unpack_payloads(unit.out_layout, np.load(res_path)["payload"])
    got = list(zip(out["index"][:, 0].tolist(), (out["value"][:, 0] & 0xFFFFFFFF).tolist()))
    exp = [expected(v) for v in vectors]
    bad = [k for k, (g, e) in enumerate(zip(got, exp)) if g != e]
    assert not bad and len(got) == len(exp), \
        f"{len(bad)} of {len(exp)} vectors wrong, first #{bad[0] if bad else None}: got {got[bad[0]] if bad else None}, " \
        f"expected {exp[bad[0]] if bad else None}"


@pytest.mark.sim
@pytest.mark.parametrize("lanes,p_valid,p_ready", [
    # the default run: 4 lanes (the ArgmaxPass's); the other lane counts are slow (a build each)
    (4, 0.9, 0.7), (4, 1.0, 1.0),
    pytest.param(1, 0.8, 0.5, marks=pytest.mark.slow), pytest.param(2, 0.6, 0.3, marks=pytest.mark.slow),
    pytest.param(8, 0.5, 0.5, marks=pytest.mark.slow)])
def test_argmax_verilator(tmp_path, lanes, p_valid, p_ready):
    seed = 100 + lanes
    rng = np.random.default_rng(seed)
    vectors = vector_set(rng, lanes, 60, 512)
    _verilator(tmp_path, lanes, 10, vectors, seed, p_valid, p_ready)


@pytest.mark.sim
def test_argmax_lm_head_verilator(tmp_path):
    """One vocab-151936 vector (4 lanes, 18-bit index) and a tie at the far end, with stalls."""
    rng = np.random.default_rng(7)
    vocab = 151936
    big = make_vector(rng, vocab, "random")
    tie = make_vector(rng, vocab, "random")
    tie[[vocab - 3, vocab - 1]] = as_bits_f32(50.0)
    _verilator(tmp_path, 4, 18, [big, tie, make_vector(rng, 5, "ties")], 7, 0.9, 0.5)


def as_bits_f32(x):
    return np.asarray(x, F32).view(U32)
