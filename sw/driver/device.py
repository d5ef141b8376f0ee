"""The one `Device` interface every backend implements (golden, sim, kv260).

A device is an AXI4-Lite register window (the map of ``sw.contract.commands.REGISTERS``)
plus physically contiguous DMA buffers the accelerator reads and writes. The
driver code above it (sw/driver/runner.py) is the same for every backend:

* ``read32`` / ``write32`` take a register *name* (or a byte offset);
  ``read_field`` / ``write_fields`` use the field positions of the map;
* ``alloc(nbytes)`` returns a :class:`Buffer`: ``.phys`` (the bus address the
  accelerator uses), ``.array`` (a uint8 NumPy view the CPU writes), and
  ``sync_for_device()`` / ``sync_for_cpu()``: the cache maintenance around a
  DMA, because the KV260's HP ports are not cache-coherent;
* ``start(cmd_base, count)`` and ``wait(timeout_s)`` run a slice of a command
  list; ``wait`` raises :class:`~sw.contract.errors.DeviceError` with one sentence on a
  timeout or on ``STATUS.error`` (decoded with ``sw.contract.commands.describe_error``);
* ``identity()`` reads ID, VERSION, HW_PARAMS and CONFIG_HASH, and
  :func:`check_identity` / :func:`check_model` refuse a design or a model that
  does not match.

Nothing here imports Amaranth or cocotb: the board install has neither.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contract.commands import (ALIGN, ID_MAGIC, PERF_COUNTERS, REGISTER_BY_NAME, REGMAP_VERSION, HardwareLimits,
                        align_up, config_hash_from_words, describe_error, register)
from ..contract.errors import ConfigError, DeviceError

# STATUS / CTRL field words, computed once from the register map.
_CTRL = register("CTRL")
_STATUS = register("STATUS")
CTRL_START = _CTRL.field("start").mask
CTRL_SOFT_RESET = _CTRL.field("soft_reset").mask
CTRL_PERF_CLEAR = _CTRL.field("perf_clear").mask
CTRL_IRQ_ENABLE = _CTRL.field("irq_enable").mask
STATUS_BUSY = _STATUS.field("busy").mask
STATUS_DONE = _STATUS.field("done").mask
STATUS_ERROR = _STATUS.field("error").mask
IRQ_ALL = register("IRQ_STATUS").pack(done=1, error=1)
PERF_SNAPSHOT_HOLD = register("PERF_CTRL").pack(snapshot=1, hold=1)

# Sync directions, as the Linux DMA API (and u-dma-buf's sync_direction) numbers them.
DMA_BIDIRECTIONAL, DMA_TO_DEVICE, DMA_FROM_DEVICE = 0, 1, 2
CACHE_LINE = 64   # Cortex-A53 data cache line


def short_hash(h: str | None) -> str:
    return "none" if not h else f"{h[:12]}…"


# ---------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------

class Buffer:
    """A physically contiguous DMA buffer.

    ``array`` is the CPU's uint8 view (``nbytes`` long); ``phys`` is the bus
    address the accelerator uses. Backends override :meth:`_sync`. Ranges are
    widened to whole 64-byte cache lines (buffers are 64-byte aligned).
    """

    def __init__(self, phys: int, array: np.ndarray, name: str = ""):
        self.phys = int(phys)
        self.array = array
        self.nbytes = int(array.size)
        self.name = name

    def __repr__(self):
        return f"<{type(self).__name__} {self.name or '?'} phys=0x{self.phys:x} nbytes={self.nbytes}>"

    def view(self, dtype, offset: int = 0, count: int = -1) -> np.ndarray:
        dt = np.dtype(dtype)
        end = self.nbytes if count < 0 else offset + count * dt.itemsize
        return self.array[offset:end].view(dt)

    def write(self, offset: int, data) -> None:
        src = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) \
            else np.asarray(data).reshape(-1).view(np.uint8)
        if offset < 0 or offset + src.size > self.nbytes:
            raise DeviceError(f"write of {src.size} bytes at offset {offset} overruns buffer {self.name!r} "
                              f"({self.nbytes} bytes)")
        self.array[offset:offset + src.size] = src

    def read(self, offset: int, nbytes: int) -> bytes:
        return self.array[offset:offset + nbytes].tobytes()

    def _range(self, offset: int, size: int | None) -> tuple[int, int]:
        size = self.nbytes - offset if size is None else size
        if offset < 0 or size < 0 or offset + size > self.nbytes:
            raise DeviceError(f"cache sync range {offset}+{size} is outside buffer {self.name!r} "
                              f"({self.nbytes} bytes)")
        lo = offset - offset % CACHE_LINE
        hi = min(-(-(offset + size) // CACHE_LINE) * CACHE_LINE, -(-self.nbytes // CACHE_LINE) * CACHE_LINE)
        return lo, hi - lo

    def sync_for_device(self, offset: int = 0, size: int | None = None) -> None:
        """Flush (clean) the CPU cache for the range so the device reads what the CPU wrote."""
        lo, n = self._range(offset, size)
        if n:
            self._sync(DMA_TO_DEVICE, lo, n)

    def sync_for_cpu(self, offset: int = 0, size: int | None = None) -> None:
        """Invalidate the CPU cache for the range so the CPU reads what the device wrote."""
        lo, n = self._range(offset, size)
        if n:
            self._sync(DMA_FROM_DEVICE, lo, n)

    def _sync(self, direction: int, offset: int, size: int) -> None:  # coherent by default
        pass


# ---------------------------------------------------------------------------
# Identity and the hardware a model expects
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """What the loaded design says about itself (ID, VERSION, HW_PARAMS0..2, CONFIG_HASH0..7)."""
    magic: int
    version: tuple[int, int]
    limits: HardwareLimits
    cols: int
    engines: int
    beat_bytes: int
    clock_mhz: int
    config_hash: str

    def describe(self) -> str:
        lim = self.limits
        return (f"rows {lim.tile_rows} / group size {lim.group_size} / {lim.tokens} token lanes / "
                f"config hash {short_hash(self.config_hash)}")

    def to_dict(self) -> dict:
        lim = self.limits
        return {"regmap_version": f"{self.version[0]}.{self.version[1]}", "rows": lim.tile_rows,
                "cols": self.cols, "tokens": lim.tokens, "group_size": lim.group_size,
                "weight_kinds": lim.weight_kinds, "engines": self.engines, "beat_bytes": self.beat_bytes,
                "addr_bits": lim.addr_bits, "clock_mhz": self.clock_mhz, "config_hash": self.config_hash}


@dataclass(frozen=True)
class ExpectedHardware:
    """The design a run expects: from an elaboration manifest, a config file or a preset."""
    config_hash: str
    rows: int
    tokens: int
    group_size: int
    source: str
    config: object | None = None   # sw.contract.config.ArrayConfig when known

    @classmethod
    def from_config(cls, cfg, source: str) -> "ExpectedHardware":
        return cls(cfg.config_hash, cfg.rows, cfg.tokens, cfg.group_size, source, cfg)


def _array_config():
    try:
        from sw.contract.config import ArrayConfig, PRESETS  # pure Python; no Amaranth
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise ConfigError(f"cannot read hardware configs: sw.contract.config failed to import ({e}); "
                          f"it must stay importable without Amaranth") from None
    return ArrayConfig, PRESETS


def hardware_config(spec) -> object:
    """An sw.contract.config.ArrayConfig from a preset name, an ArrayConfig JSON file or a manifest.json
    (a JSON object with a "config" member); an ArrayConfig passes through."""
    ArrayConfig, PRESETS = _array_config()
    if isinstance(spec, ArrayConfig):
        return spec
    text = str(spec)
    if text in PRESETS:
        return PRESETS[text].validate()
    p = Path(text)
    if not p.exists():
        raise ConfigError(f"hardware config {text!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: cannot read hardware config ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict):   # an elaboration manifest
        cfg = ArrayConfig.from_dict(doc["config"], f"{p} config")
        stated = doc.get("config_hash")
        if stated and stated != cfg.config_hash:
            raise ConfigError(f"{p}: manifest states config hash {short_hash(stated)} but its config hashes to "
                              f"{short_hash(cfg.config_hash)}; the manifest is corrupt or hand-edited")
        return cfg
    return ArrayConfig.from_dict(doc, str(p))


def expected_hardware(spec) -> ExpectedHardware | None:
    if spec is None:
        return None
    cfg = hardware_config(spec)
    return ExpectedHardware.from_config(cfg, str(spec) if not hasattr(spec, "config_hash") else "config")


def check_identity(ident: Identity, expected: ExpectedHardware | None = None, where: str = "the device") -> None:
    """Refuse something that is not our accelerator, an incompatible register map, or a design
    elaborated from another config than `expected`."""
    if ident.magic == int.from_bytes(b"STUB", "little"):
        raise DeviceError(f"{where} is the board build's stand-in stub top (ID reads \"STUB\"), not the "
                          f"accelerator; rebuild with the accelerator top (docs/kv260.md)")
    if ident.magic != ID_MAGIC:
        raise DeviceError(f"{where} is not a kriallm accelerator: ID reads 0x{ident.magic:08x}, expected "
                          f"0x{ID_MAGIC:08x} (\"KRIA\"); is the design loaded and the address right?")
    if ident.version[0] != REGMAP_VERSION[0]:
        raise DeviceError(f"{where} has register map version {ident.version[0]}.{ident.version[1]} but this "
                          f"driver speaks {REGMAP_VERSION[0]}.x; rebuild the design or update kriallm")
    if expected is not None and expected.config_hash != ident.config_hash:
        raise DeviceError(f"{expected.source} describes config hash {short_hash(expected.config_hash)} "
                          f"(rows {expected.rows} / group size {expected.group_size} / {expected.tokens} token "
                          f"lanes) but the loaded design is {ident.describe()}; load the matching bitstream")


def model_hardware_needs(kq) -> dict:
    """What a .kq (sw.kq.KqFile) needs from the design: tile_rows, group sizes, weight kinds."""
    group_sizes, kinds = set(), set()
    for t in kq.header["tensors"]:
        if t.get("role") == "linear" and t.get("part") == "packed":
            group_sizes.add(int(t["group_size"]))
            kinds.add(t["kind"])
    return {"tile_rows": kq.tile_rows, "group_sizes": sorted(group_sizes), "kinds": sorted(kinds),
            "config_hash": (kq.layout.get("config_hash") or kq.header.get("hardware", {}).get("config_hash"))}


def check_model(kq, ident: Identity) -> None:
    """Refuse a model whose stream layout the loaded design cannot execute, with one sentence."""
    need = model_hardware_needs(kq)
    lim = ident.limits
    g = need["group_sizes"]
    wanted_hash = need["config_hash"]
    if need["tile_rows"] != lim.tile_rows or any(x != lim.group_size for x in g) or \
            (wanted_hash and wanted_hash != ident.config_hash):
        built = f"tile_rows {need['tile_rows']} / group size {'/'.join(map(str, g)) or '-'}"
        if wanted_hash:
            built += f" / config hash {short_hash(wanted_hash)}"
        raise DeviceError(f"{kq.path.name} was built for {built} but the loaded design is {ident.describe()}; "
                          f"re-quantize for it (kriallm quantize --hw-config with this design's manifest.json: "
                          f"rows {lim.tile_rows}, group size {lim.group_size}) or load the matching design")


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------

@dataclass
class RunStats:
    """One start..wait: wall time on this host, and the device's own cycle count when it has one."""
    commands: int
    wall_s: float
    cycles: int | None = None
    clock_mhz: int = 0
    cycles_kind: str = ""          # "modeled (analytical)", "modeled (RTL simulation)", "measured (BUSY_CYCLES)"
    counters: dict = field(default_factory=dict)

    @property
    def accel_s(self) -> float:
        """Accelerator time: cycles / clock when the device counts cycles, else the wall time."""
        if self.cycles is not None and self.clock_mhz:
            return self.cycles / (self.clock_mhz * 1e6)
        return self.wall_s


