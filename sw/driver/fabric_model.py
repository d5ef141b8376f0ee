"""The fabric split: the whole decoder on the accelerator, one start per token (issue 11).

:class:`FabricModel` loads a .kq onto a Device whose design has the fabric
decoder (HW_PARAMS3.max_context > 0): the packed weights, the bf16 embedding
table, the RMSNorm weights, the RoPE table (computed once here, the host's
only arithmetic besides sampling) and one KV cache per layer. The command list
(sw/driver/program.py) is written once per token-row count. Then per step:

* decode (one token): write RUN_POS and RUN_TOKEN, start, wait, read
  RESULT_INDEX (greedy) or the logits buffer (other sampling);
* prefill: the prompt's ids into the ids buffer, RUN_POS, one start per chunk
  of up to T tokens (the design's token lanes), causal attention inside it.

The host does no arithmetic on activations. The hybrid split of the paper is
:class:`sw.driver.runner.AcceleratedModel` (``--split hybrid``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contract.commands import ALIGN, WEIGHT_KIND_INT4, WEIGHT_KIND_INT8, output_layout
from ..contract.errors import ConfigError, DeviceError
from ..contract.fabric_commands import pack_any_list
from ..contract import fabric_ops as fo
from .device import Device, ExpectedHardware, check_model
from .program import FUSE_QUANT, FabricProgram, LinearAddr
from .runner import StepTiming, load_tokenizer, upload_linear

F32 = np.float32


@dataclass
class FabricCache:
    """The host's view of the device-resident KV cache: how many positions are filled."""
    capacity: int
    length: int = 0

    @property
    def max_length(self) -> int:
        """The most positions this cache can hold (it never grows: it lives in the device's DDR)."""
        return self.capacity


