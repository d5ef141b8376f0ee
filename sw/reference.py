"""The float reference: a NumPy fp32 forward pass of Qwen2ForCausalLM.

Everything that is not a linear layer lives here: embedding lookup, RMSNorm,
RoPE, GQA causal attention with a KV cache, SiLU-gated MLP, final norm. The
linears are a pluggable :data:`LinearFn`, so the same runner is

* the float reference, with :func:`reference_linears` (fp32 matmuls), and
* the golden model, with a quantized model's linears (``QuantModel.linear_fn``).

A caller that needs the inputs of the linears (AWQ calibration) wraps the
LinearFn: it is called exactly once per linear per forward, in execution
order, with that linear's exact fp32 input, and the runner never modifies an
array after passing it to or receiving it from the LinearFn.

All arithmetic is float32 except the RoPE angles, which are formed in float64
and rounded once to float32 cos/sin tables (the tables the host precomputes).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .config import Qwen2Config
from .contract.errors import ConfigError

F32 = np.float32

LinearFn = Callable[[str, np.ndarray], np.ndarray]
"""(name, x float32 [T, K]) -> y float32 [T, N], bias included. Names are
"model.layers.{i}.self_attn.{q,k,v,o}_proj", "model.layers.{i}.mlp.{gate,up,down}_proj"
and "lm_head"."""

_INITIAL_CACHE_LEN = 256


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * gamma over the last axis, in float32."""
    x = np.asarray(x, dtype=F32)
    ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=F32)
    inv = (F32(1.0) / np.sqrt(ms + F32(eps))).astype(F32)
    return (x * inv) * np.asarray(gamma, dtype=F32)


