"""AutoAWQ "GEMM" checkpoints: exact import to a QuantModel, and export back.

This is how Qwen publishes Qwen2.5-*-Instruct-AWQ (4 bits, group 128, zero
point, version "gemm"). Per quantized linear with W: N x K, group G:

    <name>.qweight  int32 [K, N/8]    codes, 8 per word along N
    <name>.qzeros   int32 [K/G, N/8]  zero points, 8 per word along N
    <name>.scales   fp16  [K/G, N]
    <name>.bias     fp16  [N]         (q/k/v only, for Qwen2)

with W[n, k] = (code[k, n] - zero[k//G, n]) * scale[k//G, n]. Inside a 32-bit
word, nibble i (bits 4i .. 4i+3) holds column 8c + AWQ_PACK_ORDER[i] of the
word's 8 columns (AutoAWQ's WQLinear_GEMM.pack; unpack_awq + reverse_awq_order
undo it). The numbers map one to one onto a QuantLinear (codes [N, K], zeros
and scales [N, K/G]): nothing is re-quantized.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, is_awq, save_checkpoint
from .config import Qwen2Config
from .contract.errors import CheckpointError, ConfigError
from .contract.numerics import SUPPORTED_GROUP_SIZES
from .fileio import safe_write_bytes
from .qmodel import QuantLinear, QuantModel
from .quant import (LM_HEAD_KINDS, lm_head_weight, quantize_linear, quantize_rtn,
                    round_to_bf16)

# Column (within a word's 8) stored in nibble i.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8  # 4-bit values per int32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "generation_config.json", "special_tokens_map.json")


def pack_awq(values: np.ndarray) -> np.ndarray:
    """uint4 values [R, C] (C a multiple of 8) -> int32 [R, C/8] in AWQ order."""
    v = np.asarray(values)
    r, c = v.shape
    if c % PACK:
        raise ConfigError(f"cannot pack {c} columns into int32 words of {PACK} nibbles")
    if v.size and (v.min() < 0 or v.max() > 15):
        raise ConfigError("AWQ packing needs values in 0..15")
    words = v.astype(np.uint32).reshape(r, c // PACK, PACK)[:, :, list(AWQ_PACK_ORDER)]
    shifts = (np.arange(PACK, dtype=np.uint32) * 4)
    packed = np.bitwise_or.reduce(words << shifts, axis=-1).astype(np.uint32)
    return packed.view(np.int32)


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """int32 [R, C/8] in AWQ order -> uint8 [R, C]."""
    p = np.ascontiguousarray(packed)
    if p.dtype != np.int32:
        raise CheckpointError(f"AWQ packed tensor must be int32, got {p.dtype}")
    u = p.view(np.uint32)
    r, w = u.shape
    nibbles = (u[:, :, None] >> (np.arange(PACK, dtype=np.uint32) * 4)) & np.uint32(0xF)
    out = np.empty((r, w, PACK), np.uint8)
    out[:, :, list(AWQ_PACK_ORDER)] = nibbles
    return out.reshape(r, w * PACK)


def _awq_settings(qc: dict | None) -> int:
    """Validate an AWQ quantization_config; returns the group size."""
    qc = qc or {}
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", "gemm")).lower()
    zero_point = qc.get("zero_point", True)
    problems = []
    if bits != 4:
        problems.append(f"bits {bits!r} (need 4)")
    if version != "gemm":
        problems.append(f"version {qc.get('version')!r} (need 'gemm')")
    if zero_point is not True:
        problems.append(f"zero_point {zero_point!r} (need true)")
    if group not in SUPPORTED_GROUP_SIZES:
        problems.append(f"group_size {group!r} (need one of "
                        f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))})")
    if problems:
        raise ConfigError("unsupported AWQ quantization_config: " + "; ".join(problems)
                          + ". kriallm imports 4-bit AutoAWQ GEMM checkpoints with zero points")
    return int(group)


def is_awq_checkpoint(ckpt: Checkpoint) -> bool:
    """True when config.json's quantization_config says quant_method "awq"."""
    return is_awq(ckpt.quantization_config)


