"""The fabric golden decoder: the whole Qwen2 decoder in the fabric's arithmetic.

Where the hybrid golden model (sw/qmodel.py + sw/reference.py's Qwen2Runner)
does only the linears in hardware arithmetic and everything else in NumPy
fp32, this model runs every op through the contract of
:mod:`sw.contract.fabric_ops` (docs/numerics.md, "The fabric ops"): bf16
embedding lookup, fixed-order RMSNorm with a table+Newton rsqrt, RoPE from
host-made fp32 tables, attention over an INT8 KV cache (per position and KV
head scales) with integer q.k, a base-2 softmax, block-fixed-point integer P.V,
SiLU x up with the contract's sigmoid, fp32 residual adds and the golden
linears (:mod:`sw.contract.numerics`) including the LM head.

Every query row is computed from its own inputs and the cache only, so the
logits are bit-identical however a sequence is split into prefill chunks and
decode steps.
"""

from __future__ import annotations

import numpy as np

from .config import Qwen2Config
from .contract import fabric_ops as fo
from .contract.errors import ConfigError
from .qmodel import QuantModel
from .reference import KVCache

F32 = np.float32
_INITIAL_CACHE_LEN = 256


class FabricKVCache(KVCache):
    """Per layer: K and V codes int8 [n_kv_heads, capacity, head_dim] and their
    fp32 scales [n_kv_heads, capacity] (one per position and KV head)."""

    def __init__(self, config: Qwen2Config, capacity: int = _INITIAL_CACHE_LEN):
        nkv, hd, nl = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
        cap = max(1, capacity)
        self.keys = [np.zeros((nkv, cap, hd), np.int8) for _ in range(nl)]
        self.values = [np.zeros((nkv, cap, hd), np.int8) for _ in range(nl)]
        self.key_scales = [np.zeros((nkv, cap), F32) for _ in range(nl)]
        self.value_scales = [np.zeros((nkv, cap), F32) for _ in range(nl)]
        self.length = 0

    def stores(self) -> tuple[list[np.ndarray], ...]:
        return (self.keys, self.values, self.key_scales, self.value_scales)


