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

from .checkpoint import save_checkpoint
from .config import Qwen2Config, preset
from .reference import KVCache, Qwen2Runner, reference_linears

F32 = np.float32

# Linear weights are N(0, WEIGHT_STD) at Qwen2.5-0.5B's width and scaled by
# 1/sqrt(width) elsewhere, so narrow presets keep its layer-output magnitudes.
WEIGHT_STD = 0.02
REFERENCE_WIDTH = 896
ROW_SCALE_SIGMA = 0.3       # log-normal spread of per-row weight scales
EMBED_STD = 0.03
EMBED_ROW_SIGMA = 0.25      # log-normal spread of per-token embedding norms
GAMMA_SIGMA = 0.2           # log-normal spread of RMSNorm gains around 1
OUTLIER_FRACTION = 0.01     # hidden channels with a large norm gain
OUTLIER_GAIN = (10.0, 50.0)
INTER_OUTLIER_FRACTION = 0.005
GATE_GAIN = (3.0, 6.0)      # amplification of outlier intermediate channels
UP_GAIN = (5.0, 12.0)
MIN_OUTLIERS = 2
MASSIVE_DIMS = 2
MASSIVE_RATIO = 100.0       # massive value / median |residual| where they appear
MASSIVE_INPUT_RATIO = 20.0  # how far above typical the massive dims enter the linears
V_SINK = 2.0                # v_proj bias entry that carries the massive value
Q_BIAS_STD, K_BIAS_STD, V_BIAS_STD = 0.1, 0.3, 0.05
K_BIAS_LARGE = (2.0, 5.0)   # a few large k biases per KV head, as in Qwen
K_BIAS_LARGE_PER_HEAD = 2
FINAL_MASSIVE_DAMP = 0.02   # final-norm gain on the massive dims, relative
TARGET_ENTROPY = 3.0        # nats, mean over the calibration tokens
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


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _lognormal(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    return np.exp(rng.normal(0.0, sigma, n)).astype(F32)


def _normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    a = rng.standard_normal(shape, dtype=F32)
    a *= F32(std)
    return a


def _linear_weight(rng: np.random.Generator, shape: tuple[int, int], config: Qwen2Config,
                   writes_residual: bool = False) -> np.ndarray:
    std = WEIGHT_STD * np.sqrt(REFERENCE_WIDTH / config.hidden_size)
    if writes_residual:
        # GPT-2's 1/sqrt(2L) for the layers that add to the residual keeps its
        # growth over depth moderate, as in trained models.
        std /= np.sqrt(2 * config.num_hidden_layers)
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


def _input_gains(rng, s: SyntheticStructure, h: int,
                 massive_present: bool) -> tuple[np.ndarray, np.ndarray]:
    """RMSNorm gamma before calibration, and the factor by which each channel
    is meant to enter the following linears above a typical channel.

    The linears' weight columns are divided by sqrt(factor): the outlier
    channels stay salient (sqrt(factor) x the contribution of a typical
    channel) without swamping the layer, as in trained models. Where the
    residual carries the massive dims they count as such outliers too;
    _calibrated_gamma sets their gamma to match.
    """
    gamma = _lognormal(rng, h, GAMMA_SIGMA)
    factor = np.ones(h, F32)
    outliers = list(s.outlier_channels)
    factor[outliers] = rng.uniform(*OUTLIER_GAIN, len(outliers))
    if massive_present:
        factor[list(s.massive_dims)] = MASSIVE_INPUT_RATIO
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

    gamma, factor = _input_gains(rng("input_layernorm"), s, h, layer > s.emergence_layer)
    t[f"{pre}.input_layernorm.weight"] = gamma
    for proj in ("q_proj", "k_proj", "v_proj"):
        w = _linear_weight(rng(proj), shapes[f"self_attn.{proj}"], config)
        w /= np.sqrt(factor)
        t[f"{pre}.self_attn.{proj}.weight"] = w

    t[f"{pre}.self_attn.q_proj.bias"] = _normal(rng("q_bias"), config.q_dim, Q_BIAS_STD)
    k_rng = rng("k_bias")
    k_bias = _normal(k_rng, (nkv, hd), K_BIAS_STD)
    for head in range(nkv):
        dims = k_rng.choice(hd, K_BIAS_LARGE_PER_HEAD, replace=False)
        k_bias[head, dims] = (k_rng.uniform(*K_BIAS_LARGE, dims.size)
                              * k_rng.choice([-1.0, 1.0], dims.size))
    t[f"{pre}.self_attn.k_proj.bias"] = k_bias.reshape(-1)
    v_rng = rng("v_bias")
    v_bias = _normal(v_rng, (nkv, hd), V_BIAS_STD)
    o_proj = _linear_weight(rng("o_proj"), shapes["self_attn.o_proj"], config, True)
    if layer == s.emergence_layer:
        # One large "sink" entry per KV head gives the constant attention
        # output a direction that a few o_proj weights can read; the rows are
        # planted by _calibrate once the massive value is known.
        sink = v_rng.integers(0, hd, nkv)
        v_bias[np.arange(nkv), sink] = F32(V_SINK)
        # Only the massive rows read the sink channels of the attention output
        # (one per query head); elsewhere they would add a large constant to
        # every residual dim.
        sink_columns = (np.arange(config.num_attention_heads) * hd
                        + np.repeat(sink, rep))
        o_proj[:, sink_columns] = 0.0
    t[f"{pre}.self_attn.v_proj.bias"] = v_bias.reshape(-1)
    t[f"{pre}.self_attn.o_proj.weight"] = o_proj

    gamma, factor = _input_gains(rng("post_attention_layernorm"), s, h,
                                 layer >= s.emergence_layer)
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
    if layer >= s.emergence_layer:
        # The massive dims enter every token with a fixed sign; aligning the
        # outlier channels' gate weights with them keeps those channels firing
        # (a negative offset would leave them switched off by the SiLU).
        massive = list(s.massive_dims)
        gate[np.ix_(inter, massive)] = np.abs(gate[np.ix_(inter, massive)]) * _massive_signs(s)
    down = _linear_weight(rng("down_proj"), shapes["mlp.down_proj"], config, True)
    down[:, inter] /= np.sqrt(gate_gain * up_gain)
    t[f"{pre}.mlp.gate_proj.weight"] = gate
    t[f"{pre}.mlp.up_proj.weight"] = up
    t[f"{pre}.mlp.down_proj.weight"] = down
    return t


def _embedding(config: Qwen2Config, seed: int, name: str) -> np.ndarray:
    rng = _rng(seed, name)
    e = _normal(rng, (config.vocab_size, config.hidden_size), EMBED_STD)
    e *= _lognormal(rng, config.vocab_size, EMBED_ROW_SIGMA)[:, None]
    return e


def _final_norm(config: Qwen2Config, s: SyntheticStructure) -> np.ndarray:
    gamma = _lognormal(_rng(s.seed, "model.norm"), config.hidden_size, GAMMA_SIGMA)
    gamma *= F32(s.final_norm_gain)
    # Keeps the massive dims out of the logits, as trained models do.
    gamma[list(s.massive_dims)] *= F32(FINAL_MASSIVE_DAMP)
    return gamma


class _LayerCalibrator:
    """Runs the model one layer at a time on the calibration tokens while it
    is being generated, so each layer's gains can be set from the residual
    that actually reaches it."""

    def __init__(self, config: Qwen2Config, tensors: dict, seed: int):
        self.config = config
        self.tensors = tensors
        tokens = _rng(seed, "calibration").integers(0, config.vocab_size, CALIBRATION_TOKENS)
        self.cache = KVCache(config, len(tokens))
        self.h = tensors["model.embed_tokens.weight"][tokens].astype(F32)

    def _runner(self, depth: int, linear=None) -> Qwen2Runner:
        cfg = dataclasses.replace(self.config, num_hidden_layers=depth)
        # The final norm may not exist yet; a placeholder satisfies the runner.
        params = {"model.norm.weight": np.ones(self.config.hidden_size, F32), **self.tensors}
        return Qwen2Runner(cfg, params, linear or reference_linears(self.config, self.tensors))

    def after_attention(self, layer: int) -> np.ndarray:
        """The residual between layer's attention and its MLP."""
        base = reference_linears(self.config, self.tensors)
        o_proj = f"model.layers.{layer}.self_attn.o_proj"
        seen = {}

        def capture(name: str, x: np.ndarray) -> np.ndarray:
            seen[name] = base(name, x)
            return seen[name]

        self._runner(layer + 1, capture).decoder_layer(layer, self.h, self.cache, 0)
        return self.h + seen[o_proj]

    def peek(self, layer: int) -> np.ndarray:
        """The residual after layer, without moving on."""
        return self._runner(layer + 1).decoder_layer(layer, self.h, self.cache, 0)

    def advance(self, layer: int) -> None:
        self.h = self.peek(layer)

    def logits(self) -> np.ndarray:
        return self._runner(self.config.num_hidden_layers).lm_head(self.h)


def _mean_entropy(logits: np.ndarray) -> float:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1)
    return float(np.mean(np.log(total) - np.sum(e * z, axis=-1) / total))


