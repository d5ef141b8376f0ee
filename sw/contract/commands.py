"""The host <-> accelerator contract: register map, command descriptors, buffers, error codes.

This module is the single source of truth for everything the host driver and
the control RTL must agree on. It is pure Python (no Amaranth), because the
board install has no Amaranth:

* ``REGISTERS``: the AXI4-Lite register map. ``rtl/csr.py`` builds the RTL
  register bank from it, the driver reads the offsets and field positions from
  it, and :func:`render_registers_markdown` writes docs/registers.md from it.
* ``DESCRIPTOR_FIELDS``: the 64-byte little-endian command descriptor.
  ``rtl/cmdproc.py`` decodes the same table into an Amaranth struct.
* :class:`ErrorCode` and :func:`validate_command`: the checks the command
  processor applies in hardware, in the same order, with the same codes.
* The activation, bias and output buffer layouts a LINEAR command reads and
  writes, with pack/unpack helpers.

Decisions (and why):

* The run length is ``CMD_COUNT``; there is no END opcode or "last" flag, so a
  driver can run any contiguous slice of a prebuilt list (one layer, for a
  benchmark) by pointing CMD_BASE at it. Opcode 0 is invalid, so a zeroed or
  stale slot is reported (BAD_OPCODE) rather than silently ending the run.
* N need not be a multiple of tile_rows: the .kq layout pads N up to a whole
  number of tiles with zero rows (sw/contract/layout.py), and the bias and output
  buffers are sized for the padded N, so the engine only ever moves whole tiles.
* Every buffer address (weights, activations, bias, output) and CMD_BASE must
  be 64-byte aligned: a 64-byte line is the Cortex-A53 cache line, so cache
  maintenance of one buffer never touches a neighbour, and every 16-byte AXI
  beat of a buffer is whole.
* group_size and tile_rows must equal the hardware's (HW_PARAMS0): the weight
  stream's order depends on both, so another value cannot be executed.
* Reserved fields and reserved flag bits must be zero, so that a later format
  can give them a meaning without old hardware misreading new lists.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import ConfigError, FormatError
from .layout import BEAT_BYTES, TileLayout

# ---------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------

ID_MAGIC = int.from_bytes(b"KRIA", "little")   # reading ID as 4 LE bytes gives b"KRIA"
REGMAP_VERSION = (1, 1)                         # (major, minor) of this register map + descriptor format
DESCRIPTOR_VERSION = 1                          # the `version` byte of every descriptor
CSR_ADDR_WIDTH = 12                             # a 4 KiB AXI4-Lite window
CSR_DATA_BYTES = 4
CMD_LOG_DEPTH = 32                              # per-command cycle log entries
COUNTER_BITS = 64
ALIGN = 64                                      # buffer / descriptor / CMD_BASE alignment in bytes
DEFAULT_ADDR_BITS = 40                          # bus address width (rtl/axi.py's default)
HP_ID_BITS = 6                                  # AXI ID width of the PS's S_AXI_HPn_FPD ports


class Access(str, enum.Enum):
    """Register field access modes (the RTL implements each in rtl/csr.py)."""
    R = "R"            # read-only, driven by hardware
    RW = "RW"          # read/write storage
    W1C = "W1C"        # hardware sets; writing 1 clears
    W1S = "W1S"        # writing 1 sets; hardware clears
    PULSE = "PULSE"    # writing 1 produces a one-cycle pulse; reads 0


@dataclass(frozen=True)
class FieldSpec:
    name: str
    lsb: int
    width: int
    access: Access
    doc: str
    init: int = 0

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb

    def get(self, word: int) -> int:
        return (word >> self.lsb) & ((1 << self.width) - 1)

    def put(self, value: int) -> int:
        if not 0 <= value < (1 << self.width):
            raise ValueError(f"field {self.name}: value {value} does not fit {self.width} bits")
        return value << self.lsb


@dataclass(frozen=True)
class RegisterSpec:
    name: str
    offset: int
    doc: str
    fields: tuple[FieldSpec, ...]

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"register {self.name} has no field {name!r}; it has "
                       f"{', '.join(f.name for f in self.fields)}")

    def pack(self, **values: int) -> int:
        """The register word with the named fields set (others 0)."""
        word = 0
        for k, v in values.items():
            word |= self.field(k).put(int(v))
        return word

    def unpack(self, word: int) -> dict[str, int]:
        return {f.name: f.get(word) for f in self.fields}


class _MapBuilder:
    """Lays registers out at consecutive 4-byte offsets (or at an explicit one), in order."""

    def __init__(self):
        self.regs: list[RegisterSpec] = []
        self.next = 0

    def add(self, name: str, doc: str, *fields: tuple, at: int | None = None) -> None:
        offset = self.next if at is None else at
        assert offset % CSR_DATA_BYTES == 0 and offset >= self.next, (name, offset)
        specs, lsb = [], 0
        for f in fields:
            fname, width, access, fdoc, *rest = f
            opts = rest[0] if rest else {}
            lsb = opts.get("lsb", lsb)
            specs.append(FieldSpec(fname, lsb, width, Access(access), fdoc, opts.get("init", 0)))
            lsb += width
        assert lsb <= 32, name
        self.regs.append(RegisterSpec(name, offset, doc, tuple(specs)))
        self.next = offset + CSR_DATA_BYTES


def _build_register_map() -> tuple[RegisterSpec, ...]:
    b = _MapBuilder()
    b.add("ID", "Constant magic: the bytes \"KRIA\" read as a little-endian word.",
          ("magic", 32, "R", "0x4149524B"))
    b.add("VERSION", "Register map and descriptor format version.",
          ("minor", 16, "R", "compatible additions"), ("major", 16, "R", "incompatible changes"))
    b.add("HW_PARAMS0", "The array shape the design was elaborated with.",
          ("rows", 8, "R", "R: output rows per tile; descriptors must use tile_rows = rows"),
          ("cols", 8, "R", "C: input columns per array beat"),
          ("tokens", 8, "R", "T: token lanes; descriptors may use 1..T tokens"),
          ("group_size", 8, "R", "G: the only group size the design executes"))
    b.add("HW_PARAMS1", "More elaboration facts.",
          ("engines", 8, "R", "linear engines (one per HP port)"),
          ("weight_kinds", 8, "R", "bit 0: INT4 asymmetric group-wise; bit 1: INT8 per channel"),
          ("cmd_log_depth", 8, "R", "entries of the per-command cycle log"),
          ("beat_bytes", 8, "R", "bytes per AXI data beat of the memory ports"))
    b.add("HW_PARAMS2", "Address range and clock.",
          ("addr_bits", 8, "R", "bus address width: every address must be below 2^addr_bits"),
          ("clock_mhz", 12, "R", "the clock the design was built for"))
    b.add("HW_PARAMS3", "The fabric decoder (issue 11): 0 in a design that runs the linear layers only.",
          ("max_context", 24, "R", "KV-cache positions the attention unit holds (0: no fabric decoder; the "
           "EMBED..SILU_MUL opcodes and the ARGMAX flag are then invalid)"))
    b.add("HW_PARAMS4", "The fabric decoder's shapes (issue 11): what the attention and vector engines were "
          "built for; 0 in a design without it.",
          ("head_dim", 9, "R", "the attention unit's head dimension: ROPE, KV_STORE and ATTEND take aux = head_dim"),
          ("kv_group", 6, "R", "the most query heads per KV head ATTEND takes (an op's ratio heads / p1 may be smaller)"),
          ("max_row", 17, "R", "the most elements per token row (n) a fabric op takes"))
    for i in range(8):
        doc = ("The sha256 of the ArrayConfig's canonical JSON (ArrayConfig.config_hash), bytes 0..3 as a "
               "little-endian word; CONFIG_HASH1..7 hold bytes 4..31 in order. The driver refuses a model "
               "built for another config." if i == 0 else f"Config hash bytes {4 * i}..{4 * i + 3} (see CONFIG_HASH0).")
        b.add(f"CONFIG_HASH{i}", doc,
              ("hash", 32, "R", f"digest bytes {4 * i}..{4 * i + 3}"), **({"at": 0x20} if i == 0 else {}))
    b.add("CTRL", "Control. Pulse fields act on a write of 1 and read as 0.",
          ("start", 1, "PULSE", "start a run of CMD_COUNT descriptors at CMD_BASE; ignored while busy"),
          ("soft_reset", 1, "PULSE", "abort any run and pulse the datapath's soft reset; clear STATUS, "
           "IRQ_STATUS, LAST_CMD_CYCLES and the counters; keeps CMD_BASE, CMD_COUNT, irq_enable and the "
           "log memory; wins over start in the same write"),
          ("perf_clear", 1, "PULSE", "zero the performance counters (may be written with start)"),
          ("irq_enable", 1, "RW", "drive the irq line while IRQ_STATUS is non-zero", {"lsb": 8}))
    b.add("STATUS", "Run status. done and error are cleared by the next start.",
          ("busy", 1, "R", "a run is in progress"),
          ("done", 1, "R", "the last run ended (successfully or not)"),
          ("error", 1, "R", "the last run ended with an error"),
          ("error_code", 8, "R", "ErrorCode of the failure (0 = none)", {"lsb": 8}),
          ("cmd_index", 16, "R", "while busy: the command being executed; after an error: the failing "
           "command; after success: CMD_COUNT"))
    b.add("IRQ_STATUS", "Interrupt causes; write 1 to clear.",
          ("done", 1, "W1C", "a run ended"),
          ("error", 1, "W1C", "a run ended with an error"))
    b.add("CMD_BASE_LO", "Bus address of descriptor 0, bits 31..0 (64-byte aligned).",
          ("addr", 32, "RW", "address bits 31..0"), at=0x50)
    b.add("CMD_BASE_HI", "Bus address of descriptor 0, bits 63..32.",
          ("addr", 32, "RW", "address bits 63..32"))
    b.add("CMD_COUNT", "Number of descriptors in a run.",
          ("count", 16, "RW", "0 ends the run at once with done"))
    b.add("LAST_CMD_CYCLES", "Cycles of the most recently completed command.",
          ("cycles", 32, "R", "see CMD_LOG_CYCLES"), at=0x60)
    b.add("CMD_LOG_INDEX", "Selects the cycle log entry CMD_LOG_CYCLES shows.",
          ("index", (CMD_LOG_DEPTH - 1).bit_length(), "RW", "entry i holds command i mod "
           f"{CMD_LOG_DEPTH} of the current or last run"))
    b.add("CMD_LOG_CYCLES", "Cycles of the logged command: from the cycle it became current (the "
          "previous command's completion, or the start) through its completion, fetch included; a "
          "successful run's entries sum to its busy cycles.",
          ("cycles", 32, "R", "saturates at 2^32-1"))
    b.add("PERF_CTRL", "Counter snapshot control. Reading a counter's LO word latches its HI word; "
          "a snapshot latches every counter at the same cycle.",
          ("snapshot", 1, "PULSE", "latch all counters into their read registers"),
          ("hold", 1, "RW", "while 1, LO reads return the snapshot instead of latching anew"))
    for name, doc in PERF_COUNTERS:
        first = name == PERF_COUNTERS[0][0]
        b.add(f"{name}_LO", f"{doc}, bits 31..0 (the read latches _HI).",
              ("value", 32, "R", "counter bits 31..0"), **({"at": 0x80} if first else {}))
        b.add(f"{name}_HI", f"{doc}, bits 63..32 as latched.", ("value", 32, "R", "counter bits 63..32"))
    b.add("RUN_POS", "The fabric decoder's position of token row 0 for the next run (ROPE, KV_STORE, ATTEND).",
          ("pos", 24, "RW", "row t of a command is at position pos + t"), at=0xC0)
    b.add("RUN_TOKEN", "The token id EMBED reads when its TOKEN_REG flag is set (decode: one token).",
          ("token", 24, "RW", "token id"))
    b.add("RESULT_INDEX", "The argmax of the last LINEAR with the ARGMAX flag: the next token under greedy decoding.",
          ("index", 24, "R", "first index of the largest output of the last token row (NaN counts as -inf)"))
    b.add("RESULT_VALUE", "The fp32 bit pattern of the largest output RESULT_INDEX points at (-inf, 0xFF800000, "
          "when every output is -inf or NaN).",
          ("value", 32, "R", "fp32 bits"))
    return tuple(b.regs)


PERF_COUNTERS = (
    ("BUSY_CYCLES", "Cycles with STATUS.busy set"),
    ("MEM_STALL_CYCLES", "Cycles the engine waited on memory (datapath mem_stall, or waiting for a descriptor)"),
    ("COMPUTE_STALL_CYCLES", "Cycles the memory stream waited on compute (datapath compute_stall)"),
    ("BYTES_READ", "Bytes read from DDR: descriptors plus datapath reads"),
    ("BYTES_WRITTEN", "Bytes written to DDR by the datapath"),
)

REGISTERS: tuple[RegisterSpec, ...] = _build_register_map()
REGISTER_BY_NAME: dict[str, RegisterSpec] = {r.name: r for r in REGISTERS}
# Offsets as an IntEnum for the driver: Reg.STATUS == 0x34.
Reg = enum.IntEnum("Reg", {r.name: r.offset for r in REGISTERS})


def register(name: str) -> RegisterSpec:
    try:
        return REGISTER_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no register {name!r}") from None


def config_hash_words(config_hash: str | bytes) -> list[int]:
    """The eight CONFIG_HASHi words for a sha256 digest (hex string or 32 bytes)."""
    digest = bytes.fromhex(config_hash) if isinstance(config_hash, str) else bytes(config_hash)
    if len(digest) != 32:
        raise ConfigError(f"config hash must be 32 bytes (sha256), got {len(digest)}")
    return [int.from_bytes(digest[4 * i:4 * i + 4], "little") for i in range(8)]


def config_hash_from_words(words: Iterable[int]) -> str:
    return b"".join(int(w).to_bytes(4, "little") for w in words).hex()


# ---------------------------------------------------------------------------
# Error codes
# ---------------------------------------------------------------------------

class ErrorCode(enum.IntEnum):
    """STATUS.error_code. Codes 1..11 come from descriptor validation, checked in this order;
    the first failing check is reported."""
    NONE = 0
    BAD_OPCODE = 1              # opcode is not LINEAR
    BAD_VERSION = 2             # descriptor version byte is not DESCRIPTOR_VERSION
    RESERVED_NONZERO = 3        # a reserved field or reserved flag bit is set
    ZERO_SHAPE = 4              # n, k or tokens is 0
    BAD_GROUP_SIZE = 5          # group_size differs from the hardware's
    K_NOT_GROUP_MULTIPLE = 6    # k is not a multiple of group_size
    BAD_TILE_ROWS = 7           # tile_rows differs from the hardware's rows
    UNSUPPORTED_WEIGHT_KIND = 8  # the design cannot execute this weight kind
    TOO_MANY_TOKENS = 9         # tokens exceeds the hardware's token lanes
    MISALIGNED_ADDRESS = 10     # weight/act/out (and bias when used) not 64-byte aligned
    ADDRESS_RANGE = 11          # weight/act/out (and bias when used) at or above 2^addr_bits
    BAD_CMD_BASE = 12           # CMD_BASE misaligned or out of range (reported at start, index 0)
    FETCH_ERROR = 13            # SLVERR/DECERR while reading a descriptor
    READ_ERROR = 14             # datapath: SLVERR/DECERR reading weights, activations or bias
    WRITE_ERROR = 15            # datapath: SLVERR/DECERR writing outputs
    DATAPATH_ERROR = 16         # datapath reported an error without a more specific code
    # The fabric decoder's ops (sw/contract/fabric_commands.py validate_fabric_command):
    BAD_FIELD = 17              # a fabric op's shape field is invalid for this op or this design
    CONTEXT_FULL = 18           # RUN_POS + tokens exceeds the KV cache / RoPE table capacity (at run time)
    BAD_TOKEN = 19              # EMBED: a token id at or above the vocabulary (at run time)


ERROR_TEXT = {
    ErrorCode.NONE: "no error",
    ErrorCode.BAD_OPCODE: "opcode is not LINEAR (1)",
    ErrorCode.BAD_VERSION: f"descriptor version is not {DESCRIPTOR_VERSION}",
    ErrorCode.RESERVED_NONZERO: "a reserved field or reserved flag bit is not zero",
    ErrorCode.ZERO_SHAPE: "n, k or tokens is zero",
    ErrorCode.BAD_GROUP_SIZE: "group_size is not the hardware's group size",
    ErrorCode.K_NOT_GROUP_MULTIPLE: "k is not a multiple of group_size",
    ErrorCode.BAD_TILE_ROWS: "tile_rows is not the hardware's rows",
    ErrorCode.UNSUPPORTED_WEIGHT_KIND: "the design does not execute this weight kind",
    ErrorCode.TOO_MANY_TOKENS: "tokens exceeds the hardware's token lanes",
    ErrorCode.MISALIGNED_ADDRESS: f"a buffer address is not {ALIGN}-byte aligned",
    ErrorCode.ADDRESS_RANGE: "a buffer address is at or above 2^addr_bits (HW_PARAMS2)",
    ErrorCode.BAD_CMD_BASE: f"CMD_BASE is not {ALIGN}-byte aligned or is at or above 2^addr_bits",
    ErrorCode.FETCH_ERROR: "AXI error response while fetching the descriptor",
    ErrorCode.READ_ERROR: "AXI error response while reading weights, activations or bias",
    ErrorCode.WRITE_ERROR: "AXI error response while writing outputs",
    ErrorCode.DATAPATH_ERROR: "the datapath reported an error",
    ErrorCode.BAD_FIELD: "a fabric op's shape field (n, aux, a stride or capacity) is invalid for the op or design",
    ErrorCode.CONTEXT_FULL: "RUN_POS + tokens exceeds the capacity of the KV cache or RoPE table",
    ErrorCode.BAD_TOKEN: "EMBED read a token id at or above the vocabulary size",
}


def describe_error(code: int, index: int | None = None) -> str:
    try:
        text = f"{ErrorCode(code).name}: {ERROR_TEXT[ErrorCode(code)]}"
    except ValueError:
        text = f"unknown error code {code}"
    return text if index is None else f"command {index}: {text}"


# ---------------------------------------------------------------------------
# Command descriptors
# ---------------------------------------------------------------------------

DESCRIPTOR_BYTES = 64


class Opcode(enum.IntEnum):
    INVALID = 0
    LINEAR = 1
    # The fabric decoder's ops (sw/contract/fabric_commands.py): executed only by a design whose
    # HW_PARAMS3.max_context is non-zero; elsewhere they are BAD_OPCODE.
    EMBED = 2
    RMSNORM = 3
    QUANT = 4
    ROPE = 5
    KV_STORE = 6
    ATTEND = 7
    ADD = 8
    SILU_MUL = 9


class Flags(enum.IntFlag):
    HAS_BIAS = 1 << 0         # add the fp32 bias at bias_addr (else y starts at +0.0)
    WEIGHT_INT8 = 1 << 1      # INT8 symmetric per-channel weights (else INT4 asymmetric group-wise)
    ARGMAX = 1 << 2           # fabric decoder: the last token row's argmax into RESULT_INDEX/RESULT_VALUE


FLAGS_DEFINED = int(Flags.HAS_BIAS | Flags.WEIGHT_INT8)        # what a linears-only design accepts
FLAGS_DEFINED_FABRIC = FLAGS_DEFINED | int(Flags.ARGMAX)       # ... and a design with the fabric decoder
WEIGHT_KIND_INT4 = 1 << 0     # HW_PARAMS1.weight_kinds bits
WEIGHT_KIND_INT8 = 1 << 1

# (name, byte offset, struct format, doc). Little endian, 64 bytes, no implicit padding.
DESCRIPTOR_FIELDS: tuple[tuple[str, int, str, str], ...] = (
    ("opcode", 0, "B", "1 = LINEAR; 0 and others are invalid"),
    ("version", 1, "B", f"descriptor format, must be {DESCRIPTOR_VERSION}"),
    ("flags", 2, "H", "bit 0 HAS_BIAS, bit 1 WEIGHT_INT8, bit 2 ARGMAX (fabric-decoder designs only); "
                      "other bits reserved (0)"),
    ("n", 4, "I", "N: output rows (need not be a multiple of tile_rows)"),
    ("k", 8, "I", "K: input columns, a multiple of group_size"),
    ("group_size", 12, "H", "G: quantization group along K; must equal HW_PARAMS0.group_size"),
    ("tokens", 14, "H", "T: tokens in the activation buffer, 1..HW_PARAMS0.tokens"),
    ("tile_rows", 16, "H", "R of the weight stream's tiles; must equal HW_PARAMS0.rows"),
    ("reserved0", 18, "H", "0"),
    ("tag", 20, "I", "free for the driver (e.g. layer and linear id); passed to the datapath"),
    ("weight_addr", 24, "Q", "packed weight stream in the .kq tile layout (sw/contract/layout.py)"),
    ("act_addr", 32, "Q", "activation buffer (activation_layout)"),
    ("bias_addr", 40, "Q", "fp32 bias, padded N entries; ignored (and unchecked) without HAS_BIAS"),
    ("out_addr", 48, "Q", "fp32 outputs (output_layout)"),
    ("reserved1", 56, "Q", "0"),
)
_FMT = "<" + "".join(f for _, _, f, _ in DESCRIPTOR_FIELDS)
assert struct.calcsize(_FMT) == DESCRIPTOR_BYTES
assert all(struct.calcsize("<" + "".join(f for _, _, f, _ in DESCRIPTOR_FIELDS[:i])) == off
           for i, (_, off, _, _) in enumerate(DESCRIPTOR_FIELDS))
ADDRESS_FIELDS = ("weight_addr", "act_addr", "bias_addr", "out_addr")
RESERVED_FIELDS = ("reserved0", "reserved1")


def descriptor_field_bits() -> dict[str, tuple[int, int]]:
    """{name: (bit offset, bit width)} inside the 512-bit descriptor word (for the RTL)."""
    return {name: (8 * off, 8 * struct.calcsize(fmt)) for name, off, fmt, _ in DESCRIPTOR_FIELDS}


@dataclass(frozen=True)
class LinearCommand:
    """One descriptor. Field names and meanings are DESCRIPTOR_FIELDS'."""
    n: int
    k: int
    group_size: int
    tokens: int
    tile_rows: int
    weight_addr: int
    act_addr: int
    out_addr: int
    bias_addr: int = 0
    flags: int = 0
    tag: int = 0
    opcode: int = Opcode.LINEAR
    version: int = DESCRIPTOR_VERSION
    reserved0: int = 0
    reserved1: int = 0

    @property
    def has_bias(self) -> bool:
        return bool(self.flags & Flags.HAS_BIAS)

    @property
    def weight_int8(self) -> bool:
        return bool(self.flags & Flags.WEIGHT_INT8)

    @property
    def weight_bits(self) -> int:
        return 8 if self.weight_int8 else 4

    def replace(self, **changes) -> "LinearCommand":
        return dataclasses.replace(self, **changes)


