"""The driver on its `golden` backend: bit-exact with sw.runtime's golden model, and the
register/command semantics of sw/contract/commands.py."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from sw.contract.config import preset
from sw.contract.commands import (ErrorCode, HardwareLimits, activation_layout, bias_bytes, linear_command,
                         output_layout, pack_activations, pack_bias, pack_command_list, unpack_outputs)
from sw.driver import (DeviceError, add_device_args, bench_report, open_accelerated, open_device)
from sw.driver.golden_device import GoldenDevice
from sw.contract.layout import TileLayout, pack_linear
from sw.contract.numerics import quantize_activations
from sw.qmodel import QuantLinear
from sw.runtime import generate, open_model
from sw.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def models(make_tiny_kq):
    return {head: make_tiny_kq(head) for head in ("int4", "fp16", "int8")}


HYBRID = types.SimpleNamespace(split="hybrid")   # the paper's split (the fabric one: test_fabric_program.py)
PROMPT = [7, 3, 11, 100, 42, 5, 9, 250, 17, 33, 1]   # 11 tokens: an 8-lane chunk and a 3-token chunk


def _greedy(model, prompt, n):
    return generate(model, prompt, n, Sampler(SamplingParams()), keep_logits=True)


@pytest.mark.parametrize("head,coherent,fuse", [("int4", True, True), ("int4", False, True),
                                                ("int4", True, False), ("fp16", True, True)])
def test_driver_golden_is_bit_identical_to_runtime_golden(models, head, coherent, fuse):
    """8 new tokens on tiny: identical tokens and bit-identical logits. coherent=False models the
    board's non-coherent HP ports (the device sees only flushed data, the CPU only invalidated data),
    so a missing cache operation would change the results."""
    kq = models[head]
    ref = _greedy(open_model(kq, "golden", progress=False), PROMPT, 8)
    dev = GoldenDevice(preset("kv260"), coherent=coherent)
    model = open_accelerated(kq, "golden", types.SimpleNamespace(fuse=fuse, split="hybrid"), device=dev)
    got = _greedy(model, PROMPT, 8)
    assert got.new_ids == ref.new_ids
    assert len(got.logits) == 8
    for a, b in zip(got.logits, ref.logits):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert model.host_linears == ([] if head == "int4" else ["lm_head"])
    layers = model.config.num_hidden_layers
    per_token = (4 if fuse else 7) * layers + (head == "int4")
    assert [s.runs for s in model.timings[1:]] == [per_token] * 7
    assert model.timings[0].runs == 2 * per_token        # the 11-token prompt: two chunks per linear


def test_last_logits_only_prefill_runs_the_lm_head_once(models):
    kq = models["int4"]
    full = open_accelerated(kq, "golden", HYBRID)
    last = open_accelerated(kq, "golden", HYBRID, last_logits_only=True)
    a = full.forward(PROMPT, full.new_cache())
    b = last.forward(PROMPT, last.new_cache())
    assert a.shape == (len(PROMPT), 512) and b.shape == (1, 512)
    assert np.array_equal(a[-1:].view(np.uint32), b.view(np.uint32))
    assert full.timings[0].runs - last.timings[0].runs == 1        # one LM-head chunk instead of two
    assert _greedy(last, PROMPT, 5).new_ids == _greedy(full, PROMPT, 5).new_ids


def test_int8_lm_head_on_an_int4_design_runs_on_the_host(models):
    kq = models["int8"]
    ref = _greedy(open_model(kq, "golden", progress=False), PROMPT[:4], 3)
    m4 = open_accelerated(kq, "golden", HYBRID)                                  # kv260: INT4 only -> host
    assert m4.host_linears == ["lm_head"]
    assert _greedy(m4, PROMPT[:4], 3).new_ids == ref.new_ids
    with pytest.raises(DeviceError, match="lm_head is int8, which the loaded design"):
        from sw.driver.runner import AcceleratedModel
        AcceleratedModel(kq, GoldenDevice(preset("kv260")), host_fallback=False)


def test_activation_writer_matches_the_contract(models):
    """The driver's fused in-place quantizer writes exactly sw.contract.commands.pack_activations of
    sw.contract.numerics.quantize_activations, padding zero, whatever the buffer held before."""
    model = open_accelerated(models["int4"], "golden", HYBRID)
    rng = np.random.default_rng(1)
    for k in (128, 384):
        buf = model.dev.alloc(activation_layout(k, 64, 8).total_bytes)
        buf.array[:] = 0xAB                                    # stale bytes must not survive
        for t in (1, 3, 8, 2, 2, 1, 8):
            x = (rng.standard_normal((t, k)) * rng.choice([1e-3, 3, 1e4])).astype(np.float32)
            x[0, 64:128] = np.float32(0.5) * np.arange(64, dtype=np.float32) / 127   # ties at .5
            if t > 1:
                x[1, :64] = 0                                  # a dead group -> the contract's path
                x[1, 64:128] = np.float32(2.0 ** -125)
            n = model._write_activations(buf, x)
            want = pack_activations(*quantize_activations(x, 64), 64)
            assert n == len(want) and buf.read(0, n) == want


def _device_linear(dev, qlin: QuantLinear, x, tokens, tile_rows, int8=False, bias=True):
    n, k = qlin.shape
    g = qlin.group_size
    blob = pack_linear(TileLayout(n, k, g, tile_rows, 8 if int8 else 4), qlin.codes, qlin.scales, qlin.zeros)
    w = dev.alloc(blob.size)
    w.array[:] = blob
    a = dev.alloc(activation_layout(k, g, tokens).total_bytes)
    a.write(0, pack_activations(*quantize_activations(x, g), g))
    o = dev.alloc(output_layout(n, tokens, tile_rows).total_bytes)
    o.array[:] = 0xCD
    b = None
    if bias and qlin.bias is not None:
        b = dev.alloc(bias_bytes(n, tile_rows))
        b.write(0, pack_bias(qlin.bias, tile_rows))
    cmd = linear_command(n=n, k=k, group_size=g, tokens=tokens, tile_rows=tile_rows, weight_addr=w.phys,
                         act_addr=a.phys, out_addr=o.phys, bias_addr=b.phys if b else None, weight_int8=int8)
    return cmd, o


def test_executor_on_padded_rows_and_int8_weights():
    rng = np.random.default_rng(4)
    n, k, g = 40, 128, 64                                      # 40 rows: two 32-row tiles, 24 padded rows
    q4 = QuantLinear("int4", g, codes=rng.integers(0, 16, (n, k), dtype=np.uint8),
                     scales=rng.uniform(0.01, 0.1, (n, k // g)).astype(np.float16),
                     zeros=rng.integers(0, 16, (n, k // g), dtype=np.uint8),
                     bias=rng.standard_normal(n).astype(np.float32))
    q8 = QuantLinear("int8", g, codes=rng.integers(-127, 128, (n, k), dtype=np.int8),
                     scales=rng.uniform(0.001, 0.01, n).astype(np.float16))
    x = rng.standard_normal((3, k)).astype(np.float32)
    for qlin, cfg, int8 in ((q4, preset("kv260"), False), (q8, preset("kv260").replace(weight_bits=8, dsp_packing=False, port_bits=256), True)):
        dev = GoldenDevice(cfg)
        cmd, out = _device_linear(dev, qlin, x, 3, 32, int8)
        lst = dev.alloc(64)
        lst.write(0, pack_command_list([cmd]))
        stats = dev.run(lst.phys, 1)
        y = unpack_outputs(out.read(0, out.nbytes), n, 3, 32)
        assert np.array_equal(y.view(np.uint32), qlin(x).view(np.uint32))
        assert stats.cycles > 0 and stats.cycles_kind == "modeled (analytical)"
        pad = out.array[:output_layout(n, 3, 32).total_bytes].view(np.float32).reshape(3, -1)[:, n:64]
        assert np.all(pad == 0)


@pytest.mark.parametrize("change,code", [
    (dict(opcode=0), ErrorCode.BAD_OPCODE), (dict(version=2), ErrorCode.BAD_VERSION),
    (dict(reserved1=1), ErrorCode.RESERVED_NONZERO), (dict(group_size=128), ErrorCode.BAD_GROUP_SIZE),
    (dict(tile_rows=16), ErrorCode.BAD_TILE_ROWS), (dict(tokens=9), ErrorCode.TOO_MANY_TOKENS),
    (dict(act_addr=0x4000_0010), ErrorCode.MISALIGNED_ADDRESS), (dict(out_addr=1 << 41), ErrorCode.ADDRESS_RANGE),
    (dict(weight_addr=0x10_0000_0000), ErrorCode.READ_ERROR), (dict(flags=2), ErrorCode.UNSUPPORTED_WEIGHT_KIND),
])
def test_invalid_commands_stop_the_run_with_code_and_index(change, code):
    rng = np.random.default_rng(0)
    q = QuantLinear("int4", 64, codes=rng.integers(0, 16, (32, 64), dtype=np.uint8),
                    scales=np.ones((32, 1), np.float16), zeros=np.zeros((32, 1), np.uint8))
    dev = GoldenDevice(preset("kv260"))
    good, out = _device_linear(dev, q, rng.standard_normal((1, 64)).astype(np.float32), 1, 32)
    bad, out2 = _device_linear(dev, q, rng.standard_normal((1, 64)).astype(np.float32), 1, 32)
    lst = dev.alloc(3 * 64)
    lst.write(0, pack_command_list([good, bad.replace(**change), good]))
    with pytest.raises(DeviceError) as e:
        dev.run(lst.phys, 3)
    msg = str(e.value)
    assert f"command 1: {code.name}" in msg and "\n" not in msg
    st = dev.read32("STATUS")
    assert st & 0b110 == 0b110 and (st >> 8) & 0xFF == code and st >> 16 == 1
    if code != ErrorCode.READ_ERROR:
        assert np.all(out2.array == 0xCD)                      # the failing command was not executed
    assert not np.all(out.array == 0xCD)                       # the one before it was


def test_registers_identity_counters_and_reset():
    cfg = preset("kv260")
    dev = open_device("golden")
    ident = dev.check_identity()
    assert ident.config_hash == cfg.config_hash and ident.limits == HardwareLimits.from_config(cfg)
    assert ident.clock_mhz == 250 and ident.engines == 4 and dev.read32("ID").to_bytes(4, "little") == b"KRIA"
    dev.write32("CMD_COUNT", 0)
    assert dev.run(0x4000_0000, 0).commands == 0 and dev.read_field("STATUS", "done") == 1
    with pytest.raises(DeviceError, match="BAD_CMD_BASE"):
        dev.run(0x4000_0020, 1)
    assert dev.read32("IRQ_STATUS") == 3
    dev.write32("IRQ_STATUS", 1)
    assert dev.read32("IRQ_STATUS") == 2
    dev.write32("ID", 0)                                       # read-only: ignored
    assert dev.read32("ID") == dev.identity().magic
    counters = dev.read_counters()
    assert set(counters) == {"busy_cycles", "mem_stall_cycles", "compute_stall_cycles", "bytes_read",
                             "bytes_written"}
    dev.write_fields("CTRL", soft_reset=1)
    assert dev.read32("STATUS") == 0 and dev.read32("IRQ_STATUS") == 0 and dev.read_counter("BUSY_CYCLES") == 0
    with pytest.raises(DeviceError, match="unmapped register"):
        dev.read32(0x1C)


def test_mismatches_are_one_clear_error(models, tmp_path):
    kq = models["int4"]
    with pytest.raises(DeviceError, match=r"tiny-int4.kq was built for tile_rows 32 / group size 64 but the loaded "
                                          r"design is rows 16 / group size 64 / 8 token lanes / config hash"):
        open_accelerated(kq, "golden", types.SimpleNamespace(hw_config=None),
                         device=GoldenDevice(preset("kv260").replace(rows=16)))
    g128 = preset("kv260").replace(group_size=128)
    cfg_file = tmp_path / "g128.json"
    cfg_file.write_text(g128.to_json())
    with pytest.raises(DeviceError, match=r"built for tile_rows 32 / group size 64 but the loaded design is rows 32 "
                                          r"/ group size 128"):
        open_accelerated(kq, "golden", types.SimpleNamespace(hw_config=str(cfg_file)))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"config": g128.to_dict(), "config_hash": g128.config_hash}))
    with pytest.raises(DeviceError, match=rf"describes config hash {g128.config_hash[:12]}.*but the loaded design "
                                          rf"is .*config hash {preset('kv260').config_hash[:12]}"):
        open_accelerated(kq, "golden", types.SimpleNamespace(manifest=str(manifest)))
    manifest.write_text(json.dumps({"config": g128.to_dict(), "config_hash": "00" * 32}))
    with pytest.raises(Exception, match="corrupt or hand-edited"):
        open_accelerated(kq, "golden", types.SimpleNamespace(manifest=str(manifest)))


def test_open_device_names_and_cli_args():
    import argparse
    p = argparse.ArgumentParser()
    add_device_args(p)
    args = p.parse_args(["--hw-config", "kv260", "--timeout", "1.5", "--mem-base", "0xA0000000", "--irq"])
    assert args.mem_base == 0xA000_0000 and args.timeout == 1.5 and args.fuse is True
    assert open_device("golden", args).name == "golden"
    with pytest.raises(Exception, match="unknown device 'tpu'"):
        open_device("tpu", args)


def test_sim_device_missing_or_unloadable_is_one_clear_error(monkeypatch):
    """The sim device plugs in through an entry point; on an install without the simulation tools it
    cannot load, and one without the entry point never registered it."""
    import importlib.metadata as md
    broken = md.EntryPoint(name="sim", value="kriallm_no_such_module:open_sim_device", group="kriallm.devices")
    monkeypatch.setattr(md, "entry_points", lambda group: [broken] if group == "kriallm.devices" else [])
    with pytest.raises(DeviceError, match=r"^the sim device is not available \(kriallm_no_such_module could not "
                                          r"be imported\): it needs the simulation tools"):
        open_device("sim")
    monkeypatch.setattr(md, "entry_points", lambda group: [])
    with pytest.raises(DeviceError, match="the sim device is not registered"):
        open_device("sim")


@pytest.mark.parametrize("split", ["hybrid", "fabric"])
def test_bench_report(models, split):
    model = open_accelerated(models["int4"], "golden", types.SimpleNamespace(split=split, hw_config="kv260-fabric-tiny"))
    rep = bench_report(model, PROMPT, 4)
    json.dumps(rep)
    assert rep["new_tokens"] == 4 and rep["prompt_tokens"] == len(PROMPT) and rep["split"] == split
    pt = rep["per_token"]
    assert pt["accelerator_kind"] == "modeled (analytical)" and "measured on this machine" in pt["host_kind"]
    # hybrid: q/k/v, o, gate/up and down per layer (2 layers) + the LM head; fabric: one start
    assert pt["host_s"] > 0 and pt["accelerator_s"] > 0 and pt["runs"] == (9 if split == "hybrid" else 1)
    if split == "fabric":
        assert pt["register_accesses"] <= 16
    else:
        assert pt["register_accesses"] >= 9 * 6
    assert rep["decode_tok_s"] == pytest.approx(1 / (pt["host_s"] + pt["accelerator_s"]))
    assert rep["time_to_first_token_s"] > 0 and rep["hardware"]["config_hash"] == preset("kv260-fabric-tiny").config_hash
    assert rep["assumptions"]["accelerator_time"]["kind"].startswith("analytical")
    assert len(rep["steps"]) == 4 and rep["steps"][0]["tokens"] == len(PROMPT)
