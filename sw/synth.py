"""Synthetic Qwen2 checkpoints that carry the statistics quantizers struggle with.

Random N(0, sigma) weights are easy to quantize and say nothing about a
quantizer. Trained LLMs are hard because of a few structural features, which
these weights plant on purpose (docs/synthetic.md explains each one and why):

1. Outlier input channels: about 1 % of the hidden channels get a 10-50x
   RMSNorm gain, so the inputs of q/k/v and gate/up have a few channels far
   above the rest.
2. Outlier intermediate channels: about 0.5 % of the MLP channels per layer
   get amplified gate and up rows, so down_proj sees a few huge inputs.
3. Massive activations (Sun et al. 2024): two fixed residual dimensions carry
   about 100x the typical residual magnitude from an early layer on, written
   by that layer's o_proj from the v_proj bias that attention passes through.
4. Per-row weight scale spread and non-zero q/k/v biases with a few large k
   biases, as in Qwen.

The gains that depend on what the residual stream actually looks like are
calibrated while the model is generated, by running it layer by layer on 32
random tokens: each RMSNorm's overall gain (undoing the shrink the massive
dims cause), the massive value itself, and the final-norm gain (set for a mean
next-token entropy of 3 nats). Every tensor draws from its own random stream
keyed by (seed, tensor name), so the result is deterministic per seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .calibration import ZIPF_EXPONENT, ZIPF_OFFSET
from .checkpoint import save_checkpoint
from .config import Qwen2Config, preset
from .fileio import safe_write_text
from .reference import KVCache, Qwen2Runner, apply_rope, reference_linears, rope_tables

F32 = np.float32

# Linear weights are N(0, WEIGHT_STD) at Qwen2.5-0.5B's width and scaled by
# 1/sqrt(width) elsewhere, so narrow presets keep its layer-output magnitudes.
WEIGHT_STD = 0.02
REFERENCE_WIDTH = 896
ROW_SCALE_SIGMA = 0.3       # log-normal spread of per-row weight scales
EMBED_STD = 0.03
EMBED_ROW_SIGMA = 0.1       # log-normal spread of per-token embedding norms
GAMMA_SIGMA = 0.2           # log-normal spread of RMSNorm gains around 1
OUTLIER_FRACTION = 0.005    # hidden channels with a large norm gain
OUTLIER_GAIN = (5.0, 15.0)
OUTLIER_RAMP = 2            # layers over which the outlier gains grow to full size
INTER_OUTLIER_FRACTION = 0.0025
GATE_GAIN = (2.0, 4.0)      # amplification of outlier intermediate channels
UP_GAIN = (3.0, 6.0)
GATE_OFFSET = 1.0           # their gate's mean / spread over tokens (see _switch_on)
MIN_OUTLIERS = 2
MASSIVE_DIMS = 2
# The massive dims' share of the residual's mean square where they appear.
# Present on every token, they set a floor under every later RMSNorm's
# denominator; at a share of one half that floor equals the rest of the
# residual, so the norms still normalise each token (a larger share turns them
# into a fixed scale and per-token magnitudes then compound through the
# layers). At Qwen2.5-0.5B's width this is ~30x the median |residual|.
MASSIVE_SHARE = 0.8
MASSIVE_INPUT_RATIO = 10.0  # how far above typical the massive dims enter the linears
V_SINK = 2.0                # v_proj bias entry that carries the massive value
SINK_WEIGHT_SCALE = 0.01    # v_proj weights of the sink channels, relative
Q_BIAS_STD, K_BIAS_STD, V_BIAS_STD = 0.1, 0.3, 0.05
K_BIAS_LARGE = (2.0, 5.0)   # a few large k biases per KV head, as in Qwen
K_BIAS_LARGE_PER_HEAD = 2
K_BIAS_SLOW_DIMS = 4        # ... placed among each RoPE half's slowest-rotating dims
# Attention temperature: each head's logits (centred per query) get a std
# drawn log-uniformly from this range, so heads range from broad to fairly
# sharp. Larger logits make attention nearly hard, and a small change in q
# or k then moves a lot of attention mass (see docs/synthetic.md).
ATTN_SCORE_STD = (0.7, 1.5)
# Residual update sizes: each sublayer's output rms as a multiple of the rms
# of the residual it reads (massive dims excluded). Layer 0's MLP drowns the
# embedding (with a tied head, any embedding left in the last residual makes
# every token predict itself); the later layers refine: together they grow
# the residual's energy by LATER_GROWTH, whatever the depth, split as
# LATER_SPLIT between attention and MLP.
FIRST_UPDATE = (0.2, 100.0)  # (attention, MLP) of layer 0
LATER_GROWTH = 1.3
LATER_SPLIT = (0.4, 0.6)
# The massive dims carry the unigram prior to the (tied) LM head: the
# embedding columns at those dims hold the log-frequency of each token
# (std PRIOR_EMBED_STD), and the final norm's gain on them is set so that they
# add PRIOR_STRENGTH x log p(token) to every position's logits. The prior is
# the Zipf law of sw.calibration.synthetic_tokens (low ids are frequent).
PRIOR_EMBED_STD = 0.03
PRIOR_STRENGTH = 1.25
TARGET_ENTROPY = 3.2        # nats, mean next-token entropy on the model's own samples
ROLLOUT_SEQUENCES = 2       # self-sampled sequences the final gain is calibrated on
ROLLOUT_TOKENS = 64         # ... of this many tokens
ROLLOUT_PASSES = 2          # Jacobi passes per sequence (see _self_sample)
ROLLOUT_ROUNDS = 1          # sample, recalibrate
CALIBRATION_TOKENS = 32
BIG_MODEL_PARAMS = 50_000_000  # show progress above this


@dataclass(frozen=True)
class SyntheticStructure:
    """Where the features are planted; config.json stores it as kriallm_synthetic."""

    seed: int
    massive_dims: tuple[int, ...]
    emergence_layer: int               # the layer whose o_proj writes the massive dims
    outlier_channels: tuple[int, ...]  # hidden channels with 10-50x norm gains
    intermediate_outliers: tuple[tuple[int, ...], ...]  # per layer, MLP channels
    massive_value: float = 0.0         # calibrated; 0 until then
    final_norm_gain: float = 1.0       # calibrated
    prior_gain: float = 0.0            # final-norm gain on the massive dims; calibrated


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _lognormal(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    return np.exp(rng.normal(0.0, sigma, n)).astype(F32)


def _normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    a = rng.standard_normal(shape, dtype=F32)
    a *= F32(std)
    return a


def _linear_weight(rng: np.random.Generator, shape: tuple[int, int],
                   config: Qwen2Config) -> np.ndarray:
    """N(0, std) with a log-normal scale per output row. o_proj and down_proj
    are rescaled afterwards by the calibration (their output size is set
    relative to the residual, see FIRST_UPDATE / LATER_GROWTH)."""
    std = WEIGHT_STD * np.sqrt(REFERENCE_WIDTH / config.hidden_size)
    w = _normal(rng, shape, std)
    w *= _lognormal(rng, shape[0], ROW_SCALE_SIGMA)[:, None]
    return w


def synthetic_structure(config: Qwen2Config, seed: int) -> SyntheticStructure:
    """The planted positions (before calibration) for a config and seed."""
    rng = _rng(seed, "structure")
    h, inter = config.hidden_size, config.intermediate_size
    channels = rng.permutation(h)
    massive, rest = channels[:MASSIVE_DIMS], channels[MASSIVE_DIMS:]
    n_out = max(MIN_OUTLIERS, round(OUTLIER_FRACTION * h))
    n_inter = max(MIN_OUTLIERS, round(INTER_OUTLIER_FRACTION * inter))
    inter_outliers = tuple(
        tuple(int(c) for c in np.sort(rng.choice(inter, n_inter, replace=False)))
        for _ in range(config.num_hidden_layers))

    return SyntheticStructure(
        seed=seed,
        massive_dims=tuple(int(d) for d in np.sort(massive)),
        # Early, as in trained models, but never the last layer: the massive
        # dimensions must reach some later layer's inputs.
        emergence_layer=1 if config.num_hidden_layers > 2 else 0,
        outlier_channels=tuple(int(c) for c in np.sort(rest[:n_out])),
        intermediate_outliers=inter_outliers)


def _input_gains(rng, s: SyntheticStructure, h: int, layer: int,
                 massive_factor: float | None) -> tuple[np.ndarray, np.ndarray]:
    """RMSNorm gamma before calibration, and the factor by which each channel
    is meant to enter the following linears above a typical channel.

    The linears' weight columns are divided by sqrt(factor): the outlier
    channels stay salient (sqrt(factor) x the contribution of a typical
    channel) without swamping the layer, as in trained models. The outlier
    gains grow over the first OUTLIER_RAMP layers. Where the residual carries
    the massive dims (massive_factor not None) they enter at massive_factor;
    _calibrated_gamma sets their gamma to match.
    """
    gamma = _lognormal(rng, h, GAMMA_SIGMA)
    factor = np.ones(h, F32)
    outliers = list(s.outlier_channels)
    ramp = min(1.0, (layer + 1) / OUTLIER_RAMP)
    factor[outliers] = ramp * rng.uniform(*OUTLIER_GAIN, len(outliers))
    if massive_factor is not None:
        factor[list(s.massive_dims)] = massive_factor
    gamma *= factor
    return gamma, factor


def _calibrated_gamma(gamma: np.ndarray, h: np.ndarray, s: SyntheticStructure,
                     massive_present: bool) -> np.ndarray:
    """gamma scaled for the residual h [T, hidden] it will normalise.

    The massive dims dominate the RMS and would shrink every other channel
    (and so silence every later layer); trained models learn norm gains that
    undo this, so gamma grows by the measured shrink. The massive dims' own
    gains are set so they enter at their factor x a typical channel.
    """
    massive = list(s.massive_dims)
    rest = np.ones(h.shape[1], bool)
    rest[massive] = False
    rms_all = np.sqrt(np.mean(np.square(h), axis=-1))
    rms_rest = np.sqrt(np.mean(np.square(h[:, rest]), axis=-1))
    out = gamma * F32(np.mean(rms_all / rms_rest))
    if massive_present:
        out[massive] *= F32(np.median(np.abs(h[:, rest])) / np.median(np.abs(h[:, massive])))
    return out


def _attention_constant(v_bias: np.ndarray, rep: int) -> np.ndarray:
    """The part of the attention output (o_proj input) that is the same for
    every token: attention weights sum to one, so each head passes its KV
    head's v bias through unchanged. Query head j reads KV head j // rep."""
    return np.repeat(v_bias, rep, axis=0).reshape(-1)


