"""The DSP48E2 slice of rtl/dsp.py in both forms side by side, against Xilinx's own model.

`SliceDut` is one :func:`rtl.dsp.mac_slice` with its operands and enables as ports. It is
converted twice: once as simulation elaborates it (Amaranth registers, ``slice_beh``) and
once as the synthesis flows do (the ``DSP48E2`` instance, ``slice_prim``). The bench
(``dsp_bench``) drives both from the same ports; the DSP48E2 behind ``slice_prim`` is
Xilinx's simulation model from XilinxUnisimLibrary (``verilog/src/unisims/DSP48E2.v``,
Apache 2.0), which is not part of this repository: the test takes its path from
``KRIALLM_UNISIM`` (the library's ``verilog/src`` directory). The model reads the global
set/reset ``glbl.GSR``; the bench holds a ``glbl`` of its own with GSR tied low. Verilator
cannot take the model's floating-pin checks (``X !== 1'bz``, ``X === 1'bz``: the value an
unconnected pin defaults to) on ports it then treats as tristate, so :func:`adapt_unisim`
replaces them by their value for a driven pin (every port here is driven); nothing else of
the model changes.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from amaranth.hdl import Module, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from rtl.dsp import mac_slice, madd_slice, xilinx_primitives

__all__ = ["SliceDut", "MaddDut", "dsp_check_sources", "SLICE_A_BITS", "SLICE_B_BITS", "SLICE_P_BITS", "SLICE_RND",
           "MADD_A_BITS", "MADD_B_BITS", "MADD_D_BITS", "MADD_P_BITS"]

SLICE_A_BITS, SLICE_B_BITS, SLICE_P_BITS = 23, 8, 40     # the kv260 packed operand and int8 activation
SLICE_RND = 1 << 17                                      # the kv260 pack bias 2^(S-1), S = 18


class SliceDut(wiring.Component):
    def __init__(self):
        super().__init__({"a": In(signed(SLICE_A_BITS)), "b": In(signed(SLICE_B_BITS)), "ce_ab": In(1),
                          "ce_m": In(1), "ce_p": In(1), "load": In(1), "p": Out(signed(SLICE_P_BITS))})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.p.eq(mac_slice(m, "mac", a=self.a, b=self.b, ce_ab=self.ce_ab, ce_m=self.ce_m,
                                        ce_p=self.ce_p, load=self.load, rnd=SLICE_RND, width=SLICE_P_BITS))
        return m


# the attention unit's lanes: W (24 bits, A) or a q8 code (D) times a code, 44-bit sums (D wider here)
MADD_A_BITS, MADD_B_BITS, MADD_D_BITS, MADD_P_BITS = 25, 8, 16, 44


class MaddDut(wiring.Component):
    def __init__(self):
        super().__init__({"a": In(signed(MADD_A_BITS)), "b": In(signed(MADD_B_BITS)), "c": In(signed(MADD_P_BITS)),
                          "d": In(signed(MADD_D_BITS)), "ce_ab": In(1), "ce_p": In(1), "use_c": In(1),
                          "use_m": In(1), "use_d": In(1), "p": Out(signed(MADD_P_BITS))})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.p.eq(madd_slice(m, "madd", a=self.a, b=self.b, c=self.c, d=self.d, ce_ab=self.ce_ab,
                                         ce_p=self.ce_p, use_c=self.use_c, use_m=self.use_m, use_d=self.use_d,
                                         width=MADD_P_BITS))
        return m


_MADD_BENCH = """\
module glbl;
  wire GSR = 1'b0;
endmodule

module dsp_bench(input clk, input rst, input signed [{a1}:0] a, input signed [{b1}:0] b, input signed [{p1}:0] c,
                 input signed [{d1}:0] d, input ce_ab, input ce_p, input use_c, input use_m, input use_d,
                 output signed [{p1}:0] p_prim, output signed [{p1}:0] p_beh);
  glbl glbl();
  madd_prim prim(.clk(clk), .rst(rst), .a(a), .b(b), .c(c), .d(d), .ce_ab(ce_ab), .ce_p(ce_p), .use_c(use_c),
                 .use_m(use_m), .use_d(use_d), .p(p_prim));
  madd_beh beh(.clk(clk), .rst(rst), .a(a), .b(b), .c(c), .d(d), .ce_ab(ce_ab), .ce_p(ce_p), .use_c(use_c),
               .use_m(use_m), .use_d(use_d), .p(p_beh));
endmodule
"""

_BENCH = """\
module glbl;
  wire GSR = 1'b0;
endmodule

module dsp_bench(input clk, input rst, input signed [{a1}:0] a, input signed [{b1}:0] b, input ce_ab,
                 input ce_m, input ce_p, input load, output signed [{p1}:0] p_prim, output signed [{p1}:0] p_beh);
  glbl glbl();
  slice_prim prim(.clk(clk), .rst(rst), .a(a), .b(b), .ce_ab(ce_ab), .ce_m(ce_m), .ce_p(ce_p), .load(load), .p(p_prim));
  slice_beh beh(.clk(clk), .rst(rst), .a(a), .b(b), .ce_ab(ce_ab), .ce_m(ce_m), .ce_p(ce_p), .load(load), .p(p_beh));
endmodule
"""


def adapt_unisim(text: str) -> str:
    """The model with its floating-pin checks resolved for driven pins (see the module docstring)."""
    text, n_ne = re.subn(r"\(\s*[\w\[\]]+\s*!==\s*1'bz\s*\)", "1'b1", text)
    text, n_eq = re.subn(r"\(\s*[\w\[\]]+\s*===\s*1'bz\s*\)", "1'b0", text)
    text = re.sub(r"\btri0\b", "wire", text)
    if not n_ne or "1'bz" in text:
        raise ValueError("not the expected DSP48E2 model: its floating-pin checks did not all resolve")
    return text


def dsp_check_sources(unisim_src: Path, kind: str = "mac") -> tuple[list[Path], str, str]:
    """(sources, build name, toplevel) of the side-by-side bench of one slice kind ("mac":
    mac_slice, "madd": madd_slice); unisim_src is the library's verilog/src directory."""
    from amaranth.back import verilog

    from .runner import write_verilog
    model = Path(unisim_src) / "unisims" / "DSP48E2.v"
    if not model.is_file():
        raise FileNotFoundError(f"{model}: not Xilinx's DSP48E2 simulation model")
    if kind == "madd":
        beh = verilog.convert(MaddDut(), name="madd_beh")
        with xilinx_primitives():
            prim = verilog.convert(MaddDut(), name="madd_prim")
        bench = _MADD_BENCH.format(a1=MADD_A_BITS - 1, b1=MADD_B_BITS - 1, d1=MADD_D_BITS - 1, p1=MADD_P_BITS - 1)
    else:
        beh = verilog.convert(SliceDut(), name="slice_beh")
        with xilinx_primitives():
            prim = verilog.convert(SliceDut(), name="slice_prim")
        bench = _BENCH.format(a1=SLICE_A_BITS - 1, b1=SLICE_B_BITS - 1, p1=SLICE_P_BITS - 1)
    text = beh + "\n" + prim + "\n" + bench
    src = write_verilog(text, "dsp_bench")
    unisim = write_verilog(adapt_unisim(model.read_text()), "DSP48E2")
    digest = hashlib.sha256(src.read_bytes() + unisim.read_bytes()).hexdigest()[:10]
    return [src, unisim], f"dsp_bench-{digest}", "dsp_bench"
