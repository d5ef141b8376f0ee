"""The host driver's `sim` backend: sw/driver on the accelerator RTL in Verilator.

    kriallm generate MODEL.kq --device sim [--hw-config kv260]
    dev = open_sim_device(args)          # sw.driver.open_device("sim", args) finds it through the kriallm.devices entry point

`SimDevice` implements sw.driver.device.Device on the simulation top of
sim/top_tb.py (rtl.top.Accelerator, from rtl.top.build_top like every flow's top, with
every HP port on the Verilog DDR model, one Verilator build per config, shared
with the tests and the bench):

* the simulator runs in a background thread of the host process (cocotb's
  runner), its cocotb test `sim_device_server` (below) serving requests over a
  Unix socket: register reads and writes go through cocotbext-axi's
  AxiLiteMaster on the ``csr`` port, so the driver exercises the real
  AXI4-Lite slave and CSR bank;
* DMA buffers live in the DDR model's memory. `alloc` hands out addresses of
  the model; ``sync_for_device`` loads the range into the model ($readmemh
  image), ``sync_for_cpu`` dumps it back, exactly where the board needs its
  cache maintenance, so a driver that forgets one computes wrong results here;
* between requests the simulation stands still; `wait` lets it run free
  (no Python per cycle) until the irq line rises, for at most ``timeout_s``
  seconds of *modeled* time at the design's clock. Cycle counts (BUSY_CYCLES)
  are the RTL's: ``cycles_kind = "modeled (RTL simulation)"``, with the DDR
  model's assumptions in `describe`.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from sw.contract.commands import ALIGN
from sw.driver.device import DMA_TO_DEVICE, Buffer, Device, RegionAllocator, hardware_config
from sw.contract.errors import DeviceError

__all__ = ["SimDevice", "SimBuffer", "open_sim_device"]

PERIOD_NS = 4
_ENV_SOCKET = "KRIALLM_SIM_DEVICE_SOCKET"
_ENV_KEY = "KRIALLM_SIM_DEVICE_KEY"
_ENV_DDR = "KRIALLM_SIM_DEVICE_DDR"
_START_TIMEOUT_S = 1800         # a cold Verilator build of the kv260 top takes a few minutes


class SimBuffer(Buffer):
    def __init__(self, device: "SimDevice", phys: int, array: np.ndarray, name: str):
        super().__init__(phys, array, name)
        self._device = device

    def _sync(self, direction: int, offset: int, size: int) -> None:
        size = min(size, self.nbytes - offset)
        if size <= 0:
            return
        t0 = time.perf_counter()
        try:
            if direction == DMA_TO_DEVICE:
                self._device._load(self.phys + offset, self.array[offset:offset + size])
            else:
                self.array[offset:offset + size] = np.frombuffer(self._device._dump(self.phys + offset, size),
                                                                 np.uint8)
        finally:
            # Moving the buffer through $readmemh/$writememh costs the simulator, not the host: the
            # driver leaves it out of the host time (on the board a sync is a cache flush, host time).
            self._device.sim_io_wall_s += time.perf_counter() - t0


class SimDevice(Device):
    """The accelerator RTL in Verilator behind the Device interface. See the module docstring."""

    name = "sim"
    cycles_kind = "modeled (RTL simulation)"

    def __init__(self, config=None, *, ddr=None, workdir: str | Path | None = None):
        super().__init__()
        from multiprocessing.connection import Listener

        from .top_tb import SIM_DDR, build_sim_top

        self.config = hardware_config(config or "kv260")
        self.ddr = (ddr or SIM_DDR).replace(ports=self.config.engines)
        self.build = build_sim_top(self.config, self.ddr)
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kriallm-sim-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.memory_map = RegionAllocator(self.ddr.mem_base + 0x1000, self.ddr.mem_base + self.ddr.mem_bytes,
                                          full_hint=f" in the DDR model's {self.ddr.mem_bytes >> 20} MiB")
        self.capacity = self.memory_map.end - self.memory_map.base  # the driver checks a model's DMA need
        self.sim_io_wall_s = 0.0                   # simulator I/O: buffer syncs and register accesses
        self._files = 0
        self._cycle_budget = 0
        key = secrets.token_bytes(16)
        sock = self.workdir / "device.sock"
        if sock.exists():
            sock.unlink()
        self._listener = Listener(str(sock), family="AF_UNIX", authkey=key)
        self._error: BaseException | None = None
        env = {_ENV_SOCKET: str(sock), _ENV_KEY: key.hex(), _ENV_DDR: self.ddr.to_json()}
        self._thread = threading.Thread(target=self._simulate, args=(env,), name="kriallm-sim", daemon=True)
        self._thread.start()
        self._conn = self._accept()

    # ---- the simulator thread ----------------------------------------------------
    def _simulate(self, env: dict) -> None:
        from .axi_tops import _build_lock
        from .top_tb import REPO, _run_lean
        env = dict(env, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        try:
            with _build_lock(self.build.build_name):
                _run_lean(self.build, "sim.device", env)
        except BaseException as e:      # reported by the host side
            self._error = e

    def _accept(self):
        sock = self._listener._listener._socket     # accept with a deadline, so a failed start cannot hang
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            sock.settimeout(1.0)
            try:
                return self._listener.accept()
            except (TimeoutError, OSError):
                if not self._thread.is_alive():
                    raise DeviceError(f"the RTL simulation did not start: {self._error or 'it exited'}") from None
                if time.monotonic() > deadline:
                    raise DeviceError(f"the RTL simulation did not connect within {_START_TIMEOUT_S} s") from None

    def _call(self, *req):
        if self._conn is None:
            raise DeviceError("the sim device is closed")
        try:
            self._conn.send(req)
            ok, value = self._conn.recv()
        except (EOFError, OSError) as e:
            raise DeviceError(f"the RTL simulation went away ({self._error or e})") from None
        if not ok:
            raise DeviceError(f"the RTL simulation failed a {req[0]} request: {value}")
        return value

    # ---- Device primitives ----------------------------------------------------------
    def _timed(self, *req):
        """A request to the simulator. Outside a run's start..wait window its wall time is simulator
        I/O (an AXI4-Lite transaction in the simulation, a microsecond of MMIO on the board), which
        the driver leaves out of the host time; inside the window it is already device time."""
        if self._run is not None:
            return self._call(*req)
        t0 = time.perf_counter()
        try:
            return self._call(*req)
        finally:
            self.sim_io_wall_s += time.perf_counter() - t0

    def _read32(self, offset: int) -> int:
        return self._timed("read", offset)

    def _write32(self, offset: int, value: int) -> None:
        self._timed("write", offset, value)

    @property
    def uses_irq(self) -> bool:
        return True

    def wait(self, timeout_s: float = 2.0):
        """As Device.wait, with `timeout_s` in modeled seconds at the design's clock."""
        self._cycle_budget = int(timeout_s * self.config.clock_mhz * 1e6) + 1000
        return super().wait(timeout_s)

    def _poll_done(self, deadline: float) -> int:
        return self._call("wait_done", self._cycle_budget or 10_000_000)

    def alloc(self, nbytes: int, name: str = "", align: int = ALIGN) -> Buffer:
        phys, _ = self.memory_map.take(nbytes, name, align)
        return SimBuffer(self, phys, np.zeros(nbytes, np.uint8), name)

    def _load(self, addr: int, data: np.ndarray) -> None:
        from .ddr import write_image
        self._files += 1
        path = write_image(self.workdir / f"load-{self._files % 4}.hex", [(addr, np.ascontiguousarray(data))],
                           self.ddr)
        self._call("load", str(path))

    def _dump(self, addr: int, nbytes: int) -> bytes:
        self._files += 1
        return self._call("dump", str(self.workdir / f"dump-{self._files % 4}.hex"), addr, nbytes)

    def describe(self) -> dict:
        return {"backend": self.name, "accelerator_time": self.cycles_kind,
                "rtl": "rtl.top.Accelerator in Verilator (sim/top_tb.py)", "config_hash": self.config.config_hash,
                "clock_mhz": self.config.clock_mhz, "ddr_model": self.ddr.describe(),
                "ddr_model_text": self.ddr.describe_text()}

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(("close",))
                self._conn.recv()
            except (EOFError, OSError):
                pass
            self._conn.close()
            self._conn = None
        self._thread.join(timeout=60)
        self._listener.close()


