"""Where the accelerator's small wide buffers live on the K26: UltraRAM instead of LUT RAM.

Synthesis (Yosys' memory_libmap, and Vivado without a hint) puts a shallow memory into LUT RAM:
a 128-bit-wide FIFO costs 80 LUTs at 32 entries and 152 at 64 (RAM32M16 holds 14 bits x 32, RAM64M8
7 bits x 64, 8 LUTs each). The LUTs are the K26's scarce resource (issue 11 budgets 75 % of them),
while its 64 UltraRAMs (URAM288: 4,096 x 72 bits, one synchronous read and one write per cycle in
simple dual-port use) hold nothing else. So a memory at least `WIDE_BITS` wide with more than
`LUTRAM_DEPTH` and at most `URAM_DEPTH` entries carries ``ram_style = "ultra"`` (ceil(width / 72)
URAM288 each); shallower ones stay in LUT RAM or flip-flops (a URAM for 40 LUTs), deeper ones
are left to the tools (they pick block RAM, which their depth fills).

A memory in UltraRAM must be read synchronously (``read_port(domain="sync")``); `Fifo`, like the
SyncFIFOBuffered it is, reads its storage that way. The attribute changes where the bits are, not
what the circuit does: simulation is the same cycle for cycle.
"""

from __future__ import annotations

from amaranth.lib.fifo import SyncFIFOBuffered

__all__ = ["WIDE_BITS", "LUTRAM_DEPTH", "URAM_DEPTH", "ram_attrs", "Fifo"]

WIDE_BITS = 64
LUTRAM_DEPTH = 16
URAM_DEPTH = 64


def ram_attrs(width: int, depth: int) -> dict:
    """The attributes of a `width` x `depth` memory read synchronously: ``ram_style`` "ultra" for a
    wide buffer of LUTRAM_DEPTH < depth <= URAM_DEPTH entries, else none (the tools choose)."""
    if width >= WIDE_BITS and LUTRAM_DEPTH < depth <= URAM_DEPTH:
        return {"ram_style": "ultra"}
    return {}


class Fifo(SyncFIFOBuffered):
    """``amaranth.lib.fifo.SyncFIFOBuffered`` whose storage (depth - 1 entries, read synchronously)
    carries `ram_attrs`: the same ports and cycles."""

    def elaborate(self, platform):
        m = super().elaborate(platform)
        if self.depth > 1:
            m.submodules.storage.attrs.update(ram_attrs(self.width, self.depth - 1))
        return m