def _massive_signs(s: SyntheticStructure) -> np.ndarray:
    return _rng(s.seed, "massive_signs").choice([-1.0, 1.0], len(s.massive_dims))


def _plant_massive(o_proj: np.ndarray, v_bias: np.ndarray, rep: int,
                   s: SyntheticStructure, value: float) -> None:
    """Make o_proj's rows at the massive dims write +-value for every token:
    add the component along the constant attention output that sets it."""
    constant = _attention_constant(v_bias, rep)
    for d, sign in zip(s.massive_dims, _massive_signs(s)):
        missing = sign * value - float(o_proj[d] @ constant)
        o_proj[d] += F32(missing / float(constant @ constant)) * constant


def _layer(config: Qwen2Config, s: SyntheticStructure, layer: int) -> dict[str, np.ndarray]:
    pre = f"model.layers.{layer}"
    h, hd = config.hidden_size, config.head_dim
    nkv, rep = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    shapes = config.linear_shapes()
    t: dict[str, np.ndarray] = {}

    def rng(name):
        return _rng(s.seed, f"{pre}.{name}")

    gamma, factor = _input_gains(rng("input_layernorm"), s, h, layer,
                                 MASSIVE_INPUT_RATIO if layer > s.emergence_layer else None)
    t[f"{pre}.input_layernorm.weight"] = gamma
    for proj in ("q_proj", "k_proj", "v_proj"):
        w = _linear_weight(rng(proj), shapes[f"self_attn.{proj}"], config)
        w /= np.sqrt(factor)
        t[f"{pre}.self_attn.{proj}.weight"] = w

    t[f"{pre}.self_attn.q_proj.bias"] = _normal(rng("q_bias"), config.q_dim, Q_BIAS_STD)
    k_rng = rng("k_bias")
    k_bias = _normal(k_rng, (nkv, hd), K_BIAS_STD)
    # RoPE pairs dim i with i + hd/2 at frequency theta^(-2i/hd): the last
    # dims of each half barely rotate over the context, so a large bias there
    # is an almost constant key offset (a per-query constant that the softmax
    # ignores) instead of a large position-dependent oscillation.
    n_slow = min(K_BIAS_SLOW_DIMS, hd // 2)
    slow = np.concatenate([np.arange(hd // 2 - n_slow, hd // 2), np.arange(hd - n_slow, hd)])
    for head in range(nkv):
        dims = k_rng.choice(slow, K_BIAS_LARGE_PER_HEAD, replace=False)
        k_bias[head, dims] = (k_rng.uniform(*K_BIAS_LARGE, dims.size)
                              * k_rng.choice([-1.0, 1.0], dims.size))
    t[f"{pre}.self_attn.k_proj.bias"] = k_bias.reshape(-1)
    v_rng = rng("v_bias")
    v_bias = _normal(v_rng, (nkv, hd), V_BIAS_STD)
    o_proj = _linear_weight(rng("o_proj"), shapes["self_attn.o_proj"], config)
    if layer == s.emergence_layer:
        # One large "sink" entry per KV head gives the constant attention
        # output a direction that a few o_proj weights can read; the rows are
        # planted by _calibrate once the massive value is known.
        sink = v_rng.integers(0, hd, nkv)
        v_bias[np.arange(nkv), sink] = F32(V_SINK)
        # The sink channels are (almost) pure bias: with v_proj weights of
        # the usual size their token-dependent part would be a large fraction
        # of V_SINK, and the massive value would swing from token to token
        # (and vanish for some), taking every later RMSNorm with it.
        t[f"{pre}.self_attn.v_proj.weight"][np.arange(nkv) * hd + sink] *= F32(SINK_WEIGHT_SCALE)
        # Only the massive rows read the sink channels of the attention output
        # (one per query head); elsewhere they would add a large constant to
        # every residual dim.
        sink_columns = (np.arange(config.num_attention_heads) * hd
                        + np.repeat(sink, rep))
        o_proj[:, sink_columns] = 0.0
    t[f"{pre}.self_attn.v_proj.bias"] = v_bias.reshape(-1)
    t[f"{pre}.self_attn.o_proj.weight"] = o_proj

    # The MLP of the emergence layer sees the massive dims at a typical size:
    # its norm has not adapted to them yet.
    gamma, factor = _input_gains(
        rng("post_attention_layernorm"), s, h, layer,
        None if layer < s.emergence_layer
        else 1.0 if layer == s.emergence_layer else MASSIVE_INPUT_RATIO)
    t[f"{pre}.post_attention_layernorm.weight"] = gamma
    inter = list(s.intermediate_outliers[layer])
    mlp_rng = rng("mlp_outliers")
    gate_gain = mlp_rng.uniform(*GATE_GAIN, len(inter)).astype(F32)
    up_gain = mlp_rng.uniform(*UP_GAIN, len(inter)).astype(F32)
    gate = _linear_weight(rng("gate_proj"), shapes["mlp.gate_proj"], config)
    up = _linear_weight(rng("up_proj"), shapes["mlp.up_proj"], config)
    gate /= np.sqrt(factor)
    up /= np.sqrt(factor)
    gate[inter] *= gate_gain[:, None]
    up[inter] *= up_gain[:, None]
    down = _linear_weight(rng("down_proj"), shapes["mlp.down_proj"], config)
    down[:, inter] /= np.sqrt(gate_gain * up_gain)
    t[f"{pre}.mlp.gate_proj.weight"] = gate
    t[f"{pre}.mlp.up_proj.weight"] = up
    t[f"{pre}.mlp.down_proj.weight"] = down
    return t


def _log_prior(config: Qwen2Config) -> np.ndarray:
    """Centred log-probabilities of the Zipf law of sw.calibration.synthetic_tokens."""
    b = -ZIPF_EXPONENT * np.log(np.arange(config.vocab_size) + 1.0 + ZIPF_OFFSET)
    b -= np.log(np.sum(np.exp(b)))
    return b - b.mean()


def _embedding(config: Qwen2Config, s: SyntheticStructure, name: str) -> np.ndarray:
    rng = _rng(s.seed, name)
    e = _normal(rng, (config.vocab_size, config.hidden_size), EMBED_STD)
    e *= _lognormal(rng, config.vocab_size, EMBED_ROW_SIGMA)[:, None]
    prior = _log_prior(config)
    column = (prior / prior.std() * PRIOR_EMBED_STD).astype(F32)
    for d, sign in zip(s.massive_dims, _massive_signs(s)):
        e[:, d] = F32(sign) * column
    return e


def _final_norm(config: Qwen2Config, s: SyntheticStructure) -> np.ndarray:
    gamma = _lognormal(_rng(s.seed, "model.norm"), config.hidden_size, GAMMA_SIGMA)
    gamma *= F32(s.final_norm_gain)
    gamma[list(s.massive_dims)] = F32(s.prior_gain)
    return gamma


class _LayerCalibrator:
    """Runs the model one layer at a time on the calibration tokens while it
    is being generated, so each layer's gains can be set from the residual
    that actually reaches it."""

    def __init__(self, config: Qwen2Config, tensors: dict, seed: int):
        self.config = config
        self.tensors = tensors
        # Text-like tokens: the Zipf law the model's prior follows.
        p = np.exp(_log_prior(config))
        tokens = _rng(seed, "calibration").choice(config.vocab_size, CALIBRATION_TOKENS,
                                                  p=p / p.sum())
        self.cache = KVCache(config, len(tokens))
        self.h = tensors["model.embed_tokens.weight"][tokens].astype(F32)

    def _runner(self, depth: int, linear=None) -> Qwen2Runner:
        cfg = dataclasses.replace(self.config, num_hidden_layers=depth)
        # The final norm may not exist yet; a placeholder satisfies the runner.
        params = {"model.norm.weight": np.ones(self.config.hidden_size, F32), **self.tensors}
        return Qwen2Runner(cfg, params, linear or reference_linears(self.config, self.tensors))

    def trace(self, layer: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every linear's (input, output) in layer, and "out": the residual after it."""
        base = reference_linears(self.config, self.tensors)
        seen = {}

        def capture(name: str, x: np.ndarray) -> np.ndarray:
            y = base(name, x)
            seen[name.rsplit(".", 1)[-1]] = (x, y)
            return y

        out = self._runner(layer + 1, capture).decoder_layer(layer, self.h, self.cache, 0)
        seen["out"] = (self.h, out)
        return seen

    def after_attention(self, layer: int) -> np.ndarray:
        """The residual between layer's attention and its MLP."""
        return self.h + self.trace(layer)["o_proj"][1]

    def peek(self, layer: int) -> np.ndarray:
        """The residual after layer, without moving on."""
        return self._runner(layer + 1).decoder_layer(layer, self.h, self.cache, 0)

    def advance(self, layer: int) -> None:
        self.h = self.peek(layer)


def _mean_entropy(logits: np.ndarray) -> float:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1, dtype=np.float64)
    return float(np.mean(np.log(total) - np.einsum("tv,tv->t", e, z, dtype=np.float64) / total))


def _entropy_gain(dense: np.ndarray, prior: np.ndarray) -> float:
    """The factor g on the dense logits for which g * dense + prior has
    TARGET_ENTROPY nats on average. Entropy falls monotonically as g grows:
    regula falsi (Illinois) on log g."""
    dense, prior = dense.astype(F32), prior.astype(F32)

    def excess(log_g: float) -> float:
        return _mean_entropy(F32(np.exp(log_g)) * dense + prior) - TARGET_ENTROPY

    lo, hi = -8.0, 8.0
    f_lo, f_hi = excess(lo), excess(hi)
    if f_lo <= 0 or f_hi >= 0:
        raise ValueError("target entropy outside what the final-norm gain can reach")
    side = 0
    for _ in range(60):
        mid = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        f_mid = excess(mid)
        if abs(f_mid) < 1e-4:
            break
        if f_mid > 0:
            lo, f_lo = mid, f_mid
            if side == 1:
                f_hi /= 2
            side = 1
        else:
            hi, f_hi = mid, f_mid
            if side == -1:
                f_lo /= 2
            side = -1
    return float(np.exp(mid))


def _calibrate_head(config: Qwen2Config, tensors: dict, s: SyntheticStructure,
                    normed: np.ndarray) -> SyntheticStructure:
    """The final-norm gains from the normalised final residual h / rms(h)
    [T, hidden] of some tokens: on the massive dims, so that they add
    PRIOR_STRENGTH x the log prior to the logits; elsewhere, so that the mean
    entropy is TARGET_ENTROPY. Logits are linear in the final-norm gain."""
    massive = list(s.massive_dims)
    prior_std = float(_log_prior(config).std())
    prior_gain = PRIOR_STRENGTH * prior_std / (len(massive) * PRIOR_EMBED_STD
                                               * float(np.mean(np.abs(normed[:, massive]))))
    head = reference_linears(config, tensors)
    dense = head("lm_head", normed * _final_norm(
        config, dataclasses.replace(s, final_norm_gain=1.0, prior_gain=0.0)))
    # Only the massive dims carry the prior: two columns of the head.
    embed = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    prior = (normed[:, massive] * F32(prior_gain)) @ embed[:, massive].T
    return dataclasses.replace(s, prior_gain=prior_gain,
                               final_norm_gain=_entropy_gain(dense, prior))


def _normalised(h: np.ndarray) -> np.ndarray:
    return h / np.sqrt(np.mean(np.square(h), axis=-1, keepdims=True) + F32(1e-6))


def _self_sample(config: Qwen2Config, tensors: dict, s: SyntheticStructure) -> np.ndarray:
    """About ROLLOUT_TOKENS tokens of text the model writes itself (temperature
    1), and the normalised final residual h / rms(h) at each of them.

    Token by token decoding of the 0.5 B model would cost most of the
    synthesis time, so the sequence is sampled by Jacobi iteration with fixed
    Gumbel noise: each pass re-samples every position from the logits of the
    previous pass's sequence (one batched forward). After k passes the first
    k tokens are exactly what sequential sampling with that noise gives and
    the rest are samples conditioned on an approximate prefix, which is all
    the entropy calibration needs.
    """
    gamma = tensors["model.norm.weight"]
    base = reference_linears(config, tensors)
    seen = []

    def capture(name: str, x: np.ndarray) -> np.ndarray:
        if name == "lm_head":
            seen.append(x / gamma)          # the final norm's input, normalised
        return base(name, x)

    runner = Qwen2Runner(config, tensors, capture)
    rng = _rng(s.seed, "rollout")
    prior = np.exp(_log_prior(config))
    out = []
    for _ in range(ROLLOUT_SEQUENCES):
        tokens = rng.choice(config.vocab_size, ROLLOUT_TOKENS, p=prior / prior.sum())
        gumbel = rng.gumbel(size=(ROLLOUT_TOKENS - 1, config.vocab_size)).astype(F32)
        for _ in range(ROLLOUT_PASSES):
            seen.clear()
            logits = runner.forward(tokens, runner.new_cache(ROLLOUT_TOKENS))
            tokens = np.concatenate([tokens[:1], np.argmax(logits[:-1] + gumbel, axis=-1)])
        out.append(seen[0])
    return np.concatenate(out)


def _rest(h: np.ndarray, s: SyntheticStructure) -> np.ndarray:
    """h [T, hidden] without the massive dims."""
    keep = np.ones(h.shape[1], bool)
    keep[list(s.massive_dims)] = False
    return h[:, keep]


def _rest_rms(h: np.ndarray, s: SyntheticStructure) -> float:
    return float(np.sqrt(np.mean(np.square(_rest(h, s)), dtype=np.float64)))


def _massive_value(h: np.ndarray, s: SyntheticStructure) -> float:
    """The value that gives the massive dims MASSIVE_SHARE of h's mean square."""
    n = len(s.massive_dims)
    rest = h.shape[1] - n
    return _rest_rms(h, s) * float(np.sqrt(MASSIVE_SHARE / (1 - MASSIVE_SHARE) * rest / n))


def _score_std(config: Qwen2Config, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per query head, the std of the causal attention logits q.k/sqrt(hd)
    (after RoPE) around each query's mean: what the softmax sees."""
    t, hd = q.shape[0], config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    cos, sin = rope_tables(config, np.arange(t))
    qr = apply_rope(q.reshape(t, nh, hd).transpose(1, 0, 2), cos, sin)
    kr = apply_rope(k.reshape(t, nkv, hd).transpose(1, 0, 2), cos, sin)
    kr = np.repeat(kr, nh // nkv, axis=0)
    scores = (qr @ kr.transpose(0, 2, 1)).astype(np.float64) / np.sqrt(hd)
    visible = np.tril(np.ones((t, t), bool))
    visible[0, 0] = False          # a lone key carries no spread
    n = visible.sum(axis=1)
    mean = np.where(visible, scores, 0.0).sum(axis=-1) / np.maximum(n, 1)
    centred = np.where(visible, scores - mean[..., None], 0.0)
    return np.sqrt(np.sum(np.square(centred), axis=(1, 2)) / visible.sum())


def _switch_on(gate: np.ndarray, seen: tuple[np.ndarray, np.ndarray],
               s: SyntheticStructure, layer: int) -> None:
    """Keep the outlier intermediate channels firing on every token: their
    gate weights on the massive dims (which enter every token with a fixed
    sign, like a bias) are set so that the gate's mean over the calibration
    tokens is GATE_OFFSET x its spread; the SiLU then passes them through
    instead of switching them off for half the tokens."""
    x, y = seen
    massive = list(s.massive_dims)
    rows = list(s.intermediate_outliers[layer])
    x_m = x[:, massive].mean(axis=0).astype(np.float64)         # fixed sign per dim
    direction = np.sign(x_m)
    current = y[:, rows].mean(axis=0).astype(np.float64)
    target = GATE_OFFSET * y[:, rows].std(axis=0)
    step = (target - current) / float(np.abs(x_m).sum())
    gate[np.ix_(rows, massive)] += (step[:, None] * direction[None, :]).astype(F32)


def _later_update(config: Qwen2Config) -> tuple[float, float]:
    """(attention, MLP) update ratios of the layers after the first: the
    residual's energy grows by (1 + ratio^2) per sublayer, LATER_GROWTH in all."""
    n = max(1, config.num_hidden_layers - 1)
    return tuple(float(np.sqrt(np.expm1(np.log(LATER_GROWTH) * share / n)))
                 for share in LATER_SPLIT)


def _calibrate(config: Qwen2Config, tensors: dict, s: SyntheticStructure,
               layer: int, calib: _LayerCalibrator) -> SyntheticStructure:
    """Set layer's gains from the residual that reaches it, then run the layer:
    the input norm, the attention temperature, the size of the attention
    update, the post-attention norm, the size of the MLP update and, at the
    emergence layer, the massive value."""
    pre = f"model.layers.{layer}"
    norm_in = f"{pre}.input_layernorm.weight"
    norm_post = f"{pre}.post_attention_layernorm.weight"
    emergence = layer == s.emergence_layer
    tensors[norm_in] = _calibrated_gamma(tensors[norm_in], calib.h, s, layer > s.emergence_layer)

    # Attention temperature: a head's logits scale with its q rows (and
    # bias) and with its KV head's k rows. Each KV head takes the geometric
    # mean of the square roots of its query heads' factors, the q heads the rest.
    seen = calib.trace(layer)
    target = np.exp(_rng(s.seed, f"{pre}.attention_temperature").uniform(
        *np.log(ATTN_SCORE_STD), config.num_attention_heads))
    factor = target / _score_std(config, seen["q_proj"][1], seen["k_proj"][1])
    rep = config.num_attention_heads // config.num_key_value_heads
    k_factor = np.exp(0.5 * np.log(factor).reshape(-1, rep).mean(axis=1))
    q_factor = factor / np.repeat(k_factor, rep)
    for proj, f in (("q_proj", q_factor), ("k_proj", k_factor)):
        rows = np.repeat(f, config.head_dim).astype(F32)
        tensors[f"{pre}.self_attn.{proj}.weight"] *= rows[:, None]
        tensors[f"{pre}.self_attn.{proj}.bias"] *= rows

    # Update sizes relative to the residual they are added to.
    attn_ratio, mlp_ratio = FIRST_UPDATE if layer == 0 else _later_update(config)
    o_proj = tensors[f"{pre}.self_attn.o_proj.weight"]
    o_proj *= F32(attn_ratio * _rest_rms(calib.h, s) / _rest_rms(calib.trace(layer)["o_proj"][1], s))

    base_post = tensors[norm_post]
    nkv = config.num_key_value_heads
    v_bias = tensors[f"{pre}.self_attn.v_proj.bias"].reshape(nkv, -1)

    def plant(value: float) -> None:
        nonlocal s
        s = dataclasses.replace(s, massive_value=value)
        _plant_massive(o_proj, v_bias, config.num_attention_heads // nkv, s, value)

    if emergence:
        # The share refers to the residual after the whole layer, which
        # the MLP enlarges: a first guess from the residual after attention,
        # corrected below from what comes out of the layer.
        plant(_massive_value(calib.after_attention(layer), s))
    tensors[norm_post] = _calibrated_gamma(base_post, calib.after_attention(layer), s,
                                           layer >= s.emergence_layer)
    seen = calib.trace(layer)
    if layer > s.emergence_layer:
        _switch_on(tensors[f"{pre}.mlp.gate_proj.weight"], seen["gate_proj"], s, layer)
        seen = calib.trace(layer)
    middle = calib.h + seen["o_proj"][1]
    tensors[f"{pre}.mlp.down_proj.weight"] *= F32(
        mlp_ratio * _rest_rms(middle, s) / _rest_rms(seen["down_proj"][1], s))
    if emergence:
        # The norm calibration makes the MLP output insensitive to the value,
        # so one correction suffices.
        plant(_massive_value(calib.peek(layer), s))
        tensors[norm_post] = _calibrated_gamma(base_post, calib.after_attention(layer), s, True)
    calib.advance(layer)
    return s


def _synthesize(config: Qwen2Config, seed: int, progress: bool):
    s = synthetic_structure(config, seed)
    with tqdm(total=config.num_parameters(), unit="param", unit_scale=True,
              desc="synthesizing", disable=not progress) as bar:
        tensors = {"model.embed_tokens.weight": _embedding(config, s, "model.embed_tokens")}
        bar.update(tensors["model.embed_tokens.weight"].size)
        if not config.tie_word_embeddings:
            tensors["lm_head.weight"] = _embedding(config, s, "lm_head")
            bar.update(tensors["lm_head.weight"].size)
        calib = _LayerCalibrator(config, tensors, seed)
        for layer in range(config.num_hidden_layers):
            part = _layer(config, s, layer)
            tensors.update(part)
            s = _calibrate(config, tensors, s, layer, calib)
            bar.update(sum(a.size for a in part.values()))
        # The head is calibrated first on the calibration tokens, then on
        # text the model writes itself, which is what it will be run on.
        s = _calibrate_head(config, tensors, s, _normalised(calib.h))
        tensors["model.norm.weight"] = _final_norm(config, s)
        for _ in range(ROLLOUT_ROUNDS):
            s = _calibrate_head(config, tensors, s, _self_sample(config, tensors, s))
            tensors["model.norm.weight"] = _final_norm(config, s)
        bar.update(config.hidden_size)
    return tensors, s


def synthesize(config: Qwen2Config, seed: int, progress: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a Qwen2ForCausalLM with planted outliers, float32, HF names."""
    return _synthesize(config, seed, progress)[0]


def _special_token(config: Qwen2Config) -> int:
    """Qwen's <|endoftext|> when the vocabulary is Qwen's, else the last id."""
    qwen_eos = 151643
    return qwen_eos if config.vocab_size > qwen_eos else config.vocab_size - 1


def write_synthetic_checkpoint(out_dir: str | os.PathLike,
                               preset_name_or_config: str | Qwen2Config,
                               seed: int = 0, shard_bytes: int | None = None) -> Path:
    """A BF16 HF checkpoint directory (config.json with the planted structure
    under "kriallm_synthetic", generation_config.json, safetensors); no tokenizer."""
    config = (preset(preset_name_or_config) if isinstance(preset_name_or_config, str)
              else preset_name_or_config)
    config.validate()
    big = config.num_parameters() > BIG_MODEL_PARAMS
    tensors, s = _synthesize(config, seed, progress=big)
    if big:
        print(f"writing {out_dir}", flush=True)
    out = save_checkpoint(out_dir, config, tensors, bf16=True, shard_bytes=shard_bytes,
                          extra_config={"kriallm_synthetic": asdict(s)})
    special = _special_token(config)
    generation = {"bos_token_id": special, "eos_token_id": special, "do_sample": False}
    safe_write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n", "generation config")
    return out
