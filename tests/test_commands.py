"""sw/contract/commands.py in pure Python: descriptors, validation, buffers, the register map and its doc."""

from __future__ import annotations

import dataclasses
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sw.contract import commands as C
from sw.contract.commands import (ALIGN, DESCRIPTOR_BYTES, DESCRIPTOR_FIELDS, REGISTERS, ErrorCode, Flags, HardwareLimits,
                         LinearCommand, Reg, linear_command, pack_command, unpack_command, validate_command)
from sw.contract.errors import ConfigError, FormatError
from sw.contract.numerics import quantize_activations

REPO = Path(__file__).resolve().parent.parent
HW = HardwareLimits(tile_rows=32, tokens=8, group_size=64, weight_kinds=C.WEIGHT_KIND_INT4, addr_bits=40)


def good(**changes) -> LinearCommand:
    cmd = linear_command(n=896, k=4864, group_size=64, tokens=8, tile_rows=32, weight_addr=0x1000_0000,
                         act_addr=0x2000_0040, out_addr=0x3000_0080, bias_addr=0x4000_00C0, tag=0x0107)
    return cmd.replace(**changes)


# ---------------------------------------------------------------------------
# Descriptors
# ---------------------------------------------------------------------------

def test_descriptor_table_is_contiguous_and_64_bytes():
    end = 0
    for name, off, fmt, doc in DESCRIPTOR_FIELDS:
        assert off == end, name
        assert off % struct.calcsize(fmt) == 0, f"{name} is not naturally aligned"
        assert doc
        end = off + struct.calcsize(fmt)
    assert end == DESCRIPTOR_BYTES == 64
    bits = C.descriptor_field_bits()
    assert bits["weight_addr"] == (24 * 8, 64) and bits["opcode"] == (0, 8)


def test_pack_unpack_round_trip_and_byte_positions():
    cmd = good()
    raw = pack_command(cmd)
    assert len(raw) == 64
    assert raw[0] == 1 and raw[1] == C.DESCRIPTOR_VERSION
    assert int.from_bytes(raw[2:4], "little") == Flags.HAS_BIAS
    assert int.from_bytes(raw[4:8], "little") == 896 and int.from_bytes(raw[8:12], "little") == 4864
    assert int.from_bytes(raw[24:32], "little") == 0x1000_0000
    assert int.from_bytes(raw[48:56], "little") == 0x3000_0080
    assert unpack_command(raw) == cmd
    rng = random.Random(0)
    for _ in range(200):
        c = LinearCommand(**{name: rng.getrandbits(8 * struct.calcsize(fmt)) for name, _, fmt, _ in DESCRIPTOR_FIELDS})
        assert unpack_command(pack_command(c)) == c
    lst = [good(tag=i) for i in range(5)]
    assert C.unpack_command_list(C.pack_command_list(lst)) == lst


def test_pack_unpack_errors():
    with pytest.raises(FormatError, match="does not fit 32"):
        pack_command(good(n=1 << 32))
    with pytest.raises(FormatError, match="does not fit 16"):
        pack_command(good(tokens=-1))
    with pytest.raises(FormatError, match="64 bytes"):
        unpack_command(b"\0" * 63)
    with pytest.raises(FormatError, match="multiple of 64"):
        C.unpack_command_list(b"\0" * 65)


