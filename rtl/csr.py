"""A small CSR register framework in the amaranth-soc idiom, and the accelerator's register bank.

amaranth-soc is not installable here, so this module provides the same shape
in a few hundred lines:

* field actions (:class:`R`, :class:`RW`, :class:`W1C`, :class:`W1S`, :class:`Pulse`):
  components that own one field's storage and its side effects, each with a
  ``port`` towards the register and user-facing members (``r_data``, ``data``,
  ``set``, ``clr``, ``pulse``...);
* :class:`Field` and :class:`Register`: a register is a component whose
  ``element`` port is one 32-bit word; its fields are reached as ``reg.f.name``;
* :class:`Builder`: places registers at 4-byte aligned byte offsets;
* :class:`Bridge`: decodes a :class:`Signature` CSR bus onto the registers.

The CSR bus (initiator's view): ``addr`` is a word address, ``r_stb``/``w_stb``
strobe one access, ``w_data``/``w_mask`` carry the data and the byte-lane
mask, and in the cycle after a strobe ``r_data`` holds the read data and
``err`` says that no register answers at ``addr``. rtl/axilite.py puts an
AXI4-Lite slave in front of it.

:class:`RegisterBank` builds the bank of the accelerator's register map from
``sw.contract.commands.REGISTERS``, the one description the driver and the docs share.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out, connect, flipped

from sw.contract.commands import CSR_DATA_BYTES, Access, RegisterSpec

__all__ = ["Signature", "ElementSignature", "FieldPortSignature", "FieldAction", "R", "RW", "W1C", "W1S",
           "Pulse", "Field", "Register", "Builder", "Bridge", "RegisterBank", "ACTIONS"]

DATA_WIDTH = 8 * CSR_DATA_BYTES


# ---------------------------------------------------------------------------
# Bus and port signatures
# ---------------------------------------------------------------------------

def _access_members(width: int) -> dict:
    """A read strobe and its data, a write strobe with its data and bit mask: `width` bits of a word."""
    return {
        "r_stb": Out(1),
        "r_data": In(width),
        "w_stb": Out(1),
        "w_data": Out(width),
        "w_mask": Out(width),
    }


class Signature(wiring.Signature):
    """The CSR bus, seen from the initiator. ``addr_width`` counts 32-bit words."""

    def __init__(self, *, addr_width: int, data_width: int = DATA_WIDTH):
        if data_width != DATA_WIDTH:
            raise ValueError(f"the CSR bus is {DATA_WIDTH} bits wide, got {data_width}")
        self._addr_width = addr_width
        super().__init__({"addr": Out(addr_width), **_access_members(data_width), "err": In(1)})

    @property
    def addr_width(self) -> int:
        return self._addr_width

    def __eq__(self, other):
        return isinstance(other, Signature) and other.addr_width == self.addr_width

    def __repr__(self):
        return f"csr.Signature(addr_width={self.addr_width})"


class ElementSignature(wiring.Signature):
    """One register's word, seen from the bridge that strobes it."""

    def __init__(self, width: int = DATA_WIDTH):
        super().__init__(_access_members(width))


class FieldPortSignature(wiring.Signature):
    """One field's slice of the word, seen from the register."""

    def __init__(self, width: int):
        super().__init__(_access_members(width))


# ---------------------------------------------------------------------------
# Field actions
# ---------------------------------------------------------------------------

class FieldAction(wiring.Component):
    """Base of the field behaviours: ``port`` faces the register, ``members`` face the user."""
    access: Access = None

    def __init__(self, width: int, members: dict | None = None):
        if not isinstance(width, int) or not 0 < width <= DATA_WIDTH:
            raise ValueError(f"field width must be 1..{DATA_WIDTH}, got {width!r}")
        self._width = width
        super().__init__({"port": In(FieldPortSignature(width)), **(members or {})})

    @property
    def width(self) -> int:
        return self._width

    def _written(self):
        """The bits a write sets to 1 (strobe, data and byte mask together)."""
        return Mux(self.port.w_stb, self.port.w_data & self.port.w_mask, 0)


