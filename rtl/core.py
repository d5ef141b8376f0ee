"""LinearCore: one engine's compute, MacArray + DequantUnit.

A LinearCore turns the beat stream of one row tile (R rows, all groups of K)
plus its per-group meta (weight scales, zero points) and activation meta
(scale, code sum) into the tile's fp32 outputs y[t, r]. The beat stream
carries two tile flags on every beat of a group, `first` (first group of the
tile) and `final` (last group of the tile); the array carries them to its
group output as a tag, so the dequant unit knows when to load the bias and
when to emit y. The core keeps no count of groups: whoever streams the tile
(rtl/engine.py's Engine, fed by its HP port's read master) owns the shape of
the layer.

The accelerator top is rtl/top.py's ``Accelerator`` (built by
``rtl.top.build_top``): the command processor and CSRs, the AXI masters, the
activation buffer and one Engine, holding one LinearCore, per HP port.
"""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.data import StructLayout
from amaranth.lib.wiring import In, Out

from .array import MacArray, beat_layout
from sw.contract.config import ArrayConfig
from .component import CheckedComponent
from .dequant import DequantParams, DequantUnit
from .share import LOCAL_UNITS, UnitSource

__all__ = ["LinearCore", "core_beat_layout"]


def core_beat_layout(config: ArrayConfig) -> StructLayout:
    """The core's beat payload: the array beat plus the tile flags."""
    fields = {name: f.shape for name, f in beat_layout(config)}
    fields.update(first=1, final=1)
    return StructLayout(fields)


def make_dequant(config: ArrayConfig, *, facts_only: bool = False,
                 beat_bits: int | None = None) -> DequantUnit | DequantParams:
    """The core's dequant unit; with `facts_only`, its DequantParams (layouts, latencies), no hardware."""
    return (DequantParams if facts_only else DequantUnit).for_config(config, beat_bits=beat_bits)


class LinearCore(CheckedComponent):
    """One engine: exact INT4 x INT8 group sums, then fp32 dequant and accumulation.

    Streams: `beats` (In: w, a, last, first, final), `meta` (In: scale fp16 [R],
    zero [R]), `act` (In: scale fp32 [T], qsum [T]), `bias` (In: fp32 [R], once
    per tile), `y` (Out: fp32 [T*R], index t*R + r, once per tile; with
    ``y_beat_bits``, T*R*32 / y_beat_bits beats of ``data`` per tile, in item order:
    the form the engine writes to memory, without a T*R x 32-bit output register).
    """

    @classmethod
    def check(cls, config: ArrayConfig, *, y_beat_bits: int | None = None, units: UnitSource = LOCAL_UNITS) -> None:
        DequantParams.for_config(config.validate(), beat_bits=y_beat_bits)

    def __init__(self, config: ArrayConfig, *, y_beat_bits: int | None = None, units: UnitSource = LOCAL_UNITS):
        self._config = config
        self._y_beat_bits = y_beat_bits
        self._units = units
        self._dequant = dq = DequantParams.for_config(config, beat_bits=y_beat_bits)
        super().__init__({
            "beats": In(stream.Signature(core_beat_layout(config))),
            "meta": In(stream.Signature(dq.meta_layout)),
            "act": In(stream.Signature(dq.act_layout)),
            "bias": In(stream.Signature(dq.bias_layout)),
            "y": Out(stream.Signature(dq.out_layout)),
        })

    @property
    def config(self) -> ArrayConfig:
        return self._config

    @property
    def array_latency(self) -> int:
        return self._config.array_latency

    @property
    def dequant_latency(self) -> int:
        return self._dequant.latency

    @property
    def latency(self) -> int:
        """Cycles from accepting a tile's last beat to `y.valid`, with no stalls."""
        return self._config.array_latency + self._dequant.latency

    @property
    def dequant_cycles_per_group(self) -> int:
        return self._dequant.cycles_per_group

    @property
    def cycles_per_group(self) -> int:
        """Steady-state cycles per group: the slower of array and dequant."""
        return max(self._config.beats_per_group, self._dequant.cycles_per_group)

    def elaborate(self, platform):
        m = Module()
        m.submodules.array = array = MacArray(self._config, tag_width=2)
        m.submodules.dequant = dequant = DequantUnit.for_config(self._config, beat_bits=self._y_beat_bits,
                                                                  units=self._units)

        b = self.beats.payload
        m.d.comb += [
            array.inp.valid.eq(self.beats.valid),
            self.beats.ready.eq(array.inp.ready),
            array.inp.payload.w.eq(b.w),
            array.inp.payload.a.eq(b.a),
            array.inp.payload.last.eq(b.last),
            array.inp.payload.tag.eq(b.first | (b.final << 1)),

            dequant.partials.valid.eq(array.out.valid),
            array.out.ready.eq(dequant.partials.ready),
            dequant.partials.payload.acc.eq(array.out.payload.acc),
            dequant.partials.payload.first.eq(array.out.payload.tag[0]),
            dequant.partials.payload.last.eq(array.out.payload.tag[1]),
        ]
        wiring.connect(m, wiring.flipped(self.meta), dequant.meta)
        wiring.connect(m, wiring.flipped(self.act), dequant.act)
        wiring.connect(m, wiring.flipped(self.bias), dequant.bias)
        wiring.connect(m, dequant.out, wiring.flipped(self.y))
        return m