def test_linear_command_flags():
    assert good().has_bias and not good().weight_int8 and good().weight_bits == 4
    c = linear_command(n=1, k=64, group_size=64, tokens=1, tile_rows=32, weight_addr=0, act_addr=0, out_addr=0,
                       weight_int8=True)
    assert c.flags == Flags.WEIGHT_INT8 and not c.has_bias and c.weight_bits == 8


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("changes,code", [
    ({}, ErrorCode.NONE),
    ({"opcode": 0}, ErrorCode.BAD_OPCODE),
    ({"opcode": 2}, ErrorCode.BAD_OPCODE),
    ({"version": 0}, ErrorCode.BAD_VERSION),
    ({"flags": Flags.HAS_BIAS | 0x4}, ErrorCode.RESERVED_NONZERO),
    ({"reserved0": 1}, ErrorCode.RESERVED_NONZERO),
    ({"reserved1": 1 << 63}, ErrorCode.RESERVED_NONZERO),
    ({"n": 0}, ErrorCode.ZERO_SHAPE),
    ({"k": 0}, ErrorCode.ZERO_SHAPE),
    ({"tokens": 0}, ErrorCode.ZERO_SHAPE),
    ({"group_size": 128, "k": 4864 * 2}, ErrorCode.BAD_GROUP_SIZE),
    ({"k": 4864 + 32}, ErrorCode.K_NOT_GROUP_MULTIPLE),
    ({"tile_rows": 16}, ErrorCode.BAD_TILE_ROWS),
    ({"flags": Flags.WEIGHT_INT8}, ErrorCode.UNSUPPORTED_WEIGHT_KIND),
    ({"tokens": 9}, ErrorCode.TOO_MANY_TOKENS),
    ({"weight_addr": 0x1000_0010}, ErrorCode.MISALIGNED_ADDRESS),
    ({"act_addr": 0x2000_0001}, ErrorCode.MISALIGNED_ADDRESS),
    ({"out_addr": 0x3000_0020}, ErrorCode.MISALIGNED_ADDRESS),
    ({"bias_addr": 0x4000_0004}, ErrorCode.MISALIGNED_ADDRESS),
    ({"bias_addr": 0x4000_0004, "flags": 0}, ErrorCode.NONE),          # no bias: not checked
    ({"out_addr": 1 << 40}, ErrorCode.ADDRESS_RANGE),
    ({"bias_addr": 1 << 50}, ErrorCode.ADDRESS_RANGE),
    ({"bias_addr": 1 << 50, "flags": 0}, ErrorCode.NONE),
    ({"n": 1}, ErrorCode.NONE),                                           # padding is allowed
    ({"n": 151_936}, ErrorCode.NONE),                                     # the LM head
    ({"tokens": 1}, ErrorCode.NONE),
    # the first failing check wins
    ({"n": 0, "weight_addr": 3}, ErrorCode.ZERO_SHAPE),
    ({"opcode": 0, "n": 0}, ErrorCode.BAD_OPCODE),
    ({"tokens": 9, "out_addr": 1}, ErrorCode.TOO_MANY_TOKENS),
])
def test_validate_command(changes, code):
    assert validate_command(good(**changes), HW) == code


def test_validate_weight_kinds_and_base():
    int8 = good(flags=Flags.WEIGHT_INT8)
    int8_hw = dataclasses.replace(HW, weight_kinds=C.WEIGHT_KIND_INT8)
    assert validate_command(int8, int8_hw) == ErrorCode.NONE
    assert validate_command(good(), int8_hw) == ErrorCode.UNSUPPORTED_WEIGHT_KIND
    assert C.validate_cmd_base(0x1000, HW) == ErrorCode.NONE
    assert C.validate_cmd_base(0x1020, HW) == ErrorCode.BAD_CMD_BASE
    assert C.validate_cmd_base(1 << 40, HW) == ErrorCode.BAD_CMD_BASE
    cmds = [good(), good(n=0), good(), good(tokens=100)]
    assert C.validate_command_list(cmds, HW) == [(1, ErrorCode.ZERO_SHAPE), (3, ErrorCode.TOO_MANY_TOKENS)]


def test_hardware_limits_from_config_and_registers():
    from sw.contract.config import preset
    kv = preset("kv260-fabric")
    hw = HardwareLimits.from_config(kv)
    assert hw == HardwareLimits(tile_rows=32, tokens=8, group_size=64, weight_kinds=C.WEIGHT_KIND_INT4,
                                addr_bits=C.DEFAULT_ADDR_BITS, max_context=4096, head_dim=64, kv_group=7,
                                max_row=4864)
    assert hw.fabric_ops
    p0 = C.register("HW_PARAMS0").pack(rows=32, cols=1, tokens=8, group_size=64)
    p1 = C.register("HW_PARAMS1").pack(engines=4, weight_kinds=1, cmd_log_depth=32, beat_bytes=16)
    p2 = C.register("HW_PARAMS2").pack(addr_bits=40, clock_mhz=250)
    p3 = C.register("HW_PARAMS3").pack(max_context=4096)
    # HW_PARAMS4 at 0x18: head_dim bits 0..8, kv_group 9..14, max_row 15..31 (docs/registers.md)
    p4 = 64 | 7 << 9 | 4864 << 15
    assert C.register("HW_PARAMS4").offset == 0x18
    assert HardwareLimits.from_registers(p0, p1, p2, p3, p4) == hw
    # a design without HW_PARAMS3 (linears only) reads 0 there: no fabric decoder
    assert not HardwareLimits.from_registers(p0, p1, p2).fabric_ops


