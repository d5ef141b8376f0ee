"""`CheckedComponent`: a `wiring.Component` that checks its parameters before it exists.

Amaranth reports every elaboratable that is created and never elaborated. A
constructor that refuses its parameters from ``__init__`` is too late: the
object already exists, so a refused component would later be reported as
"created but never used". A `CheckedComponent` runs its classmethod `check`
on the constructor's arguments in ``__new__`` instead, so a refused
component is never created and nothing has to silence the report.
"""

from __future__ import annotations

from amaranth.lib import wiring

__all__ = ["CheckedComponent"]


class CheckedComponent(wiring.Component):
    """Subclasses override `check`; it takes the constructor's arguments and raises ConfigError."""

    def __new__(cls, *args, src_loc_at: int = 0, **kwargs):
        cls.check(*args, **kwargs)
        # src_loc_at + 1: the unused-elaboratable report names the caller, not this frame.
        return super().__new__(cls, *args, src_loc_at=src_loc_at + 1, **kwargs)

    @classmethod
    def check(cls, *args, **kwargs) -> None:
        """Raise ConfigError if the constructor cannot build a component from these arguments."""
