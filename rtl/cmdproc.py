"""CommandProcessor: the control registers, the command-list fetcher and the run sequencer.

The host writes a list of 64-byte LINEAR descriptors into DDR once per model
(format: sw/contract/commands.py, docs/registers.md), sets CMD_BASE and CMD_COUNT and
writes CTRL.start. The processor then, for each descriptor in order:

1. fetches it through an AXI read master (rtl/axi.py's AxiReadMaster: a
   ``{addr, beats}`` command stream out, ``{data, last}`` beats in, a sticky
   ``error`` in and a ``clear`` pulse out). The next descriptor is prefetched
   while the current command executes, so fetch latency is paid once per run;
2. validates it with the checks of ``sw.contract.commands.validate_command``, in the
   same order and with the same :class:`~sw.contract.commands.ErrorCode`. An invalid
   descriptor (or one whose fetch got SLVERR/DECERR) is never presented to the
   datapath: the run stops with STATUS.error, the code and the command index;
3. presents the decoded command on the ``op`` stream and collects one
   ``op_done`` answer ``{error, error_code}`` per command, in command order.
   With ``ops_in_flight = 1`` (the default) it waits for a command's answer
   before presenting the next one. With ``ops_in_flight = n > 1`` it presents
   up to n commands before their answers arrive, so a datapath that holds
   several commands can start the next one while the previous one drains
   (rtl/top.py uses 2); a descriptor that fails validation is still reported
   only after every earlier command has answered, and is never presented.

It keeps STATUS/IRQ_STATUS, drives the level ``irq`` line (gated by
CTRL.irq_enable), counts busy cycles and the cycles of every command (a
32-entry log plus LAST_CMD_CYCLES), and accumulates the datapath's perf
events (``perf``) into 64-bit counters with LO-read / snapshot latching.

CTRL.soft_reset aborts a run at any point: the sequencer returns to idle, the
read master is cleared (it drains its bursts in flight by itself), status,
interrupt causes and counters are cleared, and the ``soft_reset`` output
pulses so that the integrator can return the datapath to idle too. The
datapath must not answer ``op_done`` for an op issued before that pulse.

Cycles of a command (CMD_LOG_CYCLES, LAST_CMD_CYCLES) run from the cycle it
becomes current (the cycle after the previous command's op_done, or the first
busy cycle) through its op_done handshake, so a successful run's log entries
sum exactly to its BUSY_CYCLES.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out, connect, flipped

from sw.contract.commands import (ALIGN, CMD_LOG_DEPTH, CSR_ADDR_WIDTH, DEFAULT_ADDR_BITS, DESCRIPTOR_BYTES,
                         DESCRIPTOR_VERSION, FLAGS_DEFINED, FLAGS_DEFINED_FABRIC, ID_MAGIC, PERF_COUNTERS, REGMAP_VERSION,
                         WEIGHT_KIND_INT4, WEIGHT_KIND_INT8, ErrorCode, HardwareLimits, Opcode,
                         config_hash_words, descriptor_field_bits, register)
from sw.contract.errors import ConfigError
from sw.contract.fabric_commands import FABRIC_OPCODES

from .axi import BEATS_WIDTH, read_data_layout, transfer_command_layout
from .axilite import AxiLiteSignature, AxiLiteToCsr
from .component import CheckedComponent
from .csr import RegisterBank
from .fabric_cmd import FabricDescriptorChecker, fabric_descriptor_layout, fabric_done_layout, fabric_op_layout

__all__ = ["CommandProcessor", "DescriptorChecker", "descriptor_layout", "op_layout", "op_done_layout",
           "PerfEventSignature"]

ERROR_CODE_BITS = register("STATUS").field("error_code").width
INDEX_BITS = register("STATUS").field("cmd_index").width
CYCLE_BITS = register("LAST_CMD_CYCLES").field("cycles").width


def descriptor_layout() -> data.StructLayout:
    """The 512-bit descriptor as sw.contract.commands.DESCRIPTOR_FIELDS lays it out (byte 0 in bits 7..0)."""
    fields = descriptor_field_bits()
    layout = data.StructLayout({name: unsigned(width) for name, (_, width) in fields.items()})
    for name, (offset, width) in fields.items():
        assert layout[name].offset == offset, name
    assert layout.size == DESCRIPTOR_BYTES * 8
    return layout


def op_layout(addr_width: int = DEFAULT_ADDR_BITS) -> data.StructLayout:
    """A validated LINEAR command, as the datapath receives it.

    ``groups`` = k / group_size; rows need not fill the last tile (the
    datapath pads to tile_rows, as the .kq layout does)."""
    return data.StructLayout({
        "index": unsigned(INDEX_BITS),      # position in the run
        "tag": unsigned(32),                # the descriptor's tag, for the datapath's own use
        "has_bias": unsigned(1),
        "weight_int8": unsigned(1),
        "argmax": unsigned(1),              # Flags.ARGMAX (fabric designs): the last row's argmax to RESULT_*
        "n": unsigned(32),
        "k": unsigned(32),
        "groups": unsigned(32),
        "tokens": unsigned(16),
        "weight_addr": unsigned(addr_width),
        "act_addr": unsigned(addr_width),
        "bias_addr": unsigned(addr_width),
        "out_addr": unsigned(addr_width),
    })


def op_done_layout() -> data.StructLayout:
    """The datapath's answer: error 1 stops the run with error_code (0 means DATAPATH_ERROR)."""
    return data.StructLayout({"error": unsigned(1), "error_code": unsigned(ERROR_CODE_BITS)})