class R(FieldAction):
    """Read-only: shows ``r_data``; ``r_stb`` pulses when the register is read (for read side effects)."""
    access = Access.R

    def __init__(self, width: int, init: int = 0):
        super().__init__(width, {"r_data": In(width), "r_stb": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [self.port.r_data.eq(self.r_data), self.r_stb.eq(self.port.r_stb)]
        return m


class RW(FieldAction):
    """Read/write storage ``data``; ``w_stb`` pulses on every write of the register."""
    access = Access.RW

    def __init__(self, width: int, init: int = 0):
        self._init = init
        super().__init__(width, {"data": Out(width, init=init), "w_stb": Out(1)})

    def elaborate(self, platform):
        m = Module()
        with m.If(self.port.w_stb):
            m.d.sync += self.data.eq((self.data & ~self.port.w_mask) | (self.port.w_data & self.port.w_mask))
        m.d.comb += [self.port.r_data.eq(self.data), self.w_stb.eq(self.port.w_stb)]
        return m


class W1C(FieldAction):
    """Hardware sets bits through ``set``; writing 1 clears them; ``clr`` clears them all
    from hardware (a soft reset). A ``set`` in the cycle of a clearing write wins, so no
    event is lost."""
    access = Access.W1C

    def __init__(self, width: int, init: int = 0):
        super().__init__(width, {"data": Out(width, init=init), "set": In(width), "clr": In(1)})

    def elaborate(self, platform):
        m = Module()
        with m.If(self.clr):
            m.d.sync += self.data.eq(0)
        with m.Else():
            m.d.sync += self.data.eq((self.data & ~self._written()) | self.set)
        m.d.comb += self.port.r_data.eq(self.data)
        return m


class W1S(FieldAction):
    """Writing 1 sets bits; hardware clears them through ``clr`` (a bit mask)."""
    access = Access.W1S

    def __init__(self, width: int, init: int = 0):
        super().__init__(width, {"data": Out(width, init=init), "clr": In(width)})

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.data.eq((self.data | self._written()) & ~self.clr)
        m.d.comb += self.port.r_data.eq(self.data)
        return m


class Pulse(FieldAction):
    """Self-clearing: ``pulse`` is high for the one cycle of a write, on the bits written as 1."""
    access = Access.PULSE

    def __init__(self, width: int, init: int = 0):
        super().__init__(width, {"pulse": Out(width)})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [self.pulse.eq(self._written()), self.port.r_data.eq(0)]
        return m


ACTIONS = {a.access: a for a in (R, RW, W1C, W1S, Pulse)}


class Field:
    """A field description: an action class, a width, and optionally its bit offset and reset value."""

    def __init__(self, action, width: int = 1, *, offset: int | None = None, init: int = 0, doc: str = ""):
        if isinstance(action, (str, Access)):
            action = ACTIONS[Access(action)]
        if not (isinstance(action, type) and issubclass(action, FieldAction)):
            raise TypeError(f"field action must be a FieldAction subclass or an access name, got {action!r}")
        self.action, self.width, self.offset, self.init, self.doc = action, width, offset, init, doc

    def create(self) -> FieldAction:
        return self.action(self.width, init=self.init)


# ---------------------------------------------------------------------------
# Registers
# ---------------------------------------------------------------------------

class Register(wiring.Component):
    """A 32-bit register made of fields, placed LSB first unless given an offset.

    Subclass it with ``access="r"`` (or "rw", "w") to document the register's
    direction, as amaranth-soc does; the fields are a ``{name: Field}`` dict and
    are reached as ``reg.f.name`` (the field's action component).
    """
    _access: str | None = None

    def __init_subclass__(cls, access: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if access is not None:
            cls._access = access

    def __init__(self, fields: dict[str, Field], *, doc: str = ""):
        self._layout: dict[str, tuple[int, FieldAction]] = {}
        next_bit = 0
        used = 0
        for name, desc in fields.items():
            if not isinstance(desc, Field):
                raise TypeError(f"register field {name!r} must be a csr.Field, got {desc!r}")
            lsb = next_bit if desc.offset is None else desc.offset
            mask = ((1 << desc.width) - 1) << lsb
            if lsb + desc.width > DATA_WIDTH:
                raise ValueError(f"field {name!r} (bits {lsb}+{desc.width}) does not fit {DATA_WIDTH} bits")
            if used & mask:
                raise ValueError(f"field {name!r} overlaps another field")
            if self._access == "r" and desc.action is not R:
                raise ValueError(f"read-only register has a writable field {name!r}")
            used |= mask
            self._layout[name] = (lsb, desc.create())
            next_bit = lsb + desc.width
        self.doc = doc
        self.f = SimpleNamespace(**{name: action for name, (_, action) in self._layout.items()})
        super().__init__({"element": In(ElementSignature(DATA_WIDTH))})

    @property
    def fields(self) -> dict[str, tuple[int, FieldAction]]:
        """{name: (lsb, action)} in declaration order."""
        return dict(self._layout)

    def __iter__(self):
        for name, (lsb, action) in self._layout.items():
            yield name, action

    def elaborate(self, platform):
        m = Module()
        r_data = Signal(DATA_WIDTH)
        for name, (lsb, action) in self._layout.items():
            m.submodules[f"field_{name}"] = action
            w = action.width
            m.d.comb += [
                action.port.r_stb.eq(self.element.r_stb),
                action.port.w_stb.eq(self.element.w_stb),
                action.port.w_data.eq(self.element.w_data[lsb:lsb + w]),
                action.port.w_mask.eq(self.element.w_mask[lsb:lsb + w]),
                r_data[lsb:lsb + w].eq(action.port.r_data),
            ]
        m.d.comb += self.element.r_data.eq(r_data)
        return m

    @classmethod
    def from_spec(cls, spec: RegisterSpec) -> "Register":
        return cls({f.name: Field(ACTIONS[f.access], f.width, offset=f.lsb, init=f.init, doc=f.doc)
                    for f in spec.fields}, doc=spec.doc)


class Builder:
    """Collects registers at 4-byte aligned byte offsets (next free one unless given)."""

    def __init__(self, *, addr_width: int, data_width: int = DATA_WIDTH):
        if data_width != DATA_WIDTH:
            raise ValueError(f"registers are {DATA_WIDTH} bits wide, got {data_width}")
        self._addr_width = addr_width
        self._regs: dict[str, tuple[int, Register]] = {}
        self._next = 0
        self._frozen = False

    @property
    def addr_width(self) -> int:
        """Byte address width of the register window."""
        return self._addr_width

    @property
    def data_width(self) -> int:
        return DATA_WIDTH

    def add(self, name: str, reg: Register, *, offset: int | None = None) -> Register:
        if self._frozen:
            raise ValueError("the builder is frozen; add registers before building the bridge")
        if name in self._regs:
            raise ValueError(f"register {name!r} is already added")
        if not isinstance(reg, Register):
            raise TypeError(f"{name!r}: expected a csr.Register, got {reg!r}")
        offset = self._next if offset is None else offset
        if offset % 4:
            raise ValueError(f"register {name!r}: offset 0x{offset:x} is not 4-byte aligned")
        if offset + 4 > (1 << self._addr_width):
            raise ValueError(f"register {name!r}: offset 0x{offset:x} is outside the "
                             f"{1 << self._addr_width}-byte window")
        for other, (o, _) in self._regs.items():
            if o == offset:
                raise ValueError(f"register {name!r} at 0x{offset:x} collides with {other!r}")
        self._regs[name] = (offset, reg)
        self._next = max(self._next, offset + 4)
        return reg

    def freeze(self) -> None:
        self._frozen = True

    @property
    def registers(self) -> dict[str, tuple[int, Register]]:
        """{name: (byte offset, register)}."""
        return dict(self._regs)


class Bridge(wiring.Component):
    """Decodes the CSR bus onto a :class:`Builder`'s registers (freezing it).

    Read data and ``err`` are registered: valid in the cycle after the strobe.
    """

    def __init__(self, builder: Builder):
        builder.freeze()
        self._builder = builder
        super().__init__({"bus": In(Signature(addr_width=builder.addr_width - 2))})

    @property
    def registers(self) -> dict[str, tuple[int, Register]]:
        return self._builder.registers

    def elaborate(self, platform):
        m = Module()
        hit = Signal()
        r_data = Signal(DATA_WIDTH)
        for name, (offset, reg) in self._builder.registers.items():
            m.submodules[f"reg_{name}"] = reg
            sel = Signal(name=f"sel_{name}")
            m.d.comb += [
                sel.eq(self.bus.addr == offset >> 2),
                reg.element.r_stb.eq(self.bus.r_stb & sel),
                reg.element.w_stb.eq(self.bus.w_stb & sel),
                reg.element.w_data.eq(self.bus.w_data),
                reg.element.w_mask.eq(self.bus.w_mask),
            ]
            with m.If(sel):
                m.d.comb += [hit.eq(1), r_data.eq(reg.element.r_data)]
        with m.If(self.bus.r_stb):
            m.d.sync += self.bus.r_data.eq(Const(0, DATA_WIDTH))
            with m.If(hit):
                m.d.sync += self.bus.r_data.eq(r_data)
        m.d.sync += self.bus.err.eq((self.bus.r_stb | self.bus.w_stb) & ~hit)
        return m


# ---------------------------------------------------------------------------
# The accelerator's bank, from the shared register map
# ---------------------------------------------------------------------------

class RegisterBank(wiring.Component):
    """The registers of ``specs`` (default: sw.contract.commands.REGISTERS) behind a CSR bus.

    ``bank.reg.STATUS.f.busy.r_data`` etc. reach the fields; the owner drives
    every R field and reads the others.
    """

    def __init__(self, specs=None, *, addr_width: int | None = None):
        from sw.contract.commands import CSR_ADDR_WIDTH, REGISTERS
        specs = REGISTERS if specs is None else specs
        self._builder = Builder(addr_width=addr_width or CSR_ADDR_WIDTH)
        regs = {}
        for spec in specs:
            regs[spec.name] = self._builder.add(spec.name, Register.from_spec(spec), offset=spec.offset)
        self.reg = SimpleNamespace(**regs)
        self._bridge = Bridge(self._builder)
        super().__init__({"bus": In(Signature(addr_width=self._builder.addr_width - 2))})

    @property
    def registers(self) -> dict[str, tuple[int, Register]]:
        return self._builder.registers

    def elaborate(self, platform):
        m = Module()
        m.submodules.bridge = self._bridge
        connect(m, flipped(self.bus), self._bridge.bus)
        return m
