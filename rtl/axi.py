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

from dataclasses import dataclass

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.data import StructLayout
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from sw.contract.commands import BEAT_BYTES, DEFAULT_ADDR_BITS, HP_ID_BITS
from sw.contract.errors import ConfigError

from .component import CheckedComponent
from .storage import Fifo

__all__ = [
    "AXI_PAGE_BYTES", "RESP_OKAY", "RESP_EXOKAY", "RESP_SLVERR", "RESP_DECERR",
    "Axi4Signature", "axi4_signature", "axi4_read_signature", "axi4_write_signature",
    "connect_read_channels", "connect_write_channels", "tie_off_read", "tie_off_write",
    "transfer_command_layout", "read_data_layout", "write_data_layout",
    "AxiMasterParameters", "AxiReadMaster", "AxiWriteMaster", "split_bursts",
    "HP_DATA_BITS", "HP_MAX_BURST", "BEATS_WIDTH",
]

AXI_PAGE_BYTES = 4096          # a burst must not cross a 4 KiB boundary (AXI4 A3.4.1)
RESP_OKAY, RESP_EXOKAY, RESP_SLVERR, RESP_DECERR = 0, 1, 2, 3
BURST_INCR = 1
HP_DATA_BITS = 8 * BEAT_BYTES  # the HP ports' data width: the default of every width below
HP_MAX_BURST = 16              # the PS converts AXI4 to AXI3 behind the HP ports
BEATS_WIDTH = 28               # default width of a transfer command's `beats`


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

    def __init__(self, *, addr_width: int = DEFAULT_ADDR_BITS, data_width: int = HP_DATA_BITS,
                 id_width: int = HP_ID_BITS, channels: str = "rw"):
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


def axi4_signature(addr_width: int = DEFAULT_ADDR_BITS, data_width: int = HP_DATA_BITS,
                   id_width: int = HP_ID_BITS) -> Axi4Signature:
    """A full AXI4 manager port (the PL side of one S_AXI_HPn_FPD port; those take 49-bit addresses)."""
    return Axi4Signature(addr_width=addr_width, data_width=data_width, id_width=id_width, channels="rw")


def axi4_read_signature(addr_width: int = DEFAULT_ADDR_BITS, data_width: int = HP_DATA_BITS,
                        id_width: int = HP_ID_BITS) -> Axi4Signature:
    return Axi4Signature(addr_width=addr_width, data_width=data_width, id_width=id_width, channels="r")


def axi4_write_signature(addr_width: int = DEFAULT_ADDR_BITS, data_width: int = HP_DATA_BITS,
                         id_width: int = HP_ID_BITS) -> Axi4Signature:
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

def transfer_command_layout(addr_width: int = DEFAULT_ADDR_BITS, beats_width: int = BEATS_WIDTH) -> StructLayout:
    """``{addr, beats}``: a byte address (aligned to the data width) and a count of data-width beats."""
    return StructLayout({"addr": addr_width, "beats": beats_width})


def read_data_layout(data_width: int = HP_DATA_BITS) -> StructLayout:
    """``{data, last}``: one beat; `last` marks the final beat of a command."""
    return StructLayout({"data": data_width, "last": 1})


