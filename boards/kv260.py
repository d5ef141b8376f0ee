"""The Kria KV260 (K26 SOM): Amaranth platform, PS8 block design, Vivado flow and Linux overlay.

Everything the accelerator needs from the board goes through the Zynq
UltraScale+ PS8; the carrier's few PL pins (the Pmod connector J2 and the fan
enable) are declared as Amaranth resources, in amaranth-boards' style, for
designs that want them (docs/kv260.md, "Using the KV260's PL I/O"). The pieces:

* :class:`TopPorts` reads the port set of the accelerator top
  (``rtl.top.build_top``) and checks it against the config: ``csr`` AXI4-Lite
  slave, ``hp0..hp{engines-1}`` AXI4 masters of ``port_bits``, ``irq``, and
  the ``sync`` domain's ``clk``/``rst``.
* :class:`Kv260Design` turns (config, ports, app name) into every text file of
  the build: the Vivado block design and project Tcl, the XDC, a Verilog
  wrapper that tells Vivado which ports form which AXI interface, the bootgen
  .bif, the device-tree overlay and shell.json, and, for the open-tool checks,
  a PS8 stub and a lint top wired the way the block design wires the core.
  Every width, clock and address in them is read from the config or the
  ports here, once.
* ``KV260Platform`` is an Amaranth ``XilinxPlatform`` (``xck26`` /
  ``sfvc784`` / ``2LV-c``) whose ``prepare()`` writes all of that as one
  BuildPlan without running Vivado. Pins a design requests with
  ``platform.request()`` become ports of the core, of its block-design cell and
  of the block design, constrained in the XDC.

Why a block design rather than instantiating PS8 in our Verilog: docs/kv260.md.

This module imports Amaranth only when the platform class or
``TopPorts.from_component`` is used, so board-side code can read the board
facts (register window, UIO and u-dma-buf names) without the hardware tools.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from sw.contract.commands import CSR_ADDR_WIDTH
from sw.contract.errors import ConfigError

__all__ = [
    "DEVICE", "PACKAGE", "SPEED", "PART", "BOARD_PART_GLOB", "CSR_BASE", "DDR_LOW_BASE", "DDR_LOW_SIZE",
    "MAX_HP_PORTS", "HPM0_DATA_BITS", "HP_PS_ADDR_BITS", "HP_PS_ID_BITS", "PL_PS_IRQ0_GIC_SPI",
    "UIO_NAME", "UDMABUF_NAME", "DEFAULT_DMA_MB", "PMOD_J2_PINS", "FAN_EN_B_PIN", "CARRIER_IO_ATTRS",
    "HpPort", "TopPorts", "PlPort", "Kv260Design", "app_design_name", "KV260Platform",
]

# ---------------------------------------------------------------------------
# Facts of the K26 SOM and its PS8 (Zynq UltraScale+ TRM UG1085, Kria docs)
# ---------------------------------------------------------------------------
DEVICE, PACKAGE, SPEED = "xck26", "sfvc784", "2LV-c"
PART = f"{DEVICE}-{PACKAGE}-{SPEED}"
BOARD_PART_GLOB = "xilinx.com:kv260_som:*"      # the SOM board files; the newest installed version is used

CSR_BASE = 0xA000_0000                            # first address of M_AXI_HPM0_FPD's PL window
MIN_BD_RANGE = 0x1000                             # the block design maps nothing smaller than 4 KiB
DDR_LOW_BASE, DDR_LOW_SIZE = 0x0000_0000, 0x8000_0000   # what the HP ports see of DDR: the low 2 GB
MAX_HP_PORTS = 4                                  # S_AXI_HP0..3_FPD
HP_PS_ADDR_BITS = 49                              # S_AXI_HPn_FPD address width
HP_PS_ID_BITS = 6                                 # S_AXI_HPn_FPD AXI ID width
HPM0_DATA_BITS = 128                              # M_AXI_HPM0_FPD width: the Kria boot default (AFI_FS = 0xA00)
HPM0_ADDR_BITS = 40
HPM0_ID_BITS = 16
PL_PS_IRQ0_GIC_SPI = 89                           # pl_ps_irq0[0] is GIC interrupt 121 = SPI 89
GIC_SPI, IRQ_TYPE_LEVEL_HIGH = 0, 4
ZYNQMP_CLK_PL0_REF = 71                           # include/dt-bindings/clock/xlnx-zynqmp-clk.h
ZYNQMP_RESET_PS_PL = (116, 117, 118, 119)         # ZYNQMP_RESET_PS_PL0..3
# AFI registers the xlnx,afi-fpga driver writes (config-afi = <regid value>):
# AFIFM0..6 RDCTRL/WRCTRL are regids 2n, 2n+1; AFIFM n serves S_AXI_GP n
# (0,1 = HPC0/1, 2..5 = HP0..3, 6 = LPD); AFIFS (14) holds the HPM0/HPM1_FPD widths.
AFI_FM_WIDTH_CODE = {128: 0, 64: 1, 32: 2}
AFIFS_REGID = 14
AFIFS_SS0_CODE = {128: 0x200, 64: 0x100, 32: 0x000}   # M_AXI_HPM0_FPD, bits [9:8]
AFIFS_SS1_CODE = {128: 0x800, 64: 0x400, 32: 0x000}   # M_AXI_HPM1_FPD, bits [11:10]; unused, kept at 128

UIO_NAME = "kriallm"                              # /sys/class/uio/uioN/name of the register window
UDMABUF_NAME = "udmabuf-kriallm"                  # /dev/udmabuf-kriallm
DEFAULT_DMA_MB = 300                              # INT4 Qwen2.5-0.5B (.kq ~ 266-465 MB by LM-head format)
DMA_HEADROOM_MB = 64                              # KV cache, activations, command lists beyond the weights

_APP_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")

# ---------------------------------------------------------------------------
# The KV260 carrier card's PL-side I/O
# ---------------------------------------------------------------------------
# Every package pin here is taken from AMD/Xilinx's own KV260 constraint files in
# github.com/Xilinx/kria-vitis-platforms (Apache-2.0):
#   [bist] kv260/platforms/vivado/kv260_bist/xdc/pin.xdc
#   [base] k26/platforms/k26_base_starter_kit/xdc/default.xdc
# The files constrain all of them IOSTANDARD LVCMOS33, SLEW SLOW, DRIVE 4: CARRIER_IO_ATTRS. (They are
# bank-45 pins, IO_L*_45, per the comments of the KV260 carrier XDC template as quoted in
# github.com/michealcarac/SeniorCapstone VivadoPrjs/ConstraintFiles/TutorialPMOD.xdc.)
#
# Pmod connector J2, in Digilent's Pmod numbering, which amaranth-boards' Connector("pmod", ...)
# and amaranth_boards.extensions.pmod use: pins 1-4 one row, 5/6 GND/3V3, 7-10 the other row,
# 11/12 GND/3V3. The KV260's own J2 numbering is odd/even instead (1 3 5 7 9 11 on one row, 2 4 6 8
# 10 12 on the other, per the carrier XDC template's comments quoted in TutorialPMOD.xdc above; J2 pin 1
# is HDA11/H12, pin 2 HDA15/B10): Digilent 1-4 are J2 1 3 5 7, Digilent 7-10 are J2 2 4 6 8.
#   [bist] "#Digilent PMOD pins / output - HDA11, HDA12, HDA13, HDA14": H12 E10 D10 C11 (one row)
#          "input - HDA15, HDA16, HDA17, HDA18":                       B10 E12 D11 B11 (the other)
PMOD_J2_PINS = {1: "H12", 2: "E10", 3: "D10", 4: "C11", 7: "B10", 8: "E12", 9: "D11", 10: "B11"}
# Fan enable, active low (the _b): [base] and [bist] "#Fan Speed Enable", port fan_en_b on A12 (the
# carrier's HDA20 in third-party KV260 XDCs). Xilinx's starter-kit designs drive it from the PS's TTC0
# wave output through EMIO, i.e. as a PWM.
FAN_EN_B_PIN = "A12"
CARRIER_IO_ATTRS = {"IOSTANDARD": "LVCMOS33", "SLEW": "SLOW", "DRIVE": "4"}
# No LED or button appears in these PL constraint files (the board's status LEDs and buttons are
# not PL pins there), so the platform declares none.


def app_design_name(app_name: str) -> str:
    """The HDL/Vivado identifier of an xmutil app name (dashes are not legal there)."""
    if not _APP_NAME_RE.match(app_name):
        raise ConfigError(f"app name {app_name!r} must start with a letter and use only letters, digits, "
                          f"'-' and '_' (it names the firmware folder and the Vivado project)")
    return app_name.replace("-", "_")


# ---------------------------------------------------------------------------
# The accelerator's ports
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BusMember:
    name: str         # AXI spelling: "araddr", "rdata", ...
    width: int
    output: bool      # driven by the accelerator


def _master_drives(member: str) -> bool:
    """True for the AXI members the manager drives: the AR, AW and W channels (but their READY), RREADY, BREADY."""
    if member in ("arready", "awready", "wready"):
        return False
    return member.startswith(("ar", "aw", "w")) or member in ("rready", "bready")


@dataclass(frozen=True)
class TopPorts:
    """The port set of an accelerator top, as the block design sees it."""
    csr: tuple[BusMember, ...]
    hp: tuple[tuple[BusMember, ...], ...]

    @staticmethod
    def _width(members, name) -> int:
        for m in members:
            if m.name == name:
                return m.width
        raise ConfigError(f"bus has no {name!r} member")

    @property
    def engines(self) -> int:
        return len(self.hp)

    @property
    def csr_addr_bits(self) -> int:
        return self._width(self.csr, "awaddr")

    @property
    def csr_data_bits(self) -> int:
        return self._width(self.csr, "wdata")

    @property
    def hp_data_bits(self) -> int:
        return self._width(self.hp[0], "rdata")

    @property
    def hp_addr_bits(self) -> int:
        return self._width(self.hp[0], "araddr")

    @property
    def hp_id_bits(self) -> int:
        return self._width(self.hp[0], "arid")

    @classmethod
    def from_component(cls, top, config) -> "TopPorts":
        """Read and check the ports of an Amaranth component against the config."""
        from amaranth.hdl import Shape
        from amaranth.lib import wiring

        members = dict(top.signature.members)
        problems = []
        expected = {"csr", "irq"} | {f"hp{i}" for i in range(config.engines)}
        extra = sorted(set(members) - expected)
        missing = sorted(expected - set(members))
        if missing:
            problems.append(f"missing port(s) {', '.join(missing)}")
        if extra:
            problems.append(f"port(s) the block design does not connect: {', '.join(extra)}")
        if problems:
            raise ConfigError(f"{type(top).__name__} does not have the KV260 port set "
                              f"(csr, hp0..hp{config.engines - 1}, irq): {'; '.join(problems)}")

        def bus(name):
            out = []
            for path, member, _value in top.signature.flatten(top):
                if path[0] == name and len(path) == 2:
                    out.append(BusMember(path[1], Shape.cast(member.shape).width, member.flow == wiring.Out))
            return tuple(out)

        irq = members["irq"]
        if irq.is_signature or irq.flow != wiring.Out or Shape.cast(irq.shape).width != 1:
            raise ConfigError("port irq must be a 1-bit output (level-sensitive interrupt)")
        ports = cls(bus("csr"), tuple(bus(f"hp{i}") for i in range(config.engines)))
        ports.check(config)
        return ports

    def check(self, config) -> None:
        axil = {"awaddr", "awvalid", "awready", "wdata", "wstrb", "wvalid", "wready", "bresp", "bvalid", "bready",
                "araddr", "arvalid", "arready", "rdata", "rresp", "rvalid", "rready"}
        have = {m.name for m in self.csr}
        if not axil <= have:
            raise ConfigError(f"port csr is not an AXI4-Lite slave: missing {', '.join(sorted(axil - have))}")
        if any(m.output == _master_drives(m.name) for m in self.csr):
            raise ConfigError("port csr must be an AXI4-Lite slave (the PS is the master)")
        if self.csr_data_bits != 32:
            raise ConfigError(f"csr data width is {self.csr_data_bits}, the register map is 32-bit")
        if self.csr_addr_bits != CSR_ADDR_WIDTH:
            raise ConfigError(f"csr address width is {self.csr_addr_bits} bits but the driver maps "
                              f"{CSR_ADDR_WIDTH} (sw.contract.commands.CSR_ADDR_WIDTH)")
        axi4 = {"araddr", "arlen", "arsize", "arburst", "arvalid", "arready", "rdata", "rresp", "rlast", "rvalid",
                "rready", "awaddr", "awlen", "awsize", "awburst", "awvalid", "awready", "wdata", "wstrb", "wlast",
                "wvalid", "wready", "bresp", "bvalid", "bready"}
        for i, members in enumerate(self.hp):
            names = {m.name for m in members}
            if not axi4 <= names:
                raise ConfigError(f"port hp{i} is not a full AXI4 master: missing {', '.join(sorted(axi4 - names))}")
            if not all(m.output == _master_drives(m.name) for m in members):
                raise ConfigError(f"port hp{i} must be an AXI4 master (the PS HP port is the slave)")
            data = self._width(members, "rdata")
            if data != config.port_bits or self._width(members, "wdata") != config.port_bits:
                raise ConfigError(f"port hp{i} is {data} bits wide but the config says port_bits={config.port_bits}")
            if self._width(members, "araddr") > HP_PS_ADDR_BITS:
                raise ConfigError(f"port hp{i} has a {self._width(members, 'araddr')}-bit address; "
                                  f"S_AXI_HP ports take {HP_PS_ADDR_BITS}")
            for idn in ("arid", "awid", "rid", "bid"):
                if idn in names and self._width(members, idn) > HP_PS_ID_BITS:
                    raise ConfigError(f"port hp{i} has a {self._width(members, idn)}-bit {idn}; "
                                      f"S_AXI_HP ports take {HP_PS_ID_BITS}")
            if members != self.hp[0]:
                raise ConfigError(f"port hp{i} differs from hp0; all HP masters must be alike")


# ---------------------------------------------------------------------------
# PL pins a design requested
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PlPort:
    """One port of the core that goes to package pins: a resource the design requested."""
    name: str                                   # Verilog port of the core, the cell and the block design
    direction: str                              # "input", "output" or "inout", as the core declares it
    pins: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]   # (package pin, attrs) of bit 0, 1, ...

    @property
    def width(self) -> int:
        return len(self.pins)

    @property
    def bd_dir(self) -> str:
        return {"input": "I", "output": "O", "inout": "IO"}[self.direction]

    def bits(self):
        """(the XDC's name of the bit, package pin, attrs) for every bit."""
        for i, (pin, attrs) in enumerate(self.pins):
            yield (self.name if self.width == 1 else f"{self.name}[{i}]"), pin, dict(attrs)


# ---------------------------------------------------------------------------
# One HP port
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HpPort:
    """Our master hp<k> on the PS's S_AXI_HP<k>_FPD (the PS8 IP calls it S_AXI_GP<k+2>)."""
    index: int

    @property
    def top_port(self) -> str:
        return f"hp{self.index}"

    @property
    def gp(self) -> int:
        return self.index + 2

    @property
    def bd_intf(self) -> str:
        return f"S_AXI_HP{self.index}_FPD"

    @property
    def aclk_pin(self) -> str:
        return f"saxihp{self.index}_fpd_aclk"

    @property
    def ps_prefix(self) -> str:
        return f"saxigp{self.gp}"

    @property
    def ddr_low_segment(self) -> str:
        return f"SAXIGP{self.gp}/HP{self.index}_DDR_LOW"

    @property
    def afi_fm(self) -> int:
        return self.gp

    @property
    def afi_regids(self) -> tuple[int, int]:
        return 2 * self.afi_fm, 2 * self.afi_fm + 1


def _hex(v: int, digits: int = 8) -> str:
    return f"0x{v:0{digits}X}"


def _tcl_list(items) -> str:
    return " ".join(items)


# ---------------------------------------------------------------------------
# Everything generated for one build
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Kv260Design:
    """All generated text of one KV260 build, from one config and one port set."""
    config: object            # sw.contract.config.ArrayConfig
    ports: TopPorts
    app_name: str
    dma_bytes: int = DEFAULT_DMA_MB << 20
    jobs: int = 4
    pl_io: tuple[PlPort, ...] = ()      # pins the design requested from the platform (usually none)

    def __post_init__(self):
        app_design_name(self.app_name)
        c = self.config
        if not 1 <= c.engines <= MAX_HP_PORTS:
            raise ConfigError(f"the K26 PS has {MAX_HP_PORTS} S_AXI_HP ports; engines={c.engines} cannot be wired")
        if c.port_bits not in AFI_FM_WIDTH_CODE:
            raise ConfigError(f"S_AXI_HP ports are 32, 64 or 128 bits wide; port_bits={c.port_bits}")
        if not 10 <= c.clock_mhz <= 333:
            raise ConfigError(f"pl_clk0 at {c.clock_mhz} MHz is outside what the PS makes for the PL "
                              f"(about 10-333 MHz); designs on the KV260 close at 200-250 MHz")
        if self.ports.engines != c.engines:
            raise ConfigError(f"the top has {self.ports.engines} HP masters, the config {c.engines} engines")
        if not 0 < self.dma_bytes <= DDR_LOW_SIZE // 2:
            raise ConfigError(f"u-dma-buf size {self.dma_bytes >> 20} MB must be positive and at most "
                              f"{DDR_LOW_SIZE >> 21} MB (half of the DDR the HP ports see)")
        if self.dma_bytes % 4096:
            raise ConfigError("u-dma-buf size must be a whole number of 4 KiB pages")

    # ---- names ---------------------------------------------------------
    @property
    def design(self) -> str:
        """Module name of the Amaranth core, and the prefix of every generated HDL/Vivado file."""
        return app_design_name(self.app_name)

    @property
    def cell_module(self) -> str:
        """The Verilog wrapper the block design instantiates as an RTL module reference."""
        return f"{self.design}_accel"

    @property
    def bd_name(self) -> str:
        return f"{self.design}_bd"

    @property
    def project(self) -> str:
        return self.design

    @property
    def hp_ports(self) -> tuple[HpPort, ...]:
        return tuple(HpPort(i) for i in range(self.config.engines))

    # ---- numbers -------------------------------------------------------
    @property
    def clock_hz(self) -> int:
        return self.config.clock_mhz * 1_000_000

    @property
    def csr_range(self) -> int:
        return max(MIN_BD_RANGE, 1 << self.ports.csr_addr_bits)

    @property
    def irq_gic_spi(self) -> int:
        return PL_PS_IRQ0_GIC_SPI

    def ps_config(self) -> dict[str, str]:
        """CONFIG.* values of zynq_ultra_ps_e on top of the KV260 board preset, in order."""
        c = self.config
        cfg = {
            "CONFIG.PSU__FPGA_PL0_ENABLE": "1",
            "CONFIG.PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ": str(c.clock_mhz),
            "CONFIG.PSU__NUM_FABRIC_RESETS": "1",
            "CONFIG.PSU__USE__M_AXI_GP0": "1",                       # M_AXI_HPM0_FPD: registers
            "CONFIG.PSU__MAXIGP0__DATA_WIDTH": str(HPM0_DATA_BITS),
            "CONFIG.PSU__USE__M_AXI_GP1": "0",                       # M_AXI_HPM1_FPD: unused
            "CONFIG.PSU__USE__M_AXI_GP2": "0",                       # M_AXI_HPM0_LPD: unused
            "CONFIG.PSU__USE__S_AXI_GP0": "0",                       # S_AXI_HPC0_FPD: unused (coherent port)
            "CONFIG.PSU__USE__S_AXI_GP1": "0",                       # S_AXI_HPC1_FPD: unused
        }
        for k in range(MAX_HP_PORTS):
            used = k < c.engines
            cfg[f"CONFIG.PSU__USE__S_AXI_GP{k + 2}"] = "1" if used else "0"
            if used:
                cfg[f"CONFIG.PSU__SAXIGP{k + 2}__DATA_WIDTH"] = str(c.port_bits)
        cfg["CONFIG.PSU__USE__S_AXI_GP6"] = "0"                      # S_AXI_LPD: unused
        cfg["CONFIG.PSU__USE__IRQ0"] = "1"                           # pl_ps_irq0
        cfg["CONFIG.PSU__USE__IRQ1"] = "0"
        return cfg

    def afi_config(self) -> list[tuple[int, int]]:
        """config-afi pairs: fabric width of every HP port we use, and of M_AXI_HPM0_FPD."""
        pairs = []
        for hp in self.hp_ports:
            rd, wr = hp.afi_regids
            pairs += [(rd, AFI_FM_WIDTH_CODE[self.config.port_bits]), (wr, AFI_FM_WIDTH_CODE[self.config.port_bits])]
        pairs.append((AFIFS_REGID, AFIFS_SS0_CODE[HPM0_DATA_BITS] | AFIFS_SS1_CODE[128]))
        return pairs

    # ---- Vivado: block design -------------------------------------------
    def bd_tcl(self) -> str:
        c, p = self.config, self.ports
        cfg = " \\\n        ".join(f"{k} {{{v}}}" for k, v in self.ps_config().items())
        hp = self.hp_ports
        clock_pins = ["ps/maxihpm0_fpd_aclk", "accel/clk", "rst_pl/slowest_sync_clk", "smc_csr/aclk"]
        clock_pins += [f"ps/{h.aclk_pin}" for h in hp]
        intfs = ["csr"] + [h.top_port for h in hp]
        lines = [
            f"# Block design {self.bd_name}: the K26 PS8 and the kriallm accelerator ({self.cell_module},",
            f"# an RTL module reference). Generated from ArrayConfig {c.config_hash[:16]}; every width, clock",
            "# and address below comes from that config and the accelerator's ports.",
            f"#   engines {c.engines}: S_AXI_HP0..{c.engines - 1}_FPD at {c.port_bits} bits, DDR low "
            f"{_hex(DDR_LOW_BASE)}..{_hex(DDR_LOW_BASE + DDR_LOW_SIZE - 1)}",
            f"#   registers: M_AXI_HPM0_FPD ({HPM0_DATA_BITS}-bit) -> SmartConnect -> AXI4-Lite "
            f"{p.csr_data_bits}-bit at {_hex(CSR_BASE)}, {self.csr_range} bytes",
            f"#   clock: pl_clk0 at {c.clock_mhz} MHz; reset: pl_resetn0 -> proc_sys_reset -> rst (active high)",
            f"#   interrupt: irq -> pl_ps_irq0[0] (GIC SPI {self.irq_gic_spi}, level high)",
            "",
            f"proc kriallm_create_bd {{bd_name}} {{",
            "    create_bd_design $bd_name",
            "    current_bd_design $bd_name",
            "",
            "    # The PS with the SOM's board preset (DDR, MIO, clocks of the K26), then our ports.",
            "    set ps [create_bd_cell -type ip -vlnv xilinx.com:ip:zynq_ultra_ps_e ps]",
            '    apply_bd_automation -rule xilinx.com:bd_rule:zynq_ultra_ps_e -config {apply_board_preset "1"} $ps',
            "    set_property -dict [list \\",
            f"        {cfg} \\",
            "    ] $ps",
            "",
            f"    set accel [create_bd_cell -type module -reference {self.cell_module} accel]",
            "    set rst_pl [create_bd_cell -type ip -vlnv xilinx.com:ip:proc_sys_reset rst_pl]",
            "    set smc_csr [create_bd_cell -type ip -vlnv xilinx.com:ip:smartconnect smc_csr]",
            "    set_property -dict [list CONFIG.NUM_SI {1} CONFIG.NUM_MI {1}] $smc_csr",
            "",
            "    # One clock for everything: pl_clk0.",
            "    connect_bd_net [get_bd_pins ps/pl_clk0] \\",
            "        " + " \\\n        ".join(f"[get_bd_pins {pin}]" for pin in clock_pins),
            "    # pl_resetn0 -> proc_sys_reset, which synchronises it to pl_clk0.",
            "    connect_bd_net [get_bd_pins ps/pl_resetn0] [get_bd_pins rst_pl/ext_reset_in]",
            "    connect_bd_net [get_bd_pins rst_pl/peripheral_reset] [get_bd_pins accel/rst]",
            "    connect_bd_net [get_bd_pins rst_pl/interconnect_aresetn] [get_bd_pins smc_csr/aresetn]",
            "",
            "    # Registers: HPM0_FPD -> SmartConnect (AXI4 to AXI4-Lite, width conversion) -> csr.",
            "    connect_bd_intf_net [get_bd_intf_pins ps/M_AXI_HPM0_FPD] [get_bd_intf_pins smc_csr/S00_AXI]",
            "    connect_bd_intf_net [get_bd_intf_pins smc_csr/M00_AXI] [get_bd_intf_pins accel/csr]",
            "",
            "    # Memory: each engine's AXI4 master straight onto its HP port (no interconnect in the path).",
        ]
        for h in hp:
            lines.append(f"    connect_bd_intf_net [get_bd_intf_pins accel/{h.top_port}] "
                         f"[get_bd_intf_pins ps/{h.bd_intf}]")
        lines += [
            "",
            "    connect_bd_net [get_bd_pins accel/irq] [get_bd_pins ps/pl_ps_irq0]",
            "",
        ]
        if self.pl_io:
            lines.append("    # PL pins the design requested: external ports of the block design (placed by the XDC).")
            for port in self.pl_io:
                rng = f" -from {port.width - 1} -to 0" if port.width > 1 else ""
                lines.append(f"    create_bd_port -dir {port.bd_dir}{rng} {port.name}")
                lines.append(f"    connect_bd_net [get_bd_ports {port.name}] [get_bd_pins accel/{port.name}]")
            lines.append("")
        lines += [
            "    # A module reference assumes 100 MHz on its clock and interfaces; give it what the PS makes.",
            "    set freq_hz [get_property CONFIG.FREQ_HZ [get_bd_pins ps/pl_clk0]]",
            "    set_property CONFIG.FREQ_HZ $freq_hz [get_bd_pins accel/clk]",
            f"    foreach intf {{{_tcl_list(intfs)}}} {{",
            "        set_property CONFIG.FREQ_HZ $freq_hz [get_bd_intf_pins accel/$intf]",
            "    }",
            f"    set requested_hz {self.clock_hz}",
            "    if {abs($freq_hz - $requested_hz) > $requested_hz / 100} {",
            '        error "pl_clk0 is $freq_hz Hz, more than 1 % from the requested $requested_hz Hz: '
            'the PS PLLs cannot make this clock_mhz"',
            "    }",
            "",
            "    # Address map: the register window for the PS, DDR low for every HP master.",
            f"    assign_bd_address -offset {_hex(CSR_BASE)} -range {_hex(self.csr_range)} "
            "-target_address_space [get_bd_addr_spaces ps/Data] [get_bd_addr_segs accel/csr/reg0] -force",
        ]
        for h in hp:
            lines.append(f"    assign_bd_address -offset {_hex(DDR_LOW_BASE)} -range {_hex(DDR_LOW_SIZE)} "
                         f"-target_address_space [get_bd_addr_spaces accel/{h.top_port}] "
                         f"[get_bd_addr_segs ps/{h.ddr_low_segment}] -force")
        lines += [
            "    # The HP ports also reach DDR high, OCM and QSPI; our masters use DDR low only, so exclude the rest",
            "    # (otherwise validate_bd_design warns that they are unmapped).",
        ]
        for h in hp:
            lines += [
                f"    foreach seg [get_bd_addr_segs -quiet ps/SAXIGP{h.gp}/*] {{",
                "        if {![string match *_DDR_LOW $seg]} {",
                f"            catch {{exclude_bd_addr_seg -target_address_space [get_bd_addr_spaces accel/{h.top_port}] $seg}}",
                "        }",
                "    }",
            ]
        lines += [
            "",
            "    validate_bd_design",
            "    save_bd_design",
            "    return $freq_hz",
            "}",
        ]
        return "\n".join(lines) + "\n"

    # ---- Vivado: project flow -------------------------------------------
    def flow_tcl(self) -> str:
        """Project-mode flow: project, block design, wrapper, synth, impl, bitstream, .xsa, .hwh, .bit.bin."""
        app, d = self.app_name, self.design
        return f"""\
# Vivado flow for {app} on the KV260: vivado -mode batch -source {d}.tcl [-tclargs --jobs N]
# Generated by `kriallm build`; ArrayConfig {self.config.config_hash}.
# Needs Vivado 2022.2 or newer with the Kria SOM board files (docs/kv260.md).
set here [file normalize [file dirname [info script]]]
set out_dir [file normalize [file join $here ..]]
set jobs 4                                   ;# build_{d}.sh passes kriallm build's --jobs
foreach {{key value}} $argv {{ if {{$key eq "--jobs"}} {{ set jobs $value }} }}
set app {app}
set proj {self.project}
set bd {self.bd_name}

create_project -force $proj [file join $here vivado] -part {PART}
set board_part [lindex [lsort -dictionary [get_board_parts -quiet {BOARD_PART_GLOB}]] end]
if {{$board_part eq ""}} {{
    error "the KV260 SOM board files ({BOARD_PART_GLOB}) are not installed: in Vivado run\
 xhub::refresh_catalog \\[xhub::get_xstores xilinx_board_store\\]; xhub::install \\[xhub::get_xitems *kv260*\\]"
}}
set_property board_part $board_part [current_project]
set_property target_language Verilog [current_project]

add_files -norecurse [list [file join $here {d}.v] [file join $here {self.cell_module}.v]]
add_files -fileset constrs_1 -norecurse [file join $here {d}.xdc]
update_compile_order -fileset sources_1

source [file join $here {d}_bd.tcl]
set pl_clk_hz [kriallm_create_bd $bd]
set bd_file [get_files $bd.bd]
generate_target all $bd_file
set wrapper [make_wrapper -files $bd_file -top]
if {{$wrapper eq ""}} {{
    set wrapper [lindex [glob -nocomplain [file join $here vivado $proj.gen sources_1 bd $bd hdl ${{bd}}_wrapper.v] \\
                                        [file join $here vivado $proj.srcs sources_1 bd $bd hdl ${{bd}}_wrapper.v]] 0]
}}
add_files -norecurse $wrapper
set_property top ${{bd}}_wrapper [current_fileset]
update_compile_order -fileset sources_1

launch_runs synth_1 -jobs $jobs
wait_on_run synth_1
if {{[get_property PROGRESS [get_runs synth_1]] ne "100%"}} {{ error "synthesis failed: see [file join $here vivado $proj.runs synth_1 runme.log]" }}
launch_runs impl_1 -to_step write_bitstream -jobs $jobs
wait_on_run impl_1
if {{[get_property PROGRESS [get_runs impl_1]] ne "100%"}} {{ error "implementation failed: see [file join $here vivado $proj.runs impl_1 runme.log]" }}

file mkdir [file join $out_dir outputs] [file join $out_dir reports]
open_run impl_1
report_timing_summary -file [file join $out_dir reports timing_summary.rpt]
report_utilization -file [file join $out_dir reports utilization.rpt]
report_utilization -hierarchical -file [file join $out_dir reports utilization_hierarchical.rpt]
proc kriallm_slack {{kind}} {{
    set slack [get_property SLACK [get_timing_paths -max_paths 1 -nworst 1 $kind]]
    if {{![string is double -strict $slack]}} {{ return null }}
    return $slack
}}
set wns [kriallm_slack -setup]
set whs [kriallm_slack -hold]
set summary [open [file join $out_dir outputs ${{app}}_vivado.json] w]
puts $summary "{{\\"vivado\\": \\"[version -short]\\", \\"board_part\\": \\"$board_part\\", \\"pl_clk0_hz\\": $pl_clk_hz, \\"wns_ns\\": $wns, \\"whs_ns\\": $whs}}"
close $summary
if {{($wns ne "null" && $wns < 0) || ($whs ne "null" && $whs < 0)}} {{
    error "timing not met at $pl_clk_hz Hz (WNS $wns ns, WHS $whs ns): lower clock_mhz or add pipeline stages"
}}

file copy -force [file join [get_property DIRECTORY [get_runs impl_1]] ${{bd}}_wrapper.bit] [file join $out_dir outputs $app.bit]
write_hw_platform -fixed -include_bit -force -file [file join $out_dir outputs $app.xsa]
set hwh [lindex [glob -nocomplain [file join $here vivado $proj.gen sources_1 bd $bd hw_handoff $bd.hwh] \\
                                  [file join $here vivado $proj.srcs sources_1 bd $bd hw_handoff $bd.hwh]] 0]
if {{$hwh eq ""}} {{ error "no hardware handoff (.hwh) for $bd: generate_target did not write one" }}
file copy -force $hwh [file join $out_dir outputs $app.hwh]

# .bit.bin for the Linux FPGA manager. Without bootgen, `kriallm build` does the same byte swap in Python.
file copy -force [file join $here {d}.bif] [file join $out_dir outputs $app.bif]
if {{[auto_execok bootgen] ne ""}} {{
    set cwd [pwd]
    cd [file join $out_dir outputs]
    exec -ignorestderr bootgen -arch zynqmp -process_bitstream bin -image $app.bif -w on
    cd $cwd
}}

# The firmware folder for xmutil and the PYNQ pair (.bit + .hwh with the same base name).
set fw [file join $out_dir firmware xilinx $app]
set pynq [file join $out_dir pynq]
file mkdir $fw $pynq
if {{[file exists [file join $out_dir outputs $app.bit.bin]]}} {{
    file copy -force [file join $out_dir outputs $app.bit.bin] [file join $fw $app.bit.bin]
}}
file copy -force [file join $out_dir outputs $app.bit] [file join $pynq $app.bit]
file copy -force [file join $out_dir outputs $app.hwh] [file join $pynq $app.hwh]
puts "kriallm: built $app ($pl_clk_hz Hz, WNS $wns ns)"
"""

    def xdc(self) -> str:
        if not self.pl_io:
            return f"""\
# Constraints for {self.app_name}. Intentionally (almost) empty:
# * the only clock is pl_clk0; the zynq_ultra_ps_e IP's own XDC creates it (clk_pl_0) at the
#   frequency the PS really makes ({self.config.clock_mhz} MHz requested), so no create_clock here;
# * one clock domain and no I/O pins: no false paths, no input/output delays;
# * reset comes from proc_sys_reset, already synchronous to pl_clk0.
"""
        lines = [
            f"# Constraints for {self.app_name}.",
            "# * the only clock is pl_clk0; the zynq_ultra_ps_e IP's own XDC creates it (clk_pl_0) at the",
            f"#   frequency the PS really makes ({self.config.clock_mhz} MHz requested), so no create_clock here;",
            "# * reset comes from proc_sys_reset, already synchronous to pl_clk0;",
            "# * the PL pins the design requested (KV260Platform resources; package pins from AMD/Xilinx's KV260",
            "#   constraint files, see boards/kv260.py). They are external ports of the block design with the",
            "#   core's port names. They carry no input/output delays: slow signals (LEDs, the fan, Pmod GPIO);",
            "#   a design with a timed Pmod interface adds its own.",
        ]
        for port in self.pl_io:
            lines.append(f"# {port.name}: {port.direction}, {port.width} pin{'s' if port.width > 1 else ''}")
            for bit, pin, attrs in port.bits():
                lines.append(f"set_property PACKAGE_PIN {pin} [get_ports {{{bit}}}]")
                for key, value in attrs.items():
                    lines.append(f"set_property {key} {value} [get_ports {{{bit}}}]")
        return "\n".join(lines) + "\n"

    def bif(self) -> str:
        return f"all:\n{{\n    {self.app_name}.bit\n}}\n"

    # ---- Verilog: the cell the block design instantiates -------------------
    def _ports_of_cell(self):
        """(cell port, core port, member, bus, output, width) for every bus member, in order."""
        rows = []
        for m in self.ports.csr:
            rows.append((f"csr_{m.name}", f"csr__{m.name}", m, "csr"))
        for h, members in zip(self.hp_ports, self.ports.hp):
            for m in members:
                rows.append((f"{h.top_port}_{m.name}", f"{h.top_port}__{m.name}", m, h.top_port))
        return rows

    def _bus_parameter(self, bus: str) -> str:
        p = self.ports
        if bus == "csr":
            return (f"XIL_INTERFACENAME csr, PROTOCOL AXI4LITE, DATA_WIDTH {p.csr_data_bits}, "
                    f"ADDR_WIDTH {p.csr_addr_bits}")
        return (f"XIL_INTERFACENAME {bus}, PROTOCOL AXI4, DATA_WIDTH {p.hp_data_bits}, "
                f"ADDR_WIDTH {p.hp_addr_bits}, ID_WIDTH {p.hp_id_bits}")

    def cell_verilog(self) -> str:
        """The block design's view of the core: Vivado interface attributes, single-underscore names."""
        busif = ":".join(["csr"] + [h.top_port for h in self.hp_ports])
        decls = [
            '    (* X_INTERFACE_INFO = "xilinx.com:signal:clock:1.0 clk CLK" *)',
            f'    (* X_INTERFACE_PARAMETER = "XIL_INTERFACENAME clk, ASSOCIATED_BUSIF {busif}, ASSOCIATED_RESET rst" *)',
            "    input wire clk,",
            '    (* X_INTERFACE_INFO = "xilinx.com:signal:reset:1.0 rst RST" *)',
            '    (* X_INTERFACE_PARAMETER = "XIL_INTERFACENAME rst, POLARITY ACTIVE_HIGH" *)',
            "    input wire rst,",
        ]
        seen = set()
        for cell, _core, m, bus in self._ports_of_cell():
            decls.append(f'    (* X_INTERFACE_INFO = "xilinx.com:interface:aximm:1.0 {bus} {m.name.upper()}" *)')
            if bus not in seen:
                seen.add(bus)
                decls.append(f'    (* X_INTERFACE_PARAMETER = "{self._bus_parameter(bus)}" *)')
            rng = f"[{m.width - 1}:0] " if m.width > 1 else ""
            decls.append(f"    {'output' if m.output else 'input'} wire {rng}{cell},")
        decls += [
            '    (* X_INTERFACE_INFO = "xilinx.com:signal:interrupt:1.0 irq INTERRUPT" *)',
            '    (* X_INTERFACE_PARAMETER = "XIL_INTERFACENAME irq, SENSITIVITY LEVEL_HIGH" *)',
            "    output wire irq",
        ]
        for port in self.pl_io:       # requested PL pins: straight through to the block design's ports
            rng = f"[{port.width - 1}:0] " if port.width > 1 else ""
            decls[-1] += ","
            decls.append(f"    {port.direction} wire {rng}{port.name}")
        conns = [".clk(clk)", ".rst(rst)"] + [f".{core}({cell})" for cell, core, _m, _b in self._ports_of_cell()]
        conns.append(".irq(irq)")
        conns += [f".{port.name}({port.name})" for port in self.pl_io]
        return (f"// {self.cell_module}: the kriallm core as the block design sees it (RTL module reference).\n"
                f"// Generated by `kriallm build` from ArrayConfig {self.config.config_hash[:16]}; do not edit.\n"
                f"// Vivado reads the X_INTERFACE attributes to group the ports into AXI interfaces.\n"
                f"module {self.cell_module} (\n" + "\n".join(decls) + "\n);\n"
                f"    {self.design} core (\n        " + ",\n        ".join(conns) + "\n    );\n"
                f"endmodule\n")

    # ---- Verilog: PS8 stub and lint top (open-tool checks only) -----------
    def _hpm0_width(self, name: str, our_width: int) -> int:
        if name in ("araddr", "awaddr"):
            return HPM0_ADDR_BITS
        if name in ("rdata", "wdata"):
            return HPM0_DATA_BITS
        if name == "wstrb":
            return HPM0_DATA_BITS // 8
        return our_width

    def _hp_ps_width(self, name: str, our_width: int) -> int:
        if name in ("araddr", "awaddr"):
            return HP_PS_ADDR_BITS
        if name in ("arid", "awid", "rid", "bid"):
            return HP_PS_ID_BITS
        if name in ("rdata", "wdata"):
            return self.config.port_bits      # what the block design sets as PSU__SAXIGPn__DATA_WIDTH
        if name == "wstrb":
            return self.config.port_bits // 8
        return our_width

    # AXI4 members the HPM0 master has beyond AXI4-Lite, with their widths and who drives them.
    _HPM0_EXTRA = (("awid", HPM0_ID_BITS, True), ("awlen", 8, True), ("awsize", 3, True), ("awburst", 2, True),
                   ("awlock", 1, True), ("awcache", 4, True), ("awqos", 4, True), ("wlast", 1, True),
                   ("bid", HPM0_ID_BITS, False), ("arid", HPM0_ID_BITS, True), ("arlen", 8, True),
                   ("arsize", 3, True), ("arburst", 2, True), ("arlock", 1, True), ("arcache", 4, True),
                   ("arqos", 4, True), ("rid", HPM0_ID_BITS, False), ("rlast", 1, False))

    def ps8_stub_verilog(self) -> str:
        """A port-level stand-in for zynq_ultra_ps_e with the PS8's names and widths, for Verilator/Yosys."""
        ports = ["    output wire pl_clk0", "    output wire pl_resetn0", "    input wire maxihpm0_fpd_aclk",
                 "    input wire [0:0] pl_ps_irq0"]
        body = ["    assign pl_clk0 = 1'b0;", "    assign pl_resetn0 = 1'b0;"]

        def port(direction, width, name):
            rng = f"[{width - 1}:0] " if width > 1 else ""
            ports.append(f"    {direction} wire {rng}{name}")
            if direction == "output":
                body.append(f"    assign {name} = {width}'d0;")

        # M_AXI_HPM0_FPD: the PS is the master.
        for m in self.ports.csr:
            port("input" if m.output else "output", self._hpm0_width(m.name, m.width), f"maxigp0_{m.name}")
        for name, width, ps_drives in self._HPM0_EXTRA:
            port("output" if ps_drives else "input", width, f"maxigp0_{name}")
        for h, members in zip(self.hp_ports, self.ports.hp):
            ports.append(f"    input wire {h.aclk_pin}")
            for m in members:   # the PS is the slave: our outputs are its inputs
                port("input" if m.output else "output", self._hp_ps_width(m.name, m.width), f"{h.ps_prefix}_{m.name}")
        return ("// Port-level stand-in for the PS8 (zynq_ultra_ps_e) as the block design configures it, for the\n"
                "// open-tool checks (lint, Yosys) of the wiring. Not a model: every output is constant.\n"
                "/* verilator lint_off UNUSEDSIGNAL */\n"
                f"module {self.design}_ps8_stub (\n" + ",\n".join(ports) + "\n);\n" + "\n".join(body)
                + "\nendmodule\n/* verilator lint_on UNUSEDSIGNAL */\n" + self._io_primitive_stubs())

    # Port-level stand-ins for the UNISIM primitives Amaranth's XilinxPlatform instantiates for the
    # I/O buffers of requested pins (amaranth/vendor/_xilinx.py: Buffer, FFBuffer, DDRBuffer on
    # UltraScale+), with the ports and parameters it connects. Vivado brings the real ones.
    _IO_PRIMITIVES = (
        "module IBUF (input wire I, output wire O);\n    assign O = I;\nendmodule",
        "module OBUFT (input wire I, input wire T, output wire O);\n    assign O = I;\nendmodule",
        "module IOBUF (input wire I, input wire T, output wire O, inout wire IO);\n    assign O = I;\nendmodule",
        "module FDCE (input wire C, input wire CE, input wire CLR, input wire D, output reg Q);\n"
        "    always @(posedge C) Q <= D;\nendmodule",
        "module IDDRE1 #(parameter DDR_CLK_EDGE = \"SAME_EDGE_PIPELINED\", parameter [0:0] IS_C_INVERTED = 1'b0,\n"
        "               parameter [0:0] IS_CB_INVERTED = 1'b1)\n"
        "    (input wire C, input wire CB, input wire R, input wire D, output reg Q1, output reg Q2);\n"
        "    always @(posedge C) begin Q1 <= D; Q2 <= D; end\nendmodule",
        "module ODDRE1 #(parameter [0:0] SRVAL = 1'b0)\n"
        "    (input wire C, input wire SR, input wire D1, input wire D2, output reg Q);\n"
        "    always @(posedge C) Q <= D1;\nendmodule",
    )

    def _io_primitive_stubs(self) -> str:
        if not self.pl_io:
            return ""
        return ("\n// Stand-ins for the Xilinx I/O primitives of the requested PL pins (lint only; Vivado has the real\n"
                "// ones). Not models.\n"
                "/* verilator lint_off UNUSEDSIGNAL */\n/* verilator lint_off UNUSEDPARAM */\n"
                "/* verilator lint_off UNDRIVEN */\n/* verilator lint_off DECLFILENAME */\n"
                + "\n".join(self._IO_PRIMITIVES)
                + "\n/* verilator lint_on DECLFILENAME */\n/* verilator lint_on UNDRIVEN */\n"
                "/* verilator lint_on UNUSEDPARAM */\n/* verilator lint_on UNUSEDSIGNAL */\n")

    def lint_top_verilog(self) -> str:
        """PS8 stub + the cell, wired as the block design wires them (SmartConnect and proc_sys_reset as
        plain wires: they only adapt widths and synchronise the reset)."""
        d, wires, assigns, ps_conns, cell_conns = self.design, [], [], [], []

        def wire(name, width):
            wires.append(f"    wire {'[%d:0] ' % (width - 1) if width > 1 else ''}{name};")

        wire("pl_clk0", 1)
        wire("pl_resetn0", 1)
        wire("irq", 1)
        ps_conns += [".pl_clk0(pl_clk0)", ".pl_resetn0(pl_resetn0)", ".maxihpm0_fpd_aclk(pl_clk0)",
                     ".pl_ps_irq0(irq)"]
        cell_conns += [".clk(pl_clk0)", ".rst(!pl_resetn0)", ".irq(irq)"]
        cell_conns += [f".{port.name}({port.name})" for port in self.pl_io]   # the package pins: ports here
        # Registers (SmartConnect stand-in): low address bits and the low 32-bit data lane.
        for m in self.ports.csr:
            ps_w = self._hpm0_width(m.name, m.width)
            wire(f"maxigp0_{m.name}", ps_w)
            wire(f"csr_{m.name}", m.width)
            ps_conns.append(f".maxigp0_{m.name}(maxigp0_{m.name})")
            cell_conns.append(f".csr_{m.name}(csr_{m.name})")
            if not m.output:
                sl = f"[{m.width - 1}:0]" if ps_w > m.width else ""
                assigns.append(f"    assign csr_{m.name} = maxigp0_{m.name}{sl};")
            elif m.name == "rdata":
                assigns.append(f"    assign maxigp0_rdata = {{{ps_w // m.width}{{csr_rdata}}}};")
            elif ps_w > m.width:
                assigns.append(f"    assign maxigp0_{m.name} = {{{ps_w - m.width}'d0, csr_{m.name}}};")
            else:
                assigns.append(f"    assign maxigp0_{m.name} = csr_{m.name};")
        for name, width, ps_drives in self._HPM0_EXTRA:
            wire(f"maxigp0_{name}", width)
            ps_conns.append(f".maxigp0_{name}(maxigp0_{name})")
            if not ps_drives:
                assigns.append(f"    assign maxigp0_{name} = {width}'d{1 if name == 'rlast' else 0};")
        # Memory: hp<k> straight onto S_AXI_HP<k>_FPD, addresses and IDs zero-extended to the PS widths.
        for h, members in zip(self.hp_ports, self.ports.hp):
            ps_conns.append(f".{h.aclk_pin}(pl_clk0)")
            for m in members:
                ps_w = self._hp_ps_width(m.name, m.width)
                ours, theirs = f"{h.top_port}_{m.name}", f"{h.ps_prefix}_{m.name}"
                wire(ours, m.width)
                wire(theirs, ps_w)
                ps_conns.append(f".{theirs}({theirs})")
                cell_conns.append(f".{ours}({ours})")
                src, dst, src_w, dst_w = (ours, theirs, m.width, ps_w) if m.output else (theirs, ours, ps_w, m.width)
                if m.name not in ("araddr", "awaddr", "arid", "awid", "rid", "bid"):
                    # data, strobes, control: the widths must already agree, so a plain assign lets
                    # the lint flag any mismatch between the top and the PS configuration
                    assigns.append(f"    assign {dst} = {src};")
                elif dst_w > src_w:
                    assigns.append(f"    assign {dst} = {{{dst_w - src_w}'d0, {src}}};")
                elif dst_w < src_w:
                    assigns.append(f"    assign {dst} = {src}[{dst_w - 1}:0];")
                else:
                    assigns.append(f"    assign {dst} = {src};")
        return (f"// Lint top: {d}_ps8_stub + {self.cell_module}, wired as {self.bd_name} wires them.\n"
                "// For `verilator --lint-only` and Yosys only; Vivado builds from the block design.\n"
                "/* verilator lint_off UNUSEDSIGNAL */\n"
                f"module {d}_lint_top{self._lint_top_ports()};\n" + "\n".join(wires) + "\n"
                f"    {d}_ps8_stub ps (\n        " + ",\n        ".join(ps_conns) + "\n    );\n"
                f"    {self.cell_module} accel (\n        " + ",\n        ".join(cell_conns) + "\n    );\n"
                + "\n".join(assigns) + "\nendmodule\n/* verilator lint_on UNUSEDSIGNAL */\n")

    def _lint_top_ports(self) -> str:
        if not self.pl_io:
            return ""
        decls = []
        for port in self.pl_io:
            rng = f"[{port.width - 1}:0] " if port.width > 1 else ""
            decls.append(f"    {port.direction} wire {rng}{port.name}")
        return " (\n" + ",\n".join(decls) + "\n)"

    def lint_waivers(self) -> str:
        """Verilator configuration: waive Amaranth back-end idioms in the generated core only.

        The wrapper, the PS8 stub and the lint top are held to the whole of -Wall.
        """
        core = f"*{self.design}.v"
        rules = {
            "PROCASSINIT": "registers carry their reset value as an initialiser and are also assigned",
            "UNUSEDSIGNAL": "named aliases kept for debugging and unused bits of AXI inputs",
            "DECLFILENAME": "submodules are named by their path (core.axil), only the top matches the file",
            "WIDTHEXPAND": "operand widths follow Verilog context rules; Amaranth fixed every width",
            "WIDTHTRUNC": "as WIDTHEXPAND",
            "CASEINCOMPLETE": "a Switch without a default case assigns nothing when no case matches, on purpose",
            "ASCRANGE": "a depth-1 memory (the inner FIFO of SyncFIFOBuffered(depth=2)) has a zero-width "
                        "address, declared [-1:0] and never read",
        }
        lines = ["`verilator_config", f"// Waivers for the Amaranth-generated {self.design}.v only (kriallm build --lint)."]
        for rule, why in rules.items():
            lines.append(f"// {rule}: {why}")
            lines.append(f'lint_off -rule {rule} -file "{core}"')
        return "\n".join(lines) + "\n"

    # ---- Linux: device-tree overlay and shell.json -------------------------
    def dtsi(self) -> str:
        afi = ", ".join(f"<{r} {_hex(v, 1) if v else 0}>" for r, v in self.afi_config())
        resets = ", ".join(f"<&zynqmp_reset {r}>" for r in ZYNQMP_RESET_PS_PL)
        c = self.config
        return f"""\
// Device-tree overlay for {self.app_name} (kriallm on the KV260). Generated by `kriallm build`
// from ArrayConfig {c.config_hash}; do not edit, rebuild.
// Compile: dtc -@ -I dts -O dtb -o {self.app_name}.dtbo {self.app_name}.dtsi
/dts-v1/;
/plugin/;

/ {{
	// The bitstream, loaded by the FPGA manager; pl_resetn0..3 are pulsed after programming.
	fragment@0 {{
		target = <&fpga_full>;
		__overlay__ {{
			#address-cells = <2>;
			#size-cells = <2>;
			firmware-name = "{self.app_name}.bit.bin";
			resets = {resets};
		}};
	}};

	fragment@1 {{
		target = <&amba>;
		__overlay__ {{
			// Fabric-side widths of S_AXI_HP0..{c.engines - 1}_FPD ({c.port_bits}-bit: code {AFI_FM_WIDTH_CODE[c.port_bits]}) and of
			// M_AXI_HPM0_FPD ({HPM0_DATA_BITS}-bit; AFIFS {_hex(self.afi_config()[-1][1], 3)}). They must match the block design.
			afi0: afi0 {{
				compatible = "xlnx,afi-fpga";
				config-afi = {afi};
			}};

			// pl_clk0 (PL0_REF, zynqmp clock {ZYNQMP_CLK_PL0_REF}) at the configured {c.clock_mhz} MHz.
			clocking0: clocking0 {{
				compatible = "xlnx,fclk";
				#clock-cells = <0>;
				clocks = <&zynqmp_clk {ZYNQMP_CLK_PL0_REF}>;
				assigned-clocks = <&zynqmp_clk {ZYNQMP_CLK_PL0_REF}>;
				assigned-clock-rates = <{self.clock_hz}>;
				clock-output-names = "fabric_clk";
			}};
		}};
	}};

	fragment@2 {{
		target = <&amba>;
		__overlay__ {{
			#address-cells = <2>;
			#size-cells = <2>;

			// The register window ({self.csr_range} bytes) and the interrupt, for user space through UIO.
			// Needs uio_pdrv_genirq with of_id=generic-uio (docs/kv260.md).
			{UIO_NAME}: {UIO_NAME}@{CSR_BASE:x} {{
				compatible = "generic-uio";
				reg = <0x0 {_hex(CSR_BASE)} 0x0 {_hex(self.csr_range)}>;
				interrupt-parent = <&gic>;
				interrupts = <{GIC_SPI} {self.irq_gic_spi} {IRQ_TYPE_LEVEL_HIGH}>;
			}};

			// Physically contiguous DMA memory for weights, KV cache and buffers ({self.dma_bytes >> 20} MB), from CMA.
			// Not dma-coherent: the HP ports do not snoop the CPU caches (sync_for_cpu / sync_for_device).
			kriallm_dma: {UDMABUF_NAME} {{
				compatible = "ikwzm,u-dma-buf";
				device-name = "{UDMABUF_NAME}";
				size = <{_hex(self.dma_bytes)}>;
			}};
		}};
	}};
}};
"""

    def shell_json(self) -> str:
        return json.dumps({"shell_type": "XRT_FLAT", "num_slots": "1"}, indent=4) + "\n"

    def board_facts(self) -> dict:
        """What the host driver needs to find the accelerator on the board (written to the build manifest)."""
        c = self.config
        return {
            "board": "kv260", "part": PART, "board_part": BOARD_PART_GLOB, "app_name": self.app_name,
            "pl_clk0_mhz": c.clock_mhz,
            "csr": {"base": CSR_BASE, "size": self.csr_range, "data_bits": self.ports.csr_data_bits,
                    "addr_bits": self.ports.csr_addr_bits, "via": f"M_AXI_HPM0_FPD ({HPM0_DATA_BITS}-bit) + SmartConnect"},
            "hp_ports": [{"master": h.top_port, "ps_port": h.bd_intf, "data_bits": c.port_bits,
                          "addr_bits": self.ports.hp_addr_bits, "id_bits": self.ports.hp_id_bits,
                          "ddr_base": DDR_LOW_BASE, "ddr_size": DDR_LOW_SIZE} for h in self.hp_ports],
            "irq": {"ps_pin": "pl_ps_irq0[0]", "gic_spi": self.irq_gic_spi, "trigger": "level-high"},
            "uio_name": UIO_NAME,
            "bd_cell": "accel",            # the accelerator's instance name in the block design (PYNQ ip_dict key)
            "udmabuf": {"device": f"/dev/{UDMABUF_NAME}", "size": self.dma_bytes,
                        "must_be_below": DDR_LOW_BASE + DDR_LOW_SIZE},
            "afi_config": [list(p) for p in self.afi_config()],
        }


# ---------------------------------------------------------------------------
# .bit -> .bit.bin without bootgen
# ---------------------------------------------------------------------------

def bit_to_bin(bit: bytes) -> bytes:
    """The configuration data of a .bit file, 32-bit byte-swapped, as the ZynqMP FPGA manager loads it.

    This is what ``bootgen -arch zynqmp -process_bitstream bin`` produces for a
    plain bitstream; bootgen stays the preferred tool (docs/kv260.md).
    """
    import struct
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(bit):
            raise ConfigError("not a Xilinx .bit file: truncated header")
        out = bit[pos:pos + n]
        pos += n
        return out

    (n,) = struct.unpack(">H", take(2))
    if n != 9:
        raise ConfigError("not a Xilinx .bit file: missing the 0x0009 header field")
    take(n)
    (n,) = struct.unpack(">H", take(2))
    if n != 1 or bit[pos:pos + 1] != b"a":
        raise ConfigError("not a Xilinx .bit file: missing the design-name field")
    while True:
        key = take(1)
        if key == b"e":
            (length,) = struct.unpack(">I", take(4))
            data = take(length)
            break
        if key not in (b"a", b"b", b"c", b"d"):
            raise ConfigError(f"not a Xilinx .bit file: unexpected field {key!r}")
        (n,) = struct.unpack(">H", take(2))
        take(n)
    if len(data) % 4:
        raise ConfigError("bitstream length is not a multiple of 4 bytes")
    if b"\xaa\x99\x55\x66" not in data[:256]:
        raise ConfigError("bitstream has no sync word (0xAA995566) near its start")
    out = bytearray(len(data))
    out[0::4], out[1::4], out[2::4], out[3::4] = data[3::4], data[2::4], data[1::4], data[0::4]
    return bytes(out)


# ---------------------------------------------------------------------------
# The Amaranth platform (imported lazily: needs Amaranth)
# ---------------------------------------------------------------------------

def _verilog_ports(verilog: str, module: str) -> dict[str, tuple[str, int]]:
    """{port: (direction, width)} of one module of Yosys-written Verilog (``input [7:0] x;`` lines)."""
    m = re.search(rf"^module {re.escape(module)}\(.*?^endmodule", verilog, re.M | re.S)
    if m is None:
        raise ConfigError(f"the generated Verilog has no module {module!r}")
    out = {}
    for d in re.finditer(r"^\s*(input|output|inout)\s+(?:\[(\d+):(\d+)\]\s+)?([A-Za-z_]\w*)\s*;", m.group(0), re.M):
        out[d.group(4)] = (d.group(1), abs(int(d.group(2)) - int(d.group(3))) + 1 if d.group(2) else 1)
    return out


@lru_cache(maxsize=None)
def _platform_class():
    from amaranth.build import Attrs, Connector, Pins, PinsN, Resource
    from amaranth.build.plat import TemplatedPlatform
    from amaranth.hdl import Fragment, IOPort, Module, Signal, Value
    from amaranth.lib import wiring
    from amaranth.vendor import XilinxPlatform

    from rtl.dsp import dsp48e2_stub_verilog, xilinx_primitives

    j2 = " ".join(PMOD_J2_PINS.get(i, "-") for i in range(1, 13))    # Digilent pins 1..12; 5, 6, 11, 12 power

    class KV260Platform(XilinxPlatform):
        """The K26 SOM (xck26 / sfvc784 / 2LV-c) on the KV260 carrier; the accelerator reaches it through the PS8.

        The clock is pl_clk0 at ``config.clock_mhz`` and the reset pl_resetn0
        (through proc_sys_reset), both wired in the block design, so there is
        no clock or reset resource. ``prepare(top)`` writes the core's Verilog
        with its ports (the block design instantiates it), and every
        Tcl/XDC/Verilog/.bif file of :class:`Kv260Design`, without running
        Vivado.

        The carrier's PL pins are declared as in amaranth-boards (pins and their
        source: the constants above). A design may request them in its
        ``elaborate(platform)``:

        * ``platform.request("pmod", 0, dir="-")``: the eight signal pins of J2
          (Digilent pins 1-4, 7-10) as one port; or a single pin through the
          connector: ``platform.add_resources([Resource("pmod_led", 0,
          Pins("1", dir="o", conn=("pmod", 0)), Attrs(IOSTANDARD="LVCMOS33"))])``,
          also the ``amaranth_boards.extensions.pmod`` helpers;
        * ``platform.request("fan", 0)``: the fan enable, active low on the pin
          (``PinsN``), so ``o = 1`` runs the fan.

        Requested pins become ports of the core, of its block-design cell and of
        the block design, with PACKAGE_PIN and I/O attributes in the XDC.
        """

        device, package, speed = DEVICE, PACKAGE, SPEED
        resources = [
            # J2's eight signal pins ([bist] PMOD_OUT_tri_o[0..3], PMOD_IN_tri_i[0..3]).
            Resource("pmod", 0, Pins("1 2 3 4 7 8 9 10", dir="io", conn=("pmod", 0)), Attrs(**CARRIER_IO_ATTRS)),
            # [base] fan_en_b.
            Resource("fan", 0, PinsN(FAN_EN_B_PIN, dir="o"), Attrs(**CARRIER_IO_ATTRS)),
        ]
        connectors = [
            Connector("pmod", 0, j2),     # J2, Digilent numbering ([bist]; see PMOD_J2_PINS)
        ]

        def __init__(self, config, *, app_name: str, dma_bytes: int = DEFAULT_DMA_MB << 20, jobs: int = 4):
            super().__init__(toolchain="Vivado")
            self._config = config.validate()
            self._app_name, self._dma_bytes, self._jobs = app_name, dma_bytes, jobs
            self.design = None

        @property
        def config(self):
            return self._config

        @property
        def default_clk_frequency(self):
            return self._config.clock_mhz * 1e6

        @property
        def file_templates(self):
            return {
                **TemplatedPlatform.build_script_templates,
                "{{name}}.v": "/* {{autogenerated}} */\n{{emit_verilog()}}",
            }

        @property
        def command_templates(self):
            return [r"""
                {{invoke_tool("vivado")}}
                    {{get_override("vivado_opts")|options}}
                    -mode batch -nojournal
                    -log {{name}}_vivado.log
                    -source {{name}}.tcl
                    -tclargs --jobs {{platform.design.jobs}}
            """]

        def iter_port_constraints_bits(self):
            """(port bit, package pin, attrs) of every requested pin; the bus ports of the core have no pins."""
            for port_name, port, _dir in self._design.ports:
                if isinstance(port, IOPort):
                    for bit, meta in enumerate(port.metadata):
                        yield (port_name if len(port) == 1 else f"{port_name}[{bit}]"), meta.name, meta.attrs

        def prepare(self, elaboratable, name=None, **kwargs):
            """BuildPlan: the core (ports kept: the block design connects them) plus the Vivado sources."""
            assert not self._prepared
            self._prepared = True
            ports = TopPorts.from_component(elaboratable, self._config)
            # Checked against the board before elaborating; made again below with the requested pins.
            self.design = Kv260Design(self._config, ports, self._app_name, self._dma_bytes, self._jobs)
            name = name or self.design.design
            if name != self.design.design:
                raise ConfigError(f"the core must be named {self.design.design!r} (from the app name), not {name!r}")
            # The signature's members are the core's ports, named as amaranth.back.rtlil.convert names them.
            # Amaranth's public API takes ports without a direction and makes a port that the design drives an
            # output, any other an input; an output member the top never drives (an idle AXI channel) would
            # come out as an input. So the top sits in a shell that drives each Out port from the member and
            # each In member from its port: every direction is then the signature's.
            shell, top_ports = Module(), {}
            shell.submodules.core = elaboratable
            for path, member, value in elaboratable.signature.flatten(elaboratable):
                port_name = "__".join(map(str, path))
                inner = Value.cast(value)
                port = Signal(inner.shape(), name=port_name)
                shell.d.comb += (inner.eq(port) if member.flow == wiring.In else port.eq(inner))
                top_ports[port_name] = (port, None)
            with xilinx_primitives():      # the synthesis form of rtl/dsp.py's slices
                fragment = Fragment.get(shell, self)
            # Pins requested without dir="-" get Amaranth's pin buffers, as Platform.prepare adds them.
            for pin, _port, buffer in self.iter_pins():
                fragment.add_subfragment(Fragment.get(buffer, self), name=f"pin_{pin.name}")
            # The sync domain becomes plain clk/rst ports: the block design drives them from pl_clk0 and
            # proc_sys_reset, which already synchronises pl_resetn0, so no platform reset logic is added.
            self._design = fragment.prepare(ports=top_ports, hierarchy=(name,))
            plan = self.toolchain_prepare(self._design, name, **kwargs)

            declared = _verilog_ports(plan.files[f"{name}.v"], name)
            pins: dict[str, list] = {}
            for bit, pin, attrs in self.iter_port_constraints_bits():
                pins.setdefault(bit.split("[")[0], []).append((pin, tuple(attrs.items())))
            pl_io = tuple(PlPort(port, declared[port][0], tuple(bits)) for port, bits in pins.items())
            self.design = d = Kv260Design(self._config, ports, self._app_name, self._dma_bytes, self._jobs, pl_io)
            plan.add_file(f"{name}.tcl", d.flow_tcl())
            plan.add_file(f"{name}_bd.tcl", d.bd_tcl())
            plan.add_file(f"{name}.xdc", d.xdc())
            plan.add_file(f"{d.cell_module}.v", d.cell_verilog())
            plan.add_file(f"{name}.bif", d.bif())
            plan.add_file(f"sim/{name}_ps8_stub.v", d.ps8_stub_verilog())
            plan.add_file(f"sim/{name}_lint_top.v", d.lint_top_verilog())
            plan.add_file(f"sim/{name}_lint.vlt", d.lint_waivers())
            plan.add_file(f"sim/{name}_xilinx_stubs.v", dsp48e2_stub_verilog())
            return plan

    return KV260Platform


def __getattr__(name):
    if name == "KV260Platform":
        return _platform_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
