"""The whole decoder on the RTL top: the fabric engines in rtl/top.py, driven by sw/driver's
FabricModel through the `sim` device (Verilator, the DDR model), against the golden device.

FABRIC_LITE is kv260-fabric-tiny with 2 engines (ports) and 2 token lanes, so the Verilator build
stays short: a 12-token prompt runs as 6 chunks of 2 tokens (causal attention inside a chunk),
and with 2 ports every port carries both a linear engine and fabric masters (the read arbiters,
the write selects). The golden device runs the same command lists with FabricOps
(sw/driver/fabric_exec.py): the logits must be bit-identical, the tokens the same, one start per
step. The full-size check (Qwen2.5-0.5B shapes on kv260-fabric) is slow.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from sw.contract.config import preset

pytestmark = [pytest.mark.sim]

FABRIC_LITE = preset("kv260-fabric-tiny").replace(engines=2, tokens=2)
PROMPT = [5, 17, 3, 99, 250, 7, 7, 42, 1, 0, 511, 64]      # 12 tokens


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def fabric_sim(tmp_path_factory):
    from sim.device import SimDevice
    dev = SimDevice(FABRIC_LITE, workdir=tmp_path_factory.mktemp("fabric-sim"))
    yield dev
    dev.close()


def test_fabric_decoder_on_the_rtl_is_bit_identical_to_golden(fabric_sim, make_tiny_kq):
    """A 12-token prompt (prefill chunks of 2 tokens), then 8 new tokens with their logits, then 3 greedy
    steps that read only the device's argmax: the same tokens and bit-identical logits as golden."""
    from sw.driver.fabric_model import FabricModel
    from sw.driver.golden_device import GoldenDevice
    path = make_tiny_kq("int4")
    sim = FabricModel(path, fabric_sim, timeout_s=120.0)
    gold = FabricModel(path, GoldenDevice(FABRIC_LITE))
    cs, cg = sim.new_cache(), gold.new_cache()
    a, b = sim.forward(PROMPT, cs), gold.forward(PROMPT, cg)
    assert a.shape == (12, 512)
    assert np.array_equal(_bits(a), _bits(b))
    assert [t.runs for t in sim.timings] == [6]              # chunks of 2 tokens, one start each
    new = [int(np.argmax(b[-1]))]
    for _ in range(7):                                        # new tokens 2..8, with their logits
        a, b = sim.forward([new[-1]], cs), gold.forward([new[-1]], cg)
        assert np.array_equal(_bits(a), _bits(b))
        new.append(int(np.argmax(b[-1])))
    assert len(set(new)) > 1                                  # not a stuck sequence
    got, want = [new[-1]], [new[-1]]
    for _ in range(3):                                        # greedy: the device's ARGMAX, one register
        got.append(sim.forward_greedy([got[-1]], cs))
        want.append(gold.forward_greedy([want[-1]], cg))
    assert got == want
    assert cs.length == cg.length == 12 + 7 + 3
    steps = sim.timings[1:]
    assert len(steps) == 10 and all(s.runs == 1 for s in steps)   # token in, token out: one start per step
    assert all(s.accel_s > 0 for s in steps)
    assert all(s.register_accesses <= 16 for s in sim.timings[-2:])


