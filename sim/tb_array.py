"""cocotb bench for MacArray, plus the stream and payload helpers the benches share.

The pytest side (tests/test_array.py) writes ARRAY_VECTORS, an .npz holding for
every scenario the input beats as little-endian payload bytes, the stall
probabilities and the expected output count; this bench drives them through
`inp` with random idle cycles, pulls `out` with random back-pressure, checks
the handshake timing and writes the captured payloads to ARRAY_RESULTS/<scenario>.npz.
The values themselves are compared bit for bit with NumPy int64 sums on the
pytest side.

Timing contract checked here (no stalls): the beat accepted in cycle i is the
last of a group => that group's output is valid in cycle i + latency, and N
beats with G/C beats per group take exactly N + latency cycles from the first
beat to the last output handshake.

All driving and sampling happens on the falling edge (inputs) and in the
ReadOnly phase after it (handshakes that the next rising edge will commit).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly


# ---------------------------------------------------------------------------
# Payload codec: Amaranth StructLayout <-> little-endian bytes (pytest side)
# ---------------------------------------------------------------------------

def layout_fields(layout) -> dict[str, tuple[int, int, int, bool]]:
    """{name: (bit offset, element bits, element count, signed)} of a StructLayout
    whose members are plain shapes or ArrayLayouts of plain shapes."""
    from amaranth.hdl import Shape
    from amaranth.lib.data import ArrayLayout
    out = {}
    for name, field in layout:
        shape = field.shape
        if isinstance(shape, ArrayLayout):
            elem = Shape.cast(shape.elem_shape)
            out[name] = (field.offset, elem.width, shape.length, elem.signed)
        else:
            s = Shape.cast(shape)
            out[name] = (field.offset, s.width, 1, s.signed)
    return out


def pack_payloads(layout, values: dict[str, np.ndarray], n: int) -> np.ndarray:
    """values[name]: int array [n, count] (or [n]); returns uint8 [n, ceil(size/8)]."""
    size = layout.size
    bits = np.zeros((n, size), dtype=np.uint8)
    for name, (off, eb, count, _signed) in layout_fields(layout).items():
        v = np.asarray(values.get(name, 0), dtype=np.int64)
        v = np.broadcast_to(v.reshape(n, -1) if v.ndim else v, (n, count))
        v = v & ((1 << eb) - 1)
        b = ((v[:, :, None] >> np.arange(eb)) & 1).astype(np.uint8)
        bits[:, off:off + eb * count] = b.reshape(n, eb * count)
    return np.packbits(bits, axis=1, bitorder="little")


def unpack_payloads(layout, data: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_payloads`: {name: int64 [n, count]}."""
    data = np.asarray(data, dtype=np.uint8)
    bits = np.unpackbits(data, axis=1, bitorder="little")[:, :layout.size].astype(np.int64)
    out = {}
    for name, (off, eb, count, signed) in layout_fields(layout).items():
        b = bits[:, off:off + eb * count].reshape(-1, count, eb)
        v = (b << np.arange(eb)).sum(axis=2)
        if signed:
            v = np.where(v >= (1 << (eb - 1)), v - (1 << eb), v)
        out[name] = v
    return out


def rows_to_ints(data: np.ndarray) -> list[int]:
    return [int.from_bytes(row.tobytes(), "little") for row in np.asarray(data, dtype=np.uint8)]


# ---------------------------------------------------------------------------
# Stream models (simulator side)
# ---------------------------------------------------------------------------

class StreamSource:
    """Drives `<prefix>__payload/valid`; idles randomly but never drops an offered beat."""

    def __init__(self, dut, prefix: str, payloads: list[int], valid_prob: float, rng: random.Random):
        self.payload = getattr(dut, f"{prefix}__payload")
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.items = payloads
        self.p = valid_prob
        self.rng = rng
        self.index = 0
        self.offered = False
        self.accept_cycles: list[int] = []
        self.valid.value = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.items)

    def drive(self) -> None:
        if not self.offered and not self.done and self.rng.random() < self.p:
            self.payload.value = self.items[self.index]
            self.offered = True
        self.valid.value = int(self.offered)

    def sample(self, cycle: int) -> None:
        if self.offered and int(self.ready.value):
            self.accept_cycles.append(cycle)
            self.index += 1
            self.offered = False


class StreamSink:
    """Pulls `<prefix>__payload` with random back-pressure and records every handshake.

    With ``check_hold`` it also asserts the stream rule that a beat shown (valid) but not
    taken stays valid with the same payload until it is taken."""

    def __init__(self, dut, prefix: str, ready_prob: float, rng: random.Random, check_hold: bool = False):
        self.payload = getattr(dut, f"{prefix}__payload")
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.prefix = prefix
        self.p = ready_prob
        self.rng = rng
        self.check_hold = check_hold
        self.items: list[int] = []
        self.cycles: list[int] = []
        self._ready = 0
        self._held: int | None = None
        self.ready.value = 0

    def drive(self) -> None:
        self._ready = int(self.rng.random() < self.p)
        self.ready.value = self._ready

    def sample(self, cycle: int) -> None:
        valid = int(self.valid.value)
        if self.check_hold and self._held is not None:
            assert valid, f"cycle {cycle}: {self.prefix}.valid dropped before the beat was taken"
            assert self.payload.value.to_unsigned() == self._held, \
                f"cycle {cycle}: {self.prefix}.payload changed while waiting for ready"
        self._held = None
        if valid and self._ready:
            self.items.append(self.payload.value.to_unsigned())
            self.cycles.append(cycle)
        elif valid and self.check_hold:
            self._held = self.payload.value.to_unsigned()


