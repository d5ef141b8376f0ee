"""rtl/fabric_attend.py (FabricAttendEngine) against sw.driver.fabric_exec.FabricOps, byte for byte.

A memory image holds random bytes everywhere, INT8 KV caches (kv_cache_layout) with codes and
scales from fabric_ops.quantize_heads, query activation buffers exactly as QUANT writes them
(numerics.quantize_activations + commands.pack_activations, group head_dim) and dst regions.
A sequence of ATTEND descriptors (decode T = 1 and causal prefill chunks T > 1 at several
RUN_POS, several caches with odd capacities so scale reads start mid-beat, padded dst rows)
runs on a Verilator build of the engine on the DDR model with random back-pressure
(``gap_rate``), random command gaps and random ``done`` ready. The same sequence runs on
FabricOps.execute over a NumPy copy of the image (behind validate_fabric_command and the
engine's own shape check); the answer codes must be equal and the final memories equal byte
for byte. Error cases: BAD_FIELD (a shape the build does not hold), TOO_MANY_TOKENS,
CONTEXT_FULL (memory untouched), READ_ERROR (SLVERR on K codes, DECERR on the queries),
WRITE_ERROR (SLVERR on a dst row) and an abort followed by a reset of the engine: each is
followed by a correct op, and only the failed op's dst rows are left out of the comparison
(the engine may have written some of them; the golden model writes none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from sw.contract import fabric_ops as fo
from sw.contract.commands import ErrorCode, HardwareLimits, activation_layout, pack_activations
from sw.contract.errors import ConfigError
from sw.contract.fabric_commands import FabricCommand, Opcode, kv_cache_layout, validate_fabric_command
from sw.contract.numerics import quantize_activations
from sw.driver.fabric_exec import FabricOps

F32 = np.float32
SIM_DIR = Path(__file__).resolve().parent.parent / "sim"
MAX_CONTEXT = 1 << 15          # the hardware limit validation sees (above every build's max_positions)


# ---- the golden side ------------------------------------------------------------------------------
class _BusError(Exception):
    pass


class WindowedMemory:
    """One flat memory at address 0; a view overlapping an error window raises (the AXI error)."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.windows: list[tuple[int, int]] = []

    def view(self, addr: int, nbytes: int) -> np.ndarray:
        if addr < 0 or addr + nbytes > self.data.size or \
                any(addr < hi and lo < addr + nbytes for lo, hi in self.windows):
            raise _BusError(f"{addr:#x}+{nbytes}")
        return self.data[addr:addr + nbytes]


def expected_code(cmd: FabricCommand, pos: int, shape: dict, hw: HardwareLimits, ops: FabricOps) -> ErrorCode:
    """What the design answers: validation's code, then the engine's shape check, then FabricOps."""
    code = validate_fabric_command(cmd, hw)
    if code != ErrorCode.NONE:
        return code
    D, G = shape["head_dim"], shape["group"]       # G: the largest GQA ratio the build takes
    if cmd.aux != D or cmd.n // D // cmd.p1 > G or cmd.p0 > shape["max_positions"]:
        return ErrorCode.BAD_FIELD
    return ops.execute(cmd, pos, 0)[0]


# ---- memory images ---------------------------------------------------------------------------------
class Allocator:
    def __init__(self, base: int, size: int, rng):
        self.next, self.size, self.rng = base, size, rng

    def take(self, nbytes: int) -> int:
        addr = self.next + 64 * int(self.rng.integers(0, 4))      # varied 4 KiB page phases
        self.next = (addr + nbytes + 63) & ~63
        assert self.next <= self.size, "the scenario does not fit the modelled memory"
        return addr