def test_error_codes_are_pinned():
    # Codes are shared with built bitstreams: renumbering needs a REGMAP_VERSION major bump.
    assert {e.name: int(e) for e in ErrorCode} == {
        "NONE": 0, "BAD_OPCODE": 1, "BAD_VERSION": 2, "RESERVED_NONZERO": 3, "ZERO_SHAPE": 4,
        "BAD_GROUP_SIZE": 5, "K_NOT_GROUP_MULTIPLE": 6, "BAD_TILE_ROWS": 7, "UNSUPPORTED_WEIGHT_KIND": 8,
        "TOO_MANY_TOKENS": 9, "MISALIGNED_ADDRESS": 10, "ADDRESS_RANGE": 11, "BAD_CMD_BASE": 12,
        "FETCH_ERROR": 13, "READ_ERROR": 14, "WRITE_ERROR": 15, "DATAPATH_ERROR": 16,
        "BAD_FIELD": 17, "CONTEXT_FULL": 18, "BAD_TOKEN": 19}
    # 1.1 added the fabric decoder's registers, opcodes and codes 17..19 (compatible additions)
    assert C.REGMAP_VERSION == (1, 1)
    assert all(e in C.ERROR_TEXT for e in ErrorCode)
    assert C.describe_error(4, 7) == "command 7: ZERO_SHAPE: n, k or tokens is zero"
    assert "unknown" in C.describe_error(200)


# ---------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("k,g,t", [(896, 64, 8), (4864, 64, 3), (896, 128, 1), (64, 32, 2), (96, 32, 5)])
def test_activation_buffer_round_trip(k, g, t):
    rng = np.random.default_rng(k + t)
    x = rng.standard_normal((t, k)).astype(np.float32)
    q, s_a, qsum = quantize_activations(x, g)
    buf = C.pack_activations(q, s_a, qsum, g)
    L = C.activation_layout(k, g, t)
    assert len(buf) == L.total_bytes and L.total_bytes % ALIGN == 0
    assert L.scales_offset % ALIGN == 0 and L.qsums_offset % ALIGN == 0
    assert L.codes_stride % 16 == 0 and L.meta_stride % 16 == 0
    q2, s2, c2 = C.unpack_activations(buf, k, g, t)
    assert np.array_equal(q2, q) and np.array_equal(s2.view(np.uint32), s_a.view(np.uint32))
    assert np.array_equal(c2, qsum)
    # Byte positions of the last token's row in each section.
    ng, last = k // g, t - 1
    raw = np.frombuffer(buf, np.uint8)
    assert np.array_equal(raw[last * L.codes_stride:last * L.codes_stride + k].view(np.int8), q[last])
    at = L.scales_offset + last * L.meta_stride
    assert np.array_equal(raw[at:at + 4 * ng].view("<u4"), s_a[last].view(np.uint32))
    at = L.qsums_offset + last * L.meta_stride
    assert np.array_equal(raw[at:at + 4 * ng].view("<i4"), qsum[last])
    with pytest.raises(ConfigError):
        C.pack_activations(q, s_a[:, :-1], qsum, g)
    with pytest.raises(FormatError):
        C.unpack_activations(buf[:-64], k, g, t)