class FabricModel:
    """A .kq model on a Device with the fabric decoder; a drop-in for sw.runtime.OpenModel (forward,
    new_cache, config, tokenizer, source, quant, device) plus :meth:`forward_greedy`.

    capacity: KV-cache positions to allocate (default: the design's max_context).
    last_logits_only: forward() of several tokens returns the last position's logits only.
    """

    split = "fabric"

    def __init__(self, kq_path, device: Device, *, expected: ExpectedHardware | None = None,
                 timeout_s: float = 5.0, capacity: int | None = None, last_logits_only: bool = False,
                 fuse_quant: bool = FUSE_QUANT):
        from ..kq import KqFile
        self.source = Path(kq_path)
        self.dev = device
        self.device = device.name
        self.timeout_s = timeout_s
        self.last_logits_only = last_logits_only
        self.ident = device.check_identity(expected)
        kq = KqFile(kq_path)
        try:
            check_model(kq, self.ident)
            self.kq = kq
            self.config = cfg = kq.config
            self.quant = kq.quant
            self.limits = lim = self.ident.limits
            if not lim.fabric_ops:
                raise DeviceError(f"the loaded {device.name} design ({self.ident.describe()}) has no fabric decoder "
                                  f"(HW_PARAMS3.max_context is 0): it runs the linear layers only; use --split hybrid")
            self.tokens_max = lim.tokens
            self.tokenizer = load_tokenizer(kq)
            self.program = FabricProgram(cfg, lim, capacity, fuse_quant=fuse_quant)
            self.capacity = self.program.capacity
            self.timings: list[StepTiming] = []
            self.host_linears: list[str] = []
            self._lists: dict[tuple, tuple[int, int]] = {}
            self._load(kq)
        except BaseException:
            kq.close()
            raise

    # ---- loading ---------------------------------------------------------------------------------
    def _load(self, kq) -> None:
        cfg, dev, lim = self.config, self.dev, self.limits
        r, g = lim.tile_rows, lim.group_size
        need = sum(self.program.sizes.values()) + sum(
            -(-kq.entries[(n, "packed")]["nbytes"] // ALIGN) * ALIGN for n in cfg.linear_names()
            if (n, "packed") in kq.entries)
        cap = getattr(dev, "capacity", None)
        if cap is not None and need > cap:
            raise DeviceError(f"{self.source.name} with a {self.capacity}-position KV cache needs "
                              f"{need / 2**20:.1f} MiB of DMA memory but the {dev.name} device has "
                              f"{cap / 2**20:.1f} MiB; give the DMA buffer more room or a smaller --context")
        self.linears: dict[str, LinearAddr] = {}
        self.weight_bytes_per_token = 0
        for name in cfg.linear_names():
            packed = kq.entries.get((name, "packed"))
            kind = (packed or kq.entries.get((name, "weight")) or {}).get("kind", "?")
            if packed is None or not lim.weight_kinds & (WEIGHT_KIND_INT8 if kind == "int8" else WEIGHT_KIND_INT4):
                raise DeviceError(f"{self.source.name}: linear {name} is {kind}, which the fabric decoder cannot "
                                  f"execute (quantize the LM head to int4 or int8, or use --split hybrid)")
            weight, bias, layout = upload_linear(dev, kq, name, r, g, self.source.name)
            self.linears[name] = LinearAddr(weight, bias, layout.bits == 8)
            self.weight_bytes_per_token += packed["nbytes"]
        self.buffers = {name: dev.alloc(size, f"fab.{name}") for name, size in self.program.sizes.items()}
        params = {t["name"]: t for t in kq.header["tensors"] if t["role"] == "param"}
        emb = params["model.embed_tokens.weight"]
        table = np.asarray(kq.array(emb))
        if emb["dtype"] != "bf16":
            try:
                table = fo.bf16_bits(np.asarray(table, F32))
            except ValueError as e:
                raise DeviceError(f"{self.source.name}: the fabric decoder's {e}") from None
        self._put("embed", 0, np.ascontiguousarray(table, np.uint16))
        cos, sin = fo.rope_half_tables(cfg.head_dim, cfg.rope_theta, np.arange(self.capacity))
        self._put("rope", 0, np.concatenate([cos, sin], axis=1))
        for name, t in params.items():
            if name.endswith("norm.weight"):
                a = np.asarray(kq.array(t))
                gamma = (a.astype(np.uint32) << 16).view(F32) if t["dtype"] == "bf16" else np.asarray(a, F32)
                self._put("norms", self.program.norm_offset(name), gamma)
        self._list(1, True, False)                      # the decode list, ready before the first token
        if self.tokens_max > 1:
            self._list(self.tokens_max, False, False)   # and the prefill chunk's (not timed in TTFT)

    def _put(self, buf: str, offset: int, array: np.ndarray) -> None:
        b = self.buffers[buf]
        data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        b.write(offset, data.tobytes())
        b.sync_for_device(offset, data.size)

    def _list(self, tokens: int, token_reg: bool, all_logits: bool) -> tuple[int, int]:
        """(bus address, count) of the command list for this shape, written and flushed once."""
        all_logits = all_logits and tokens > 1          # one row: the same list either way
        key = (tokens, token_reg, all_logits)
        hit = self._lists.get(key)
        if hit is None:
            addr = {n: b.phys for n, b in self.buffers.items()}
            cmds = self.program.commands(addr, self.linears, tokens, token_reg=token_reg, all_logits=all_logits)
            data = pack_any_list(cmds)
            buf = self.dev.alloc(len(data), f"cmds.fabric.t{tokens}{'r' if token_reg else ''}{'a' if all_logits else ''}")
            buf.write(0, data)
            buf.sync_for_device()
            hit = self._lists[key] = (buf.phys, len(cmds))
        return hit

    # ---- running ---------------------------------------------------------------------------------
    def new_cache(self) -> FabricCache:
        return FabricCache(self.capacity)

    def seek(self, cache: FabricCache, depth: int) -> None:
        """Make `cache` hold `depth` positions without computing them (the bench's context depth: the
        timing of a step does not depend on what the cache holds)."""
        self._check_context(FabricCache(cache.capacity), depth + 1)
        cache.length = depth

    def _check_context(self, cache: FabricCache, n: int) -> None:
        if cache.length + n > cache.capacity:
            raise DeviceError(f"a context of {cache.length + n} tokens is longer than the KV cache of "
                              f"{cache.capacity} positions the design holds (max_context "
                              f"{self.limits.max_context}); shorten the prompt or --max-new-tokens")

    def _run_chunk(self, ids: np.ndarray, cache: FabricCache, all_logits: bool, step: StepTiming,
                   head: bool = True) -> None:
        """Run one chunk of at most T tokens. Without `head` the list stops before the final norm and
        the LM head (a prefill chunk whose logits nobody reads: CMD_COUNT is all it takes)."""
        t = int(ids.size)
        dev = self.dev
        token_reg = t == 1
        if token_reg:
            dev.write32("RUN_TOKEN", int(ids[0]))
        else:
            self._put("ids", 0, ids.astype("<i4"))
        dev.write32("RUN_POS", cache.length)
        base, count = self._list(t, token_reg, all_logits)
        if not head:
            count -= self.program.head_commands
        stats = dev.run(base, count, self.timeout_s)
        cache.length += t
        step.device_wall_s += stats.wall_s
        step.accel_s += stats.accel_s
        step.runs += 1
        step.commands += count
        self._accel_kind = stats.cycles_kind if stats.cycles is not None else "measured (wall time start..wait)"

    def _forward(self, ids, cache: FabricCache, *, all_logits: bool, want_logits: bool):
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size == 0:
            raise ConfigError("token ids must be a non-empty sequence")
        if np.any((ids < 0) | (ids >= self.config.vocab_size)):
            raise ConfigError(f"token id outside the vocabulary 0..{self.config.vocab_size - 1}")
        self._check_context(cache, ids.size)
        step = StepTiming(tokens=int(ids.size))
        acc0 = self.dev.register_accesses
        x0 = getattr(self.dev, "sim_io_wall_s", 0.0)
        t0 = time.perf_counter()
        out = []
        try:
            T = self.tokens_max
            for s in range(0, ids.size, T):
                chunk = ids[s:s + T]
                last = s + T >= ids.size
                self._run_chunk(chunk, cache, all_logits, step, head=all_logits or last)
                if want_logits and (all_logits or last):
                    out.append(self._read_logits(chunk.size if all_logits else 1))
            result = (np.concatenate(out) if want_logits else self.dev.read32("RESULT_INDEX"))
        finally:
            step.wall_s = time.perf_counter() - t0
            step.transfer_s = getattr(self.dev, "sim_io_wall_s", 0.0) - x0
            step.register_accesses = self.dev.register_accesses - acc0
            self.timings.append(step)
        return result

    def _read_logits(self, rows: int) -> np.ndarray:
        L = output_layout(self.config.vocab_size, rows, self.limits.tile_rows)
        buf = self.buffers["logits"]
        buf.sync_for_cpu(0, L.total_bytes)
        return buf.array[:L.total_bytes].view(F32).reshape(rows, L.stride // 4)[:, :self.config.vocab_size].copy()

    def forward(self, ids, cache: FabricCache) -> np.ndarray:
        """Logits [T, vocab] of `ids` at positions cache.length.. ([1, vocab] with last_logits_only)."""
        return self._forward(ids, cache, all_logits=not self.last_logits_only, want_logits=True)

    def forward_greedy(self, ids, cache: FabricCache) -> int:
        """The greedy next token after `ids`: the device's argmax (RESULT_INDEX); no logits move."""
        return int(self._forward(ids, cache, all_logits=False, want_logits=False))

    owns_device = False

    def close(self) -> None:
        self.kq.close()
        if self.owns_device:
            self.owns_device = False
            self.dev.close()


__all__ = ["FabricModel", "FabricCache"]