def rtl_limits(config, addr_width: int) -> HardwareLimits:
    """What this RTL executes: the config's limits (HW_PARAMS0..4). A config with max_context > 0
    has the fabric decoder's engines (rtl/top.py) and executes the fabric opcodes."""
    return HardwareLimits.from_config(config, addr_bits=addr_width)


class PerfEventSignature(wiring.Signature):
    """Per-cycle performance events, driven by the datapath (Out = datapath to processor)."""

    def __init__(self, bytes_width: int = 16):
        super().__init__({
            "mem_stall": Out(1),          # the engine waited on memory this cycle
            "compute_stall": Out(1),      # memory data waited on compute this cycle
            "bytes_read": Out(bytes_width),
            "bytes_written": Out(bytes_width),
        })


class DescriptorChecker(wiring.Component):
    """Combinational descriptor validation: ``code`` is sw.contract.commands.validate_command's answer.

    The checks run in ErrorCode order and the first failing one is reported,
    exactly as in software; tests/test_cmdproc.py compares the two on random
    descriptors.
    """

    def __init__(self, limits: HardwareLimits):
        self._limits = limits
        super().__init__({"desc": In(descriptor_layout()), "code": Out(ERROR_CODE_BITS)})

    def elaborate(self, platform):
        m = Module()
        lim, d = self._limits, self.desc
        aw = lim.addr_bits
        has_bias, int8 = d.flags[0], d.flags[1]
        g_bits = (lim.group_size - 1).bit_length()
        lo_bits = (ALIGN - 1).bit_length()
        addrs = [d.weight_addr, d.act_addr, d.out_addr]
        misaligned = Cat(*(a[:lo_bits] != 0 for a in addrs), has_bias & (d.bias_addr[:lo_bits] != 0)).any()
        if aw < 64:
            out_of_range = Cat(*(a[aw:] != 0 for a in addrs), has_bias & (d.bias_addr[aw:] != 0)).any()
        else:
            out_of_range = Const(0)
        kind_ok = Mux(int8, bool(lim.weight_kinds & WEIGHT_KIND_INT8), bool(lim.weight_kinds & WEIGHT_KIND_INT4))
        defined = FLAGS_DEFINED_FABRIC if lim.fabric_ops else FLAGS_DEFINED
        checks = [
            (d.opcode != Opcode.LINEAR, ErrorCode.BAD_OPCODE),
            (d.version != DESCRIPTOR_VERSION, ErrorCode.BAD_VERSION),
            (((d.flags & (0xFFFF & ~defined)) != 0) | (d.reserved0 != 0) | (d.reserved1 != 0),
             ErrorCode.RESERVED_NONZERO),
            ((d.n == 0) | (d.k == 0) | (d.tokens == 0), ErrorCode.ZERO_SHAPE),
            (d.group_size != lim.group_size, ErrorCode.BAD_GROUP_SIZE),
            ((d.k[:g_bits] != 0) if g_bits else Const(0), ErrorCode.K_NOT_GROUP_MULTIPLE),
            (d.tile_rows != lim.tile_rows, ErrorCode.BAD_TILE_ROWS),
            (~kind_ok, ErrorCode.UNSUPPORTED_WEIGHT_KIND),
            (d.tokens > lim.tokens, ErrorCode.TOO_MANY_TOKENS),
            (misaligned, ErrorCode.MISALIGNED_ADDRESS),
            (out_of_range, ErrorCode.ADDRESS_RANGE),
        ]
        assert [int(c) for _, c in checks] == list(range(1, len(checks) + 1))
        for cond, code in reversed(checks):
            # reversed + later-wins gives the first failing check priority
            with m.If(cond):
                m.d.comb += self.code.eq(code)
        return m