class FabricRunner:
    """forward(ids, cache) -> fp32 logits [T, vocab], like reference.Qwen2Runner."""

    def __init__(self, qm: QuantModel):
        cfg = qm.config
        self.config = cfg
        needed = [f"model.layers.{layer}.{n}" for layer in range(cfg.num_hidden_layers)
                  for n in cfg.linear_shapes()] + ["lm_head"]
        missing = [n for n in needed if n not in qm.linears]
        if missing:
            raise ConfigError(f"fabric model: missing linear(s) {', '.join(missing[:5])}")
        bad = [n for n in needed if qm.linears[n].kind == "fp16"]
        if bad:
            raise ConfigError(f"fabric model: {bad[0]} is fp16, which has no fabric arithmetic; "
                              f"quantize the LM head to int4 or int8")
        self.linears = qm.linears
        try:
            self.embed = fo.bf16_bits(qm.params["model.embed_tokens.weight"])
        except ValueError as e:
            raise ConfigError(f"fabric model: {e}") from None
        if self.embed.shape != (cfg.vocab_size, cfg.hidden_size):
            raise ConfigError(f"fabric model: embedding is {self.embed.shape}")
        self.norms = {n: np.asarray(v, F32) for n, v in qm.params.items() if n.endswith("norm.weight")}
        self._rope_cos = np.zeros((0, cfg.head_dim // 2), F32)
        self._rope_sin = np.zeros((0, cfg.head_dim // 2), F32)

    def new_cache(self, capacity: int = _INITIAL_CACHE_LEN) -> FabricKVCache:
        return FabricKVCache(self.config, capacity)

    def _rope(self, start: int, end: int):
        """The host's cos/sin tables, grown on demand (each row depends on its position only)."""
        have = self._rope_cos.shape[0]
        if end > have:
            n = max(end, 2 * have, 256)
            self._rope_cos, self._rope_sin = fo.rope_half_tables(self.config.head_dim, self.config.rope_theta,
                                                                 np.arange(n))
        return self._rope_cos[start:end], self._rope_sin[start:end]

    def _check_tokens(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"token ids must be a non-empty 1-D integer sequence, got {ids.dtype} {ids.shape}")
        if np.any((ids < 0) | (ids >= self.config.vocab_size)):
            raise ConfigError(f"token id outside the vocabulary 0..{self.config.vocab_size - 1}")
        return ids.astype(np.int64)

    def forward(self, token_ids, cache: FabricKVCache, last_only: bool = False) -> np.ndarray:
        cfg = self.config
        h = fo.embedding(self.embed, self._check_tokens(token_ids))
        start = cache.length
        cache.reserve(start + h.shape[0])
        for layer in range(cfg.num_hidden_layers):
            h = self.decoder_layer(layer, h, cache, start)
        cache.length = start + h.shape[0]
        x = fo.rms_norm(h[-1:] if last_only else h, self.norms["model.norm.weight"], cfg.rms_norm_eps)
        return self.linears["lm_head"](x)

    def next_token(self, logits: np.ndarray) -> int:
        """Greedy: the first index of the largest logit of the last row (NaN as -inf)."""
        return int(fo.argmax_first(np.asarray(logits, F32).reshape(-1, self.config.vocab_size)[-1]))

    def decoder_layer(self, layer: int, h: np.ndarray, cache: FabricKVCache, start: int) -> np.ndarray:
        cfg = self.config
        pre = f"model.layers.{layer}"
        x = fo.rms_norm(h, self.norms[f"{pre}.input_layernorm.weight"], cfg.rms_norm_eps)
        att = self._attention(pre, layer, x, cache, start)
        h = fo.residual_add(h, self.linears[f"{pre}.self_attn.o_proj"](att))
        x = fo.rms_norm(h, self.norms[f"{pre}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        act = fo.silu_mul(self.linears[f"{pre}.mlp.gate_proj"](x), self.linears[f"{pre}.mlp.up_proj"](x))
        return fo.residual_add(h, self.linears[f"{pre}.mlp.down_proj"](act))

    def _attention(self, pre: str, layer: int, x: np.ndarray, cache: FabricKVCache, start: int) -> np.ndarray:
        cfg = self.config
        t, hd = x.shape[0], cfg.head_dim
        end = start + t
        nkv, rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
        cos, sin = self._rope(start, end)
        q = self.linears[f"{pre}.self_attn.q_proj"](x).reshape(t, cfg.num_attention_heads, hd)
        k = self.linears[f"{pre}.self_attn.k_proj"](x).reshape(t, nkv, hd)
        v = self.linears[f"{pre}.self_attn.v_proj"](x).reshape(t, nkv, hd)
        q = fo.apply_rope(q.transpose(1, 0, 2), cos, sin)        # [heads, T, hd]
        k = fo.apply_rope(k.transpose(1, 0, 2), cos, sin)        # [kv heads, T, hd]
        k8, sk = fo.quantize_heads(k)
        v8, sv = fo.quantize_heads(v.transpose(1, 0, 2))
        cache.keys[layer][:, start:end], cache.key_scales[layer][:, start:end] = k8, sk
        cache.values[layer][:, start:end], cache.value_scales[layer][:, start:end] = v8, sv
        q8, sq = fo.quantize_heads(q)
        q8 = q8.reshape(nkv, rep, t, hd)                         # query head j reads KV head j // rep
        sq = sq.reshape(nkv, rep, t)
        visible = np.arange(end)[None, :] <= (start + np.arange(t))[:, None]   # [T, S]
        out = np.empty((nkv, rep, t, hd), F32)
        for g in range(nkv):
            out[g] = fo.attend_kv_group(q8[g], sq[g], cache.keys[layer][g, :end], cache.key_scales[layer][g, :end],
                                        cache.values[layer][g, :end], cache.value_scales[layer][g, :end],
                                        visible, hd)
        out = out.reshape(cfg.num_attention_heads, t, hd)
        return np.ascontiguousarray(out.transpose(1, 0, 2).reshape(t, cfg.q_dim))
