"""rtl/storage.py: which buffers carry ram_style "ultra", and that Yosys then maps them to UltraRAM."""

from __future__ import annotations

import pytest
from amaranth.back import rtlil
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from rtl.storage import Fifo, ram_attrs


@pytest.mark.parametrize("width, depth, ultra", [
    (128, 64, True), (144, 32, True), (64, 17, True),     # wide, 17..64 deep: LUT RAM would cost 80-152 LUTs
    (63, 64, False),                                      # narrow: a URAM for a few LUTs
    (128, 16, False), (128, 3, False),                    # shallow: LUT RAM or flip-flops
    (129, 128, False), (1024, 608, False),                # deep: block RAM, the tools' own choice
])
def test_rule(width, depth, ultra):
    assert ram_attrs(width, depth) == ({"ram_style": "ultra"} if ultra else {})


def _fifo_top(width: int, depth: int):
    class Top(wiring.Component):
        def __init__(self):
            super().__init__({"w_en": In(1), "w_data": In(width), "r_en": In(1), "r_data": Out(width),
                              "r_rdy": Out(1)})

        def elaborate(self, platform):
            m = Module()
            m.submodules.f = f = Fifo(width=width, depth=depth)
            m.d.comb += [f.w_en.eq(self.w_en), f.w_data.eq(self.w_data), f.r_en.eq(self.r_en),
                         self.r_data.eq(f.r_data), self.r_rdy.eq(f.r_rdy)]
            return m
    return Top()


def test_fifo_storage_carries_the_attribute():
    """The storage of a 33-deep FIFO (32 entries) of 144 bits has the attribute; a 4-deep one not."""
    assert 'attribute \\ram_style "ultra"' in rtlil.convert(_fifo_top(144, 33))
    assert "ram_style" not in rtlil.convert(_fifo_top(144, 4))


@pytest.mark.synth
def test_yosys_maps_the_fifo_to_ultraram(tmp_path):
    """synth_xilinx -family xcup puts the 144 x 32 storage into two URAM288, no LUT RAM (88 LUTs of
    RAM32M16 without the attribute)."""
    from amaranth.back import verilog

    from boards.resources import count_resources, synthesize

    v = tmp_path / "fifo.v"
    v.write_text(verilog.convert(_fifo_top(144, 33), name="fifo_top", emit_src=False))
    res = count_resources(synthesize(v, "fifo_top")["cells"])
    assert res["URAM"] == 2 and res["LUT_memory"] == 0 and res["BRAM36"] == 0, res
