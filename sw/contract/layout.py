"""The stream layout of one quantized linear: bytes exactly as the accelerator reads them.

A linear W (N x K, group G, ng = K/G) is cut into row tiles of R rows
(R = ``tile_rows``; N is padded up to a multiple of R with zero rows). Each
tile is a sequence of ng group blocks, in group order; each group block is

    meta:    R fp16 scales (little endian, row order), then R/2 bytes of zero
             points (row 2i in the low nibble, row 2i+1 in the high nibble),
             zero-padded to a whole number of beats;
    weights: for k = k0 .. k0+G-1: the R codes of column k, two per byte
             (row 2i low nibble, row 2i+1 high nibble).

With R = 32 and 16-byte (128-bit) beats, one beat carries exactly one column
of a tile (32 whole nibbles) and the meta of a group is exactly 5 beats, so
nothing is padded. INT8 per-channel layers use the same order with one byte
per code and meta = R fp16 scales only (zero points are 0).

Tiles follow each other with no gap; the linear's blob is the concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, FormatError
from .numerics import check_group_size

BEAT_BYTES = 16          # one 128-bit AXI data beat of an HP port


def _pad(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class TileLayout:
    rows: int          # N
    cols: int          # K
    group_size: int    # G
    tile_rows: int     # R
    bits: int = 4      # 4 (asymmetric, zero points) or 8 (symmetric per channel)
    beat_bytes: int = BEAT_BYTES

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"weight bits must be 4 or 8, got {self.bits}")
        if self.tile_rows <= 0 or self.tile_rows % 2:
            raise ConfigError(f"tile_rows must be a positive even number, got {self.tile_rows}")
        check_group_size(self.cols, self.group_size)
        if (self.group_size * self.weight_bytes_per_col) % self.beat_bytes:
            raise ConfigError(
                f"a group of {self.group_size} columns x {self.tile_rows} rows is not a whole "
                f"number of {self.beat_bytes}-byte beats")

    @property
    def n_groups(self) -> int:
        return self.cols // self.group_size

    @property
    def n_tiles(self) -> int:
        return -(-self.rows // self.tile_rows)

    @property
    def padded_rows(self) -> int:
        return self.n_tiles * self.tile_rows

    @property
    def weight_bytes_per_col(self) -> int:
        return self.tile_rows * self.bits // 8

    @property
    def meta_raw_bytes(self) -> int:
        return self.tile_rows * 2 + (self.tile_rows // 2 if self.bits == 4 else 0)

    @property
    def meta_bytes(self) -> int:
        return _pad(self.meta_raw_bytes, self.beat_bytes)

    @property
    def group_weight_bytes(self) -> int:
        return self.group_size * self.weight_bytes_per_col

    @property
    def group_block_bytes(self) -> int:
        return self.meta_bytes + self.group_weight_bytes

    @property
    def tile_bytes(self) -> int:
        return self.n_groups * self.group_block_bytes

    @property
    def total_bytes(self) -> int:
        return self.n_tiles * self.tile_bytes

    @property
    def beats(self) -> int:
        return self.total_bytes // self.beat_bytes


def _nibbles_to_bytes(codes: np.ndarray) -> np.ndarray:
    """[..., R] values 0..15 -> [..., R/2] bytes, even index in the low nibble."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def _bytes_to_nibbles(b: np.ndarray) -> np.ndarray:
    out = np.empty(b.shape[:-1] + (b.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = b & 0xF
    out[..., 1::2] = b >> 4
    return out


def pack_linear(layout: TileLayout, codes: np.ndarray, scales: np.ndarray,
                zeros: np.ndarray | None) -> np.ndarray:
    """codes [N, K] (uint8 0..15, or int8 for bits=8), scales fp16 [N, ng]
    (bits=4) or [N] (bits=8), zeros uint8 [N, ng] (bits=4). Returns uint8 blob."""
    L = layout
    n, k, r, g, ng = L.rows, L.cols, L.tile_rows, L.group_size, L.n_groups
    if codes.shape != (n, k):
        raise ConfigError(f"codes shape {codes.shape} does not match layout {(n, k)}")
    pn = L.padded_rows
    if L.bits == 4:
        if codes.min(initial=0) < 0 or codes.max(initial=0) > 15:
            raise ConfigError("INT4 codes must lie in [0, 15]")
        c = np.zeros((pn, k), np.uint8); c[:n] = codes
        s = np.zeros((pn, ng), np.float16); s[:n] = scales
        z = np.zeros((pn, ng), np.uint8); z[:n] = zeros
    else:
        c = np.zeros((pn, k), np.int8); c[:n] = codes
        s = np.zeros((pn, ng), np.float16); s[:n] = np.asarray(scales).reshape(n, 1)
        z = None
    nt = L.n_tiles
    # [nt, ng, G, R] column-major inside a group block
    cw = c.reshape(nt, r, ng, g).transpose(0, 2, 3, 1)
    if L.bits == 4:
        wbytes = _nibbles_to_bytes(cw).reshape(nt, ng, -1)
    else:
        wbytes = cw.view(np.uint8).reshape(nt, ng, -1)
    st = s.reshape(nt, r, ng).transpose(0, 2, 1)  # [nt, ng, R]
    meta = np.zeros((nt, ng, L.meta_bytes), np.uint8)
    meta[:, :, :2 * r] = np.ascontiguousarray(st.astype("<f2")).view(np.uint8).reshape(nt, ng, 2 * r)
    if L.bits == 4:
        zt = z.reshape(nt, r, ng).transpose(0, 2, 1)
        meta[:, :, 2 * r:2 * r + r // 2] = _nibbles_to_bytes(zt)
    blob = np.concatenate([meta, wbytes], axis=2).reshape(-1)
    assert blob.size == L.total_bytes
    return blob


def unpack_linear(layout: TileLayout, blob: np.ndarray):
    """Inverse of :func:`pack_linear`: returns (codes, scales, zeros-or-None)."""
    L = layout
    blob = np.asarray(blob, dtype=np.uint8)
    if blob.size != L.total_bytes:
        raise FormatError(f"linear blob has {blob.size} bytes, layout needs {L.total_bytes}")
    n, k, r, g, ng, nt = L.rows, L.cols, L.tile_rows, L.group_size, L.n_groups, L.n_tiles
    b = blob.reshape(nt, ng, L.group_block_bytes)
    meta, w = b[:, :, :L.meta_bytes], b[:, :, L.meta_bytes:]
    s = np.ascontiguousarray(meta[:, :, :2 * r]).view("<f2").astype(np.float16)  # [nt, ng, R]
    scales = s.transpose(0, 2, 1).reshape(nt * r, ng)[:n]
    if L.bits == 4:
        cw = _bytes_to_nibbles(w.reshape(nt, ng, g, r // 2))  # [nt, ng, G, R]
        zt = _bytes_to_nibbles(meta[:, :, 2 * r:2 * r + r // 2])  # [nt, ng, R]
        zeros = zt.transpose(0, 2, 1).reshape(nt * r, ng)[:n]
    else:
        cw = w.reshape(nt, ng, g, r).view(np.int8)
        zeros = None
        scales = scales[:, 0]
    codes = cw.transpose(0, 3, 1, 2).reshape(nt * r, k)[:n]
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales), (
        None if zeros is None else np.ascontiguousarray(zeros))