def _import_linear(tensors: dict, name: str, shape: tuple[int, int], group: int) -> QuantLinear:
    n, k = shape
    ng = k // group
    want = {"qweight": ((k, n // PACK), np.int32), "qzeros": ((ng, n // PACK), np.int32),
            "scales": ((ng, n), np.float16)}
    got = {}
    for suffix, (shp, dt) in want.items():
        key = f"{name}.{suffix}"
        if key not in tensors:
            raise CheckpointError(f"AWQ checkpoint lacks {key!r}")
        a = tensors[key]
        if tuple(a.shape) != shp:
            raise CheckpointError(f"{key} is {tuple(a.shape)}, expected {shp} for a {n}x{k} linear "
                                  f"with group size {group}")
        if a.dtype != dt:
            # Scales widened from bf16 or saved as fp32 are taken if fp16-exact.
            if suffix == "scales" and np.issubdtype(a.dtype, np.floating) \
                    and np.array_equal(a.astype(np.float16).astype(a.dtype), a):
                a = a.astype(np.float16)
            else:
                raise CheckpointError(f"{key} has dtype {a.dtype}, expected {np.dtype(dt)}")
        got[suffix] = a
    codes = unpack_awq(got["qweight"]).T
    zeros = unpack_awq(got["qzeros"]).T
    bias = tensors.get(f"{name}.bias")
    return QuantLinear("int4", group, codes=np.ascontiguousarray(codes),
                       scales=np.ascontiguousarray(got["scales"].T),
                       zeros=np.ascontiguousarray(zeros),
                       bias=None if bias is None else np.asarray(bias, np.float32).copy())


def import_awq(ckpt: Checkpoint, lm_head: str = "fp16") -> QuantModel:
    """Convert an AutoAWQ GEMM checkpoint exactly (codes, zeros and scale bits).

    Linears the checkpoint keeps unquantized (modules_to_not_convert) are
    rounded to nearest with the checkpoint's group size and listed in
    quant["rtn_fallback"]. The LM head (never quantized by AutoAWQ) is built
    from lm_head.weight or the tied embeddings in the ``lm_head`` format.
    """
    if not is_awq_checkpoint(ckpt):
        raise ConfigError(f"{ckpt.path}: not an AWQ checkpoint (no quantization_config with "
                          "quant_method 'awq')")
    if lm_head not in LM_HEAD_KINDS:
        raise ConfigError(f"unknown LM head format {lm_head!r}; choose from {', '.join(LM_HEAD_KINDS)}")
    group = _awq_settings(ckpt.quantization_config)
    config: Qwen2Config = ckpt.config
    t = ckpt.tensors
    linears: dict[str, QuantLinear] = {}
    fallback = []
    for name in config.linear_names()[:-1]:
        n, k = config.shape_of(name)
        if k % group or n % PACK:
            raise CheckpointError(f"{name}: shape {n}x{k} does not fit AWQ group {group} / packing")
        if f"{name}.qweight" in t:
            linears[name] = _import_linear(t, name, (n, k), group)
        elif f"{name}.weight" in t:
            linears[name] = quantize_rtn(np.asarray(t[f"{name}.weight"], np.float32), group,
                                         bias=t.get(f"{name}.bias"), name=name)
            fallback.append(name)
        else:
            raise CheckpointError(f"AWQ checkpoint has neither {name}.qweight nor {name}.weight")
    head = lm_head_weight(config, t)
    linears["lm_head"] = quantize_linear(np.asarray(head, np.float32), lm_head, group,
                                         bias=t.get("lm_head.bias"), name="lm_head")
    params = {"model.embed_tokens.weight": round_to_bf16(t["model.embed_tokens.weight"])}
    norms = ["model.norm.weight"] + [f"model.layers.{l}.{n}.weight"
                                     for l in range(config.num_hidden_layers)
                                     for n in ("input_layernorm", "post_attention_layernorm")]
    for nm in norms:
        params[nm] = np.asarray(t[nm], np.float32).copy()
    embed_dtype = str(np.asarray(t["model.embed_tokens.weight"]).dtype)
    quant = {"method": "awq-import", "group_size": group, "lm_head": lm_head,
             "weights": f"int4 asymmetric, group {group} along K, fp16 scale, uint4 zero point "
                        "(AutoAWQ GEMM, imported exactly)",
             "awq_config": dict(ckpt.quantization_config),
             "embed_tokens": ("rounded fp16 -> bf16 for the lookup table" if embed_dtype == "float16"
                              else f"from {embed_dtype}"),
             "rtn_fallback": fallback}
    return QuantModel(config=config, quant=quant, params=params, linears=linears)


def export_awq(qmodel: QuantModel, out_dir: str | os.PathLike,
               tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write ``qmodel`` as an AutoAWQ GEMM checkpoint directory (config.json with
    quantization_config, model.safetensors; fp16 non-linear tensors).

    Every decoder linear must be INT4 with one common group size. The LM head is
    written as fp16 lm_head.weight only when the config is untied (AutoAWQ never
    quantizes it; a tied head is the embedding).
    """
    config = qmodel.config
    names = config.linear_names()[:-1]
    groups = {qmodel.linears[n].group_size for n in names}
    kinds = {qmodel.linears[n].kind for n in names}
    if kinds != {"int4"} or len(groups) != 1:
        raise ConfigError("AWQ export needs every decoder linear in INT4 with one group size; got "
                          f"formats {sorted(kinds)} and group sizes {sorted(groups)}")
    group = groups.pop()
    tensors: dict[str, np.ndarray] = {}
    for name in names:
        q = qmodel.linears[name]
        n, k = q.shape
        tensors[f"{name}.qweight"] = pack_awq(q.codes.T)
        tensors[f"{name}.qzeros"] = pack_awq(q.zeros.T)
        tensors[f"{name}.scales"] = np.ascontiguousarray(q.scales.T.astype(np.float16))
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.astype(np.float16)
    for name, arr in qmodel.params.items():
        tensors[name] = np.asarray(arr, np.float32).astype(np.float16)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = qmodel.linears["lm_head"].dequantized().astype(np.float16)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
          "version": "gemm", "modules_to_not_convert": None}
    out = save_checkpoint(out_dir, config, tensors, bf16=False,
                          extra_config={"quantization_config": qc, "torch_dtype": "float16"})
    if qmodel.tokenizer_json:
        safe_write_bytes(out / "tokenizer.json", qmodel.tokenizer_json, "tokenizer")
    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, out / f)
    return out
