"""LinearCore end to end against sw.contract.numerics, bit for bit in fp32.

The streams are cut from sw.contract.layout.pack_linear's blob (not from the codes
directly), so a layout mismatch between the packer and the array fails here.
The real-shape test runs a whole Qwen2.5-0.5B q_proj (896 x 896, g64, with
bias) through one kv260 engine (R=32, C=1, T=8) and reports cycles against
the ideal of one weight beat per cycle plus the fill latency.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from sw.contract.config import ArrayConfig, preset
from sw.contract.layout import TileLayout, pack_linear
from sw.contract.numerics import center_weights, golden_linear, quantize_activations

REPO = Path(__file__).resolve().parent.parent
F32 = np.float32


# ---------------------------------------------------------------------------
# Layers and their streams
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Layer:
    codes: np.ndarray          # [N, K] uint8
    zeros: np.ndarray          # [N, ng] uint8
    scales: np.ndarray         # [N, ng] float16
    bias: np.ndarray | None    # [N] float32
    x: np.ndarray              # [T, K] float32

    @property
    def shape(self):
        return self.codes.shape


def random_layer(cfg: ArrayConfig, n: int, k: int, rng, *, bias=True, extreme=False) -> Layer:
    G, T = cfg.group_size, cfg.tokens
    ng = k // G
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    zeros = rng.integers(0, 16, (n, ng)).astype(np.uint8)
    scales = (rng.uniform(0.5, 2.0, (n, ng)) * 2.0 ** rng.integers(-12, -4, (n, ng))).astype(np.float16)
    x = (rng.standard_normal((T, k)) * rng.uniform(0.1, 4.0, (T, 1))).astype(F32)
    if extreme:
        codes[:, :G] = rng.choice(np.array([0, 15], np.uint8), (n, G))
        zeros[:, 0] = np.where(np.arange(n) % 2, 15, 0)
        zeros[:, -1] = np.where(np.arange(n) % 2, 0, 15)
        codes[: n // 2, G:2 * G] = 15
        x[:, :G] = -3.0                                     # every code -127
        x[0, G:2 * G] = 0.0                                 # a dead group: s_a = 0, q = 0
        if T > 1:
            x[1, G:2 * G] = 1e-3
            x[1, G + 5] = 1e4                               # one outlier, the rest round to 0
        scales[:, -1] = np.float16(65504.0) if n > 1 else scales[:, -1]
        scales[0, 0] = np.float16(2.0 ** -24)               # subnormal fp16 scale
    b = (rng.standard_normal(n) * 0.5).astype(F32) if bias else None
    return Layer(codes, zeros, scales, b, x)


def stream_layer(cfg: ArrayConfig, layer: Layer):
    """Cut a layer into the core's streams. Returns (fields per stream, n_tiles)."""
    R, C, T, G = cfg.rows, cfg.cols, cfg.tokens, cfg.group_size
    n, k = layer.shape
    L = TileLayout(rows=n, cols=k, group_size=G, tile_rows=R, bits=cfg.weight_bits)
    blob = pack_linear(L, layer.codes, layer.scales, layer.zeros)
    nt, ng = L.n_tiles, L.n_groups
    blocks = blob.reshape(nt, ng, L.group_block_bytes)
    meta_b = blocks[:, :, :L.meta_bytes]
    w_b = blocks[:, :, L.meta_bytes:].reshape(nt, ng, G // C, C * R // 2)

    def nibbles(b):
        out = np.empty(b.shape[:-1] + (b.shape[-1] * 2,), np.int64)
        out[..., 0::2] = b & 0xF
        out[..., 1::2] = b >> 4
        return out

    w = nibbles(w_b)                                            # [nt, ng, G/C, C*R], index c*R + r
    scale = np.ascontiguousarray(meta_b[:, :, :2 * R]).view("<u2").astype(np.int64)   # [nt, ng, R]
    zero = nibbles(meta_b[:, :, 2 * R:2 * R + R // 2])          # [nt, ng, R]

    q, s_a, qsum = quantize_activations(layer.x, G)             # [T, K], [T, ng], [T, ng]
    a = q.astype(np.int64).reshape(T, ng, G // C, C).transpose(1, 2, 0, 3).reshape(ng, G // C, T * C)
    nbg = G // C
    beats = {
        "w": w.reshape(-1, C * R),
        "a": np.broadcast_to(a, (nt, ng, nbg, T * C)).reshape(-1, T * C),
        "last": np.broadcast_to((np.arange(nbg) == nbg - 1), (nt, ng, nbg)).reshape(-1).astype(np.int64),
        "first": np.broadcast_to((np.arange(ng) == 0)[:, None], (nt, ng, nbg)).reshape(-1).astype(np.int64),
        "final": np.broadcast_to((np.arange(ng) == ng - 1)[:, None], (nt, ng, nbg)).reshape(-1).astype(np.int64),
    }
    meta = {"scale": scale.reshape(-1, R), "zero": zero.reshape(-1, R)}
    act = {"scale": np.broadcast_to(s_a.T.view(np.uint32).astype(np.int64), (nt, ng, T)).reshape(-1, T),
           "qsum": np.broadcast_to(qsum.T.astype(np.int64), (nt, ng, T)).reshape(-1, T)}
    bias = np.zeros(L.padded_rows, F32)
    if layer.bias is not None:
        bias[:n] = layer.bias
    bias_f = {"": bias.view(np.uint32).astype(np.int64).reshape(nt, R)}
    return {"beats": beats, "meta": meta, "act": act, "bias": bias_f}, nt


def golden_tiles(cfg: ArrayConfig, layer: Layer) -> np.ndarray:
    """Expected y payloads [n_tiles, T*R] as fp32 bits, index t*R + r (padded rows included)."""
    R, T, G = cfg.rows, cfg.tokens, cfg.group_size
    n, k = layer.shape
    y = golden_linear(layer.x, center_weights(layer.codes, layer.zeros, G), layer.scales, layer.bias, G)
    nt = -(-n // R)
    full = np.zeros((T, nt * R), F32)
    full[:, :n] = y
    return full.view(np.uint32).reshape(T, nt, R).transpose(1, 0, 2).reshape(nt, T * R).astype(np.int64)


def write_core_vectors(cfg: ArrayConfig, path: Path, scenarios: dict, seed: int):
    """scenarios: name -> (Layer, {stream: valid prob, 'y': ready prob})."""
    from rtl.core import LinearCore
    from sim.tb_array import pack_payloads
    core = LinearCore(cfg)
    core._MustUse__silence = True       # only its signature and latencies are needed here
    sig = core.signature.members
    layouts = {s: sig[s].signature.members["payload"].shape for s in ("beats", "meta", "act", "bias", "y")}
    spec = {"scenarios": np.array(list(scenarios)), "latency": np.int64(core.latency), "seed": np.int64(seed),
            "out_bytes": np.int64(-(-layouts["y"].size // 8)),
            "beats_per_group": np.int64(cfg.beats_per_group),
            "cycles_per_group": np.int64(core.cycles_per_group)}
    expected = {}
    for name, (layer, probs) in scenarios.items():
        fields, nt = stream_layer(cfg, layer)
        for s in ("beats", "meta", "act"):
            f = fields[s]
            spec[f"{name}__{s}"] = pack_payloads(layouts[s], f, len(next(iter(f.values()))))
        spec[f"{name}__bias"] = pack_bias_payload(layouts["bias"], fields["bias"][""])
        for s in ("beats", "meta", "act", "bias", "y"):
            spec[f"{name}__p_{s}"] = np.float64(probs.get(s, 1.0))
        expected[name] = golden_tiles(cfg, layer)
        spec[f"{name}__n_out"] = np.int64(nt)
    np.savez(path, **spec)
    return expected, core


def pack_bias_payload(layout, values: np.ndarray) -> np.ndarray:
    """The bias stream's payload is a bare ArrayLayout(32, R): little-endian u32 words."""
    assert layout.size == values.shape[1] * 32
    return np.ascontiguousarray(values.astype("<u4")).view(np.uint8).reshape(values.shape[0], -1)


def run_core(cfg: ArrayConfig, build_name: str, scenarios: dict, tmp_path: Path, seed: int = 0):
    from amaranth.back import verilog
    from rtl.core import LinearCore
    from sim.runner import run_cocotb, write_verilog
    from sim.tb_array import unpack_payloads

    src = write_verilog(verilog.convert(LinearCore(cfg), name="linear_core"), "linear_core")
    vec = tmp_path / "core_vectors.npz"
    expected, core = write_core_vectors(cfg, vec, scenarios, seed)
    res = tmp_path / "results"
    res.mkdir()
    run_cocotb(sources=[src], toplevel="linear_core", test_module="tb_core", build_name=build_name,
               extra_env={"CORE_VECTORS": str(vec), "CORE_RESULTS": str(res)}, test_dir=REPO / "sim")
    y_layout = core.signature.members["y"].signature.members["payload"].shape
    reports = {}
    for name, exp in expected.items():
        r = np.load(res / f"{name}.npz")
        got = unpack_payloads(y_layout, r["payload"])["y"]
        bad = np.argwhere(got != exp)
        assert not len(bad), (f"{build_name}/{name}: {len(bad)} of {exp.size} fp32 outputs differ; first at "
                              f"tile {bad[0][0]} item {bad[0][1]}: got {got[tuple(bad[0])]:#010x}, "
                              f"expected {exp[tuple(bad[0])]:#010x}")
        reports[name] = {k: int(r[k]) for k in ("span", "beats", "ideal")}
    return reports, core


STALLS = {"beats": 0.7, "meta": 0.5, "act": 0.6, "bias": 0.5, "y": 0.4}


# ---------------------------------------------------------------------------
# Fast checks
# ---------------------------------------------------------------------------

def test_core_ports_and_facts():
    from rtl.core import LinearCore
    from rtl.top import build_top
    cfg = preset("kv260")
    core = LinearCore(cfg)
    core._MustUse__silence = True
    assert core.cycles_per_group == cfg.beats_per_group == 64      # dequant keeps up with the array
    top = build_top(cfg)              # the accelerator top: one engine (a LinearCore) per HP port
    assert set(top.signature.members) == {"csr", "irq"} | {f"hp{i}" for i in range(cfg.engines)}


def test_stream_cut_matches_layout():
    """The beat cut of a packed blob gives back the codes in array element order."""
    cfg = preset("test-4x4-g32")
    rng = np.random.default_rng(3)
    layer = random_layer(cfg, 6, 64, rng)
    fields, nt = stream_layer(cfg, layer)
    R, C, G = cfg.rows, cfg.cols, cfg.group_size
    w = fields["beats"]["w"].reshape(nt, 2, G // C, C, R)            # [tile, group, beat, c, r]
    codes = np.zeros((nt * R, 64), np.int64)
    codes[:6] = layer.codes
    back = w.transpose(0, 4, 1, 2, 3).reshape(nt * R, 64)
    np.testing.assert_array_equal(back, codes)


# ---------------------------------------------------------------------------
# cocotb + Verilator
# ---------------------------------------------------------------------------

@pytest.mark.sim
@pytest.mark.parametrize("name,packing", [("test-4x4-g32", True), ("test-16x8-g128", False),
                                          ("test-8x16-g64", True)])
def test_core_random(name, packing, tmp_path):
    cfg = dataclasses.replace(preset(name), dsp_packing=packing).validate()
    rng = np.random.default_rng(11)
    R, G = cfg.rows, cfg.group_size
    scenarios = {
        "random_stalls": (random_layer(cfg, 2 * R + R // 2, 3 * G, rng), STALLS),
        "extreme": (random_layer(cfg, R, 2 * G, rng, bias=False, extreme=True), {"y": 0.7, "beats": 0.9}),
        "nostall": (random_layer(cfg, 2 * R, 4 * G, rng), {}),
    }
    reports, core = run_core(cfg, f"linear_core-{name}-{'pack' if packing else 'nopack'}", scenarios, tmp_path)
    r = reports["nostall"]
    # No stalls anywhere: the array's beats never wait unless dequant is the slower side
    # (8x16-g64 with one dequant lane), or a tile is shorter than the dequant's drain.
    if core.cycles_per_group == cfg.beats_per_group:
        assert r["span"] == r["ideal"], r


def qproj_layer(cfg: ArrayConfig, rng) -> Layer:
    """Qwen2.5-0.5B q_proj shape (896 x 896, g64, with bias), random codes at realistic scales."""
    n = k = 896
    ng = k // cfg.group_size
    return Layer(codes=rng.integers(0, 16, (n, k)).astype(np.uint8),
                 zeros=rng.integers(0, 16, (n, ng)).astype(np.uint8),
                 scales=(rng.uniform(0.002, 0.02, (n, ng))).astype(np.float16),
                 bias=(rng.standard_normal(n) * 0.3).astype(F32),
                 x=(rng.standard_normal((cfg.tokens, k)) * 0.8).astype(F32))


@pytest.mark.sim
@pytest.mark.parametrize("packing", [True], ids=["pack"])
def test_core_kv260_qproj(packing, tmp_path, capsys):
    cfg = dataclasses.replace(preset("kv260"), engines=1, dsp_packing=packing).validate()
    rng = np.random.default_rng(2025)
    scenarios = {
        "qproj": (qproj_layer(cfg, rng), {}),
        "random_stalls": (random_layer(cfg, 2 * cfg.rows, 3 * cfg.group_size, rng), STALLS),
    }
    reports, core = run_core(cfg, "linear_core-kv260-pack", scenarios, tmp_path)
    r = reports["qproj"]
    L = TileLayout(rows=896, cols=896, group_size=64, tile_rows=32)
    report = {"shape": [896, 896], "tiles": L.n_tiles, "groups_per_tile": L.n_groups,
              "weight_beats": r["beats"], "cycles": r["span"], "ideal": r["ideal"],
              "latency": core.latency, "efficiency": r["ideal"] / r["span"],
              "port_beats_with_meta": L.beats}
    with capsys.disabled():
        print("\nq_proj on one kv260 engine:", json.dumps(report))
    assert r["beats"] == 28 * 14 * 64
    assert r["span"] == r["ideal"], report