def make_cache(mem: np.ndarray, alloc: Allocator, rng, kv_heads: int, head_dim: int, capacity: int) -> int:
    """A random layer cache (codes and scales like KV_STORE writes them); returns its address."""
    lay = kv_cache_layout(kv_heads, head_dim, capacity)
    addr = alloc.take(lay.total_bytes)
    for value in (False, True):
        x = rng.standard_normal((kv_heads, capacity, head_dim)).astype(F32) * F32(2 if value else 3)
        x[:, rng.random(capacity) < 0.05] = 0                 # all-zero rows: scale +0.0
        codes, scales = fo.quantize_heads(x)
        c0, s0 = addr + lay.codes_offset(value), addr + lay.scales_offset(value)
        mem[c0:c0 + codes.size] = codes.view(np.uint8).ravel()
        mem[s0:s0 + 4 * scales.size] = np.ascontiguousarray(scales, "<f4").view(np.uint8).ravel()
    return addr


def make_queries(mem: np.ndarray, alloc: Allocator, rng, tokens: int, heads: int, head_dim: int) -> int:
    """A query activation buffer as QUANT (group head_dim) writes it; returns its address."""
    n = heads * head_dim
    x = rng.standard_normal((tokens, n)).astype(F32) * F32(rng.uniform(0.5, 4))
    q, s, qsum = quantize_activations(x, head_dim)
    buf = np.frombuffer(pack_activations(q, s, qsum, head_dim), np.uint8)
    assert buf.size == activation_layout(n, head_dim, tokens).total_bytes
    addr = alloc.take(buf.size)
    mem[addr:addr + buf.size] = buf
    return addr


@dataclass
class Op:
    cmd: FabricCommand
    pos: int
    ddr: dict = field(default_factory=dict)       # DDR model run-time changes for this op
    gap: int = 0                                  # idle cycles before the command is offered
    abort_after: int | None = None
    perf: str | None = None                       # a label: report its cycles
    windows: list = field(default_factory=list)   # the golden side's error windows


def attend_cmd(*, n, tokens, aux, src0, src1, dst, dst_stride, p0, p1) -> FabricCommand:
    return FabricCommand(opcode=int(Opcode.ATTEND), n=n, tokens=tokens, aux=aux, src0=src0, src1=src1, dst=dst,
                         dst_stride=dst_stride, p0=p0, p1=p1, tag=0xA77E)


class Scenario:
    """Builds the image and the ops of one run."""

    def __init__(self, shape: dict, mem_bytes: int, seed: int):
        self.shape = shape
        self.rng = np.random.default_rng(seed)
        self.mem = self.rng.integers(0, 256, mem_bytes, dtype=np.uint8)
        self.alloc = Allocator(0x1000, mem_bytes, self.rng)
        self.ops: list[Op] = []
        self.caches: dict[str, tuple[int, int, int]] = {}

    def cache(self, name: str, kv_heads: int, capacity: int):
        D = self.shape["head_dim"]
        self.caches[name] = (make_cache(self.mem, self.alloc, self.rng, kv_heads, D, capacity), kv_heads, capacity)

    def op(self, cache: str, tokens: int, pos: int, *, pad_rows: int = 0, aux=None, p1=None, p0=None,
           query_tokens=None, group=None, **extra) -> Op:
        D, G = self.shape["head_dim"], group or self.shape["group"]
        addr, kv, cap = self.caches[cache]
        heads = kv * G
        n = heads * D
        src0 = make_queries(self.mem, self.alloc, self.rng, query_tokens or tokens, heads, D)
        stride = 4 * n + 64 * pad_rows
        dst = self.alloc.take(stride * tokens)
        cmd = attend_cmd(n=n, tokens=tokens, aux=aux or D, src0=src0, src1=addr, dst=dst, dst_stride=stride,
                         p0=cap if p0 is None else p0, p1=kv if p1 is None else p1)
        o = Op(cmd, pos, gap=int(self.rng.integers(0, 24)), **extra)
        self.ops.append(o)
        return o

    def queries_addr(self, o: Op) -> int:
        return o.cmd.src0

    def k_row(self, o: Op, g: int, p: int) -> int:
        return o.cmd.src1 + (g * o.cmd.p0 + p) * o.cmd.aux