MIN_MEM_BYTES = 64 << 20
MAX_MEM_BYTES = 1 << 30          # the DDR model's ceiling (sim/ddr.py)


def memory_for_model(path, config=None) -> int:
    """DDR-model memory for a .kq: its device tensors plus 10 % and 16 MiB for activations, outputs
    and command lists, rounded up to a power of two (at least 64 MiB). The hybrid split keeps the
    linears (and LM head) on the device; a design with the fabric decoder (``config.max_context``
    > 0) also the embedding table and norms, and a KV cache and RoPE table of max_context
    positions. The full-size Qwen2.5-0.5B (266 MB of INT4 weights) gets 512 MiB on kv260 and
    1 GiB on kv260-fabric (its bf16 embedding table is another 272 MB); tiny 64 MiB."""
    from sw.contract.errors import KriaError
    from sw.contract.fabric_commands import kv_cache_layout
    from sw.kq import KqFile
    need = 0
    fabric = getattr(config, "max_context", 0)
    if path is not None and Path(path).is_file():
        try:
            header = KqFile(path, verify=False).header
            need = sum(t["nbytes"] for t in header["tensors"] if fabric or t["role"] == "linear")
            if fabric:
                mc = header["model"]
                hd = mc["hidden_size"] // mc["num_attention_heads"]
                need += mc["num_hidden_layers"] * kv_cache_layout(mc["num_key_value_heads"], hd, fabric).total_bytes
                need += fabric * 4 * hd
        except (KriaError, KeyError, TypeError, ZeroDivisionError):
            need = 0                  # the driver opens the file next and reports what is wrong with it
    need = int(need * 1.1) + (16 << 20)
    size = MIN_MEM_BYTES
    while size < need:
        size <<= 1
    if size > MAX_MEM_BYTES:
        raise DeviceError(f"{path}: the model needs {need / 2**20:.0f} MiB of device memory; the DDR model "
                          f"holds at most {MAX_MEM_BYTES >> 20} MiB")
    return size


