"""AXI4 masters for the Zynq UltraScale+ S_AXI_HP ports.

`AxiReadMaster` turns a command stream ``{addr, beats}`` into a stream of
data beats, `AxiWriteMaster` does the reverse. Both split commands into
bursts of at most `max_burst` beats that never cross a 4 KiB page (the PS
converts AXI4 to AXI3 behind the HP ports, so 16 beats is the longest burst
it takes) and keep up to `max_outstanding` bursts in flight, so the DRAM
latency is hidden and one beat per cycle is sustained when the slave can.

Port naming: Amaranth joins interface members with ``__``, so a port
``Out(axi4_signature())`` named ``hp0`` appears in Verilog as ``hp0__araddr``
etc., and a cocotb testbench binds it with
``AxiBus.from_prefix(dut, "hp0", bus_separator="__")``.

See docs/axi.md for the behaviour on errors and the counters.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.data import StructLayout
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from sw.contract.errors import ConfigError

__all__ = [
    "AXI_PAGE_BYTES", "RESP_OKAY", "RESP_EXOKAY", "RESP_SLVERR", "RESP_DECERR",
    "Axi4Signature", "axi4_signature", "axi4_read_signature", "axi4_write_signature",
    "connect_read_channels", "connect_write_channels", "tie_off_read", "tie_off_write",
    "transfer_command_layout", "read_data_layout", "write_data_layout",
    "AxiReadMaster", "AxiWriteMaster", "split_bursts",
]

AXI_PAGE_BYTES = 4096          # a burst must not cross a 4 KiB boundary (AXI4 A3.4.1)
RESP_OKAY, RESP_EXOKAY, RESP_SLVERR, RESP_DECERR = 0, 1, 2, 3
BURST_INCR = 1


# ---------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------

def _read_members(addr_width, data_width, id_width):
    return {
        "araddr": Out(addr_width), "arlen": Out(8), "arsize": Out(3), "arburst": Out(2),
        "arid": Out(id_width), "arlock": Out(1), "arcache": Out(4), "arprot": Out(3), "arqos": Out(4),
        "arvalid": Out(1), "arready": In(1),
        "rdata": In(data_width), "rresp": In(2), "rlast": In(1), "rid": In(id_width),
        "rvalid": In(1), "rready": Out(1),
    }


def _write_members(addr_width, data_width, id_width):
    return {
        "awaddr": Out(addr_width), "awlen": Out(8), "awsize": Out(3), "awburst": Out(2),
        "awid": Out(id_width), "awlock": Out(1), "awcache": Out(4), "awprot": Out(3), "awqos": Out(4),
        "awvalid": Out(1), "awready": In(1),
        "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wlast": Out(1),
        "wvalid": Out(1), "wready": In(1),
        "bresp": In(2), "bid": In(id_width), "bvalid": In(1), "bready": Out(1),
    }


class Axi4Signature(wiring.Signature):
    """AXI4 manager-side signature (``Out`` = driven by the manager).

    `channels` is ``"rw"`` (all five channels), ``"r"`` (AR, R) or ``"w"``
    (AW, W, B). Members keep the AXI4 spelling (``araddr``, ``rvalid``, ...).
    """

    def __init__(self, *, addr_width: int = 40, data_width: int = 128, id_width: int = 6,
                 channels: str = "rw"):
        if channels not in ("rw", "r", "w"):
            raise ConfigError(f"AXI channels must be 'rw', 'r' or 'w', not {channels!r}")
        if data_width not in (32, 64, 128, 256, 512, 1024):
            raise ConfigError(f"AXI data width must be a power of two from 32 to 1024 bits, not {data_width}")
        if not 12 < addr_width <= 64:
            raise ConfigError(f"AXI address width must be 13..64 bits, not {addr_width}")
        if not 1 <= id_width <= 32:
            raise ConfigError(f"AXI ID width must be 1..32 bits, not {id_width}")
        self._addr_width, self._data_width, self._id_width = addr_width, data_width, id_width
        self._channels = channels
        members = {}
        if "r" in channels:
            members.update(_read_members(addr_width, data_width, id_width))
        if "w" in channels:
            members.update(_write_members(addr_width, data_width, id_width))
        super().__init__(members)

    addr_width = property(lambda self: self._addr_width)
    data_width = property(lambda self: self._data_width)
    id_width = property(lambda self: self._id_width)
    channels = property(lambda self: self._channels)

    @property
    def data_bytes(self) -> int:
        return self._data_width // 8

    @property
    def size_code(self) -> int:
        """AxSIZE of a full-width beat."""
        return (self.data_bytes - 1).bit_length()

    def __eq__(self, other):
        return (type(other) is type(self) and (other.addr_width, other.data_width, other.id_width, other.channels)
                == (self.addr_width, self.data_width, self.id_width, self.channels))

    def __hash__(self):
        return hash((type(self), self.addr_width, self.data_width, self.id_width, self.channels))

    def __repr__(self):
        return (f"Axi4Signature(addr_width={self.addr_width}, data_width={self.data_width}, "
                f"id_width={self.id_width}, channels={self.channels!r})")


def axi4_signature(addr_width: int = 40, data_width: int = 128, id_width: int = 6) -> Axi4Signature:
    """A full AXI4 manager port (the PL side of one S_AXI_HPn_FPD port; those take 49-bit addresses)."""
    return Axi4Signature(addr_width=addr_width, data_width=data_width, id_width=id_width, channels="rw")


def axi4_read_signature(addr_width: int = 40, data_width: int = 128, id_width: int = 6) -> Axi4Signature:
    return Axi4Signature(addr_width=addr_width, data_width=data_width, id_width=id_width, channels="r")


def axi4_write_signature(addr_width: int = 40, data_width: int = 128, id_width: int = 6) -> Axi4Signature:
    return Axi4Signature(addr_width=addr_width, data_width=data_width, id_width=id_width, channels="w")


def _connect_members(m: Module, half, port, names):
    for name in names:
        src, dst = getattr(half, name), getattr(port, name)
        if half.signature.members[name].flow == wiring.Out:
            m.d.comb += dst.eq(src)
        else:
            m.d.comb += src.eq(dst)


def connect_read_channels(m: Module, master_bus, port) -> None:
    """Wire a read-only manager bus (``channels="r"``) to the AR/R members of a full port.

    `port` is the outward-facing full port (e.g. a component's ``hp0``); both
    are seen from the manager side, so Out members flow master -> port.
    """
    _connect_members(m, master_bus, port, _read_members(1, 32, 1).keys())


def connect_write_channels(m: Module, master_bus, port) -> None:
    """Wire a write-only manager bus (``channels="w"``) to the AW/W/B members of a full port."""
    _connect_members(m, master_bus, port, _write_members(1, 32, 1).keys())


def tie_off_read(m: Module, port) -> None:
    """Park the AR/R half of an outward-facing full port (no reads issued, R always accepted)."""
    m.d.comb += [port.arvalid.eq(0), port.rready.eq(1), port.arburst.eq(BURST_INCR),
                 port.arsize.eq(port.signature.size_code)]


def tie_off_write(m: Module, port) -> None:
    """Park the AW/W/B half of an outward-facing full port (no writes issued, B always accepted)."""
    m.d.comb += [port.awvalid.eq(0), port.wvalid.eq(0), port.bready.eq(1), port.awburst.eq(BURST_INCR),
                 port.awsize.eq(port.signature.size_code)]


# ---------------------------------------------------------------------------
# Stream payloads
# ---------------------------------------------------------------------------

def transfer_command_layout(addr_width: int = 40, beats_width: int = 28) -> StructLayout:
    """``{addr, beats}``: a byte address (aligned to the data width) and a count of data-width beats."""
    return StructLayout({"addr": addr_width, "beats": beats_width})


def read_data_layout(data_width: int = 128) -> StructLayout:
    """``{data, last}``: one beat; `last` marks the final beat of a command."""
    return StructLayout({"data": data_width, "last": 1})


def write_data_layout(data_width: int = 128) -> StructLayout:
    """``{data, strb}``: one beat and its byte enables (bit i enables byte i, little-endian)."""
    return StructLayout({"data": data_width, "strb": data_width // 8})


def split_bursts(addr: int, beats: int, *, data_bytes: int = 16, max_burst: int = 16) -> list[tuple[int, int]]:
    """The (address, beats) bursts the masters issue for one command: the reference for tests and models."""
    out = []
    page_beats = AXI_PAGE_BYTES // data_bytes
    while beats > 0:
        left_in_page = page_beats - (addr % AXI_PAGE_BYTES) // data_bytes
        n = min(beats, max_burst, left_in_page)
        out.append((addr, n))
        addr += n * data_bytes
        beats -= n
    return out


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------

def _check_common(data_width, addr_width, id_width, max_burst, max_outstanding, beats_width, counter_width):
    if data_width not in (32, 64, 128, 256, 512, 1024):
        raise ConfigError(f"data_width must be a power of two from 32 to 1024 bits, not {data_width}")
    if not 1 <= max_burst <= 256 or max_burst & (max_burst - 1):
        raise ConfigError(f"max_burst must be a power of two from 1 to 256 beats, not {max_burst} "
                          "(the KV260's HP ports take at most 16)")
    if max_burst * data_width // 8 > AXI_PAGE_BYTES:
        raise ConfigError(f"a {max_burst}-beat burst of {data_width} bits is longer than a 4 KiB page")
    if not 1 <= max_outstanding <= 256:
        raise ConfigError(f"max_outstanding must be 1..256 bursts, not {max_outstanding}")
    if not 13 <= addr_width <= 64:
        raise ConfigError(f"addr_width must be 13..64 bits, not {addr_width}")
    if not 1 <= id_width <= 32:
        raise ConfigError(f"id_width must be 1..32 bits, not {id_width}")
    if not 1 <= beats_width <= 40:
        raise ConfigError(f"beats_width must be 1..40 bits, not {beats_width}")
    if not 8 <= counter_width <= 64:
        raise ConfigError(f"counter_width must be 8..64 bits, not {counter_width}")


class _BurstSplitter:
    """Command -> burst splitting shared by both masters (elaborated into the caller's module).

    Holds the current command in beat units; `n` is the next burst's length:
    min(remaining, max_burst, beats left in the 4 KiB page).
    """

    def __init__(self, m: Module, *, addr_width, beats_width, data_bytes, max_burst):
        self.beat_shift = (data_bytes - 1).bit_length()
        beat_addr_width = addr_width - self.beat_shift
        page_beats = AXI_PAGE_BYTES // data_bytes
        page_bits = (page_beats - 1).bit_length()
        self.active = Signal()
        self.beat_addr = Signal(beat_addr_width)       # address in beats
        self.remaining = Signal(beats_width)
        self.n = Signal(range(max_burst + 1))
        self.final = Signal()                          # the next burst ends the command
        self.start_addr = Signal(addr_width)           # byte address of the next burst

        left_in_page = Signal(range(page_beats + 1))
        m.d.comb += left_in_page.eq(page_beats - self.beat_addr[:page_bits])
        cap = Signal(range(max_burst + 1))
        m.d.comb += cap.eq(Mux(left_in_page < max_burst, left_in_page, max_burst))
        m.d.comb += [
            self.n.eq(Mux(self.remaining < cap, self.remaining, cap)),
            self.final.eq(self.remaining <= cap),
            self.start_addr.eq(self.beat_addr << self.beat_shift),
        ]

    def load(self, payload):
        return [self.beat_addr.eq(payload.addr >> self.beat_shift), self.remaining.eq(payload.beats),
                self.active.eq(payload.beats != 0)]

    def advance(self):
        return [self.beat_addr.eq(self.beat_addr + self.n), self.remaining.eq(self.remaining - self.n),
                self.active.eq(~self.final)]


# ---------------------------------------------------------------------------
# Read master
# ---------------------------------------------------------------------------

class AxiReadMaster(wiring.Component):
    """AXI4 read DMA: ``cmd {addr, beats}`` in, ``data {data, last}`` out, in order.

    Parameters
    ----------
    data_width, addr_width, id_width : AXI bus widths.
    max_burst : longest burst in beats (16 for the HP ports).
    max_outstanding : bursts in flight. The data buffer holds
        ``max_outstanding * max_burst`` beats, and an AR is issued only when the
        buffer has room for all its beats, so ``rready`` is always 1.
    beats_width : width of ``cmd.beats``.
    counter_width : width of the performance counters.
    arid : the constant ARID (one ID keeps the data in order).

    Ports
    -----
    cmd : In(stream {addr, beats}). ``addr`` must be aligned to the data width
        (low bits are ignored); ``beats == 0`` is accepted and does nothing.
        Commands are accepted back to back while earlier ones are in flight.
    data : Out(stream {data, last}).
    bus : Out(axi4_read_signature).
    clear : In. One-cycle pulse: forget the current command, drop buffered
        data, clear the error; the master drains bursts still in flight
        (`busy` stays high) and then accepts commands again.
    busy : Out. A command, a burst in flight or buffered data exists.
    error, error_resp, error_addr : Out. Sticky from the first R beat with
        SLVERR/DECERR until `clear` or reset; the resp code and the byte
        address of the failing burst. While `error` is high the master issues
        nothing, drops all data (``data.valid`` stays 0), drains outstanding
        bursts, and accepts and discards further commands, so neither side
        hangs. ``busy`` low with ``error`` high means done-with-error.
    beats_received, stall_memory_cycles, stall_consumer_cycles : Out counters
        (cleared by reset or `counters_clear`). Memory stall: busy, no error,
        consumer ready but no data. Consumer stall: data valid, not taken.
    """

    def __init__(self, *, data_width: int = 128, addr_width: int = 40, id_width: int = 6,
                 max_burst: int = 16, max_outstanding: int = 8, beats_width: int = 28,
                 counter_width: int = 48, arid: int = 0, arcache: int = 0b0011, arprot: int = 0b010):
        _check_common(data_width, addr_width, id_width, max_burst, max_outstanding, beats_width, counter_width)
        self._data_width, self._addr_width, self._id_width = data_width, addr_width, id_width
        self._max_burst, self._max_outstanding = max_burst, max_outstanding
        self._beats_width, self._counter_width = beats_width, counter_width
        self._arid, self._arcache, self._arprot = arid, arcache, arprot
        super().__init__({
            "cmd": In(stream.Signature(transfer_command_layout(addr_width, beats_width))),
            "data": Out(stream.Signature(read_data_layout(data_width))),
            "bus": Out(axi4_read_signature(addr_width, data_width, id_width)),
            "clear": In(1),
            "counters_clear": In(1),
            "busy": Out(1),
            "error": Out(1),
            "error_resp": Out(2),
            "error_addr": Out(addr_width),
            "beats_received": Out(counter_width),
            "stall_memory_cycles": Out(counter_width),
            "stall_consumer_cycles": Out(counter_width),
        })

    data_width = property(lambda self: self._data_width)
    addr_width = property(lambda self: self._addr_width)
    id_width = property(lambda self: self._id_width)
    max_burst = property(lambda self: self._max_burst)
    max_outstanding = property(lambda self: self._max_outstanding)
    beats_width = property(lambda self: self._beats_width)

    @property
    def data_bytes(self) -> int:
        return self._data_width // 8

    @property
    def buffer_beats(self) -> int:
        """Beats of on-chip data buffer (and of credit): max_outstanding x max_burst."""
        return self._max_outstanding * self._max_burst

    def elaborate(self, platform):
        m = Module()
        bus = self.bus
        depth = self.buffer_beats

        split = _BurstSplitter(m, addr_width=self._addr_width, beats_width=self._beats_width,
                               data_bytes=self.data_bytes, max_burst=self._max_burst)

        # Data buffer: BRAM + output register. One spare entry keeps the
        # storage a power of two; the credit counter never lets it fill.
        m.submodules.buffer = buf = SyncFIFOBuffered(width=self._data_width + 1, depth=depth + 1)
        # Per burst in flight: "ends a command" + start address (for error reports).
        m.submodules.bursts = info = SyncFIFO(width=1 + self._addr_width, depth=self._max_outstanding)

        credits = Signal(range(depth + 1), init=depth)
        in_flight = Signal(range(self._max_outstanding + 1))
        aborting = Signal()
        error = Signal()
        m.d.comb += self.error.eq(error)

        # --- AR channel: one registered request ---------------------------------
        m.d.comb += [
            bus.arsize.eq(bus.signature.size_code), bus.arburst.eq(BURST_INCR),
            bus.arid.eq(self._arid), bus.arcache.eq(self._arcache), bus.arprot.eq(self._arprot),
            bus.arlock.eq(0), bus.arqos.eq(0),
        ]
        ar_free = ~bus.arvalid | bus.arready
        with m.If(bus.arvalid & bus.arready):
            m.d.sync += bus.arvalid.eq(0)

        issue = Signal()
        m.d.comb += issue.eq(split.active & ~error & ~aborting & ar_free & (credits >= split.n)
                             & (in_flight < self._max_outstanding))
        with m.If(issue):
            m.d.sync += [
                bus.arvalid.eq(1),
                bus.araddr.eq(split.start_addr),
                bus.arlen.eq(split.n - 1),
                *split.advance(),
            ]
        m.d.comb += [
            info.w_en.eq(issue),
            info.w_data.eq(Cat(split.final, split.start_addr)),
        ]

        # --- commands ------------------------------------------------------------
        accept = Signal()
        m.d.comb += [
            self.cmd.ready.eq(error | (~split.active & ~aborting)),
            accept.eq(self.cmd.valid & self.cmd.ready),
        ]
        with m.If(accept & ~error):
            m.d.sync += split.load(self.cmd.payload)

        # --- R channel -----------------------------------------------------------
        r_fire = Signal()
        r_bad = Signal()
        keep = Signal()
        burst_final = info.r_data[0]
        burst_addr = info.r_data[1:]
        m.d.comb += [
            bus.rready.eq(1),
            r_fire.eq(bus.rvalid),
            r_bad.eq(bus.rresp[1]),                       # SLVERR or DECERR
            keep.eq(r_fire & ~r_bad & ~error & ~aborting),
            buf.w_en.eq(keep),
            buf.w_data.eq(Cat(bus.rdata, bus.rlast & burst_final)),
            info.r_en.eq(r_fire & bus.rlast),
        ]
        with m.If(r_fire & r_bad & ~error & ~aborting):
            m.d.sync += [error.eq(1), self.error_resp.eq(bus.rresp), self.error_addr.eq(burst_addr)]

        # --- data out ------------------------------------------------------------
        flushing = error | aborting
        pop = Signal()
        m.d.comb += [
            self.data.valid.eq(buf.r_rdy & ~flushing),
            self.data.payload.data.eq(buf.r_data[:self._data_width]),
            self.data.payload.last.eq(buf.r_data[self._data_width]),
            buf.r_en.eq(self.data.ready | flushing),
            pop.eq(buf.r_rdy & buf.r_en),
        ]

        # --- bookkeeping ---------------------------------------------------------
        give_back = pop.as_unsigned() + (r_fire & ~keep).as_unsigned()
        m.d.sync += credits.eq(credits + give_back - Mux(issue, split.n, 0))
        m.d.sync += in_flight.eq(in_flight + issue - (r_fire & bus.rlast))

        drained = (in_flight == 0) & (buf.level == 0) & ~bus.arvalid
        with m.If(aborting & drained):
            m.d.sync += aborting.eq(0)
        with m.If(flushing):
            m.d.sync += split.active.eq(0)
        with m.If(self.clear):
            m.d.sync += [aborting.eq(1), error.eq(0), split.active.eq(0)]

        m.d.comb += self.busy.eq(split.active | ~drained | aborting)

        # --- counters ------------------------------------------------------------
        with m.If(self.counters_clear):
            m.d.sync += [self.beats_received.eq(0), self.stall_memory_cycles.eq(0),
                         self.stall_consumer_cycles.eq(0)]
        with m.Else():
            with m.If(r_fire):
                m.d.sync += self.beats_received.eq(self.beats_received + 1)
            with m.If(self.busy & ~flushing & self.data.ready & ~self.data.valid):
                m.d.sync += self.stall_memory_cycles.eq(self.stall_memory_cycles + 1)
            with m.If(self.data.valid & ~self.data.ready):
                m.d.sync += self.stall_consumer_cycles.eq(self.stall_consumer_cycles + 1)
        return m


# ---------------------------------------------------------------------------
# Write master
# ---------------------------------------------------------------------------

class AxiWriteMaster(wiring.Component):
    """AXI4 write DMA: ``cmd {addr, beats}`` and ``data {data, strb}`` in.

    Data beats belong to commands in order (``beats`` of them per command).
    An AW burst is issued only when all of its beats are already buffered, so
    the W channel never waits on the producer once a burst is committed (the
    HP port's write path is not blocked by a slow producer).

    Parameters are those of `AxiReadMaster`, plus ``buffer_beats`` (the data
    buffer, at least `max_burst`; default 2 x max_burst).

    Ports
    -----
    cmd, data : In streams. ``addr`` is aligned to the data width.
    bus : Out(axi4_write_signature).
    clear : In pulse; see `AxiReadMaster`. Committed bursts still complete
        (AXI requires the W beats of an issued AW); buffered data that no AW
        claimed is dropped.
    busy : Out. Commands, buffered data or unanswered bursts exist; falls
        when every B response of every command arrived.
    error, error_resp, error_addr : Out. Sticky from the first B response
        with SLVERR/DECERR. While `error` is high no AW is issued, committed
        bursts are finished, and further commands and data are accepted
        and discarded.
    beats_written : W beats sent. bursts_acknowledged : B responses received.
    stall_memory_cycles : data offered but not taken (the memory is the limit).
    """

    def __init__(self, *, data_width: int = 128, addr_width: int = 40, id_width: int = 6,
                 max_burst: int = 16, max_outstanding: int = 8, beats_width: int = 28,
                 counter_width: int = 48, buffer_beats: int | None = None, awid: int = 0,
                 awcache: int = 0b0011, awprot: int = 0b010):
        _check_common(data_width, addr_width, id_width, max_burst, max_outstanding, beats_width, counter_width)
        buffer_beats = 2 * max_burst if buffer_beats is None else buffer_beats
        if buffer_beats < max_burst:
            raise ConfigError(f"buffer_beats ({buffer_beats}) must hold at least one {max_burst}-beat burst")
        self._data_width, self._addr_width, self._id_width = data_width, addr_width, id_width
        self._max_burst, self._max_outstanding = max_burst, max_outstanding
        self._beats_width, self._counter_width = beats_width, counter_width
        self._buffer_beats = buffer_beats
        self._awid, self._awcache, self._awprot = awid, awcache, awprot
        super().__init__({
            "cmd": In(stream.Signature(transfer_command_layout(addr_width, beats_width))),
            "data": In(stream.Signature(write_data_layout(data_width))),
            "bus": Out(axi4_write_signature(addr_width, data_width, id_width)),
            "clear": In(1),
            "counters_clear": In(1),
            "busy": Out(1),
            "error": Out(1),
            "error_resp": Out(2),
            "error_addr": Out(addr_width),
            "beats_written": Out(counter_width),
            "bursts_acknowledged": Out(counter_width),
            "stall_memory_cycles": Out(counter_width),
        })

    data_width = property(lambda self: self._data_width)
    addr_width = property(lambda self: self._addr_width)
    max_burst = property(lambda self: self._max_burst)
    max_outstanding = property(lambda self: self._max_outstanding)
    buffer_beats = property(lambda self: self._buffer_beats)

    @property
    def data_bytes(self) -> int:
        return self._data_width // 8

    def elaborate(self, platform):
        m = Module()
        bus = self.bus
        dw, sw = self._data_width, self._data_width // 8

        split = _BurstSplitter(m, addr_width=self._addr_width, beats_width=self._beats_width,
                               data_bytes=self.data_bytes, max_burst=self._max_burst)
        m.submodules.buffer = buf = SyncFIFOBuffered(width=dw + sw, depth=self._buffer_beats + 1)
        # Per committed burst: its length for WLAST, its address for B error reports.
        m.submodules.wlens = wlens = SyncFIFO(width=8, depth=self._max_outstanding)
        m.submodules.baddrs = baddrs = SyncFIFO(width=self._addr_width, depth=self._max_outstanding)

        unclaimed = Signal(range(self._buffer_beats + 2))     # buffered beats no AW has claimed yet
        in_flight = Signal(range(self._max_outstanding + 1))  # AWs without their B
        aborting = Signal()
        error = Signal()
        flushing = error | aborting
        m.d.comb += self.error.eq(error)

        # --- AW channel ----------------------------------------------------------
        m.d.comb += [
            bus.awsize.eq(bus.signature.size_code), bus.awburst.eq(BURST_INCR),
            bus.awid.eq(self._awid), bus.awcache.eq(self._awcache), bus.awprot.eq(self._awprot),
            bus.awlock.eq(0), bus.awqos.eq(0),
        ]
        aw_free = ~bus.awvalid | bus.awready
        with m.If(bus.awvalid & bus.awready):
            m.d.sync += bus.awvalid.eq(0)
        issue = Signal()
        m.d.comb += issue.eq(split.active & ~flushing & aw_free & (unclaimed >= split.n)
                             & (in_flight < self._max_outstanding))
        with m.If(issue):
            m.d.sync += [bus.awvalid.eq(1), bus.awaddr.eq(split.start_addr), bus.awlen.eq(split.n - 1),
                         *split.advance()]
        m.d.comb += [
            wlens.w_en.eq(issue), wlens.w_data.eq(split.n - 1),
            baddrs.w_en.eq(issue), baddrs.w_data.eq(split.start_addr),
        ]

        # --- commands and data in --------------------------------------------------
        accept = Signal()
        m.d.comb += [
            self.cmd.ready.eq(error | (~split.active & ~aborting)),
            accept.eq(self.cmd.valid & self.cmd.ready),
        ]
        with m.If(accept & ~error):
            m.d.sync += split.load(self.cmd.payload)

        push = Signal()
        m.d.comb += [
            self.data.ready.eq(flushing | buf.w_rdy),
            push.eq(self.data.valid & buf.w_rdy & ~flushing),
            buf.w_en.eq(push),
            buf.w_data.eq(Cat(self.data.payload.data, self.data.payload.strb)),
        ]

        # --- W channel: committed beats first, then (when flushing) unclaimed ones -----
        beat = Signal(8)
        w_fire = Signal()
        drop = Signal()
        m.d.comb += [
            bus.wvalid.eq(buf.r_rdy & wlens.r_rdy),
            bus.wdata.eq(buf.r_data[:dw]),
            bus.wstrb.eq(buf.r_data[dw:]),
            bus.wlast.eq(beat == wlens.r_data),
            w_fire.eq(bus.wvalid & bus.wready),
            drop.eq(flushing & ~wlens.r_rdy & buf.r_rdy & (unclaimed != 0)),
            buf.r_en.eq(w_fire | drop),
            wlens.r_en.eq(w_fire & bus.wlast),
        ]
        with m.If(w_fire):
            m.d.sync += beat.eq(Mux(bus.wlast, 0, beat + 1))
        m.d.sync += unclaimed.eq(unclaimed + push - Mux(issue, split.n, 0) - drop)

        # --- B channel -----------------------------------------------------------
        b_fire = Signal()
        m.d.comb += [bus.bready.eq(1), b_fire.eq(bus.bvalid), baddrs.r_en.eq(b_fire)]
        with m.If(b_fire & bus.bresp[1] & ~flushing):
            m.d.sync += [error.eq(1), self.error_resp.eq(bus.bresp), self.error_addr.eq(baddrs.r_data)]
        m.d.sync += in_flight.eq(in_flight + issue - b_fire)

        drained = (in_flight == 0) & (buf.level == 0) & ~bus.awvalid
        with m.If(aborting & drained):
            m.d.sync += aborting.eq(0)
        with m.If(flushing):
            m.d.sync += split.active.eq(0)
        with m.If(self.clear):
            m.d.sync += [aborting.eq(1), error.eq(0), split.active.eq(0)]
        m.d.comb += self.busy.eq(split.active | ~drained | aborting)

        # --- counters ------------------------------------------------------------
        with m.If(self.counters_clear):
            m.d.sync += [self.beats_written.eq(0), self.bursts_acknowledged.eq(0),
                         self.stall_memory_cycles.eq(0)]
        with m.Else():
            with m.If(w_fire):
                m.d.sync += self.beats_written.eq(self.beats_written + 1)
            with m.If(b_fire):
                m.d.sync += self.bursts_acknowledged.eq(self.bursts_acknowledged + 1)
            with m.If(self.data.valid & ~self.data.ready):
                m.d.sync += self.stall_memory_cycles.eq(self.stall_memory_cycles + 1)
        return m
