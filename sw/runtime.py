"""Open a model on a device, generate tokens, evaluate perplexity.

Devices: `reference` (the float model, from a checkpoint directory) and
`golden` (the quantized golden model: the accelerator's arithmetic in NumPy,
from a .kq file, an AutoAWQ checkpoint, or a float checkpoint quantized on
the fly).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .contract.errors import ConfigError, KriaError

DEVICES = ("reference", "golden")


@dataclass
class OpenModel:
    config: object
    runner: object          # reference.Qwen2Runner
    device: str
    source: Path
    tokenizer: object | None = None
    quant: dict | None = None

    def new_cache(self):
        return self.runner.new_cache()

    def forward(self, ids, cache) -> np.ndarray:
        return self.runner.forward(np.asarray(ids, dtype=np.int64), cache)


def _tokenizer_from(path: Path | None, blob: bytes | None):
    from tokenizers import Tokenizer
    if blob:
        return Tokenizer.from_str(blob.decode())
    if path is not None and (path / "tokenizer.json").exists():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    return None


def is_kq(path: Path) -> bool:
    return path.is_file()


def open_model(path: str | Path, device: str = "golden", *, quantize_args: dict | None = None,
               progress: bool = True) -> OpenModel:
    """MODEL is a checkpoint directory or a .kq file; see the module docstring."""
    from .reference import Qwen2Runner, reference_linears
    path = Path(path)
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r} here; choose from {', '.join(DEVICES)}")
    if not path.exists():
        raise KriaError(f"{path}: no such file or directory")
    if is_kq(path):
        if device == "reference":
            raise ConfigError(f"{path} is a quantized .kq file; the float reference needs the "
                              f"checkpoint directory it came from")
        from .kq import load_kq
        qm = load_kq(path)
        qm.prepare(progress)
        return OpenModel(qm.config, Qwen2Runner(qm.config, qm.params, qm.linear_fn()), device, path,
                         _tokenizer_from(None, qm.tokenizer_json), qm.quant)
    from .checkpoint import load_checkpoint
    ckpt = load_checkpoint(path)
    tok = _tokenizer_from(path, None)
    from .awq_import import is_awq_checkpoint
    if is_awq_checkpoint(ckpt):
        if device == "reference":
            raise ConfigError(f"{path} is an AWQ-quantized checkpoint; it has no float weights for "
                              f"the reference device")
        from .awq_import import import_awq
        qm = import_awq(ckpt)
        return OpenModel(qm.config, Qwen2Runner(qm.config, qm.params, qm.linear_fn()), device, path, tok, qm.quant)
    if device == "reference":
        params = {k: np.asarray(v, np.float32) for k, v in ckpt.tensors.items()
                  if not k.endswith("_proj.weight") and not k.endswith("_proj.bias") and k != "lm_head.weight"}
        return OpenModel(ckpt.config, Qwen2Runner(ckpt.config, params, reference_linears(ckpt.config, ckpt.tensors)),
                         device, path, tok)
    from .quant import quantize_model
    qm = quantize_model(ckpt.config, ckpt.tensors, progress=progress, **(quantize_args or {}))
    return OpenModel(qm.config, Qwen2Runner(qm.config, qm.params, qm.linear_fn()), device, path, tok, qm.quant)


def encode_prompt(model: OpenModel, text: str | None, ids: list[int] | None) -> list[int]:
    if ids is not None:
        bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
        if bad:
            raise ConfigError(f"prompt id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
        if not ids:
            raise ConfigError("--prompt-ids is empty")
        return list(ids)
    if model.tokenizer is None:
        raise ConfigError(f"{model.source} has no tokenizer.json, so only --prompt-ids works")
    out = model.tokenizer.encode(text).ids
    if not out:
        raise ConfigError("the prompt encodes to zero tokens")
    return out


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        t = sum(self.decode_s)
        return len(self.decode_s) / t if t > 0 else float("nan")


def generate(model: OpenModel, prompt_ids: list[int], max_new_tokens: int, sampler, *,
             keep_logits: bool = False, eos_id: int | None = None) -> Generation:
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    gen = Generation(list(prompt_ids))
    cache = model.new_cache()
    cap = getattr(cache, "max_length", None)        # a fixed-size cache (the fabric's, in DDR)
    if cap is not None and len(prompt_ids) + max_new_tokens - 1 > cap:
        raise ConfigError(f"{len(prompt_ids)} prompt tokens and {max_new_tokens} new ones need a context of "
                          f"{len(prompt_ids) + max_new_tokens - 1} positions, more than the {cap} the KV cache "
                          f"holds; shorten the prompt or --max-new-tokens (or raise --context, up to the "
                          f"design's max_context)")
    greedy = getattr(model, "forward_greedy", None)
    if greedy is not None and not keep_logits and getattr(sampler, "params", None) is not None \
            and sampler.params.temperature == 0.0:
        # the device's argmax (the first index of the largest logit, as the sampler's): no logits move
        t0 = time.perf_counter()
        nxt = greedy(prompt_ids, cache)
        gen.prefill_s = time.perf_counter() - t0
        for step in range(max_new_tokens):
            gen.new_ids.append(nxt)
            if nxt == eos_id or step == max_new_tokens - 1:
                break
            t0 = time.perf_counter()
            nxt = greedy([nxt], cache)
            gen.decode_s.append(time.perf_counter() - t0)
        return gen
    t0 = time.perf_counter()
    logits = model.forward(prompt_ids, cache)[-1]
    gen.prefill_s = time.perf_counter() - t0
    for step in range(max_new_tokens):
        if keep_logits:
            gen.logits.append(logits.copy())
        nxt = sampler(logits)
        gen.new_ids.append(nxt)
        if nxt == eos_id or step == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        logits = model.forward([nxt], cache)[-1]
        gen.decode_s.append(time.perf_counter() - t0)
    return gen


def sample_tokens(model: OpenModel, n_tokens: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
    """A token sequence the model itself finds plausible: evaluation text for synthetic models."""
    from .sampling import Sampler, SamplingParams
    rng = np.random.default_rng(seed)
    start = [int(rng.integers(0, model.config.vocab_size))]
    gen = generate(model, start, n_tokens - 1, Sampler(SamplingParams(temperature=temperature, seed=seed)))
    return np.array(start + gen.new_ids, np.int64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def sequence_logits(model: OpenModel, ids: np.ndarray, window: int) -> np.ndarray:
    """Logits for every position of `ids`, in independent windows of `window` tokens."""
    out = []
    for s in range(0, len(ids), window):
        chunk = ids[s:s + window]
        out.append(model.forward(chunk, model.new_cache()))
    return np.concatenate(out, axis=0)


def compare_logits(test: np.ndarray, ref: np.ndarray, targets: np.ndarray | None) -> dict:
    """Perplexity of both on next-token targets, top-1 agreement and mean KL(ref || test)."""
    lt, lr = log_softmax(test), log_softmax(ref)
    res = {
        "positions": int(test.shape[0]),
        "top1_agreement": float(np.mean(test.argmax(-1) == ref.argmax(-1))),
        "kl_ref_test": float(np.mean(np.sum(np.exp(lr) * (lr - lt), axis=-1))),
    }
    if targets is not None:
        n = len(targets)
        res["perplexity"] = float(np.exp(-np.mean(lt[np.arange(n), targets])))
        res["perplexity_reference"] = float(np.exp(-np.mean(lr[np.arange(n), targets])))
    return res
