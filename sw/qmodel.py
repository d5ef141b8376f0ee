"""In-memory quantized model: what quantizers produce, .kq stores and the golden model runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import Qwen2Config
from .contract.errors import ConfigError
from .contract.numerics import center_weights, check_group_size, golden_linear


@dataclass
class QuantLinear:
    """One quantized linear y = W x + b with W (N x K).

    kind "int4": codes uint8 [N, K] in 0..15, zeros uint8 [N, K/G] in 0..15,
                 scales fp16 [N, K/G]; W ~ (codes - zeros) * scales.
    kind "int8": codes int8 [N, K] in -127..127, zeros None, scales fp16 [N]
                 (per output channel); activations still grouped by G.
    kind "fp16": weight fp16 [N, K] kept as is (host-only LM head).
    """

    kind: str
    group_size: int
    codes: np.ndarray | None = None
    scales: np.ndarray | None = None
    zeros: np.ndarray | None = None
    bias: np.ndarray | None = None
    weight: np.ndarray | None = None  # fp16, kind == "fp16" only
    _centered: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in ("int4", "int8", "fp16"):
            raise ConfigError(f"unknown linear kind {self.kind!r}")

    @property
    def shape(self) -> tuple[int, int]:
        a = self.weight if self.kind == "fp16" else self.codes
        return tuple(a.shape)

    @property
    def group_scales(self) -> np.ndarray:
        """fp16 [N, ng]: the scale applied to each (row, group) partial sum."""
        n, k = self.shape
        ng = check_group_size(k, self.group_size)
        if self.kind == "int8":
            return np.repeat(self.scales.reshape(n, 1), ng, axis=1)
        return self.scales

    @property
    def group_zeros(self) -> np.ndarray:
        n, k = self.shape
        ng = check_group_size(k, self.group_size)
        if self.kind == "int8":
            return np.zeros((n, ng), np.int16)
        return self.zeros

    def dequantized(self) -> np.ndarray:
        """Float32 W as the quantizer intends it (for error measurements only)."""
        if self.kind == "fp16":
            return self.weight.astype(np.float32)
        n, k = self.shape
        g = self.group_size
        c = self.codes.astype(np.float32).reshape(n, k // g, g)
        z = self.group_zeros.astype(np.float32)[:, :, None]
        s = self.group_scales.astype(np.float32)[:, :, None]
        return ((c - z) * s).reshape(n, k)

    def centered(self) -> np.ndarray:
        if self._centered is None:
            self._centered = center_weights(self.codes, self.group_zeros, self.group_size)
        return self._centered

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The golden (hardware) arithmetic; fp16 layers use plain fp32 BLAS on the host."""
        x = np.asarray(x, np.float32)
        if self.kind == "fp16":
            y = x @ self.weight.astype(np.float32).T
            return y + self.bias if self.bias is not None else y
        return golden_linear(x, self.centered(), self.group_scales, self.bias, self.group_size)


@dataclass
class QuantModel:
    config: Qwen2Config
    quant: dict                      # method, group_size, lm_head, calibration, ...
    params: dict[str, np.ndarray]    # embeddings (float32 view of bf16) and norms, HF names
    linears: dict[str, QuantLinear]  # keys: "model.layers.{i}.self_attn.q_proj", ..., "lm_head"
    tokenizer_json: bytes | None = None  # carried along so a .kq is self-contained

    def prepare(self, progress: bool = False) -> None:
        """Build every linear's integer weight cache now rather than on first use."""
        from tqdm import tqdm
        items = [q for q in self.linears.values() if q.kind != "fp16"]
        for q in tqdm(items, desc="golden weights", unit="linear", disable=not progress or len(items) < 50):
            q.centered()

    def linear_fn(self):
        def run(name: str, x: np.ndarray) -> np.ndarray:
            return self.linears[name](x)
        return run
