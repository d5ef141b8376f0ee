"""kriallm boards: the flows around the one accelerator top (rtl.top.build_top).

``boards.elaborate`` (Verilog + manifest.json, and the manifest schema and ``--hw-config`` option the
other flows share), ``boards.resources`` (Yosys resource estimate), ``boards.build`` (the KV260's Vivado
sources, overlay and firmware folder) and ``boards.kv260`` (the platform and board facts).

``boards.kv260`` and ``boards.build`` import Amaranth only when they elaborate, so board-side code can
read the board facts (register window, UIO and u-dma-buf names) on an install without the hardware tools.
"""
