"""The fabric decoder's command list on the golden device (issue 11, step 3 on golden).

The oracle is sw/fabric.py's FabricRunner, which computes the decoder op by op
in NumPy without descriptors, buffers or registers: the device run of the
command list must give bit-identical logits, and its RESULT_INDEX the greedy
token. The descriptor bytes are checked against offsets written out by hand
from docs/registers.md, and every validation code is provoked.
"""

from __future__ import annotations

import dataclasses

import struct

import numpy as np
import pytest

from sw.contract import fabric_commands as fc
from sw.contract.commands import ErrorCode, HardwareLimits, Opcode
from sw.contract.config import preset
from sw.contract.errors import DeviceError
from sw.driver.fabric_model import FabricModel
from sw.driver.golden_device import GoldenDevice
from sw.fabric import FabricRunner
from sw.kq import load_kq

U32 = np.uint32
FABRIC = preset("kv260-fabric-tiny")   # kv260 + the fabric engines built for tiny (golden only until the RTL has it)
PROMPT = [5, 17, 3, 99, 250, 7, 7, 42, 1, 0, 511, 64]      # 12 tokens: chunks of 8 + 4 on kv260


@pytest.fixture(scope="module")
def tiny(make_tiny_kq):
    path = make_tiny_kq("int4")
    return path, FabricRunner(load_kq(path))


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(U32)


@pytest.mark.parametrize("fuse", [True, False], ids=["quant-fused", "quant-separate"])
def test_prefill_chunks_and_decode_are_bit_identical_to_the_fabric_golden_model(tiny, fuse):
    path, ref = tiny
    model = FabricModel(path, GoldenDevice(FABRIC), fuse_quant=fuse)
    cache, rcache = model.new_cache(), ref.new_cache()
    got = model.forward(PROMPT, cache)
    want = ref.forward(PROMPT, rcache)
    assert got.shape == (12, 512)
    assert np.array_equal(_bits(got), _bits(want))
    assert [s.runs for s in model.timings] == [2]            # one start per chunk of up to 8 tokens
    nxt = ref.next_token(want)
    for _ in range(8):
        got = model.forward([nxt], cache)
        want = ref.forward([nxt], rcache)
        assert np.array_equal(_bits(got), _bits(want))
        nxt = ref.next_token(want)
    assert cache.length == rcache.length == 20
    # per layer 18 commands fused (norms, RoPE of q and SiLU x up quantize their results), else 22
    assert {s.commands for s in model.timings[1:]} == {1 + 18 * 2 + 2 if fuse else 1 + 22 * 2 + 3}


def test_greedy_reads_only_the_token_id_with_one_start_and_few_registers(tiny):
    path, ref = tiny
    model = FabricModel(path, GoldenDevice(FABRIC))
    rcache = ref.new_cache()
    logits = ref.forward(PROMPT, rcache)
    want = [ref.next_token(logits)]
    for _ in range(7):
        want.append(ref.next_token(ref.forward([want[-1]], rcache)))
    cache = model.new_cache()
    got = [model.forward_greedy(PROMPT, cache)]
    for _ in range(7):
        got.append(model.forward_greedy([got[-1]], cache))
    assert got == want
    decode = model.timings[1:]
    assert all(s.runs == 1 and s.commands == 1 + 18 * 2 + 2 for s in decode)     # QUANT fused into producers
    accesses = [s.register_accesses for s in decode]
    # RUN_TOKEN, RUN_POS, CTRL; CTRL and STATUS polled once; BUSY_CYCLES LO/HI; RESULT_INDEX
    # (CMD_BASE/COUNT are written only when the list changes: the first decode step)
    assert accesses[0] <= 11 and all(a == 8 for a in accesses[1:]), accesses


def test_generate_uses_the_devices_argmax(tiny):
    from sw.runtime import generate
    from sw.sampling import Sampler, SamplingParams
    path, ref = tiny
    model = FabricModel(path, GoldenDevice(FABRIC), last_logits_only=True)
    greedy = generate(model, PROMPT, 6, Sampler(SamplingParams()))
    model.timings.clear()
    via_logits = generate(model, PROMPT, 6, Sampler(SamplingParams()), keep_logits=True)
    assert greedy.new_ids == via_logits.new_ids
    assert len(via_logits.logits) == 6 and via_logits.logits[0].shape == (512,)