class RegionAllocator:
    """Hands out buffers in order from one physically contiguous region, never freeing them.

    A model allocates all its buffers once, at load time, so a bump pointer is all any backend needs
    (the golden model's memory map, the DDR model of the sim device, the board's u-dma-buf). Every
    buffer starts on `align` (at least ALIGN, which descriptors and the AXI masters require) and
    occupies a whole number of ALIGN blocks.
    """

    def __init__(self, base: int, end: int | None = None, *, full_hint: str = ""):
        self.base, self.end, self.next, self.allocated = base, end, base, 0
        self._full_hint = full_hint

    def take(self, nbytes: int, name: str = "", align: int = ALIGN) -> tuple[int, int]:
        """(physical address, reserved size) of a new buffer of `nbytes`."""
        if nbytes <= 0:
            raise DeviceError(f"buffer {name!r}: size must be positive, got {nbytes}")
        phys = align_up(self.next, max(align, ALIGN))
        size = align_up(nbytes, ALIGN)
        if self.end is not None and phys + size > self.end:
            raise DeviceError(f"buffer {name or 'a buffer'!r} of {nbytes} bytes does not fit: {self.allocated} of "
                              f"{self.end - self.base} bytes are allocated{self._full_hint}")
        self.next = phys + size
        self.allocated += size
        return phys, size


