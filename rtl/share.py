"""Fp32 units shared by engines that never run at the same time.

The fabric decoder's attention and vector engines each need fp32 multipliers and adders, and the
command processor runs one fabric op at a time (rtl/top.py: a fabric op goes out only when every
earlier command has answered, and the next command waits for its answer). So one set of units
can serve both: a `SharedUnits` pool at the top holds the units, and each engine asks its
`UnitSource` for a unit where it would have built one.

* ``UnitSource.make(kind, latency)`` returns a component with the unit's ports (``i_valid``,
  ``a``, ``b`` in; ``o_valid``, ``o`` out) and its ``latency``. Standalone (`LOCAL_UNITS`, the
  default of every engine) that is a new `Fp32Multiply` / `Fp32Add`; from a pool it is a
  `UnitPort`: the k-th unit of a kind a client asks for is the pool's k-th unit of that kind.
* The pool's unit takes the operands of the client whose ``i_valid`` is high. Two clients must
  never issue to one unit in the same cycle (the callers' contract, as for
  `rtl.fp32.time_shared`); issues in different cycles may interleave freely.
* A `UnitPort` makes its own ``o_valid``: its ``i_valid`` delayed by the unit's latency, in
  registers with a reset, inside the client. So a result belongs only to the client that issued
  it, and a client's reset (the engines' flush on an abort) drops its results in flight, as it
  does with units of its own.

Numerics do not change: a pooled unit is the same `Fp32Multiply` / `Fp32Add`, with the same
latency, computing the same bits.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Elaboratable, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from sw.contract.errors import ConfigError

from .fp32 import Fp32Add, Fp32Multiply, delay

__all__ = ["KINDS", "LOCAL_UNITS", "SharedUnits", "UnitPort", "UnitSource"]

#: The unit kinds a pool holds.
KINDS = {"mul": Fp32Multiply, "add": Fp32Add}


class UnitSource:
    """Where an engine gets its shareable fp32 units; this one builds new ones (no pool)."""

    def make(self, kind: str, latency: int | None = None):
        return KINDS[kind](latency)


LOCAL_UNITS = UnitSource()


class UnitPort(wiring.Component):
    """A pooled unit as one client sees it (see the module docstring)."""

    def __init__(self, slot: SimpleNamespace, latency: int):
        self._slot, self._latency = slot, latency
        super().__init__({"i_valid": In(1), "a": In(32), "b": In(32), "o_valid": Out(1), "o": Out(32)})

    @property
    def latency(self) -> int:
        return self._latency

    def elaborate(self, platform):
        m = Module()
        s = self._slot
        m.d.comb += [s.i_valid.eq(self.i_valid), s.a.eq(self.a), s.b.eq(self.b), self.o.eq(s.o)]
        m.d.comb += self.o_valid.eq(delay(m, self.i_valid, self._latency, "valid", reset=True))
        return m


class _PoolSource(UnitSource):
    def __init__(self, name: str, slots: dict[str, list[SimpleNamespace]]):
        self._name, self._slots = name, slots
        self._taken = {kind: 0 for kind in slots}

    def make(self, kind: str, latency: int | None = None):
        unit_latency = KINDS[kind].resolve_latency(None)
        if KINDS[kind].resolve_latency(latency) != unit_latency:
            raise ConfigError(f"SharedUnits: client {self._name!r} asks for a {kind} of latency {latency}, "
                              f"the pool's have {unit_latency}")
        k = self._taken[kind]
        if k >= len(self._slots[kind]):
            raise ConfigError(f"SharedUnits: client {self._name!r} asks for more than the "
                              f"{len(self._slots[kind])} {kind} unit(s) it declared")
        self._taken[kind] = k + 1
        return UnitPort(self._slots[kind][k], unit_latency)


class SharedUnits(Elaboratable):
    """A pool of fp32 units. ``needs``: client name -> {kind: units}, where units is a count n (the
    pool's units 0 .. n-1 of that kind) or a sequence of the pool's unit indices; a client's k-th
    unit of a kind is the k-th of its units. The pool holds, per kind, every unit some client uses
    (up to the highest index)."""

    def __init__(self, needs: dict[str, dict[str, int | tuple[int, ...]]]):
        self._slots = {}          # client -> kind -> [(unit index, slot)]
        for client, n in needs.items():
            unknown = set(n) - set(KINDS)
            if unknown:
                self._MustUse__silence = True     # refused: never elaborated
                raise ConfigError(f"SharedUnits: unknown unit kind(s) {sorted(unknown)}; known: {sorted(KINDS)}")
            self._slots[client] = {}
            for kind in KINDS:
                units = n.get(kind, 0)
                units = tuple(range(units)) if isinstance(units, int) else tuple(units)
                self._slots[client][kind] = [(u, SimpleNamespace(
                    i_valid=Signal(name=f"{client}_{kind}{k}_i_valid"), a=Signal(32, name=f"{client}_{kind}{k}_a"),
                    b=Signal(32, name=f"{client}_{kind}{k}_b"), o=Signal(32, name=f"{client}_{kind}{k}_o")))
                    for k, u in enumerate(units)]
        self._counts = {kind: 1 + max([-1] + [u for s in self._slots.values() for u, _ in s[kind]]) for kind in KINDS}
        self._sources = {client: _PoolSource(client, {kind: [slot for _, slot in v] for kind, v in slots.items()})
                         for client, slots in self._slots.items()}

    def source(self, client: str) -> UnitSource:
        return self._sources[client]

    def elaborate(self, platform):
        m = Module()
        for kind, count in self._counts.items():
            for k in range(count):
                users = [slot for s in self._slots.values() for u, slot in s[kind] if u == k]
                if not users:
                    continue
                unit = m.submodules[f"{kind}{k}"] = KINDS[kind]()
                a, b = users[0].a, users[0].b
                for u in users[1:]:
                    a, b = Mux(u.i_valid, u.a, a), Mux(u.i_valid, u.b, b)
                valid = users[0].i_valid
                for u in users[1:]:
                    valid = valid | u.i_valid
                m.d.comb += [unit.i_valid.eq(valid), unit.a.eq(a), unit.b.eq(b)]
                m.d.comb += [u.o.eq(unit.o) for u in users]
        return m
