"""Qwen2 model configuration: parsing, validation and the synthetic presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .contract.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("qwen2",)


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
        archs = d.get("architectures") or []
        mtype = d.get("model_type")
        if mtype not in SUPPORTED_MODEL_TYPES and not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise ConfigError(
                f"{source}: unsupported architecture {archs or mtype!r}; "
                f"kriallm supports {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'qwen2')")
        required = ["hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and d[f.name] is not None}
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        act = kw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: sliding-window attention is not supported")
        if "head_dim" in d and d["head_dim"] * d["num_attention_heads"] != d["hidden_size"]:
            raise ConfigError(f"{source}: head_dim * num_attention_heads must equal hidden_size")
        try:
            cfg = cls(**kw)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        ints = ["hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size"]
        for k in ints:
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{source}: {k} must be a positive integer, got {v!r}")
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
