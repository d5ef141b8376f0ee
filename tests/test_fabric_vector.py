"""rtl/fabric_vector.py's FabricVectorEngine against sw/driver/fabric_exec.py's FabricOps.

Every case is one memory image (all of an op list's buffers in one region, with random bytes in
the gaps, so a write outside a destination shows up) and a list of fabric descriptors. FabricOps
executes the list on a copy of the image; the engine executes it in Verilator on hp_ddr_model
(random back-pressure, random gaps before each command); the whole region must come back byte for
byte and every answer must carry FabricOps' code. Error cases (DDR error windows) check the code
and are followed by a checked case on the same run, so a hang or a dirty state after an error
fails too.

One Verilator build (sim/fabric_vector_top.py: max_n 8960, 8 tokens) serves every test.
"""

from __future__ import annotations

import functools
import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from sw.config import PRESETS
from sw.contract import fabric_ops as fo
from sw.contract.commands import ErrorCode, HardwareLimits, activation_layout
from sw.contract.fabric_commands import (FabricCommand, FabricFlags, Opcode, kv_cache_layout, row_stride,
                                         validate_fabric_command)
from sw.driver.fabric_exec import FabricOps
from sw.driver.golden_device import BusError, PhysMemory

REPO = Path(__file__).resolve().parent.parent
SIM_DIR = REPO / "sim"
F32 = np.float32
BASE = 0x10000
HW = HardwareLimits(tile_rows=64, tokens=8, group_size=64, addr_bits=32, max_context=4096)


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

