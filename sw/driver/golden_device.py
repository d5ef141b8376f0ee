"""The `golden` backend: a bit-exact software model of the accelerator behind the Device interface.

Three reusable pieces, so that stand-ins for the board (tests/test_driver_kv260.py)
and other backends can share them:

* :class:`PhysMemory`: byte-addressable "DDR" made of regions at bus addresses;
  an access outside every region is a decode error, as on the AXI bus;
* :class:`CommandExecutor`: walks a command list in that memory exactly as
  rtl/cmdproc.py does: ``validate_cmd_base`` at start, then for each
  descriptor ``validate_command`` (an invalid one is reported with its index
  and not executed) and a LINEAR execution that reads the packed weight
  stream (``sw.contract.layout.unpack_linear``), the activation buffer and the bias
  from memory, computes with ``sw.contract.numerics`` (integer group sums, then
  ``dequant_accumulate``) and writes the fp32 outputs. Bit-exact with the
  golden model. Its cycle counts are an **analytical model** (see
  :class:`PerfModel`), not a simulation;
* :class:`RegisterModel`: the register file of ``sw.contract.commands.REGISTERS`` with
  its access semantics (R, RW, W1C, PULSE, LO/HI counter latching, snapshot).

:class:`GoldenDevice` puts them together. With ``coherent=False`` the CPU's
view of each buffer is a separate copy that only ``sync_for_device`` /
``sync_for_cpu`` move to and from "DDR", so a driver that forgets a cache
operation computes wrong results here exactly as it would on the board.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from ..contract.commands import (ALIGN, BEAT_BYTES, CMD_LOG_DEPTH, DESCRIPTOR_BYTES, ID_MAGIC, PERF_COUNTERS, REGISTERS,
                        REGMAP_VERSION, ErrorCode, Flags, HardwareLimits, LinearCommand, activation_layout,
                        bias_bytes, config_hash_words, output_layout, register, validate_cmd_base)
from ..contract.errors import DeviceError
from ..contract.fabric_commands import FabricCommand, unpack_any, validate_any
from ..contract.layout import TileLayout, unpack_linear
from ..contract.numerics import dequant_accumulate
from .fabric_exec import FabricOps, FabricPerf, argmax_row
from .device import (CTRL_IRQ_ENABLE, CTRL_PERF_CLEAR, CTRL_SOFT_RESET, CTRL_START,
                     DMA_TO_DEVICE, Buffer, Device, RegionAllocator)

F32 = np.float32


class BusError(Exception):
    """An access outside every memory region (the AXI DECERR)."""


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------

class PhysMemory:
    """Regions of bytes at bus addresses. `view` returns a writable NumPy view (no copy)."""

    def __init__(self):
        self._starts: list[int] = []
        self._regions: list[tuple[int, np.ndarray]] = []

    def add_region(self, base: int, array: np.ndarray) -> None:
        i = bisect.bisect(self._starts, base)
        end = base + array.size
        if (i > 0 and self._starts[i - 1] + self._regions[i - 1][1].size > base) or \
                (i < len(self._starts) and self._starts[i] < end):
            raise ValueError(f"memory region 0x{base:x}+{array.size} overlaps another")
        self._starts.insert(i, base)
        self._regions.insert(i, (base, array))

    def view(self, addr: int, nbytes: int) -> np.ndarray:
        i = bisect.bisect(self._starts, addr) - 1
        if i >= 0:
            base, arr = self._regions[i]
            if addr + nbytes <= base + arr.size:
                return arr[addr - base:addr - base + nbytes]
        raise BusError(f"no memory at 0x{addr:x}+{nbytes}")


# ---------------------------------------------------------------------------
# Analytical performance model
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PerfModel:
    """Cycles of one LINEAR command, analytically:

    cycles = max(bytes moved / cap_bytes_per_cycle, compute cycles) + fixed_cycles

    compute cycles = tiles x groups x max(beats of a group block, dequant cycles of a group)
    / engines: each engine takes one weight beat per cycle (all token lanes share it) and the
    dequant unit needs tokens x rows / dequant_lanes cycles per group. fixed_cycles covers
    the first read's latency and the pipeline drain. Not an RTL simulation: the sim backend
    counts the real RTL's cycles.
    """
    clock_mhz: float = 250.0
    cap_bytes_per_cycle: float = 64.0   # 16 GB/s at 250 MHz: the measured KV260 PL->DDR rate (DESIGN.md)
    engines: int = 1
    beat_bytes: int = BEAT_BYTES
    dequant_lanes: int = 0              # 0: dequant never throttles
    fixed_cycles: int = 64

    @classmethod
    def from_config(cls, cfg) -> "PerfModel":
        return cls(clock_mhz=cfg.clock_mhz, cap_bytes_per_cycle=64.0 * 250.0 / cfg.clock_mhz,
                   engines=cfg.engines, beat_bytes=cfg.port_bits // 8, dequant_lanes=cfg.dequant_lanes)

    def assumptions(self) -> dict:
        return {
            "kind": "analytical model (not an RTL simulation)",
            "formula": "max(bytes moved / cap, tiles*groups*max(group beats, dequant cycles)/engines) + fixed",
            "clock_mhz": self.clock_mhz,
            "cap_bytes_per_cycle": self.cap_bytes_per_cycle,
            "cap_GB_s": self.cap_bytes_per_cycle * self.clock_mhz * 1e6 / 1e9,
            "cap_source": "about 16 GB/s sustained PL->DDR with four 128-bit HP ports (public KV260 "
                          "measurements, shared/DESIGN.md)",
            "engines": self.engines,
            "fixed_cycles_per_command": self.fixed_cycles,
        }

    def command(self, cmd: LinearCommand, layout: TileLayout, bytes_read: int, bytes_written: int) -> tuple[int, int]:
        """(cycles, memory stall cycles) of one command."""
        block_beats = -(-layout.group_block_bytes // self.beat_bytes)
        dequant = -(-cmd.tokens * cmd.tile_rows // self.dequant_lanes) if self.dequant_lanes else 0
        per_group = max(block_beats, dequant)
        compute = -(-layout.n_tiles * layout.n_groups * per_group // self.engines)
        memory = int(-(-(bytes_read + bytes_written) // self.cap_bytes_per_cycle))
        return max(compute, memory) + self.fixed_cycles, max(0, memory - compute)


# ---------------------------------------------------------------------------
# Command execution
# ---------------------------------------------------------------------------

@dataclass
class RunResult:
    error: ErrorCode
    index: int
    cycles: list[int]
    bytes_read: int = 0
    bytes_written: int = 0
    mem_stall: int = 0
    compute_stall: int = 0
    result_index: int | None = None      # the last ARGMAX (RESULT_INDEX / RESULT_VALUE)
    result_value: int = 0


class _Weights:
    """A decoded weight stream: codes as exact float32 [ng, G, N] for BLAS, zeros, fp16 scales."""
    __slots__ = ("codes", "zeros", "scales")

    def __init__(self, layout: TileLayout, blob: np.ndarray):
        codes, scales, zeros = unpack_linear(layout, blob)
        n, k = codes.shape
        ng, g = layout.n_groups, layout.group_size
        self.codes = np.ascontiguousarray(codes.astype(F32).reshape(n, ng, g).transpose(1, 2, 0))
        if layout.bits == 4:
            self.zeros = zeros.astype(np.int32)
            self.scales = scales
        else:  # INT8 per channel: zero points 0, the row's scale for every group
            self.zeros = None
            self.scales = np.repeat(np.asarray(scales).reshape(n, 1), ng, axis=1)


class CommandExecutor:
    """Runs command lists against a PhysMemory with the hardware's checks and the golden arithmetic.

    Decoded weight streams are cached by (address, layout); :meth:`invalidate` drops the entries
    that overlap a written range (the golden device calls it on every sync_for_device).
    """

    def __init__(self, memory: PhysMemory, limits: HardwareLimits, perf: PerfModel | None = None,
                 fabric_perf: FabricPerf | None = None):
        self.memory = memory
        self.limits = limits
        self.perf = perf or PerfModel()
        self.fabric = FabricOps(memory, fabric_perf or FabricPerf(cap_bytes_per_cycle=self.perf.cap_bytes_per_cycle),
                                bus_error=BusError)
        self._weights: dict[tuple, tuple[int, int, _Weights]] = {}
        self._spans: list[tuple[int, int, tuple]] = []   # (start, end, key), sorted by start
        self._max_span = 0

    def invalidate(self, addr: int, nbytes: int) -> None:
        """Forget decoded weights overlapping [addr, addr+nbytes) (cost: one bisect when none do)."""
        spans = self._spans
        i = bisect.bisect_left(spans, (addr + nbytes,))
        dead = []
        while i > 0 and spans[i - 1][0] + self._max_span > addr:
            i -= 1
            lo, hi, key = spans[i]
            if hi > addr:
                dead.append(i)
        for j in dead:                       # descending indices
            self._weights.pop(spans[j][2], None)
            del spans[j]

    def _decoded(self, cmd: LinearCommand, layout: TileLayout) -> _Weights:
        key = (cmd.weight_addr, layout)
        hit = self._weights.get(key)
        if hit is None:
            blob = self.memory.view(cmd.weight_addr, layout.total_bytes)
            hit = (cmd.weight_addr, cmd.weight_addr + layout.total_bytes, _Weights(layout, blob))
            self._weights[key] = hit
            bisect.insort(self._spans, (hit[0], hit[1], key), key=lambda s: s[:2])
            self._max_span = max(self._max_span, hit[1] - hit[0])
        return hit[2]

    def run(self, cmd_base: int, count: int, on_command=None, *, pos: int = 0, token: int = 0) -> RunResult:
        """Execute `count` descriptors; pos and token are RUN_POS and RUN_TOKEN (fabric ops)."""
        res = RunResult(ErrorCode.NONE, 0, [])
        err = validate_cmd_base(cmd_base, self.limits)
        if err != ErrorCode.NONE:
            res.error = err
            return res
        for i in range(count):
            res.index = i
            try:
                raw = self.memory.view(cmd_base + i * DESCRIPTOR_BYTES, DESCRIPTOR_BYTES)
            except BusError:
                res.error = ErrorCode.FETCH_ERROR
                return res
            cmd = unpack_any(raw.tobytes())
            res.bytes_read += DESCRIPTOR_BYTES
            err = validate_any(cmd, self.limits)
            if err != ErrorCode.NONE:
                res.error = err
                return res
            if isinstance(cmd, FabricCommand):
                err, cycles, rd, wr = self.fabric.execute(cmd, pos, token)
                res.cycles.append(cycles)
                res.bytes_read += rd
                res.bytes_written += wr
            else:
                err = self.execute(cmd, res)
            if on_command is not None:
                on_command(i, res)
            if err != ErrorCode.NONE:
                res.error = err
                return res
        res.index = count
        return res

    def execute(self, cmd: LinearCommand, res: RunResult) -> ErrorCode:
        n, k, g, t, r = cmd.n, cmd.k, cmd.group_size, cmd.tokens, cmd.tile_rows
        layout = TileLayout(n, k, g, r, cmd.weight_bits)
        act = activation_layout(k, g, t)
        outl = output_layout(n, t, r)
        ng, npad = act.groups, outl.padded_rows
        try:
            w = self._decoded(cmd, layout)
            buf = self.memory.view(cmd.act_addr, act.total_bytes)
            bias = (self.memory.view(cmd.bias_addr, bias_bytes(n, r))[:4 * npad].view("<f4")
                    if cmd.has_bias else None)
        except BusError:
            return ErrorCode.READ_ERROR
        q = buf[:t * act.codes_stride].reshape(t, act.codes_stride)[:, :k].view(np.int8)
        s_a = np.ascontiguousarray(buf[act.scales_offset:act.scales_offset + t * act.meta_stride]
                                   .reshape(t, act.meta_stride)[:, :4 * ng]).view("<f4").astype(F32)
        qsum = np.ascontiguousarray(buf[act.qsums_offset:act.qsums_offset + t * act.meta_stride]
                                    .reshape(t, act.meta_stride)[:, :4 * ng]).view("<i4").astype(np.int64)
        # Exact integer group sums acc = sum_k w_k q_k (|acc| < 2^24, so float32 BLAS is exact),
        # then corr = acc - z * qsum with the qsum the host wrote, as the hardware does.
        qa = q.astype(F32).reshape(t, ng, g).transpose(1, 0, 2)            # [ng, T, G]
        acc = np.rint(np.matmul(qa, w.codes)).astype(np.int64).transpose(1, 2, 0)   # [T, N, ng]
        corr = acc - w.zeros[None].astype(np.int64) * qsum[:, None, :] if w.zeros is not None else acc
        y = dequant_accumulate(corr.astype(np.int32), w.scales, s_a, None if bias is None else bias[:n])
        out = np.zeros((t, outl.stride // 4), F32)
        out[:, :n] = y
        if bias is not None and npad > n:
            out[:, n:npad] = bias[n:npad]
        try:
            self.memory.view(cmd.out_addr, outl.total_bytes)[:] = out.view(np.uint8).reshape(-1)
        except BusError:
            return ErrorCode.WRITE_ERROR
        if cmd.flags & Flags.ARGMAX:
            res.result_index, res.result_value = argmax_row(y[t - 1])
        cycles, stall, rd, wr = self.linear_cost(cmd)
        res.cycles.append(cycles)
        res.bytes_read += rd
        res.bytes_written += wr
        res.mem_stall += stall
        return ErrorCode.NONE

    def linear_cost(self, cmd: LinearCommand) -> tuple[int, int, int, int]:
        """(cycles, memory stall cycles, bytes read, bytes written) of one LINEAR, from the
        descriptor alone (the descriptor's own fetch is counted in the cycles, not the bytes)."""
        n, k, g, t, r = cmd.n, cmd.k, cmd.group_size, cmd.tokens, cmd.tile_rows
        layout = TileLayout(n, k, g, r, cmd.weight_bits)
        outl = output_layout(n, t, r)
        rd = layout.total_bytes + activation_layout(k, g, t).total_bytes + (bias_bytes(n, r) if cmd.has_bias else 0)
        cycles, stall = self.perf.command(cmd, layout, rd + DESCRIPTOR_BYTES, outl.total_bytes)
        if cmd.flags & Flags.ARGMAX:
            cycles += self.fabric.perf.argmax(n)          # the pass that reads the row back
            rd += 4 * n
        return cycles, stall, rd, outl.total_bytes


# ---------------------------------------------------------------------------
# Registers
# ---------------------------------------------------------------------------

_OFF = {r.name: r.offset for r in REGISTERS}
_WRITABLE = {r.offset: sum(f.mask for f in r.fields if f.access.value == "RW") for r in REGISTERS}
_COUNTERS = [name for name, _ in PERF_COUNTERS]


def identity_words(limits: HardwareLimits, *, cols: int, engines: int, beat_bytes: int, clock_mhz: int,
                   config_hash: str) -> dict[str, int]:
    """The read-only identity registers of a design (ID .. CONFIG_HASH7)."""
    words = {
        "ID": ID_MAGIC,
        "VERSION": register("VERSION").pack(major=REGMAP_VERSION[0], minor=REGMAP_VERSION[1]),
        "HW_PARAMS0": register("HW_PARAMS0").pack(rows=limits.tile_rows, cols=cols, tokens=limits.tokens,
                                                  group_size=limits.group_size),
        "HW_PARAMS1": register("HW_PARAMS1").pack(engines=engines, weight_kinds=limits.weight_kinds,
                                                  cmd_log_depth=CMD_LOG_DEPTH, beat_bytes=beat_bytes),
        "HW_PARAMS2": register("HW_PARAMS2").pack(addr_bits=limits.addr_bits, clock_mhz=clock_mhz),
        "HW_PARAMS3": register("HW_PARAMS3").pack(max_context=limits.max_context),
        "HW_PARAMS4": register("HW_PARAMS4").pack(head_dim=limits.head_dim, kv_group=limits.kv_group,
                                                  max_row=limits.max_row),
    }
    for i, w in enumerate(config_hash_words(config_hash)):
        words[f"CONFIG_HASH{i}"] = w
    return words


class RegisterModel:
    """The CSR block's behaviour over a uint32 word array (4 KiB). `storage` may be any writable
    uint32 array, e.g. a view of a memory-mapped file standing in for the board's register window."""

    def __init__(self, executor: CommandExecutor, identity: dict[str, int], storage: np.ndarray | None = None):
        self.executor = executor
        self.words = np.zeros(1024, np.uint32) if storage is None else storage
        self.words[:] = 0
        for name, v in identity.items():
            self.words[_OFF[name] // 4] = v
        self.counters = {n: 0 for n in _COUNTERS}
        self.snapshot = dict(self.counters)
        self.latched_hi = {n: 0 for n in _COUNTERS}
        self.log = [0] * CMD_LOG_DEPTH
        self.irq_count = 0

    def _set(self, name: str, value: int) -> None:
        self.words[_OFF[name] // 4] = value & 0xFFFFFFFF

    def _get(self, name: str) -> int:
        return int(self.words[_OFF[name] // 4])

    def read(self, offset: int) -> int:
        if offset not in _WRITABLE:
            raise DeviceError(f"read of unmapped register offset 0x{offset:03x} (the bus answers SLVERR)")
        for n in _COUNTERS:
            if offset == _OFF[f"{n}_LO"]:
                v = self.snapshot[n] if self._get("PERF_CTRL") & 2 else self.counters[n]
                self.latched_hi[n] = (v >> 32) & 0xFFFFFFFF
                return v & 0xFFFFFFFF
            if offset == _OFF[f"{n}_HI"]:
                return self.latched_hi[n]
        if offset == _OFF["CMD_LOG_CYCLES"]:
            return self.log[self._get("CMD_LOG_INDEX") % CMD_LOG_DEPTH]
        return int(self.words[offset // 4])

    def write(self, offset: int, value: int) -> None:
        if offset not in _WRITABLE:
            raise DeviceError(f"write to unmapped register offset 0x{offset:03x} (the bus answers SLVERR)")
        if offset == _OFF["IRQ_STATUS"]:
            self._set("IRQ_STATUS", self._get("IRQ_STATUS") & ~value)
            return
        if offset == _OFF["PERF_CTRL"]:
            if value & 1:
                self.snapshot = dict(self.counters)
            self._set("PERF_CTRL", value & _WRITABLE[offset])
            return
        if offset == _OFF["CTRL"]:
            self.ctrl(value)
            return
        mask = _WRITABLE[offset]                # read-only bits keep their value
        self.words[offset // 4] = (int(self.words[offset // 4]) & ~mask & 0xFFFFFFFF) | (value & mask)

    def ctrl(self, value: int) -> None:
        """A write of `value` to CTRL: store irq_enable, act on the pulses.

        STATUS turns busy before the start bit is cleared, so a poller of a memory-backed register
        file that sees the start consumed never reads the previous run's done."""
        if value & CTRL_SOFT_RESET:
            self._set("STATUS", 0)
            self._set("IRQ_STATUS", 0)
            self._set("LAST_CMD_CYCLES", 0)
            self.counters = {n: 0 for n in _COUNTERS}
            self._mirror_counters()
            self._set("CTRL", value & CTRL_IRQ_ENABLE)
            return
        if value & CTRL_PERF_CLEAR:
            self.counters = {n: 0 for n in _COUNTERS}
        start = value & CTRL_START and not self._get("STATUS") & 1
        if start:
            self._set("STATUS", 1)
        self._set("CTRL", value & CTRL_IRQ_ENABLE)
        if start:
            self.run()
        else:
            self._mirror_counters()

    def _mirror_counters(self) -> None:
        """Counter values into their LO/HI words, for register files read as plain memory."""
        for n, v in self.counters.items():
            self._set(f"{n}_LO", v & 0xFFFFFFFF)
            self._set(f"{n}_HI", v >> 32)

    def run(self) -> RunResult:
        base = self._get("CMD_BASE_LO") | (self._get("CMD_BASE_HI") << 32)
        count = self._get("CMD_COUNT")
        self._set("STATUS", 1)

        def on_command(i, res):
            c = res.cycles[-1] if res.cycles else 0
            self.log[i % CMD_LOG_DEPTH] = min(c, 0xFFFFFFFF)
            self._set("LAST_CMD_CYCLES", min(c, 0xFFFFFFFF))

        res = self.executor.run(base, count, on_command, pos=self._get("RUN_POS"), token=self._get("RUN_TOKEN"))
        if res.result_index is not None:
            self._set("RESULT_INDEX", res.result_index)
            self._set("RESULT_VALUE", res.result_value)
        busy = sum(res.cycles) + (res.index - len(res.cycles)) + 1   # failing commands cost a cycle each
        c = self.counters
        c["BUSY_CYCLES"] += busy
        c["BYTES_READ"] += res.bytes_read
        c["BYTES_WRITTEN"] += res.bytes_written
        c["MEM_STALL_CYCLES"] += res.mem_stall
        c["COMPUTE_STALL_CYCLES"] += res.compute_stall
        err = res.error != ErrorCode.NONE
        self._mirror_counters()        # before done: a poller reads the counters right after it
        self._set("IRQ_STATUS", self._get("IRQ_STATUS") | 1 | (2 if err else 0))
        self._set("STATUS", register("STATUS").pack(done=1, error=int(err), error_code=int(res.error),
                                                    cmd_index=res.index))
        self.irq_count += 1
        return res


# ---------------------------------------------------------------------------
# The device
# ---------------------------------------------------------------------------

class GoldenBuffer(Buffer):
    def __init__(self, device: "GoldenDevice", phys: int, ddr: np.ndarray, cpu: np.ndarray, name: str,
                 coherent: bool):
        super().__init__(phys, cpu, name)
        self._device = device
        self._ddr = ddr
        self._coherent = coherent

    def _sync(self, direction: int, offset: int, size: int) -> None:
        size = min(size, self.nbytes - offset)
        self._device.sync_log.append((direction, self.phys + offset, size))
        if direction == DMA_TO_DEVICE:
            if not self._coherent:
                self._ddr[offset:offset + size] = self.array[offset:offset + size]
            self._device.executor.invalidate(self.phys + offset, size)
        elif not self._coherent:
            self.array[offset:offset + size] = self._ddr[offset:offset + size]


class GoldenDevice(Device):
    """The accelerator's registers and command execution, in NumPy. Fast and bit-exact.

    config: an sw.contract.config.ArrayConfig (default: the kv260 preset). Its config_hash is what
    CONFIG_HASH0..7 read, and its shape is what HW_PARAMS report.
    """

    name = "golden"
    cycles_kind = "modeled (analytical)"
    DDR_BASE = 0x0_4000_0000      # where buffers start on the modeled bus (any 64-aligned value works)

    def __init__(self, config=None, *, coherent: bool = True, perf: PerfModel | None = None):
        super().__init__()
        if config is None:
            from .device import hardware_config
            config = hardware_config("kv260")
        self.config = config
        self.limits = HardwareLimits.from_config(config)
        self.memory = PhysMemory()
        perf = perf or PerfModel.from_config(config)
        self.executor = CommandExecutor(self.memory, self.limits, perf,
                                        FabricPerf.from_config(config, cap_bytes_per_cycle=perf.cap_bytes_per_cycle))
        self.regs = RegisterModel(self.executor, identity_words(
            self.limits, cols=config.cols, engines=config.engines, beat_bytes=config.port_bits // 8,
            clock_mhz=config.clock_mhz, config_hash=config.config_hash))
        self.coherent = coherent
        self.sync_log: list[tuple[int, int, int]] = []
        self.memory_map = RegionAllocator(self.DDR_BASE)

    def describe(self) -> dict:
        return {"backend": self.name, "coherent_model": self.coherent,
                "accelerator_time": {**self.executor.perf.assumptions(),
                                     **(self.executor.fabric.perf.assumptions() if self.limits.fabric_ops else {})}}

    def _read32(self, offset: int) -> int:
        return self.regs.read(offset)

    def _write32(self, offset: int, value: int) -> None:
        self.regs.write(offset, value)

    def alloc(self, nbytes: int, name: str = "", align: int = ALIGN) -> Buffer:
        phys, size = self.memory_map.take(nbytes, name, align)
        ddr = np.zeros(size, np.uint8)
        self.memory.add_region(phys, ddr)
        cpu = ddr if self.coherent else np.zeros(size, np.uint8)
        return GoldenBuffer(self, phys, ddr[:nbytes], cpu[:nbytes], name, self.coherent)
