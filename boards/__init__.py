"""kriallm boards: the KV260 platform, its Vivado/firmware build flow, and a stub top with the accelerator's ports.

``boards.kv260`` and ``boards.build`` import Amaranth only when they elaborate, so board-side code can
read the board facts (register window, UIO and u-dma-buf names) on an install without the hardware tools.
"""
