"""Weight quantizers: round-to-nearest INT4, INT8 per channel, fp16, and AWQ.

Every quantizer returns a :class:`~sw.qmodel.QuantLinear` whose stored numbers
are self-consistent: the INT4 codes and zero points are computed with the
fp16-rounded scale that is stored, so ``QuantLinear.dequantized()`` is exactly
the matrix the quantizer intended.

AWQ (Lin et al. 2024) is implemented as in the paper and AutoAWQ: per group of
linears sharing an input, grid-search ``s = mean|x| ** alpha`` minimising the
output error of ``Q(W diag(s)) (diag(s)^-1 x)``, fold ``1/s`` into the op that
produces the input, optionally search a per-(row, group) weight clip, then
round to nearest. docs/quantization.md describes the choices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .config import Qwen2Config
from .contract.errors import CheckpointError, ConfigError
from .contract.numerics import SUPPORTED_GROUP_SIZES, quantize_activations
from .qmodel import QuantLinear, QuantModel

F32 = np.float32
F16 = np.float16
INT4_MAX = 15
INT8_MAX = 127
# AutoAWQ's guard against an all-equal group (scale would be 0).
MIN_RANGE = 1e-5
# AutoAWQ clamps s = x^alpha from below before normalising.
MIN_SCALE = 1e-4

METHODS = ("awq", "rtn")
LM_HEAD_KINDS = ("int4", "int8", "fp16")
VO_SCALING = ("tied", "skip")
DEFAULT_CALIB_TOKENS = 512
# Tokens used for the loss of the scale and clip searches (the mean |x|
# statistic always uses every calibration token).
SEARCH_TOKENS = 512
# The LM head search is the most expensive: it uses fewer tokens and a random
# sample of vocabulary rows (the statistic is per input channel, rows are
# exchangeable for it).
LM_HEAD_SEARCH_TOKENS = 128
LM_HEAD_SEARCH_ROWS = 32768
ROW_CHUNK = 16384

# The four groups of linears that share one input inside a decoder layer:
# (group name, op that produces the input and absorbs 1/s, linears scaled by s).
LAYER_GROUPS = (
    ("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("attn_out", "self_attn.v_proj", ("self_attn.o_proj",)),
    ("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp_out", "mlp.up_proj", ("mlp.down_proj",)),
)
# AutoAWQ does not clip q/k: their error is amplified through the q.k product.
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def check_quant_group_size(k: int, group_size, what: str = "linear") -> int:
    """The group sizes the accelerator supports; returns the number of groups."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
            or int(group_size) not in SUPPORTED_GROUP_SIZES:
        raise ConfigError(f"group size {group_size!r} is not supported; choose one of "
                          f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
    if k % group_size:
        raise ConfigError(f"{what}: input size {k} is not a multiple of group size {group_size}")
    return k // int(group_size)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 array rounded (nearest even) to the nearest bfloat16 value."""
    x = np.ascontiguousarray(x, dtype=F32)
    if not np.isfinite(x).all():
        raise CheckpointError("non-finite value in a tensor that must be stored as bf16")
    u = x.view(np.uint32)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return r.view(F32)


def _weight(w: np.ndarray, what: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ConfigError(f"{what}: weight must be 2-D [N, K], got shape {w.shape}")
    w = np.ascontiguousarray(w, dtype=F32)
    if not np.isfinite(w).all():
        raise CheckpointError(f"{what}: weight contains NaN or infinity")
    return w


def _bias(b, n: int, what: str):
    if b is None:
        return None
    b = np.ascontiguousarray(b, dtype=F32).reshape(-1)
    if b.shape != (n,):
        raise ConfigError(f"{what}: bias has {b.size} entries, expected {n}")
    return b


def _fp16_scales(x: np.ndarray, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        s16 = x.astype(F16)
    if not np.isfinite(s16).all():
        raise ConfigError(f"{what}: weights too large for fp16 scales (max scale {float(x.max()):g})")
    return s16


# --------------------------------------------------------------------------
# Round to nearest
# --------------------------------------------------------------------------

def _int4_grid(wg: np.ndarray, clip_ratio=1.0, what: str = "linear"):
    """Asymmetric INT4 of groups wg [..., G] (AutoAWQ's zero-point quantizer).

    Returns (codes f32 [..., G] holding 0..15, zeros f32 [...], scales fp16 [...]).
    """
    wmax = wg.max(axis=-1)
    wmin = wg.min(axis=-1)
    r = np.asarray(clip_ratio, dtype=F32)
    if r.ndim or float(r) != 1.0:
        wmax = wmax * r
        wmin = wmin * r
    rng = np.maximum(wmax - wmin, F32(MIN_RANGE))
    s16 = _fp16_scales(rng / F32(INT4_MAX), what)
    s = s16.astype(F32)
    zeros = np.clip(np.rint(-wmin / s), 0, INT4_MAX)
    codes = wg / s[..., None]
    np.rint(codes, out=codes)
    codes += zeros[..., None]
    np.clip(codes, 0, INT4_MAX, out=codes)
    return codes, zeros, s16


def quantize_rtn(w: np.ndarray, group_size: int, clip_ratio=1.0, bias=None,
                 name: str = "linear") -> QuantLinear:
    """Asymmetric INT4 per (row, group of ``group_size`` inputs), round to nearest.

    scale = (max - min) / 15 over the group (max and min times ``clip_ratio``,
    a scalar or an [N, K/G] array), stored fp16; zero = clip(round(-min/scale),
    0, 15); code = clip(round(w/scale) + zero, 0, 15), both with the stored
    fp16 scale.
    """
    w = _weight(w, name)
    n, k = w.shape
    ng = check_quant_group_size(k, group_size, name)
    codes, zeros, s16 = _int4_grid(w.reshape(n, ng, group_size), clip_ratio, name)
    return QuantLinear("int4", int(group_size), codes=codes.reshape(n, k).astype(np.uint8),
                       scales=s16, zeros=zeros.astype(np.uint8), bias=_bias(bias, n, name))


def _int8_grid(w: np.ndarray, what: str = "linear"):
    amax = np.abs(w).max(axis=-1)
    s16 = _fp16_scales(np.maximum(amax, F32(MIN_RANGE)) / F32(INT8_MAX), what)
    codes = w / s16.astype(F32)[..., None]
    np.rint(codes, out=codes)
    np.clip(codes, -INT8_MAX, INT8_MAX, out=codes)
    return codes, s16


def quantize_int8_per_channel(w: np.ndarray, group_size: int, bias=None,
                              name: str = "linear") -> QuantLinear:
    """Symmetric INT8 per output channel: scale = max|w_row| / 127 (fp16), codes in
    -127..127. ``group_size`` is the activation group size the hardware uses."""
    w = _weight(w, name)
    n, k = w.shape
    check_quant_group_size(k, group_size, name)
    codes, s16 = _int8_grid(w, name)
    return QuantLinear("int8", int(group_size), codes=codes.astype(np.int8), scales=s16,
                       bias=_bias(bias, n, name))


def quantize_fp16(w: np.ndarray, group_size: int, bias=None, name: str = "linear") -> QuantLinear:
    """Keep the weight as fp16 (host-only LM head)."""
    w = _weight(w, name)
    with np.errstate(over="ignore"):
        w16 = w.astype(F16)
    if not np.isfinite(w16).all():
        raise ConfigError(f"{name}: weight exceeds the fp16 range")
    return QuantLinear("fp16", int(group_size), weight=w16, bias=_bias(bias, w.shape[0], name))


def quantize_linear(w: np.ndarray, kind: str, group_size: int, bias=None,
                    name: str = "linear") -> QuantLinear:
    if kind == "int4":
        return quantize_rtn(w, group_size, bias=bias, name=name)
    if kind == "int8":
        return quantize_int8_per_channel(w, group_size, bias=bias, name=name)
    if kind == "fp16":
        return quantize_fp16(w, group_size, bias=bias, name=name)
    raise ConfigError(f"unknown weight format {kind!r}; choose from {', '.join(LM_HEAD_KINDS)}")


def fake_quant_weight(w: np.ndarray, group_size: int, kind: str = "int4") -> np.ndarray:
    """Quantize then dequantize in float32; equals ``quantize_*(w).dequantized()``."""
    n, k = w.shape
    if kind == "int8":
        codes, s16 = _int8_grid(w)
        codes *= s16.astype(F32)[:, None]
        return codes
    codes, zeros, s16 = _int4_grid(w.reshape(n, k // group_size, group_size))
    codes -= zeros[..., None]
    codes *= s16.astype(F32)[..., None]
    return codes.reshape(n, k)


def fake_quant_activations(x: np.ndarray, group_size: int) -> np.ndarray:
    """The hardware's per-group INT8 activations, dequantized to float32."""
    q, s_a, _ = quantize_activations(x, group_size)
    t, k = q.shape
    return (q.astype(F32).reshape(t, -1, group_size) * s_a[:, :, None]).reshape(t, k)


# --------------------------------------------------------------------------
# AWQ: scale search, clip search
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadTie:
    """Input channels that must share one scale: o_proj's input is the q heads,
    each kv head's channels are repeated ``rep`` times (GQA)."""
    n_kv: int
    rep: int
    head_dim: int

    def reduce(self, v: np.ndarray) -> np.ndarray:
        """[n_kv*rep*hd] -> [n_kv*hd]: average over the heads sharing a kv head."""
        return v.reshape(self.n_kv, self.rep, self.head_dim).mean(axis=1).reshape(-1)

    def first(self, v: np.ndarray) -> np.ndarray:
        """[n_kv*rep*hd] -> [n_kv*hd]: the first repeat (exact for tied vectors)."""
        return v.reshape(self.n_kv, self.rep, self.head_dim)[:, 0, :].reshape(-1)

    def expand(self, v: np.ndarray) -> np.ndarray:
        """[n_kv*hd] -> [n_kv*rep*hd], matching HF repeat_kv (head h uses kv h // rep)."""
        v = v.reshape(self.n_kv, 1, self.head_dim)
        return np.repeat(v, self.rep, axis=1).reshape(-1)


def awq_scales(x_mean: np.ndarray, alpha: float) -> np.ndarray:
    """s = x_mean^alpha, clamped at 1e-4 and normalised by sqrt(max * min) as AutoAWQ."""
    s = np.power(np.maximum(x_mean.astype(np.float64), 0.0), alpha)
    s = np.maximum(s, MIN_SCALE)
    s = s / math.sqrt(float(s.max()) * float(s.min()))
    s[~np.isfinite(s)] = 1.0
    return s.astype(F32)


@dataclass
class ScaleSearch:
    alpha: float
    scales: np.ndarray        # f32 [K] per input channel of the linears (already expanded)
    loss: float               # output MSE at the chosen alpha
    rtn_loss: float           # output MSE at alpha = 0 (s = 1: plain round to nearest)
    losses: list


def _strided(x: np.ndarray, n: int) -> np.ndarray:
    if x.shape[0] <= n:
        return x
    idx = np.linspace(0, x.shape[0] - 1, n).round().astype(np.int64)
    return x[idx]


def search_scales(x: np.ndarray, weights, group_size: int, *, n_grid: int = 20,
                  act_quant: bool = True, kind: str = "int4", tie: HeadTie | None = None,
                  x_mean: np.ndarray | None = None, max_tokens: int = SEARCH_TOKENS,
                  max_rows: int | None = None, seed: int = 0) -> ScaleSearch:
    """Grid search of the AWQ exponent for linears sharing the input ``x`` [T, K].

    loss(alpha) = mean over outputs of (Q(W s) q(x / s) - W x)^2 over the
    concatenated outputs of ``weights`` (each [N_i, K]); q is the hardware's
    per-group INT8 activation quantizer when ``act_quant`` (else identity).
    """
    x = np.asarray(x, F32)
    if x_mean is None:
        x_mean = np.abs(x).mean(axis=0, dtype=np.float64)
    stat = tie.reduce(x_mean) if tie is not None else x_mean
    xs_ = _strided(x, max_tokens)
    w_all = np.concatenate([np.asarray(w, F32) for w in weights], axis=0) \
        if len(weights) > 1 else np.asarray(weights[0], F32)
    if max_rows is not None and w_all.shape[0] > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(w_all.shape[0], max_rows, replace=False))
        w_all = w_all[rows]
    chunks = [slice(i, min(i + ROW_CHUNK, w_all.shape[0]))
              for i in range(0, w_all.shape[0], ROW_CHUNK)]
    y_ref = [xs_ @ w_all[c].T for c in chunks]
    n_out = xs_.shape[0] * w_all.shape[0]
    losses, best = [], None
    for i in range(n_grid):
        alpha = i / n_grid
        s = awq_scales(stat, alpha)
        s_full = tie.expand(s) if tie is not None else s
        xin = xs_ / s_full
        if act_quant:
            xin = fake_quant_activations(xin, group_size)
        err = 0.0
        for c, yr in zip(chunks, y_ref):
            wq = fake_quant_weight(w_all[c] * s_full, group_size, kind)
            d = xin @ wq.T
            d -= yr
            # Row sums in fp32 (short, vectorised), the total in fp64.
            err += float(np.einsum("ij,ij->i", d, d).sum(dtype=np.float64))
        loss = err / n_out
        losses.append(loss)
        if best is None or loss < best[1]:
            best = (alpha, loss, s_full)
    return ScaleSearch(alpha=best[0], scales=best[2], loss=best[1], rtn_loss=losses[0],
                       losses=losses)


def search_clip(w: np.ndarray, x: np.ndarray, group_size: int, *, n_grid: int = 20,
                max_shrink: float = 0.5, act_quant: bool = True,
                max_tokens: int = SEARCH_TOKENS) -> np.ndarray:
    """AutoAWQ's auto_clip: per (row, group) the symmetric clamp |w| <= max_val,
    max_val = max|w| * (1 - i/n_grid), i < max_shrink*n_grid, that minimises the
    mean squared group partial-sum error on the inputs ``x``. Returns f32 [N, ng].

    The error of one (row, group) on tokens t is mean_t (xq_t . q - x_t . w)^2
    with q the clamped-and-quantized weights and xq the (INT8-quantized) input.
    With d = q - w it is d^T H d + 2 d^T M w + const, H = Xq^T Xq / T and
    M = Xq^T (Xq - X) / T (G x G per group), so the search works on the small
    per-group matrices instead of the T x N outputs; the constant does not
    depend on the clamp and is dropped.
    """
    w = np.asarray(w, F32)
    n, k = w.shape
    ng = k // group_size
    xs_ = _strided(np.asarray(x, F32), max_tokens)
    t = xs_.shape[0]
    xq = fake_quant_activations(xs_, group_size) if act_quant else xs_
    best_all = np.empty((n, ng), F32)
    steps = [F32(1 - i / n_grid) for i in range(int(max_shrink * n_grid))]
    # One group at a time: 2-D matmuls (np.matmul on stacks is much slower) and
    # [N, G] temporaries that stay in cache.
    for g in range(ng):
        cols = slice(g * group_size, (g + 1) * group_size)
        xg, xqg = xs_[:, cols], xq[:, cols]
        h = (xqg.T @ xqg) / F32(t)                                         # [G, G]
        mw = w[:, cols] @ ((xqg.T @ (xqg - xg)) / F32(t)).T                 # rows: M w
        wg = np.ascontiguousarray(w[:, cols])                              # [N, G]
        org_max = np.abs(wg).max(axis=-1)
        best = org_max.copy()
        min_err = np.full(n, np.inf, F32)
        for step in steps:
            mv = org_max * step
            cw = np.clip(wg, -mv[:, None], mv[:, None])
            codes, zeros, s16 = _int4_grid(cw)
            codes -= zeros[:, None]
            codes *= s16.astype(F32)[:, None]
            d = codes
            d -= wg
            hd = d @ h
            hd += F32(2) * mw
            err = np.einsum("nk,nk->n", hd, d)
            better = err < min_err
            min_err[better] = err[better]
            best[better] = mv[better]
        best_all[:, g] = best
    return best_all


def apply_clip(w: np.ndarray, max_val: np.ndarray, group_size: int) -> np.ndarray:
    n, k = w.shape
    wg = w.reshape(n, k // group_size, group_size)
    return np.clip(wg, -max_val[..., None], max_val[..., None]).reshape(n, k)


# --------------------------------------------------------------------------
# Calibration capture through the float reference model
# --------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by the capturing LinearFn at the LM head: nothing after it is needed."""


# The linear whose input stands for every group member's input.
_CAPTURE = {"self_attn.q_proj": "attn_in", "self_attn.o_proj": "attn_out",
            "mlp.gate_proj": "mlp_in", "mlp.down_proj": "mlp_out"}


def _as_sequences(calib_tokens, config: Qwen2Config) -> list[np.ndarray]:
    a = np.asarray(calib_tokens)
    if a.dtype.kind not in "iu" or a.ndim not in (1, 2) or a.size == 0:
        raise ConfigError("calibration tokens must be a non-empty 1-D or 2-D integer array, "
                          f"got dtype {a.dtype} shape {a.shape}")
    if a.min() < 0 or a.max() >= config.vocab_size:
        raise ConfigError(f"calibration token ids must be in 0..{config.vocab_size - 1}, "
                          f"got {int(a.min())}..{int(a.max())}")
    seqs = [a] if a.ndim == 1 else list(a)
    if max(len(s) for s in seqs) > config.max_position_embeddings:
        raise ConfigError(f"calibration sequence longer than max_position_embeddings "
                          f"{config.max_position_embeddings}")
    return [np.ascontiguousarray(s, dtype=np.int64) for s in seqs]


def capture_linear_inputs(config: Qwen2Config, tensors: dict, sequences,
                          lm_head: bool = False) -> dict:
    """Run the float reference model on ``sequences`` and keep the input of
    every group of linears: {(layer, group): f32 [T, K]} (+ {"lm_head": ...}).

    AWQ scaling is an identity of the float model, so these are also the
    inputs of the already-scaled earlier layers (see docs/quantization.md).
    """
    from .reference import Qwen2Runner, reference_linears

    base = reference_linears(config, tensors)
    store: dict = {}

    def capture(name: str, x: np.ndarray) -> np.ndarray:
        if name == "lm_head":
            if lm_head:
                store.setdefault("lm_head", []).append(np.array(x, F32))
            raise _StopForward
        _, _, layer, rest = name.split(".", 3)
        group = _CAPTURE.get(rest)
        if group is not None:
            store.setdefault((int(layer), group), []).append(np.array(x, F32))
        return base(name, x)

    runner = Qwen2Runner(config, tensors, capture)
    for seq in sequences:
        try:
            runner.forward(seq, runner.new_cache())
        except _StopForward:
            pass
    return {key: np.concatenate([a.reshape(-1, a.shape[-1]) for a in parts], axis=0)
            for key, parts in store.items()}


# --------------------------------------------------------------------------
# AWQ over the whole model
# --------------------------------------------------------------------------

def _need(tensors: dict, name: str) -> np.ndarray:
    try:
        return tensors[name]
    except KeyError:
        raise CheckpointError(f"checkpoint has no tensor {name!r}") from None


def lm_head_weight(config: Qwen2Config, tensors: dict) -> np.ndarray:
    if "lm_head.weight" in tensors:
        return tensors["lm_head.weight"]
    if config.tie_word_embeddings:
        return _need(tensors, "model.embed_tokens.weight")
    raise CheckpointError("checkpoint has no tensor 'lm_head.weight' and the embeddings are not tied")


def _awq_layer(config: Qwen2Config, tensors: dict, layer: int, inputs: dict, group_size: int,
               *, n_grid: int, clip: bool, act_quant: bool, vo_scaling: str) -> tuple[dict, dict]:
    """Search, fold and (optionally) clip one decoder layer.

    Returns (new float tensors of the layer, info). Input tensors are not modified.
    """
    p = f"model.layers.{layer}."
    new: dict = {}

    def cur(name):
        return new[name] if name in new else np.asarray(_need(tensors, name), F32)

    info: dict = {}
    group_scales: dict = {}
    for group, prev, linears in LAYER_GROUPS:
        x = inputs[(layer, group)]
        tie = None
        if group == "attn_out":
            rep = config.num_attention_heads // config.num_key_value_heads
            if vo_scaling == "skip" and rep > 1:
                info[group] = {"alpha": None, "note": "skipped (GQA, vo_scaling='skip')"}
                continue
            tie = HeadTie(config.num_key_value_heads, rep, config.head_dim)
        ws = [cur(p + l + ".weight") for l in linears]
        res = search_scales(x, ws, group_size, n_grid=n_grid, act_quant=act_quant, tie=tie)
        s = res.scales
        group_scales[group] = s
        info[group] = {"alpha": res.alpha, "loss": res.loss, "rtn_loss": res.rtn_loss}
        for l, w in zip(linears, ws):
            new[p + l + ".weight"] = w * s[None, :]
        if prev.endswith("layernorm"):
            new[p + prev + ".weight"] = cur(p + prev + ".weight") / s
        else:
            s_prev = tie.first(s) if tie is not None else s
            new[p + prev + ".weight"] = cur(p + prev + ".weight") / s_prev[:, None]
            if p + prev + ".bias" in tensors:
                new[p + prev + ".bias"] = cur(p + prev + ".bias") / s_prev
    if clip:
        clipped = {}
        for group, _, linears in LAYER_GROUPS:
            x = inputs[(layer, group)]
            if group in group_scales:
                x = x / group_scales[group]
            for l in linears:
                if l in NO_CLIP:
                    continue
                name = p + l + ".weight"
                w = cur(name)
                mv = search_clip(w, x, group_size, n_grid=n_grid, act_quant=act_quant)
                org = np.abs(w).reshape(mv.shape[0], -1, group_size).max(-1)
                clipped[l] = float(np.mean(mv / np.maximum(org, F32(1e-30))))
                new[name] = apply_clip(w, mv, group_size)
        info["clip"] = clipped
    return new, info


def _awq_lm_head(config, tensors, x, kind, group_size, *, n_grid, act_quant):
    w = np.asarray(lm_head_weight(config, tensors), F32)
    res = search_scales(x, [w], group_size, n_grid=n_grid, act_quant=act_quant, kind=kind,
                        max_tokens=LM_HEAD_SEARCH_TOKENS, max_rows=LM_HEAD_SEARCH_ROWS)
    new = {"model.norm.weight": np.asarray(_need(tensors, "model.norm.weight"), F32) / res.scales,
           "lm_head.weight": w * res.scales[None, :]}
    return new, {"alpha": res.alpha, "loss": res.loss, "rtn_loss": res.rtn_loss}


def _check_model(config: Qwen2Config, group_size: int, lm_head: str):
    config.validate()
    for name in config.linear_names():
        n, k = config.shape_of(name)
        check_quant_group_size(k, group_size, name)
    if lm_head not in LM_HEAD_KINDS:
        raise ConfigError(f"unknown LM head format {lm_head!r}; choose from {', '.join(LM_HEAD_KINDS)}")


def _awq_steps(config, tensors, calib_tokens, group_size, *, n_grid, clip, act_quant,
               vo_scaling, lm_head_kind):
    """Yield (layer index or "lm_head", new float tensors, info) in model order."""
    if vo_scaling not in VO_SCALING:
        raise ConfigError(f"vo_scaling must be one of {', '.join(VO_SCALING)}, got {vo_scaling!r}")
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ConfigError(f"n_grid must be a positive integer, got {n_grid!r}")
    seqs = _as_sequences(calib_tokens, config)
    inputs = capture_linear_inputs(config, tensors, seqs, lm_head=lm_head_kind is not None)
    for layer in range(config.num_hidden_layers):
        new, info = _awq_layer(config, tensors, layer, inputs, group_size, n_grid=n_grid,
                               clip=clip, act_quant=act_quant, vo_scaling=vo_scaling)
        for group, _, _ in LAYER_GROUPS:
            inputs.pop((layer, group), None)
        yield layer, new, info
    if lm_head_kind is not None:
        new, info = _awq_lm_head(config, tensors, inputs.pop("lm_head"), lm_head_kind, group_size,
                                 n_grid=n_grid, act_quant=act_quant)
        yield "lm_head", new, info


def awq_scale_model(config: Qwen2Config, tensors: dict, calib_tokens, group_size: int = 64, *,
                    n_grid: int = 20, clip: bool = False, act_quant: bool = True,
                    vo_scaling: str = "tied", lm_head: str | None = None):
    """The AWQ-transformed float model (before rounding): (config, tensors, info).

    Without ``clip`` the result computes the same function as the input (scaling
    is an identity before quantization). With ``lm_head`` ("int4"/"int8") the LM
    head is scaled too; it then becomes a separate ``lm_head.weight`` and the
    returned config is untied, because the embedding lookup must stay unscaled.
    """
    _check_model(config, group_size, lm_head or "fp16")
    out = dict(tensors)
    infos = {}
    for key, new, info in _awq_steps(config, tensors, calib_tokens, group_size, n_grid=n_grid,
                                     clip=clip, act_quant=act_quant, vo_scaling=vo_scaling,
                                     lm_head_kind=lm_head):
        out.update(new)
        infos[key] = info
    if lm_head is not None and config.tie_word_embeddings:
        config = dataclasses.replace(config, tie_word_embeddings=False)
    return config, out, infos


def _norm_names(config: Qwen2Config) -> list[str]:
    names = []
    for l in range(config.num_hidden_layers):
        names += [f"model.layers.{l}.input_layernorm.weight",
                  f"model.layers.{l}.post_attention_layernorm.weight"]
    return names + ["model.norm.weight"]


def quantize_model(config: Qwen2Config, tensors: dict, method: str = "awq", group_size: int = 64,
                   lm_head: str = "int4", calib_tokens: np.ndarray | None = None,
                   clip: bool = False, progress: bool = True, *, n_grid: int = 20,
                   act_quant_search: bool = True, vo_scaling: str = "tied",
                   lm_head_awq: bool = True, calib_source: str | None = None,
                   seed: int = 0) -> QuantModel:
    """Quantize every linear of a float Qwen2 model.

    tensors: HF names -> float arrays (bf16 already widened to float32).
    method "rtn": INT4 round to nearest; "awq": activation-aware scaling on
    ``calib_tokens`` (default: the synthetic stream of
    :func:`sw.calibration.calibration_tokens`), optional clip search.
    lm_head: format of the LM head (quantized from the embeddings when tied);
    with AWQ an INT4/INT8 head is scaled too (fold into model.norm) unless
    ``lm_head_awq`` is False.
    """
    from tqdm import tqdm

    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose from {', '.join(METHODS)}")
    _check_model(config, group_size, lm_head)
    for name in ["model.embed_tokens.weight"] + _norm_names(config):
        _need(tensors, name)
    lm_w = lm_head_weight(config, tensors)

    quant: dict = {"method": method, "group_size": int(group_size), "lm_head": lm_head,
                   "weights": f"int4 asymmetric, group {group_size} along K, fp16 scale, "
                              "uint4 zero point; round to nearest"}
    params = {"model.embed_tokens.weight": round_to_bf16(_need(tensors, "model.embed_tokens.weight"))}
    for name in _norm_names(config):
        params[name] = np.asarray(tensors[name], F32).copy()
    linears: dict[str, QuantLinear] = {}
    layer_names = list(config.linear_shapes())

    def quantize_layer(layer: int, source):
        for l in layer_names:
            name = f"model.layers.{layer}.{l}"
            w = source.get(name + ".weight")
            if w is None:
                w = _need(tensors, name + ".weight")
            b = source.get(name + ".bias", tensors.get(name + ".bias"))
            linears[name] = quantize_rtn(w, group_size, bias=b, name=name)

    lm_source = lm_w
    bar = tqdm(total=config.num_hidden_layers + 1, desc=f"{method.upper()} g{group_size}",
               unit="layer", disable=not progress)
    try:
        if method == "rtn":
            for layer in range(config.num_hidden_layers):
                quantize_layer(layer, {})
                bar.update(1)
        else:
            if calib_tokens is None:
                from .calibration import calibration_tokens
                calib_tokens = calibration_tokens(None, config, DEFAULT_CALIB_TOKENS, seed)
                calib_source = calib_source or (f"synthetic Zipf token stream "
                                                f"({DEFAULT_CALIB_TOKENS} tokens, seed {seed})")
            seqs = _as_sequences(calib_tokens, config)
            calib_source = (calib_source or getattr(calib_tokens, "description", None)
                            or "user-supplied token array")
            quant["calibration"] = {"source": calib_source,
                                    "sequences": len(seqs),
                                    "tokens": int(sum(len(s) for s in seqs))}
            quant.update(n_grid=n_grid, alpha_grid=f"alpha = i/{n_grid}, i = 0..{n_grid - 1}",
                         clip=bool(clip), act_quant_in_search=bool(act_quant_search),
                         vo_scaling=vo_scaling, loss="output MSE of the group's linears")
            head_kind = lm_head if (lm_head != "fp16" and lm_head_awq) else None
            alphas, losses = {}, {}
            for key, new, info in _awq_steps(config, tensors, calib_tokens, group_size,
                                             n_grid=n_grid, clip=clip, act_quant=act_quant_search,
                                             vo_scaling=vo_scaling, lm_head_kind=head_kind):
                if key == "lm_head":
                    params["model.norm.weight"] = new["model.norm.weight"]
                    lm_source = new["lm_head.weight"]
                    alphas["lm_head"] = info["alpha"]
                    losses["lm_head"] = [info["rtn_loss"], info["loss"]]
                    continue
                for nm in ("input_layernorm", "post_attention_layernorm"):
                    nm = f"model.layers.{key}.{nm}.weight"
                    if nm in new:
                        params[nm] = new[nm]
                quantize_layer(key, new)
                for group, gi in info.items():
                    if group == "clip":
                        continue
                    alphas[f"layers.{key}.{group}"] = gi["alpha"]
                    if gi["alpha"] is not None:
                        losses[f"layers.{key}.{group}"] = [gi["rtn_loss"], gi["loss"]]
                if clip:
                    quant.setdefault("clip_mean_ratio", {})[f"layers.{key}"] = info["clip"]
                del new
                bar.update(1)
            quant["alpha"] = alphas
            quant["search_mse_rtn_vs_awq"] = losses
            quant["lm_head_awq"] = head_kind is not None
        lm_bias = tensors.get("lm_head.bias")
        linears["lm_head"] = quantize_linear(lm_source, lm_head, group_size, bias=lm_bias,
                                             name="lm_head")
        bar.update(1)
    finally:
        bar.close()
    return QuantModel(config=config, quant=quant, params=params, linears=linears)
