"""One object for the whole accelerator generator: the array shape, widths and flags.

Everything the RTL, the testbenches, the resource report and the host driver
need to agree on is either a field of :class:`ArrayConfig` or a read-only
property derived from the fields, so nobody re-derives a width by hand.
Presets are copies of a base config with a few fields changed (the Gemmini
idiom); the config serialises to canonical JSON, and its sha256 goes into the
elaboration manifest so the driver can refuse a bitstream built for another
config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .numerics import SUPPORTED_GROUP_SIZES

SCHEMA = "kriallm.array-config/1"

# K26 SOM programmable-logic capacity (DESIGN.md).
K26_CAPACITY = {"LUT": 117_120, "FF": 234_240, "DSP": 1_248, "BRAM36": 144, "URAM": 64}

# DSP48E2 multiplier ports: 27-bit signed A (pre-adder output), 18-bit signed B.
_FABRIC_FIELDS = ("attn_head_dim", "attn_group", "attn_macs", "fabric_max_n", "attn_exp_lanes")
FABRIC_HEAD_DIMS = (32, 64, 128)      # sw.contract.fabric_commands.HEAD_DIMS (not imported: no cycle)
FABRIC_MAX_ROW = 1 << 16              # sw.contract.fabric_commands.FABRIC_MAX_N
MAX_CONTEXT_LIMIT = 1 << 20        # HW_PARAMS3.max_context has 24 bits; 1 Mi positions is far beyond any KV260 use
DSP_A_BITS = 27
DSP_B_BITS = 18
DSP_P_BITS = 48


def signed_bits(lo: int, hi: int) -> int:
    """Smallest two's-complement width holding every integer in [lo, hi]."""
    n = 1
    while not (-(1 << (n - 1)) <= lo and hi <= (1 << (n - 1)) - 1):
        n += 1
    return n


