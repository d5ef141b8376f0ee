"""The `kv260` backend: the accelerator on the board, from Linux user space.

Registers: the 4 KiB AXI4-Lite window, memory-mapped either

* through UIO: the device whose /sys/class/uio/uioN/name is the design's
  name (default "kriallm", from the device tree overlay's generic-uio node);
  /dev/uioN's map0 is the window, and read() on /dev/uioN waits for the
  interrupt (``--irq``); or
* through /dev/mem at the window's physical address (``--mem-base``).

Every access is one aligned 32-bit load or store on a NumPy uint32 view of
the mapping (as PYNQ's MMIO does), never a memcpy.

DMA buffers: one physically contiguous u-dma-buf (/dev/udmabufN; physical
address and size from /sys/class/u-dma-buf/udmabufN/{phys_addr,size}, or the
older /sys/class/udmabuf/), mapped with the CPU cache on and carved into
64-byte aligned buffers. The HP ports are not cache-coherent, so the driver
cleans the cache over a buffer before every DMA that reads it
(``sync_for_device``) and invalidates it before the CPU reads what the
device wrote (``sync_for_cpu``), through u-dma-buf's sysfs files.

PYNQ, when installed, is used instead (``pynq.MMIO``, ``pynq.allocate`` with
its flush()/invalidate(), and ``pynq.Overlay`` to load a bitstream).

All paths hang off ``sysfs_root`` and ``dev_root`` so tests can point them at
stand-ins (tests/test_driver_kv260.py).
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contract.commands import ALIGN, CSR_ADDR_WIDTH
from ..contract.errors import DeviceError
from .device import DMA_TO_DEVICE, Buffer, Device, RegionAllocator

WINDOW_BYTES = 1 << CSR_ADDR_WIDTH
PAGE = mmap.PAGESIZE
UDMABUF_CLASSES = ("u-dma-buf", "udmabuf")
# The board build's names (boards/kv260.py: UIO_NAME, UDMABUF_NAME, CSR_BASE), repeated here so the
# driver does not import the board flow; a build manifest's board_facts override them.
DEFAULT_UIO = "kriallm"
DEFAULT_UDMABUFS = ("udmabuf-kriallm", "udmabuf0")
DEFAULT_CSR_BASE = 0xA000_0000


@dataclass(frozen=True)
class Kv260Paths:
    sysfs_root: Path = Path("/sys")
    dev_root: Path = Path("/dev")


def _read_text(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError as e:
        raise DeviceError(f"cannot read {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DeviceError(f"{p} holds binary garbage, not text; is this the right device and driver?") from None


def _read_int(p: Path, what: str, base: int = 10) -> int:
    """A non-negative number from a sysfs file (decimal, or hex with or without 0x for base 16)."""
    text = _read_text(p)
    try:
        value = int(text, 16) if base == 16 else int(text, 0 if text.lower().startswith("0x") else 10)
    except ValueError:
        raise DeviceError(f"{p}: expected {what} as a number, read {text[:40]!r}; is this the right device "
                          f"and driver?") from None
    if value < 0:
        raise DeviceError(f"{p}: {what} is negative ({value})")
    return value


def _open(path: Path, flags: int, what: str) -> int:
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise DeviceError(f"{path} does not exist ({what})") from None
    except PermissionError:
        raise DeviceError(f"permission denied opening {path} ({what}); run as root or give your user access "
                          f"(docs/driver.md: udev rules)") from None
    except OSError as e:
        raise DeviceError(f"cannot open {path} ({what}): {e.strerror}") from None


# ---------------------------------------------------------------------------
# Registers
# ---------------------------------------------------------------------------

def find_uio(name: str, paths: Kv260Paths) -> tuple[Path, int]:
    """(/dev/uioN, size of map0) of the UIO device called `name`."""
    root = paths.sysfs_root / "class" / "uio"
    found = []
    for d in sorted(root.glob("uio*")) if root.is_dir() else []:
        try:
            uname = (d / "name").read_text().strip()
        except OSError:
            continue
        found.append(f"{d.name}={uname}")
        if uname == name:
            size_file = d / "maps" / "map0" / "size"
            size = _read_int(size_file, "the UIO map size") if size_file.exists() else WINDOW_BYTES
            return paths.dev_root / d.name, size
    seen = f" (found: {', '.join(found)})" if found else " (no UIO devices at all)"
    raise DeviceError(f"no UIO device named {name!r} under {root}{seen}; load the design (xmutil loadapp APP) "
                      f"with a generic-uio node for the accelerator, or pass --mem-base ADDR to use /dev/mem")


class MmioWindow:
    """A register window mapped from a device file (or a stand-in): 32-bit accesses only."""

    def __init__(self, path: Path, offset: int, size: int = WINDOW_BYTES, what: str = "register window"):
        self.path = Path(path)
        page_off = offset % PAGE
        self.fd = _open(self.path, os.O_RDWR | getattr(os, "O_SYNC", 0), what)
        try:
            self.mm = mmap.mmap(self.fd, page_off + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=offset - page_off)
        except (OSError, ValueError) as e:
            os.close(self.fd)
            raise DeviceError(f"cannot map {size} bytes of {self.path} at 0x{offset:x} ({what}): {e}") from None
        self.words = np.frombuffer(self.mm, np.uint32, count=size // 4, offset=page_off)

    def read32(self, offset: int) -> int:
        return int(self.words[offset >> 2])

    def write32(self, offset: int, value: int) -> None:
        self.words[offset >> 2] = value

    def close(self) -> None:
        self.words = None
        try:
            self.mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass
        os.close(self.fd)


# ---------------------------------------------------------------------------
# u-dma-buf
# ---------------------------------------------------------------------------

class UdmaBuf:
    """One u-dma-buf device: its mapping, physical address, size and cache sync files."""

    def __init__(self, name, paths: Kv260Paths, sync_style: str = "combined"):
        """name: the device name, or several to try in order (the first that exists is used)."""
        if sync_style not in ("combined", "separate"):
            raise DeviceError(f"unknown u-dma-buf sync style {sync_style!r}")
        names = [name] if isinstance(name, str) else list(name)
        self.sync_style = sync_style
        tried = [paths.sysfs_root / "class" / c / n for n in names for c in UDMABUF_CLASSES]
        self.sysdir = next((c for c in tried if c.is_dir()), None)
        if self.sysdir is None:
            shown = " or ".join(repr(n) for n in names)
            raise DeviceError(f"no u-dma-buf device {shown} under {paths.sysfs_root / 'class'}/{{u-dma-buf,udmabuf}}; "
                              f"load the app whose overlay declares it, or load the module with a buffer big "
                              f"enough for the model, e.g. `sudo modprobe u-dma-buf udmabuf0=0x12000000` "
                              f"(docs/driver.md)")
        self.name = name = self.sysdir.name
        self.phys = _read_int(self.sysdir / "phys_addr", "the buffer's physical address", base=16)
        self.size = _read_int(self.sysdir / "size", "the buffer size")
        if self.size == 0:
            raise DeviceError(f"{self.sysdir / 'size'}: the u-dma-buf has size 0")
        coherent = self.sysdir / "dma_coherent"
        self.dma_coherent = coherent.exists() and _read_text(coherent) not in ("0", "")
        if sync_style == "combined" and self.size > 1 << 32:
            self.sync_style = "separate"       # the combined word holds 32-bit offsets and sizes
        dev = paths.dev_root / name
        self.fd = _open(dev, os.O_RDWR, "u-dma-buf device")   # no O_SYNC: cached, with explicit syncs
        try:
            self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as e:
            os.close(self.fd)
            raise DeviceError(f"cannot map {self.size} bytes of {dev}: {e}") from None
        self.array = np.frombuffer(self.mm, np.uint8)
        self._fds = {}
        names = ["sync_for_device", "sync_for_cpu"]
        if self.sync_style == "separate":
            names += ["sync_offset", "sync_size", "sync_direction"]
        for n in names:
            self._fds[n] = _open(self.sysdir / n, os.O_WRONLY, "u-dma-buf cache control")
        self.syncs = 0
        self.sync_s = 0.0

    def _put(self, name: str, text: str) -> None:
        # sysfs attributes ignore the file position, so one open fd serves every write
        data = text.encode()
        try:
            if os.write(self._fds[name], data) != len(data):
                raise OSError(errno.EIO, "short write")
        except OSError as e:
            raise DeviceError(f"cache sync failed writing {text!r} to {self.sysdir / name}: {e.strerror}") from None

    def sync(self, offset: int, size: int, direction: int) -> None:
        """Clean (DMA_TO_DEVICE, via sync_for_device) or invalidate (DMA_FROM_DEVICE, via sync_for_cpu)
        the CPU cache over [offset, offset+size) of the buffer."""
        t0 = time.perf_counter()
        target = "sync_for_device" if direction == DMA_TO_DEVICE else "sync_for_cpu"
        size = -(-size // 16) * 16
        if self.sync_style == "combined":
            self._put(target, "0x%08X%08X" % (offset & 0xFFFFFFFF, (size & 0xFFFFFFF0) | (direction << 2) | 1))
        else:
            self._put("sync_offset", str(offset))
            self._put("sync_size", str(size))
            self._put("sync_direction", str(direction))
            self._put(target, "1")
        self.syncs += 1
        self.sync_s += time.perf_counter() - t0

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self.array = None
        try:
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)


class UdmaBuffer(Buffer):
    def __init__(self, udmabuf: UdmaBuf, offset: int, nbytes: int, name: str):
        super().__init__(udmabuf.phys + offset, udmabuf.array[offset:offset + nbytes], name)
        self._udmabuf = udmabuf
        self._offset = offset

    def _sync(self, direction: int, offset: int, size: int) -> None:
        self._udmabuf.sync(self._offset + offset, size, direction)


# ---------------------------------------------------------------------------
# The device
# ---------------------------------------------------------------------------

class Kv260Device(Device):
    """The board through UIO or /dev/mem plus u-dma-buf.

    uio: the UIO device name of the register window (ignored with mem_base);
    mem_base: physical address of the window, to use /dev/mem;
    irq: wait on interrupts through UIO (irq_uio names another UIO device for them) instead of polling.
    """

    name = "kv260"
    cycles_kind = "measured (BUSY_CYCLES counter)"

    def __init__(self, *, uio: str = DEFAULT_UIO, mem_base: int | None = None, udmabuf=DEFAULT_UDMABUFS,
                 irq: bool = False, irq_uio: str | None = None, paths: Kv260Paths | None = None,
                 sync_style: str = "combined"):
        super().__init__()
        self.paths = paths = paths or Kv260Paths()
        self._irq_fd = None
        self.window = self.dma = None
        try:
            if mem_base is not None:
                if mem_base % 4:
                    raise DeviceError(f"--mem-base 0x{mem_base:x} is not 4-byte aligned")
                self.window = MmioWindow(paths.dev_root / "mem", mem_base, WINDOW_BYTES, "register window")
                self.access = f"/dev/mem at 0x{mem_base:x}"
            else:
                dev, size = find_uio(uio, paths)
                self.window = MmioWindow(dev, 0, max(WINDOW_BYTES, min(size, 1 << 16)), f"UIO {uio} map0")
                self.access = f"UIO {uio} ({dev})"
            if irq:
                irq_dev = find_uio(irq_uio or uio, paths)[0]
                self._irq_fd = _open(irq_dev, os.O_RDWR, "UIO interrupt")
            self.dma = UdmaBuf(udmabuf, paths, sync_style)
        except BaseException:
            self.close()
            raise
        self.capacity = self.dma.size
        self.memory_map = RegionAllocator(self.dma.phys, self.dma.phys + self.dma.size,
                                          full_hint=f" in u-dma-buf {self.dma.name}; reload u-dma-buf with a "
                                                    f"bigger size (docs/driver.md)")

    def describe(self) -> dict:
        return {"backend": self.name, "registers": self.access,
                "dma": f"u-dma-buf {self.dma.name} at 0x{self.dma.phys:x}, {self.dma.size} bytes",
                "cache_sync": f"sysfs sync_for_device/sync_for_cpu ({self.dma.sync_style})",
                "wait": "UIO interrupt" if self._irq_fd is not None else "polling STATUS",
                "cache_syncs": self.dma.syncs, "cache_sync_s": self.dma.sync_s}

    @property
    def uses_irq(self) -> bool:
        return self._irq_fd is not None

    def _read32(self, offset: int) -> int:
        return self.window.read32(offset)

    def _write32(self, offset: int, value: int) -> None:
        self.window.write32(offset, value)

    def _before_start(self) -> None:
        if self._irq_fd is not None:
            self.write32("IRQ_STATUS", 3)                          # drop a stale cause
            os.write(self._irq_fd, np.uint32(1).tobytes())         # re-enable the UIO interrupt

    def _wait_event(self, deadline: float) -> None:
        left = max(0.0, deadline - time.perf_counter())
        r, _, _ = select.select([self._irq_fd], [], [], min(left, 0.05))
        if r:
            os.read(self._irq_fd, 4)

    def alloc(self, nbytes: int, name: str = "", align: int = ALIGN) -> Buffer:
        phys, _ = self.memory_map.take(nbytes, name, align)
        off = phys - self.dma.phys
        buf = UdmaBuffer(self.dma, off, nbytes, name)
        buf.array[:] = 0
        return buf

    def close(self) -> None:
        if self._irq_fd is not None:
            os.close(self._irq_fd)
            self._irq_fd = None
        if self.dma is not None:
            self.dma.close()
            self.dma = None
        if self.window is not None:
            self.window.close()
            self.window = None


# ---------------------------------------------------------------------------
# PYNQ
# ---------------------------------------------------------------------------

def _import_pynq():
    try:
        import pynq
    except ImportError:
        raise DeviceError("PYNQ is not installed; use --kv260-access uio or devmem (u-dma-buf) instead") from None
    return pynq


class PynqBuffer(Buffer):
    def __init__(self, pbuf, nbytes: int, name: str):
        phys = getattr(pbuf, "physical_address", None)
        if phys is None:
            phys = pbuf.device_address
        super().__init__(phys, np.asarray(pbuf).reshape(-1)[:nbytes].view(np.uint8), name)
        self._pbuf = pbuf

    def _sync(self, direction: int, offset: int, size: int) -> None:
        # PYNQ's flush/invalidate act on the whole buffer
        if direction == DMA_TO_DEVICE:
            self._pbuf.flush()
        else:
            self._pbuf.invalidate()


class PynqDevice(Device):
    """The board through PYNQ: Overlay (optional), MMIO for the registers, allocate for buffers."""

    name = "kv260"
    cycles_kind = "measured (BUSY_CYCLES counter)"

    def __init__(self, *, bitstream: str | None = None, mem_base: int | None = None, ip_name: str = "kriallm"):
        super().__init__()
        pynq = _import_pynq()
        self._pynq = pynq
        self.overlay = None
        if bitstream:
            try:
                self.overlay = pynq.Overlay(str(bitstream))
            except Exception as e:  # PYNQ raises a variety of types for a bad overlay
                raise DeviceError(f"PYNQ could not load {bitstream}: {e}") from None
            if mem_base is None:
                ips = {k: v for k, v in self.overlay.ip_dict.items() if "phys_addr" in v}
                hit = [v for k, v in ips.items() if ip_name in k] or (list(ips.values()) if len(ips) == 1 else [])
                if not hit:
                    raise DeviceError(f"{bitstream}: no IP named like {ip_name!r} in the overlay "
                                      f"(has {', '.join(ips) or 'none'}); pass --mem-base ADDR")
                mem_base = int(hit[0]["phys_addr"])
        if mem_base is None:
            raise DeviceError("PYNQ access needs the register window's address: pass --bitstream FILE.bit "
                              "or --mem-base ADDR")
        self.mem_base = mem_base
        self.mmio = pynq.MMIO(mem_base, WINDOW_BYTES)
        self._buffers = []

    def describe(self) -> dict:
        return {"backend": self.name, "registers": f"pynq.MMIO at 0x{self.mem_base:x}",
                "dma": "pynq.allocate", "cache_sync": "PynqBuffer.flush/invalidate (whole buffer)",
                "wait": "polling STATUS"}

    def _read32(self, offset: int) -> int:
        return int(self.mmio.read(offset))

    def _write32(self, offset: int, value: int) -> None:
        self.mmio.write(offset, int(value))

    def alloc(self, nbytes: int, name: str = "", align: int = ALIGN) -> Buffer:
        size = -(-nbytes // ALIGN) * ALIGN
        try:
            pbuf = self._pynq.allocate(shape=(size,), dtype=np.uint8)
        except Exception as e:
            raise DeviceError(f"PYNQ could not allocate {size} bytes of contiguous memory for "
                              f"{name or 'a buffer'}: {e}") from None
        buf = PynqBuffer(pbuf, nbytes, name)
        if buf.phys % max(align, ALIGN):
            raise DeviceError(f"PYNQ returned buffer {name!r} at 0x{buf.phys:x}, not {align}-byte aligned")
        buf.array[:] = 0
        self._buffers.append(pbuf)
        return buf

    def close(self) -> None:
        for b in self._buffers:
            try:
                b.freebuffer()
            except Exception:
                pass
        self._buffers = []


def pynq_available() -> bool:
    try:
        import pynq  # noqa: F401
        return True
    except ImportError:
        return False


# The board_facts a kv260 run reads, with the type each must have (boards/build.py writes them).
_FACT_TYPES = {"uio_name": str, "udmabuf": dict, "csr": dict}
_NESTED_FACT_TYPES = {("udmabuf", "device"): str, ("udmabuf", "must_be_below"): int, ("csr", "base"): int}


def board_facts(manifest) -> dict:
    """The board build manifest's board_facts (boards/build.py), or {} for an elaboration manifest / none.
    Every fact the driver uses is checked for its type, so a damaged manifest is one sentence."""
    if not manifest:
        return {}
    import json
    try:
        doc = json.loads(Path(manifest).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DeviceError(f"{manifest}: cannot read the manifest ({e})") from None
    facts = doc.get("board_facts") if isinstance(doc, dict) else None
    if facts is None:
        return {}
    if not isinstance(facts, dict):
        raise DeviceError(f"{manifest}: board_facts must be a JSON object, got {type(facts).__name__}")
    for key, kind in _FACT_TYPES.items():
        if key in facts and not isinstance(facts[key], kind):
            raise DeviceError(f"{manifest}: board_facts.{key} must be a {kind.__name__}, got {facts[key]!r:.40}")
    for (key, sub), kind in _NESTED_FACT_TYPES.items():
        v = facts.get(key, {}).get(sub)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0)):
            raise DeviceError(f"{manifest}: board_facts.{key}.{sub} must be a "
                              f"{'non-negative integer' if kind is int else kind.__name__}, got {v!r:.40}")
    return facts


def open_kv260(args=None) -> Device:
    """The kv260 Device for the CLI options of sw.driver.add_device_args. Names and addresses not
    given on the command line come from the build manifest's board_facts, then the board defaults."""
    get = (lambda n, d=None: getattr(args, n, d)) if args is not None else (lambda n, d=None: d)
    facts = board_facts(get("manifest"))
    uio = get("uio") or facts.get("uio_name") or DEFAULT_UIO
    udmabuf = get("udmabuf") or (Path(facts["udmabuf"]["device"]).name
                                 if facts.get("udmabuf", {}).get("device") else DEFAULT_UDMABUFS)
    mem_base = get("mem_base")
    csr_base = facts.get("csr", {}).get("base")
    access = get("kv260_access", "auto") or "auto"
    if access == "auto":
        access = "pynq" if pynq_available() else ("devmem" if mem_base is not None else "uio")
    if access == "pynq":
        return PynqDevice(bitstream=get("bitstream"), ip_name=uio,
                          mem_base=mem_base if mem_base is not None else
                          (None if get("bitstream") else (csr_base if csr_base is not None else DEFAULT_CSR_BASE)))
    if access == "devmem":
        mem_base = mem_base if mem_base is not None else csr_base
        if mem_base is None:
            raise DeviceError("--kv260-access devmem needs --mem-base ADDR (the register window's physical "
                              "address, 0xA0000000 in the board build) or a build --manifest")
    paths = Kv260Paths(Path(get("sysfs_root", "/sys") or "/sys"), Path(get("dev_root", "/dev") or "/dev"))
    dev = Kv260Device(uio=uio, mem_base=mem_base if access == "devmem" else None, udmabuf=udmabuf,
                      irq=bool(get("irq", False)), paths=paths,
                      sync_style=get("udmabuf_sync", "combined") or "combined")
    limit = facts.get("udmabuf", {}).get("must_be_below")
    if limit is not None and dev.dma.phys + dev.dma.size > int(limit):
        where = f"0x{dev.dma.phys:x}..0x{dev.dma.phys + dev.dma.size:x}"
        dev.close()
        raise DeviceError(f"u-dma-buf lies at {where} but the design's HP ports reach only addresses below "
                          f"0x{int(limit):x}; reserve the buffer in low DDR (docs/kv260.md)")
    return dev
