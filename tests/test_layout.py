"""The stream layout: exact round trips and the beat structure the RTL relies on."""

import numpy as np
import pytest

from sw.contract.errors import ConfigError, FormatError
from sw.contract.layout import TileLayout, pack_linear, unpack_linear


def _random(rng, bits, n, k, g):
    if bits == 4:
        return (rng.integers(0, 16, (n, k)).astype(np.uint8),
                rng.standard_normal((n, k // g)).astype(np.float16),
                rng.integers(0, 16, (n, k // g)).astype(np.uint8))
    return rng.integers(-127, 128, (n, k)).astype(np.int8), rng.standard_normal(n).astype(np.float16), None


@pytest.mark.parametrize("bits,r,g,n,k", [(4, 32, 64, 96, 256), (4, 8, 32, 20, 64), (4, 32, 128, 100, 384),
                                          (8, 32, 64, 64, 128), (4, 16, 64, 48, 128)])
def test_round_trip(bits, r, g, n, k):
    rng = np.random.default_rng(r + g)
    L = TileLayout(n, k, g, r, bits)
    c, s, z = _random(rng, bits, n, k, g)
    blob = pack_linear(L, c, s, z)
    assert blob.size == L.total_bytes and blob.size % 16 == 0
    c2, s2, z2 = unpack_linear(L, blob)
    assert np.array_equal(c2, c)
    assert np.array_equal(s2.view(np.uint16), s.view(np.uint16))
    if z is not None:
        assert np.array_equal(z2, z)


def test_r32_beat_is_one_column_and_meta_is_five_beats():
    n, k, g, r = 32, 128, 64, 32
    L = TileLayout(n, k, g, r)
    assert L.meta_bytes == 80 and L.group_block_bytes == 80 + 64 * 16
    codes = np.zeros((n, k), np.uint8)
    codes[5, 70] = 9  # row 5, column 70 -> group 1, column 6 of that group
    blob = pack_linear(L, codes, np.ones((n, 2), np.float16), np.zeros((n, 2), np.uint8))
    beats = blob.reshape(-1, 16)
    beat = (L.group_block_bytes + L.meta_bytes) // 16 + 6
    nibble = 5
    assert beats[beat][nibble // 2] >> (4 * (nibble % 2)) & 0xF == 9
    assert np.count_nonzero(blob[L.group_block_bytes + L.meta_bytes:]) == 1


def test_bad_layouts_are_refused():
    with pytest.raises(ConfigError, match="multiple of group size"):
        TileLayout(32, 100, 64, 32)
    with pytest.raises(ConfigError, match="even"):
        TileLayout(32, 128, 64, 7)
    with pytest.raises(FormatError):
        unpack_linear(TileLayout(32, 128, 64, 32), np.zeros(10, np.uint8))
