"""The fabric decoder's command descriptors and buffer layouts (issue 11, step 3).

A design whose HW_PARAMS3.max_context is non-zero runs the whole Qwen2 decoder
from one command list: besides LINEAR (sw/contract/commands.py) it executes the
opcodes EMBED .. SILU_MUL below, and a LINEAR with the ARGMAX flag leaves the
greedy next token in RESULT_INDEX. Each op's arithmetic is a function of
:mod:`sw.contract.fabric_ops` (or :func:`sw.contract.numerics.quantize_activations`),
named at the op; the golden device (sw/driver/golden_device.py) executes these
descriptors with exactly those functions.

Every fabric descriptor is 64 bytes, little endian, with the LINEAR
descriptor's header (opcode, version, flags) and ``tag`` at the same places::

    0  opcode B    1 version B    2 flags H
    4  n I         8 tokens H    10 aux H     12 tag I
    16 src0 Q     24 src1 Q      32 dst Q
    40 src_stride I               44 dst_stride I
    48 p0 I       52 p1 I        56 p2 I      60 p3 I

Rows: an op works on ``tokens`` (T) token rows; row t of a row-strided fp32
buffer starts at ``addr + t * stride``. Row t is at position ``RUN_POS + t``
(the register the host writes before the start), which is what makes one
command list serve every decode step: the KV-cache row, the RoPE table row and
the attention span move with RUN_POS, not with the descriptors.

Decisions (and why):

* Ops are DDR to DDR. The vectors between ops are a few KB per token, next to
  the ~240 MB of weights a token streams, so moving them through DDR costs
  little and keeps each unit a plain stream processor behind a DMA.
* Strides are explicit descriptor fields (multiples of 64 bytes), so one op can
  read a LINEAR's output buffer (whose rows are padded to whole tiles) or a
  row-sized buffer alike.
* KV_STORE and ATTEND check RUN_POS + T against their capacity at run time
  (CONTEXT_FULL), so a driver bug is an error code, never a write past the
  cache. EMBED checks each id against the vocabulary (BAD_TOKEN).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass
from typing import Iterable

from .commands import (ALIGN, DESCRIPTOR_BYTES, DESCRIPTOR_VERSION, ErrorCode, HardwareLimits, LinearCommand,
                       Opcode, align_up, pack_command, pack_fields, unpack_command, unpack_fields, validate_command)

FABRIC_OPCODES = (Opcode.EMBED, Opcode.RMSNORM, Opcode.QUANT, Opcode.ROPE, Opcode.KV_STORE, Opcode.ATTEND,
                  Opcode.ADD, Opcode.SILU_MUL)
QUANT_GROUPS = (32, 64, 128)      # the vector unit's quantization groups (activation groups and head dims)
HEAD_DIMS = (32, 64, 128)         # the attention unit's head dimensions (the Qwen2 presets')
FABRIC_MAX_N = 1 << 16            # elements per token row of a fabric op (Qwen2-72B's MLP has 29,568)


class FabricFlags(enum.IntFlag):
    TOKEN_REG = 1 << 0    # EMBED: the one token id is RUN_TOKEN (tokens must be 1), not read from src0
    VALUE = 1 << 1        # KV_STORE: store into the V half of the layer's cache (else K)
    QUANT_OUT = 1 << 2    # RMSNORM, SILU_MUL, ROPE: dst is the activation buffer of the result, group aux


FABRIC_FLAGS_DEFINED = {Opcode.EMBED: int(FabricFlags.TOKEN_REG), Opcode.KV_STORE: int(FabricFlags.VALUE),
                        Opcode.RMSNORM: int(FabricFlags.QUANT_OUT), Opcode.SILU_MUL: int(FabricFlags.QUANT_OUT),
                        Opcode.ROPE: int(FabricFlags.QUANT_OUT)}
QUANT_OUT_OPS = (Opcode.RMSNORM, Opcode.ROPE, Opcode.SILU_MUL)

# (name, byte offset, struct format, doc)
FABRIC_FIELDS: tuple[tuple[str, int, str, str], ...] = (
    ("opcode", 0, "B", "2 EMBED, 3 RMSNORM, 4 QUANT, 5 ROPE, 6 KV_STORE, 7 ATTEND, 8 ADD, 9 SILU_MUL"),
    ("version", 1, "B", f"descriptor format, must be {DESCRIPTOR_VERSION}"),
    ("flags", 2, "H", "EMBED bit 0 TOKEN_REG; KV_STORE bit 1 VALUE; RMSNORM, ROPE, SILU_MUL bit 2 QUANT_OUT; "
                      "other bits reserved (0)"),
    ("n", 4, "I", "elements per token row (hidden size, heads x head_dim, ...), at most FABRIC_MAX_N = 65536"),
    ("tokens", 8, "H", "T: token rows, 1..HW_PARAMS0.tokens; row t is at position RUN_POS + t"),
    ("aux", 10, "H", "QUANT, and RMSNORM/SILU_MUL with QUANT_OUT: group size; ROPE, KV_STORE, ATTEND: head_dim "
                     "(with QUANT_OUT also the group); others 0"),
    ("tag", 12, "I", "free for the driver (layer and op id)"),
    ("src0", 16, "Q", "first input (see the op)"),
    ("src1", 24, "Q", "second input (see the op), 0 when unused"),
    ("dst", 32, "Q", "output (see the op)"),
    ("src_stride", 40, "I", "bytes between token rows of src0 (and src1 of ADD/SILU_MUL), a multiple of 64"),
    ("dst_stride", 44, "I", "bytes between token rows of a row-strided dst, a multiple of 64 (0 with QUANT_OUT)"),
    ("p0", 48, "I", "op parameter (see the op)"),
    ("p1", 52, "I", "op parameter"),
    ("p2", 56, "I", "op parameter"),
    ("p3", 60, "I", "op parameter"),
)
_FMT = "<" + "".join(f for _, _, f, _ in FABRIC_FIELDS)
assert struct.calcsize(_FMT) == DESCRIPTOR_BYTES
assert all(struct.calcsize("<" + "".join(f for _, _, f, _ in FABRIC_FIELDS[:i])) == off
           for i, (_, off, _, _) in enumerate(FABRIC_FIELDS))

# What each opcode reads and writes, for docs/registers.md and the reader.
OP_DOCS: dict[Opcode, str] = {
    Opcode.EMBED: "dst row t = fp32 of the bf16 table row of token id t (fabric_ops.embedding). src0: int32 ids "
                  "[T] (or RUN_TOKEN with TOKEN_REG, T = 1); src1: bf16 table [p0 = vocab][n], rows of 2n bytes; "
                  "dst: fp32 rows. An id >= p0 stops the run with BAD_TOKEN.",
    Opcode.RMSNORM: "dst = fabric_ops.rms_norm(src0 rows, gamma) with p0 = fp32 bits of 1/n and p1 = fp32 bits of "
                    "eps (fabric_ops.rms_constants). src1: gamma fp32 [n].",
    Opcode.QUANT: "dst = the activation buffer (commands.activation_layout(n, aux, T)) of "
                  "numerics.quantize_activations(src0 rows, group aux): int8 codes, fp32 scales, int32 qsums. "
                  "With aux = head_dim it is fabric_ops.quantize_heads (the query heads before ATTEND).",
    Opcode.ROPE: "dst rows = fabric_ops.apply_rope of each of the n/aux heads of src0 rows with the table row "
                 "RUN_POS + t; src1: the RoPE table (rope_table_layout(aux, p0)), p0 its rows. dst may equal src0. "
                 "RUN_POS + T > p0 stops the run with CONTEXT_FULL.",
    Opcode.KV_STORE: "quantize each of the p1 = n/aux KV heads of src0 rows (fabric_ops.quantize_heads) and store "
                     "codes and scale at position RUN_POS + t of the layer cache at dst (kv_cache_layout(p1, aux, "
                     "p0)), in its K half, or its V half with flag VALUE. RUN_POS + T > p0: CONTEXT_FULL.",
    Opcode.ATTEND: "dst rows [n = heads x aux] = attention of query row t over cache positions 0 .. RUN_POS + t "
                   "(fabric_ops.attention_scores, softmax2, attention_values; query head h reads KV head "
                   "h // (heads / p1)). src0: the activation buffer of the queries quantized per head "
                   "(QUANT with group aux); src1: the layer cache (kv_cache_layout(p1, aux, p0)). "
                   "RUN_POS + T > p0: CONTEXT_FULL.",
    Opcode.ADD: "dst rows = src0 rows + src1 rows (fabric_ops.residual_add); src1 rows are p0 bytes apart. "
                "dst may equal src0.",
    Opcode.SILU_MUL: "dst rows = fabric_ops.silu_mul(src0 rows (gate), src1 rows (up)); src1 rows are p0 bytes "
                     "apart.",
}
QUANT_OUT_DOC = ("RMSNORM, ROPE, SILU_MUL with flag QUANT_OUT: the result rows are not written; dst is the "
                 "activation buffer (commands.activation_layout(n, aux, T)) of numerics.quantize_activations(result "
                 "rows, group aux), exactly what a QUANT of them would write; dst_stride is 0 and dst must not overlap "
                 "the sources (the codes of a row may be written before the row is read). RMSNORM and SILU_MUL "
                 "take the group in aux; ROPE's group is its head_dim (fabric_ops.quantize_heads).")


def quant_out(cmd: "FabricCommand") -> bool:
    """The descriptor writes the quantized activation buffer of its result (flag QUANT_OUT)."""
    return bool(cmd.flags & FabricFlags.QUANT_OUT) and cmd.op in QUANT_OUT_OPS

_ROW_OPS = (Opcode.EMBED, Opcode.RMSNORM, Opcode.QUANT, Opcode.ROPE, Opcode.KV_STORE, Opcode.ATTEND,
            Opcode.ADD, Opcode.SILU_MUL)


@dataclass(frozen=True)
class FabricCommand:
    """One fabric-op descriptor; field names and meanings are FABRIC_FIELDS' and OP_DOCS'."""
    opcode: int
    n: int
    tokens: int
    src0: int = 0
    src1: int = 0
    dst: int = 0
    src_stride: int = 0
    dst_stride: int = 0
    aux: int = 0
    p0: int = 0
    p1: int = 0
    p2: int = 0
    p3: int = 0
    flags: int = 0
    tag: int = 0
    version: int = DESCRIPTOR_VERSION

    def replace(self, **changes) -> "FabricCommand":
        return dataclasses.replace(self, **changes)

    @property
    def op(self) -> Opcode:
        return Opcode(self.opcode)


Command = LinearCommand | FabricCommand


def pack_fabric_command(cmd: FabricCommand) -> bytes:
    return pack_fields(cmd, FABRIC_FIELDS)


def pack_any(cmd: Command) -> bytes:
    return pack_fabric_command(cmd) if isinstance(cmd, FabricCommand) else pack_command(cmd)


def pack_any_list(cmds: Iterable[Command]) -> bytes:
    return b"".join(pack_any(c) for c in cmds)


def unpack_any(data: bytes) -> Command:
    """A LINEAR (or invalid-opcode) descriptor as LinearCommand, a fabric opcode's as FabricCommand."""
    data = bytes(data)
    if data[:1] and data[0] in {int(o) for o in FABRIC_OPCODES}:
        return FabricCommand(**unpack_fields(data, FABRIC_FIELDS))
    return unpack_command(data)


