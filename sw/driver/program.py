"""The fabric decoder's command list: one start per token (issue 11, step 3).

:class:`FabricProgram` plans every buffer the whole-decoder list uses and
writes the list for T token rows: EMBED, then per layer 18 commands (norm
into the activation buffer, q/k/v, RoPE of q into its per-head activation
buffer, RoPE of k, KV stores, attention, quantize, o_proj, residual, norm,
gate/up, SiLU x up into its activation buffer, down, residual), then the final
norm and the LM head with the ARGMAX flag. The norms, the RoPE of q and SiLU x
up quantize their results themselves (flag QUANT_OUT); with ``fuse_quant=False``
each writes fp32 rows and a QUANT follows (22 commands per layer), the same
bytes in every activation buffer. Positions come from RUN_POS, so the same list serves every decode step;
the host writes RUN_POS (and RUN_TOKEN for one token), starts, waits and reads
RESULT_INDEX. The arithmetic each op stands for is sw/fabric.py's FabricRunner,
op for op, which is what makes the golden device's results bit-identical to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract.commands import (Flags, HardwareLimits, LinearCommand, activation_layout, align_up, linear_command,
                                 output_layout)
from ..contract.errors import ConfigError
from ..contract.fabric_commands import (FabricCommand, FabricFlags, HEAD_DIMS, Opcode, embed_table_bytes,
                                        kv_cache_layout, rope_table_layout, row_stride)
from ..contract.fabric_ops import rms_constants

# Per-layer op ids in the tag's low byte (the layer is tag >> 8): for logs and per-op cycle reports.
OP_IDS = ("norm_in", "quant_in", "q_proj", "k_proj", "v_proj", "rope_q", "rope_k", "store_k", "store_v",
          "quant_q", "attend", "quant_att", "o_proj", "add_att", "norm_post", "quant_post", "gate_proj",
          "up_proj", "silu_mul", "quant_mlp", "down_proj", "add_mlp")
FINAL_LAYER = 0xFFFF       # tag layer of the EMBED and the final norm / LM head
FUSE_QUANT = True          # the lists' default: producers quantize their results (flag QUANT_OUT)


def _bits(x) -> int:
    return int(np.float32(x).view("<u4"))


@dataclass(frozen=True)
class LinearAddr:
    weight: int
    bias: int | None
    int8: bool


class FabricProgram:
    """Buffer plan and command lists of the fabric decoder for one model on one design.

    cfg: the model's Qwen2Config; limits: the design's HardwareLimits (max_context > 0);
    capacity: KV-cache positions to allocate (at most limits.max_context).
    """

    def __init__(self, cfg, limits: HardwareLimits, capacity: int | None = None, *, fuse_quant: bool = FUSE_QUANT):
        if not limits.fabric_ops:
            raise ConfigError("the design has no fabric decoder (HW_PARAMS3.max_context is 0): it runs the "
                              "linear layers only; use --split hybrid")
        hd = cfg.head_dim
        if hd not in HEAD_DIMS:
            raise ConfigError(f"head_dim {hd} is not one the attention unit takes ({', '.join(map(str, HEAD_DIMS))})")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        rep_ = cfg.num_attention_heads // cfg.num_key_value_heads
        longest = max(cfg.hidden_size, cfg.intermediate_size, cfg.q_dim)
        if limits.head_dim and hd != limits.head_dim:
            raise ConfigError(f"the design's attention unit is built for head_dim {limits.head_dim} (HW_PARAMS4); "
                              f"this model has head_dim {hd}")
        if limits.kv_group and rep_ > limits.kv_group:
            raise ConfigError(f"the design's attention unit takes at most {limits.kv_group} query heads per KV head "
                              f"(HW_PARAMS4); this model has {rep_}")
        if limits.max_row and longest > limits.max_row:
            raise ConfigError(f"the design's fabric ops take rows of at most {limits.max_row} elements (HW_PARAMS4); "
                              f"this model needs {longest}")
        cap = limits.max_context if capacity is None else capacity
        if not 0 < cap <= limits.max_context:
            raise ConfigError(f"KV cache capacity {cap} must be 1..{limits.max_context} (the design's max_context)")
        self.cfg, self.limits, self.capacity = cfg, limits, cap
        self.fuse_quant = fuse_quant
        self.T = limits.tokens
        R, G, T = limits.tile_rows, limits.group_size, self.T
        h, i, q, kv, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim, cfg.vocab_size
        for name, n in (("hidden_size", h), ("intermediate_size", i)):
            if n % G:
                raise ConfigError(f"{name} {n} is not a multiple of the design's group size {G}")
        self.kv_layout = kv_cache_layout(cfg.num_key_value_heads, hd, cap)
        self.rope_layout = rope_table_layout(hd, cap)
        out = lambda n: output_layout(n, T, R).total_bytes          # noqa: E731
        act = lambda n, g: activation_layout(n, g, T).total_bytes   # noqa: E731
        rows = lambda n: T * row_stride(n)                          # noqa: E731
        sizes = {
            "ids": align_up(4 * T), "h": rows(h), "xn": rows(h), "act_h": act(h, G),
            "q": out(q), "k": out(kv), "v": out(kv), "q_act": act(q, hd), "att": rows(q), "act_att": act(q, G),
            "o": out(h), "gate": out(i), "up": out(i), "mlp": rows(i), "act_mlp": act(i, G), "down": out(h),
            "act_last": act(h, G), "logits": out(vocab),
            "embed": embed_table_bytes(vocab, h), "rope": self.rope_layout.total_bytes,
            "norms": (2 * cfg.num_hidden_layers + 1) * row_stride(h),
        }
        for layer in range(cfg.num_hidden_layers):
            sizes[f"kv{layer}"] = self.kv_layout.total_bytes
        self.sizes = sizes

    # ---- where the tables go ------------------------------------------------------------------
    def norm_offset(self, name: str) -> int:
        """Offset of a norm's gamma in the "norms" buffer (name: model.layers.L.input_layernorm.weight, ...)."""
        stride = row_stride(self.cfg.hidden_size)
        if name == "model.norm.weight":
            return 2 * self.cfg.num_hidden_layers * stride
        parts = name.split(".")
        layer, which = int(parts[2]), parts[3]
        return (2 * layer + (which == "post_attention_layernorm")) * stride

    # ---- the list ---------------------------------------------------------------------------------
    def commands(self, addr: dict[str, int], linears: dict[str, LinearAddr], tokens: int, *,
                 token_reg: bool = False, all_logits: bool = False) -> list[LinearCommand | FabricCommand]:
        """The list for `tokens` rows. addr: bus address of every buffer in `sizes`; linears: the
        packed weights. token_reg: EMBED reads RUN_TOKEN (tokens must be 1). all_logits: the LM head
        runs on every row (eval); otherwise on the last row only, with ARGMAX."""
        cfg, lim = self.cfg, self.limits
        T = tokens
        if not 1 <= T <= self.T:
            raise ConfigError(f"a fabric run takes 1..{self.T} token rows, got {T}")
        R, G, hd = lim.tile_rows, lim.group_size, cfg.head_dim
        h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
        nkv, cap = cfg.num_key_value_heads, self.capacity
        sh, si, sq = row_stride(h), row_stride(i), row_stride(q)
        so = lambda n: output_layout(n, T, R).stride     # noqa: E731
        inv_n, eps = rms_constants(h, cfg.rms_norm_eps)
        norms = addr["norms"]
        cmds: list = []

        def F(op, n, tag, **kw):
            cmds.append(FabricCommand(opcode=int(op), n=n, tokens=kw.pop("tokens", T), tag=tag, **kw))

        fuse = self.fuse_quant
        QOUT = int(FabricFlags.QUANT_OUT)

        def norm(n, tag, src, gamma, act, quant_tag, tokens=T):
            """RMSNORM of `tokens` rows at src into the activation buffer `act` (group G): with
            QUANT_OUT in one command, or through xn and a QUANT."""
            kw = dict(tokens=tokens, src0=src, src1=norms + self.norm_offset(gamma), src_stride=sh,
                      p0=_bits(inv_n), p1=_bits(eps))
            if fuse:
                F(Opcode.RMSNORM, n, tag, dst=addr[act], aux=G, flags=QOUT, **kw)
            else:
                F(Opcode.RMSNORM, n, tag, dst=addr["xn"], dst_stride=sh, **kw)
                F(Opcode.QUANT, n, quant_tag, tokens=tokens, src0=addr["xn"], dst=addr[act], src_stride=sh, aux=G)

        def L(name, act_addr, out_addr, n, k, tag, tokens=T, flags_argmax=False):
            la = linears[name]
            c = linear_command(n=n, k=k, group_size=G, tokens=tokens, tile_rows=R, weight_addr=la.weight,
                               act_addr=act_addr, out_addr=out_addr, bias_addr=la.bias, weight_int8=la.int8,
                               tag=tag)
            if flags_argmax:
                c = c.replace(flags=c.flags | int(Flags.ARGMAX))
            cmds.append(c)

        F(Opcode.EMBED, h, FINAL_LAYER << 8, src0=0 if token_reg else addr["ids"], src1=addr["embed"],
          dst=addr["h"], dst_stride=sh, p0=cfg.vocab_size, flags=int(FabricFlags.TOKEN_REG) if token_reg else 0)
        for layer in range(cfg.num_hidden_layers):
            pre = f"model.layers.{layer}"
            tag = {op: (layer << 8) | k for k, op in enumerate(OP_IDS)}
            cache = addr[f"kv{layer}"]
            norm(h, tag["norm_in"], addr["h"], f"{pre}.input_layernorm.weight", "act_h", tag["quant_in"])
            L(f"{pre}.self_attn.q_proj", addr["act_h"], addr["q"], q, h, tag["q_proj"])
            L(f"{pre}.self_attn.k_proj", addr["act_h"], addr["k"], kv, h, tag["k_proj"])
            L(f"{pre}.self_attn.v_proj", addr["act_h"], addr["v"], kv, h, tag["v_proj"])
            if fuse:
                F(Opcode.ROPE, q, tag["rope_q"], src0=addr["q"], src1=addr["rope"], dst=addr["q_act"],
                  src_stride=so(q), aux=hd, p0=cap, flags=QOUT)
            else:
                F(Opcode.ROPE, q, tag["rope_q"], src0=addr["q"], src1=addr["rope"], dst=addr["q"], src_stride=so(q),
                  dst_stride=so(q), aux=hd, p0=cap)
            F(Opcode.ROPE, kv, tag["rope_k"], src0=addr["k"], src1=addr["rope"], dst=addr["k"],
              src_stride=so(kv), dst_stride=so(kv), aux=hd, p0=cap)
            F(Opcode.KV_STORE, kv, tag["store_k"], src0=addr["k"], dst=cache, src_stride=so(kv), aux=hd,
              p0=cap, p1=nkv)
            F(Opcode.KV_STORE, kv, tag["store_v"], src0=addr["v"], dst=cache, src_stride=so(kv), aux=hd,
              p0=cap, p1=nkv, flags=int(FabricFlags.VALUE))
            if not fuse:
                F(Opcode.QUANT, q, tag["quant_q"], src0=addr["q"], dst=addr["q_act"], src_stride=so(q), aux=hd)
            F(Opcode.ATTEND, q, tag["attend"], src0=addr["q_act"], src1=cache, dst=addr["att"], dst_stride=sq,
              aux=hd, p0=cap, p1=nkv)
            F(Opcode.QUANT, q, tag["quant_att"], src0=addr["att"], dst=addr["act_att"], src_stride=sq, aux=G)
            L(f"{pre}.self_attn.o_proj", addr["act_att"], addr["o"], h, q, tag["o_proj"])
            F(Opcode.ADD, h, tag["add_att"], src0=addr["h"], src1=addr["o"], dst=addr["h"], src_stride=sh,
              dst_stride=sh, p0=so(h))
            norm(h, tag["norm_post"], addr["h"], f"{pre}.post_attention_layernorm.weight", "act_h",
                 tag["quant_post"])
            L(f"{pre}.mlp.gate_proj", addr["act_h"], addr["gate"], i, h, tag["gate_proj"])
            L(f"{pre}.mlp.up_proj", addr["act_h"], addr["up"], i, h, tag["up_proj"])
            if fuse:
                F(Opcode.SILU_MUL, i, tag["silu_mul"], src0=addr["gate"], src1=addr["up"], dst=addr["act_mlp"],
                  src_stride=so(i), p0=so(i), aux=G, flags=QOUT)
            else:
                F(Opcode.SILU_MUL, i, tag["silu_mul"], src0=addr["gate"], src1=addr["up"], dst=addr["mlp"],
                  src_stride=so(i), dst_stride=si, p0=so(i))
                F(Opcode.QUANT, i, tag["quant_mlp"], src0=addr["mlp"], dst=addr["act_mlp"], src_stride=si, aux=G)
            L(f"{pre}.mlp.down_proj", addr["act_mlp"], addr["down"], h, i, tag["down_proj"])
            F(Opcode.ADD, h, tag["add_mlp"], src0=addr["h"], src1=addr["down"], dst=addr["h"], src_stride=sh,
              dst_stride=sh, p0=so(h))
        # final norm and LM head: every row (eval), or only the last row (generation)
        rows = T if all_logits else 1
        first = addr["h"] + (0 if all_logits else (T - 1) * sh)
        tag = FINAL_LAYER << 8
        norm(h, tag | 1, first, "model.norm.weight", "act_last", tag | 2, tokens=rows)
        L("lm_head", addr["act_last"], addr["logits"], cfg.vocab_size, h, tag | 3, tokens=rows,
          flags_argmax=True)
        return cmds

    @property
    def head_commands(self) -> int:
        """The list's tail: the final RMSNORM (with QUANT_OUT, or then a QUANT) and the LM head; a prefix
        without them is a valid list."""
        return 2 if self.fuse_quant else 3

    @property
    def commands_per_token_list(self) -> int:
        per_layer = 18 if self.fuse_quant else 22
        return 1 + per_layer * self.cfg.num_hidden_layers + self.head_commands