class _State(enum.Enum, shape=3):
    IDLE = 0
    WAIT_DESC = 1
    CHECK = 2
    ISSUE = 3
    WAIT_DONE = 4
    FABRIC_ISSUE = 5    # a fabric op waits for every earlier command's answer, then goes out on `fop`
    FABRIC_WAIT = 6     # ... and is answered on `fop_done` before the next descriptor


class CommandProcessor(CheckedComponent):
    """See the module docstring.

    Parameters
    ----------
    config : sw.contract.config.ArrayConfig (rows, cols, tokens, group_size, engines,
        weight_bits, port_bits, clock_mhz are read).
    config_hash : sha256 hex digest shown in CONFIG_HASH0..7; default
        ``config.config_hash``.
    addr_width : bus address width of the read master and of the op addresses.
    beats_width : width of the read master's ``beats`` field.
    perf_bytes_width : width of the per-cycle byte increments in ``perf``.
    limits : override of ``HardwareLimits.from_config(config, addr_width)``.
    ops_in_flight : commands presented on ``op`` before their ``op_done`` (1..15).

    Ports
    -----
    csr : In(AxiLiteSignature(12)), the control window (docs/registers.md).
    fetch_cmd : Out(stream {addr, beats}); connect to AxiReadMaster.cmd.
    fetch_data : In(stream {data, last}); connect from AxiReadMaster.data.
    fetch_error : In(1), AxiReadMaster.error. fetch_clear : Out(1), to AxiReadMaster.clear.
    op : Out(stream op_layout). op_done : In(stream op_done_layout).
    perf : In(PerfEventSignature).
    irq : Out(1), level. busy : Out(1), STATUS.busy. soft_reset : Out(1), one-cycle pulse.
    """

    @classmethod
    def check(cls, config, *, config_hash: str | None = None, addr_width: int = DEFAULT_ADDR_BITS,
              limits: HardwareLimits | None = None, ops_in_flight: int = 1, **widths) -> None:
        if not isinstance(ops_in_flight, int) or not 1 <= ops_in_flight <= 15:
            raise ConfigError(f"CommandProcessor: ops_in_flight must be 1..15, got {ops_in_flight!r}")
        config_hash_words(config.config_hash if config_hash is None else config_hash)
        limits = limits or rtl_limits(config, addr_width)
        if limits.addr_bits != addr_width:
            raise ConfigError(f"CommandProcessor: limits.addr_bits {limits.addr_bits} != addr_width {addr_width}")
        if (DESCRIPTOR_BYTES * 8) % config.port_bits:
            raise ConfigError(f"CommandProcessor: a {DESCRIPTOR_BYTES}-byte descriptor is not a whole number of "
                              f"{config.port_bits}-bit beats")
        g = limits.group_size
        if g & (g - 1):
            raise ConfigError(f"CommandProcessor: group size {g} must be a power of two")
        for reg, name, value in (("HW_PARAMS0", "rows", limits.tile_rows), ("HW_PARAMS0", "cols", config.cols),
                                 ("HW_PARAMS0", "tokens", limits.tokens), ("HW_PARAMS0", "group_size", g),
                                 ("HW_PARAMS1", "engines", config.engines),
                                 ("HW_PARAMS2", "clock_mhz", config.clock_mhz)):
            bits = register(reg).field(name).width
            if value >= 1 << bits:
                raise ConfigError(f"CommandProcessor: {name} {value} does not fit its {bits}-bit {reg} field")

    def __init__(self, config, *, config_hash: str | None = None, addr_width: int = DEFAULT_ADDR_BITS,
                 beats_width: int = BEATS_WIDTH, perf_bytes_width: int = 16, limits: HardwareLimits | None = None,
                 ops_in_flight: int = 1):
        self._ops_in_flight = ops_in_flight
        self._config = config
        self._hash = config.config_hash if config_hash is None else config_hash
        self._hash_words = config_hash_words(self._hash)
        self._limits = limits or rtl_limits(config, addr_width)
        self._addr_width = addr_width
        self._beat_bits = config.port_bits
        self._desc_beats = DESCRIPTOR_BYTES * 8 // self._beat_bits
        self._bank = RegisterBank()
        fabric = {}
        if self._limits.fabric_ops:
            fabric = {
                "fop": Out(stream.Signature(fabric_op_layout(addr_width))),
                "fop_done": In(stream.Signature(fabric_done_layout())),
                "result_we": In(1),
                "result_index": In(register("RESULT_INDEX").field("index").width),
                "result_value": In(32),
            }
        super().__init__({
            **fabric,
            "csr": In(AxiLiteSignature(addr_width=CSR_ADDR_WIDTH)),
            "fetch_cmd": Out(stream.Signature(transfer_command_layout(addr_width, beats_width))),
            "fetch_data": In(stream.Signature(read_data_layout(self._beat_bits))),
            "fetch_error": In(1),
            "fetch_clear": Out(1),
            "op": Out(stream.Signature(op_layout(addr_width))),
            "op_done": In(stream.Signature(op_done_layout())),
            "perf": In(PerfEventSignature(perf_bytes_width)),
            "irq": Out(1),
            "busy": Out(1),
            "soft_reset": Out(1),
        })

    # ---- facts for the integrator and the tests ------------------------------
    @property
    def limits(self) -> HardwareLimits:
        return self._limits

    @property
    def config_hash(self) -> str:
        return self._hash

    @property
    def descriptor_beats(self) -> int:
        return self._desc_beats

    @property
    def ops_in_flight(self) -> int:
        return self._ops_in_flight

    @property
    def registers(self):
        """{name: (offset, csr.Register)} of the bank."""
        return self._bank.registers

    # ---- hardware ----------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        m.submodules.axil = axil = AxiLiteToCsr(CSR_ADDR_WIDTH)
        m.submodules.bank = bank = self._bank
        connect(m, flipped(self.csr), axil.axil)
        connect(m, axil.csr, bank.bus)
        regs = bank.reg
        cfg, lim = self._config, self._limits

        # ---- constant registers ---------------------------------------------------
        m.d.comb += [
            regs.ID.f.magic.r_data.eq(ID_MAGIC),
            regs.VERSION.f.major.r_data.eq(REGMAP_VERSION[0]),
            regs.VERSION.f.minor.r_data.eq(REGMAP_VERSION[1]),
            regs.HW_PARAMS0.f.rows.r_data.eq(lim.tile_rows),
            regs.HW_PARAMS0.f.cols.r_data.eq(cfg.cols),
            regs.HW_PARAMS0.f.tokens.r_data.eq(lim.tokens),
            regs.HW_PARAMS0.f.group_size.r_data.eq(lim.group_size),
            regs.HW_PARAMS1.f.engines.r_data.eq(cfg.engines),
            regs.HW_PARAMS1.f.weight_kinds.r_data.eq(lim.weight_kinds),
            regs.HW_PARAMS1.f.cmd_log_depth.r_data.eq(CMD_LOG_DEPTH),
            regs.HW_PARAMS1.f.beat_bytes.r_data.eq(self._beat_bits // 8),
            regs.HW_PARAMS2.f.addr_bits.r_data.eq(self._addr_width),
            regs.HW_PARAMS2.f.clock_mhz.r_data.eq(cfg.clock_mhz),
            regs.HW_PARAMS3.f.max_context.r_data.eq(lim.max_context),
            regs.HW_PARAMS4.f.head_dim.r_data.eq(lim.head_dim),
            regs.HW_PARAMS4.f.kv_group.r_data.eq(lim.kv_group),
            regs.HW_PARAMS4.f.max_row.r_data.eq(lim.max_row),
        ]
        for i, word in enumerate(self._hash_words):
            m.d.comb += getattr(regs, f"CONFIG_HASH{i}").f.hash.r_data.eq(word)

        start = regs.CTRL.f.start.pulse
        soft_reset = regs.CTRL.f.soft_reset.pulse
        perf_clear = regs.CTRL.f.perf_clear.pulse
        base = Cat(regs.CMD_BASE_LO.f.addr.data, regs.CMD_BASE_HI.f.addr.data)
        count = regs.CMD_COUNT.f.count.data
        m.d.comb += self.soft_reset.eq(soft_reset)

        # ---- run state ------------------------------------------------------------------
        state = Signal(_State)
        index = Signal(INDEX_BITS)       # the oldest command without an answer (STATUS.cmd_index)
        issue_index = Signal(INDEX_BITS) # the command in `cur`, next to be presented on `op`
        outstanding = Signal(range(self._ops_in_flight + 1))   # presented, not yet answered
        run_count = Signal(INDEX_BITS)   # CMD_COUNT as it was at start: later writes cannot derail a run
        done, error = Signal(), Signal()
        error_code = Signal(ERROR_CODE_BITS)
        cmd_cycles = Signal(CYCLE_BITS)
        last_cycles = Signal(CYCLE_BITS)
        active = Signal()
        m.d.comb += active.eq(state != _State.IDLE)
        m.d.comb += [
            self.busy.eq(active),
            regs.STATUS.f.busy.r_data.eq(active),
            regs.STATUS.f.done.r_data.eq(done),
            regs.STATUS.f.error.r_data.eq(error),
            regs.STATUS.f.error_code.r_data.eq(error_code),
            regs.STATUS.f.cmd_index.r_data.eq(index),
            regs.LAST_CMD_CYCLES.f.cycles.r_data.eq(last_cycles),
        ]
        finish = Signal()            # the run ends this cycle (sets done and the irq causes)
        fail = Signal()              # ... with an error
        fail_code = Signal(ERROR_CODE_BITS)

        # ---- descriptor fetcher -----------------------------------------------------------
        desc_layout = descriptor_layout()
        buf = Signal(desc_layout)          # the prefetched descriptor
        buf_full, buf_err = Signal(), Signal()
        cur = Signal(desc_layout)          # the current descriptor
        cur_err = Signal()
        f_addr = Signal(len(base))
        f_remaining = Signal(INDEX_BITS)
        f_busy = Signal()                  # a fetch command was accepted and its beats are due
        f_beat = Signal(range(self._desc_beats))
        abort = Signal()                   # stop fetching and clear the read master

        cmd = self.fetch_cmd
        m.d.comb += cmd.payload.beats.eq(self._desc_beats)
        with m.If(cmd.valid & cmd.ready):
            m.d.sync += [cmd.valid.eq(0), f_busy.eq(1), f_beat.eq(0), buf_err.eq(0),
                         f_addr.eq(f_addr + DESCRIPTOR_BYTES), f_remaining.eq(f_remaining - 1)]
        with m.Elif(~cmd.valid & active & (f_remaining != 0) & ~buf_full & ~f_busy):
            m.d.sync += [cmd.valid.eq(1), cmd.payload.addr.eq(f_addr)]

        beat_fire = Signal()
        m.d.comb += [self.fetch_data.ready.eq(1), beat_fire.eq(self.fetch_data.valid & f_busy)]
        with m.If(beat_fire):
            with m.Switch(f_beat):
                for i in range(self._desc_beats):
                    with m.Case(i):
                        w = self._beat_bits
                        m.d.sync += buf.as_value()[i * w:(i + 1) * w].eq(self.fetch_data.payload.data)
            m.d.sync += f_beat.eq(f_beat + 1)
            with m.If(f_beat == self._desc_beats - 1):
                m.d.sync += [f_busy.eq(0), buf_full.eq(1)]
        with m.If(f_busy & self.fetch_error):
            # The read master drops the data of a failed burst: this descriptor is lost.
            m.d.sync += [f_busy.eq(0), buf_full.eq(1), buf_err.eq(1)]

        m.d.comb += self.fetch_clear.eq(abort)
        with m.If(abort):
            m.d.sync += [cmd.valid.eq(0), f_busy.eq(0), buf_full.eq(0), f_remaining.eq(0)]

        # ---- validation (sw.contract.commands.validate_command, same order) ------------------------
        m.submodules.checker = checker = DescriptorChecker(lim)
        m.d.comb += checker.desc.eq(cur)
        check = checker.code
        fabric = lim.fabric_ops
        is_fabric = Signal()
        if fabric:
            # A fabric opcode's descriptor is checked by validate_fabric_command's rules instead.
            m.submodules.fabric_checker = fchecker = FabricDescriptorChecker(lim)
            m.d.comb += [fchecker.desc.eq(cur.as_value()),
                         is_fabric.eq(Cat(*(cur.opcode == o for o in FABRIC_OPCODES)).any())]
            check = Mux(is_fabric, fchecker.code, checker.code)
        d = cur
        has_bias = d.flags[0]
        int8 = d.flags[1]
        g_bits = (lim.group_size - 1).bit_length()
        lo_bits = (ALIGN - 1).bit_length()

        aw = self._addr_width
        p = self.op.payload
        m.d.comb += [
            p.index.eq(issue_index), p.tag.eq(d.tag), p.has_bias.eq(has_bias), p.weight_int8.eq(int8),
            p.n.eq(d.n), p.k.eq(d.k), p.groups.eq(d.k >> g_bits), p.tokens.eq(d.tokens),
            p.argmax.eq(d.flags[2] if fabric else 0),
            p.weight_addr.eq(d.weight_addr[:aw]), p.act_addr.eq(d.act_addr[:aw]),
            p.bias_addr.eq(d.bias_addr[:aw]), p.out_addr.eq(d.out_addr[:aw]),
        ]

        if fabric:
            # ---- the fabric decoder's run registers and result ---------------------------------
            fv = data.View(fabric_descriptor_layout(), cur.as_value())
            fp = self.fop.payload
            for name, _ in fabric_op_layout(aw):
                if name == "run_pos":
                    m.d.comb += fp.run_pos.eq(regs.RUN_POS.f.pos.data)
                elif name == "run_token":
                    m.d.comb += fp.run_token.eq(regs.RUN_TOKEN.f.token.data)
                else:
                    m.d.comb += getattr(fp, name).eq(getattr(fv, name))
            res_index, res_value = Signal.like(self.result_index), Signal(32)
            with m.If(self.result_we):
                m.d.sync += [res_index.eq(self.result_index), res_value.eq(self.result_value)]
            m.d.comb += [regs.RESULT_INDEX.f.index.r_data.eq(res_index),
                         regs.RESULT_VALUE.f.value.r_data.eq(res_value)]

        # ---- per-command cycle log --------------------------------------------------------
        m.submodules.cmd_log = log = Memory(shape=unsigned(CYCLE_BITS), depth=CMD_LOG_DEPTH, init=[])
        log_w = log.write_port()
        log_r = log.read_port()
        m.d.comb += [log_r.addr.eq(regs.CMD_LOG_INDEX.f.index.data),
                     regs.CMD_LOG_CYCLES.f.cycles.r_data.eq(log_r.data)]
        this_cycles = Signal(CYCLE_BITS)
        m.d.comb += this_cycles.eq(Mux(cmd_cycles == (1 << CYCLE_BITS) - 1, cmd_cycles, cmd_cycles + 1))
        with m.If(active):
            m.d.sync += cmd_cycles.eq(this_cycles)

        # ---- the sequencer --------------------------------------------------------------------
        op_done_fire = Signal()
        m.d.comb += op_done_fire.eq(self.op_done.valid & self.op_done.ready)
        # With ops_in_flight = 1 (serial) a command's answer is awaited in WAIT_DONE before the next
        # descriptor is taken. With more, WAIT_DESC/CHECK/ISSUE run ahead of the answers, which are
        # taken in any state (they come in command order); WAIT_DONE waits for the last ones.
        serial = self._ops_in_flight == 1
        issued = Signal()
        argmax_hold = Signal()
        if not serial:
            with m.If(outstanding == 0):
                m.d.sync += argmax_hold.eq(0)
        if serial:
            m.d.comb += issue_index.eq(index)
        else:
            with m.If(active):
                m.d.sync += outstanding.eq(outstanding + issued - op_done_fire)

        with m.Switch(state):
            with m.Case(_State.IDLE):
                # Completions of ops abandoned by a soft reset are swallowed here.
                m.d.comb += self.op_done.ready.eq(1)
                if fabric:
                    m.d.comb += self.fop_done.ready.eq(1)
                with m.If(start & ~soft_reset):
                    m.d.sync += [done.eq(0), error.eq(0), error_code.eq(0), index.eq(0), cmd_cycles.eq(0)]
                    if not serial:
                        m.d.sync += [issue_index.eq(0), outstanding.eq(0)]
                    with m.If((base[:lo_bits] != 0) | ((base >> self._addr_width) != 0)):
                        m.d.comb += [finish.eq(1), fail.eq(1), fail_code.eq(ErrorCode.BAD_CMD_BASE)]
                    with m.Elif(count == 0):
                        m.d.comb += finish.eq(1)
                    with m.Else():
                        m.d.sync += [state.eq(_State.WAIT_DESC), f_addr.eq(base), f_remaining.eq(count),
                                     run_count.eq(count)]
            with m.Case(_State.WAIT_DESC):
                with m.If(buf_full):
                    m.d.sync += [cur.eq(buf), cur_err.eq(buf_err), buf_full.eq(0), state.eq(_State.CHECK)]
            with m.Case(_State.CHECK):
                # A bad descriptor is reported once every earlier command has answered,
                # so STATUS.cmd_index names it and nothing after it was executed.
                with m.If(cur_err | (check != 0)):
                    with m.If(outstanding == 0):
                        m.d.comb += [finish.eq(1), fail.eq(1),
                                     fail_code.eq(Mux(cur_err, ErrorCode.FETCH_ERROR, check))]
                with m.Else():
                    m.d.sync += state.eq(Mux(is_fabric, _State.FABRIC_ISSUE, _State.ISSUE))
            with m.Case(_State.ISSUE):
                # Nothing follows an ARGMAX command before its answer (rtl/argmax_pass.py reads its
                # output row back after the datapath is done with it).
                m.d.comb += self.op.valid.eq((outstanding < self._ops_in_flight) & ~argmax_hold)
                with m.If(self.op.valid & self.op.ready):
                    m.d.comb += issued.eq(1)
                    if not serial and fabric:
                        m.d.sync += argmax_hold.eq(p.argmax)
                    if serial:
                        m.d.sync += state.eq(_State.WAIT_DONE)
                    else:
                        m.d.sync += issue_index.eq(issue_index + 1)
                        with m.If(issue_index + 1 == run_count):
                            m.d.sync += state.eq(_State.WAIT_DONE)
                        with m.Else():
                            m.d.sync += state.eq(_State.WAIT_DESC)

            if fabric:
                with m.Case(_State.FABRIC_ISSUE):
                    m.d.comb += self.fop.valid.eq(outstanding == 0)
                    with m.If(self.fop.valid & self.fop.ready):
                        m.d.sync += state.eq(_State.FABRIC_WAIT)
                with m.Case(_State.FABRIC_WAIT):
                    m.d.comb += self.fop_done.ready.eq(1)
                    with m.If(self.fop_done.valid):
                        m.d.comb += [log_w.en.eq(1), log_w.addr.eq(index[:(CMD_LOG_DEPTH - 1).bit_length()]),
                                     log_w.data.eq(this_cycles)]
                        m.d.sync += [last_cycles.eq(this_cycles), cmd_cycles.eq(0)]
                        code = self.fop_done.payload.code
                        with m.If(code != 0):
                            m.d.comb += [finish.eq(1), fail.eq(1), fail_code.eq(code)]
                        with m.Else():
                            m.d.sync += index.eq(index + 1)
                            if not serial:
                                m.d.sync += issue_index.eq(issue_index + 1)
                            with m.If(index + 1 == run_count):
                                m.d.comb += finish.eq(1)
                            with m.Else():
                                m.d.sync += state.eq(_State.WAIT_DESC)

        # The answers, one per presented command, in command order.
        with m.If((state == _State.WAIT_DONE) if serial else (active & (outstanding != 0))):
            m.d.comb += self.op_done.ready.eq(1)
            with m.If(self.op_done.valid):
                m.d.comb += [log_w.en.eq(1), log_w.addr.eq(index[:(CMD_LOG_DEPTH - 1).bit_length()]),
                             log_w.data.eq(this_cycles)]
                m.d.sync += [last_cycles.eq(this_cycles), cmd_cycles.eq(0)]
                with m.If(self.op_done.payload.error):
                    code = self.op_done.payload.error_code
                    m.d.comb += [finish.eq(1), fail.eq(1),
                                 fail_code.eq(Mux(code != 0, code, ErrorCode.DATAPATH_ERROR))]
                with m.Else():
                    m.d.sync += index.eq(index + 1)
                    with m.If(index + 1 == run_count):
                        m.d.comb += finish.eq(1)
                    if serial:
                        with m.Else():
                            m.d.sync += state.eq(_State.WAIT_DESC)

        irq_done = regs.IRQ_STATUS.f.done
        irq_error = regs.IRQ_STATUS.f.error
        with m.If(finish):
            m.d.sync += [state.eq(_State.IDLE), done.eq(1), error.eq(fail), error_code.eq(fail_code),
                         outstanding.eq(0)]
            m.d.comb += [abort.eq(1), irq_done.set.eq(1), irq_error.set.eq(fail)]

        with m.If(soft_reset):
            m.d.sync += [state.eq(_State.IDLE), done.eq(0), error.eq(0), error_code.eq(0), index.eq(0),
                         cmd_cycles.eq(0), last_cycles.eq(0), outstanding.eq(0)]
            m.d.comb += [abort.eq(1), irq_done.clr.eq(1), irq_error.clr.eq(1),
                         irq_done.set.eq(0), irq_error.set.eq(0), log_w.en.eq(0)]

        m.d.comb += self.irq.eq(regs.CTRL.f.irq_enable.data & (irq_done.data | irq_error.data))

        # ---- performance counters -------------------------------------------------------------
        beat_bytes = self._beat_bits // 8
        events = {
            "BUSY_CYCLES": active,
            "MEM_STALL_CYCLES": active & (self.perf.mem_stall | ((state == _State.WAIT_DESC) & (outstanding == 0))),
            "COMPUTE_STALL_CYCLES": self.perf.compute_stall,
            "BYTES_READ": self.perf.bytes_read + Mux(beat_fire, beat_bytes, 0),
            "BYTES_WRITTEN": self.perf.bytes_written,
        }
        assert set(events) == {name for name, _ in PERF_COUNTERS}
        snapshot = regs.PERF_CTRL.f.snapshot.pulse
        hold = regs.PERF_CTRL.f.hold.data
        for name, inc in events.items():
            live = Signal(64, name=f"{name.lower()}")
            shadow = Signal(64, name=f"{name.lower()}_shadow")
            lo, hi = getattr(regs, f"{name}_LO").f.value, getattr(regs, f"{name}_HI").f.value
            m.d.sync += live.eq(live + inc)
            with m.If(perf_clear | soft_reset):
                m.d.sync += live.eq(0)
            with m.If(snapshot | (lo.r_stb & ~hold)):
                m.d.sync += shadow.eq(live)
            with m.If(soft_reset):
                m.d.sync += shadow.eq(0)
            m.d.comb += [lo.r_data.eq(Mux(hold, shadow[:32], live[:32])), hi.r_data.eq(shadow[32:])]
        return m
