"""The Python side of sim/hdl/hp_ddr_model.v: configuration, assumptions, memory images.

`DdrModelConfig` holds every number the model uses. Build-time numbers become
Verilog parameters (`verilog_parameters`); run-time numbers are written into
the model's ``cfg_*`` registers by `DdrModelHandle.configure` from a cocotb
test, so one Verilator build serves many configurations. `describe()` gives
the assumptions as a dict (JSON-ready) and `describe_text()` as lines; every
modelled number a report prints must carry them.

Memory images use ``$readmemh``'s format: one little-endian word per line,
printed most significant byte first, with ``@<word index>`` lines to skip.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from sw.contract.errors import ConfigError, DeviceError

REPO = Path(__file__).resolve().parent.parent
MODEL_SOURCE = REPO / "sim" / "hdl" / "hp_ddr_model.v"

# Sources of the default numbers, printed with every modelled figure.
ASSUMPTIONS = {
    "cap_bytes_per_cycle": "aggregate PL->DDR rate measured publicly on the KV260: about 16 GB/s with four "
                           "128-bit HP ports at 250 MHz (shared/DESIGN.md); 64 B/cycle at 250 MHz",
    "read_latency": "assumed 30 cycles (120 ns at 250 MHz) from AR handshake to first R beat; "
                    "not measured on the board",
    "write_latency": "assumed 30 cycles from the last W beat to B",
    "outstanding": "UG1085: the HP ports' AFI FIFO interface accepts 8 read and 8 write commands",
    "max_burst": "the PS converts AXI4 to AXI3 behind the HP ports: at most 16 beats per burst",
    "shared_hp12": "HP1 and HP2 share one DDR controller port; off by default because the measured 16 GB/s "
                   "was reached with all four ports, on = the pessimistic case where HP1+HP2 together get "
                   "shared_cap_bytes_per_cycle",
    "efficiency": "refresh, page misses and read/write turnaround are not modelled separately: the cap is "
                  "a sustained rate that already includes them",
}


@dataclass(frozen=True)
class DdrModelConfig:
    """Everything hp_ddr_model.v models. Defaults: the KV260 at 250 MHz."""

    ports: int = 4
    data_bits: int = 128
    addr_width: int = 40
    id_width: int = 6
    clock_mhz: float = 250.0
    read_latency: int = 30              # cycles, AR handshake -> first R beat
    write_latency: int = 30             # cycles, last W beat -> B
    outstanding: int = 8                # bursts per port and direction
    max_outstanding: int = 16           # build-time ceiling of `outstanding` (queue depth)
    max_burst: int = 16
    cap_bytes_per_cycle: float = 64.0   # all ports, reads + writes
    shared_hp12: bool = False
    shared_cap_bytes_per_cycle: float = 16.0
    mem_bytes: int = 64 << 20
    mem_base: int = 0
    gap_rate: float = 0.0               # probability of a back-pressure gap per channel and cycle
    gap_ports: int = 0xFF               # bit p: port p gets the gaps
    seed: int = 1
    slverr_window: tuple[int, int] = (0, 0)   # [lo, hi) byte addresses; empty = off
    decerr_window: tuple[int, int] = (0, 0)

    # -- checks and derived numbers ------------------------------------------
    def validate(self) -> "DdrModelConfig":
        if not 1 <= self.ports <= 8:
            raise ConfigError(f"DDR model ports must be 1..8, not {self.ports}")
        if self.data_bits not in (32, 64, 128, 256, 512):
            raise ConfigError(f"DDR model data width must be 32..512 bits, not {self.data_bits}")
        if self.mem_bytes & (self.mem_bytes - 1) or self.mem_bytes < self.beat_bytes * 16:
            raise ConfigError(f"DDR model memory size must be a power of two, not {self.mem_bytes}")
        if self.mem_bytes > 1 << 30:
            raise ConfigError("DDR model memory above 1 GiB does not fit a dense Verilator array")
        if self.mem_base % self.mem_bytes:
            raise ConfigError("DDR model base address must be aligned to its size")
        if not 1 <= self.outstanding <= self.max_outstanding:
            raise ConfigError(f"outstanding ({self.outstanding}) must be 1..max_outstanding ({self.max_outstanding})")
        if self.cap_q < 1 or self.shared_cap_q < 1:
            raise ConfigError("bandwidth caps must be at least 1/16 byte per cycle")
        if not 0.0 <= self.gap_rate < 1.0:
            raise ConfigError(f"gap_rate must be in [0, 1), not {self.gap_rate}")
        if self.read_latency < 1 or self.write_latency < 0:
            raise ConfigError("latencies must be positive")
        for name in ("slverr_window", "decerr_window"):
            lo, hi = getattr(self, name)
            if hi < lo:
                raise ConfigError(f"{name} is [lo, hi) with hi >= lo")
        return self

    @property
    def beat_bytes(self) -> int:
        return self.data_bits // 8

    @property
    def mem_words_log2(self) -> int:
        return (self.mem_bytes // self.beat_bytes).bit_length() - 1

    @property
    def cap_q(self) -> int:
        """The cap in the model's unit, sixteenths of a byte per cycle."""
        return int(round(self.cap_bytes_per_cycle * 16))

    @property
    def shared_cap_q(self) -> int:
        return int(round(self.shared_cap_bytes_per_cycle * 16))

    @property
    def gap_q(self) -> int:
        return int(round(self.gap_rate * 256))

    @property
    def cap_gbytes_per_second(self) -> float:
        return self.cap_q / 16 * self.clock_mhz * 1e6 / 1e9

    @property
    def port_peak_bytes_per_cycle(self) -> int:
        return self.beat_bytes

    @property
    def peak_bytes_per_cycle(self) -> float:
        """The best any run can do: min(cap, ports x beat [, HP1+HP2 shared])."""
        ports = self.ports * self.beat_bytes
        if self.shared_hp12 and self.ports >= 3:
            ports = (self.ports - 2) * self.beat_bytes + min(2 * self.beat_bytes, self.shared_cap_q / 16)
        return min(self.cap_q / 16, ports)

    def latency_bound_bytes_per_cycle(self, burst_beats: int | None = None) -> float:
        """One port's rate when `outstanding` bursts must cover the read latency (Little's law)."""
        n = burst_beats or self.max_burst
        return min(self.beat_bytes, self.outstanding * n * self.beat_bytes / (self.read_latency + n))

    # -- Verilog -------------------------------------------------------------
    def verilog_parameters(self) -> dict[str, int]:
        """Build-time parameters plus the run-time registers' reset defaults."""
        self.validate()
        return {
            "PORTS": self.ports, "DATA_W": self.data_bits, "ADDR_W": self.addr_width, "ID_W": self.id_width,
            "MEM_WORDS_LOG2": self.mem_words_log2, "MEM_BASE": self.mem_base, "QDEPTH": self.max_outstanding,
            "MAX_BURST": self.max_burst, "LATENCY": self.read_latency, "WRITE_LATENCY": self.write_latency,
            "OUTSTANDING": self.outstanding, "CAP_Q": self.cap_q, "SHARED_HP12": int(self.shared_hp12),
            "SHARED_CAP_Q": self.shared_cap_q, "GAP": self.gap_q, "SEED": self.seed,
        }

    BUILD_FIELDS = ("ports", "data_bits", "addr_width", "id_width", "mem_bytes", "mem_base",
                    "max_outstanding", "max_burst")

    @property
    def build_key(self) -> str:
        """A short name for the build-time parameters (one Verilator build per key)."""
        return (f"p{self.ports}-d{self.data_bits}-a{self.addr_width}-m{self.mem_words_log2}"
                f"-q{self.max_outstanding}-b{self.max_burst}" + (f"-base{self.mem_base:x}" if self.mem_base else ""))

    def runtime_registers(self) -> dict[str, int]:
        """``cfg_*`` register values (what `DdrModelHandle.configure` writes)."""
        self.validate()
        return {
            "cfg_latency": self.read_latency, "cfg_wlatency": self.write_latency,
            "cfg_outstanding": self.outstanding, "cfg_cap_q": self.cap_q, "cfg_bucket_q": 0,
            "cfg_shared": int(self.shared_hp12), "cfg_shared_cap_q": self.shared_cap_q,
            "cfg_gap": self.gap_q, "cfg_gap_ports": self.gap_ports, "cfg_seed": self.seed,
            "cfg_slverr_lo": self.slverr_window[0], "cfg_slverr_hi": self.slverr_window[1],
            "cfg_decerr_lo": self.decerr_window[0], "cfg_decerr_hi": self.decerr_window[1],
        }

    # -- reports -------------------------------------------------------------
    def describe(self) -> dict:
        """The modelled numbers and where they come from (print beside every modelled result)."""
        return {
            "model": "hp_ddr_model (modeled, not measured)",
            "ports": self.ports,
            "port_width_bits": self.data_bits,
            "clock_mhz": self.clock_mhz,
            "read_latency_cycles": self.read_latency,
            "read_latency_ns": round(self.read_latency * 1e3 / self.clock_mhz, 1),
            "write_latency_cycles": self.write_latency,
            "outstanding_per_port": self.outstanding,
            "max_burst_beats": self.max_burst,
            "cap_bytes_per_cycle": self.cap_q / 16,
            "cap_gbytes_per_second": round(self.cap_gbytes_per_second, 3),
            "port_peak_gbytes_per_second": round(self.beat_bytes * self.clock_mhz / 1e3, 3),
            "shared_hp12": self.shared_hp12,
            "shared_cap_bytes_per_cycle": self.shared_cap_q / 16 if self.shared_hp12 else None,
            "peak_bytes_per_cycle": self.peak_bytes_per_cycle,
            "back_pressure_gap_rate": self.gap_q / 256,
            "back_pressure_ports": [p for p in range(self.ports) if self.gap_ports >> p & 1] if self.gap_q else [],
            "mem_bytes": self.mem_bytes,
            "mem_base": hex(self.mem_base),
            "sources": dict(ASSUMPTIONS),
        }

    def describe_text(self) -> str:
        d = self.describe()
        shared = (f"HP1+HP2 share {d['shared_cap_bytes_per_cycle']:g} B/cycle" if self.shared_hp12
                  else "HP1/HP2 not limited by their shared DDRC port")
        return (f"modeled DDR: {d['ports']} x {d['port_width_bits']}-bit HP ports at {d['clock_mhz']:g} MHz, "
                f"cap {d['cap_bytes_per_cycle']:g} B/cycle = {d['cap_gbytes_per_second']:g} GB/s, "
                f"read latency {d['read_latency_cycles']} cycles ({d['read_latency_ns']:g} ns), "
                f"{d['outstanding_per_port']} outstanding/port, bursts <= {d['max_burst_beats']} beats, {shared}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DdrModelConfig":
        raw = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ConfigError(f"unknown DDR model field(s): {', '.join(sorted(unknown))}")
        for k in ("slverr_window", "decerr_window"):
            if k in raw:
                raw[k] = tuple(raw[k])
        return cls(**raw).validate()

    def replace(self, **changes) -> "DdrModelConfig":
        return dataclasses.replace(self, **changes).validate()


KV260 = DdrModelConfig()


# ---------------------------------------------------------------------------
# Memory images
# ---------------------------------------------------------------------------

def _as_bytes(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return np.frombuffer(bytes(data), dtype=np.uint8)


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def _image_blocks(regions: Iterable[tuple[int, object]], cfg: DdrModelConfig) -> list[tuple[int, np.ndarray]]:
    """Checked (word index, ASCII block) pairs: the block is the region's words as
    $readmemh lines (2 x beat_bytes hex digits, most significant byte first, then a newline)."""
    bb = cfg.beat_bytes
    blocks, spans = [], []
    for addr, data in regions:
        raw = _as_bytes(data)
        if addr % bb:
            raise ConfigError(f"image region at {addr:#x} is not aligned to the {bb}-byte beat")
        if addr < cfg.mem_base or addr + raw.size > cfg.mem_base + cfg.mem_bytes:
            raise ConfigError(f"image region [{addr:#x}, {addr + raw.size:#x}) is outside the modelled memory")
        pad = (-raw.size) % bb
        if pad:
            raw = np.concatenate([raw, np.zeros(pad, np.uint8)])
        spans.append((addr, addr + raw.size))
        words = raw.reshape(-1, bb)[:, ::-1]            # most significant byte first
        text = np.empty((words.shape[0], 2 * bb + 1), np.uint8)
        text[:, 0:2 * bb:2] = _HEX[words >> 4]
        text[:, 1:2 * bb:2] = _HEX[words & 15]
        text[:, -1] = ord("\n")
        blocks.append(((addr - cfg.mem_base) // bb, text))
    spans.sort()
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ConfigError(f"image regions overlap at {b0:#x}")
    return blocks


def image_lines(regions: Iterable[tuple[int, object]], cfg: DdrModelConfig = KV260) -> list[str]:
    """$readmemh lines for `regions` of (byte address, bytes or numpy array).

    Addresses must be beat aligned; a region's tail is padded with zeros to a
    whole beat. Regions must not overlap.
    """
    out: list[str] = []
    for word, text in _image_blocks(regions, cfg):
        out.append(f"@{word:x}")
        out.extend(text.tobytes().decode().splitlines())
    return out


def write_image(path: Path, regions: Iterable[tuple[int, object]], cfg: DdrModelConfig = KV260) -> Path:
    """Write a memory image the model loads (``+ddr_init=`` or `DdrModelHandle.load`).
    Vectorised: a full-size model's 266 MB of weights is written in seconds."""
    path = Path(path)
    with open(path, "wb") as f:
        for word, text in _image_blocks(regions, cfg):
            f.write(f"@{word:x}\n".encode())
            f.write(text.tobytes())
    return path


def read_dump(path: Path, nbytes: int | None = None, cfg: DdrModelConfig = KV260) -> bytes:
    """Bytes of a ``$writememh`` dump (words in file order; comments and @ lines skipped)."""
    bb = cfg.beat_bytes
    chunks = []
    for line in Path(path).read_text().splitlines():
        line = line.split("//")[0].strip()
        if not line or line.startswith("@"):
            continue
        for tok in line.split():
            if any(c in tok for c in "xXzZ"):
                tok = "0" * (2 * bb)                     # never written: read as zero
            chunks.append(bytes.fromhex(tok.rjust(2 * bb, "0"))[::-1])
    data = b"".join(chunks)
    return data if nbytes is None else data[:nbytes]


# ---------------------------------------------------------------------------
# cocotb access to a model instance
# ---------------------------------------------------------------------------

def _pack_string(text: str, bits: int = 8 * 512) -> int:
    raw = text.encode()
    if len(raw) * 8 > bits:
        raise ConfigError(f"path too long for the model's {bits // 8}-character file register: {text}")
    return int.from_bytes(raw, "big")


class DdrModelHandle:
    """Drive one hp_ddr_model instance from a cocotb test (``handle = dut.ddr``)."""

    def __init__(self, handle, cfg: DdrModelConfig = KV260, clock=None):
        self.h = handle
        self.cfg = cfg.validate()
        self.clock = clock if clock is not None else handle.clk

    def configure(self, cfg: DdrModelConfig | None = None, **changes) -> DdrModelConfig:
        """Write the run-time registers (takes effect at the next clock edge)."""
        cfg = (cfg or self.cfg).replace(**changes) if changes else (cfg or self.cfg).validate()
        for field in DdrModelConfig.BUILD_FIELDS:
            if getattr(cfg, field) != getattr(self.cfg, field):
                raise ConfigError(f"{field} is fixed when the model is built ({getattr(self.cfg, field)})")
        for name, value in cfg.runtime_registers().items():
            getattr(self.h, name).value = value
        self.cfg = cfg
        return cfg

    async def _request(self, flag: str):
        from cocotb.triggers import RisingEdge, ReadOnly
        getattr(self.h, flag).value = 1
        for _ in range(4):
            await RisingEdge(self.clock)
            await ReadOnly()
            if int(getattr(self.h, flag).value) == 0:
                await RisingEdge(self.clock)
                return
        raise DeviceError(f"hp_ddr_model did not take {flag} (is the clock running?)")

    async def load(self, path: Path) -> None:
        """$readmemh `path` into the model's memory (addresses in the file are word indices)."""
        self.h.ctl_file.value = _pack_string(str(Path(path).resolve()))
        await self._request("ctl_load")

    async def dump(self, path: Path, addr: int, nbytes: int) -> bytes:
        """$writememh the words covering [addr, addr + nbytes) and return those bytes."""
        bb = self.cfg.beat_bytes
        lo = (addr - self.cfg.mem_base) // bb
        hi = (addr - self.cfg.mem_base + nbytes + bb - 1) // bb - 1
        self.h.ctl_file.value = _pack_string(str(Path(path).resolve()))
        self.h.ctl_dump_lo.value = lo
        self.h.ctl_dump_hi.value = hi
        await self._request("ctl_dump")
        data = read_dump(path, cfg=self.cfg)
        off = (addr - self.cfg.mem_base) - lo * bb
        return data[off:off + nbytes]

    async def clear_stats(self) -> None:
        await self._request("ctl_stats_clear")

    def stats(self) -> dict:
        h = self.h
        ports = self.cfg.ports
        rd = [int(h.st_rd_beats[p].value) for p in range(ports)]
        wr = [int(h.st_wr_beats[p].value) for p in range(ports)]
        first, last = int(h.st_first_ar.value), int(h.st_last_r.value)
        return {
            "cycles": int(h.st_cycles.value),
            "bytes_read": int(h.st_rd_bytes.value),
            "bytes_written": int(h.st_wr_bytes.value),
            "read_beats_per_port": rd,
            "write_beats_per_port": wr,
            "first_ar_cycle": None if first == (1 << 64) - 1 else first,
            "last_r_cycle": last,
            "token_starved_cycles": int(h.st_token_starved.value),
            "protocol_errors": int(h.proto_errors.value),
            "error_responses": int(h.resp_errors.value),
        }


# ---------------------------------------------------------------------------
# A stand-alone wrapper (the model's parameters fixed, ports passed through)
# ---------------------------------------------------------------------------

_MODEL_PORTS = [
    # (name, direction, width in terms of P=ports, A=addr, D=data, I=id)
    ("araddr", "input", "A"), ("arlen", "input", "8"), ("arsize", "input", "3"), ("arburst", "input", "2"),
    ("arid", "input", "I"), ("arvalid", "input", "1"), ("arready", "output", "1"),
    ("rdata", "output", "D"), ("rresp", "output", "2"), ("rlast", "output", "1"), ("rid", "output", "I"),
    ("rvalid", "output", "1"), ("rready", "input", "1"),
    ("awaddr", "input", "A"), ("awlen", "input", "8"), ("awsize", "input", "3"), ("awburst", "input", "2"),
    ("awid", "input", "I"), ("awvalid", "input", "1"), ("awready", "output", "1"),
    ("wdata", "input", "D"), ("wstrb", "input", "S"), ("wlast", "input", "1"), ("wvalid", "input", "1"),
    ("wready", "output", "1"),
    ("bresp", "output", "2"), ("bid", "output", "I"), ("bvalid", "output", "1"), ("bready", "input", "1"),
]


def model_port_widths(cfg: DdrModelConfig) -> dict[str, tuple[str, int]]:
    """Per-port width of every AXI member of the model (its vectors are ports x this)."""
    w = {"A": cfg.addr_width, "D": cfg.data_bits, "I": cfg.id_width, "S": cfg.data_bits // 8}
    return {name: (d, w[k] if k in w else int(k)) for name, d, k in _MODEL_PORTS}


def wrapper_verilog(cfg: DdrModelConfig, name: str = "ddr_top") -> str:
    """Verilog for module `name`: the model with `cfg`'s parameters, ports ``s_axi_*`` (instance ``ddr``).

    With one port the wrapper is a plain AXI4 slave that cocotbext-axi binds
    with ``AxiBus.from_prefix(dut, "s_axi")``.
    """
    params = cfg.verilog_parameters()
    widths = model_port_widths(cfg)
    decl = ["    input wire clk,", "    input wire rst,"]
    conns = ["        .clk(clk),", "        .rst(rst),"]
    for port, (direction, width) in widths.items():
        total = width * cfg.ports
        rng = f"[{total - 1}:0] " if total > 1 else ""
        decl.append(f"    {direction} wire {rng}s_axi_{port},")
        conns.append(f"        .s_axi_{port}(s_axi_{port}),")
    decl.append("    output wire [63:0] stat_bytes_read,\n    output wire [63:0] stat_bytes_written,\n"
                "    output wire [63:0] stat_cycles,\n    output wire [31:0] stat_protocol_errors")
    conns.append("        .stat_bytes_read(stat_bytes_read),\n        .stat_bytes_written(stat_bytes_written),\n"
                 "        .stat_cycles(stat_cycles),\n        .stat_protocol_errors(stat_protocol_errors)")
    plist = ",\n".join(f"        .{k}({v if k != 'MEM_BASE' else f'64' + chr(39) + f'h{v:x}'})"
                       for k, v in params.items())
    return (f"// generated by sim/ddr.py: {cfg.describe_text()}\n"
            f"`timescale 1ns/1ps\nmodule {name} (\n" + "\n".join(decl) + "\n);\n"
            f"    hp_ddr_model #(\n{plist}\n    ) ddr (\n" + "\n".join(conns) + "\n    );\nendmodule\n")
