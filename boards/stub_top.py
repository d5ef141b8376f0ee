"""A stand-in for the accelerator top with exactly its ports, so the board flow can be built and checked.

The real top (rtl/top.py, ``Accelerator(config)``) is integrated later; until
then `kriallm build` elaborates this component, and the build manifest says
so (``"stub": true``). It has the port set the block design expects:

* ``clk``, ``rst`` (active high): the ``sync`` domain, made ports by elaboration;
* ``csr``: AXI4-Lite slave, 32-bit data, ``CSR_ADDR_WIDTH``-bit byte address
  (Verilog ``csr__awaddr`` ...);
* ``hp0`` .. ``hp{engines-1}``: AXI4 masters, ``port_bits`` data, 40-bit address,
  6-bit ID (Verilog ``hp0__araddr`` ...);
* ``irq``: level-sensitive interrupt.

So that a stub bitstream is still useful on a board (register access, the
interrupt line, the address map), it answers a few registers:

* ``ID`` (offset from sw.contract.commands) reads ``STUB_MAGIC`` = b"STUB", not the
  accelerator's b"KRIA", so no driver mistakes it for the accelerator;
* ``CONFIG_HASH0..7`` read the config hash, as the real top does;
* the last word of the window is a scratch register whose bit 0 drives
  ``irq``, to test the interrupt path through UIO;
* every other offset answers SLVERR. The HP masters never issue a transfer.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from rtl.axi import axi4_signature, tie_off_read, tie_off_write
from rtl.axilite import AxiLiteSignature, AxiLiteToCsr
from sw.contract.config import ArrayConfig
from sw.contract.commands import CSR_ADDR_WIDTH, DEFAULT_ADDR_BITS, HP_ID_BITS, REGISTERS

__all__ = ["StubTop", "STUB_MAGIC", "HP_ID_BITS", "CSR_DATA_BITS"]

STUB_MAGIC = int.from_bytes(b"STUB", "little")
CSR_DATA_BITS = 32


def _register(name: str):
    for reg in REGISTERS:
        if reg.name == name:
            return reg
    raise KeyError(name)


class StubTop(wiring.Component):
    """Same ports as the accelerator top; a handful of registers; idle HP masters."""

    is_stub = True

    def __init__(self, config: ArrayConfig):
        self._config = config.validate()
        members = {
            "csr": In(AxiLiteSignature(addr_width=CSR_ADDR_WIDTH, data_width=CSR_DATA_BITS)),
            "irq": Out(1),
        }
        for i in range(config.engines):
            members[f"hp{i}"] = Out(axi4_signature(addr_width=DEFAULT_ADDR_BITS, data_width=config.port_bits,
                                                   id_width=HP_ID_BITS))
        super().__init__(members)

    @property
    def config(self) -> ArrayConfig:
        return self._config

    @property
    def scratch_offset(self) -> int:
        return (1 << CSR_ADDR_WIDTH) - 4

    def elaborate(self, platform):
        m = Module()
        m.submodules.axil = axil = AxiLiteToCsr(CSR_ADDR_WIDTH)
        wiring.connect(m, wiring.flipped(self.csr), axil.axil)
        bus = axil.csr

        words = {_register("ID").offset: STUB_MAGIC}
        digest = bytes.fromhex(self._config.config_hash)
        for i in range(8):
            words[_register(f"CONFIG_HASH{i}").offset] = int.from_bytes(digest[4 * i:4 * i + 4], "little")

        scratch = Signal(32)
        r_data, err = Signal(32), Signal()
        m.d.comb += [bus.r_data.eq(r_data), bus.err.eq(err), self.irq.eq(scratch[0])]
        word_addr = self.scratch_offset >> 2
        with m.If(bus.r_stb | bus.w_stb):
            m.d.sync += [r_data.eq(0), err.eq(1)]
            with m.Switch(bus.addr):
                for offset, value in words.items():
                    with m.Case(offset >> 2):
                        m.d.sync += [r_data.eq(value), err.eq(bus.w_stb)]
                with m.Case(word_addr):
                    m.d.sync += [r_data.eq(scratch), err.eq(0)]
                    with m.If(bus.w_stb):
                        m.d.sync += scratch.eq(bus.w_data & bus.w_mask | scratch & ~bus.w_mask)

        for i in range(self._config.engines):
            port = getattr(self, f"hp{i}")
            tie_off_read(m, port)
            tie_off_write(m, port)
        return m