def linear_command(*, n: int, k: int, group_size: int, tokens: int, tile_rows: int, weight_addr: int,
                   act_addr: int, out_addr: int, bias_addr: int | None = None, weight_int8: bool = False,
                   tag: int = 0) -> LinearCommand:
    """A LINEAR descriptor; passing bias_addr sets HAS_BIAS."""
    flags = (Flags.HAS_BIAS if bias_addr is not None else 0) | (Flags.WEIGHT_INT8 if weight_int8 else 0)
    return LinearCommand(n=n, k=k, group_size=group_size, tokens=tokens, tile_rows=tile_rows,
                         weight_addr=weight_addr, act_addr=act_addr, out_addr=out_addr,
                         bias_addr=bias_addr or 0, flags=int(flags), tag=tag)


def pack_fields(cmd, fields: tuple[tuple[str, int, str, str], ...]) -> bytes:
    """The descriptor bytes of `cmd` laid out by a field table (DESCRIPTOR_FIELDS or another opcode's)."""
    values = []
    for name, _, fmt, _ in fields:
        v = int(getattr(cmd, name))
        bits = 8 * struct.calcsize(fmt)
        if not 0 <= v < (1 << bits):
            raise FormatError(f"descriptor field {name} = {v} does not fit {bits} unsigned bits")
        values.append(v)
    return struct.pack("<" + "".join(f for _, _, f, _ in fields), *values)


