"""Calibration tokens for AWQ: from a token file, a text file, or synthetic.

Sources, in the order they are tried for a path:

* ``*.npy``: an integer array of token ids (any shape; flattened);
* a text file whose contents are only integers separated by whitespace or
  commas: token ids;
* any other text file: UTF-8 text, encoded with the model's tokenizer.json
  (the ``tokenizers`` library).

Without a source the tokens are a synthetic Zipf stream (see
:func:`synthetic_tokens` and docs/quantization.md for why).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .config import Qwen2Config
from .contract.errors import ConfigError

MIN_TOKENS = 16
ZIPF_EXPONENT = 1.1
# Zipf-Mandelbrot offset: flattens the head so the first few ids do not take
# half of the stream.
ZIPF_OFFSET = 2.7

_ID_TEXT = re.compile(r"^[\s,]*-?\d+([\s,]+-?\d+)*[\s,]*$")


class CalibTokens(np.ndarray):
    """An int32 token array that remembers where it came from (``description``)."""

    description: str = "token array"

    def __array_finalize__(self, obj):
        self.description = getattr(obj, "description", "token array")


def _tagged(ids: np.ndarray, description: str) -> CalibTokens:
    out = np.ascontiguousarray(ids, dtype=np.int32).view(CalibTokens)
    out.description = description
    return out


def _check_ids(ids: np.ndarray, config: Qwen2Config, source: str) -> np.ndarray:
    if ids.size == 0:
        raise ConfigError(f"{source}: contains no token ids")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ConfigError(f"{source}: token ids must be in 0..{config.vocab_size - 1} "
                          f"(the model's vocabulary), found {lo}..{hi}")
    return ids.astype(np.int32)


def read_token_file(path: str | os.PathLike, config: Qwen2Config) -> np.ndarray:
    """Token ids from a .npy integer array or a text file of integers (whitespace
    or comma separated). Raises ConfigError for anything else."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: token file does not exist")
    if p.suffix == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{p}: not a readable .npy array ({e})") from None
        if a.dtype.kind not in "iu":
            raise ConfigError(f"{p}: token array must have an integer dtype, got {a.dtype}")
        return _check_ids(a.reshape(-1), config, str(p))
    text = _read_text(p)
    if not _ID_TEXT.match(text):
        raise ConfigError(f"{p}: expected token ids (integers separated by whitespace or commas)")
    ids = np.array([int(t) for t in re.split(r"[\s,]+", text.strip()) if t], dtype=np.int64)
    return _check_ids(ids, config, str(p))


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: neither a .npy array nor UTF-8 text") from None


def _load_tokenizer(tokenizer, source: Path):
    if tokenizer is None:
        raise ConfigError(f"{source} is a text file; encoding it needs the model's tokenizer.json "
                          "(pass the tokenizer, or give token ids as .npy / integer text instead)")
    if hasattr(tokenizer, "encode"):
        return tokenizer
    tp = Path(tokenizer)
    if tp.is_dir():
        tp = tp / "tokenizer.json"
    if not tp.is_file():
        raise ConfigError(f"{tp}: tokenizer.json not found; needed to encode {source}")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("encoding calibration text needs the 'tokenizers' package "
                          "(pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(str(tp))
    except Exception as e:  # the library raises a bare Exception on bad JSON
        raise ConfigError(f"{tp}: cannot load tokenizer ({e})") from None


def synthetic_tokens(config: Qwen2Config, n_tokens: int, seed: int = 0) -> np.ndarray:
    """A Zipf-Mandelbrot token stream: P(id) ~ 1 / (id + 1 + 2.7)^1.1.

    Byte-level BPE vocabularies (Qwen's included) are ordered by merge rank,
    so low ids are the frequent pieces; a Zipf law over the id gives a stream
    with the head-heavy statistics of text without any dataset.
    """
    rank = np.arange(config.vocab_size, dtype=np.float64) + 1.0
    p = (rank + ZIPF_OFFSET) ** -ZIPF_EXPONENT
    p /= p.sum()
    rng = np.random.default_rng(seed)
    return rng.choice(config.vocab_size, size=n_tokens, p=p).astype(np.int32)


def calibration_tokens(source: str | os.PathLike | None, config: Qwen2Config, n_tokens: int = 512,
                       seed: int = 0, tokenizer=None) -> CalibTokens:
    """``n_tokens`` calibration token ids (int32, 1-D, one sequence).

    source: a token file (.npy / integer text), a UTF-8 text file (needs
    ``tokenizer``: a ``tokenizers.Tokenizer``, a tokenizer.json path or the
    model directory), or None for the synthetic stream. A longer source is cut
    to a window of ``n_tokens`` starting at a seeded random offset; a shorter
    one is used whole (at least 16 tokens).
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) \
            or n_tokens < MIN_TOKENS:
        raise ConfigError(f"calibration needs at least {MIN_TOKENS} tokens, got {n_tokens!r}")
    n_tokens = min(int(n_tokens), config.max_position_embeddings)
    if source is None:
        return _tagged(synthetic_tokens(config, n_tokens, seed),
                       f"synthetic Zipf token stream ({n_tokens} tokens, seed {seed})")
    p = Path(source)
    if not p.is_file():
        raise ConfigError(f"{p}: calibration file does not exist")
    if p.suffix == ".npy" or _ID_TEXT.match(_read_text(p)):
        ids, kind = read_token_file(p, config), "token file"
    else:
        tok = _load_tokenizer(tokenizer, p)
        ids = np.asarray(tok.encode(_read_text(p)).ids, dtype=np.int64)
        ids, kind = _check_ids(ids, config, str(p)), "text file"
    if ids.size < MIN_TOKENS:
        raise ConfigError(f"{p}: has {ids.size} tokens; calibration needs at least {MIN_TOKENS}")
    start = 0
    if ids.size > n_tokens:
        start = int(np.random.default_rng(seed).integers(0, ids.size - n_tokens + 1))
        ids = ids[start:start + n_tokens]
    return _tagged(ids, f"{kind} {p.name}: {ids.size} tokens from offset {start}")