def test_output_and_bias_buffers():
    y = np.arange(3 * 70, dtype=np.float32).reshape(3, 70) * 0.5
    L = C.output_layout(70, 3, 32)
    assert L.padded_rows == 96 and L.stride == 384 and L.total_bytes == 3 * 384
    buf = C.pack_outputs(y, 32)
    assert len(buf) == L.total_bytes
    assert np.array_equal(C.unpack_outputs(buf, 70, 3, 32), y)
    b = C.pack_bias(np.arange(70, dtype=np.float32), 32)
    assert len(b) == C.bias_bytes(70, 32) == 384
    arr = np.frombuffer(b, "<f4")
    assert np.array_equal(arr[:70], np.arange(70)) and not arr[70:].any()


def test_weight_bytes_counts_the_documented_stream():
    """docs/format.md by hand: ceil(N/R) row tiles x K/G group blocks, a block being the meta (R fp16
    scales, then R/2 bytes of INT4 zero points, padded to 16-byte beats) and G columns of R codes."""
    # down_proj of Qwen2.5-0.5B, R = 32, G = 64: 28 tiles x 76 groups x (5 meta + 64 weight beats)
    assert C.weight_bytes(896, 4864, 64, 32) == 28 * 76 * 69 * 16
    # R = 16: 32 + 8 = 40 meta bytes padded to 48; 40 rows pad to 3 tiles; 64 columns of 8 bytes
    assert C.weight_bytes(40, 128, 64, 16) == 3 * 2 * (48 + 64 * 8)
    # INT8 per channel: 64 bytes of scales, no zero points; 100 rows pad to 4 tiles; 32 bytes a column
    assert C.weight_bytes(100, 128, 64, 32, weight_int8=True) == 4 * 2 * (64 + 64 * 32)


# ---------------------------------------------------------------------------
# Register map and its document
# ---------------------------------------------------------------------------

def test_register_map_is_well_formed():
    offsets = [r.offset for r in REGISTERS]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert all(o % 4 == 0 and o + 4 <= 1 << C.CSR_ADDR_WIDTH for o in offsets)
    assert len({r.name for r in REGISTERS}) == len(REGISTERS)
    for r in REGISTERS:
        used = 0
        assert r.doc and r.fields
        for f in r.fields:
            assert f.mask & used == 0 and f.lsb + f.width <= 32, (r.name, f.name)
            assert f.init < (1 << f.width) and f.doc
            used |= f.mask
        assert len({f.name for f in r.fields}) == len(r.fields)
    assert Reg.ID == 0 and Reg.STATUS == C.register("STATUS").offset
    assert [Reg[f"CONFIG_HASH{i}"] for i in range(8)] == list(range(Reg.CONFIG_HASH0, Reg.CONFIG_HASH0 + 32, 4))
    for name, _ in C.PERF_COUNTERS:
        assert Reg[f"{name}_HI"] == Reg[f"{name}_LO"] + 4


def test_register_field_helpers():
    st = C.register("STATUS")
    word = st.pack(done=1, error=1, error_code=ErrorCode.ZERO_SHAPE, cmd_index=513)
    assert word == (1 << 1) | (1 << 2) | (4 << 8) | (513 << 16)
    assert st.unpack(word) == {"busy": 0, "done": 1, "error": 1, "error_code": 4, "cmd_index": 513}
    with pytest.raises(ValueError, match="does not fit"):
        st.pack(error_code=256)
    with pytest.raises(KeyError, match="no field"):
        st.pack(nope=1)
    assert C.ID_MAGIC.to_bytes(4, "little") == b"KRIA"


def test_config_hash_words_round_trip():
    from sw.contract.config import preset
    h = preset("kv260").config_hash
    words = C.config_hash_words(h)
    assert len(words) == 8 and C.config_hash_from_words(words) == h
    assert words[0] == int.from_bytes(bytes.fromhex(h)[:4], "little")
    with pytest.raises(ConfigError, match="32 bytes"):
        C.config_hash_words("abcd")


def test_registers_doc_matches_generator():
    doc = (REPO / "docs" / "registers.md").read_text()
    assert doc == C.render_registers_markdown(), \
        "docs/registers.md is stale: regenerate with `python -m sw.contract.commands > docs/registers.md`"


def test_commands_module_needs_no_amaranth():
    code = "import sys, sw.contract.commands; assert not any(m.startswith('amaranth') for m in sys.modules), 'amaranth'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