def test_context_longer_than_the_cache_is_one_clear_error(tiny):
    path, _ = tiny
    model = FabricModel(path, GoldenDevice(FABRIC), capacity=16)
    cache = model.new_cache()
    model.forward_greedy(PROMPT, cache)
    with pytest.raises(DeviceError, match=r"context of 17 tokens is longer than the KV cache of 16 positions"):
        model.forward_greedy(list(range(5)), cache)
    assert cache.length == 12                    # nothing ran


def test_a_design_without_the_fabric_decoder_is_refused(tiny):
    path, _ = tiny
    linears_only = preset("kv260")
    assert linears_only.max_context == 0
    with pytest.raises(DeviceError, match="has no fabric decoder .* use --split hybrid"):
        FabricModel(path, GoldenDevice(linears_only))


def test_hardware_refuses_a_run_past_the_cache_and_a_bad_token(tiny):
    """The device's own checks (CONTEXT_FULL, BAD_TOKEN) stop the run with a code, not a hang."""
    path, _ = tiny
    model = FabricModel(path, GoldenDevice(FABRIC), capacity=64)
    dev = model.dev
    base, count = model._list(1, True, False)
    dev.write32("RUN_POS", 64)
    dev.write32("RUN_TOKEN", 3)
    with pytest.raises(DeviceError, match="CONTEXT_FULL"):
        dev.run(base, count, 5.0)
    dev.write32("RUN_POS", 0)
    dev.write32("RUN_TOKEN", 512)                # vocab is 512
    with pytest.raises(DeviceError, match="command 0: BAD_TOKEN"):
        dev.run(base, count, 5.0)


# ---------------------------------------------------------------------------
# Descriptors
# ---------------------------------------------------------------------------

def test_descriptor_bytes_follow_the_documented_offsets():
    cmd = fc.FabricCommand(opcode=Opcode.ATTEND, n=896, tokens=8, aux=64, tag=0x0A0B, src0=0x1000_0040,
                           src1=0x2_0000_0000, dst=0x3000, src_stride=0, dst_stride=3584, p0=4096, p1=2,
                           p2=0, p3=0)
    raw = fc.pack_fabric_command(cmd)
    assert len(raw) == 64
    # offsets from docs/registers.md, "Fabric decoder descriptors"
    assert raw[0] == 7 and raw[1] == 1 and raw[2:4] == b"\0\0"
    assert struct.unpack_from("<I", raw, 4)[0] == 896
    assert struct.unpack_from("<HH", raw, 8) == (8, 64)
    assert struct.unpack_from("<I", raw, 12)[0] == 0x0A0B
    assert struct.unpack_from("<QQQ", raw, 16) == (0x1000_0040, 0x2_0000_0000, 0x3000)
    assert struct.unpack_from("<IIIIII", raw, 40) == (0, 3584, 4096, 2, 0, 0)
    assert fc.unpack_any(raw) == cmd
    linear = fc.unpack_any(bytes([1, 1]) + bytes(62))
    assert type(linear).__name__ == "LinearCommand"


HW = HardwareLimits.from_config(preset("kv260-fabric"))     # engines built for qwen2.5-0.5b's shapes


def _good(op=Opcode.QUANT, **kw):
    base = dict(opcode=op, n=896, tokens=8, src0=0x1000, dst=0x2000, src_stride=3584, aux=64)
    base.update(kw)
    return fc.FabricCommand(**base)