_CMD_REG_OFFSETS = frozenset(REGISTER_BY_NAME[n].offset for n in ("CMD_BASE_LO", "CMD_BASE_HI", "CMD_COUNT"))


class Device(abc.ABC):
    """The driver's view of one accelerator. Subclasses implement the five primitives
    ``_read32``, ``_write32``, ``alloc``, ``close`` and (optionally) ``_wait_event``."""

    name = "device"
    cycles_kind = "measured (BUSY_CYCLES)"   # what BUSY_CYCLES means on this backend
    poll_spin_s = 200e-6                     # busy-poll this long before sleeping between polls

    def __init__(self):
        self._identity: Identity | None = None
        self._run: tuple[int, int, float] | None = None
        self._cmd_regs: tuple[int, int] | None = None   # CMD_BASE and CMD_COUNT as last written
        self.register_accesses = 0                       # every read32/write32, for the bench

    # ---- primitives ----------------------------------------------------------
    @abc.abstractmethod
    def _read32(self, offset: int) -> int: ...

    @abc.abstractmethod
    def _write32(self, offset: int, value: int) -> None: ...

    @abc.abstractmethod
    def alloc(self, nbytes: int, name: str = "", align: int = ALIGN) -> Buffer:
        """A zeroed, physically contiguous buffer of at least `nbytes`, `align`-aligned."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict:
        """Backend facts for reports (paths, clock, assumptions)."""
        return {"backend": self.name}

    # ---- registers -------------------------------------------------------------
    @staticmethod
    def _offset(reg) -> int:
        if isinstance(reg, str):
            try:
                return REGISTER_BY_NAME[reg].offset
            except KeyError:
                raise DeviceError(f"no register named {reg!r}") from None
        return int(reg)

    def read32(self, reg) -> int:
        self.register_accesses += 1
        return int(self._read32(self._offset(reg))) & 0xFFFFFFFF

    def write32(self, reg, value: int) -> None:
        self.register_accesses += 1
        off = self._offset(reg)
        if off in _CMD_REG_OFFSETS:
            self._cmd_regs = None       # start() rewrites them; anyone else's write voids what it knows
        self._write32(off, int(value) & 0xFFFFFFFF)

    def read_field(self, reg: str, field_name: str) -> int:
        return register(reg).field(field_name).get(self.read32(reg))

    def write_fields(self, reg: str, **values: int) -> None:
        self.write32(reg, register(reg).pack(**values))

    def read_counter(self, name: str) -> int:
        lo = self.read32(f"{name}_LO")        # the LO read latches HI
        return lo | (self.read32(f"{name}_HI") << 32)

    def read_counters(self) -> dict[str, int]:
        """Every performance counter, latched at one cycle (PERF_CTRL snapshot + hold)."""
        self.write32("PERF_CTRL", PERF_SNAPSHOT_HOLD)
        out = {name.lower(): self.read_counter(name) for name, _ in PERF_COUNTERS}
        self.write32("PERF_CTRL", 0)
        return out

    # ---- identity ---------------------------------------------------------------
    def identity(self, refresh: bool = False) -> Identity:
        if self._identity is None or refresh:
            p0, p1, p2 = (self.read32(f"HW_PARAMS{i}") for i in range(3))
            f0, f1, f2 = (register(f"HW_PARAMS{i}").unpack(w) for i, w in enumerate((p0, p1, p2)))
            v = register("VERSION").unpack(self.read32("VERSION"))
            self._identity = Identity(
                magic=self.read32("ID"), version=(v["major"], v["minor"]),
                limits=HardwareLimits.from_registers(p0, p1, p2, self.read32("HW_PARAMS3"),
                                                     self.read32("HW_PARAMS4")), cols=f0["cols"], engines=f1["engines"],
                beat_bytes=f1["beat_bytes"], clock_mhz=f2["clock_mhz"],
                config_hash=config_hash_from_words(self.read32(f"CONFIG_HASH{i}") for i in range(8)))
        return self._identity

    def check_identity(self, expected: ExpectedHardware | None = None) -> Identity:
        ident = self.identity(refresh=True)
        check_identity(ident, expected, where=f"the {self.name} device")
        return ident

    # ---- runs -------------------------------------------------------------------
    @property
    def uses_irq(self) -> bool:
        return False

    def start(self, cmd_base: int, count: int, perf_clear: bool = True) -> None:
        """Run `count` descriptors at bus address `cmd_base` (the caller has flushed them)."""
        if self._run is not None:
            raise DeviceError(f"the {self.name} device is still running the previous command list; "
                              f"wait() for it before starting another")
        if self._cmd_regs != (cmd_base, count):      # the registers keep their values between runs
            self.write32("CMD_BASE_LO", cmd_base & 0xFFFFFFFF)
            self.write32("CMD_BASE_HI", cmd_base >> 32)
            self.write32("CMD_COUNT", count)
            self._cmd_regs = (cmd_base, count)
        ctrl = CTRL_START | (CTRL_PERF_CLEAR if perf_clear else 0) | (CTRL_IRQ_ENABLE if self.uses_irq else 0)
        self._run = (cmd_base, count, time.perf_counter())
        self._before_start()
        self.write32("CTRL", ctrl)

    def _before_start(self) -> None:
        pass

    def _wait_event(self, deadline: float) -> None:
        """Block until the device may have finished or `deadline` passes (default: nothing; poll)."""

    def _poll_done(self, deadline: float) -> int:
        """Poll STATUS until done; return the STATUS word, or raise on timeout.

        A start is consumed before STATUS is trusted: CTRL.start is a pulse field and reads 0 on
        the hardware, so the first check passes at once there; stand-ins that emulate the
        register file in memory clear it when they take the start.
        """
        consumed = False
        spin_until = time.perf_counter() + self.poll_spin_s
        while True:
            if not consumed:
                consumed = not (self.read32("CTRL") & CTRL_START)
            if consumed:
                st = self.read32("STATUS")
                if st & STATUS_DONE and not st & STATUS_BUSY:
                    return st
            now = time.perf_counter()
            if now >= deadline:
                return -1
            if self.uses_irq:
                self._wait_event(deadline)
            elif now > spin_until:
                time.sleep(min(50e-6 if now - spin_until < 0.01 else 1e-3, max(0.0, deadline - now)))

    def wait(self, timeout_s: float = 2.0) -> RunStats:
        """Wait for the run to end; raise DeviceError on a timeout or an error status."""
        if self._run is None:
            raise DeviceError(f"wait() on the {self.name} device without a start()")
        base, count, t0 = self._run
        st = self._poll_done(t0 + timeout_s)
        wall = time.perf_counter() - t0
        self._run = None
        if st < 0:
            status = _STATUS.unpack(self.read32("STATUS"))
            self._after_timeout()
            raise DeviceError(
                f"the {self.name} accelerator did not finish {count} command(s) at 0x{base:x} within "
                f"{timeout_s:g} s (STATUS busy={status['busy']} done={status['done']}, at command "
                f"{status['cmd_index']}); is the design loaded and clocked?")
        if self.uses_irq:
            self.write32("IRQ_STATUS", IRQ_ALL)
        if st & STATUS_ERROR:
            f = _STATUS.unpack(st)
            raise DeviceError(f"the {self.name} accelerator stopped on the run of {count} command(s) at "
                              f"0x{base:x}: {describe_error(f['error_code'], f['cmd_index'])}")
        ident = self.identity()
        return RunStats(commands=count, wall_s=wall, cycles=self.read_counter("BUSY_CYCLES"),
                        clock_mhz=ident.clock_mhz, cycles_kind=self.cycles_kind)

    def _after_timeout(self) -> None:
        """Leave the device usable after a timeout: abort the run."""
        try:
            self.write32("CTRL", CTRL_SOFT_RESET)
        except Exception:  # pragma: no cover - best effort on a wedged bus
            pass

    def run(self, cmd_base: int, count: int, timeout_s: float = 2.0) -> RunStats:
        self.start(cmd_base, count)
        return self.wait(timeout_s)