def test_fabric_errors_on_the_rtl_stop_the_run_and_the_next_run_works(fabric_sim, make_tiny_kq):
    """CONTEXT_FULL and BAD_TOKEN come from the engines (RUN_POS, RUN_TOKEN checked at run time):
    the run stops with the code, and the next run on the same device is exact again. Then decode
    steps cut short by a timeout (the driver's soft reset) at 10 %, 40 % and 70 % of their cycles,
    inside different ops: the step run again afterwards is exact."""
    from sw.contract.errors import DeviceError
    from sw.driver.fabric_model import FabricModel
    from sw.driver.golden_device import GoldenDevice
    path = make_tiny_kq("int4")
    model = FabricModel(path, fabric_sim, timeout_s=120.0, capacity=64)
    dev = model.dev
    base, count = model._list(1, True, False)
    dev.write32("RUN_POS", 64)
    dev.write32("RUN_TOKEN", 3)
    with pytest.raises(DeviceError, match="CONTEXT_FULL"):
        dev.run(base, count, 120.0)
    dev.write32("RUN_POS", 0)
    dev.write32("RUN_TOKEN", 512)                # vocab is 512
    with pytest.raises(DeviceError, match="command 0: BAD_TOKEN"):
        dev.run(base, count, 120.0)
    gold = FabricModel(path, GoldenDevice(FABRIC_LITE), capacity=64)
    cs, cg = model.new_cache(), gold.new_cache()
    assert model.forward_greedy([9, 8], cs) == gold.forward_greedy([9, 8], cg)
    tok = model.forward_greedy([4], cs)
    assert tok == gold.forward_greedy([4], cg)
    clock_hz = FABRIC_LITE.clock_mhz * 1e6
    step_cycles = model.timings[-1].accel_s * clock_hz
    assert step_cycles > 4000
    cut_at = []
    for frac in (0.1, 0.4, 0.7):
        dev.write32("RUN_POS", cs.length)
        dev.write32("RUN_TOKEN", tok)
        # the sim device's timeout is modeled time: the budget is the timeout's cycles + 1000
        with pytest.raises(DeviceError, match="did not finish") as e:
            dev.run(base, count, max(0.0, frac * step_cycles - 1000) / clock_hz)
        cut_at.append(int(re.search(r"at command (\d+)", str(e.value)).group(1)))
        nxt = model.forward_greedy([tok], cs)                 # the same step again, whole
        tok = gold.forward_greedy([tok], cg)
        assert nxt == tok
    assert cut_at == sorted(set(cut_at)) and cut_at[0] > 0, cut_at     # three different places in the list


@pytest.mark.slow
def test_full_size_fabric_decoder_on_the_rtl(full_kq, tmp_path):
    """Qwen2.5-0.5B shapes on kv260-fabric (4 ports, 8 token lanes, the attention engine built for
    head_dim 64, 7 query heads per KV head, 4096 positions): a 3-token prompt, a decode step with
    logits and a greedy step on the RTL: bit-identical logits (2 new tokens) and the same greedy token
    as the golden device; the accelerator time per step is modeled from RTL cycles."""
    from sim.device import SimDevice, memory_for_model
    from sim.top_tb import SIM_DDR
    from sw.driver.fabric_model import FabricModel
    from sw.driver.golden_device import GoldenDevice
    config = preset("kv260-fabric")
    mem = memory_for_model(full_kq, config)
    assert mem == 1 << 30                        # INT4 linears, the bf16 embedding table, the KV cache
    dev = SimDevice(config, ddr=SIM_DDR.replace(mem_bytes=mem), workdir=tmp_path / "sim")
    try:
        sim = FabricModel(full_kq, dev, timeout_s=3600.0, capacity=256)
        gold = FabricModel(full_kq, GoldenDevice(config), capacity=256)
        cs, cg = sim.new_cache(), gold.new_cache()
        a, b = sim.forward([3, 14, 15], cs), gold.forward([3, 14, 15], cg)
        assert a.shape == (3, 151936)
        assert np.array_equal(_bits(a), _bits(b))
        tok = int(np.argmax(b[-1]))                          # new token 1
        a, b = sim.forward([tok], cs), gold.forward([tok], cg)
        assert np.array_equal(_bits(a), _bits(b))             # new token 2's logits
        tok = int(np.argmax(b[-1]))
        assert sim.forward_greedy([tok], cs) == gold.forward_greedy([tok], cg)   # the device's argmax
        step = sim.timings[-1]
        assert step.runs == 1 and step.accel_s > 0
        print(f"\nfull-size decode step on the RTL at position 3: {step.accel_s * 1e3:.2f} ms modeled accelerator "
              f"time (RTL cycles at {config.clock_mhz} MHz; {dev.ddr.describe_text()})")
    finally:
        dev.close()
