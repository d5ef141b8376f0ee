"""Hugging Face Qwen2 checkpoint directories: load, validate, save.

A checkpoint directory holds config.json and the weights as one
model.safetensors, or as shards listed by model.safetensors.index.json, or as
any *.safetensors files. Loading checks that every tensor Qwen2ForCausalLM
needs is present with the shape config.json implies, so later stages can index
tensors without defensive code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Qwen2Config
from .contract.errors import CheckpointError
from .fileio import safe_directory, safe_write_text
from .safetensors_io import read_safetensors, write_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
AWQ_SUFFIXES = ("qweight", "qzeros", "scales")
_MAX_LISTED = 5


@dataclass
class Checkpoint:
    config: Qwen2Config
    tensors: dict[str, np.ndarray]     # native dtype, except BF16 -> float32
    quantization_config: dict | None   # config.json's, e.g. {"quant_method": "awq", ...}
    path: Path
    has_tokenizer: bool

    @property
    def is_awq(self) -> bool:
        return is_awq(self.quantization_config)


def is_awq(quantization_config: dict | None) -> bool:
    return bool(quantization_config) and \
        str(quantization_config.get("quant_method", "")).lower() == "awq"


def expected_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor Qwen2ForCausalLM stores, with its shape, in HF naming."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for layer in range(config.num_hidden_layers):
        pre = f"model.layers.{layer}"
        shapes[f"{pre}.input_layernorm.weight"] = (h,)
        shapes[f"{pre}.post_attention_layernorm.weight"] = (h,)
        for name, shape in config.linear_shapes().items():
            shapes[f"{pre}.{name}.weight"] = shape
        shapes[f"{pre}.self_attn.q_proj.bias"] = (config.q_dim,)
        shapes[f"{pre}.self_attn.k_proj.bias"] = (config.kv_dim,)
        shapes[f"{pre}.self_attn.v_proj.bias"] = (config.kv_dim,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} is nested too deeply to be a model config") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _read_sharded(root: Path) -> dict[str, np.ndarray]:
    index_path = root / INDEX_FILE
    index = _read_json(index_path, "the shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map in the shard index")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    missing = [s for s in by_shard if not (root / s).is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: names shard file(s) that do not exist: "
                              f"{_listing(missing)}")
    tensors: dict[str, np.ndarray] = {}
    for shard, names in by_shard.items():
        shard_tensors = read_safetensors(root / shard)
        absent = [n for n in names if n not in shard_tensors]
        if absent:
            raise CheckpointError(f"{root / shard}: lacks tensor(s) the index places there: "
                                  f"{_listing(absent)}")
        tensors.update((n, shard_tensors[n]) for n in names)
    return tensors


def _read_weights(root: Path) -> dict[str, np.ndarray]:
    if (root / INDEX_FILE).is_file():
        return _read_sharded(root)
    if (root / SINGLE_FILE).is_file():
        return read_safetensors(root / SINGLE_FILE)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no model.safetensors, {INDEX_FILE} or other "
                              f"*.safetensors weights in the checkpoint directory")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        part = read_safetensors(file)
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise CheckpointError(f"{file}: repeats tensor(s) of another shard: {_listing(dup)}")
        tensors.update(part)
    return tensors


def validate_tensors(config: Qwen2Config, tensors: dict[str, np.ndarray],
                     quantization_config: dict | None = None, source: str = "checkpoint") -> None:
    """Raise CheckpointError unless tensors hold a complete Qwen2ForCausalLM.

    With AWQ, a layer linear may be stored as <name>.qweight/.qzeros/.scales
    instead of <name>.weight; their packing is the AWQ importer's to check.
    """
    awq = is_awq(quantization_config)
    missing, wrong = [], []
    for name, shape in expected_shapes(config).items():
        if awq and name.endswith("_proj.weight"):
            base = name[:-len(".weight")]
            packed = [f"{base}.{s}" for s in AWQ_SUFFIXES]
            if name not in tensors:
                missing += [p for p in packed if p not in tensors]
                continue
        if name not in tensors:
            missing.append(name)
        elif tuple(tensors[name].shape) != shape:
            wrong.append(f"{name} is {tuple(tensors[name].shape)}, expected {shape}")
        elif not np.issubdtype(tensors[name].dtype, np.floating):
            wrong.append(f"{name} has non-float dtype {tensors[name].dtype}")
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} expected tensor(s) for "
                              f"Qwen2ForCausalLM: {_listing(missing)}")
    if wrong:
        raise CheckpointError(f"{source}: tensor shape(s) do not match config.json: "
                              f"{_listing(wrong)}")
    if "lm_head.weight" in tensors and config.tie_word_embeddings:
        shape = tuple(tensors["lm_head.weight"].shape)
        if shape != (config.vocab_size, config.hidden_size):
            raise CheckpointError(f"{source}: lm_head.weight is {shape}, expected "
                                  f"{(config.vocab_size, config.hidden_size)}")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root}: is not a directory; pass the checkpoint directory")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{root}: no config.json in the checkpoint directory")
    raw = _read_json(config_path, "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: config.json is not a JSON object")
    config = Qwen2Config.from_hf_dict(raw, source=str(config_path))
    quantization_config = raw.get("quantization_config")
    tensors = _read_weights(root)
    validate_tensors(config, tensors, quantization_config, source=str(root))
    return Checkpoint(config=config, tensors=tensors, quantization_config=quantization_config,
                      path=root, has_tokenizer=(root / "tokenizer.json").is_file())


def _shards(tensors: dict[str, np.ndarray], bytes_of, shard_bytes: int) -> list[list[str]]:
    """Names split into consecutive runs of at most shard_bytes (one oversized
    tensor gets a shard of its own), in sorted order as HF writes them."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = bytes_of(tensors[name])
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_checkpoint(out_dir: str | os.PathLike, config: Qwen2Config,
                    tensors: dict[str, np.ndarray], bf16: bool = True,
                    shard_bytes: int | None = None, extra_config: dict | None = None) -> Path:
    """Write config.json and the weights (floats as BF16 unless bf16=False).

    With shard_bytes, the weights go to model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json. The files appear together or not at all
    (sw/fileio.py, safe_directory); weight files of an earlier save in out_dir
    are removed then, so a directory never mixes two saves.
    """
    out = Path(out_dir)
    with safe_directory(out, "checkpoint", replaces=(INDEX_FILE, SINGLE_FILE, "model-*-of-*.safetensors")) as d:
        _write_checkpoint(d, config, tensors, bf16, shard_bytes, extra_config)
    return out


def _write_checkpoint(out: Path, config: Qwen2Config, tensors: dict[str, np.ndarray], bf16: bool,
                      shard_bytes: int | None, extra_config: dict | None) -> None:
    hf = config.to_hf_dict()
    hf.update(extra_config or {})
    safe_write_text(out / "config.json", json.dumps(hf, indent=2) + "\n", "checkpoint config")

    def bytes_of(a: np.ndarray) -> int:
        floating = np.issubdtype(a.dtype, np.floating)
        return a.size * (2 if bf16 and floating else a.dtype.itemsize)

    if shard_bytes is None:
        write_safetensors(out / SINGLE_FILE, tensors, bf16=bf16)
        return
    shards = _shards(tensors, bytes_of, shard_bytes)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / file, {n: tensors[n] for n in names}, bf16=bf16)
        weight_map.update((n, file) for n in names)
    index = {"metadata": {"total_size": sum(bytes_of(a) for a in tensors.values())},
             "weight_map": weight_map}
    safe_write_text(out / INDEX_FILE, json.dumps(index, indent=2) + "\n", "checkpoint index")