@dataclass
class Case:
    """One memory region at BASE and a command list (with RUN_POS / RUN_TOKEN per command)."""
    name: str
    rng: np.random.Generator
    size: int = 0
    chunks: list = field(default_factory=list)            # (addr, bytes)
    cmds: list = field(default_factory=list)              # (FabricCommand, pos, token)
    ddr: dict = field(default_factory=dict)
    expect: list | None = None                            # codes, when not FabricOps' (bus errors)
    check_memory: bool = True
    soft_reset: bool = False                              # reset the (idle) engine before the case
    image_cache: np.ndarray | None = None

    def alloc(self, nbytes: int, data=None) -> int:
        """A 64-byte aligned buffer after a random guard gap of 64..192 bytes."""
        self.size += 64 * int(self.rng.integers(1, 4))
        addr = BASE + self.size
        self.size += -(-nbytes // 64) * 64
        if data is not None:
            self.chunks.append((addr, np.ascontiguousarray(data).view(np.uint8).reshape(-1)))
        return addr

    def rows(self, x: np.ndarray, stride: int) -> int:
        """fp32 rows [T, n] at `stride` bytes apart."""
        t, n = x.shape
        buf = self.rng.integers(0, 256, (t - 1) * stride + 4 * n, dtype=np.uint8)
        for r in range(t):
            buf[r * stride:r * stride + 4 * n] = np.ascontiguousarray(x[r], "<f4").view(np.uint8)
        return self.alloc(buf.size, buf)

    def add(self, cmd: FabricCommand, pos: int = 0, token: int = 0) -> None:
        code = validate_fabric_command(cmd, HW)
        assert code == ErrorCode.NONE, (cmd, code)
        self.cmds.append((cmd, pos, token))

    def image(self) -> np.ndarray:
        img = self.rng.integers(0, 256, self.size + 256, dtype=np.uint8)
        for addr, data in self.chunks:
            img[addr - BASE:addr - BASE + data.size] = data
        return img

    def golden(self, img: np.ndarray) -> tuple[np.ndarray, list[int]]:
        mem = PhysMemory()
        out = img.copy()
        mem.add_region(BASE, out)
        ops = FabricOps(mem, bus_error=BusError)
        codes = [int(ops.execute(c, pos, tok)[0]) for c, pos, tok in self.cmds]
        return out, codes


def _stride(n: int, rng, extra: bool = True) -> int:
    return row_stride(n) + (64 * int(rng.integers(0, 3)) if extra else 0)


def _normal(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def act_buffer(case: Case, n: int, group: int, T: int) -> int:
    """An activation buffer (activation_layout(n, group, T)) filled with random bytes."""
    nbytes = activation_layout(n, group, T).total_bytes
    return case.alloc(nbytes, case.rng.integers(0, 256, nbytes, dtype=np.uint8))


QOUT = int(FabricFlags.QUANT_OUT)


def op_add(case: Case, n: int, T: int, silu: bool = False, in_place: bool = False, quant: int = 0) -> None:
    """ADD / SILU_MUL; quant = G: SILU_MUL with QUANT_OUT (group G) into an activation buffer."""
    rng = case.rng
    ss, ds, p0 = _stride(n, rng), _stride(n, rng), _stride(n, rng)
    gate = _normal(rng, (T, n), 3.0)
    if quant and T * n > 2 * quant:
        gate[0, quant:2 * quant] = F32(1e-39)                        # silu -> below AMAX_MIN: a dead group
    a = case.rows(gate, ss)
    b = case.rows(_normal(rng, (T, n)), p0)
    if quant:
        case.add(FabricCommand(Opcode.SILU_MUL, n, T, src0=a, src1=b, dst=act_buffer(case, n, quant, T),
                               src_stride=ss, p0=p0, aux=quant, flags=QOUT))
        return
    dst = a if in_place else case.alloc((T - 1) * ds + 4 * n)
    case.add(FabricCommand(Opcode.SILU_MUL if silu else Opcode.ADD, n, T, src0=a, src1=b, dst=dst,
                           src_stride=ss, dst_stride=ss if in_place else ds, p0=p0))


def op_rmsnorm(case: Case, n: int, T: int, eps: float = 1e-6, quant: int = 0) -> None:
    """RMSNORM; quant = G: with QUANT_OUT (group G) into an activation buffer."""
    rng = case.rng
    ss, ds = _stride(n, rng), _stride(n, rng)
    x = _normal(rng, (T, n), 0.7)
    if quant and T * n > 2 * quant:
        x[-1, n - quant:] = 0.0                                      # a dead group at the row's end
    x = case.rows(x, ss)
    g = case.alloc(4 * n, _normal(rng, n, 0.2) + F32(1))
    inv_n, e = fo.rms_constants(n, eps)
    consts = dict(p0=int(inv_n.view(np.uint32)), p1=int(e.view(np.uint32)))
    if quant:
        case.add(FabricCommand(Opcode.RMSNORM, n, T, src0=x, src1=g, dst=act_buffer(case, n, quant, T),
                               src_stride=ss, aux=quant, flags=QOUT, **consts))
        return
    dst = case.alloc((T - 1) * ds + 4 * n)
    case.add(FabricCommand(Opcode.RMSNORM, n, T, src0=x, src1=g, dst=dst, src_stride=ss, dst_stride=ds, **consts))


def op_quant(case: Case, n: int, T: int, group: int) -> None:
    rng = case.rng
    ss = _stride(n, rng)
    ng = n // group
    x = (rng.standard_normal((T, ng, group)) * (10.0 ** rng.uniform(-2, 2, (T, ng, 1)))).astype(F32)
    if T * ng > 2:
        x[0, min(1, ng - 1)] = 0.0                                   # a dead group: scale 0, codes 0
    src = case.rows(x.reshape(T, n), ss)
    dst = case.alloc(activation_layout(n, group, T).total_bytes,
                     rng.integers(0, 256, activation_layout(n, group, T).total_bytes, dtype=np.uint8))
    case.add(FabricCommand(Opcode.QUANT, n, T, src0=src, dst=dst, src_stride=ss, aux=group))


def rope_table(case: Case, hd: int, rows: int, theta: float = 1e6) -> int:
    cos, sin = fo.rope_half_tables(hd, theta, np.arange(rows))
    return case.alloc(rows * 4 * hd, np.concatenate([cos, sin], axis=1).astype("<f4"))


def op_rope(case: Case, n: int, T: int, hd: int, table: int, rows: int, pos: int, in_place: bool,
            quant: bool = False) -> None:
    """ROPE; quant: with QUANT_OUT (group = head_dim) into an activation buffer."""
    rng = case.rng
    ss, ds = _stride(n, rng), _stride(n, rng)
    x = _normal(rng, (T, n), 2.0)
    if quant and n > hd:
        x[0, hd:2 * hd] = 0.0                                        # a dead head
    x = case.rows(x, ss)
    if quant:
        case.add(FabricCommand(Opcode.ROPE, n, T, src0=x, src1=table, dst=act_buffer(case, n, hd, T),
                               src_stride=ss, aux=hd, p0=rows, flags=QOUT), pos=pos)
        return
    dst = x if in_place else case.alloc((T - 1) * ds + 4 * n)
    case.add(FabricCommand(Opcode.ROPE, n, T, src0=x, src1=table, dst=dst, src_stride=ss,
                           dst_stride=ss if in_place else ds, aux=hd, p0=rows), pos=pos)


def kv_cache(case: Case, nkv: int, hd: int, cap: int) -> int:
    lay = kv_cache_layout(nkv, hd, cap)
    return case.alloc(lay.total_bytes, case.rng.integers(0, 256, lay.total_bytes, dtype=np.uint8))


def op_kv_store(case: Case, nkv: int, hd: int, T: int, cache: int, cap: int, pos: int, value: bool) -> None:
    rng = case.rng
    n = nkv * hd
    ss = _stride(n, rng)
    x = _normal(rng, (T, n), 1.5)
    if T > 1:
        x[1, :hd] = 0.0                                              # a dead head
    src = case.rows(x, ss)
    case.add(FabricCommand(Opcode.KV_STORE, n, T, src0=src, dst=cache, src_stride=ss, aux=hd, p0=cap, p1=nkv,
                           flags=int(FabricFlags.VALUE) if value else 0), pos=pos)


def embed_table(case: Case, vocab: int, n: int) -> int:
    return case.alloc(vocab * 2 * n, case.rng.integers(0, 1 << 16, (vocab, n), dtype=np.uint16))


def op_embed(case: Case, n: int, ids, table: int, vocab: int, token_reg: bool = False) -> None:
    rng = case.rng
    T = len(ids)
    ds = _stride(n, rng)
    dst = case.alloc((T - 1) * ds + 4 * n)
    if token_reg:
        case.add(FabricCommand(Opcode.EMBED, n, 1, src1=table, dst=dst, dst_stride=ds, p0=vocab,
                               flags=int(FabricFlags.TOKEN_REG)), token=int(ids[0]))
    else:
        src = case.alloc(4 * T, np.asarray(ids, "<i4"))
        case.add(FabricCommand(Opcode.EMBED, n, T, src0=src, src1=table, dst=dst, dst_stride=ds, p0=vocab))


def model_ops(case: Case, preset: str, T: int, pos: int, group: int) -> None:
    """Every op at a model's shapes, as a decoder layer uses them (plus EMBED)."""
    cfg = PRESETS[preset]
    hid, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    cap = pos + T + 3
    vocab = 37
    table = embed_table(case, vocab, hid)
    op_embed(case, hid, case.rng.integers(0, vocab, T), table, vocab)
    op_rmsnorm(case, hid, T, cfg.rms_norm_eps)
    op_quant(case, hid, T, group)
    rt = rope_table(case, hd, cap)
    op_rope(case, nq * hd, T, hd, rt, cap, pos, in_place=True)
    op_rope(case, nkv * hd, T, hd, rt, cap, pos, in_place=False)
    cache = kv_cache(case, nkv, hd, cap)
    op_kv_store(case, nkv, hd, T, cache, cap, pos, value=False)
    op_kv_store(case, nkv, hd, T, cache, cap, pos, value=True)
    op_quant(case, nq * hd, T, hd)                                  # the query heads
    op_add(case, hid, T, in_place=True)
    op_add(case, inter, T, silu=True)
    op_quant(case, inter, T, group)


def model_fused_ops(case: Case, preset: str, T: int, pos: int, group: int) -> None:
    """The producers with QUANT_OUT at a model's shapes, as the fused decoder layer uses them."""
    cfg = PRESETS[preset]
    hid, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    cap = pos + T + 3
    op_rmsnorm(case, hid, T, cfg.rms_norm_eps, quant=group)
    rt = rope_table(case, hd, cap)
    op_rope(case, nq * hd, T, hd, rt, cap, pos, in_place=False, quant=True)    # the query heads
    op_rope(case, nkv * hd, T, hd, rt, cap, pos, in_place=False)                # K: unfused, then fused again
    op_rope(case, nkv * hd, T, hd, rt, cap, pos, in_place=False, quant=True)
    op_add(case, inter, T, silu=True, quant=group)
    op_rmsnorm(case, hid, T, cfg.rms_norm_eps)                                  # unfused after fused
    op_rmsnorm(case, hid, T, cfg.rms_norm_eps, quant=group)


def tiny_cases(seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    # 1. every op at the tiny shapes, with odd corners: row tails (n % 4), T*K not a multiple of 64,
    #    groups per row not a multiple of 4, scales at every lane of a beat, TOKEN_REG.
    c = Case("tiny_ops", rng, ddr={"gap_rate": 0.25, "seed": 7})
    model_ops(c, "tiny", 3, 5, 32)
    op_add(c, 130, 2)                                               # a 2-lane tail
    op_add(c, 27, 3, silu=True)                                     # a 3-lane tail, rows shorter than a beat row
    op_rmsnorm(c, 126, 3)
    op_rmsnorm(c, 9, 1)
    op_quant(c, 96, 1, 32)                                          # codes 96 B: 32 zero bytes to the scales
    op_quant(c, 384, 3, 128)
    op_quant(c, 32, 1, 32)
    cache = kv_cache(c, 2, 32, 11)
    for pos in (0, 1, 2, 7):                                        # the scale at each lane of its beat
        op_kv_store(c, 2, 32, 1, cache, 11, pos, value=bool(pos & 1))
    op_kv_store(c, 2, 32, 4, cache, 11, 7, value=False)              # the last positions
    t = embed_table(c, 50, 136)
    op_embed(c, 136, [49], t, 50, token_reg=True)
    op_embed(c, 136, [0, 49, 3, 3, 17, 2, 8, 1], t, 50)            # 8 ids: two beats of ids
    rt = rope_table(c, 64, 9)
    op_rope(c, 192, 2, 64, rt, 9, 7, in_place=True)
    op_rope(c, 256, 1, 128, rope_table(c, 128, 4), 4, 3, in_place=False)
    cases.append(c)

    # 1b. the producers with QUANT_OUT: groups 32, 64, 128, ROPE at head_dim 32, 64, 128, T = 1..8,
    #     mixed with unfused ops and QUANTs (every switch between them)
    c = Case("tiny_fused", rng, ddr={"gap_rate": 0.2, "seed": 13})
    model_fused_ops(c, "tiny", 3, 5, 32)
    op_rmsnorm(c, 256, 2, quant=64)
    op_rmsnorm(c, 384, 1, quant=128)
    op_rmsnorm(c, 128, 8, quant=32)
    op_add(c, 384, 2, silu=True, quant=128)
    op_add(c, 128, 1, silu=True, quant=64)
    op_add(c, 130, 2)                                               # unfused, a row tail
    op_add(c, 96, 5, silu=True, quant=32)
    op_quant(c, 128, 2, 64)
    op_add(c, 256, 3, silu=True, quant=64)                          # QUANT -> fused
    rt = rope_table(c, 64, 9)
    op_rope(c, 192, 2, 64, rt, 9, 7, in_place=False, quant=True)
    op_rope(c, 256, 1, 128, rope_table(c, 128, 4), 4, 3, in_place=False, quant=True)
    op_rope(c, 64, 4, 32, rope_table(c, 32, 6), 6, 2, in_place=False, quant=True)
    cases.append(c)

    # 2. run-time errors FabricOps reports: nothing is written
    c = Case("tiny_run_errors", rng, ddr={"gap_rate": 0.1, "seed": 3})
    rt = rope_table(c, 32, 8)
    op_rope(c, 128, 3, 32, rt, 8, 6, in_place=True)                # 6 + 3 > 8: CONTEXT_FULL
    op_rope(c, 128, 3, 32, rt, 8, 6, in_place=False, quant=True)   # the same with QUANT_OUT
    cache = kv_cache(c, 2, 32, 8)
    op_kv_store(c, 2, 32, 2, cache, 8, 7, value=True)                # CONTEXT_FULL
    op_kv_store(c, 2, 32, 1, cache, 8, 7, value=True)                # fits exactly
    t = embed_table(c, 20, 128)
    op_embed(c, 128, [3, 20, 1], t, 20)                              # id == vocab: BAD_TOKEN
    op_embed(c, 128, [3, 1, -1], t, 20)                              # negative: BAD_TOKEN
    op_embed(c, 128, [20], t, 20, token_reg=True)                    # BAD_TOKEN
    op_embed(c, 128, [19, 0], t, 20)
    cases.append(c)

    # 3. bus errors: a read error (ROPE's table, then ADD's second operand), a write error (QUANT's
    #    scales, RMSNORM's output); each engine answer must come, then a checked case follows.
    c = Case("tiny_read_error", rng, check_memory=False)
    rt = rope_table(c, 32, 8)
    op_rope(c, 128, 3, 32, rt, 8, 2, in_place=False)
    op_add(c, 384, 4)
    bad_b = c.cmds[-1][0].src1
    c.ddr = {"slverr_window": [rt + 4 * 32 * 3, rt + 4 * 32 * 4], "decerr_window": [bad_b + 2048, bad_b + 2064]}
    c.expect = [int(ErrorCode.READ_ERROR)] * 2
    cases.append(c)
    c = Case("tiny_write_error", rng, check_memory=False)
    op_quant(c, 384, 4, 32)
    op_rmsnorm(c, 128, 2)
    q, r = c.cmds[0][0], c.cmds[1][0]
    so = activation_layout(384, 32, 4).scales_offset
    c.ddr = {"decerr_window": [q.dst + so, q.dst + so + 16],
             "slverr_window": [r.dst + r.dst_stride, r.dst + r.dst_stride + 16]}
    c.expect = [int(ErrorCode.WRITE_ERROR)] * 2
    cases.append(c)
    c = Case("tiny_fused_write_error", rng, check_memory=False)       # QUANT_OUT: qsums, codes of row 1
    op_add(c, 256, 2, silu=True, quant=64)
    op_rope(c, 128, 2, 32, rope_table(c, 32, 8), 8, 1, in_place=False, quant=True)
    f, r = c.cmds[0][0], c.cmds[1][0]
    fq = activation_layout(256, 64, 2).qsums_offset
    c.ddr = {"decerr_window": [f.dst + fq, f.dst + fq + 16], "slverr_window": [r.dst + 128, r.dst + 144]}
    c.expect = [int(ErrorCode.WRITE_ERROR)] * 2
    cases.append(c)
    c = Case("tiny_after_errors", rng, ddr={"gap_rate": 0.3, "seed": 11}, soft_reset=True)
    op_quant(c, 128, 2, 32)
    op_rmsnorm(c, 128, 2, quant=32)
    op_add(c, 128, 2)
    rt = rope_table(c, 32, 8)
    op_rope(c, 128, 3, 32, rt, 8, 2, in_place=True)
    cases.append(c)
    return cases


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

def op_payload(layout, cmd: FabricCommand, pos: int, token: int) -> int:
    """The bits of fabric_op_layout for a descriptor and the run registers."""
    values = {name: getattr(cmd, name) for name in ("opcode", "flags", "n", "tokens", "aux", "tag", "src0", "src1",
                                                      "dst", "src_stride", "dst_stride", "p0", "p1", "p2", "p3")}
    values.update(run_pos=pos, run_token=token)
    word = 0
    for name, member in layout:
        v = values[name] & ((1 << member.width) - 1)
        word |= v << member.offset
    return word


@functools.lru_cache(maxsize=None)
def bench():
    from sim.fabric_vector_top import bench_sources
    t0 = time.time()
    sources, build, top = bench_sources()
    return sources, build, top.engine.cmd.payload.shape(), time.time() - t0


def run_cases(cases: list[Case], tmp_path: Path, seed: int = 1, cmd_gap: int = 24) -> list[dict]:
    from sim.ddr import write_image
    from sim.fabric_vector_top import FVEC_DDR, TOP_NAME
    from sim.runner import BUILD_ROOT, run_cocotb
    sources, build, layout, elab = bench()
    spec = {"seed": seed, "results": str(tmp_path / "results.json"), "cases": []}
    expected = []
    for k, case in enumerate(cases):
        img = case.image_cache = case.image()
        gold, codes = case.golden(img)
        if case.expect is not None:
            codes = case.expect
        expected.append((gold, codes))
        path = write_image(tmp_path / f"case{k}.hex", [(BASE, img)], FVEC_DDR)
        work = max(c.tokens * c.n for c, _, _ in case.cmds)
        spec["cases"].append({
            "name": case.name, "image": str(path), "ddr": case.ddr, "cmd_gap": cmd_gap, "done_hold": 0.3,
            "soft_reset": case.soft_reset,
            "cmds": [hex(op_payload(layout, c, pos, tok)) for c, pos, tok in case.cmds],
            "timeout": 10 * work + 20000,
            "dumps": [[BASE, img.size, str(tmp_path / f"case{k}.bin")]] if case.check_memory else [],
        })
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    t0 = time.time()
    fresh = not (BUILD_ROOT / f"{build}-verilator").exists()
    run_cocotb(sources=sources, toplevel=TOP_NAME, test_module="tb_fabric_vector", build_name=build,
               test_dir=SIM_DIR, fast_compile=True, extra_env={"FVEC_SPEC": str(tmp_path / "spec.json")})
    print(f"elaboration {elab:.0f} s, cocotb (build{' from scratch' if fresh else ' cached'} + run) "
          f"{time.time() - t0:.0f} s")
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results] == [c.name for c in cases]
    for k, (case, res, (gold, codes)) in enumerate(zip(cases, results, expected)):
        assert res["codes"] == codes, f"{case.name}: codes {res['codes']} expected {codes} for " \
                                      f"{[c.op.name for c, _, _ in case.cmds]}"
        assert res["stats"]["protocol_errors"] == 0, f"{case.name}: AXI protocol errors {res['stats']}"
        print(f"{case.name}: codes {res['codes']} cycles {res['cycles']}")
        if case.check_memory:
            changed = int(np.count_nonzero(gold != case.image_cache))
            assert changed > 0 or not any(c == 0 for c in codes), f"{case.name}: the ops change nothing"
            print(f"{case.name}: {changed} bytes changed by FabricOps, all {gold.size} compared")
            got = np.frombuffer((tmp_path / f"case{k}.bin").read_bytes(), np.uint8)
            bad = np.flatnonzero(got != gold)
            assert not len(bad), f"{case.name}: {len(bad)} bytes differ, first at " \
                                 f"{[hex(BASE + int(b)) for b in bad[:8]]} ({_where(case, BASE + int(bad[0]))})"
    return results


def _where(case: Case, addr: int) -> str:
    """The command whose buffers are nearest below `addr` (for failure messages)."""
    best = None
    for i, (c, _, _) in enumerate(case.cmds):
        for f in ("dst", "src0", "src1"):
            a = getattr(c, f)
            if a and a <= addr and (best is None or a > best[0]):
                best = (a, f"cmd {i} {c.op.name} {f}+{addr - a:#x}")
    return best[1] if best else "?"


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def test_op_payload_layout():
    from rtl.fabric_cmd import fabric_op_layout
    lay = fabric_op_layout(32)
    cmd = FabricCommand(Opcode.ADD, 5, 2, src0=0x1000, src1=0x2000, dst=0x3000, src_stride=64, dst_stride=128, p0=64)
    word = op_payload(lay, cmd, 7, 9)
    assert (word >> lay["n"].offset) & 0xFFFFFFFF == 5
    assert (word >> lay["dst"].offset) & 0xFFFFFFFF == 0x3000
    assert (word >> lay["run_token"].offset) & 0xFFFFFF == 9


def test_tiny_cases_are_valid_and_golden_runs():
    """The workloads themselves: descriptors valid, FabricOps' codes as intended."""
    cases = {c.name: c for c in tiny_cases(1)}
    errs = cases["tiny_run_errors"]
    _, codes = errs.golden(errs.image())
    assert codes == [ErrorCode.CONTEXT_FULL, ErrorCode.CONTEXT_FULL, ErrorCode.CONTEXT_FULL, 0, ErrorCode.BAD_TOKEN,
                     ErrorCode.BAD_TOKEN, ErrorCode.BAD_TOKEN, 0]
    for name in ("tiny_ops", "tiny_fused"):
        _, codes = cases[name].golden(cases[name].image())
        assert not any(codes)


@pytest.mark.sim
def test_fabric_vector_tiny(tmp_path):
    """Every op at the tiny preset's shapes and odd corners, run-time and bus errors: one build."""
    run_cases(tiny_cases(2024), tmp_path)


@pytest.mark.sim
@pytest.mark.slow
@pytest.mark.parametrize("preset, group", [("qwen2.5-0.5b", 64), ("qwen2.5-1.5b", 128)])
def test_fabric_vector_models(preset, group, tmp_path):
    rng = np.random.default_rng(zlib.crc32(preset.encode()))
    c1 = Case(f"{preset}_T1", rng, ddr={"gap_rate": 0.15, "seed": 5})
    model_ops(c1, preset, 1, 40, group)
    model_fused_ops(c1, preset, 1, 40, group)
    c8 = Case(f"{preset}_T8", rng, ddr={"gap_rate": 0.1, "seed": 9})
    model_ops(c8, preset, 8, 3, group)
    model_fused_ops(c8, preset, 8, 3, group)
    run_cases([c1, c8], tmp_path, cmd_gap=8)


PERF_OPS = ("EMBED", "RMSNORM", "QUANT", "ROPE", "KV_STORE", "ADD", "SILU_MUL", "RMSNORM+Q", "SILU_MUL+Q", "ROPE+Q")


def perf_cases(seed: int = 5) -> tuple[list[Case], list[str]]:
    """One op per command at qwen2.5-0.5b sizes, no back-pressure: the cycles of each."""
    rng = np.random.default_rng(seed)
    cfg = PRESETS["qwen2.5-0.5b"]
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    c = Case("perf", rng)
    labels = []
    for T in (1, 8):
        for n in (896, 4864):
            op_add(c, n, T)
            op_add(c, n, T, silu=True)
            op_rmsnorm(c, n, T)
            op_quant(c, n, T, 128)
            labels += [f"ADD n={n} T={T}", f"SILU_MUL n={n} T={T}", f"RMSNORM n={n} T={T}",
                       f"QUANT n={n} g=128 T={T}"]
        t = embed_table(c, 16, 896)
        op_embed(c, 896, rng.integers(0, 16, T), t, 16)
        rt = rope_table(c, hd, T + 4)
        op_rope(c, nq * hd, T, hd, rt, T + 4, 2, in_place=True)
        cache = kv_cache(c, nkv, hd, T + 4)
        op_kv_store(c, nkv, hd, T, cache, T + 4, 2, value=False)
        labels += [f"EMBED n=896 T={T}", f"ROPE n={nq * hd} hd={hd} T={T}", f"KV_STORE n={nkv * hd} T={T}"]
        # QUANT_OUT ("+Q") against the producer and a QUANT at the same group (64)
        for n in (896, 4864):
            op_quant(c, n, T, 64)
            op_rmsnorm(c, n, T, quant=64)
            op_add(c, n, T, silu=True, quant=64)
            labels += [f"QUANT n={n} g=64 T={T}", f"RMSNORM+Q n={n} g=64 T={T}", f"SILU_MUL+Q n={n} g=64 T={T}"]
        op_rope(c, nq * hd, T, hd, rt, T + 4, 2, in_place=False, quant=True)
        labels += [f"ROPE+Q n={nq * hd} hd={hd} T={T}"]
    return [c], labels


def overhead_fit(labels: list[str], cycles: list[int], cmds: list) -> dict:
    """Per op kind and n: the cycles beyond FabricPerf's stream (and QUANT's per-group term), i.e.
    VECTOR_OVERHEAD's (fixed, per extra row) as measured: fixed = T=1's, per row = (T=8's - T=1's) / 7."""
    from sw.contract.fabric_commands import quant_out
    from sw.driver.fabric_exec import VECTOR_OVERHEAD, FabricPerf
    perf = FabricPerf()
    over = {}
    for label, cyc, (cmd, pos, _) in zip(labels, cycles, cmds):
        key = cmd.op.name + ("+Q" if quant_out(cmd) else "")
        fixed, per_row = VECTOR_OVERHEAD[key]
        base = perf.cost(cmd, pos)[0] - fixed - per_row * (cmd.tokens - 1)      # stream (+ QUANT's groups)
        kind = label.rsplit(" T=", 1)[0]
        over.setdefault(kind, {})[cmd.tokens] = cyc - base
    fit = {}
    for kind, o in over.items():
        if 1 in o and 8 in o:
            fit[kind] = {"fixed": o[1], "per_extra_row": round((o[8] - o[1]) / 7, 1)}
    return fit


@pytest.mark.sim
@pytest.mark.slow
def test_fabric_vector_cycles(tmp_path):
    """Cycles per op (command handshake to done, every B response in) at 0.5b sizes, bit-exact too."""
    cases, labels = perf_cases()
    res = run_cases(cases, tmp_path, cmd_gap=0)
    table = []
    for label, cyc, (cmd, _, _) in zip(labels, res[0]["cycles"], cases[0].cmds):
        elems = cmd.tokens * cmd.n * (2 if cmd.op == Opcode.RMSNORM else 1)
        table.append({"op": label, "cycles": cyc, "vector_bound": elems // 4,
                      "cycles_per_element": round(cyc / (cmd.tokens * cmd.n), 3)})
    fit = overhead_fit(labels, res[0]["cycles"], cases[0].cmds)
    (tmp_path / "cycles.json").write_text(json.dumps({"table": table, "overhead_fit": fit}, indent=1))
    print(json.dumps(table, indent=1))
    print("overhead beyond FabricPerf's stream (fixed at T=1, per extra row from T=8):")
    print(json.dumps(fit, indent=1))
    for row in table:
        assert row["cycles"] < 3 * row["vector_bound"] + 400, row
    # the cost model (sw/driver/fabric_exec.py VECTOR_OVERHEAD) is these measurements: within 3
    # cycles fixed and 1 per extra row (QUANT's entry is its group-128 fit; here the groups are 64)
    from sw.driver.fabric_exec import VECTOR_OVERHEAD
    for kind, f in fit.items():
        op = kind.split(" ")[0]
        if op == "QUANT":
            continue
        fixed, per_row = VECTOR_OVERHEAD[op]
        assert abs(f["fixed"] - fixed) <= 3 and abs(f["per_extra_row"] - per_row) <= 1, (kind, f, (fixed, per_row))


# ---------------------------------------------------------------------------
# Amaranth simulator: the sequencer's loop generator and ROPE's block buffer
# ---------------------------------------------------------------------------

def test_loop_generator_pysim():
    """(t, g, k) order, addresses base + t*st_t + g*st_g, the last row's pads, back-pressure."""
    from amaranth.hdl import Module, Signal
    from amaranth.sim import Simulator

    from rtl.fabric_vector import _LoopGen
    m = Module()
    gen = _LoopGen("g", 3, 32)
    go = Signal()
    gen.elaborate(m, go)
    n_t, n_g, n_k = 3, 2, 3
    base, st_t, st_g = [0x1000, 0x8000, 0x20000], [0x100, 0x40, 4], [0x10, 0x400, 0x44]
    beats, pad = [4, 1, 2], [1, 0, 3]
    expect = [(base[k] + t * st_t[k] + g * st_g[k], beats[k] + (pad[k] if t == n_t - 1 else 0))
              for t in range(n_t) for g in range(n_g) for k in range(n_k)]
    got = []

    async def bench(ctx):
        ctx.set(gen.n_t, n_t)
        ctx.set(gen.n_g, n_g)
        ctx.set(gen.n_k, n_k)
        for k in range(3):
            for sig, v in ((gen.base, base), (gen.st_t, st_t), (gen.st_g, st_g), (gen.beats, beats),
                           (gen.pad, pad)):
                ctx.set(sig[k], v[k])
        ctx.set(go, 1)
        await ctx.tick()
        ctx.set(go, 0)
        rng = np.random.default_rng(3)
        for _ in range(200):
            ready = int(rng.random() < 0.6)
            ctx.set(gen.ready, ready)
            if ctx.get(gen.valid) and ready:
                got.append((ctx.get(gen.addr), ctx.get(gen.out_beats)))
            await ctx.tick()
        assert not ctx.get(gen.valid)

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert got == expect


@pytest.mark.parametrize("rotate", [True, False])
def test_block_buffer_pysim(rotate):
    """Blocks of B beats in, each played R times: x and its rotated half, or cos / sin twice."""
    from amaranth.hdl import Module
    from amaranth.sim import Simulator

    from rtl.fabric_vector import _BlockBuffer
    m = Module()
    buf = _BlockBuffer("b", 32)
    buf.elaborate(m)
    B, R, blocks = 8, 1 if rotate else 3, 5
    data = [[(k << 8) | j for j in range(B)] for k in range(blocks)]
    h = B // 2
    expect = []
    for blk in data:
        for _ in range(R):
            for j in range(B):
                expect.append((blk[j], blk[j ^ h]) if rotate else (blk[j % h], blk[h + j % h]))
    got = []

    async def bench(ctx):
        ctx.set(buf.B, B)
        ctx.set(buf.R, R)
        ctx.set(buf.rotate, int(rotate))
        rng = np.random.default_rng(5)
        flat = [v for blk in data for v in blk]
        i = 0
        for _ in range(400):
            valid = int(i < len(flat) and rng.random() < 0.7)
            ctx.set(buf.in_valid, valid)
            ctx.set(buf.in_data, flat[i] if i < len(flat) else 0)
            ready = int(rng.random() < 0.6)
            ctx.set(buf.out_ready, ready)
            if valid and ctx.get(buf.in_ready):
                i += 1
            if ready and ctx.get(buf.out_valid):
                got.append((ctx.get(buf.p0), ctx.get(buf.p1)))
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert got == expect