def unpack_fields(data: bytes, fields: tuple[tuple[str, int, str, str], ...]) -> dict[str, int]:
    """{field: value} of one descriptor by a field table (FormatError unless exactly 64 bytes)."""
    data = bytes(data)
    if len(data) != DESCRIPTOR_BYTES:
        raise FormatError(f"a descriptor is {DESCRIPTOR_BYTES} bytes, got {len(data)}")
    return dict(zip((name for name, *_ in fields), struct.unpack("<" + "".join(f for _, _, f, _ in fields), data)))


def pack_command(cmd: LinearCommand) -> bytes:
    return pack_fields(cmd, DESCRIPTOR_FIELDS)


def unpack_command(data: bytes) -> LinearCommand:
    return LinearCommand(**unpack_fields(data, DESCRIPTOR_FIELDS))


def pack_command_list(cmds: Iterable[LinearCommand]) -> bytes:
    return b"".join(pack_command(c) for c in cmds)


def unpack_command_list(data: bytes) -> list[LinearCommand]:
    if len(data) % DESCRIPTOR_BYTES:
        raise FormatError(f"a command list is a multiple of {DESCRIPTOR_BYTES} bytes, got {len(data)}")
    return [unpack_command(data[i:i + DESCRIPTOR_BYTES]) for i in range(0, len(data), DESCRIPTOR_BYTES)]


