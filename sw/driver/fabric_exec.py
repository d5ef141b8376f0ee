"""The golden device's execution of the fabric decoder's opcodes (sw/contract/fabric_commands.py).

Each op reads its inputs from the modeled DDR, computes with the contract's
functions (:mod:`sw.contract.fabric_ops`, :func:`sw.contract.numerics.quantize_activations`)
and writes its outputs back, exactly as the descriptor says. The cycle counts
are an analytical model (:class:`FabricPerf`), labeled as such; the sim
backend counts RTL cycles once the units run there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract import fabric_ops as fo
from ..contract.commands import ErrorCode, activation_layout, pack_activations
from ..contract.fabric_commands import FabricCommand, FabricFlags, Opcode, kv_cache_layout, quant_out
from ..contract.numerics import quantize_activations

F32 = np.float32


class BusFault(Exception):
    """An access outside DDR while executing an op: code is READ_ERROR or WRITE_ERROR."""

    def __init__(self, code: ErrorCode):
        super().__init__(code.name)
        self.code = code


# Cycles of a vector op beyond its element (or byte) stream: (fixed, per extra token row), measured in
# Verilator on FabricVectorEngine with the DDR model at the qwen2.5-0.5b sizes (docs/rtl.md, "the
# fabric vector engine": T = 1 and 8, n = 896 and 4864): the command's fetch-to-done latency, the
# unit's pipeline fill, and for RMSNORM each row's reduction, rsqrt and second pass (98 per row).
# QUANT adds about 2/3 of a cycle per group of the row (measured at group 128: 0.65).
# SILU_MUL streams 2 elements per cycle at 4 lanes (two lanes share a Sigmoid, rtl/vector.py).
# An op with QUANT_OUT ("+Q") writes its quantized activation buffer instead of fp32 rows: the
# producer's stream, then the last group's divide and read-back (about 34 cycles more than the
# producer alone), plus QUANT's 2/3 cycle per group; measured the same way (docs/rtl.md, group 64).
# Re-measured at d6aba3d (the quantizer's serial dividers: 16 cycles per divide, the pipeline's 29).
VECTOR_OVERHEAD = {"EMBED": (147, 14), "RMSNORM": (193, 98), "QUANT": (149, 1), "ROPE": (147, 28),
                   "KV_STORE": (127, 2), "ADD": (101, 2), "SILU_MUL": (134, 0),
                   "RMSNORM+Q": (227, 98), "ROPE+Q": (181, 28), "SILU_MUL+Q": (168, 1)}


@dataclass(frozen=True)
class FabricPerf:
    """Cycles of one fabric op, analytically (not an RTL simulation):

    vector ops: max(bytes / cap, passes x elements / vector_lanes) + the op's fixed cycles + its
    cycles per extra token row (:data:`VECTOR_OVERHEAD`, measured on the RTL in Verilator);
    ATTEND: per query row and KV group, the attention unit's measured rule (rtl/attention.py,
    tests/test_attention.py): positions x cycles_per_position + attn_command_cycles, with
    cycles_per_position = max(steps, head_dim / 16) + max(steps, head_dim / 16, ceil(G / exp_lanes))
    (the score pass, then the exp2 and P.V pass), steps = ceil(G / H) x K,
    H = max(1, attn_macs / head_dim) heads per step, K = max(1, head_dim / attn_macs) chunks;
    G is the unit's built group (``attn_group``: an op with fewer query heads per KV head runs
    phantom heads), or the op's when ``attn_group`` is 0.
    """
    cap_bytes_per_cycle: float = 64.0
    vector_lanes: int = 4
    sigmoid_share: int = 2             # SILU_MUL: lanes per Sigmoid, so a beat every 2 cycles
    attn_macs: int = 128
    attn_command_cycles: int = 394     # measured 394 at head_dim 64, group 7, 128 MACs, 2 exp lanes
    fixed_cycles: int = 64
    exp_lanes: int = 1
    attn_group: int = 0

    @classmethod
    def from_config(cls, config, **kw) -> "FabricPerf":
        """The attention unit's shape of an ArrayConfig with the fabric decoder (max_context > 0)."""
        if getattr(config, "max_context", 0):
            kw = {"attn_macs": config.attn_macs, "exp_lanes": config.attn_exp_lanes,
                  "attn_group": config.attn_group, **kw}
        return cls(**kw)

    def assumptions(self) -> dict:
        return {"fabric_ops": "analytical: max(bytes / cap, passes x elements / vector_lanes) + the op's fixed and "
                              "per-row cycles measured on the RTL (vector_overhead) per vector op; attention "
                              "per (row, KV group) positions x (max(steps, head_dim/16) + max(steps, head_dim/16, "
                              "ceil(group/exp_lanes))) + "
                              "attn_command_cycles (the attention unit's measured rule)",
                "vector_lanes": self.vector_lanes, "silu_lanes_per_sigmoid": self.sigmoid_share, "attn_macs": self.attn_macs, "attn_exp_lanes": self.exp_lanes,
                "attn_command_cycles": self.attn_command_cycles,
                "vector_overhead": {k: {"fixed": f, "per_extra_row": r} for k, (f, r) in VECTOR_OVERHEAD.items()},
                "fixed_cycles_argmax_attend_or_error": self.fixed_cycles}

    def attn_cycles_per_position(self, group: int, hd: int) -> int:
        group = max(group, self.attn_group)
        heads_per_step = max(1, self.attn_macs // hd)
        chunks = max(1, hd // self.attn_macs)
        steps = -(-group // heads_per_step) * chunks
        mac_pass = max(steps, hd // 16)
        return mac_pass + max(mac_pass, -(-group // self.exp_lanes))

    def vector(self, op: Opcode, passes: int, elements: int, nbytes: int, rows: int, fused: bool = False) -> int:
        """A vector op's cycles: its element (or byte) stream plus its measured overhead (``fused``:
        the op with QUANT_OUT)."""
        lanes = self.vector_lanes // (self.sigmoid_share if op == Opcode.SILU_MUL else 1)
        stream = max(-(-passes * elements // lanes), int(-(-nbytes // self.cap_bytes_per_cycle)))
        fixed, per_row = VECTOR_OVERHEAD[op.name + ("+Q" if fused else "")]
        return stream + fixed + per_row * (rows - 1)

    def argmax(self, n: int) -> int:
        """The ARGMAX pass after a LINEAR (rtl/argmax_pass.py): its row read back on one port, 4 fp32
        per cycle, plus the fixed cost."""
        return -(-n // 4) + self.fixed_cycles

    def attend(self, spans: list[int], groups: int, rep: int, hd: int) -> int:
        per = self.attn_cycles_per_position(rep, hd)
        total = 0
        for s in spans:
            mem = int(-(-groups * s * (2 * hd + 8) // self.cap_bytes_per_cycle))
            total += max(mem, groups * (s * per + self.attn_command_cycles))
        return total + self.fixed_cycles

    def cost(self, c: FabricCommand, pos: int) -> tuple[int, int, int]:
        """(cycles, bytes read, bytes written) of one fabric descriptor run at RUN_POS `pos`: a
        function of the descriptor alone (no data), which is what lets a command list be timed
        without a model (sw/driver/estimate.py)."""
        t, n = c.tokens, c.n
        row = 4 * t * n                                   # one fp32 row block read or written
        op = Opcode(c.opcode)
        if op == Opcode.ATTEND:
            hd, nkv = c.aux, c.p1
            spans = [pos + r + 1 for r in range(t)]
            rd = activation_layout(n, hd, t).total_bytes + nkv * sum(spans) * (2 * hd + 8)
            return self.attend(spans, nkv, (n // hd) // nkv, hd), rd, row
        passes, extra = 1, 0
        if op == Opcode.EMBED:
            rd, wr = 4 * t + 2 * t * n, row
        elif op == Opcode.RMSNORM:
            rd, wr, passes = 2 * row + 4 * n, row, 2
        elif op == Opcode.QUANT:
            rd, wr = row, activation_layout(n, c.aux, t).total_bytes
            extra = -(-2 * n // (3 * c.aux))              # about 2/3 of a cycle per group
        elif op == Opcode.ROPE:
            rd, wr = row + t * 4 * c.aux, row
        elif op == Opcode.KV_STORE:
            rd, wr = row, t * c.p1 * (c.aux + 4)
        elif op in (Opcode.ADD, Opcode.SILU_MUL):
            rd, wr = 2 * row, row
        else:
            raise ValueError(f"no cost rule for {op.name}")
        fused = quant_out(c)
        if fused:
            wr = activation_layout(n, c.aux, t).total_bytes
            extra = -(-2 * n // (3 * c.aux))
        return self.vector(op, passes, t * n, rd + wr, t, fused) + extra, rd, wr


class FabricOps:
    """Executes fabric descriptors against a PhysMemory-like object (``view(addr, nbytes)``)."""

    def __init__(self, memory, perf: FabricPerf | None = None, bus_error=Exception):
        self.memory = memory
        self.perf = perf or FabricPerf()
        self._bus_error = bus_error

    # ---- memory access -----------------------------------------------------------------------
    def _view(self, addr: int, nbytes: int, code: ErrorCode) -> np.ndarray:
        try:
            return self.memory.view(addr, nbytes)
        except self._bus_error:
            raise BusFault(code) from None

    def _rows(self, addr: int, stride: int, t: int, n: int) -> np.ndarray:
        """fp32 [t, n] read from row-strided memory (a copy)."""
        buf = self._view(addr, (t - 1) * stride + 4 * n, ErrorCode.READ_ERROR)
        return np.stack([buf[r * stride:r * stride + 4 * n].view("<f4") for r in range(t)]).astype(F32)

    def _put_rows(self, addr: int, stride: int, y: np.ndarray) -> int:
        t, n = y.shape
        buf = self._view(addr, (t - 1) * stride + 4 * n, ErrorCode.WRITE_ERROR)
        for r in range(t):
            buf[r * stride:r * stride + 4 * n] = np.ascontiguousarray(y[r], "<f4").view(np.uint8)
        return 4 * t * n

    def _put_activations(self, addr: int, x: np.ndarray, group: int) -> None:
        """The activation buffer of x [t, n] quantized per group (what QUANT writes)."""
        t, n = x.shape
        q, s, qsum = quantize_activations(x, group)
        data = np.frombuffer(pack_activations(q, s, qsum, group), np.uint8)
        self._view(addr, activation_layout(n, group, t).total_bytes, ErrorCode.WRITE_ERROR)[:] = data

    def _put_result(self, c: FabricCommand, y: np.ndarray) -> None:
        """An op's result rows: fp32 rows at dst, or with QUANT_OUT their activation buffer (group aux)."""
        if quant_out(c):
            self._put_activations(c.dst, y, c.aux)
        else:
            self._put_rows(c.dst, c.dst_stride, y)

    # ---- ops ---------------------------------------------------------------------------------
    def execute(self, cmd: FabricCommand, pos: int, token: int) -> tuple[ErrorCode, int, int, int]:
        """(error, cycles, bytes read, bytes written) of one validated descriptor."""
        try:
            getattr(self, f"_{cmd.op.name.lower()}")(cmd, pos, token)
            return (ErrorCode.NONE, *self.perf.cost(cmd, pos))
        except BusFault as e:
            return e.code, self.perf.fixed_cycles, 0, 0
        except _RunError as e:
            return e.code, self.perf.fixed_cycles, 0, 0

    def _embed(self, c: FabricCommand, pos: int, token: int):
        t, n = c.tokens, c.n
        if c.flags & FabricFlags.TOKEN_REG:
            ids = np.array([token], np.int64)
        else:
            ids = self._view(c.src0, 4 * t, ErrorCode.READ_ERROR).view("<i4").astype(np.int64)
        if np.any((ids < 0) | (ids >= c.p0)):
            raise _RunError(ErrorCode.BAD_TOKEN)
        table = self._view(c.src1, c.p0 * 2 * n, ErrorCode.READ_ERROR).view("<u2").reshape(c.p0, n)
        self._put_rows(c.dst, c.dst_stride, fo.embedding(table, ids))

    def _rmsnorm(self, c: FabricCommand, pos: int, token: int):
        t, n = c.tokens, c.n
        x = self._rows(c.src0, c.src_stride, t, n)
        gamma = self._view(c.src1, 4 * n, ErrorCode.READ_ERROR).view("<f4").astype(F32)
        inv_n, eps = np.uint32(c.p0).view(F32), np.uint32(c.p1).view(F32)
        self._put_result(c, fo.rms_norm_consts(x, gamma, inv_n, eps))

    def _quant(self, c: FabricCommand, pos: int, token: int):
        t, n = c.tokens, c.n
        self._put_activations(c.dst, self._rows(c.src0, c.src_stride, t, n), c.aux)

    def _check_span(self, c: FabricCommand, pos: int) -> None:
        if pos + c.tokens > c.p0:
            raise _RunError(ErrorCode.CONTEXT_FULL)

    def _rope(self, c: FabricCommand, pos: int, token: int):
        self._check_span(c, pos)
        t, n, hd = c.tokens, c.n, c.aux
        table = self._view(c.src1 + pos * 4 * hd, t * 4 * hd, ErrorCode.READ_ERROR).view("<f4").reshape(t, hd)
        cos, sin = table[:, :hd // 2].astype(F32), table[:, hd // 2:].astype(F32)
        x = self._rows(c.src0, c.src_stride, t, n).reshape(t, n // hd, hd).transpose(1, 0, 2)
        y = fo.apply_rope(x, cos, sin).transpose(1, 0, 2).reshape(t, n)
        self._put_result(c, y)

    def _kv_store(self, c: FabricCommand, pos: int, token: int):
        self._check_span(c, pos)
        t, n, hd, nkv, cap = c.tokens, c.n, c.aux, c.p1, c.p0
        value = bool(c.flags & FabricFlags.VALUE)
        lay = kv_cache_layout(nkv, hd, cap)
        x = self._rows(c.src0, c.src_stride, t, n).reshape(t, nkv, hd).transpose(1, 0, 2)
        codes, scales = fo.quantize_heads(x)                     # [nkv, T, hd], [nkv, T]
        cv = self._view(c.dst + lay.codes_offset(value), nkv * cap * hd, ErrorCode.WRITE_ERROR)
        sv = self._view(c.dst + lay.scales_offset(value), 4 * nkv * cap, ErrorCode.WRITE_ERROR)
        cv.view(np.int8).reshape(nkv, cap, hd)[:, pos:pos + t] = codes
        sv.view("<f4").reshape(nkv, cap)[:, pos:pos + t] = scales

    def _attend(self, c: FabricCommand, pos: int, token: int):
        self._check_span(c, pos)
        t, n, hd, nkv, cap = c.tokens, c.n, c.aux, c.p1, c.p0
        heads = n // hd
        rep = heads // nkv
        end = pos + t
        act = activation_layout(n, hd, t)
        buf = self._view(c.src0, act.total_bytes, ErrorCode.READ_ERROR)
        q8 = buf[:t * act.codes_stride].reshape(t, act.codes_stride)[:, :n].view(np.int8)
        sq = np.ascontiguousarray(buf[act.scales_offset:act.scales_offset + t * act.meta_stride]
                                  .reshape(t, act.meta_stride)[:, :4 * heads]).view("<f4").astype(F32)
        lay = kv_cache_layout(nkv, hd, cap)
        cache = self._view(c.src1, lay.total_bytes, ErrorCode.READ_ERROR)
        codes = lambda v: cache[lay.codes_offset(v):lay.codes_offset(v) + nkv * cap * hd].view(np.int8) \
            .reshape(nkv, cap, hd)                                                  # noqa: E731
        scales = lambda v: cache[lay.scales_offset(v):lay.scales_offset(v) + 4 * nkv * cap].view("<f4") \
            .reshape(nkv, cap)                                                      # noqa: E731
        keys, kscale, vals, vscale = codes(False), scales(False), codes(True), scales(True)
        q8 = q8.reshape(t, nkv, rep, hd).transpose(1, 2, 0, 3)      # [nkv, rep, T, hd]
        sq = sq.reshape(t, nkv, rep).transpose(1, 2, 0)              # [nkv, rep, T]
        visible = np.arange(end)[None, :] <= (pos + np.arange(t))[:, None]
        out = np.empty((nkv, rep, t, hd), F32)
        for g in range(nkv):
            out[g] = fo.attend_kv_group(q8[g], sq[g], keys[g, :end], kscale[g, :end].astype(F32),
                                        vals[g, :end], vscale[g, :end].astype(F32), visible, hd)
        y = out.reshape(heads, t, hd).transpose(1, 0, 2).reshape(t, n)
        self._put_rows(c.dst, c.dst_stride, y)

    def _binary(self, c: FabricCommand, fn):
        t, n = c.tokens, c.n
        a = self._rows(c.src0, c.src_stride, t, n)
        b = self._rows(c.src1, c.p0, t, n)
        self._put_result(c, fn(a, b))

    def _add(self, c: FabricCommand, pos: int, token: int):
        self._binary(c, fo.residual_add)

    def _silu_mul(self, c: FabricCommand, pos: int, token: int):
        self._binary(c, fo.silu_mul)


class _RunError(Exception):
    def __init__(self, code: ErrorCode):
        super().__init__(code.name)
        self.code = code


def argmax_row(y: np.ndarray) -> tuple[int, int]:
    """(RESULT_INDEX, RESULT_VALUE) of one row: fabric_ops.argmax_first and the fp32 bits of the
    value there; a NaN winner (only when every value is -inf or NaN) reads as -inf, 0xFF800000."""
    y = np.asarray(y, F32)
    i = int(fo.argmax_first(y))
    return i, (0xFF800000 if np.isnan(y[i]) else int(y[i:i + 1].view("<u4")[0]))


__all__ = ["FabricOps", "FabricPerf", "BusFault", "argmax_row", "Opcode"]
