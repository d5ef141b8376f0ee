"""The decoded fabric-op command the fabric engines receive, and their answer.

The command processor fetches a 64-byte fabric descriptor (sw/contract/fabric_commands.py,
FABRIC_FIELDS), validates it with ``validate_fabric_command``'s static checks and hands the
datapath :func:`fabric_op_layout`: every descriptor field, addresses cut to the design's
``addr_width``, plus the run registers RUN_POS and RUN_TOKEN as they were at the start.
The run-time checks (CONTEXT_FULL: RUN_POS + tokens > p0 for ROPE, KV_STORE and ATTEND;
BAD_TOKEN: an EMBED id >= p0) and the bus errors (READ_ERROR, WRITE_ERROR) are the
engine's: it answers each command with one :func:`fabric_done_layout` beat, code 0 when
the op completed and every write was acknowledged.
"""

from __future__ import annotations

import struct

from amaranth.hdl import unsigned
from amaranth.lib import data

from sw.contract.commands import DEFAULT_ADDR_BITS, register
from sw.contract.fabric_commands import FABRIC_FIELDS

__all__ = ["fabric_op_layout", "fabric_done_layout", "fabric_descriptor_layout", "ADDRESS_FIELDS",
           "RUN_POS_BITS", "RUN_TOKEN_BITS", "ERROR_CODE_BITS"]

ADDRESS_FIELDS = ("src0", "src1", "dst")
RUN_POS_BITS = register("RUN_POS").field("pos").width
RUN_TOKEN_BITS = register("RUN_TOKEN").field("token").width
ERROR_CODE_BITS = register("STATUS").field("error_code").width


def _field_widths() -> dict[str, tuple[int, int]]:
    return {name: (8 * off, 8 * struct.calcsize(fmt)) for name, off, fmt, _ in FABRIC_FIELDS}


def fabric_descriptor_layout() -> data.StructLayout:
    """The 512-bit fabric descriptor word as FABRIC_FIELDS lays it out (byte 0 in bits 7..0)."""
    fields = _field_widths()
    layout = data.StructLayout({name: unsigned(width) for name, (_, width) in fields.items()})
    for name, (offset, _) in fields.items():
        assert layout[name].offset == offset, name
    return layout


def fabric_op_layout(addr_width: int = DEFAULT_ADDR_BITS) -> data.StructLayout:
    """A validated fabric op as the datapath receives it."""
    members = {}
    for name, (_, width) in _field_widths().items():
        if name in ("version",):
            continue
        members[name] = unsigned(addr_width if name in ADDRESS_FIELDS else width)
    members["run_pos"] = unsigned(RUN_POS_BITS)
    members["run_token"] = unsigned(RUN_TOKEN_BITS)
    return data.StructLayout(members)


def fabric_done_layout() -> data.StructLayout:
    """One answer per fabric op: ``code`` is an sw.contract.commands.ErrorCode (0 = done)."""
    return data.StructLayout({"code": unsigned(ERROR_CODE_BITS)})