@pytest.mark.parametrize("cmd, code", [
    (_good(), ErrorCode.NONE),
    (_good(version=2), ErrorCode.BAD_VERSION),
    (_good(flags=1), ErrorCode.RESERVED_NONZERO),          # TOKEN_REG is EMBED's flag only
    (_good(p0=1), ErrorCode.RESERVED_NONZERO),             # QUANT has no parameters
    (_good(src1=64), ErrorCode.RESERVED_NONZERO),
    (_good(n=0), ErrorCode.ZERO_SHAPE),
    (_good(tokens=9), ErrorCode.TOO_MANY_TOKENS),
    (_good(src0=0x1010), ErrorCode.MISALIGNED_ADDRESS),
    (_good(src_stride=3600), ErrorCode.MISALIGNED_ADDRESS),
    (_good(dst=1 << 40), ErrorCode.ADDRESS_RANGE),
    (_good(aux=48, n=96 * 4), ErrorCode.BAD_FIELD),       # not a quantization group the unit has
    (_good(n=900), ErrorCode.BAD_FIELD),                    # not a multiple of the group
    (_good(src_stride=1024), ErrorCode.BAD_FIELD),         # rows of 3584 bytes would overlap
    (_good(Opcode.ROPE, src1=0x4000, dst_stride=3584, p0=4097), ErrorCode.BAD_FIELD),   # > max_context
    (_good(Opcode.ROPE, src1=0x4000, dst_stride=3584, p0=4096), ErrorCode.NONE),
    # what the engines were built for (HW_PARAMS4: head_dim 64, 7 query heads per KV head, rows <= 4864)
    (_good(Opcode.ROPE, src1=0x4000, dst_stride=3584, p0=4096, aux=32), ErrorCode.BAD_FIELD),
    (_good(Opcode.ATTEND, src1=0x4000, src_stride=0, dst_stride=3584, p0=4096, p1=2), ErrorCode.NONE),
    (_good(Opcode.ATTEND, n=1024, src1=0x4000, src_stride=0, dst_stride=4096, p0=4096, p1=2), ErrorCode.BAD_FIELD),
    (_good(n=4864 + 64, src_stride=19712), ErrorCode.BAD_FIELD),
    (_good(n=4864, src_stride=19456), ErrorCode.NONE),
    (_good(Opcode.ATTEND, src1=0x4000, src_stride=0, dst_stride=3584, p0=4096, p1=3), ErrorCode.BAD_FIELD),
    (_good(Opcode.EMBED, tokens=2, src0=0, src1=0x4000, src_stride=0, dst_stride=3584, aux=0, p0=512, flags=1),
     ErrorCode.BAD_FIELD),                                 # RUN_TOKEN feeds one row only
    (_good(Opcode.EMBED, tokens=1, src0=0, src1=0x4000, src_stride=0, dst_stride=3584, aux=64, p0=512, flags=1),
     ErrorCode.BAD_FIELD),                                 # EMBED has no aux
])
def test_fabric_validation_codes(cmd, code):
    assert fc.validate_fabric_command(cmd, HW) == code


def test_the_contract_bounds_rows_whatever_the_design():
    any_shape = dataclasses.replace(HW, head_dim=0, kv_group=0, max_row=0)
    assert fc.validate_fabric_command(_good(n=1 << 16, src_stride=1 << 18), any_shape) == ErrorCode.NONE
    assert fc.validate_fabric_command(_good(n=(1 << 16) + 64, src_stride=(1 << 18) + 256), any_shape) \
        == ErrorCode.BAD_FIELD                                                          # above FABRIC_MAX_N


def test_linears_only_design_rejects_fabric_opcodes_and_the_argmax_flag():
    from sw.contract.commands import Flags, linear_command, validate_command
    old = HardwareLimits(tile_rows=32, tokens=8, group_size=64, addr_bits=40)
    assert fc.validate_fabric_command(_good(), old) == ErrorCode.BAD_OPCODE
    lin = linear_command(n=64, k=64, group_size=64, tokens=1, tile_rows=32, weight_addr=0, act_addr=0,
                         out_addr=0)
    argmax = lin.replace(flags=int(Flags.ARGMAX))
    assert validate_command(argmax, old) == ErrorCode.RESERVED_NONZERO
    assert validate_command(argmax, HW) == ErrorCode.NONE


def test_kv_cache_layout_sections():
    lay = fc.kv_cache_layout(2, 64, 4096)
    assert lay.codes_offset(False) == 0
    assert lay.codes_offset(True) == 2 * 4096 * 64
    assert lay.scales_offset(False) == 2 * 2 * 4096 * 64
    assert lay.scales_offset(True) == 2 * 2 * 4096 * 64 + 4 * 2 * 4096
    assert lay.total_bytes == 2 * 2 * 4096 * 64 + 2 * 4 * 2 * 4096


