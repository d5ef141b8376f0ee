"""`kriallm build --board kv260` without Vivado: every generated file checked against the config.

The build elaborates the real accelerator top (rtl.top.Accelerator). Configs go
through the whole flow in a subprocess, as a user would run it: in the default
set a small preset (test-4x4-g32, one engine at 250 MHz) and the same with two
engines at 200 MHz, which build in seconds; with ``-m slow`` also the kv260
preset itself (4 engines, about 1.5 min with the lint). Every expected value
below is computed from the config, the port set or the board facts in
boards/kv260.py, never copied. What only Vivado and a board can check is listed
in docs/kv260.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from boards import kv260
from boards.build import EXIT_NEEDS_VIVADO, EXIT_OK, EXIT_USER_ERROR, EXIT_VIVADO_FAILED
from sw.contract.config import preset
from rtl.top import build_top
from sw.contract.commands import HP_ID_BITS
from sw.contract.commands import CSR_ADDR_WIDTH, DEFAULT_ADDR_BITS, ID_MAGIC, config_hash_words

pytestmark = pytest.mark.sim            # builds lint with Verilator; the rest needs Yosys

REPO = Path(__file__).resolve().parent.parent
DTC = shutil.which("dtc")
TCLSH = shutil.which("tclsh")
needs_dtc = pytest.mark.skipif(DTC is None, reason="dtc not installed (apt-get install device-tree-compiler)")

BASE = preset("kv260")
SMALL_NAME = "test-4x4-g32"            # a preset the accelerator top takes (rtl/engine.py Geometry), built in seconds
SMALL = preset(SMALL_NAME)
SMALL_APP = f"kriallm-{SMALL_NAME}"
CONFIGS = {
    "small": (SMALL, SMALL_APP, ["--hw-config", SMALL_NAME]),
    "two-engines-200mhz": (SMALL.replace(engines=2, clock_mhz=200), "kriallm-e2-200", None),
    "kv260": (BASE, "kriallm-kv260", ["--hw-config", "kv260"]),
}
SLOW_CONFIGS = {"kv260"}               # the full-size top: about 1.5 min to elaborate and lint


def _no_vivado_env() -> dict:
    """PATH without any vivado, so the flow must stop after generating."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not (Path(d) / "vivado").exists()]
    return dict(os.environ, PATH=os.pathsep.join(dirs))


def run_build(argv, env=None, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "boards.build", *argv], capture_output=True, text=True,
                          env=env or _no_vivado_env(), cwd=cwd, timeout=600)


class Built:
    def __init__(self, key, root: Path, config, app, result):
        self.key, self.root, self.config, self.app, self.result = key, root, config, app, result
        self.design = kv260.app_design_name(app)
        self.manifest = json.loads((root / "manifest.json").read_text())

    @property
    def fw(self) -> Path:
        return self.root / "firmware" / "xilinx" / self.app

    def hw(self, name: str) -> str:
        return (self.root / "hw" / name).read_text()


@pytest.fixture(scope="module", params=[pytest.param(k, marks=[pytest.mark.slow] if k in SLOW_CONFIGS else [])
                                        for k in CONFIGS])
def built(request, tmp_path_factory):
    if DTC is None:
        pytest.skip("dtc not installed")
    config, app, argv = CONFIGS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    if argv is None:
        cfg = tmp / "config.json"
        cfg.write_text(config.to_json())
        argv = ["--hw-config", str(cfg), "--name", app]
    root = tmp / "build"
    r = run_build([*argv, "--out", str(root), "--lint", "--jobs", "3"])
    assert r.returncode == EXIT_NEEDS_VIVADO, r.stdout + r.stderr
    return Built(request.param, root, config, app, r)


# ---------------------------------------------------------------------------
# exit status, manifest, folder layout
# ---------------------------------------------------------------------------

def test_without_vivado_exits_3_and_lists_the_vivado_steps(built):
    out = built.result.stdout
    assert f"exit status {EXIT_NEEDS_VIVADO}" in out
    assert "NOT DONE: these steps need Vivado" in out
    for step in ("vivado", "bit.bin", "package"):
        assert re.search(rf"^\s+{re.escape(step)}\s+->", out, re.M), step
    status = {s["name"]: s["status"] for s in built.manifest["steps"]}
    assert status == {"elaborate": "done", "vivado-src": "done", "lint": "done", "overlay": "done",
                      "firmware": "done", "vivado": "needs Vivado", "bit.bin": "needs Vivado",
                      "package": "needs Vivado"}
    assert built.manifest["exit_status"] == EXIT_NEEDS_VIVADO