def _entropy_gain(logits: np.ndarray) -> float:
    """The factor on logits that gives TARGET_ENTROPY nats on average.
    Entropy falls monotonically as logits scale up, so bisect on its log."""
    logits = logits.astype(np.float64)
    lo, hi = -10.0, 10.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _mean_entropy(np.exp(mid) * logits) > TARGET_ENTROPY:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def _rest_median(h: np.ndarray, s: SyntheticStructure) -> float:
    """Median |h| over all but the massive dims."""
    rest = np.ones(h.shape[1], bool)
    rest[list(s.massive_dims)] = False
    return float(np.median(np.abs(h[:, rest])))


def _calibrate(config: Qwen2Config, tensors: dict, s: SyntheticStructure,
               layer: int, calib: _LayerCalibrator) -> SyntheticStructure:
    """Set layer's norm gains (and, at the emergence layer, the massive
    value) from the residual that reaches it, then run the layer."""
    pre = f"model.layers.{layer}"
    norm_in = f"{pre}.input_layernorm.weight"
    norm_post = f"{pre}.post_attention_layernorm.weight"
    tensors[norm_in] = _calibrated_gamma(tensors[norm_in], calib.h, s, layer > s.emergence_layer)
    base_post = tensors[norm_post]
    if layer != s.emergence_layer:
        tensors[norm_post] = _calibrated_gamma(base_post, calib.after_attention(layer), s,
                                               layer > s.emergence_layer)
        calib.advance(layer)
        return s
    nkv = config.num_key_value_heads
    v_bias = tensors[f"{pre}.self_attn.v_proj.bias"].reshape(nkv, -1)
    o_proj = tensors[f"{pre}.self_attn.o_proj.weight"]

    def plant(value: float) -> None:
        nonlocal s
        s = dataclasses.replace(s, massive_value=value)
        _plant_massive(o_proj, v_bias, config.num_attention_heads // nkv, s, value)
        tensors[norm_post] = _calibrated_gamma(base_post, calib.after_attention(layer), s, True)

    # "100x typical" refers to the residual after the whole layer, which the
    # MLP enlarges: guess from the residual after attention, run the layer,
    # then set the value from what comes out. The norm calibration makes the
    # MLP output insensitive to the value, so one correction suffices.
    plant(MASSIVE_RATIO * _rest_median(calib.after_attention(layer), s))
    plant(MASSIVE_RATIO * _rest_median(calib.peek(layer), s))
    calib.advance(layer)
    return s


def _synthesize(config: Qwen2Config, seed: int, progress: bool):
    s = synthetic_structure(config, seed)
    with tqdm(total=config.num_parameters(), unit="param", unit_scale=True,
              desc="synthesizing", disable=not progress) as bar:
        tensors = {"model.embed_tokens.weight": _embedding(config, seed, "model.embed_tokens")}
        bar.update(tensors["model.embed_tokens.weight"].size)
        if not config.tie_word_embeddings:
            tensors["lm_head.weight"] = _embedding(config, seed, "lm_head")
            bar.update(tensors["lm_head.weight"].size)
        calib = _LayerCalibrator(config, tensors, seed)
        for layer in range(config.num_hidden_layers):
            part = _layer(config, s, layer)
            tensors.update(part)
            s = _calibrate(config, tensors, s, layer, calib)
            bar.update(sum(a.size for a in part.values()))
        tensors["model.norm.weight"] = _final_norm(config, s)
        bar.update(config.hidden_size)
        # Logits are linear in the final-norm gain.
        s = dataclasses.replace(s, final_norm_gain=_entropy_gain(calib.logits()))
        tensors["model.norm.weight"] = _final_norm(config, s)
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
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n",
                                                encoding="utf-8")
    return out