# ---------------------------------------------------------------------------
# Buffer layouts of the fabric decoder
# ---------------------------------------------------------------------------

def row_stride(n: int, itemsize: int = 4) -> int:
    """Bytes between token rows of an n-element row buffer (64-byte aligned rows)."""
    return align_up(n * itemsize)


@dataclass(frozen=True)
class KVCacheLayout:
    """One layer's INT8 KV cache: four 64-byte aligned sections,

    * K codes int8 [kv_heads][capacity][head_dim], then V codes (same shape);
    * K scales fp32 [kv_heads][capacity], then V scales.

    Position p of KV head g: codes at section + (g * capacity + p) * head_dim,
    scale at section + 4 * (g * capacity + p). Per layer, not per token: the
    cache is written in place by KV_STORE and read by ATTEND.
    """
    kv_heads: int
    head_dim: int
    capacity: int

    @property
    def codes_bytes(self) -> int:
        return align_up(self.kv_heads * self.capacity * self.head_dim)

    @property
    def scales_bytes(self) -> int:
        return align_up(4 * self.kv_heads * self.capacity)

    def codes_offset(self, value: bool) -> int:
        return self.codes_bytes if value else 0

    def scales_offset(self, value: bool) -> int:
        return 2 * self.codes_bytes + (self.scales_bytes if value else 0)

    @property
    def total_bytes(self) -> int:
        return 2 * self.codes_bytes + 2 * self.scales_bytes