def test_manifest_records_config_and_the_real_top(built):
    m = built.manifest
    assert m["config"] == built.config.to_dict()
    assert m["config_hash"] == built.config.config_hash
    top = build_top(built.config)                     # the one top every flow builds
    assert m["top"]["class"] == f"{type(top).__module__}.{type(top).__qualname__}"
    assert m["top"]["module"] == built.design and m["top"]["parameters"] == top.parameters
    params = m["top"]["parameters"]
    assert params["config_hash"] == built.config.config_hash and params["addr_width"] == DEFAULT_ADDR_BITS
    assert m["app_name"] == built.app
    # The driver checks the design it talks to against this manifest's config hash (sw/driver/device.py);
    # the core answers that hash in CONFIG_HASH0..7: the eight words are constants of the generated Verilog.
    core = built.hw(f"{built.design}.v")
    for word in config_hash_words(m["config_hash"]):
        assert f"32'd{word}" in core or f"32'h{word:08x}" in core, hex(word)
    # Every port width the block design sees is the top's, and the top's is the config's.
    facts = m["board_facts"]
    assert all(h["addr_bits"] == DEFAULT_ADDR_BITS and h["data_bits"] == built.config.port_bits
               for h in facts["hp_ports"])
    files = {f["path"]: f for f in m["files"]}
    for rel in (f"firmware/xilinx/{built.app}/{built.app}.dtbo", f"firmware/xilinx/{built.app}/shell.json",
                f"hw/{built.design}.v", f"hw/{built.design}_bd.tcl", f"hw/{built.design}.tcl"):
        assert rel in files and len(files[rel]["sha256"]) == 64, rel


def test_firmware_folder_is_what_xmutil_loads(built):
    assert sorted(p.name for p in built.fw.iterdir()) == sorted([f"{built.app}.dtbo", "shell.json", "manifest.json"])
    # the driver's copy of the manifest: the config to check and where the devices are
    assert (built.fw / "manifest.json").read_text() == (built.root / "manifest.json").read_text()
    facts = built.manifest["board_facts"]
    assert facts["uio_name"] == kv260.UIO_NAME and facts["udmabuf"]["device"] == f"/dev/{kv260.UDMABUF_NAME}"
    assert facts["csr"]["base"] == kv260.CSR_BASE and len(facts["hp_ports"]) == built.config.engines
    # The bitstream is absent, and said to need Vivado.
    assert not (built.fw / f"{built.app}.bit.bin").exists()
    fw_step = next(s for s in built.manifest["steps"] if s["name"] == "firmware")
    assert fw_step["needs_vivado"] == [f"{built.app}.bit.bin"]
    assert json.loads((built.fw / "shell.json").read_text()) == {"shell_type": "XRT_FLAT", "num_slots": "1"}


# ---------------------------------------------------------------------------
# Verilog: the core wired to a PS8 stub as the block design wires it
# ---------------------------------------------------------------------------

def test_lint_with_ps8_stub_is_clean(built):
    lint = next(s for s in built.manifest["steps"] if s["name"] == "lint")
    assert lint["verilator"]["clean"] and lint["yosys"]["clean"], lint
    # And once more here, not trusting the build's own report.
    from sim.toolchain import verilator_bin
    hw, d = built.root / "hw", built.design
    r = subprocess.run([verilator_bin(), "--lint-only", "-Wall", "--top-module", f"{d}_lint_top",
                        f"sim/{d}_lint.vlt", f"{d}.v", f"{d}_accel.v", f"sim/{d}_ps8_stub.v", f"sim/{d}_lint_top.v",
                        f"sim/{d}_xilinx_stubs.v"],
                       cwd=hw, capture_output=True, text=True)
    assert r.returncode == 0 and "%Warning" not in r.stderr, r.stderr


def _port_widths(verilog: str) -> dict[str, int]:
    out = {}
    for m in re.finditer(r"^\s*(?:input|output) wire (?:\[(\d+):0\] )?(\w+)", verilog, re.M):
        out[m.group(2)] = int(m.group(1)) + 1 if m.group(1) else 1
    return out


