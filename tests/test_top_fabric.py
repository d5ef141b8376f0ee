"""The whole decoder on the RTL top: the fabric engines in rtl/top.py, driven by sw/driver's
FabricModel through the `sim` device (Verilator, the DDR model), against the golden device.

FABRIC_LITE is kv260-fabric-tiny with 2 engines (ports) and 2 token lanes, so the Verilator build
stays short: a prefill of 5 tokens runs as chunks of 2 + 2 + 1 (causal attention inside a chunk),
and with 2 ports every port carries both a linear engine and fabric masters (the read arbiters,
the write selects). The golden device runs the same command lists with FabricOps
(sw/driver/fabric_exec.py): the logits must be bit-identical, the tokens the same, one start per
step. The full-size check (Qwen2.5-0.5B shapes on kv260-fabric) is slow.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from sw.contract.config import preset

pytestmark = [pytest.mark.sim]

FABRIC_LITE = preset("kv260-fabric-tiny").replace(engines=2, tokens=2)
PROMPT = [7, 3, 11, 100, 42]


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def fabric_sim(tmp_path_factory):
    from sim.device import SimDevice
    dev = SimDevice(FABRIC_LITE, workdir=tmp_path_factory.mktemp("fabric-sim"))
    yield dev
    dev.close()


def test_fabric_decoder_on_the_rtl_is_bit_identical_to_golden(fabric_sim, make_tiny_kq):
    from sw.driver.fabric_model import FabricModel
    from sw.driver.golden_device import GoldenDevice
    path = make_tiny_kq("int4")
    sim = FabricModel(path, fabric_sim, timeout_s=120.0)
    gold = FabricModel(path, GoldenDevice(FABRIC_LITE))
    cs, cg = sim.new_cache(), gold.new_cache()
    a, b = sim.forward(PROMPT, cs), gold.forward(PROMPT, cg)
    assert a.shape == (5, 512)
    assert np.array_equal(_bits(a), _bits(b))
    assert [t.runs for t in sim.timings] == [3]              # chunks of 2 + 2 + 1 tokens, one start each
    tok = int(np.argmax(b[-1]))
    for _ in range(2):                                        # decode with logits
        a, b = sim.forward([tok], cs), gold.forward([tok], cg)
        assert np.array_equal(_bits(a), _bits(b))
        tok = int(np.argmax(b[-1]))
    got, want = [], []
    for _ in range(3):                                        # greedy: the device's ARGMAX, one register
        got.append(sim.forward_greedy([tok if not got else got[-1]], cs))
        want.append(gold.forward_greedy([tok if not want else want[-1]], cg))
    assert got == want
    assert cs.length == cg.length == 5 + 2 + 3
    steps = sim.timings[-3:]
    assert all(s.runs == 1 for s in steps)                    # token in, token out: one start per step
    assert all(s.accel_s > 0 for s in steps)


def test_fabric_errors_on_the_rtl_stop_the_run_and_the_next_run_works(fabric_sim, make_tiny_kq):
    """CONTEXT_FULL and BAD_TOKEN come from the engines (RUN_POS, RUN_TOKEN checked at run time):
    the run stops with the code, and the next run on the same device is exact again."""
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