def test_cli_generate_on_the_fabric_split_and_its_errors(tiny, capsys):
    from sw.cli import main
    path, ref = tiny
    assert main(["generate", str(path), "--device", "golden", "--hw-config", "kv260-fabric-tiny", "--prompt-ids", "5 17 3",
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    rcache = ref.new_cache()
    want = [ref.next_token(ref.forward([5, 17, 3], rcache))]
    for _ in range(3):
        want.append(ref.next_token(ref.forward([want[-1]], rcache)))
    assert f"new ids    : {want}" in out
    assert main(["generate", str(path), "--device", "golden", "--hw-config", "kv260-fabric-tiny", "--context", "4",
                 "--prompt-ids", "5 17 3",
                 "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "need a context of 6 positions, more than the 4" in err[0]
    assert main(["generate", str(path), "--device", "golden", "--hw-config", "kv260", "--split", "fabric",
                 "--prompt-ids", "1", "--max-new-tokens", "1"]) == 2
    assert "has no fabric decoder" in capsys.readouterr().err
    assert main(["generate", str(path), "--device", "golden", "--prompt-ids", "5 17 3",
                 "--max-new-tokens", "2"]) == 0       # kv260, auto: the hybrid split
    assert main(["generate", str(path), "--device", "golden", "--context", "0", "--prompt-ids", "1"]) == 2
    capsys.readouterr()
    # tiny (head_dim 32) on a design whose attention unit is built for qwen2.5-0.5b (head_dim 64)
    assert main(["generate", str(path), "--device", "golden", "--hw-config", "kv260-fabric", "--prompt-ids", "1",
                 "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "built for head_dim 64" in err[0] and "head_dim 32" in err[0], err


@pytest.mark.parametrize("changes, match", [
    (dict(attn_head_dim=64), "max_context 0 leaves out"),
    (dict(max_context=256, attn_head_dim=48, attn_group=2, attn_macs=16, fabric_max_n=384), "attn_head_dim must be"),
    (dict(max_context=256, attn_head_dim=32, attn_group=0, attn_macs=16, fabric_max_n=384), "attn_group must be"),
    (dict(max_context=256, attn_head_dim=32, attn_group=2, attn_macs=24, fabric_max_n=384), "attn_macs must be"),
    (dict(max_context=256, attn_head_dim=32, attn_group=2, attn_macs=128, fabric_max_n=384), "attn_macs must be"),
    (dict(max_context=256, attn_head_dim=32, attn_group=2, attn_macs=16, fabric_max_n=20), "fabric_max_n must be"),
    (dict(max_context=256, attn_head_dim=32, attn_group=2, attn_macs=16, fabric_max_n=384, attn_exp_lanes=0),
     "attn_exp_lanes must divide the 1 query head"),
    (dict(max_context=4096, attn_head_dim=64, attn_group=7, attn_macs=128, fabric_max_n=4864, attn_exp_lanes=4),
     "attn_exp_lanes must divide the 2 query head"),
])
def test_fabric_engine_shapes_are_validated(changes, match):
    from sw.contract.errors import ConfigError
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(preset("kv260"), **changes).validate()


def test_config_hash_of_a_linears_only_design_is_unchanged_by_the_new_field():
    """max_context = 0 stays out of the canonical JSON, so bitstreams built before it still match."""
    import hashlib
    import json
    kv = preset("kv260")
    legacy = {k: v for k, v in kv.to_dict().items()}
    assert "max_context" not in legacy
    doc = json.dumps({"schema": "kriallm.array-config/1", **legacy}, sort_keys=True, separators=(",", ":"))
    assert kv.config_hash == hashlib.sha256(doc.encode()).hexdigest()
    assert preset("kv260-fabric").config_hash != kv.config_hash


def test_the_rtl_executes_what_the_config_asks_for():
    from rtl.cmdproc import rtl_limits
    lim = rtl_limits(FABRIC, 40)
    assert lim.fabric_ops and (lim.max_context, lim.head_dim, lim.kv_group, lim.max_row) == (256, 32, 2, 384)
    assert not rtl_limits(preset("kv260"), 40).fabric_ops

@pytest.mark.parametrize("name", ["kv260-fabric", "kv260-fabric-tiny"])
def test_golden_attention_timing_follows_the_unit_the_config_builds(name):
    """The golden device's ATTEND cycles per position are the attention unit's of the config (its MACs,
    exp lanes and built group: rtl/attention.py's geometry, whose slope tests/test_attention.py
    measures in Verilator: 8 at kv260-fabric's shape, 8 at the tiny one)."""
    from rtl.attention import AttentionGeometry
    from sw.driver.fabric_exec import FabricPerf
    cfg = preset(name)
    perf = GoldenDevice(cfg).executor.fabric.perf
    assert perf == FabricPerf.from_config(cfg, cap_bytes_per_cycle=perf.cap_bytes_per_cycle)
    unit = AttentionGeometry(cfg.attn_head_dim, cfg.attn_group, cfg.attn_macs, cfg.max_context,
                             exp_lanes=cfg.attn_exp_lanes)
    assert perf.attn_cycles_per_position(cfg.attn_group, cfg.attn_head_dim) == unit.cycles_per_position
    assert unit.cycles_per_position == {"kv260-fabric": 8, "kv260-fabric-tiny": 8}[name]
    # an op with fewer query heads per KV head runs the built group's phantom heads
    assert perf.attn_cycles_per_position(1, cfg.attn_head_dim) == unit.cycles_per_position
