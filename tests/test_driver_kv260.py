"""The kv260 backend's real code against stand-ins that behave like the board.

The stand-in board (`FakeBoard`) is a directory tree with

* sys/class/uio/uio0/{name, maps/map0/size} and dev/uio0: a 4 KiB regular file the
  driver memory-maps as the register window (or dev/mem: a sparse file mapped at the
  window's physical address, for the /dev/mem path);
* sys/class/u-dma-buf/udmabuf0/{phys_addr, size, dma_coherent} and dev/udmabuf0: a
  regular file mapped as the DMA memory; sync_for_device and sync_for_cpu are FIFOs,
  so every cache operation the driver writes is seen, in order, by
* a register-model thread that watches the mapped register file for CTRL.start, runs
  the command list in the DMA file with the golden device's executor and register
  model (sw/driver/golden_device.py) and sets STATUS.done; with an interrupt UIO
  (dev/uio1, a FIFO) it also signals completion there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import mmap
import numpy as np
import pytest

from sw.contract.config import ArrayConfig, preset
from sw.contract.commands import (DESCRIPTOR_BYTES, HardwareLimits, activation_layout, output_layout,
                         unpack_command)
from sw.driver import DeviceError, open_accelerated, open_device
from sw.driver.device import DMA_FROM_DEVICE, DMA_TO_DEVICE
from sw.driver.golden_device import CommandExecutor, PerfModel, PhysMemory, RegisterModel, identity_words
from sw.driver.kv260 import Kv260Device, Kv260Paths, PynqDevice
from sw.runtime import generate, open_model
from sw.sampling import Sampler, SamplingParams

PHYS = 0x7000_0000
REG_BASE = 0xA000_0000
DMA_BYTES = 4 << 20


@pytest.fixture(scope="module")
def tiny_kq(make_tiny_kq):
    return make_tiny_kq("int4")


class FakeBoard:
    def __init__(self, root: Path, config: ArrayConfig, *, respond: bool = True, devmem: bool = False,
                 irq: bool = False, with_uio: bool = True, with_udmabuf: bool = True,
                 udmabuf: str = "udmabuf0", uio_name: str = "kriallm"):
        self.root, self.config, self.respond = root, config, respond
        self.sys, self.dev = root / "sys", root / "dev"
        self.dev.mkdir(parents=True)
        self.events: list[tuple] = []
        self.irq_fd = None
        if devmem:
            regfile = self.dev / "mem"
            with open(regfile, "wb") as f:
                f.truncate(REG_BASE + 4096)           # sparse: only the window's page is ever touched
            reg_offset = REG_BASE
        else:
            regfile, reg_offset = self.dev / "uio0", 0
            regfile.write_bytes(bytes(4096))
        if with_uio:
            self._uio("uio0", uio_name)
        if irq:
            self._uio("uio1", "kriallm-irq")
            os.mkfifo(self.dev / "uio1")
            self.irq_fd = os.open(self.dev / "uio1", os.O_RDWR | os.O_NONBLOCK)
        self._fd = os.open(regfile, os.O_RDWR)
        self._mm = mmap.mmap(self._fd, 4096, offset=reg_offset)
        words = np.frombuffer(self._mm, np.uint32)
        self.sync_fds = []
        memory = PhysMemory()
        if with_udmabuf:
            u = self.sys / "class" / "u-dma-buf" / udmabuf
            u.mkdir(parents=True)
            (u / "phys_addr").write_text(f"0x{PHYS:016x}\n")
            (u / "size").write_text(f"{DMA_BYTES}\n")
            (u / "dma_coherent").write_text("0\n")
            for n in ("sync_for_device", "sync_for_cpu"):
                os.mkfifo(u / n)
                self.sync_fds.append((n, os.open(u / n, os.O_RDONLY | os.O_NONBLOCK)))
            with open(self.dev / udmabuf, "wb") as f:
                f.truncate(DMA_BYTES)
            self._dfd = os.open(self.dev / udmabuf, os.O_RDWR)
            self._dmm = mmap.mmap(self._dfd, DMA_BYTES)
            self.dma = np.frombuffer(self._dmm, np.uint8)
            memory.add_region(PHYS, self.dma)
        limits = HardwareLimits.from_config(config)
        self.model = RegisterModel(CommandExecutor(memory, limits, PerfModel.from_config(config)), identity_words(
            limits, cols=config.cols, engines=config.engines, beat_bytes=config.port_bits // 8,
            clock_mhz=config.clock_mhz, config_hash=config.config_hash), storage=words)
        self.words = words
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _uio(self, name, uname):
        d = self.sys / "class" / "uio" / name
        (d / "maps" / "map0").mkdir(parents=True)
        (d / "name").write_text(uname + "\n")
        (d / "maps" / "map0" / "size").write_text("0x00001000\n")
        (d / "maps" / "map0" / "addr").write_text(f"0x{REG_BASE:016x}\n")

    @property
    def paths(self) -> Kv260Paths:
        return Kv260Paths(self.sys, self.dev)

    def _drain(self):
        for name, fd in self.sync_fds:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            for tok in data.decode().split("0x")[1:]:
                v = int(tok, 16)
                low = v & 0xFFFFFFFF
                self.events.append(("sync", name, (low >> 2) & 3, v >> 32, low & 0xFFFFFFF0, low & 1))

    def _loop(self):
        ctrl = 0x40 // 4
        while not self._stop.is_set():
            self._drain()
            value = int(self.words[ctrl])
            if value & 1 and self.respond:
                self._drain()                     # every sync written before the start
                base = int(self.words[0x50 // 4]) | (int(self.words[0x54 // 4]) << 32)
                self.events.append(("run", base, int(self.words[0x58 // 4])))
                self.model.ctrl(value)
                if self.irq_fd is not None:
                    os.write(self.irq_fd, np.uint32(self.model.irq_count).tobytes())
            else:
                time.sleep(20e-6)

    def close(self):
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2)
        self._drain()
        for _, fd in self.sync_fds:
            os.close(fd)
        if self.irq_fd is not None:
            os.close(self.irq_fd)


@pytest.fixture
def board_factory(tmp_path):
    boards = []

    def make(config=None, **kw):
        b = FakeBoard(tmp_path / f"board{len(boards)}", config or preset("kv260"), **kw)
        boards.append(b)
        return b
    yield make
    for b in boards:
        b.close()


def _args(board, **kw):
    base = dict(kv260_access="uio", uio="kriallm", mem_base=None, udmabuf="udmabuf0", irq=False,
                udmabuf_sync="combined", sysfs_root=str(board.sys), dev_root=str(board.dev), timeout=2.0,
                fuse=True, manifest=None, app=None, bitstream=None, split="hybrid")
    kw = {k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}
    return types.SimpleNamespace(**{**base, **kw})


def _golden_reference(kq, prompt, n):
    ref = open_model(kq, "golden", progress=False)
    return generate(ref, prompt, n, Sampler(SamplingParams()), keep_logits=True)


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]     # 10 tokens: one full 8-lane chunk and a remainder


@pytest.mark.parametrize("access", ["uio", "devmem", "uio-irq"])
def test_generate_through_kv260_matches_golden(tiny_kq, board_factory, access):
    board = board_factory(devmem=access == "devmem", irq=access == "uio-irq")
    args = _args(board, kv260_access="devmem" if access == "devmem" else "uio",
                 mem_base=REG_BASE if access == "devmem" else None)
    if access == "uio-irq":
        dev = Kv260Device(uio="kriallm", irq=True, irq_uio="kriallm-irq", paths=board.paths)
        model = open_accelerated(tiny_kq, "kv260", args, device=dev)
    else:
        model = open_accelerated(tiny_kq, "kv260", args)
    try:
        got = generate(model, PROMPT, 6, Sampler(SamplingParams()), keep_logits=True)
    finally:
        model.dev.close()
    ref = _golden_reference(tiny_kq, PROMPT, 6)
    assert got.new_ids == ref.new_ids
    assert all(np.array_equal(a, b) for a, b in zip(got.logits, ref.logits))
    assert model.timings[1].accel_s > 0 and "measured" in model._accel_kind


def test_cache_maintenance_around_every_dma(tiny_kq, board_factory):
    board = board_factory()
    model = open_accelerated(tiny_kq, "kv260", _args(board))
    generate(model, PROMPT, 3, Sampler(SamplingParams()))
    model.dev.close()
    board.close()
    ev = board.events
    runs = [i for i, e in enumerate(ev) if e[0] == "run"]
    assert len(runs) > 20
    dma = board.dma

    def covered(events, target, direction, lo, hi):
        return any(e[1] == target and e[2] == direction and e[3] <= lo - PHYS and hi - PHYS <= e[3] + e[4]
                   for e in events if e[0] == "sync")

    g = board.config.group_size
    for j, i in enumerate(runs):
        _, base, count = ev[i]
        before = ev[(runs[j - 1] + 1 if j else 0):i]
        after = ev[i + 1:(runs[j + 1] if j + 1 < len(runs) else len(ev))]
        # the descriptors and the weights/biases were flushed at some point before the run
        assert covered(ev[:i], "sync_for_device", DMA_TO_DEVICE, base, base + count * DESCRIPTOR_BYTES)
        for c in range(count):
            off = base + c * DESCRIPTOR_BYTES - PHYS
            cmd = unpack_command(dma[off:off + DESCRIPTOR_BYTES].tobytes())
            a = activation_layout(cmd.k, g, cmd.tokens)
            o = output_layout(cmd.n, cmd.tokens, cmd.tile_rows)
            assert covered(ev[:i], "sync_for_device", DMA_TO_DEVICE, cmd.weight_addr, cmd.weight_addr + 64)
            # the activations were flushed since the previous run, the outputs invalidated after this one
            assert covered(before, "sync_for_device", DMA_TO_DEVICE, cmd.act_addr, cmd.act_addr + a.total_bytes)
            assert covered(after, "sync_for_cpu", DMA_FROM_DEVICE, cmd.out_addr, cmd.out_addr + o.total_bytes)
    # every sync is a well-formed combined word: direction matches the file, size a multiple of 16
    for e in ev:
        if e[0] == "sync":
            assert e[5] == 1 and e[4] % 16 == 0 and e[2] == (1 if e[1] == "sync_for_device" else 2)


def test_timeout_is_one_clear_error(tiny_kq, board_factory):
    board = board_factory(respond=False)
    args = _args(board, timeout=0.3)
    model = open_accelerated(tiny_kq, "kv260", args)
    t0 = time.perf_counter()
    with pytest.raises(DeviceError) as e:
        model.forward([1], model.new_cache())
    took = time.perf_counter() - t0
    model.dev.close()
    assert 0.3 <= took < 1.5
    msg = str(e.value)
    assert "did not finish" in msg and "within 0.3 s" in msg and "\n" not in msg


def test_missing_device_is_one_clear_error(tmp_path, board_factory):
    empty = tmp_path / "empty"
    (empty / "sys").mkdir(parents=True)
    (empty / "dev").mkdir()
    ns = types.SimpleNamespace(kv260_access="uio", sysfs_root=str(empty / "sys"), dev_root=str(empty / "dev"))
    with pytest.raises(DeviceError, match=r"no UIO device named 'kriallm' under .*no UIO devices at all"):
        open_device("kv260", ns)
    board = board_factory(with_udmabuf=False)
    with pytest.raises(DeviceError, match=r"no u-dma-buf device 'udmabuf0' .*modprobe u-dma-buf"):
        open_device("kv260", _args(board))
    with pytest.raises(DeviceError, match=r"no u-dma-buf device 'udmabuf-kriallm' or 'udmabuf0'"):
        open_device("kv260", _args(board, udmabuf=None))
    with pytest.raises(DeviceError, match=r"does not exist"):
        open_device("kv260", _args(board, kv260_access="devmem", mem_base=REG_BASE))
    with pytest.raises(DeviceError, match="needs --mem-base"):
        open_device("kv260", _args(board, kv260_access="devmem"))


def test_manifest_and_model_mismatch_are_one_clear_error(tiny_kq, board_factory, tmp_path):
    board = board_factory()
    other = preset("kv260").replace(tokens=4)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"config": other.to_dict(), "config_hash": other.config_hash}))
    with pytest.raises(DeviceError) as e:
        open_accelerated(tiny_kq, "kv260", _args(board, manifest=manifest))
    msg = str(e.value)
    assert other.config_hash[:12] in msg and preset("kv260").config_hash[:12] in msg and "\n" not in msg
    # the right manifest passes
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"config": preset("kv260").to_dict(), "config_hash": preset("kv260").config_hash}))
    open_accelerated(tiny_kq, "kv260", _args(board, manifest=ok)).dev.close()
    # a design with 16-row tiles cannot run a .kq packed for 32
    board16 = board_factory(preset("kv260").replace(rows=16))
    with pytest.raises(DeviceError, match=r"tiny-int4\.kq was built for tile_rows 32 / group size 64 but the loaded "
                                          r"design is rows 16 / group size 64"):
        open_accelerated(tiny_kq, "kv260", _args(board16))


def test_board_manifest_names_the_devices_and_the_stub_is_refused(tiny_kq, board_factory, tmp_path):
    """A board build manifest (boards/build.py) gives the UIO name, the u-dma-buf device and the CSR base."""
    cfg = preset("kv260")
    boards = {access: board_factory(udmabuf="udmabuf-kriallm", uio_name="kriallm-acc", devmem=access == "devmem")
              for access in ("uio", "devmem")}
    manifest = tmp_path / "build-manifest.json"
    manifest.write_text(json.dumps({
        "config": cfg.to_dict(), "config_hash": cfg.config_hash,
        "board_facts": {"uio_name": "kriallm-acc", "csr": {"base": REG_BASE, "size": 4096},
                        "udmabuf": {"device": "/dev/udmabuf-kriallm", "size": DMA_BYTES}}}))
    for access, board in boards.items():
        args = _args(board, kv260_access=access, uio=None, udmabuf=None, manifest=manifest)
        model = open_accelerated(tiny_kq, "kv260", args)
        assert model.dev.dma.name == "udmabuf-kriallm"
        assert ("0xa0000000" in model.dev.access) == (access == "devmem")
        assert model.forward([1, 2], model.new_cache()).shape == (2, 512)
        model.dev.close()
    board = boards["uio"]
    high = json.loads(manifest.read_text())
    high["board_facts"]["udmabuf"]["must_be_below"] = PHYS + DMA_BYTES // 2
    high_manifest = tmp_path / "high.json"
    high_manifest.write_text(json.dumps(high))
    with pytest.raises(DeviceError, match="HP ports reach only addresses below 0x70200000"):
        open_device("kv260", _args(board, uio=None, udmabuf=None, manifest=high_manifest))
    board.words[0] = int.from_bytes(b"STUB", "little")
    with pytest.raises(DeviceError, match="stand-in stub top"):
        open_accelerated(tiny_kq, "kv260", _args(board, uio=None, udmabuf=None, manifest=manifest))


def test_dma_memory_too_small_is_one_clear_error(tiny_kq, board_factory, monkeypatch):
    board = board_factory()
    dev = open_device("kv260", _args(board))
    dev.capacity = 64 * 1024
    with pytest.raises(DeviceError, match=r"needs .* MiB of DMA memory but the kv260 device has 0.1 MiB"):
        open_accelerated(tiny_kq, "kv260", _args(board), device=dev)


def test_separate_sync_style_writes_offset_size_direction(tiny_kq, tmp_path):
    """Older u-dma-buf: sync_offset, sync_size, sync_direction, then 1 to sync_for_*."""
    root = tmp_path / "b"
    u = root / "sys" / "class" / "udmabuf" / "udmabuf0"      # the pre-3.0 class name
    u.mkdir(parents=True)
    (root / "dev").mkdir()
    (u / "phys_addr").write_text("1e900000\n")
    (u / "size").write_text("1048576\n")
    for n in ("sync_for_device", "sync_for_cpu", "sync_offset", "sync_size", "sync_direction"):
        (u / n).write_text("")
    with open(root / "dev" / "udmabuf0", "wb") as f:
        f.truncate(1 << 20)
    uio = root / "sys" / "class" / "uio" / "uio0"
    uio.mkdir(parents=True)
    (uio / "name").write_text("kriallm\n")
    (root / "dev" / "uio0").write_bytes(bytes(4096))
    dev = Kv260Device(paths=Kv260Paths(root / "sys", root / "dev"), sync_style="separate")
    assert dev.dma.phys == 0x1E900000 and dev.capacity == 1 << 20
    buf = dev.alloc(1000, "x")
    assert buf.phys % 64 == 0
    buf.sync_for_device(0, 100)
    buf.sync_for_cpu(64, 10)
    dev.close()
    # regular files stand in for the attributes here: each holds every write, appended in order
    assert (u / "sync_offset").read_text() == "064"
    assert (u / "sync_size").read_text() == "12864"
    assert (u / "sync_direction").read_text() == "12"
    assert (u / "sync_for_device").read_text() == "1" and (u / "sync_for_cpu").read_text() == "1"


def test_pynq_access_with_a_stand_in_pynq(tiny_kq, board_factory, monkeypatch):
    """PYNQ path: MMIO for registers, allocate() buffers with flush/invalidate (stand-in module)."""
    board = board_factory()
    log = []

    class FakeBuffer(np.ndarray):
        def flush(self):
            log.append(("flush", self.physical_address))

        def invalidate(self):
            log.append(("invalidate", self.physical_address))

        def freebuffer(self):
            pass

    state = {"next": 0}

    def allocate(shape, dtype):
        n = int(np.prod(shape))
        off = state["next"]
        state["next"] = off + -(-n // 4096) * 4096
        b = board.dma[off:off + n].view(FakeBuffer)
        b.physical_address = PHYS + off
        return b

    class MMIO:
        def __init__(self, base, length):
            assert base == REG_BASE
            self.array = board.words

        def read(self, off):
            return int(self.array[off >> 2])

        def write(self, off, value):
            self.array[off >> 2] = value

    fake = types.ModuleType("pynq")
    fake.allocate, fake.MMIO = allocate, MMIO
    monkeypatch.setitem(sys.modules, "pynq", fake)
    model = open_accelerated(tiny_kq, "kv260", _args(board, kv260_access="auto", mem_base=REG_BASE))
    assert isinstance(model.dev, PynqDevice)
    got = generate(model, PROMPT[:3], 4, Sampler(SamplingParams()))
    assert got.new_ids == _golden_reference(tiny_kq, PROMPT[:3], 4).new_ids
    assert ("flush", model.linears["lm_head"].act.phys) in log
    assert ("invalidate", model.linears["lm_head"].out.phys) in log


def test_driver_imports_without_amaranth_or_cocotb():
    code = ("import sys; sys.modules['amaranth'] = None; sys.modules['cocotb'] = None\n"
            "import sw.driver, sw.driver.runner, sw.driver.kv260, sw.driver.golden_device, sw.driver.device\n"
            "from sw.driver import open_device; open_device('golden')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize("file, garbage, words", [
    ("class/u-dma-buf/udmabuf0/phys_addr", "not-an-address\n", "physical address as a number"),
    ("class/u-dma-buf/udmabuf0/size", "lots\n", "buffer size as a number"),
    ("class/u-dma-buf/udmabuf0/size", "0\n", "size 0"),
    ("class/uio/uio0/maps/map0/size", "4k\n", "UIO map size as a number"),
    ("class/uio/uio0/maps/map0/size", b"\xff\xfe\x00", "binary garbage"),
])
def test_garbage_in_sysfs_is_one_sentence(board_factory, file, garbage, words):
    board = board_factory()
    target = board.sys / file
    target.write_bytes(garbage) if isinstance(garbage, bytes) else target.write_text(garbage)
    with pytest.raises(DeviceError, match=words) as e:
        open_device("kv260", _args(board)).close()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("facts, words", [
    ("garbage", "board_facts must be a JSON object"),
    ({"uio_name": 7}, "board_facts.uio_name must be a str"),
    ({"udmabuf": {"device": 3}}, "board_facts.udmabuf.device must be a str"),
    ({"udmabuf": {"must_be_below": "high"}}, "board_facts.udmabuf.must_be_below must be a non-negative integer"),
    ({"csr": {"base": -1}}, "board_facts.csr.base must be a non-negative integer"),
    ({"csr": []}, "board_facts.csr must be a dict"),
])
def test_garbage_in_the_manifests_board_facts_is_one_sentence(board_factory, tmp_path, facts, words):
    board = board_factory()
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"board_facts": facts}))
    with pytest.raises(DeviceError, match=words):
        open_device("kv260", _args(board, manifest=manifest)).close()


def test_app_without_a_manifest_is_refused_unless_asked(tiny_kq, board_factory, tmp_path, capsys):
    """--app NAME with no manifest.json beside the app used to run with no config-hash check, silently."""
    board = board_factory()
    firmware = tmp_path / "firmware"
    (firmware / "kriallm-kv260").mkdir(parents=True)
    args = _args(board, app="kriallm-kv260", firmware_root=str(firmware), manifest_check=True)
    with pytest.raises(DeviceError, match="config hash cannot be checked.*--no-manifest-check") as e:
        open_accelerated(tiny_kq, "kv260", args)
    assert "\n" not in str(e.value)
    args.manifest_check = False
    open_accelerated(tiny_kq, "kv260", args).close()
    assert "config hash was not checked" in capsys.readouterr().err
    # with the app's manifest in place it is read and checked: a wrong hash is refused
    other = preset("kv260").replace(tokens=4)
    (firmware / "kriallm-kv260" / "manifest.json").write_text(
        json.dumps({"config": other.to_dict(), "config_hash": other.config_hash}))
    args.manifest_check = True
    with pytest.raises(DeviceError, match=other.config_hash[:12]):
        open_accelerated(tiny_kq, "kv260", args)
