"""AxiReadArbiter: several AXI4 read managers on one read port, R routed back by ID.

The accelerator's hp0 carries three readers: engine 0's weight stream, the
activation loader and the command processor's descriptor fetcher. Each
manager uses its own ARID; the arbiter passes ARs through a registered
round-robin stage and sends every R beat to the manager whose ID it carries,
so responses may come back in any order across IDs (AXI allows it; the KV260
HP ports may do it).

Every manager must keep ``rready`` high (rtl/axi.py's AxiReadMaster does:
it only issues an AR when it has buffer space for all of the burst's beats),
because one blocked manager would otherwise block the port for the others.
The arbiter forwards each manager's ``rready`` anyway, so the bus is
protocol-correct either way.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from sw.contract.commands import BEAT_BYTES, DEFAULT_ADDR_BITS, HP_ID_BITS
from sw.contract.errors import ConfigError

from .axi import axi4_read_signature

__all__ = ["AxiReadArbiter", "AxiWriteSelect", "round_robin"]

_AR_FIELDS = ("araddr", "arlen", "arsize", "arburst", "arid", "arlock", "arcache", "arprot", "arqos")


def round_robin(m: Module, requests, name: str = "rr"):
    """Rotating-priority arbiter over `requests` (list of 1-bit values).

    Returns ``(grants, index, any)``: one grant signal per request (at most
    one high), the granted index and whether anything is granted this cycle.
    After a grant the priority moves to the request after the winner.
    """
    n = len(requests)
    ptr = Signal(range(max(n, 2)), name=f"{name}_ptr")
    index = Signal(range(max(n, 2)), name=f"{name}_index")
    anyreq = Signal(name=f"{name}_any")
    grants = [Signal(name=f"{name}_grant{i}") for i in range(n)]
    # For each pointer value, the first request at or after it wins.
    with m.Switch(ptr):
        for p in range(n):
            with m.Case(p):
                order = [(p + k) % n for k in range(n)]
                for i in reversed(order):          # later assignment wins: first in order has priority
                    with m.If(requests[i]):
                        m.d.comb += index.eq(i)
    m.d.comb += anyreq.eq(Cat(*requests).any())
    for i in range(n):
        m.d.comb += grants[i].eq(anyreq & (index == i))
    with m.If(anyreq):
        m.d.sync += ptr.eq(index + 1 if n > 1 else 0)
        if n > 1:
            with m.If(index == n - 1):
                m.d.sync += ptr.eq(0)
    return grants, index, anyreq


class AxiReadArbiter(wiring.Component):
    """`ids[i]` is the ARID manager ``m<i>`` uses; R beats with that RID go back to it.

    Ports: ``m0 .. m<n-1>``: In(axi4_read_signature) (the managers plug in
    here); ``bus``: Out(axi4_read_signature), the shared port. One cycle of
    AR latency (a register stage); R is combinational.
    """

    def __init__(self, ids, *, addr_width: int = DEFAULT_ADDR_BITS, data_width: int = 8 * BEAT_BYTES,
                 id_width: int = HP_ID_BITS):
        ids = list(ids)
        if not ids:
            raise ConfigError("AxiReadArbiter needs at least one manager")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"AxiReadArbiter: manager IDs must be distinct, got {ids}")
        if any(not 0 <= i < (1 << id_width) for i in ids):
            raise ConfigError(f"AxiReadArbiter: IDs {ids} do not fit {id_width} bits")
        self._ids = ids
        sig = axi4_read_signature(addr_width, data_width, id_width)
        members = {f"m{i}": In(sig) for i in range(len(ids))}
        members["bus"] = Out(sig)
        super().__init__(members)

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def elaborate(self, platform):
        m = Module()
        bus = self.bus
        mgrs = [getattr(self, f"m{i}") for i in range(len(self._ids))]

        free = ~bus.arvalid | bus.arready
        grants, index, anyreq = round_robin(m, [mg.arvalid & free for mg in mgrs], "ar")
        with m.If(bus.arvalid & bus.arready):
            m.d.sync += bus.arvalid.eq(0)
        for mg, g in zip(mgrs, grants):
            m.d.comb += mg.arready.eq(g)
            with m.If(g):
                m.d.sync += bus.arvalid.eq(1)
                for f in _AR_FIELDS:
                    m.d.sync += getattr(bus, f).eq(getattr(mg, f))

        rready = 0
        for mg, ident in zip(mgrs, self._ids):
            mine = bus.rid == ident
            m.d.comb += [
                mg.rvalid.eq(bus.rvalid & mine),
                mg.rdata.eq(bus.rdata), mg.rresp.eq(bus.rresp), mg.rlast.eq(bus.rlast), mg.rid.eq(bus.rid),
            ]
            rready = rready | (mine & mg.rready)
        m.d.comb += bus.rready.eq(rready)
        return m


_W_OUT = ("awaddr", "awlen", "awsize", "awburst", "awid", "awlock", "awcache", "awprot", "awqos", "awvalid",
          "wdata", "wstrb", "wlast", "wvalid", "bready")
_W_IN = ("awready", "wready", "bresp", "bid", "bvalid")


class AxiWriteSelect(wiring.Component):
    """Several AXI4 write managers on one write port, one at a time: ``sel`` names the manager the
    port belongs to; the others see no ready and no response.

    For managers that never write at the same time (the accelerator's linear engine and the fabric
    engines: the command processor starts a fabric op only after every earlier command's writes
    were acknowledged, and the next command only after the fabric op's). ``sel`` may change only
    while the port is quiet (no write in flight); the integrator holds it for the whole op.

    Ports: ``m0 .. m<n-1>``: In(axi4_write_signature); ``bus``: Out(axi4_write_signature);
    ``sel``: In(range(n)). Combinational, no latency.
    """

    def __init__(self, count: int, *, addr_width: int = DEFAULT_ADDR_BITS, data_width: int = 8 * BEAT_BYTES,
                 id_width: int = HP_ID_BITS):
        if not isinstance(count, int) or count < 1:
            raise ConfigError(f"AxiWriteSelect needs at least one manager, got {count!r}")
        self._count = count
        from .axi import axi4_write_signature
        sig = axi4_write_signature(addr_width, data_width, id_width)
        members = {f"m{i}": In(sig) for i in range(count)}
        members["bus"] = Out(sig)
        members["sel"] = In(range(max(count, 2)))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        bus = self.bus
        with m.Switch(self.sel):
            for i in range(self._count):
                mg = getattr(self, f"m{i}")
                with m.Case(i):
                    m.d.comb += [getattr(bus, f).eq(getattr(mg, f)) for f in _W_OUT]
        for i in range(self._count):
            mg = getattr(self, f"m{i}")
            mine = self.sel == i
            m.d.comb += [mg.awready.eq(mine & bus.awready), mg.wready.eq(mine & bus.wready),
                         mg.bvalid.eq(mine & bus.bvalid), mg.bresp.eq(bus.bresp), mg.bid.eq(bus.bid)]
        return m