@dataclass(frozen=True)
class HardwareLimits:
    """What a design executes; the RTL reports it in HW_PARAMS0/1."""
    tile_rows: int
    tokens: int
    group_size: int
    weight_kinds: int = WEIGHT_KIND_INT4
    addr_bits: int = DEFAULT_ADDR_BITS
    max_context: int = 0          # HW_PARAMS3: 0 = no fabric decoder (linears only)
    head_dim: int = 0             # HW_PARAMS4: the fabric shapes (0: not constrained)
    kv_group: int = 0
    max_row: int = 0

    @property
    def fabric_ops(self) -> bool:
        """The design executes the fabric decoder's opcodes and the ARGMAX flag."""
        return self.max_context > 0

    @classmethod
    def from_config(cls, cfg, addr_bits: int = DEFAULT_ADDR_BITS) -> "HardwareLimits":
        """From an sw.contract.config.ArrayConfig (duck-typed, so no import of rtl here)."""
        kinds = WEIGHT_KIND_INT8 if getattr(cfg, "weight_bits", 4) == 8 else WEIGHT_KIND_INT4
        return cls(tile_rows=cfg.rows, tokens=cfg.tokens, group_size=cfg.group_size, weight_kinds=kinds,
                   addr_bits=addr_bits, max_context=getattr(cfg, "max_context", 0),
                   head_dim=getattr(cfg, "attn_head_dim", 0), kv_group=getattr(cfg, "attn_group", 0),
                   max_row=getattr(cfg, "fabric_max_n", 0))

    @classmethod
    def from_registers(cls, hw_params0: int, hw_params1: int, hw_params2: int,
                       hw_params3: int = 0, hw_params4: int = 0) -> "HardwareLimits":
        p0 = register("HW_PARAMS0").unpack(hw_params0)
        p1 = register("HW_PARAMS1").unpack(hw_params1)
        p2 = register("HW_PARAMS2").unpack(hw_params2)
        p3 = register("HW_PARAMS3").unpack(hw_params3)
        p4 = register("HW_PARAMS4").unpack(hw_params4)
        return cls(tile_rows=p0["rows"], tokens=p0["tokens"], group_size=p0["group_size"],
                   weight_kinds=p1["weight_kinds"], addr_bits=p2["addr_bits"], max_context=p3["max_context"],
                   head_dim=p4["head_dim"], kv_group=p4["kv_group"], max_row=p4["max_row"])


