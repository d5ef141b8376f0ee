"""rtl/share.py: fp32 units pooled between clients that take turns (the fabric decoder's engines)."""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.hdl import Module, ResetInserter, Signal

from rtl.share import LOCAL_UNITS, SharedUnits, UnitPort
from rtl.fp32 import Fp32Add, Fp32Multiply
from sw.contract.config import PRESETS
from sw.contract.errors import ConfigError

U32 = np.uint32


def _bits(x) -> int:
    return int(np.float32(x).view(U32))


@pytest.mark.parametrize("kind", ["mul", "add"])
def test_two_clients_take_turns_on_one_unit(kind):
    """Clients A and B issue to unit 0 of a pool in random cycles (never both in one), with idle
    cycles between: each sees exactly NumPy float32's results of its own operands, in its issue
    order, the unit's latency later, and none of the other's. Client B's second unit is its own
    (A declared one): it computes too. A reset of client A (its flush) in the middle drops A's
    results in flight and never B's."""
    from amaranth.sim import Simulator

    rng = np.random.default_rng(7 if kind == "mul" else 8)
    n = 240
    who = rng.integers(-1, 2, n)              # -1 idle, 0 A, 1 B
    x = (rng.standard_normal(n) * 100).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    op = np.multiply if kind == "mul" else np.add
    pool = SharedUnits({"A": {kind: 1}, "B": {kind: 2}})
    a_src, b_src = pool.source("A"), pool.source("B")
    m = Module()
    m.submodules.pool = pool
    flush_a = Signal()
    holder = Module()
    pa = holder.submodules.unit = a_src.make(kind)
    m.submodules.a = ResetInserter(flush_a)(holder)
    pb = m.submodules.b = b_src.make(kind)
    pb2 = m.submodules.b2 = b_src.make(kind)
    lat = pa.latency
    assert lat == pb.latency == (Fp32Multiply if kind == "mul" else Fp32Add).resolve_latency(None) >= 2
    flush_at = n // 2
    got = {0: [], 1: [], 2: []}

    async def bench(ctx):
        for c in range(n + lat + 2):
            for p, w in ((pa, 0), (pb, 1)):
                on = c < n and who[c] == w
                ctx.set(p.i_valid, int(on))
                ctx.set(p.a, _bits(x[c]) if on else 0x7FC00000)
                ctx.set(p.b, _bits(y[c]) if on else 0x7F800000)
            ctx.set(pb2.i_valid, int(c < n))
            ctx.set(pb2.a, _bits(y[c % n]))
            ctx.set(pb2.b, _bits(x[c % n]))
            ctx.set(flush_a, int(c == flush_at))
            await ctx.delay(1e-9)
            for k, p in enumerate((pa, pb, pb2)):
                if ctx.get(p.o_valid):
                    got[k].append((c, ctx.get(p.o)))
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    # A's issues whose result would come out after the flush cycle were in flight at the flush:
    # dropped (the flush register stage clears at the clock edge ending cycle flush_at)
    keep_a = [c for c in np.flatnonzero(who == 0) if not (flush_at - lat < c <= flush_at)]
    assert len(keep_a) < np.count_nonzero(who == 0)          # the flush did drop something
    assert got[0] == [(int(c) + lat, _bits(op(x[c], y[c]))) for c in keep_a]
    assert got[1] == [(int(c) + lat, _bits(op(x[c], y[c]))) for c in np.flatnonzero(who == 1)]
    assert got[2] == [(c + lat, _bits(op(y[c], x[c]))) for c in range(n)]


def test_a_client_asks_only_for_what_it_declared():
    pool = SharedUnits({"A": {"mul": 1}})
    pool._MustUse__silence = True         # elaborated nowhere
    src = pool.source("A")
    port = src.make("mul")
    with pytest.raises(ConfigError, match="more than the 1 mul"):
        src.make("mul")
    with pytest.raises(ConfigError, match="latency"):
        pool.source("A").make("add", latency=Fp32Add.resolve_latency(None) + 1)
    with pytest.raises(ConfigError, match="unknown unit kind"):
        SharedUnits({"A": {"div": 1}})
    assert isinstance(port, UnitPort)
    port._MustUse__silence = True         # elaborated nowhere: keep Amaranth's unused report quiet


def test_local_units_are_new_units():
    mul, add = LOCAL_UNITS.make("mul"), LOCAL_UNITS.make("add", 3)
    for unit in (mul, add):
        unit._MustUse__silence = True     # elaborated nowhere
    assert isinstance(mul, Fp32Multiply) and isinstance(add, Fp32Add) and add.latency == 3


@pytest.mark.parametrize("preset", ["kv260-fabric", "kv260-fabric-tiny"])
def test_the_fabric_top_pools_the_engines_units(preset):
    """The fabric top holds the pool: the linear engines' dequant adders (4 engines x 4 lanes),
    which the attention unit's 2E adders and then the vector lanes' 4 adders also use, and 4
    multipliers for the attention unit and the vector lanes' quantizer. In the engines' own
    hierarchies those units are ports (UnitPort), no Fp32Add / Fp32Multiply of their own."""
    from amaranth.hdl import Fragment

    from rtl.top import build_top

    cfg = PRESETS[preset]
    assert (cfg.engines, cfg.dequant_lanes) == (4, 4)
    kinds = {}

    def walk(fragment, path):
        for sub, name, *_ in fragment.subfragments:
            kinds[f"{path}.{name}"] = type(sub.origins[0]).__name__ if sub.origins else None
            walk(sub, f"{path}.{name}")

    walk(Fragment.get(build_top(cfg), None), "top")
    E = cfg.attn_exp_lanes
    pooled = {k.rsplit(".", 1)[1]: v for k, v in kinds.items() if k.startswith("top.fabric_units.")}
    assert pooled == {**{f"add{k}": "Fp32Add" for k in range(16)}, **{f"mul{k}": "Fp32Multiply" for k in range(4)}}
    att_adds = ["sub_m", "add_p"] + [f"{n}{k}" for k in range(1, E) for n in ("sub_m", "add_p")]
    vu, au = "top.fabric_vector.datapath.vu", "top.fabric_attend.pipe.unit"
    ports = sorted(k for k, v in kinds.items() if v == "UnitPort")
    assert ports == sorted([f"{vu}.lane{l}_{u}" for l in range(4) for u in ("m3", "add")]
                           + [f"{au}.mul{k}" for k in range(4)] + [f"{au}.{n}" for n in att_adds]
                           + [f"top.engine{e}.core.dequant.l{l}_add" for e in range(4) for l in range(4)])
    # the only fp32 adders and multipliers outside the pool: the dequant lanes' narrowed multipliers
    # and the vector lanes' M1 and M2
    others = sorted(k.split("top.", 1)[1] for k, v in kinds.items()
                    if v in ("Fp32Add", "Fp32Multiply") and not k.startswith("top.fabric_units."))
    assert all(k.endswith(("_mul_s", "_mul_t")) or k.startswith("fabric_vector.datapath.vu.lane") for k in others), others
    assert sum(k.endswith(("_m1", "_m2")) for k in others) == 8