def _payload(layout, cmd: FabricCommand, pos: int) -> int:
    values = {name: getattr(cmd, name) for name, _ in layout if hasattr(cmd, name)}
    values.update(run_pos=pos, run_token=0)
    out = 0
    for name, fld in layout:
        width = fld.shape.width
        out |= (values.get(name, 0) & ((1 << width) - 1)) << fld.offset
    return out


def _cycles_bound(shape: dict, cmd: FabricCommand, pos: int) -> int:
    from rtl.attention import AttentionGeometry
    geo = AttentionGeometry(shape["head_dim"], shape["group"], shape["macs"], shape["max_positions"])
    kv = max(1, cmd.p1)
    per = sum((pos + t + 1) * geo.cycles_per_position + 2 * shape["group"] * shape["head_dim"] + 600
              for t in range(min(cmd.tokens, shape["max_tokens"])))
    return 6 * kv * per + 20000


# ---- running ---------------------------------------------------------------------------------------
def run_scenario(sc: Scenario, tmp_path: Path, *, gap_rate: float, p_ready: float = 0.5, seed: int = 1):
    """Runs the ops on the RTL and on FabricOps; checks codes and memory; returns the bench results."""
    from rtl.fabric_cmd import fabric_op_layout
    from sim.ddr import write_image
    from sim.fabric_tops import ATTEND_DDR, fabric_attend_sources
    from sim.runner import run_cocotb

    shape = sc.shape
    ddr = ATTEND_DDR.replace(gap_rate=gap_rate, seed=seed, mem_bytes=sc.mem.size)
    layout = fabric_op_layout(ddr.addr_width)
    used = sc.alloc.next
    image = write_image(tmp_path / "image.hex", [(0, sc.mem[:used])], ddr)
    job = {
        "seed": seed, "image": str(image), "ddr": json.loads(ddr.to_json()), "p_ready": p_ready,
        "payload_bits": layout.size,
        "ops": [{"payload": f"{_payload(layout, o.cmd, o.pos):x}", "ddr": o.ddr, "gap": o.gap,
                 "abort_after": o.abort_after, "timeout": _cycles_bound(shape, o.cmd, o.pos)} for o in sc.ops],
        "dumps": [[0, used, str(tmp_path / "final.bin")]],
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    sources, build, top = fabric_attend_sources(shape, ddr)
    run_cocotb(sources=sources, toplevel=top, test_module="tb_fabric_attend", build_name=build,
               test_dir=SIM_DIR, fast_compile=True,
               extra_env={"FATTN_JOB": str(tmp_path / "job.json"), "FATTN_RESULTS": str(tmp_path / "res.json")})
    results = json.loads((tmp_path / "res.json").read_text())
    assert len(results) == len(sc.ops)

    # the golden run
    gold = WindowedMemory(sc.mem[:used].copy())
    ops = FabricOps(gold, bus_error=_BusError)
    hw = HardwareLimits(tile_rows=16, tokens=shape["max_tokens"], group_size=shape["head_dim"],
                        max_context=MAX_CONTEXT)
    mask = np.ones(used, bool)
    for i, (o, res) in enumerate(zip(sc.ops, results)):
        assert res["ddr"]["protocol_errors"] == 0, f"op {i}: AXI protocol errors"
        gold.windows = list(o.windows)
        if o.abort_after is not None:
            assert "code" not in res, f"op {i}: an aborted op answered"
            want = None
        else:
            want = expected_code(o.cmd, o.pos, shape, hw, ops)
            assert res["code"] == int(want), f"op {i} (T={o.cmd.tokens} pos={o.pos}): code {res['code']}, " \
                                             f"FabricOps {want!r}"
        if want in (ErrorCode.READ_ERROR, ErrorCode.WRITE_ERROR) or o.abort_after is not None:
            c = o.cmd
            for t in range(c.tokens):           # this op's dst rows are undefined
                mask[c.dst + t * c.dst_stride:c.dst + t * c.dst_stride + 4 * c.n] = False
        if want in (ErrorCode.BAD_FIELD, ErrorCode.CONTEXT_FULL, ErrorCode.TOO_MANY_TOKENS):
            assert res["ddr"]["bytes_read"] == 0 and res["ddr"]["bytes_written"] == 0, \
                f"op {i}: {want.name} touched memory"
    got = np.frombuffer((tmp_path / "final.bin").read_bytes(), np.uint8)
    assert got.size == used
    bad = np.flatnonzero((got != gold.data) & mask)
    assert bad.size == 0, (f"{bad.size} bytes differ from FabricOps, first at {[hex(b) for b in bad[:6]]}: "
                           f"got {got[bad[:6]]}, want {gold.data[bad[:6]]}")
    return results


def report(sc: Scenario, results, name: str) -> list[dict]:
    """Cycles of the ops labelled perf (command taken -> answer), per (row, KV group), beside the
    AttentionUnit's own busy cycles (and of those, its waits on the engine's streams) and the
    unit's model (n x cycles_per_position + FabricPerf.attn_command_cycles, measured in
    tests/test_attention.py at head_dim 64, group 7, 128 MACs, 2 exp lanes: 394)."""
    from rtl.attention import AttentionGeometry
    from sw.driver.fabric_exec import FabricPerf
    s = sc.shape
    geo = AttentionGeometry(s["head_dim"], s["group"], s["macs"], s["max_positions"])
    rows = []
    for o, res in zip(sc.ops, results):
        if o.perf:
            c = o.cmd
            k = c.tokens * c.p1
            spans = [o.pos + t + 1 for t in range(c.tokens)]
            model = sum(n * geo.cycles_per_position + FabricPerf.attn_command_cycles for n in spans) * c.p1
            rows.append({"label": o.perf, "T": c.tokens, "n": spans[-1], "groups": c.p1,
                         "cycles": res["answer_cycles"], "per_row_group": round(res["answer_cycles"] / k, 1),
                         "unit_busy_per_row_group": round(res["unit_busy"] / k, 1),
                         "unit_wait_per_row_group": round(res["unit_wait"] / k, 1),
                         "unit_model_per_row_group": round(model / k, 1)})
    print(f"\n{name}: " + json.dumps(rows, indent=1))
    return rows


# ---- scenarios ---------------------------------------------------------------------------------------
def functional_scenario(shape: dict, seed: int) -> Scenario:
    D, N, TM = shape["head_dim"], shape["max_positions"], shape["max_tokens"]
    sc = Scenario(shape, 1 << 20, seed)
    capA = N - 19 if (N - 19) % 4 else N - 18          # odd capacities: scale rows start mid-beat
    capA |= 1
    sc.cache("A", 2, capA)
    sc.cache("B", 1, N)
    sc.cache("C", 3, N // 2 + 5)
    T2 = min(5, TM)
    sc.op("A", 1, 0)                                    # n = 1
    sc.op("A", 1, capA - 1)                             # the last position
    sc.op("A", T2, 10, pad_rows=1)                      # a causal prefill chunk, padded dst rows
    sc.op("B", TM, N - TM, perf="prefill to N")         # every position, max_tokens rows
    sc.op("C", 3, 20)
    sc.op("A", 2, capA - 1)                             # CONTEXT_FULL
    sc.op("A", 1, 30)
    sc.op("A", 1, 3, aux=D * 2 if D < 128 else D // 2)  # BAD_FIELD: another head_dim
    sc.op("A", 1, 3, p1=1)                              # BAD_FIELD: heads / p1 above group
    sc.op("A", 3, 9, group=1)                           # a smaller GQA ratio (a phantom head)
    sc.op("C", 1, 30, group=1)
    sc.op("B", 1, 3, p0=N + 1)                          # BAD_FIELD: capacity above max_positions
    sc.op("A", TM + 1, 3, query_tokens=TM + 1)          # TOO_MANY_TOKENS
    sc.op("C", 2, 7)
    o = sc.op("A", 2, 8)                                # READ_ERROR: SLVERR on KV head 1's K codes
    lo = sc.k_row(o, 1, 3)
    o.ddr, o.windows = {"slverr_window": [lo, lo + 16]}, [(lo, lo + 16)]
    sc.op("A", 1, 12)
    o = sc.op("C", 1, 5)                                # READ_ERROR: DECERR on the queries
    lo = o.cmd.src0
    o.ddr, o.windows = {"decerr_window": [lo, lo + 16]}, [(lo, lo + 16)]
    sc.op("C", 1, 6)
    o = sc.op("A", 2, 20)                               # WRITE_ERROR: SLVERR on dst row 1
    lo = o.cmd.dst + o.cmd.dst_stride
    o.ddr, o.windows = {"slverr_window": [lo, lo + 64]}, [(lo, lo + 64)]
    sc.op("A", 3, 21)
    sc.op("A", 2, 25, abort_after=150)                  # aborted, then the engine is reset
    sc.op("B", 2, 40)
    sc.op("B", 1, N - 1, ddr={"gap_rate": 0.0}, perf="decode n=N, no back-pressure")
    return sc


TINY = dict(head_dim=32, group=2, macs=16, max_positions=64, max_tokens=8)
QWEN05 = dict(head_dim=64, group=7, macs=128, max_positions=512, max_tokens=4)
QWEN15 = dict(head_dim=128, group=6, macs=64, max_positions=256, max_tokens=4)


# ---- fast tier: parameters, elaboration, the checks without memory ------------------------------------------
def test_parameters_checked():
    from rtl.fabric_attend import FabricAttendEngine
    with pytest.raises(ConfigError):
        FabricAttendEngine(head_dim=16, group=2, macs=16, max_positions=64)
    with pytest.raises(ConfigError):
        FabricAttendEngine(head_dim=32, group=2, macs=16, max_positions=64, max_tokens=0)
    with pytest.raises(ConfigError):
        FabricAttendEngine(head_dim=32, group=2, macs=16, max_positions=64, read_ids=(0, 1))
    e = FabricAttendEngine(head_dim=32, group=2, macs=16, max_positions=64, max_tokens=4)
    e._MustUse__silence = True          # built only to read its signature
    assert {"cmd", "done", "rd0", "rd1", "rd2", "wr", "busy", "abort"} <= set(e.signature.members)


def test_checks_answer_without_bus_traffic():
    """Amaranth's simulator (no Verilator): BAD_FIELD (aux, heads / p1, p0 > max_positions),
    TOO_MANY_TOKENS and CONTEXT_FULL are answered without an AR or AW; a good op starts reading."""
    from amaranth.sim import Simulator

    from rtl.fabric_attend import FabricAttendEngine

    shape = dict(head_dim=32, group=2, macs=16, max_positions=64, max_tokens=4)
    eng = FabricAttendEngine(addr_width=40, **shape)
    good = attend_cmd(n=128, tokens=2, aux=32, src0=0x1000, src1=0x8000, dst=0x20000, dst_stride=512, p0=45, p1=2)
    cases = [
        (good.replace(aux=64), 0, ErrorCode.BAD_FIELD),
        (good.replace(p1=1), 0, ErrorCode.BAD_FIELD),
        (good.replace(p0=65), 0, ErrorCode.BAD_FIELD),
        (good.replace(tokens=5), 0, ErrorCode.TOO_MANY_TOKENS),
        (good, 44, ErrorCode.CONTEXT_FULL),
        (good.replace(tokens=1), 45, ErrorCode.CONTEXT_FULL),
    ]
    buses = [eng.rd0, eng.rd1, eng.rd2]
    seen = []

    async def bench(ctx):
        for cmd, pos, want in cases:
            for name, fld in eng.cmd.payload.shape():
                value = pos if name == "run_pos" else getattr(cmd, name, 0)
                ctx.set(getattr(eng.cmd.payload, name), value)
            ctx.set(eng.cmd.valid, 1)
            await ctx.tick().until(eng.cmd.ready)
            ctx.set(eng.cmd.valid, 0)
            ctx.set(eng.done.ready, 1)
            for _ in range(20):
                await ctx.tick()
                assert not any(ctx.get(b.arvalid) for b in buses) and not ctx.get(eng.wr.awvalid)
                if ctx.get(eng.done.valid):
                    break
            assert ctx.get(eng.done.valid), f"no answer for {want!r}"
            seen.append(ErrorCode(ctx.get(eng.done.payload.code)))
            await ctx.tick()
            ctx.set(eng.done.ready, 0)
            assert not ctx.get(eng.busy)
        # a good op: the engine reads (queries and scales on rd2, K rows on rd0)
        for name, fld in eng.cmd.payload.shape():
            ctx.set(getattr(eng.cmd.payload, name), 3 if name == "run_pos" else getattr(good, name, 0))
        ctx.set(eng.cmd.valid, 1)
        await ctx.tick().until(eng.cmd.ready)
        ctx.set(eng.cmd.valid, 0)
        ars = {0: [], 2: []}
        for _ in range(80):
            await ctx.tick()
            for i in ars:
                if ctx.get(buses[i].arvalid):
                    ars[i].append(ctx.get(buses[i].araddr))
        assert ctx.get(eng.busy)
        assert ars[0] and ars[0][0] == 0x8000                       # KV head 0's K codes
        assert ars[2] and ars[2][0] == 0x1000 + 2 * 128 + 0         # row 0's query scales (T = 2)

    sim = Simulator(eng)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert seen == [w for _, _, w in cases]


@pytest.mark.sim
def test_fabric_attend_tiny(tmp_path):
    sc = functional_scenario(TINY, seed=11)
    results = run_scenario(sc, tmp_path, gap_rate=0.15, seed=5)
    report(sc, results, "tiny")


def perf_scenario(shape: dict, seed: int, spans: list[int]) -> Scenario:
    N = shape["max_positions"]
    sc = Scenario(shape, 1 << 20, seed)
    sc.cache("A", 2, N)
    for n in spans:
        sc.op("A", 1, n - 1, ddr={"gap_rate": 0.0}, perf=f"decode n={n}")
    sc.op("A", shape["max_tokens"], N - shape["max_tokens"], ddr={"gap_rate": 0.0}, perf=f"prefill to n={N}")
    sc.op("A", 3, 100)                       # with back-pressure
    o = sc.op("A", 2, 8)                     # READ_ERROR then a correct op
    lo = sc.k_row(o, 1, 3)
    o.ddr, o.windows = {"slverr_window": [lo, lo + 16]}, [(lo, lo + 16)]
    sc.op("A", 1, 200)
    sc.op("A", 2, 300, group=shape["group"] - 2)   # a smaller GQA ratio: phantom heads
    sc.op("A", 1, 64, group=1, ddr={"gap_rate": 0.0}, perf="decode n=64, group 1")
    sc.op("A", 1, N)                        # CONTEXT_FULL
    return sc


@pytest.mark.sim
@pytest.mark.slow
def test_fabric_attend_qwen05(tmp_path):
    sc = perf_scenario(QWEN05, seed=21, spans=[64, 512])
    results = run_scenario(sc, tmp_path, gap_rate=0.1, seed=7)
    report(sc, results, "qwen2.5-0.5b shape")


@pytest.mark.sim
@pytest.mark.slow
def test_fabric_attend_qwen15(tmp_path):
    sc = perf_scenario(QWEN15, seed=31, spans=[64, 256])
    results = run_scenario(sc, tmp_path, gap_rate=0.1, seed=9)
    report(sc, results, "qwen2.5-1.5b shape")
