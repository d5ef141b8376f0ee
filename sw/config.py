"""Qwen2 model configuration: parsing, validation and the synthetic presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .contract.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("qwen2",)

# Upper bounds far above any published Qwen2 (72B: hidden 8192, 80 layers, vocab 152k), so that a
# damaged or hostile config is refused before anything is sized from it.
_LIMITS = {"hidden_size": 65_536, "intermediate_size": 262_144, "num_hidden_layers": 1_024,
           "num_attention_heads": 1_024, "num_key_value_heads": 1_024, "vocab_size": 4_194_304,
           "max_position_embeddings": 16_777_216}
_KIND_NAMES = {dict: "JSON object", bool: "true or false", str: "string"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Qwen2Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every linear in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (self.q_dim, h),
            "self_attn.k_proj": (self.kv_dim, h),
            "self_attn.v_proj": (self.kv_dim, h),
            "self_attn.o_proj": (h, self.q_dim),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    def linear_names(self) -> list[str]:
        """Every quantizable linear, in execution order; the LM head last."""
        names = [f"model.layers.{l}.{n}" for l in range(self.num_hidden_layers)
                 for n in self.linear_shapes()]
        return names + ["lm_head"]

    def linear_shape(self, linear: str) -> tuple[int, int] | None:
        """(out, in) of `linear`, or None if this model has no linear of that name."""
        if linear == "lm_head":
            return (self.vocab_size, self.hidden_size)
        parts = linear.split(".", 3)
        if (len(parts) != 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit()
                or int(parts[2]) >= self.num_hidden_layers or str(int(parts[2])) != parts[2]):
            return None
        return self.linear_shapes().get(parts[3])

    def has_bias(self, linear: str) -> bool:
        """Qwen2 has a bias on the q, k and v projections and on no other linear."""
        return linear.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")

    def shape_of(self, linear: str) -> tuple[int, int]:
        if linear == "lm_head":
            return (self.vocab_size, self.hidden_size)
        return self.linear_shapes()[linear.split(".", 3)[3]]

    def num_parameters(self) -> int:
        per_layer = sum(o * i for o, i in self.linear_shapes().values())
        per_layer += 2 * self.kv_dim + self.q_dim + 2 * self.hidden_size  # biases, norms
        emb = self.vocab_size * self.hidden_size
        return (per_layer * self.num_hidden_layers + self.hidden_size + emb
                + (0 if self.tie_word_embeddings else emb))

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                 torch_dtype="bfloat16", use_sliding_window=False,
                 attention_dropout=0.0, initializer_range=0.02,
                 bos_token_id=None, eos_token_id=None, use_cache=True)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "Qwen2Config":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the model config must be a JSON object, got {type(d).__name__}")
        archs = d.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: architectures must be a list of names, got {archs!r}")
        mtype = d.get("model_type")
        if mtype not in SUPPORTED_MODEL_TYPES and not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise ConfigError(
                f"{source}: unsupported architecture {archs or mtype!r}; "
                f"kriallm supports {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'qwen2')")
        required = ["hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size"]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        for key, kind in (("quantization_config", dict), ("use_sliding_window", bool),
                          ("tie_word_embeddings", bool), ("hidden_act", str)):
            if d.get(key) is not None and not isinstance(d[key], kind):
                raise ConfigError(f"{source}: {key} must be a {_KIND_NAMES[kind]}, got {d[key]!r}")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and d[f.name] is not None}
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        act = kw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: sliding-window attention is not supported")
        cfg = cls(**kw)
        cfg.validate(source)
        head_dim = d.get("head_dim")
        if head_dim is not None and (not _is_int(head_dim) or head_dim * cfg.num_attention_heads != cfg.hidden_size):
            raise ConfigError(f"{source}: head_dim {head_dim!r} times num_attention_heads must equal hidden_size")
        return cfg

    def validate(self, source: str = "config") -> None:
        ints = ["hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size"]
        for k in ints + ["max_position_embeddings"]:
            v = getattr(self, k)
            if not _is_int(v) or not 0 < v <= _LIMITS[k]:
                raise ConfigError(f"{source}: {k} must be an integer from 1 to {_LIMITS[k]}, got {v!r}")
        for k, hi in (("rope_theta", 1e12), ("rms_norm_eps", 0.1)):
            v = getattr(self, k)
            if not _is_real(v) or not 0 < v <= hi:
                raise ConfigError(f"{source}: {k} must be a finite number above 0 and at most {hi:g}, got {v!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"{source}: tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads {self.num_attention_heads} is not a "
                              f"multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim {self.head_dim} must be even for RoPE")


# Real architectures of the published models; `tiny` keeps every structural
# feature (GQA, biases, tied head) at a size that runs in seconds.
PRESETS: dict[str, Qwen2Config] = {
    "tiny": Qwen2Config(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                        max_position_embeddings=2048),
    "qwen2.5-0.5b": Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
}


def preset(name: str) -> Qwen2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}") from None