def validate_command(cmd: LinearCommand, hw: HardwareLimits) -> ErrorCode:
    """The hardware's checks, in its order: the first failing check's code, or NONE."""
    if cmd.opcode != Opcode.LINEAR:
        return ErrorCode.BAD_OPCODE
    if cmd.version != DESCRIPTOR_VERSION:
        return ErrorCode.BAD_VERSION
    defined = FLAGS_DEFINED_FABRIC if hw.fabric_ops else FLAGS_DEFINED
    if (cmd.flags & ~defined) or any(getattr(cmd, f) for f in RESERVED_FIELDS):
        return ErrorCode.RESERVED_NONZERO
    if cmd.n == 0 or cmd.k == 0 or cmd.tokens == 0:
        return ErrorCode.ZERO_SHAPE
    if cmd.group_size != hw.group_size:
        return ErrorCode.BAD_GROUP_SIZE
    if cmd.k % cmd.group_size:
        return ErrorCode.K_NOT_GROUP_MULTIPLE
    if cmd.tile_rows != hw.tile_rows:
        return ErrorCode.BAD_TILE_ROWS
    if not (hw.weight_kinds & (WEIGHT_KIND_INT8 if cmd.weight_int8 else WEIGHT_KIND_INT4)):
        return ErrorCode.UNSUPPORTED_WEIGHT_KIND
    if cmd.tokens > hw.tokens:
        return ErrorCode.TOO_MANY_TOKENS
    addrs = [cmd.weight_addr, cmd.act_addr, cmd.out_addr] + ([cmd.bias_addr] if cmd.has_bias else [])
    if any(a % ALIGN for a in addrs):
        return ErrorCode.MISALIGNED_ADDRESS
    if any(a >> hw.addr_bits for a in addrs):
        return ErrorCode.ADDRESS_RANGE
    return ErrorCode.NONE