def rope_tables(config: Qwen2Config, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [T, head_dim] for the given positions (HF layout: the
    half-size frequency table repeated twice)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE as in HF: x*cos + rotate_half(x)*sin, with
    rotate_half([x1, x2]) = [-x2, x1]. x: [..., T, head_dim]; cos/sin [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def silu(x: np.ndarray) -> np.ndarray:
    # exp(-x) overflows to inf for x < -88; x / inf = -0.0 is the right limit.
    with np.errstate(over="ignore"):
        return x / (F32(1.0) + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def reference_linears(config: Qwen2Config, tensors: dict[str, np.ndarray]) -> LinearFn:
    """fp32 LinearFn over HF-named tensors: y = x @ W.T + b.

    Each weight is converted to float32 once and cached (a view when it is
    already float32, so a 0.5 B model is not copied); the tied LM head reuses
    model.embed_tokens.weight. The product is formed as (W @ x.T).T: with
    OpenBLAS that is several times faster than x @ W.T for the few-token
    inputs of decode and calibration.
    """
    cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def prepare(name: str):
        key = f"{name}.weight"
        if name == "lm_head" and key not in tensors and config.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        if key not in tensors:
            raise ConfigError(f"reference linear {name!r}: no tensor {key!r}")
        weight = np.asarray(tensors[key]).astype(F32, copy=False)
        bias = tensors.get(f"{name}.bias")
        return weight, (None if bias is None else np.asarray(bias).astype(F32, copy=False))

    def run(name: str, x: np.ndarray) -> np.ndarray:
        if name not in cache:
            cache[name] = prepare(name)
        weight, bias = cache[name]
        y = np.ascontiguousarray((weight @ np.asarray(x, dtype=F32).T).T)
        if bias is not None:
            y += bias
        return y

    return run


class KVCache:
    """Per-layer K and V, float32 [n_kv_heads, capacity, head_dim]; positions
    0 .. length-1 are valid. Capacity doubles when a forward needs more."""

    def __init__(self, config: Qwen2Config, capacity: int = _INITIAL_CACHE_LEN):
        shape = (config.num_key_value_heads, max(1, capacity), config.head_dim)
        self.keys = [np.zeros(shape, F32) for _ in range(config.num_hidden_layers)]
        self.values = [np.zeros(shape, F32) for _ in range(config.num_hidden_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def stores(self) -> tuple[list[np.ndarray], ...]:
        """The per-layer arrays indexed [head, position, ...]; reserve() grows them all."""
        return (self.keys, self.values)

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        for store in self.stores():
            for i, old in enumerate(store):
                new = np.zeros((old.shape[0], capacity) + old.shape[2:], old.dtype)
                new[:, :self.length] = old[:, :self.length]
                store[i] = new


class Qwen2Runner:
    """Qwen2ForCausalLM forward with a pluggable LinearFn.

    params: model.embed_tokens.weight, model.layers.{i}.input_layernorm.weight,
    model.layers.{i}.post_attention_layernorm.weight and model.norm.weight
    (HF names; other entries are ignored).
    """

    def __init__(self, config: Qwen2Config, params: dict[str, np.ndarray], linear: LinearFn):
        self.config = config
        self.linear = linear
        needed = ["model.embed_tokens.weight", "model.norm.weight"]
        for layer in range(config.num_hidden_layers):
            needed += [f"model.layers.{layer}.input_layernorm.weight",
                       f"model.layers.{layer}.post_attention_layernorm.weight"]
        missing = [n for n in needed if n not in params]
        if missing:
            raise ConfigError(f"Qwen2Runner: missing parameter(s) {', '.join(missing[:5])}")
        self.embed = np.asarray(params["model.embed_tokens.weight"])
        if self.embed.shape != (config.vocab_size, config.hidden_size):
            raise ConfigError(f"Qwen2Runner: embedding is {self.embed.shape}, expected "
                              f"{(config.vocab_size, config.hidden_size)}")
        self.norms = {n: np.asarray(params[n]).astype(F32) for n in needed[1:]}

    def new_cache(self, capacity: int = _INITIAL_CACHE_LEN) -> KVCache:
        return KVCache(self.config, capacity)

    def _check_tokens(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ConfigError(f"token ids must be a non-empty 1-D sequence, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"token ids must be integers, got dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ConfigError(f"token id {int(bad[0])} is outside the vocabulary "
                              f"0..{self.config.vocab_size - 1}")
        return ids.astype(np.int64)

    def embed_tokens(self, token_ids) -> np.ndarray:
        """The residual stream's start: float32 [T, hidden]."""
        return self.embed[self._check_tokens(token_ids)].astype(F32)

    def decoder_layer(self, layer: int, h: np.ndarray, cache: KVCache, start: int) -> np.ndarray:
        """One decoder layer on residual h [T, hidden] at positions start ..
        start+T-1: writes those positions' K/V to the cache (which must have
        room) and returns the new residual. Does not advance cache.length."""
        cfg = self.config
        pre = f"model.layers.{layer}"
        x = rms_norm(h, self.norms[f"{pre}.input_layernorm.weight"], cfg.rms_norm_eps)
        h = h + self.linear(f"{pre}.self_attn.o_proj", self._attention(pre, layer, x, cache, start))
        x = rms_norm(h, self.norms[f"{pre}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = self.linear(f"{pre}.mlp.gate_proj", x)
        up = self.linear(f"{pre}.mlp.up_proj", x)
        return h + self.linear(f"{pre}.mlp.down_proj", silu(gate) * up)

    def lm_head(self, h: np.ndarray) -> np.ndarray:
        x = rms_norm(h, self.norms["model.norm.weight"], self.config.rms_norm_eps)
        return self.linear("lm_head", x)

    def forward(self, token_ids, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Logits float32 [T, vocab] for tokens at positions cache.length ..
        cache.length + T - 1; appends their K/V to the cache. Prefill and
        single-token decode are the same call. last_only=True runs the LM head
        for the last token only (a generate prefill needs no other logits)."""
        h = self.embed_tokens(token_ids)
        start = cache.length
        cache.reserve(start + h.shape[0])
        for layer in range(self.config.num_hidden_layers):
            h = self.decoder_layer(layer, h, cache, start)
        cache.length = start + h.shape[0]
        return self.lm_head(h[-1:] if last_only else h)

    def _attention(self, pre: str, layer: int, x: np.ndarray, cache: KVCache,
                   start: int) -> np.ndarray:
        cfg = self.config
        t, hd = x.shape[0], cfg.head_dim
        end = start + t
        nkv, rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
        cos, sin = rope_tables(cfg, np.arange(start, end))
        q = self.linear(f"{pre}.self_attn.q_proj", x).reshape(t, cfg.num_attention_heads, hd)
        k = self.linear(f"{pre}.self_attn.k_proj", x).reshape(t, nkv, hd)
        v = self.linear(f"{pre}.self_attn.v_proj", x).reshape(t, nkv, hd)
        q = apply_rope(q.transpose(1, 0, 2), cos, sin)           # [heads, T, hd]
        k = apply_rope(k.transpose(1, 0, 2), cos, sin)           # [kv heads, T, hd]
        cache.keys[layer][:, start:end] = k
        cache.values[layer][:, start:end] = v.transpose(1, 0, 2)
        keys = cache.keys[layer][:, :end]
        values = cache.values[layer][:, :end]
        # GQA: query head j reads KV head j // rep (HF repeat_kv order), so the
        # rep query heads of one KV head are batched as rep*T rows.
        q = q.reshape(nkv, rep * t, hd)
        scores = (q @ keys.transpose(0, 2, 1)) * F32(1.0 / np.sqrt(hd))  # [nkv, rep*T, S]
        scores = scores.reshape(nkv, rep, t, end)
        # Query i (position start+i) sees keys 0 .. start+i.
        visible = np.arange(end)[None, :] <= (start + np.arange(t))[:, None]
        scores = np.where(visible, scores, F32(-np.inf))
        probs = softmax(scores).reshape(nkv, rep * t, end)
        out = (probs @ values).reshape(cfg.num_attention_heads, t, hd)
        return np.ascontiguousarray(out.transpose(1, 0, 2).reshape(t, cfg.q_dim))