def kv_cache_layout(kv_heads: int, head_dim: int, capacity: int) -> KVCacheLayout:
    return KVCacheLayout(kv_heads, head_dim, capacity)


@dataclass(frozen=True)
class RopeTableLayout:
    """The host's RoPE table (fabric_ops.rope_half_tables), written once at load: row p holds
    cos fp32 [head_dim/2] then sin fp32 [head_dim/2]; rows are 4*head_dim bytes apart."""
    head_dim: int
    rows: int

    @property
    def row_bytes(self) -> int:
        return 4 * self.head_dim

    @property
    def total_bytes(self) -> int:
        return align_up(self.rows * self.row_bytes)


def rope_table_layout(head_dim: int, rows: int) -> RopeTableLayout:
    return RopeTableLayout(head_dim, rows)


def embed_table_bytes(vocab: int, n: int) -> int:
    return align_up(vocab * 2 * n)


# ---------------------------------------------------------------------------
# Validation (the hardware's checks, in its order)
# ---------------------------------------------------------------------------

def _shape_ok(cmd: FabricCommand, hw: HardwareLimits) -> bool:
    op, n, aux = cmd.op, cmd.n, cmd.aux
    if op == Opcode.QUANT or (quant_out(cmd) and op != Opcode.ROPE):
        return aux in QUANT_GROUPS and n % aux == 0
    if op in (Opcode.ROPE, Opcode.KV_STORE, Opcode.ATTEND):
        if aux not in HEAD_DIMS or n % aux or not 0 < cmd.p0 <= hw.max_context:
            return False
        if op == Opcode.KV_STORE:
            return cmd.p1 == n // aux
        if op == Opcode.ATTEND:
            return cmd.p1 > 0 and (n // aux) % cmd.p1 == 0
        return True
    if op == Opcode.EMBED:
        return aux == 0 and cmd.p0 > 0 and n % 8 == 0 and (not cmd.flags & FabricFlags.TOKEN_REG or cmd.tokens == 1)
    return aux == 0


def _built_for(cmd: FabricCommand, hw: HardwareLimits) -> bool:
    """The shapes the design's engines were built for (HW_PARAMS4; 0 = not constrained)."""
    if hw.max_row and cmd.n > hw.max_row:
        return False
    if hw.head_dim and cmd.op in (Opcode.ROPE, Opcode.KV_STORE, Opcode.ATTEND) and cmd.aux != hw.head_dim:
        return False
    if hw.kv_group and cmd.op == Opcode.ATTEND and (cmd.n // cmd.aux) // cmd.p1 > hw.kv_group:
        return False
    return True


def _fields_used(cmd: FabricCommand) -> tuple[list[int], list[int], list[str]]:
    """(addresses, strides, unused parameter fields that must be 0) of an op."""
    op = cmd.op
    addrs = [cmd.dst]
    strides = []
    unused = ["p2", "p3"] + (["dst_stride"] if quant_out(cmd) else [])
    if op == Opcode.EMBED:
        addrs += [cmd.src1] + ([] if cmd.flags & FabricFlags.TOKEN_REG else [cmd.src0])
        strides += [cmd.dst_stride]
        unused += ["p1", "src_stride"] + (["src0"] if cmd.flags & FabricFlags.TOKEN_REG else [])
    elif op == Opcode.RMSNORM:
        addrs += [cmd.src0, cmd.src1]
        strides += [cmd.src_stride] + ([] if quant_out(cmd) else [cmd.dst_stride])
    elif op == Opcode.QUANT:
        addrs += [cmd.src0]
        strides += [cmd.src_stride]
        unused += ["p0", "p1", "src1", "dst_stride"]
    elif op == Opcode.ROPE:
        addrs += [cmd.src0, cmd.src1]
        strides += [cmd.src_stride] + ([] if quant_out(cmd) else [cmd.dst_stride])
        unused += ["p1"]
    elif op == Opcode.KV_STORE:
        addrs += [cmd.src0]
        strides += [cmd.src_stride]
        unused += ["src1", "dst_stride"]
    elif op == Opcode.ATTEND:
        addrs += [cmd.src0, cmd.src1]
        strides += [cmd.dst_stride]
        unused += ["src_stride"]
    else:   # ADD, SILU_MUL
        addrs += [cmd.src0, cmd.src1]
        strides += [cmd.src_stride, cmd.p0] + ([] if quant_out(cmd) else [cmd.dst_stride])
        unused += ["p1"]
    return addrs, strides, unused


def validate_fabric_command(cmd: FabricCommand, hw: HardwareLimits) -> ErrorCode:
    """The checks of a fabric descriptor, first failing one's code (or NONE)."""
    if not hw.fabric_ops or cmd.opcode not in {int(o) for o in FABRIC_OPCODES}:
        return ErrorCode.BAD_OPCODE
    if cmd.version != DESCRIPTOR_VERSION:
        return ErrorCode.BAD_VERSION
    addrs, strides, unused = _fields_used(cmd)
    if cmd.flags & ~FABRIC_FLAGS_DEFINED.get(cmd.op, 0) or any(getattr(cmd, f) for f in unused):
        return ErrorCode.RESERVED_NONZERO
    if cmd.n == 0 or cmd.tokens == 0:
        return ErrorCode.ZERO_SHAPE
    if cmd.tokens > hw.tokens:
        return ErrorCode.TOO_MANY_TOKENS
    if any(a % ALIGN for a in addrs) or any(s % ALIGN for s in strides):
        return ErrorCode.MISALIGNED_ADDRESS
    if any(a >> hw.addr_bits for a in addrs):
        return ErrorCode.ADDRESS_RANGE
    if cmd.n > FABRIC_MAX_N or not _shape_ok(cmd, hw) or not _built_for(cmd, hw):
        return ErrorCode.BAD_FIELD
    row = 4 * cmd.n
    if cmd.tokens > 1 and any(s < row for s in strides):
        return ErrorCode.BAD_FIELD      # rows would overlap
    return ErrorCode.NONE


def validate_any(cmd: Command, hw: HardwareLimits) -> ErrorCode:
    if isinstance(cmd, FabricCommand):
        return validate_fabric_command(cmd, hw)
    return validate_command(cmd, hw)


def describe_command(cmd: Command) -> str:
    """One line for logs: opcode name and shape."""
    if isinstance(cmd, FabricCommand):
        return f"{cmd.op.name} n={cmd.n} T={cmd.tokens} aux={cmd.aux} tag={cmd.tag:#x}"
    return f"LINEAR n={cmd.n} k={cmd.k} T={cmd.tokens} tag={cmd.tag:#x}"