def validate_cmd_base(base: int, hw: HardwareLimits) -> ErrorCode:
    """The check at start: BAD_CMD_BASE (reported with cmd_index 0) or NONE."""
    return ErrorCode.BAD_CMD_BASE if base % ALIGN or base >> hw.addr_bits else ErrorCode.NONE


def validate_command_list(cmds: Iterable[LinearCommand], hw: HardwareLimits) -> list[tuple[int, ErrorCode]]:
    """(index, code) of every invalid command; the hardware stops at the first."""
    return [(i, e) for i, c in enumerate(cmds) if (e := validate_command(c, hw)) != ErrorCode.NONE]


# ---------------------------------------------------------------------------
# Buffers a LINEAR command reads and writes
# ---------------------------------------------------------------------------

def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def padded_rows(n: int, tile_rows: int) -> int:
    return -(-n // tile_rows) * tile_rows


@dataclass(frozen=True)
class ActivationLayout:
    """The host-written activation buffer of one command (T tokens, K columns, group G).

    Three sections, each starting at a 64-byte aligned offset:

    * codes:  int8  [T][K]  row stride ``codes_stride`` = K bytes (K is a multiple of 32, so
      rows start on 16-byte beats);
    * scales: fp32  [T][ng] s_a per group, row stride ``meta_stride`` = 4*ng rounded up to 16;
    * qsums:  int32 [T][ng] sum of the group's codes, same row stride.

    Padding bytes are zero.
    """
    k: int
    group_size: int
    tokens: int

    @property
    def groups(self) -> int:
        return self.k // self.group_size

    @property
    def codes_offset(self) -> int:
        return 0

    @property
    def codes_stride(self) -> int:
        return align_up(self.k, BEAT_BYTES)

    @property
    def meta_stride(self) -> int:
        return align_up(4 * self.groups, BEAT_BYTES)

    @property
    def scales_offset(self) -> int:
        return align_up(self.codes_offset + self.tokens * self.codes_stride)

    @property
    def qsums_offset(self) -> int:
        return align_up(self.scales_offset + self.tokens * self.meta_stride)

    @property
    def total_bytes(self) -> int:
        return align_up(self.qsums_offset + self.tokens * self.meta_stride)


def activation_layout(k: int, group_size: int, tokens: int) -> ActivationLayout:
    if k <= 0 or group_size <= 0 or tokens <= 0 or k % group_size:
        raise ConfigError(f"activation buffer: k={k} must be a positive multiple of group_size={group_size}, "
                          f"tokens={tokens} positive")
    return ActivationLayout(k, group_size, tokens)


def pack_activations(q: np.ndarray, s_a: np.ndarray, qsum: np.ndarray, group_size: int) -> bytes:
    """q int8 [T, K], s_a fp32 [T, ng], qsum int32 [T, ng] (sw.contract.numerics.quantize_activations) -> buffer."""
    q = np.asarray(q)
    if q.ndim == 1:
        q, s_a, qsum = q[None], np.asarray(s_a)[None], np.asarray(qsum)[None]
    t, k = q.shape
    L = activation_layout(k, group_size, t)
    ng = L.groups
    s_a, qsum = np.asarray(s_a), np.asarray(qsum)
    if s_a.shape != (t, ng) or qsum.shape != (t, ng):
        raise ConfigError(f"activation buffer: scales {s_a.shape} and qsums {qsum.shape} must be {(t, ng)}")
    buf = np.zeros(L.total_bytes, np.uint8)
    codes = buf[:t * L.codes_stride].reshape(t, L.codes_stride)
    codes[:, :k] = q.astype(np.int8).view(np.uint8)
    for off, arr, dt in ((L.scales_offset, s_a, "<f4"), (L.qsums_offset, qsum, "<i4")):
        rows = buf[off:off + t * L.meta_stride].reshape(t, L.meta_stride)
        rows[:, :4 * ng] = np.ascontiguousarray(arr.astype(dt)).view(np.uint8).reshape(t, 4 * ng)
    return buf.tobytes()


def unpack_activations(data: bytes, k: int, group_size: int, tokens: int):
    """Inverse of :func:`pack_activations`: (q int8 [T, K], s_a fp32 [T, ng], qsum int32 [T, ng])."""
    L = activation_layout(k, group_size, tokens)
    buf = np.frombuffer(bytes(data), np.uint8)
    if buf.size < L.total_bytes:
        raise FormatError(f"activation buffer has {buf.size} bytes, needs {L.total_bytes}")
    t, ng = tokens, L.groups
    q = buf[:t * L.codes_stride].reshape(t, L.codes_stride)[:, :k].view(np.int8).copy()
    s = buf[L.scales_offset:L.scales_offset + t * L.meta_stride].reshape(t, L.meta_stride)[:, :4 * ng]
    c = buf[L.qsums_offset:L.qsums_offset + t * L.meta_stride].reshape(t, L.meta_stride)[:, :4 * ng]
    scales = np.ascontiguousarray(s).view("<f4").astype(np.float32)
    return q, scales, np.ascontiguousarray(c).view("<i4").astype(np.int32)


@dataclass(frozen=True)
class OutputLayout:
    """fp32 outputs of one command: [T][N_pad] row-major, N_pad = N rounded up to tile_rows;
    row stride ``stride`` = 4*N_pad rounded up to 64 bytes. Rows n >= N hold the padded
    (zero-weight) rows' results."""
    n: int
    tokens: int
    tile_rows: int

    @property
    def padded_rows(self) -> int:
        return padded_rows(self.n, self.tile_rows)

    @property
    def stride(self) -> int:
        return align_up(4 * self.padded_rows)

    @property
    def total_bytes(self) -> int:
        return self.tokens * self.stride


def output_layout(n: int, tokens: int, tile_rows: int) -> OutputLayout:
    return OutputLayout(n, tokens, tile_rows)


def unpack_outputs(data: bytes, n: int, tokens: int, tile_rows: int) -> np.ndarray:
    L = output_layout(n, tokens, tile_rows)
    buf = np.frombuffer(bytes(data), np.uint8)
    if buf.size < L.total_bytes:
        raise FormatError(f"output buffer has {buf.size} bytes, needs {L.total_bytes}")
    rows = buf[:L.total_bytes].reshape(tokens, L.stride)[:, :4 * n]
    return np.ascontiguousarray(rows).view("<f4").astype(np.float32)


def pack_outputs(y: np.ndarray, tile_rows: int) -> bytes:
    """fp32 [T, N] -> output buffer bytes (padding zero); what the engine writes."""
    y = np.asarray(y, np.float32)
    t, n = y.shape
    L = output_layout(n, t, tile_rows)
    buf = np.zeros((t, L.stride), np.uint8)
    buf[:, :4 * n] = np.ascontiguousarray(y.astype("<f4")).view(np.uint8).reshape(t, 4 * n)
    return buf.tobytes()


def bias_bytes(n: int, tile_rows: int) -> int:
    return align_up(4 * padded_rows(n, tile_rows))


def pack_bias(bias: np.ndarray, tile_rows: int) -> bytes:
    """fp32 [N] -> bias buffer: N_pad fp32 entries (zero padded), size rounded up to 64 bytes."""
    b = np.asarray(bias, np.float32).reshape(-1)
    buf = np.zeros(bias_bytes(b.size, tile_rows), np.uint8)
    buf[:4 * b.size] = np.ascontiguousarray(b.astype("<f4")).view(np.uint8)
    return buf.tobytes()


def weight_bytes(n: int, k: int, group_size: int, tile_rows: int, weight_int8: bool = False) -> int:
    """Bytes of the packed weight stream a command reads at weight_addr (sw/contract/layout.py)."""
    return TileLayout(n, k, group_size, tile_rows, 8 if weight_int8 else 4).total_bytes


# ---------------------------------------------------------------------------
# docs/registers.md
# ---------------------------------------------------------------------------

def _bits(f: FieldSpec) -> str:
    return f"{f.lsb}" if f.width == 1 else f"{f.lsb + f.width - 1}:{f.lsb}"


def render_registers_markdown() -> str:
    """docs/registers.md, generated: `python -m sw.contract.commands > docs/registers.md`."""
    out = [
        "# Registers, command descriptors and error codes",
        "",
        "<!-- Generated by sw/contract/commands.py (render_registers_markdown); do not edit by hand.",
        "     Regenerate with: python -m sw.contract.commands > docs/registers.md -->",
        "",
        f"Register map version {REGMAP_VERSION[0]}.{REGMAP_VERSION[1]}. The control port is AXI4-Lite, "
        f"32-bit data, a {1 << CSR_ADDR_WIDTH}-byte window ({CSR_ADDR_WIDTH} address bits). "
        "Registers sit at 4-byte aligned offsets; reads and writes of mapped offsets answer OKAY, any "
        "other offset answers SLVERR (reads return 0, writes are dropped). Byte strobes are honoured. "
        "Bits not listed read as 0.",
        "",
        "Access modes: **R** read-only (hardware); **RW** read/write; **W1C** hardware sets, writing 1 "
        "clears; **W1S** writing 1 sets, hardware clears; **PULSE** writing 1 acts once, reads 0.",
        "",
        "## Register map",
        "",
        "| offset | register | bits | field | access | reset | description |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in REGISTERS:
        for i, f in enumerate(r.fields):
            head = (f"0x{r.offset:03X}", f"**{r.name}**") if i == 0 else ("", "")
            reset = "-" if f.access is Access.R else f"{f.init}"
            out.append(f"| {head[0]} | {head[1]} | {_bits(f)} | {f.name} | {f.access.value} | "
                       f"{reset} | {f.doc} |")
    out += ["", "### Register descriptions", ""]
    for r in REGISTERS:
        out.append(f"- **{r.name}** (0x{r.offset:03X}): {r.doc}")
    out += [
        "",
        "### Running a command list",
        "",
        "1. Check ID, VERSION and CONFIG_HASH0..7 (the driver refuses a model built for another config).",
        "2. Write the descriptors to DDR (64-byte aligned, flushed from the cache), then CMD_BASE_LO/HI "
        "and CMD_COUNT.",
        "3. Write CTRL = start (| perf_clear | irq_enable as wanted).",
        "4. Wait for STATUS.done (poll, or the irq line with CTRL.irq_enable; clear it by writing "
        "IRQ_STATUS). STATUS.error and error_code/cmd_index say what failed; a failing command is never "
        "executed and the run stops there.",
        "5. Read the counters: write PERF_CTRL = snapshot | hold, read every LO/HI pair, write PERF_CTRL = 0.",
        "",
        f"## Command descriptor ({DESCRIPTOR_BYTES} bytes, little endian)",
        "",
        "| offset | size | field | description |",
        "|---|---|---|---|",
    ]
    for name, off, fmt, doc in DESCRIPTOR_FIELDS:
        out.append(f"| {off} | {struct.calcsize(fmt)} | {name} | {doc} |")
    out += [
        "",
        f"Descriptor i of a run is read from CMD_BASE + {DESCRIPTOR_BYTES}*i. Validation checks run in "
        "error-code order and the first failing one is reported; see sw/contract/commands.py for the reasons "
        "behind each rule.",
        "",
        "### Buffers",
        "",
        f"- **Weights**: the .kq tile layout of sw/contract/layout.py (TileLayout(n, k, group_size, tile_rows, "
        "bits)); N is padded with zero rows to a whole number of tiles.",
        "- **Activations** (written by the host): three 64-byte aligned sections: int8 codes [T][K] "
        "(row stride K), fp32 s_a [T][K/G], int32 qsum [T][K/G] (row stride 4*K/G rounded up to 16 bytes). "
        "`pack_activations` builds it from sw.contract.numerics.quantize_activations' outputs.",
        "- **Bias** (with HAS_BIAS): fp32 [N_pad], zero padded (`pack_bias`).",
        "- **Outputs**: fp32 [T][N_pad], row stride 4*N_pad rounded up to 64 bytes (`output_layout`).",
    ]
    out += _render_fabric_markdown()
    out += [
        "",
        "## Error codes (STATUS.error_code)",
        "",
        "| code | name | meaning |",
        "|---|---|---|",
    ]
    for e in ErrorCode:
        out.append(f"| {int(e)} | {e.name} | {ERROR_TEXT[e]} |")
    out.append("")
    return "\n".join(out)


def _render_fabric_markdown() -> list[str]:
    from . import fabric_commands as fc   # it imports this module, so not at the top
    out = [
        "",
        "## Fabric decoder descriptors (HW_PARAMS3.max_context > 0)",
        "",
        "A design with the fabric decoder also executes these opcodes, with the same 64-byte size, header "
        "and tag place as LINEAR (sw/contract/fabric_commands.py), and a LINEAR with flag ARGMAX leaves the "
        "last token row's argmax in RESULT_INDEX / RESULT_VALUE. Row t of a command is at position "
        "RUN_POS + t.",
        "",
        "| offset | size | field | description |",
        "|---|---|---|---|",
    ]
    for name, off, fmt, doc in fc.FABRIC_FIELDS:
        out.append(f"| {off} | {struct.calcsize(fmt)} | {name} | {doc} |")
    out += ["", "| opcode | op | what it does |", "|---|---|---|"]
    for op, doc in fc.OP_DOCS.items():
        out.append(f"| {int(op)} | {op.name} | {doc} |")
    out += ["", fc.QUANT_OUT_DOC]
    out += ["", "Buffers: fp32 row buffers have 64-byte aligned rows (`row_stride`); the KV cache of a layer "
            "is `kv_cache_layout` (K codes, V codes int8 [kv_heads][capacity][head_dim], then K and V scales "
            "fp32 [kv_heads][capacity]); the RoPE table is `rope_table_layout` (row p: cos then sin, fp32 "
            "[head_dim/2] each); the embedding table is bf16 [vocab][hidden]."]
    return out


if __name__ == "__main__":
    print(render_registers_markdown(), end="")
