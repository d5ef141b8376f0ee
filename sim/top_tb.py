"""The accelerator in simulation: tops, builds, workloads and the scenario runner (pytest side).

* `SimTop`: `rtl.top.Accelerator`, built by `rtl.top.build_top` as every flow
  builds it, with every HP port on sim/hdl/hp_ddr_model.v (instance ``ddr``);
  only ``csr`` (AXI4-Lite), ``irq`` and ``cycle`` are top ports, so weight
  streaming runs free in Verilator and cocotb only touches the registers. Optionally hp0 can be switched at run time to an external port
  ``ext`` for cocotbext-axi's AxiRam, the third-party check of our AXI behaviour.
* `build_sim_top`: Verilog + Verilator build, once per (config, DDR build
  parameters); every run-time number of the DDR model is set by the scenario,
  so one build serves all tests and the benchmark.
* Workloads: `Workspace` allocates DDR, `random_linear` makes a linear with
  random weights/activations/bias packed exactly as sw.contract.layout/sw.contract.commands say,
  and its expected output buffer from sw.contract.numerics.golden_linear; `golden_run`
  executes the same memory image with sw/driver/golden_device.py's
  CommandExecutor (the command-level spec), so results are checked against both.
* `run_scenario`: writes the scenario JSON, runs sim/tb_top.py in the simulator
  and returns its results (per run: status, counters, per-command cycles, DDR
  model statistics, dumps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sw.contract.config import ArrayConfig
from sw.contract.commands import (ALIGN, HardwareLimits, LinearCommand, activation_layout, linear_command,
                         output_layout, pack_activations, pack_bias, pack_command_list)
from sw.contract.layout import TileLayout, pack_linear
from sw.contract.numerics import center_weights, golden_linear, quantize_activations

from .ddr import MODEL_SOURCE, DdrModelConfig, model_port_widths

REPO = Path(__file__).resolve().parent.parent
SIM_DIR = REPO / "sim"
F32 = np.float32
TOP_NAME = "kriallm_sim_top"

# The DDR model the accelerator tests and the benchmark use: the KV260 defaults
# (4 x 128-bit, 64 B/cycle, latency 30, 8 outstanding) with 64 MiB at address 0.
SIM_DDR = DdrModelConfig(mem_bytes=64 << 20, mem_base=0)


# ---------------------------------------------------------------------------
# Tops
# ---------------------------------------------------------------------------

def sim_top(config: ArrayConfig, ddr: DdrModelConfig = SIM_DDR, *, max_k: int = 4864, external: bool = False,
            **accel):
    """Accelerator + hp_ddr_model with `config.engines` ports.

    With `external`, the top also has a full AXI4 port ``ext`` and an input
    ``use_ext``: while ``use_ext`` is 1, hp0 is switched from the DDR model to
    ``ext`` (for cocotbext-axi's AxiRam), so one build serves both memories.
    """
    from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, Mux, ResetSignal, Signal
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out, connect, flipped

    from rtl.axi import axi4_signature
    from rtl.axilite import AxiLiteSignature
    from rtl.top import build_top
    from sw.contract.commands import HP_ID_BITS
    from sw.contract.commands import CSR_ADDR_WIDTH

    if ddr.ports != config.engines:
        raise ValueError(f"the DDR model needs one port per engine ({config.engines}), has {ddr.ports}")

    class SimTop(wiring.Component):
        def __init__(self):
            self.accel = build_top(config, addr_width=ddr.addr_width, max_k=max_k, **accel)
            members = {
                "csr": In(AxiLiteSignature(addr_width=CSR_ADDR_WIDTH)),
                "irq": Out(1),
                "cycle": Out(64),
            }
            if external:
                members["ext"] = Out(axi4_signature(ddr.addr_width, config.port_bits, HP_ID_BITS))
                members["use_ext"] = In(1)
            super().__init__(members)

        def elaborate(self, platform):
            m = Module()
            m.submodules.accel = accel = self.accel
            connect(m, flipped(self.csr), accel.csr)
            m.d.comb += self.irq.eq(accel.irq)
            m.d.sync += self.cycle.eq(self.cycle + 1)
            ports = [getattr(accel, f"hp{p}") for p in range(ddr.ports)]
            # Manager-driven valid/ready members that must be idle when a port is switched away.
            idle = {"arvalid": 0, "awvalid": 0, "wvalid": 0, "rready": 1, "bready": 1}
            conns = {}
            for name, (direction, width) in model_port_widths(ddr).items():
                if direction == "input":            # manager -> model
                    parts = []
                    for p, hp in enumerate(ports):
                        sig = getattr(hp, name)
                        if external and p == 0:
                            ext = getattr(self.ext, name)
                            m.d.comb += ext.eq(sig if name not in idle else sig & self.use_ext)
                            if name in idle:
                                sig = Mux(self.use_ext, idle[name], sig)
                        parts.append(sig)
                    conns[f"i_s_axi_{name}"] = Cat(*parts)
                else:                                # model -> manager
                    vec = Signal(width * ddr.ports, name=f"ddr_{name}")
                    conns[f"o_s_axi_{name}"] = vec
                    for p, hp in enumerate(ports):
                        part = vec[p * width:(p + 1) * width]
                        if external and p == 0:
                            part = Mux(self.use_ext, getattr(self.ext, name), part)
                        m.d.comb += getattr(hp, name).eq(part)
            params = {f"p_{k}": (Const(v, 64) if k == "MEM_BASE" else v)
                      for k, v in ddr.verilog_parameters().items()}
            m.submodules.ddr = Instance(
                "hp_ddr_model", i_clk=ClockSignal("sync"), i_rst=ResetSignal("sync"), **params, **conns,
                o_stat_bytes_read=Signal(64), o_stat_bytes_written=Signal(64), o_stat_cycles=Signal(64),
                o_stat_protocol_errors=Signal(32))
            return m

    return SimTop()


def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Build:
    sources: tuple[Path, ...]
    build_name: str
    toplevel: str
    config: ArrayConfig
    ddr: DdrModelConfig | None
    seconds: float = 0.0


def build_sim_top(config: ArrayConfig, ddr: DdrModelConfig = SIM_DDR, *, max_k: int = 4864,
                  external: bool = False, **accel) -> Build:
    from amaranth.back import verilog
    from .runner import write_verilog
    t0 = time.perf_counter()
    # One build directory per parameter point; a changed generator regenerates the Verilog (a new
    # file), which Verilator and make pick up incrementally in the same directory.
    key = _digest(config.canonical_json(), ddr.verilog_parameters(), max_k, external, sorted(accel.items()))
    name = f"{TOP_NAME}-{key}"
    top = sim_top(config, ddr, max_k=max_k, external=external, **accel)
    src = write_verilog(verilog.convert(top, name=TOP_NAME), TOP_NAME)
    return Build((MODEL_SOURCE, src), f"{name}-{ddr.build_key}", TOP_NAME, config, ddr,
                 time.perf_counter() - t0)


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

class Workspace:
    """A bump allocator over the modelled DDR; every buffer 64-byte aligned (4 KiB on request)."""

    def __init__(self, base: int = 0x10000, limit: int = SIM_DDR.mem_bytes):
        self.next = base
        self.limit = limit
        self.regions: list[tuple[int, bytes]] = []

    def alloc(self, nbytes: int, align: int = ALIGN) -> int:
        addr = -(-self.next // align) * align
        if addr + nbytes > self.limit:
            raise MemoryError(f"workspace full: {nbytes} bytes at {addr:#x} exceed {self.limit:#x}")
        self.next = addr + max(nbytes, 1)
        return addr

    def put(self, data: bytes, align: int = ALIGN) -> int:
        addr = self.alloc(len(data), align)
        self.regions.append((addr, bytes(data)))
        return addr

    def image(self) -> np.ndarray:
        """The whole workspace as one byte array from address 0 (unwritten bytes 0)."""
        end = max((a + len(d) for a, d in self.regions), default=0)
        mem = np.zeros(end, np.uint8)
        for a, d in self.regions:
            mem[a:a + len(d)] = np.frombuffer(d, np.uint8)
        return mem


@dataclass
class Linear:
    """One LINEAR command with its data, its buffers and its expected output."""
    name: str
    n: int
    k: int
    tokens: int
    cmd: LinearCommand
    expected: bytes                      # the whole output buffer, as sw.contract.numerics + the layout say
    weight_bytes: int
    act_bytes: int                       # the activation buffer's size (sw.contract.commands.ActivationLayout)
    bias_bytes: int                      # bias bytes read: 4 N_pad with HAS_BIAS
    out_bytes: int
    extra: dict = field(default_factory=dict)

    @property
    def out_addr(self) -> int:
        return self.cmd.out_addr

    @property
    def bytes_read(self) -> int:
        """Bytes the accelerator reads for this command (the descriptor excluded): the weight
        stream, the bias of every tile (4 N_pad) and the three sections of the activation
        buffer without their alignment padding."""
        return self.weight_bytes + self.bias_bytes + self.act_read_bytes

    @property
    def act_read_bytes(self) -> int:
        return self.tokens * self.k + 2 * self.tokens * (-(-4 * (self.k // self.cmd.group_size) // 16) * 16)


def random_linear(ws: Workspace, cfg: ArrayConfig, n: int, k: int, tokens: int, rng: np.random.Generator, *,
                  bias: bool = True, name: str = "linear", scale_exp=(-12, -4), x=None,
                  weights=None) -> Linear:
    """Random INT4 g-wise weights (or `weights` = (codes, scales, zeros)), random activations
    (or `x`), optional bias; all packed into `ws`; expected output from golden_linear."""
    G, R = cfg.group_size, cfg.rows
    ng = k // G
    if weights is None:
        codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
        zeros = rng.integers(0, 16, (n, ng), dtype=np.uint8)
        scales = (rng.uniform(0.5, 2.0, (n, ng)) * 2.0 ** rng.integers(*scale_exp, (n, ng))).astype(np.float16)
    else:
        codes, scales, zeros = weights
    if x is None:
        x = (rng.standard_normal((tokens, k)) * rng.uniform(0.1, 4.0, (tokens, 1))).astype(F32)
    b = (rng.standard_normal(n) * 0.5).astype(F32) if bias else None
    layout = TileLayout(rows=n, cols=k, group_size=G, tile_rows=R, bits=4)
    blob = pack_linear(layout, codes, scales, zeros)
    q, s_a, qsum = quantize_activations(x, G)
    act = pack_activations(q, s_a, qsum, G)
    w_addr = ws.put(blob.tobytes(), align=4096)
    a_addr = ws.put(act)
    b_addr = ws.put(pack_bias(b, R)) if bias else None
    outl = output_layout(n, tokens, R)
    o_addr = ws.alloc(outl.total_bytes)
    cmd = linear_command(n=n, k=k, group_size=G, tokens=tokens, tile_rows=R, weight_addr=w_addr,
                         act_addr=a_addr, out_addr=o_addr, bias_addr=b_addr, tag=len(ws.regions))
    y = golden_linear(x, center_weights(codes, zeros, G), scales, b, G)
    out = np.zeros((tokens, outl.stride // 4), F32)
    out[:, :n] = y
    if b is not None:
        out[:, n:outl.padded_rows] = np.frombuffer(pack_bias(b, R), "<f4")[n:outl.padded_rows]
    return Linear(name, n, k, tokens, cmd, out.tobytes(), layout.total_bytes,
                  activation_layout(k, G, tokens).total_bytes, 4 * outl.padded_rows if bias else 0, outl.total_bytes)


def put_commands(ws: Workspace, cmds: list[LinearCommand]) -> int:
    return ws.put(pack_command_list(cmds))


def golden_run(ws: Workspace, cfg: ArrayConfig, cmd_base: int, count: int, addr_bits: int = 40):
    """Execute the command list on the workspace image with the golden device's CommandExecutor.
    Returns (RunResult, memory array after the run)."""
    from sw.driver.golden_device import CommandExecutor, PhysMemory
    mem = ws.image()
    top = max(ws.next, len(mem))
    full = np.zeros(-(-top // 4096) * 4096, np.uint8)
    full[:len(mem)] = mem
    pm = PhysMemory()
    pm.add_region(0, full)
    ex = CommandExecutor(pm, HardwareLimits.from_config(cfg, addr_bits=addr_bits))
    return ex.run(cmd_base, count), full


def u32(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<u4")


def compare_bits(got: bytes, want: bytes, what: str) -> None:
    """uint32 bit patterns equal, or an AssertionError naming the first mismatches."""
    g, w = u32(got), u32(want)
    if g.shape != w.shape:
        raise AssertionError(f"{what}: {g.size} words, expected {w.size}")
    bad = np.nonzero(g != w)[0]
    if bad.size:
        shown = ", ".join(f"word {i}: {g[i]:#010x} != {w[i]:#010x}" for i in bad[:6])
        raise AssertionError(f"{what}: {bad.size} of {w.size} words differ ({shown})")


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------

@dataclass
class Scenario:
    """Steps for sim/tb_top.py. See its docstring for the step kinds."""
    workdir: Path
    steps: list[dict] = field(default_factory=list)
    ddr: dict | None = None                 # DdrModelConfig as a dict (None: AxiRam top)
    axiram: dict | None = None              # AxiRam options: size, pause probability, seed
    counter: int = 0

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def file(self, stem: str) -> Path:
        self.counter += 1
        return self.workdir / f"{self.counter:03d}-{stem}"

    def load(self, ws: Workspace) -> None:
        regions = []
        for addr, data in ws.regions:
            p = self.file(f"region-{addr:x}.bin")
            p.write_bytes(data)
            regions.append([addr, str(p)])
        self.steps.append({"kind": "load", "regions": regions})

    def configure_ddr(self, **changes) -> None:
        self.steps.append({"kind": "ddr", "changes": changes})

    def run(self, label: str, cmd_base: int, count: int, *, timeout: int, dumps=(), log: int | None = None) -> None:
        ds = []
        for addr, nbytes, stem in dumps:
            ds.append([addr, nbytes, str(self.file(f"{stem}.bin"))])
        self.steps.append({"kind": "run", "label": label, "base": cmd_base, "count": count, "timeout": timeout,
                           "dumps": ds, "log": count if log is None else log})

    def soft_reset(self) -> None:
        self.steps.append({"kind": "soft_reset"})

    def to_json(self) -> str:
        return json.dumps({"ddr": self.ddr, "axiram": self.axiram, "steps": self.steps}, indent=1)


# Verilator exposes to VPI only what cocotb needs: the top module's ports and the DDR
# model's control and statistics registers. Without cocotb's blanket --public-flat-rw the C++ is
# several times smaller, so the build is faster and Verilator optimises the datapath freely.
# KRIALLM_SIM_PUBLIC=1 builds with every signal public (for the `probe`/`trace` debugging aids).
_VLT = """`verilator_config
public_flat_rw -module "{top}" -var "*"
public_flat_rw -module "hp_ddr_model" -var "cfg_*"
public_flat_rw -module "hp_ddr_model" -var "ctl_*"
public_flat_rw -module "hp_ddr_model" -var "st_*"
public_flat_rw -module "hp_ddr_model" -var "proto_errors"
public_flat_rw -module "hp_ddr_model" -var "resp_errors"
"""


def _public_build() -> bool:
    return os.environ.get("KRIALLM_SIM_PUBLIC", "") not in ("", "0")


def _run_lean(build: Build, module: str, extra_env: dict) -> Path:
    """sim.runner.run_cocotb without --public-flat-rw (unless KRIALLM_SIM_PUBLIC is set)."""
    from cocotb_tools.runner import Verilator

    from .runner import BUILD_ROOT, VERILATOR_BUILD_ARGS, _check_results
    from .toolchain import setup_simulator

    setup_simulator("verilator")
    public = _public_build()

    class LeanVerilator(Verilator):
        def _build_command(self):
            cmds = super()._build_command()
            if not public:
                cmds[0] = [a for a in cmds[0] if a != "--public-flat-rw"]
            return cmds

    build_dir = BUILD_ROOT / f"{build.build_name}{'-public' if public else ''}-verilator"
    build_dir.mkdir(parents=True, exist_ok=True)
    vlt = build_dir / "expose.vlt"
    text = _VLT.replace("{top}", build.toplevel)
    if not vlt.exists() or vlt.read_text() != text:
        vlt.write_text(text)
    runner = LeanVerilator()
    # The tools' output goes to log files (so `kriallm bench --json` prints only JSON); a failure
    # quotes the log's tail.
    build_log, test_log = build_dir / "build.log", build_dir / f"test-{module}.log"
    try:
        runner.build(sources=[str(p) for p in build.sources], hdl_toplevel=build.toplevel,
                     build_dir=str(build_dir), build_args=list(VERILATOR_BUILD_ARGS) + [str(vlt)], always=False,
                     timescale=("1ns", "1ps"), log_file=str(build_log))
    except (SystemExit, Exception) as e:
        raise RuntimeError(f"Verilator build of {build.toplevel} failed ({e}); {_tail(build_log)}") from None
    try:
        results = runner.test(hdl_toplevel=build.toplevel, test_module=module, build_dir=str(build_dir),
                              test_dir=str(SIM_DIR), extra_env=extra_env, log_file=str(test_log),
                              results_xml=str(build_dir / f"results-{module}.xml"))
        _check_results(Path(results))
    except (SystemExit, AssertionError, Exception) as e:
        raise AssertionError(f"simulation of {build.toplevel} failed ({e}); {_tail(test_log)}") from None
    return build_dir


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"no log at {path}"
    keep = [ln for ln in text if "DeprecationWarning" not in ln and "py.warnings" not in ln][-lines:]
    return f"last lines of {path}:\n" + "\n".join(keep)


def run_scenario(build: Build, scenario: Scenario, *, module: str = "tb_top") -> dict:
    """Build (once) and run `scenario`; returns {"runs": {label: result}, "wall_s", "built", ...}."""
    from .axi_tops import _build_lock
    from .runner import BUILD_ROOT
    scenario.workdir.mkdir(parents=True, exist_ok=True)
    job = scenario.workdir / "scenario.json"
    job.write_text(scenario.to_json())
    out = scenario.workdir / "results.json"
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    with _build_lock(build.build_name):
        exe = BUILD_ROOT / f"{build.build_name}{'-public' if _public_build() else ''}-verilator" / build.toplevel
        before = exe.stat().st_mtime if exe.exists() else None
        _run_lean(build, module, {"KRIALLM_TOP_JOB": str(job), "KRIALLM_TOP_RESULTS": str(out),
                                  "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    res["built"] = before is None or exe.stat().st_mtime != before
    return res