def open_sim_device(args=None) -> SimDevice:
    """sw.driver.open_device("sim", args): --hw-config (a preset or a config/manifest file; default kv260).
    The DDR model's memory is sized for args.model (a .kq) when there is one."""
    from .top_tb import SIM_DDR
    spec = getattr(args, "hw_config", None) if args is not None else None
    config = hardware_config(spec or "kv260")
    mem = memory_for_model(getattr(args, "model", None) if args is not None else None, config)
    return SimDevice(config, ddr=SIM_DDR.replace(mem_bytes=mem))


# ---------------------------------------------------------------------------
# The simulator side: a cocotb test that serves the host's requests
# ---------------------------------------------------------------------------

try:
    import cocotb
except ImportError:            # the board install: the module still imports (the host side needs no cocotb)
    cocotb = None

if cocotb is not None:
    @cocotb.test()
    async def sim_device_server(dut):
        """Serve register accesses, memory loads/dumps and waits for the host until it closes."""
        from multiprocessing.connection import Client

        from cocotb.clock import Clock
        from cocotb.triggers import ClockCycles, ReadOnly, RisingEdge, SimTimeoutError, with_timeout

        from sim.ddr import DdrModelConfig, DdrModelHandle
        from sim.tb_csr import CsrPort
        from sw.contract.commands import Reg

        cfg = DdrModelConfig.from_json(os.environ[_ENV_DDR])
        conn = Client(os.environ[_ENV_SOCKET], family="AF_UNIX", authkey=bytes.fromhex(os.environ[_ENV_KEY]))
        Clock(dut.clk, PERIOD_NS, unit="ns").start()
        if hasattr(dut, "use_ext"):
            dut.use_ext.value = 0
        csr = CsrPort(dut)
        ddr = DdrModelHandle(dut.ddr, cfg, clock=dut.clk)
        dut.rst.value = 1
        await ClockCycles(dut.clk, 4)
        ddr.configure()
        dut.rst.value = 0
        await ClockCycles(dut.clk, 4)
        while True:
            op, *a = conn.recv()       # the simulation stands still while the host thinks
            try:
                if op == "read":
                    conn.send((True, await csr.read(a[0])))
                elif op == "write":
                    await csr.write(a[0], a[1])
                    conn.send((True, None))
                elif op == "load":
                    await ddr.load(Path(a[0]))
                    conn.send((True, None))
                elif op == "dump":
                    conn.send((True, await ddr.dump(Path(a[0]), a[1], a[2])))
                elif op == "wait_done":
                    # Free-running until the irq line rises (or the modeled time budget is spent).
                    await ReadOnly()
                    if not int(dut.irq.value):
                        try:
                            await with_timeout(RisingEdge(dut.irq), int(a[0]) * PERIOD_NS, "ns")
                        except SimTimeoutError:
                            conn.send((True, -1))
                            continue
                    await RisingEdge(dut.clk)
                    conn.send((True, await csr.read(Reg.STATUS)))
                elif op == "close":
                    conn.send((True, None))
                    break
                else:
                    conn.send((False, f"unknown request {op!r}"))
            except Exception as e:     # noqa: BLE001 - the host gets the message, the server keeps going
                conn.send((False, f"{type(e).__name__}: {e}"))
        conn.close()