def test_block_design_cell_ports_follow_config(built):
    cfg = built.config
    cell = built.hw(f"{built.design}_accel.v")
    widths = _port_widths(cell)
    assert widths["csr_awaddr"] == widths["csr_araddr"] == CSR_ADDR_WIDTH
    assert widths["csr_wdata"] == widths["csr_rdata"] == 32
    for k in range(cfg.engines):
        assert widths[f"hp{k}_rdata"] == widths[f"hp{k}_wdata"] == cfg.port_bits
        assert widths[f"hp{k}_wstrb"] == cfg.port_bits // 8
    assert f"hp{cfg.engines}_rdata" not in widths
    assert widths["irq"] == 1
    busif = re.search(r"ASSOCIATED_BUSIF ([\w:]+)", cell).group(1).split(":")
    assert busif == ["csr"] + [f"hp{k}" for k in range(cfg.engines)]
    assert f"DATA_WIDTH {cfg.port_bits}," in cell and "PROTOCOL AXI4LITE" in cell


def test_lint_catches_a_top_that_does_not_match_the_config(tmp_path):
    """The stub check has teeth: a 64-bit top wired into a 128-bit block design fails the lint."""
    from amaranth.back import verilog
    from amaranth.hdl import Module
    from amaranth.lib import wiring
    from amaranth.lib.wiring import Out

    from rtl.axi import axi4_signature, tie_off_read, tie_off_write
    from sim.toolchain import verilator_bin
    narrow = BASE.replace(port_bits=64, rows=16)

    class Narrow(wiring.Component):
        """The accelerator top's port set with `narrow`'s HP width; idle."""
        def __init__(self):
            members = dict(build_top(BASE).signature.members)
            for k in range(narrow.engines):
                members[f"hp{k}"] = Out(axi4_signature(addr_width=DEFAULT_ADDR_BITS, data_width=narrow.port_bits,
                                                       id_width=HP_ID_BITS))
            super().__init__(members)

        def elaborate(self, platform):
            m = Module()
            m.d.sync += self.irq.eq(self.csr.awvalid)        # the sync domain: clk and rst ports
            for k in range(narrow.engines):
                tie_off_read(m, getattr(self, f"hp{k}"))
                tie_off_write(m, getattr(self, f"hp{k}"))
            return m

    top = Narrow()
    with pytest.raises(Exception, match="64 bits wide but the config says port_bits=128"):
        kv260.TopPorts.from_component(top, BASE)
    ports = kv260.TopPorts.from_component(top, narrow)        # bypass the check on purpose
    d = kv260.Kv260Design(BASE, ports, "mismatch")
    (tmp_path / "mismatch.v").write_text(verilog.convert(top, name="mismatch"))
    files = {"mismatch_accel.v": d.cell_verilog(), "mismatch_ps8_stub.v": d.ps8_stub_verilog(),
             "mismatch_lint_top.v": d.lint_top_verilog()}
    for name, text in {**files, "w.vlt": d.lint_waivers()}.items():
        (tmp_path / name).write_text(text)
    r = subprocess.run([verilator_bin(), "--lint-only", "-Wall", "--top-module", "mismatch_lint_top", "w.vlt",
                        "mismatch.v", *files], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0
    assert re.search(r"%Warning-WIDTH\w*: mismatch_lint_top.v:\d+:\d+: .*hp0_wdata", r.stderr), r.stderr


# ---------------------------------------------------------------------------
# Tcl: widths, clock and addresses read back from the text
# ---------------------------------------------------------------------------

def _ps_config(tcl: str) -> dict[str, str]:
    block = re.search(r"set_property -dict \[list \\\n(.*?)\] \$ps", tcl, re.S).group(1)
    return dict(re.findall(r"(CONFIG\.\w+) \{([^}]*)\}", block))


def test_block_design_tcl_matches_config(built):
    cfg, tcl = built.config, built.hw(f"{built.design}_bd.tcl")
    ps = _ps_config(tcl)
    assert ps["CONFIG.PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ"] == str(cfg.clock_mhz)
    assert ps["CONFIG.PSU__FPGA_PL0_ENABLE"] == "1" and ps["CONFIG.PSU__USE__IRQ0"] == "1"
    assert ps["CONFIG.PSU__USE__M_AXI_GP0"] == "1"
    assert ps["CONFIG.PSU__MAXIGP0__DATA_WIDTH"] == str(kv260.HPM0_DATA_BITS)
    for k in range(kv260.MAX_HP_PORTS):
        used = k < cfg.engines
        assert ps[f"CONFIG.PSU__USE__S_AXI_GP{k + 2}"] == ("1" if used else "0")
        assert ps.get(f"CONFIG.PSU__SAXIGP{k + 2}__DATA_WIDTH") == (str(cfg.port_bits) if used else None)
        link = f"connect_bd_intf_net [get_bd_intf_pins accel/hp{k}] [get_bd_intf_pins ps/S_AXI_HP{k}_FPD]"
        assert (link in tcl) == used
        assert (f"[get_bd_pins ps/saxihp{k}_fpd_aclk]" in tcl) == used
    assert re.search(r"set requested_hz (\d+)", tcl).group(1) == str(cfg.clock_mhz * 1_000_000)
    assert "apply_board_preset \"1\"" in tcl
    assert "create_bd_cell -type module -reference " + f"{built.design}_accel accel" in tcl

    addr = re.findall(r"assign_bd_address -offset (0x[0-9A-F]+) -range (0x[0-9A-F]+) -target_address_space "
                      r"\[get_bd_addr_spaces ([\w/]+)\] \[get_bd_addr_segs ([\w/]+)\]", tcl)
    amap = {(space, seg): (int(off, 16), int(rng, 16)) for off, rng, space, seg in addr}
    assert amap.pop(("ps/Data", "accel/csr/reg0")) == (kv260.CSR_BASE, 1 << CSR_ADDR_WIDTH)
    for k in range(cfg.engines):
        assert amap.pop((f"accel/hp{k}", f"ps/SAXIGP{k + 2}/HP{k}_DDR_LOW")) == (kv260.DDR_LOW_BASE,
                                                                                  kv260.DDR_LOW_SIZE)
    assert not amap, amap


def test_project_tcl_targets_the_k26(built):
    tcl = built.hw(f"{built.design}.tcl")
    assert f"-part {kv260.DEVICE}-{kv260.PACKAGE}-{kv260.SPEED}" in tcl
    assert kv260.BOARD_PART_GLOB in tcl
    for needle in ("launch_runs synth_1 -jobs $jobs", "launch_runs impl_1 -to_step write_bitstream -jobs $jobs",
                   "write_hw_platform -fixed -include_bit", "make_wrapper", "-process_bitstream bin",
                   f"source [file join $here {built.design}_bd.tcl]"):
        assert needle in tcl, needle
    script = built.hw(f"build_{built.design}.sh")               # --jobs 3 reaches Vivado through -tclargs
    assert "-source " + f"{built.design}.tcl" in script and "--jobs 3" in script
    assert built.hw(f"{built.design}.bif").split() == ["all:", "{", f"{built.app}.bit", "}"]


# A Vivado that records every command: enough to execute the generated Tcl end to end.
MOCK_VIVADO = r"""
set ::log [open $::env(MOCK_LOG) w]
proc record {args} { puts $::log [list {*}$args]; flush $::log }
proc unknown {cmd args} {
    record $cmd {*}$args
    switch -- $cmd {
        create_bd_cell { return [lindex $args end] }
        get_board_parts { return "xilinx.com:kv260_som:part0:1.4" }
        version { return "2023.2" }
        make_wrapper { return "/gen/wrapper.v" }
        get_property {
            switch -- [lindex $args 0] {
                PROGRESS { return "100%" }
                CONFIG.FREQ_HZ { return $::env(MOCK_FREQ_HZ) }
                DIRECTORY { return "/runs/impl_1" }
                SLACK { return "0.125" }
            }
            return ""
        }
        default { return [lindex $args end] }
    }
}
rename file _file
proc file {sub args} {
    if {$sub eq "copy"} { record file copy {*}$args; return }
    if {$sub eq "exists"} { return 0 }
    return [_file $sub {*}$args]
}
proc glob {args} { return [list /gen/bd.hwh] }
rename exec _exec
proc exec {args} { record exec {*}$args }
source [lindex $argv 0]
close $::log
"""


def _run_tcl_mock(built, tmp_path, freq_hz):
    hw = tmp_path / "hw"
    hw.mkdir()
    for name in (f"{built.design}.tcl", f"{built.design}_bd.tcl"):
        (hw / name).write_text(built.hw(name))
    (tmp_path / "mock.tcl").write_text(MOCK_VIVADO)
    env = dict(os.environ, MOCK_LOG=str(tmp_path / "calls.txt"), MOCK_FREQ_HZ=str(freq_hz))
    r = subprocess.run([TCLSH, "mock.tcl", str(hw / f"{built.design}.tcl")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls.txt").read_text().splitlines() if (tmp_path / "calls.txt").exists() else []
    return r, calls


@pytest.mark.skipif(TCLSH is None, reason="tclsh not installed")
def test_generated_tcl_runs_against_a_mock_vivado(built, tmp_path):
    cfg = built.config
    actual_hz = cfg.clock_mhz * 1_000_000 - 2502           # what a PS PLL divider makes, within 1 %
    r, calls = _run_tcl_mock(built, tmp_path, actual_hz)
    assert r.returncode == 0, r.stderr
    assert f"kriallm: built {built.app} ({actual_hz} Hz" in r.stdout
    # The PS configuration Vivado receives is the one the text says (checked against the config above).
    ps_dict = next(c for c in calls if c.startswith("set_property -dict {CONFIG.PSU__"))
    values = dict(zip(*[iter(ps_dict.removeprefix("set_property -dict {").removesuffix("} ps").split())] * 2))
    assert values == _ps_config(built.hw(f"{built.design}_bd.tcl"))
    assert values["CONFIG.PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ"] == str(cfg.clock_mhz)
    # The PS clock is propagated to every interface of the module reference.
    freq_sets = [c for c in calls if c.startswith(f"set_property CONFIG.FREQ_HZ {actual_hz}")]
    assert len(freq_sets) == 1 + 1 + cfg.engines          # clk, csr, hp0..
    assert any(c.startswith("create_project -force") and "-part xck26-sfvc784-2LV-c" in c for c in calls)
    assert any(c.startswith("write_hw_platform -fixed -include_bit") for c in calls)
    summary = json.loads((tmp_path / "outputs" / f"{built.app}_vivado.json").read_text())
    assert summary["pl_clk0_hz"] == actual_hz and summary["wns_ns"] == 0.125


@pytest.mark.skipif(TCLSH is None, reason="tclsh not installed")
def test_generated_tcl_refuses_a_clock_the_ps_cannot_make(built, tmp_path):
    r, _ = _run_tcl_mock(built, tmp_path, built.config.clock_mhz * 1_000_000 * 9 // 10)
    assert r.returncode != 0 and "more than 1 % from the requested" in r.stderr


# ---------------------------------------------------------------------------
# Device-tree overlay
# ---------------------------------------------------------------------------

def _decompiled(built) -> str:
    r = subprocess.run([DTC, "-I", "dtb", "-O", "dts", str(built.fw / f"{built.app}.dtbo")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _cells(dts: str, prop: str) -> list[int]:
    m = re.search(rf"\b{re.escape(prop)} = <([^>]*)>;", dts)
    assert m, prop
    return [int(x, 16) for x in m.group(1).split()]


def test_overlay_compiles_and_decompiles_to_the_config(built):
    cfg, dts = built.config, _decompiled(built)
    assert f'firmware-name = "{built.app}.bit.bin";' in dts
    assert 'compatible = "xlnx,afi-fpga";' in dts
    afi = _cells(dts, "config-afi")
    pairs = dict(zip(afi[0::2], afi[1::2]))
    width_code = kv260.AFI_FM_WIDTH_CODE[cfg.port_bits]
    for k in range(cfg.engines):                    # S_AXI_HP<k>_FPD is AFIFM<k+2>: regids 2(k+2), 2(k+2)+1
        assert pairs.pop(2 * (k + 2)) == width_code and pairs.pop(2 * (k + 2) + 1) == width_code
    assert pairs == {kv260.AFIFS_REGID: kv260.AFIFS_SS0_CODE[kv260.HPM0_DATA_BITS] | kv260.AFIFS_SS1_CODE[128]}
    assert _cells(dts, "assigned-clock-rates") == [cfg.clock_mhz * 1_000_000]
    assert _cells(dts, "clocks")[1] == kv260.ZYNQMP_CLK_PL0_REF
    assert 'compatible = "generic-uio";' in dts
    assert _cells(dts, "reg") == [kv260.CSR_BASE >> 32, kv260.CSR_BASE & 0xFFFF_FFFF, 0, 1 << CSR_ADDR_WIDTH]
    assert _cells(dts, "interrupts") == [0, kv260.PL_PS_IRQ0_GIC_SPI, 4]
    assert f"{kv260.UIO_NAME}@{kv260.CSR_BASE:x} {{" in dts
    assert 'compatible = "ikwzm,u-dma-buf";' in dts
    assert _cells(dts, "size") == [kv260.DEFAULT_DMA_MB << 20]
    fixups = dts[dts.index("__fixups__"):]
    for label in ("fpga_full", "amba", "gic", "zynqmp_clk", "zynqmp_reset"):
        assert re.search(rf"\b{label} = ", fixups), label
    # and the source says the same
    src = (built.root / "dt" / f"{built.app}.dtsi").read_text()
    assert "/plugin/;" in src and "target = <&fpga_full>;" in src


# ---------------------------------------------------------------------------
# Options and errors
# ---------------------------------------------------------------------------

@needs_dtc
def test_model_sizes_the_dma_buffer(tmp_path):
    from sw.cli import main
    assert main(["synth-model", "--model-preset", "tiny", "--out", str(tmp_path / "tiny")]) == 0
    kq = tmp_path / "m.kq"
    assert main(["quantize", str(tmp_path / "tiny"), "--method", "rtn", "--quiet", "--out", str(kq)]) == 0
    r = run_build(["--hw-config", SMALL_NAME, "--model", str(kq), "--out", str(tmp_path / "b"), "--generate-only",
                   "--no-lint"])
    assert r.returncode == EXIT_NEEDS_VIVADO, r.stderr
    mib = 1 << 20
    want = -(-kq.stat().st_size // mib) * mib + (kv260.DMA_HEADROOM_MB << 20)
    src = (tmp_path / "b" / "dt" / f"{SMALL_APP}.dtsi").read_text()
    assert f"size = <0x{want:08X}>;" in src
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["dma"]["bytes"] == want


def test_missing_dtc_is_one_line(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))       # nothing on PATH: no dtc, no vivado
    env.pop("DTC", None)
    r = run_build(["--hw-config", "kv260", "--out", str(tmp_path / "b")], env=env)
    assert r.returncode == EXIT_USER_ERROR
    assert r.stderr.strip().splitlines() == ["build: error: dtc (the device-tree compiler) is not installed: "
                                             "apt-get install device-tree-compiler"]


@pytest.mark.parametrize("change, message", [
    ({"engines": kv260.MAX_HP_PORTS + 1}, "S_AXI_HP ports"),
    ({"clock_mhz": 400}, "outside what the PS makes"),
])
def test_configs_the_board_cannot_take_are_refused(tmp_path, change, message):
    cfg = tmp_path / "c.json"
    cfg.write_text(BASE.replace(**change).to_json())
    r = run_build(["--hw-config", str(cfg), "--out", str(tmp_path / "b")])
    assert r.returncode == EXIT_USER_ERROR and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# After Vivado: packaging, with a stand-in `vivado` (what a Vivado run leaves behind)
# ---------------------------------------------------------------------------

def make_bit(payload_words: list[int], design="kriallm_kv260_bd_wrapper") -> bytes:
    def field(key, text):
        raw = text.encode() + b"\0"
        return key + struct.pack(">H", len(raw)) + raw
    data = b"\xff" * 16 + b"\x00\x00\x00\xbb\x11\x22\x00\x44" + b"\xff" * 8 + bytes.fromhex("aa995566") \
        + b"".join(struct.pack(">I", w) for w in payload_words)
    return (struct.pack(">H", 9) + bytes.fromhex("0ff00ff00ff00ff000") + struct.pack(">H", 1)
            + field(b"a", f"{design};UserID=0XFFFFFFFF") + field(b"b", "xck26-sfvc784-2LV-c")
            + field(b"c", "2025/01/01") + field(b"d", "00:00:00") + b"e" + struct.pack(">I", len(data)) + data)


def test_bit_to_bin_strips_the_header_and_swaps_words():
    bit = make_bit([0x30008001, 0x0000000D])
    out = kv260.bit_to_bin(bit)
    data = bit[bit.index(b"e" + struct.pack(">I", len(out))) + 5:]
    assert len(out) == len(data) and len(out) % 4 == 0
    assert bytes.fromhex("665599aa") in out and bytes.fromhex("aa995566") not in out
    assert out[-8:] == struct.pack("<I", 0x30008001) + struct.pack("<I", 0x0000000D)
    with pytest.raises(Exception, match="not a Xilinx .bit file"):
        kv260.bit_to_bin(b"\x00\x05hello")


def _fake_vivado(tmp_path: Path, ok: bool) -> Path:
    script = tmp_path / "fake-vivado"
    bit = make_bit(list(range(64)))
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        # Stand-in for Vivado in tests: leaves what a successful run leaves, or fails.
        import re, sys
        from pathlib import Path
        tcl = Path(sys.argv[sys.argv.index("-source") + 1]).read_text()
        app = re.search(r"^set app (\\S+)$", tcl, re.M).group(1)
        out = Path("..") / "outputs"
        out.mkdir(exist_ok=True)
        if not {ok}:
            print("ERROR: [Synth 8-439] module not found", file=sys.stderr)
            sys.exit(1)
        (out / f"{{app}}.bit").write_bytes({bit!r})
        (out / f"{{app}}.xsa").write_bytes(b"PK fake xsa")
        (out / f"{{app}}.hwh").write_text("<EDKSYSTEM/>")
        (out / f"{{app}}_vivado.json").write_text('{{"vivado": "fake", "pl_clk0_hz": 249997498, "wns_ns": 0.1, "whs_ns": 0.02}}')
        """))
    script.chmod(0o755)
    return script


@needs_dtc
def test_after_vivado_the_firmware_folder_is_complete(tmp_path):
    root = tmp_path / "b"
    r = run_build(["--hw-config", SMALL_NAME, "--out", str(root), "--no-lint",
                   "--vivado", str(_fake_vivado(tmp_path, True))])
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    app = SMALL_APP
    fw = root / "firmware" / "xilinx" / app
    assert sorted(p.name for p in fw.iterdir()) == sorted([f"{app}.bit.bin", f"{app}.dtbo", "shell.json",
                                                          "manifest.json"])
    bit = (root / "outputs" / f"{app}.bit").read_bytes()
    assert (fw / f"{app}.bit.bin").read_bytes() == kv260.bit_to_bin(bit)
    assert sorted(p.name for p in (root / "pynq").iterdir()) == [f"{app}.bit", f"{app}.hwh"]
    m = json.loads((root / "manifest.json").read_text())
    status = {s["name"]: s["status"] for s in m["steps"]}
    assert status["vivado"] == status["bit.bin"] == status["package"] == "done"
    assert "byte-swapped in Python" in next(s for s in m["steps"] if s["name"] == "bit.bin")["method"]
    assert m["vivado_summary"]["pl_clk0_hz"] == 249997498

    # Again without Vivado, same sources (another --jobs and DMA size do not change the bitstream):
    # the earlier outputs are packaged, nothing is lost.
    r = run_build(["--hw-config", SMALL_NAME, "--out", str(root), "--dma-mb", "256", "--jobs", "1", "--no-lint"])
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert (fw / f"{app}.bit.bin").exists() and "earlier Vivado run" in r.stdout
    # Other sources (another clock): the old bitstream must not stay next to the new overlay.
    cfg = tmp_path / "c.json"
    cfg.write_text(SMALL.replace(clock_mhz=200).to_json())
    r = run_build(["--hw-config", str(cfg), "--name", app, "--out", str(root), "--no-lint"])
    assert r.returncode == EXIT_NEEDS_VIVADO, r.stdout + r.stderr
    assert not (fw / f"{app}.bit.bin").exists() and not (root / "pynq" / f"{app}.bit").exists()
    assert f"firmware/xilinx/{app}/{app}.bit.bin" in json.loads((root / "manifest.json").read_text())[
        "removed_stale_outputs"]


@needs_dtc
def test_failed_vivado_exits_4(tmp_path):
    root = tmp_path / "b"
    r = run_build(["--hw-config", SMALL_NAME, "--out", str(root), "--no-lint",
                   "--vivado", str(_fake_vivado(tmp_path, False))])
    assert r.returncode == EXIT_VIVADO_FAILED
    status = {s["name"]: s["status"] for s in json.loads((root / "manifest.json").read_text())["steps"]}
    assert status["vivado"] == "failed" and status["package"] == "not run"
    assert not (root / "firmware" / "xilinx" / SMALL_APP / f"{SMALL_APP}.bit.bin").exists()


# ---------------------------------------------------------------------------
# The real top identifies itself as the manifest says
# ---------------------------------------------------------------------------

async def _axil_read(ctx, a, addr):
    ctx.set(a.araddr, addr)
    ctx.set(a.arvalid, 1)
    ctx.set(a.rready, 1)
    await ctx.tick().until(a.arready)
    ctx.set(a.arvalid, 0)
    data, resp = await ctx.tick().sample(a.rdata, a.rresp).until(a.rvalid)
    return data, resp


def test_the_built_top_answers_the_manifest_config_hash():
    """What every flow instantiates (rtl.top.build_top) reads ID = KRIA and the config hash the manifest
    records, which is what the driver compares (sw/driver/device.py check_identity)."""
    from amaranth.sim import Simulator

    from sw.contract.commands import REGISTERS, config_hash_from_words
    top = build_top(SMALL)
    assert top.parameters["config_hash"] == SMALL.config_hash
    reg = {r.name: r.offset for r in REGISTERS}
    got = {}

    async def bench(ctx):
        await ctx.tick().repeat(4)
        got["id"] = await _axil_read(ctx, top.csr, reg["ID"])
        got["hash"] = [await _axil_read(ctx, top.csr, reg[f"CONFIG_HASH{i}"]) for i in range(8)]

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run_until(5e-6)
    assert got["id"] == (ID_MAGIC, 0)
    assert [resp for _, resp in got["hash"]] == [0] * 8
    assert config_hash_from_words(w for w, _ in got["hash"]) == SMALL.config_hash


def test_platform_is_the_k26_without_pins():
    platform = kv260.KV260Platform(SMALL, app_name=SMALL_APP)
    assert platform._part == kv260.PART == "-".join((kv260.DEVICE, kv260.PACKAGE, kv260.SPEED))
    assert platform.family == "ultrascaleplus" and platform.toolchain == "Vivado"
    assert platform.default_clk_frequency == SMALL.clock_mhz * 1e6
    assert platform.default_clk is None and platform.default_rst is None    # pl_clk0 / pl_resetn0 via the PS
    plan = platform.prepare(build_top(SMALL))   # writes every Vivado source, runs nothing
    d = platform.design
    assert {f"{d.design}.v", f"{d.design}.tcl", f"{d.design}_bd.tcl", f"{d.design}.xdc", f"{d.cell_module}.v",
            f"{d.design}.bif", f"build_{d.design}.sh"} <= set(plan.files)
    core = plan.files[f"{d.design}.v"]
    assert re.search(rf"^module {d.design}\(", core, re.M)
    widths = _port_widths(re.sub(r"^\s*(input|output) ", r"\1 wire ", core, flags=re.M))
    assert widths["clk"] == widths["rst"] == widths["irq"] == 1
    assert widths["hp0__rdata"] == SMALL.port_bits and widths["csr__awaddr"] == CSR_ADDR_WIDTH
    assert widths["hp0__araddr"] == DEFAULT_ADDR_BITS and f"hp{SMALL.engines}__rdata" not in widths
    # The carrier's pins are declared (tests/test_platform.py) but none is requested: none is placed.
    assert ("pmod", 0) in platform.resources and d.pl_io == ()
    assert "PACKAGE_PIN" not in plan.files[f"{d.design}.xdc"]


def test_a_top_without_the_port_set_is_refused():
    from amaranth.hdl import Module
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    from rtl.axilite import AxiLiteSignature

    class Partial(wiring.Component):
        def __init__(self):
            super().__init__({"csr": In(AxiLiteSignature(addr_width=CSR_ADDR_WIDTH)), "irq": Out(1),
                              "debug": Out(8)})

        def elaborate(self, platform):
            return Module()

    top = Partial()
    top._MustUse__silence = True
    with pytest.raises(Exception) as e:
        kv260.TopPorts.from_component(top, BASE)
    msg = str(e.value)
    assert "missing port(s) hp0, hp1, hp2, hp3" in msg and "does not connect: debug" in msg