@dataclass(frozen=True)
class ArrayConfig:
    """The accelerator generator's parameters. See docs/rtl.md for the dataflow.

    rows (R) output channels and cols (C) input columns of one weight beat;
    tokens (T) token lanes that share every weight beat; engines independent
    LinearCores, one per HP port.
    """
    rows: int
    cols: int
    tokens: int
    weight_bits: int = 4          # 4: unsigned codes with zero points; 8: signed per-channel (LM head)
    act_bits: int = 8             # activation codes, signed; the numerics contract fixes 8
    group_size: int = 64
    engines: int = 1
    port_bits: int = 128          # width of one AXI HP data beat
    clock_mhz: int = 250
    dsp_packing: bool = False     # two INT4 x INT8 products per DSP48E2 (docs/rtl.md)
    pipeline: int = 2             # optional register stages, see `pipeline_stages`
    dequant_lanes: int = 1        # fp32 dequant pipelines per engine
    acc_bits: int = 0             # accumulator width override; 0 derives the exact minimum
    max_context: int = 0          # fabric decoder: KV-cache positions (0: linears only, the paper's split)
    # The fabric decoder's engines (all 0 when max_context is 0): the attention unit's head dimension,
    # its most query heads per KV head and its multipliers; the longest token row a fabric op takes.
    attn_head_dim: int = 0
    attn_group: int = 0
    attn_macs: int = 0
    fabric_max_n: int = 0
    attn_exp_lanes: int = 0       # heads per cycle of the attention unit's exp pass (divides attn_macs / head_dim)

    # ---- derived facts -------------------------------------------------
    @property
    def weight_range(self) -> tuple[int, int]:
        if self.weight_bits == 4:
            return (0, 15)
        half = 1 << (self.weight_bits - 1)
        return (-half, half - 1)

    @property
    def weight_signed(self) -> bool:
        return self.weight_bits != 4

    @property
    def act_range(self) -> tuple[int, int]:
        # The golden quantizer emits [-127, 127]; the hardware is exact for -128 too.
        return (-(1 << (self.act_bits - 1)), (1 << (self.act_bits - 1)) - 1)

    @property
    def product_range(self) -> tuple[int, int]:
        (wl, wh), (al, ah) = self.weight_range, self.act_range
        p = [wl * al, wl * ah, wh * al, wh * ah]
        return min(p), max(p)

    @property
    def group_sum_range(self) -> tuple[int, int]:
        """Exact bounds of one (token, row) group partial sum, acc = sum_k w_k q_k."""
        lo, hi = self.product_range
        return self.group_size * lo, self.group_size * hi

    @property
    def min_acc_width(self) -> int:
        return signed_bits(*self.group_sum_range)

    @property
    def acc_width(self) -> int:
        """Width of every `acc` the array emits: never overflows for any operands."""
        return self.acc_bits or self.min_acc_width

    @property
    def qsum_width(self) -> int:
        """Width of the per-group activation sum (sum of G int8 codes)."""
        al, ah = self.act_range
        return signed_bits(self.group_size * al, self.group_size * ah)

    @property
    def pack_shift(self) -> int:
        """Bit position of the second weight in a packed DSP operand.

        The low product field must hold a whole group's sum of w0*a exactly
        (it is only split at the end of the group), so it is as wide as the
        narrowest exact accumulator.
        """
        return self.min_acc_width

    @property
    def packed_operand_bits(self) -> int:
        """Unsigned width of (w1 << S) | w0, the multiplier's A operand."""
        return self.pack_shift + self.weight_bits

    @property
    def packed_acc_width(self) -> int:
        """Exact width of a packed group sum hi * 2^S + lo + 2^(S-1) (the start bias)."""
        lo, hi = self.group_sum_range
        s = self.pack_shift
        bias = 1 << (s - 1)
        return signed_bits(lo * (1 << s) + lo + bias, hi * (1 << s) + hi + bias)

    @property
    def beat_bits(self) -> int:
        """Weight bits consumed per array beat: R x C codes."""
        return self.rows * self.cols * self.weight_bits

    @property
    def port_bytes(self) -> int:
        """Bytes of one AXI HP data beat."""
        return self.port_bits // 8

    @property
    def beats_per_port_word(self) -> int:
        return self.port_bits // self.beat_bits

    @property
    def beats_per_group(self) -> int:
        return self.group_size // self.cols

    @property
    def tree_levels(self) -> int:
        return math.ceil(math.log2(self.cols)) if self.cols > 1 else 0

    @property
    def max_pipeline(self) -> int:
        return 2 + self.tree_levels

    @property
    def pipeline_stages(self) -> tuple[str, ...]:
        """Where the `pipeline` optional registers go, in order of priority:
        the product (DSP MREG), the operand broadcast (DSP A/B registers), then
        cuts in the adder tree over C, spread evenly over its levels."""
        names = ["product", "broadcast"][: self.pipeline]
        return tuple(names) + tuple(f"tree{lvl}" for lvl in self.tree_cuts)

    @property
    def tree_cuts(self) -> tuple[int, ...]:
        """Adder-tree levels (1-based) followed by a register.

        The tree's levels plus the accumulator adder are split into equal
        segments, so each extra stage shortens the longest adder chain.
        """
        n, L = min(max(0, self.pipeline - 2), self.tree_levels), self.tree_levels
        return tuple(max(1, round((i + 1) * (L + 1) / (n + 1))) for i in range(n))

    @property
    def array_latency(self) -> int:
        """Clock edges from accepting the last beat of a group to `out.valid`.

        One edge into the accumulator, one into the output register, plus the
        optional pipeline registers.
        """
        return 2 + self.pipeline

    @property
    def multipliers_per_engine(self) -> int:
        """Hardware multipliers (DSP48E2 when mapped) per engine."""
        products = self.rows * self.cols * self.tokens
        return products // 2 if self.dsp_packing else products

    @property
    def macs_per_cycle(self) -> int:
        """INT4 x INT8 multiply-accumulates per clock, all engines."""
        return self.rows * self.cols * self.tokens * self.engines

    @property
    def weight_bytes_per_second(self) -> float:
        """Weight bandwidth consumed at one beat per cycle per engine."""
        return self.engines * self.beat_bits / 8 * self.clock_mhz * 1e6

    @property
    def dequant_cycles_per_group(self) -> int:
        """Cycles the dequant unit needs for one group's T x R partial sums."""
        return -(-self.tokens * self.rows // self.dequant_lanes)

    @property
    def dequant_keeps_up(self) -> bool:
        """True when dequant never throttles the array (one group per G/C beats)."""
        return self.dequant_cycles_per_group <= self.beats_per_group

    # ---- checks ----------------------------------------------------------
    def validate(self) -> "ArrayConfig":
        """Raise ConfigError with one sentence for a config that cannot work."""
        for k in ("rows", "cols", "tokens", "group_size", "engines", "port_bits", "clock_mhz",
                  "dequant_lanes"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"array config: {k} must be a positive integer, got {v!r}")
        for k in ("pipeline", "acc_bits"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"array config: {k} must be a non-negative integer, got {v!r}")
        mc = self.max_context
        if not isinstance(mc, int) or isinstance(mc, bool) or not (mc == 0 or 64 <= mc <= MAX_CONTEXT_LIMIT) \
                or mc % 64:
            raise ConfigError(f"array config: max_context must be 0 (no fabric decoder) or a multiple of 64 from "
                              f"64 to {MAX_CONTEXT_LIMIT}, got {mc!r}")
        fabric = {k: getattr(self, k) for k in _FABRIC_FIELDS}
        for k, v in fabric.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"array config: {k} must be a non-negative integer, got {v!r}")
        if not mc and any(fabric.values()):
            raise ConfigError(f"array config: {', '.join(k for k, v in fabric.items() if v)} describe the fabric "
                              f"decoder, which max_context 0 leaves out; set max_context or drop them")
        if mc:
            hd, g, macs, n, lanes = (fabric[k] for k in _FABRIC_FIELDS)
            if hd not in FABRIC_HEAD_DIMS:
                raise ConfigError(f"array config: attn_head_dim must be one of "
                                  f"{', '.join(map(str, FABRIC_HEAD_DIMS))}, got {hd}")
            if not 1 <= g <= 32:
                raise ConfigError(f"array config: attn_group must be 1..32 query heads per KV head, got {g}")
            if macs < 16 or macs & (macs - 1) or macs > hd * (1 << (g - 1).bit_length()):
                raise ConfigError(f"array config: attn_macs must be a power of two from 16 to head_dim x the "
                                  f"group rounded up to a power of two ({hd * (1 << (g - 1).bit_length())}), got {macs}")
            if not hd <= n <= FABRIC_MAX_ROW or n % 8:
                raise ConfigError(f"array config: fabric_max_n must be a multiple of 8 from attn_head_dim to "
                                  f"{FABRIC_MAX_ROW}, got {n}")
            per_step = max(1, macs // hd)
            if lanes < 1 or per_step % lanes:
                raise ConfigError(f"array config: attn_exp_lanes must divide the {per_step} query head(s) the "
                                  f"attention unit takes per step (attn_macs / attn_head_dim, at least 1), got {lanes}")
        if not isinstance(self.dsp_packing, bool):
            raise ConfigError(f"array config: dsp_packing must be true or false, got {self.dsp_packing!r}")
        if self.weight_bits not in (4, 8):
            raise ConfigError(f"array config: weight_bits must be 4 (INT4) or 8 (INT8 LM head), got {self.weight_bits}")
        if self.act_bits != 8:
            raise ConfigError(f"array config: act_bits must be 8 (the numerics contract), got {self.act_bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(f"array config: group_size {self.group_size} is not one of "
                              f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
        if self.group_size % self.cols:
            raise ConfigError(f"array config: cols {self.cols} does not divide group_size {self.group_size}, "
                              f"so a beat would straddle two groups")
        if self.rows % 2:
            raise ConfigError(f"array config: rows {self.rows} must be even (the .kq layout packs two rows per byte"
                              f"{' and DSP packing pairs rows' if self.dsp_packing else ''})")
        if self.port_bits % self.beat_bits:
            raise ConfigError(f"array config: a beat of {self.rows}x{self.cols} codes x {self.weight_bits} bits "
                              f"= {self.beat_bits} bits does not divide the {self.port_bits}-bit port word")
        if self.acc_bits and self.acc_bits < self.min_acc_width:
            raise ConfigError(f"array config: acc_bits {self.acc_bits} is too narrow for group size "
                              f"{self.group_size} with {self.weight_bits}-bit weights: it needs at least "
                              f"{self.min_acc_width} bits")
        if self.acc_bits > 64:
            raise ConfigError(f"array config: acc_bits {self.acc_bits} is above the 64-bit limit")
        if self.dsp_packing:
            if self.weight_bits != 4:
                raise ConfigError("array config: dsp_packing needs 4-bit weights; two 8-bit products with a "
                                  "whole group of guard bits do not fit one DSP48E2")
            if self.packed_operand_bits + 1 > DSP_A_BITS or self.packed_acc_width > DSP_P_BITS:
                raise ConfigError(f"array config: packed operands for group size {self.group_size} do not fit "
                                  f"the DSP48E2 ({DSP_A_BITS}-bit A port, {DSP_P_BITS}-bit P)")
        if self.pipeline > self.max_pipeline:
            raise ConfigError(f"array config: pipeline {self.pipeline} exceeds the {self.max_pipeline} register "
                              f"stages a {self.cols}-column array has (product, broadcast, "
                              f"{self.tree_levels} adder-tree levels)")
        if self.dequant_lanes > self.rows * self.tokens:
            raise ConfigError(f"array config: dequant_lanes {self.dequant_lanes} exceeds the {self.rows * self.tokens} "
                              f"partial sums of a group")
        if (self.rows * self.tokens) % self.dequant_lanes:
            raise ConfigError(f"array config: dequant_lanes {self.dequant_lanes} does not divide the "
                              f"{self.rows * self.tokens} partial sums (rows x tokens) of a group")
        return self

    # ---- serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["max_context"]:        # a linears-only design: its JSON and config hash as before issue 11
            for k in ("max_context",) + _FABRIC_FIELDS:
                del d[k]
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps({"schema": SCHEMA, **self.to_dict()}, indent=indent, sort_keys=True)

    def canonical_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **self.to_dict()}, sort_keys=True, separators=(",", ":"))

    @property
    def config_hash(self) -> str:
        """sha256 of the canonical JSON: the identity of the generated hardware."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict, source: str = "array config") -> "ArrayConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        schema = d.pop("schema", SCHEMA)
        if schema != SCHEMA:
            raise ConfigError(f"{source}: schema {schema!r} is not {SCHEMA!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        missing = [k for k in ("rows", "cols", "tokens") if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        cfg = cls(**d)
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {str(e).removeprefix('array config: ')}") from None
        return cfg

    @classmethod
    def from_json(cls, text: str, source: str = "array config") -> "ArrayConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return cls.from_dict(d, source)

    @classmethod
    def from_file(cls, path) -> "ArrayConfig":
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{p}: is a directory, expected a JSON config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read config file ({e})") from None
        return cls.from_json(text, str(p))

    def replace(self, **changes) -> "ArrayConfig":
        return dataclasses.replace(self, **changes).validate()


# T = 8 token lanes: prefill streams the linears once per 8 prompt tokens, so a
# 128-token prompt costs 16 passes of 193 MB = 0.19 s at 16 GB/s (target
# 0.3 s; T = 4 would need 0.39 s). Packed, 4 engines x 32 rows x 8 tokens is
# 512 DSP48E2 (41 % of the K26) before the dequant units; unpacked it would be
# 1024 (82 %), which is why packing is on. Measured numbers: docs/rtl.md.
_KV260 = ArrayConfig(rows=32, cols=1, tokens=8, weight_bits=4, group_size=64, engines=4,
                     port_bits=128, clock_mhz=250, dsp_packing=True, pipeline=2, dequant_lanes=4)

PRESETS: dict[str, ArrayConfig] = {
    "kv260": _KV260,
    "kv260-nopack": dataclasses.replace(_KV260, dsp_packing=False),
    # The design issue 11 specifies: kv260 plus the fabric decoder with a 4096-position KV cache (the
    # bench's deepest point, 2048, plus room). The RTL top (rtl/top.py) adds the fabric engines to
    # the kv260 linears; its attention unit is built for head_dim 64 and 7 query heads per KV head.
    "kv260-fabric": dataclasses.replace(_KV260, max_context=4096, attn_head_dim=64, attn_group=7, attn_macs=128,
                                        fabric_max_n=4864, attn_exp_lanes=2),
    # The same linears with the fabric engines built for the `tiny` model (head_dim 32, 2 query heads per
    # KV head, rows up to 384): what the default simulation runs; its attention unit builds in a minute.
    "kv260-fabric-tiny": dataclasses.replace(_KV260, max_context=256, attn_head_dim=32, attn_group=2, attn_macs=16,
                                             fabric_max_n=384, attn_exp_lanes=1),
    # Small points for CI: rows x cols, odd token counts and every pipeline depth class.
    "test-4x4-g32": ArrayConfig(rows=4, cols=4, tokens=2, group_size=32, port_bits=128,
                                dsp_packing=True, pipeline=2, dequant_lanes=1),
    "test-8x16-g64": ArrayConfig(rows=8, cols=16, tokens=3, group_size=64, port_bits=512,
                                 dsp_packing=True, pipeline=3, dequant_lanes=1),
    "test-16x8-g128": ArrayConfig(rows=16, cols=8, tokens=2, group_size=128, port_bits=512,
                                  dsp_packing=True, pipeline=5, dequant_lanes=2),
}


def preset(name: str) -> ArrayConfig:
    try:
        return PRESETS[name].validate()
    except KeyError:
        raise ConfigError(f"unknown hardware preset {name!r}; choose from {', '.join(PRESETS)}") from None