async def reset(dut, cycles: int = 3) -> None:
    await FallingEdge(dut.clk)      # leave any ReadOnly phase before driving
    dut.rst.value = 1
    for _ in range(cycles):
        await FallingEdge(dut.clk)
    dut.rst.value = 0


async def run_streams(dut, sources, sinks, expected: dict, max_cycles: int, drain: int = 16) -> int:
    """Clock the streams until every sink has its expected count, then `drain`
    more cycles (to catch spurious outputs). Returns the number of cycles run."""
    cycle = 0
    finished_at = None
    while True:
        await FallingEdge(dut.clk)
        for s in sources:
            s.drive()
        for k in sinks:
            k.drive()
        await ReadOnly()
        for s in sources:
            s.sample(cycle)
        for k in sinks:
            k.sample(cycle)
        cycle += 1
        if finished_at is None and all(len(k.items) >= expected[k] for k in sinks) and all(s.done for s in sources):
            finished_at = cycle
        if finished_at is not None and cycle >= finished_at + drain:
            break
        assert cycle < max_cycles, (
            f"cycle timeout after {cycle} cycles: sources at "
            f"{[f'{s.index}/{len(s.items)}' for s in sources]}, sinks at "
            f"{[f'{len(k.items)}/{expected[k]}' for k in sinks]}")
    for k in sinks:
        assert len(k.items) == expected[k], f"expected {expected[k]} outputs, got {len(k.items)}"
    return cycle


def save_results(path: Path, sink: StreamSink, nbytes: int, **extra) -> None:
    data = np.array([list(v.to_bytes(nbytes, "little")) for v in sink.items], dtype=np.uint8).reshape(-1, nbytes)
    np.savez(path, payload=data, cycles=np.array(sink.cycles, dtype=np.int64), **extra)


# ---------------------------------------------------------------------------
# The MacArray bench
# ---------------------------------------------------------------------------

async def _scenario(dut, name: str) -> None:
    spec = np.load(os.environ["ARRAY_VECTORS"])
    payload = spec[f"{name}__inp"]
    valid_prob = float(spec[f"{name}__valid_prob"])
    ready_prob = float(spec[f"{name}__ready_prob"])
    n_out = int(spec[f"{name}__n_out"])
    latency = int(spec["latency"])
    beats_per_group = int(spec["beats_per_group"])
    out_bytes = int(spec["out_bytes"])
    rng = random.Random(int(spec["seed"]) * 7919 + sum(map(ord, name)))

    Clock(dut.clk, 10, unit="ns").start()
    await reset(dut)
    src = StreamSource(dut, "inp", rows_to_ints(payload), valid_prob, rng)
    sink = StreamSink(dut, "out", ready_prob, rng)
    n = len(src.items)
    budget = int(n / max(min(valid_prob, ready_prob), 0.05) * 3) + 50 * latency + 200
    cycles = await run_streams(dut, [src], [sink], {sink: n_out}, budget)

    first = src.accept_cycles[0]
    span = sink.cycles[-1] - first + 1
    dut._log.info(f"{name}: {n} beats, {n_out} outputs, {cycles} cycles run, "
                  f"first beat to last output {span} cycles (ideal {n + latency})")
    if valid_prob >= 1.0 and ready_prob >= 1.0:
        assert src.accept_cycles == list(range(first, first + n)), "array did not take one beat per cycle"
        lasts = src.accept_cycles[beats_per_group - 1::beats_per_group]
        assert sink.cycles == [c + latency for c in lasts], (
            f"outputs at {sink.cycles[:8]}..., expected last-beat cycles + {latency}: "
            f"{[c + latency for c in lasts][:8]}...")
        assert span == n + latency, f"{n} beats took {span} cycles, expected exactly {n + latency}"
    save_results(Path(os.environ["ARRAY_RESULTS"]) / f"{name}.npz", sink, out_bytes,
                 span=np.int64(span), beats=np.int64(n))


@cocotb.test()
async def nostall(dut):
    """Valid and ready always high: exact cycle count."""
    await _scenario(dut, "nostall")


@cocotb.test()
async def random_stalls(dut):
    await _scenario(dut, "stall")


@cocotb.test()
async def heavy_backpressure(dut):
    await _scenario(dut, "throttle")


@cocotb.test()
async def extreme_operands(dut):
    await _scenario(dut, "extreme")
