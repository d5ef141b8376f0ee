"""KV260Platform's PL I/O: a design requests carrier pins and the build places them, without Vivado.

Small designs (the stub top plus a blinker, a Pmod port, the fan enable) go through
``KV260Platform.prepare`` / ``build(do_build=False)``; the checks read the generated
files: the core's Verilog, the block-design cell, the block design Tcl, the lint top
and the XDC. The expected package pins and I/O standard are written once below from
AMD/Xilinx's own KV260 constraint files, not read from boards/kv260.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest


from amaranth.build import Attrs, Pins, Resource          # noqa: E402
from amaranth.hdl import Signal                            # noqa: E402
from amaranth.lib import io                                # noqa: E402

from boards import kv260                                   # noqa: E402
from rtl.top import Accelerator                            # noqa: E402
from sw.contract.config import preset                      # noqa: E402

pytestmark = pytest.mark.sim          # Amaranth's Yosys back end, and Verilator's lint of the cell

# ---------------------------------------------------------------------------
# Facts of the KV260 carrier, from AMD/Xilinx's constraint files
# ---------------------------------------------------------------------------
# github.com/Xilinx/kria-vitis-platforms, kv260/platforms/vivado/kv260_bist/xdc/pin.xdc:
#   "#Digilent PMOD pins / output - HDA11, HDA12, HDA13, HDA14": PMOD_OUT_tri_o[0..3] on H12 E10 D10 C11,
#   "#input - HDA15, HDA16, HDA17, HDA18": PMOD_IN_tri_i[0..3] on B10 E12 D11 B11,
#   "#Fan Speed Enable": fan_en_b on A12; all IOSTANDARD LVCMOS33, SLEW SLOW, DRIVE 4.
# Which row is which on J2 (github.com/miya4649/mini16_cpu, kv260/pins.xdc: "#1, HDA11, som240_1_a17, H12",
# "#2, HDA15, som240_1_b20, B10"): J2 pin 1 (HDA11) and J2 pin 2 (HDA15) face each other, so in Digilent's
# Pmod numbering (pins 1-4 on one row, 7-10 on the other, 7 facing 1) HDA11..14 are pins 1-4, HDA15..18 7-10.
XDC_PMOD_PINS_1_TO_4 = ("H12", "E10", "D10", "C11")
XDC_PMOD_PINS_7_TO_10 = ("B10", "E12", "D11", "B11")
XDC_FAN_EN_B = "A12"
XDC_ATTRS = {"IOSTANDARD": "LVCMOS33", "SLEW": "SLOW", "DRIVE": "4"}

CONFIG = preset("test-4x4-g32")          # one engine: the smallest accelerator top
APP = "kv260-io-test"
DESIGN = kv260.app_design_name(APP)


class _IoTop(Accelerator):
    """The accelerator top plus whatever ``extra(m, platform)`` adds."""

    def __init__(self, config, extra):
        super().__init__(config)
        self._extra = extra

    def elaborate(self, platform):
        m = super().elaborate(platform)
        self._extra(m, platform)
        return m


def _prepare(extra, *, resources=(), via_build=False):
    platform = kv260.KV260Platform(CONFIG, app_name=APP)
    if resources:
        platform.add_resources(list(resources))
    top = _IoTop(CONFIG, extra)
    if via_build:
        plan = platform.build(top, name=DESIGN, do_build=False)
    else:
        plan = platform.prepare(top)
    return platform, plan


def _xdc_bits(xdc: str) -> dict[str, dict[str, str]]:
    """{port bit: {property: value}} of every `set_property KEY VALUE [get_ports {bit}]` line."""
    out: dict[str, dict[str, str]] = {}
    for m in re.finditer(r"^set_property (\w+) (\S+) \[get_ports \{([^}]+)\}\]$", xdc, re.M):
        out.setdefault(m.group(3), {})[m.group(1)] = m.group(2)
    return out


def _top_module_ports(verilog: str, module: str) -> dict[str, tuple[str, int]]:
    body = re.search(rf"^module {re.escape(module)}\(.*?^endmodule", verilog, re.M | re.S).group(0)
    out = {}
    for m in re.finditer(r"^\s*(input|output|inout) (?:\[(\d+):0\] )?(\w+);", body, re.M):
        out[m.group(3)] = (m.group(1), int(m.group(2)) + 1 if m.group(2) else 1)
    return out


def _lint(tmp_path, plan) -> subprocess.CompletedProcess | None:
    try:
        from sim.toolchain import verilator_bin
        verilator = verilator_bin()
    except Exception:        # Verilator is an optional install (.[sim])
        return None
    plan.extract(tmp_path)
    d = DESIGN
    return subprocess.run([verilator, "--lint-only", "-Wall", "--top-module", f"{d}_lint_top", f"sim/{d}_lint.vlt",
                           f"{d}.v", f"{d}_accel.v", f"sim/{d}_ps8_stub.v", f"sim/{d}_lint_top.v"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------
# A blinker on Pmod J2 pin 1
# ---------------------------------------------------------------------------

def _blinker(m, platform):
    led = platform.request("pmod_led", 0, dir="-")
    m.submodules.led = buf = io.Buffer("o", led)
    counter = Signal(28)
    m.d.sync += counter.eq(counter + 1)
    m.d.comb += buf.o.eq(counter[-1])


PMOD_LED = Resource("pmod_led", 0, Pins("1", dir="o", conn=("pmod", 0)), Attrs(IOSTANDARD="LVCMOS33"))


def test_blinker_on_pmod_pin_1_is_placed_on_its_package_pin(tmp_path):
    platform, plan = _prepare(_blinker, resources=[PMOD_LED], via_build=True)
    port = "pmod_led_0__io"
    # XDC: the pin the constraint file gives Pmod pin 1, with its I/O standard.
    bits = _xdc_bits(plan.files[f"{DESIGN}.xdc"])
    assert bits == {port: {"PACKAGE_PIN": XDC_PMOD_PINS_1_TO_4[0], "IOSTANDARD": XDC_ATTRS["IOSTANDARD"]}}
    # The core has it as a 1-bit output next to the accelerator's ports, driven by an output buffer.
    core = plan.files[f"{DESIGN}.v"]
    ports = _top_module_ports(core, DESIGN)
    assert ports[port] == ("output", 1)
    assert ports["irq"] == ("output", 1) and ports["csr__awaddr"][0] == "input" and ports["hp0__araddr"][0] == "output"
    assert re.search(r"\bOBUFT?\b", core)
    # The block-design cell passes it through; the block design makes it an external port of that name.
    cell = plan.files[f"{DESIGN}_accel.v"]
    assert re.search(rf"^\s*output wire {port}$", cell, re.M) and f".{port}({port})" in cell
    bd = plan.files[f"{DESIGN}_bd.tcl"]
    assert f"create_bd_port -dir O {port}\n" in bd
    assert f"connect_bd_net [get_bd_ports {port}] [get_bd_pins accel/{port}]" in bd
    assert platform.design.pl_io[0].name == port
    # The wiring of core, cell and PS8 stub lints clean with the pin as a port of the lint top.
    r = _lint(tmp_path, plan)
    if r is not None:
        assert r.returncode == 0 and "%Warning" not in r.stderr and "%Error" not in r.stderr, r.stderr[-3000:]


@pytest.mark.skipif(shutil.which("tclsh") is None, reason="tclsh not installed")
def test_block_design_tcl_with_pins_runs_against_a_recording_mock(tmp_path):
    _, plan = _prepare(_blinker, resources=[PMOD_LED])
    (tmp_path / "bd.tcl").write_text(plan.files[f"{DESIGN}_bd.tcl"])
    (tmp_path / "mock.tcl").write_text(
        "proc unknown {cmd args} { puts [list $cmd {*}$args]; "
        "if {$cmd eq \"get_property\"} { return 250000000 }; return [lindex $args end] }\n"
        "source bd.tcl\nkriallm_create_bd test_bd\n")
    r = subprocess.run(["tclsh", "mock.tcl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = r.stdout.splitlines()
    assert "create_bd_port -dir O pmod_led_0__io" in calls
    assert "connect_bd_net pmod_led_0__io accel/pmod_led_0__io" in calls     # the mock's get_* return their names


# ---------------------------------------------------------------------------
# The whole Pmod connector, and amaranth-boards' Pmod helpers
# ---------------------------------------------------------------------------

def test_pmod_resource_is_j2_in_digilent_order():
    def gpio(m, platform):
        pmod = platform.request("pmod", 0, dir="-")
        m.submodules.pmod = buf = io.Buffer("io", pmod)
        m.d.comb += [buf.o.eq(0), buf.oe.eq(0)]

    _, plan = _prepare(gpio)
    bits = _xdc_bits(plan.files[f"{DESIGN}.xdc"])
    expected = XDC_PMOD_PINS_1_TO_4 + XDC_PMOD_PINS_7_TO_10
    assert {f"pmod_0__io[{i}]": {"PACKAGE_PIN": pin, **XDC_ATTRS} for i, pin in enumerate(expected)} == bits
    assert _top_module_ports(plan.files[f"{DESIGN}.v"], DESIGN)["pmod_0__io"] == ("inout", 8)
    assert "create_bd_port -dir IO -from 7 -to 0 pmod_0__io" in plan.files[f"{DESIGN}_bd.tcl"]


def test_amaranth_boards_pmod_extension_fits_the_connector():
    from amaranth_boards.extensions.pmod import PmodGPIOType1Resource

    def gpio(m, platform):
        port = platform.request("pmod_gpio", 0, dir="-")
        m.submodules.gpio = buf = io.Buffer("i", port)
        keep = Signal(4)
        m.d.sync += keep.eq(buf.i)

    _, plan = _prepare(gpio, resources=[PmodGPIOType1Resource("pmod_gpio", 0, Attrs(IOSTANDARD="LVCMOS33"), pmod=0)])
    bits = _xdc_bits(plan.files[f"{DESIGN}.xdc"])
    assert {b: a["PACKAGE_PIN"] for b, a in bits.items()} == {
        f"pmod_gpio_0__io[{i}]": pin for i, pin in enumerate(XDC_PMOD_PINS_1_TO_4)}
    assert all(a["IOSTANDARD"] == "LVCMOS33" for a in bits.values())
    assert _top_module_ports(plan.files[f"{DESIGN}.v"], DESIGN)["pmod_gpio_0__io"] == ("input", 4)
    assert "create_bd_port -dir I -from 3 -to 0 pmod_gpio_0__io" in plan.files[f"{DESIGN}_bd.tcl"]


# ---------------------------------------------------------------------------
# The fan enable, with the older request() style (Amaranth adds the pin buffer)
# ---------------------------------------------------------------------------

def test_fan_enable_is_placed_and_active_low():
    def fan(m, platform):
        with pytest.warns(DeprecationWarning):
            pin = platform.request("fan", 0)
        m.d.comb += pin.o.eq(1)

    platform, plan = _prepare(fan)
    bits = _xdc_bits(plan.files[f"{DESIGN}.xdc"])
    assert bits == {"fan_0__io": {"PACKAGE_PIN": XDC_FAN_EN_B, **XDC_ATTRS}}
    assert _top_module_ports(plan.files[f"{DESIGN}.v"], DESIGN)["fan_0__io"] == ("output", 1)
    assert "create_bd_port -dir O fan_0__io" in plan.files[f"{DESIGN}_bd.tcl"]
    # fan_en_b is active low: o = 1 must drive the pin low.
    assert platform.lookup("fan", 0).ios[0].invert is True


# ---------------------------------------------------------------------------
# No request, no pins: the accelerator's build is what it was
# ---------------------------------------------------------------------------

def test_without_requests_nothing_is_placed():
    platform, plan = _prepare(lambda m, platform: None)
    assert platform.design.pl_io == ()
    assert "PACKAGE_PIN" not in plan.files[f"{DESIGN}.xdc"] and "no I/O pins" in plan.files[f"{DESIGN}.xdc"]
    assert "create_bd_port" not in plan.files[f"{DESIGN}_bd.tcl"]
    assert re.search(rf"^module {DESIGN}_lint_top;$", plan.files[f"sim/{DESIGN}_lint_top.v"], re.M)
    assert plan.files[f"{DESIGN}_accel.v"].rstrip().endswith("endmodule")
    assert re.search(r"output wire irq\n\);", plan.files[f"{DESIGN}_accel.v"])


def test_platform_module_needs_no_private_amaranth_names():
    from pathlib import Path
    src = (Path(__file__).resolve().parent.parent / "boards" / "kv260.py").read_text()
    assert not re.search(r"amaranth\.\w+\._\w+|from amaranth[\w.]* import _", src)


# ---------------------------------------------------------------------------
# The whole board flow with a top that requests pins
# ---------------------------------------------------------------------------

class PinsTop(Accelerator):
    """A user's design for boards.build.run_build(args, top=...): the accelerator, a blinker on Pmod
    pin 1 (through the whole "pmod" resource, the other seven pins inputs) and the fan on."""

    def elaborate(self, platform):
        m = super().elaborate(platform)
        pmod = platform.request("pmod", 0, dir="-")
        m.submodules.led = led = io.Buffer("o", pmod[0])
        m.submodules.rest = rest = io.Buffer("i", pmod[1:])
        counter, seen = Signal(28), Signal(7)
        m.d.sync += [counter.eq(counter + 1), seen.eq(rest.i)]
        m.d.comb += led.o.eq(counter[-1] ^ seen.xor())
        fan = platform.request("fan", 0, dir="-")
        m.submodules.fan = fan_buf = io.Buffer("o", fan)
        m.d.comb += fan_buf.o.eq(1)
        return m


def test_board_build_with_pins_lints_clean_and_places_them(tmp_path):
    import argparse
    import json

    from boards.build import add_build_args, run_build
    out = tmp_path / "build"
    parser = argparse.ArgumentParser()
    add_build_args(parser)
    args = parser.parse_args(["--hw-config", "test-4x4-g32", "--name", APP, "--out", str(out), "--generate-only"])
    rc = run_build(args, top=PinsTop(CONFIG))
    assert rc == 3
    steps = {s["name"]: s for s in json.loads((out / "manifest.json").read_text())["steps"]}
    if steps["lint"]["status"] != "skipped":
        assert steps["lint"]["status"] == "done" and steps["lint"]["clean"], steps["lint"]
    bits = _xdc_bits((out / "hw" / f"{DESIGN}.xdc").read_text())
    assert bits["pmod_0__io[0]"]["PACKAGE_PIN"] == XDC_PMOD_PINS_1_TO_4[0]
    assert bits["fan_0__io"] == {"PACKAGE_PIN": XDC_FAN_EN_B, **XDC_ATTRS}
    ports = _top_module_ports((out / "hw" / f"{DESIGN}.v").read_text(), DESIGN)
    assert ports["pmod_0__io"] == ("inout", 8) and ports["fan_0__io"] == ("output", 1)
