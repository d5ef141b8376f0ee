"""AXI4-Lite slave bridged to the CSR bus of rtl/csr.py.

Port names follow the AXI spec under the component's port name, so a port
called ``csr`` appears in Verilog as ``csr__awaddr``, ``csr__wdata``... and
cocotbext-axi attaches with ``AxiLiteBus.from_prefix(dut, "csr", bus_separator="__")``.

Behaviour:

* AW and W are accepted independently (either may come first, or both in one
  cycle); each is held until the pair has been applied and the B response is
  handed over. AR is accepted while no read is pending. One write and one read
  may be pending at once; when both are ready to access the CSR bus in the same
  cycle they take turns.
* Mapped offsets answer OKAY; unmapped ones SLVERR (reads return 0, writes do
  nothing). WSTRB is honoured through the CSR bus's byte mask.
* An access takes three cycles from the address handshake to the response
  (apply, capture, respond), which no host will notice.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from . import csr

__all__ = ["AxiLiteSignature", "AxiLiteToCsr", "RESP_OKAY", "RESP_SLVERR"]

RESP_OKAY = 0b00
RESP_SLVERR = 0b10


class AxiLiteSignature(wiring.Signature):
    """AXI4-Lite, seen from the master."""

    def __init__(self, *, addr_width: int, data_width: int = csr.DATA_WIDTH):
        if data_width not in (32, 64):
            raise ValueError(f"AXI4-Lite data width must be 32 or 64, got {data_width}")
        self._addr_width, self._data_width = addr_width, data_width
        super().__init__({
            "awaddr": Out(addr_width), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wvalid": Out(1), "wready": In(1),
            "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            "araddr": Out(addr_width), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
            "rdata": In(data_width), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
        })

    @property
    def addr_width(self) -> int:
        return self._addr_width

    @property
    def data_width(self) -> int:
        return self._data_width

    def __eq__(self, other):
        return (isinstance(other, AxiLiteSignature) and other.addr_width == self.addr_width
                and other.data_width == self.data_width)

    def __repr__(self):
        return f"AxiLiteSignature(addr_width={self.addr_width}, data_width={self.data_width})"


class AxiLiteToCsr(wiring.Component):
    """AXI4-Lite slave (the CSR bus's 32-bit data, ``addr_width`` byte-address bits) driving a CSR bus."""

    def __init__(self, addr_width: int):
        if addr_width < 3:
            raise ValueError(f"AXI4-Lite address width must be at least 3, got {addr_width}")
        self._addr_width = addr_width
        super().__init__({
            "axil": In(AxiLiteSignature(addr_width=addr_width)),
            "csr": Out(csr.Signature(addr_width=addr_width - 2)),
        })

    @property
    def addr_width(self) -> int:
        return self._addr_width

    def elaborate(self, platform):
        m = Module()
        a, bus = self.axil, self.csr

        aw_full, aw_addr = Signal(), Signal(self._addr_width)
        w_full, w_data, w_strb = Signal(), Signal(csr.DATA_WIDTH), Signal(csr.DATA_WIDTH // 8)
        ar_full, ar_addr = Signal(), Signal(self._addr_width)
        b_valid, b_resp = Signal(), Signal(2)
        r_valid, r_resp, r_data = Signal(), Signal(2), Signal(csr.DATA_WIDTH)
        prefer_read = Signal()  # round robin when a write and a read are both ready

        m.d.comb += [
            a.awready.eq(~aw_full), a.wready.eq(~w_full), a.arready.eq(~ar_full),
            a.bvalid.eq(b_valid), a.bresp.eq(b_resp),
            a.rvalid.eq(r_valid), a.rresp.eq(r_resp), a.rdata.eq(r_data),
        ]
        with m.If(a.awvalid & ~aw_full):
            m.d.sync += [aw_full.eq(1), aw_addr.eq(a.awaddr)]
        with m.If(a.wvalid & ~w_full):
            m.d.sync += [w_full.eq(1), w_data.eq(a.wdata), w_strb.eq(a.wstrb)]
        with m.If(a.arvalid & ~ar_full):
            m.d.sync += [ar_full.eq(1), ar_addr.eq(a.araddr)]
        with m.If(a.bvalid & a.bready):
            m.d.sync += b_valid.eq(0)
        with m.If(a.rvalid & a.rready):
            m.d.sync += r_valid.eq(0)

        write_ready = aw_full & w_full & ~b_valid
        read_ready = ar_full & ~r_valid
        mask = Cat(*(bit.replicate(8) for bit in w_strb))

        with m.FSM():
            with m.State("IDLE"):
                with m.If(write_ready & ~(read_ready & prefer_read)):
                    m.d.comb += [bus.addr.eq(aw_addr[2:]), bus.w_stb.eq(1),
                                 bus.w_data.eq(w_data), bus.w_mask.eq(mask)]
                    m.d.sync += prefer_read.eq(1)
                    m.next = "WRITE_RESP"
                with m.Elif(read_ready):
                    m.d.comb += [bus.addr.eq(ar_addr[2:]), bus.r_stb.eq(1)]
                    m.d.sync += prefer_read.eq(0)
                    m.next = "READ_RESP"
            with m.State("WRITE_RESP"):
                m.d.sync += [aw_full.eq(0), w_full.eq(0), b_valid.eq(1)]
                with m.If(bus.err):
                    m.d.sync += b_resp.eq(RESP_SLVERR)
                with m.Else():
                    m.d.sync += b_resp.eq(RESP_OKAY)
                m.next = "IDLE"
            with m.State("READ_RESP"):
                m.d.sync += [ar_full.eq(0), r_valid.eq(1), r_data.eq(bus.r_data)]
                with m.If(bus.err):
                    m.d.sync += r_resp.eq(RESP_SLVERR)
                with m.Else():
                    m.d.sync += r_resp.eq(RESP_OKAY)
                m.next = "IDLE"
        return m
