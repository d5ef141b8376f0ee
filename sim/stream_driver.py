"""A cocotb driver for one valid/ready input stream of an Amaranth component (ports
``<name>__valid``, ``<name>__ready``, ``<name>__payload``), shared by the unit benches
(sim/tb_dequant.py, sim/tb_attention.py). Imported by name: cocotb runs the benches with
sim/ as the test directory."""

from __future__ import annotations

import random


class Stream:
    """One input stream: a queue of beats offered with a random valid pattern."""

    def __init__(self, dut, name: str, beats: list[int], width: int, p_valid: float, rng: random.Random):
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.name, self.beats, self.width, self.p_valid, self.rng = name, beats, width, p_valid, rng
        self.sent = 0
        self.offered = False
        self.handshakes: list[int] = []

    def drive(self):
        if not self.offered and self.sent < len(self.beats) and self.rng.random() < self.p_valid:
            self.offered = True
            self.valid.value = 1
            self.payload.value = self.beats[self.sent]
        elif not self.offered:
            self.valid.value = 0
            self.payload.value = self.rng.getrandbits(self.width)   # junk must be ignored

    def sample(self, cycle: int):
        if self.offered and int(self.ready.value):
            self.handshakes.append(cycle)
            self.sent += 1
            self.offered = False