def write_data_layout(data_width: int = HP_DATA_BITS) -> StructLayout:
    """``{data, strb}``: one beat and its byte enables (bit i enables byte i, little-endian)."""
    return StructLayout({"data": data_width, "strb": data_width // 8})


def split_bursts(addr: int, beats: int, *, data_bytes: int = BEAT_BYTES,
                 max_burst: int = HP_MAX_BURST) -> list[tuple[int, int]]:
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

@dataclass(frozen=True)
class AxiMasterParameters:
    """The parameters both masters take, checked on construction, and the facts derived from them.

    data_width, addr_width, id_width : AXI bus widths.
    max_burst : longest burst in beats (16 for the HP ports).
    max_outstanding : bursts in flight.
    beats_width : width of ``cmd.beats``.
    counter_width : width of the performance counters.
    """
    data_width: int = HP_DATA_BITS
    addr_width: int = DEFAULT_ADDR_BITS
    id_width: int = HP_ID_BITS
    max_burst: int = HP_MAX_BURST
    max_outstanding: int = 8
    beats_width: int = BEATS_WIDTH
    counter_width: int = 48

    def __post_init__(self):
        data_width, max_burst = self.data_width, self.max_burst
        if data_width not in (32, 64, 128, 256, 512, 1024):
            raise ConfigError(f"data_width must be a power of two from 32 to 1024 bits, not {data_width}")
        if not 1 <= max_burst <= 256 or max_burst & (max_burst - 1):
            raise ConfigError(f"max_burst must be a power of two from 1 to 256 beats, not {max_burst} "
                              f"(the KV260's HP ports take at most {HP_MAX_BURST})")
        if max_burst * data_width // 8 > AXI_PAGE_BYTES:
            raise ConfigError(f"a {max_burst}-beat burst of {data_width} bits is longer than a 4 KiB page")
        if not 1 <= self.max_outstanding <= 256:
            raise ConfigError(f"max_outstanding must be 1..256 bursts, not {self.max_outstanding}")
        if not 13 <= self.addr_width <= 64:
            raise ConfigError(f"addr_width must be 13..64 bits, not {self.addr_width}")
        if not 1 <= self.id_width <= 32:
            raise ConfigError(f"id_width must be 1..32 bits, not {self.id_width}")
        if not 1 <= self.beats_width <= 40:
            raise ConfigError(f"beats_width must be 1..40 bits, not {self.beats_width}")
        if not 8 <= self.counter_width <= 64:
            raise ConfigError(f"counter_width must be 8..64 bits, not {self.counter_width}")

    @property
    def data_bytes(self) -> int:
        return self.data_width // 8


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


class _AxiMaster(CheckedComponent):
    """What the read and write masters share: parameters, ports, facts and the control around the
    bursts (command input, address channel, error and clear handling, counters).

    A subclass names its address channel (``_AX``: "ar" or "aw"), its data stream (``_data_member``)
    and its counters (``_COUNTERS``), and takes its own arguments (``_split_arguments``).
    """

    _AX: str
    _COUNTERS: tuple[str, ...]

    @classmethod
    def _split_arguments(cls, **kwargs) -> tuple[AxiMasterParameters, dict]:
        """(the shared parameters, the subclass's own checked arguments)."""
        raise NotImplementedError

    @classmethod
    def _data_member(cls, data_width: int):
        raise NotImplementedError

    @classmethod
    def check(cls, **kwargs) -> None:
        cls._split_arguments(**kwargs)

    def __init__(self, **kwargs):
        self._params, own = self._split_arguments(**kwargs)
        self._axid, self._axcache, self._axprot = own.pop("id"), own.pop("cache"), own.pop("prot")
        self._extra = own                     # the subclass's other arguments
        p = self._params
        super().__init__({
            "cmd": In(stream.Signature(transfer_command_layout(p.addr_width, p.beats_width))),
            "data": self._data_member(p.data_width),
            "bus": Out(Axi4Signature(addr_width=p.addr_width, data_width=p.data_width, id_width=p.id_width,
                                     channels=self._AX[1])),
            "clear": In(1),
            "counters_clear": In(1),
            "busy": Out(1),
            "error": Out(1),
            "error_resp": Out(2),
            "error_addr": Out(p.addr_width),
            **{name: Out(p.counter_width) for name in self._COUNTERS},
        })

    params = property(lambda self: self._params)
    data_width = property(lambda self: self._params.data_width)
    addr_width = property(lambda self: self._params.addr_width)
    id_width = property(lambda self: self._params.id_width)
    max_burst = property(lambda self: self._params.max_burst)
    max_outstanding = property(lambda self: self._params.max_outstanding)
    beats_width = property(lambda self: self._params.beats_width)
    data_bytes = property(lambda self: self._params.data_bytes)

    def _ax(self, name: str):
        """The address channel's member `name` (``"addr"`` is ``araddr`` or ``awaddr``)."""
        return getattr(self.bus, self._AX + name)

    def _control(self, m: Module):
        """The burst splitter, the state both masters keep, and the command input."""
        p = self._params
        split = _BurstSplitter(m, addr_width=p.addr_width, beats_width=p.beats_width,
                               data_bytes=p.data_bytes, max_burst=p.max_burst)
        in_flight = Signal(range(p.max_outstanding + 1), name="in_flight")   # bursts without their answer
        aborting = Signal(name="aborting")
        error = Signal(name="error")
        m.d.comb += self.error.eq(error)

        accept = Signal(name="accept")
        m.d.comb += [
            self.cmd.ready.eq(error | (~split.active & ~aborting)),
            accept.eq(self.cmd.valid & self.cmd.ready),
        ]
        with m.If(accept & ~error):
            m.d.sync += split.load(self.cmd.payload)
        return split, in_flight, aborting, error

    def _address_channel(self, m: Module, split, in_flight, flushing, room) -> Signal:
        """AR or AW, one registered request: the splitter's next burst, issued when the buffer has `room`."""
        valid, ready = self._ax("valid"), self._ax("ready")
        m.d.comb += [
            self._ax("size").eq(self.bus.signature.size_code), self._ax("burst").eq(BURST_INCR),
            self._ax("id").eq(self._axid), self._ax("cache").eq(self._axcache), self._ax("prot").eq(self._axprot),
            self._ax("lock").eq(0), self._ax("qos").eq(0),
        ]
        with m.If(valid & ready):
            m.d.sync += valid.eq(0)
        issue = Signal(name="issue")
        m.d.comb += issue.eq(split.active & ~flushing & (~valid | ready) & room
                             & (in_flight < self._params.max_outstanding))
        with m.If(issue):
            m.d.sync += [valid.eq(1), self._ax("addr").eq(split.start_addr), self._ax("len").eq(split.n - 1),
                         *split.advance()]
        return issue

    def _drain(self, m: Module, split, in_flight, aborting, error, buf) -> None:
        """Stop on an error or `clear`; after `clear`, wait until every burst answered and `buf` is empty."""
        drained = (in_flight == 0) & (buf.level == 0) & ~self._ax("valid")
        with m.If(aborting & drained):
            m.d.sync += aborting.eq(0)
        with m.If(error | aborting):
            m.d.sync += split.active.eq(0)
        with m.If(self.clear):
            m.d.sync += [aborting.eq(1), error.eq(0), split.active.eq(0)]
        m.d.comb += self.busy.eq(split.active | ~drained | aborting)

    def _count(self, m: Module, events: dict) -> None:
        """Each counter of `events` counts the cycles its condition holds, until `counters_clear`."""
        assert tuple(events) == self._COUNTERS
        counters = [getattr(self, name) for name in events]
        with m.If(self.counters_clear):
            m.d.sync += [counter.eq(0) for counter in counters]
        with m.Else():
            for counter, condition in zip(counters, events.values()):
                with m.If(condition):
                    m.d.sync += counter.eq(counter + 1)


# ---------------------------------------------------------------------------
# Read master
# ---------------------------------------------------------------------------

class AxiReadMaster(_AxiMaster):
    """AXI4 read DMA: ``cmd {addr, beats}`` in, ``data {data, last}`` out, in order.

    Parameters
    ----------
    data_width, addr_width, id_width, max_burst, max_outstanding, beats_width, counter_width :
        see `AxiMasterParameters`. The data buffer holds ``max_outstanding * max_burst`` beats, and
        an AR is issued only when the buffer has room for all its beats, so ``rready`` is always 1.
    arid : the constant ARID (one ID keeps the data in order).
    arcache, arprot : the constant ARCACHE and ARPROT.

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

    _AX = "ar"
    _COUNTERS = ("beats_received", "stall_memory_cycles", "stall_consumer_cycles")

    @classmethod
    def _split_arguments(cls, *, arid: int = 0, arcache: int = 0b0011, arprot: int = 0b010, **params):
        return AxiMasterParameters(**params), {"id": arid, "cache": arcache, "prot": arprot}

    @classmethod
    def _data_member(cls, data_width: int):
        return Out(stream.Signature(read_data_layout(data_width)))

    @property
    def buffer_beats(self) -> int:
        """Beats of on-chip data buffer (and of credit): max_outstanding x max_burst."""
        return self._params.max_outstanding * self._params.max_burst

    def elaborate(self, platform):
        m = Module()
        bus, p = self.bus, self._params
        depth = self.buffer_beats
        split, in_flight, aborting, error = self._control(m)
        flushing = error | aborting

        # Data buffer: BRAM + output register. One spare entry keeps the
        # storage a power of two; the credit counter never lets it fill.
        m.submodules.buffer = buf = Fifo(width=p.data_width + 1, depth=depth + 1)
        # Per burst in flight: "ends a command" + start address (for error reports).
        m.submodules.bursts = info = SyncFIFO(width=1 + p.addr_width, depth=p.max_outstanding)
        credits = Signal(range(depth + 1), init=depth)

        issue = self._address_channel(m, split, in_flight, flushing, room=credits >= split.n)
        m.d.comb += [
            info.w_en.eq(issue),
            info.w_data.eq(Cat(split.final, split.start_addr)),
        ]

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
            keep.eq(r_fire & ~r_bad & ~flushing),
            buf.w_en.eq(keep),
            buf.w_data.eq(Cat(bus.rdata, bus.rlast & burst_final)),
            info.r_en.eq(r_fire & bus.rlast),
        ]
        with m.If(r_fire & r_bad & ~flushing):
            m.d.sync += [error.eq(1), self.error_resp.eq(bus.rresp), self.error_addr.eq(burst_addr)]

        # --- data out ------------------------------------------------------------
        pop = Signal()
        m.d.comb += [
            self.data.valid.eq(buf.r_rdy & ~flushing),
            self.data.payload.data.eq(buf.r_data[:p.data_width]),
            self.data.payload.last.eq(buf.r_data[p.data_width]),
            buf.r_en.eq(self.data.ready | flushing),
            pop.eq(buf.r_rdy & buf.r_en),
        ]

        # --- bookkeeping ---------------------------------------------------------
        give_back = pop.as_unsigned() + (r_fire & ~keep).as_unsigned()
        m.d.sync += credits.eq(credits + give_back - Mux(issue, split.n, 0))
        m.d.sync += in_flight.eq(in_flight + issue - (r_fire & bus.rlast))
        self._drain(m, split, in_flight, aborting, error, buf)

        self._count(m, {
            "beats_received": r_fire,
            "stall_memory_cycles": self.busy & ~flushing & self.data.ready & ~self.data.valid,
            "stall_consumer_cycles": self.data.valid & ~self.data.ready,
        })
        return m


# ---------------------------------------------------------------------------
# Write master
# ---------------------------------------------------------------------------

class AxiWriteMaster(_AxiMaster):
    """AXI4 write DMA: ``cmd {addr, beats}`` and ``data {data, strb}`` in.

    Data beats belong to commands in order (``beats`` of them per command).
    An AW burst is issued only when all of its beats are already buffered, so
    the W channel never waits on the producer once a burst is committed (the
    HP port's write path is not blocked by a slow producer).

    Parameters are those of `AxiReadMaster` (``awid``, ``awcache``, ``awprot``
    for the AW channel), plus ``buffer_beats`` (the data buffer, at least
    `max_burst`; default 2 x max_burst).

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

    _AX = "aw"
    _COUNTERS = ("beats_written", "bursts_acknowledged", "stall_memory_cycles")

    @classmethod
    def _split_arguments(cls, *, buffer_beats: int | None = None, awid: int = 0, awcache: int = 0b0011,
                         awprot: int = 0b010, **params):
        params = AxiMasterParameters(**params)
        buffer_beats = 2 * params.max_burst if buffer_beats is None else buffer_beats
        if buffer_beats < params.max_burst:
            raise ConfigError(f"buffer_beats ({buffer_beats}) must hold at least one {params.max_burst}-beat burst")
        return params, {"id": awid, "cache": awcache, "prot": awprot, "buffer_beats": buffer_beats}

    @classmethod
    def _data_member(cls, data_width: int):
        return In(stream.Signature(write_data_layout(data_width)))

    @property
    def buffer_beats(self) -> int:
        return self._extra["buffer_beats"]

    def elaborate(self, platform):
        m = Module()
        bus, p = self.bus, self._params
        dw, sw = p.data_width, p.data_bytes
        split, in_flight, aborting, error = self._control(m)
        flushing = error | aborting

        m.submodules.buffer = buf = Fifo(width=dw + sw, depth=self.buffer_beats + 1)
        # Per committed burst: its length for WLAST, its address for B error reports.
        m.submodules.wlens = wlens = SyncFIFO(width=8, depth=p.max_outstanding)
        m.submodules.baddrs = baddrs = SyncFIFO(width=p.addr_width, depth=p.max_outstanding)
        unclaimed = Signal(range(self.buffer_beats + 2))     # buffered beats no AW has claimed yet

        issue = self._address_channel(m, split, in_flight, flushing, room=unclaimed >= split.n)
        m.d.comb += [
            wlens.w_en.eq(issue), wlens.w_data.eq(split.n - 1),
            baddrs.w_en.eq(issue), baddrs.w_data.eq(split.start_addr),
        ]

        # --- data in ---------------------------------------------------------------
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
        self._drain(m, split, in_flight, aborting, error, buf)

        self._count(m, {
            "beats_written": w_fire,
            "bursts_acknowledged": b_fire,
            "stall_memory_cycles": self.data.valid & ~self.data.ready,
        })
        return m
