"""The host/accelerator contract: everything the host, the RTL and the docs must agree on.

This package is the ground floor of kriallm. It imports nothing else of the
project (numpy and the standard library only), so the board's driver, the RTL
generators, the testbenches and the docs generator all read the same facts
from one place. See docs/contract.md for the one-page index.

| module | what |
|---|---|
| `config` | `ArrayConfig`, the hardware presets, the config hash, derived facts |
| `commands` | the register map, command descriptors, error codes, buffer layouts |
| `layout` | the weight stream layout (tiles, groups, meta beats) |
| `numerics` | the arithmetic contract (the golden model's kernels) |
| `fabric_ops` | the arithmetic of the non-linear decoder ops on the fabric |
| `errors` | the error classes every layer raises |
"""
