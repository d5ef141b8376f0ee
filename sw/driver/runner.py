"""The decode loop on an accelerator: `AcceleratedModel` and the bench report.

The work is split as in the paper (Xiang et al., 2025):

* the fabric runs every linear layer, the LM head included, one LINEAR
  descriptor each, from a command list built once per model;
* the host runs the embedding lookup, RMSNorm, RoPE, attention with the KV
  cache, SiLU x up, the per-group INT8 quantization of each linear's input
  and sampling. That is ``sw.reference.Qwen2Runner`` with this module's
  LinearFn plugged in, so the host arithmetic is the golden model's.

Loading (once): the .kq's packed weight streams and biases are copied into
DMA buffers (64-byte aligned) and flushed; one activation buffer per input
width K and one output buffer per linear role are allocated for the
hardware's T token lanes; the command list is written for each token count
used (1 for decode, T and the remainder for prefill) and flushed.

Per linear: quantize x on the host, write the activation buffer, flush it,
point CMD_BASE at the linear's descriptor, start, wait, invalidate the
output buffer and read it. Linears that read the same input (q/k/v, and
gate/up) run as one start of 2-3 consecutive descriptors sharing one
activation buffer, which saves host round trips; the results are identical.
A prompt longer than T runs in chunks of T tokens per command.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contract.commands import (ALIGN, DESCRIPTOR_BYTES, WEIGHT_KIND_INT4, WEIGHT_KIND_INT8, activation_layout, bias_bytes,
                        linear_command, output_layout, pack_bias, pack_command_list)
from ..contract.errors import DeviceError
from ..contract.numerics import AMAX_MIN, QMAX_A, quantize_activations
from .device import Device, ExpectedHardware, check_model

F32 = np.float32
# Linears of one layer that read the same input, in command-list order.
FUSED_RUNS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


@dataclass
class StepTiming:
    """One forward (a prefill chunk set or one decoded token)."""
    tokens: int
    wall_s: float = 0.0          # everything, measured on this host
    device_wall_s: float = 0.0   # inside start..wait, measured on this host
    accel_s: float = 0.0         # the device's own time: cycles / clock when it has cycles, else wall
    runs: int = 0
    commands: int = 0
    register_accesses: int = 0   # register reads and writes of the step (fabric split)
    transfer_s: float = 0.0      # the sim device's simulator I/O (buffers in and out of its DDR model,
                                 # register accesses through the simulated AXI4-Lite port): simulator
                                 # cost, not host work, so not host time

    @property
    def host_s(self) -> float:
        return self.wall_s - self.device_wall_s - self.transfer_s


@dataclass
class _Linear:
    name: str
    n: int
    k: int
    index: int = -1               # position in the command list (device linears)
    run: tuple[str, ...] = ()     # the names run together when this one starts a fused run
    act: object = None            # activation Buffer (per K)
    out: object = None            # output Buffer (per role)
    host: object = None           # QuantLinear for linears the design cannot execute
    weight_bytes: int = 0


def upload_linear(dev: Device, kq, name: str, tile_rows: int, group_size: int, source: str):
    """Copy one linear's packed weight stream (and padded bias) into DMA buffers and flush them:
    (weight bus address, bias bus address or None, its TileLayout)."""
    blob, layout = kq.linear_blob(name)
    if layout.tile_rows != tile_rows or layout.group_size != group_size:
        raise DeviceError(f"{source}: linear {name} has tile_rows {layout.tile_rows} / group "
                          f"size {layout.group_size} but the design needs {tile_rows} / {group_size}")
    wbuf = dev.alloc(blob.size, f"w.{name}")
    wbuf.array[:] = blob
    wbuf.sync_for_device()
    bias_addr = None
    if (name, "bias") in kq.entries:
        b = pack_bias(kq.array(kq.entries[(name, "bias")]), tile_rows)
        bbuf = dev.alloc(len(b), f"b.{name}")
        bbuf.write(0, b)
        bbuf.sync_for_device()
        bias_addr = bbuf.phys
    return wbuf.phys, bias_addr, layout


def load_tokenizer(kq):
    """The tokenizer stored in a .kq, or None."""
    tok = kq.entries.get(("tokenizer.json", ""))
    if not tok:
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_str(bytes(kq._view(tok)).decode())


def _role(name: str) -> str:
    return name if name == "lm_head" else name.split(".", 3)[3]


class AcceleratedModel:
    """A .kq model loaded onto a Device; a drop-in for sw.runtime.OpenModel (forward, new_cache,
    config, tokenizer, source, quant, device).

    expected: the design the caller expects (an elaboration manifest; see device.expected_hardware).
    host_fallback: run a linear the design cannot execute (an fp16 LM head, or INT8 on an INT4-only
    design) on the host with the golden arithmetic instead of refusing the model.
    last_logits_only: forward() of several tokens returns only the last position's logits (what
    generate samples from), so a prefill runs the LM head for one token; leave it off for eval.
    """

    split = "hybrid"

    def __init__(self, kq_path, device: Device, *, expected: ExpectedHardware | None = None,
                 timeout_s: float = 5.0, fuse: bool = True, host_fallback: bool = True,
                 last_logits_only: bool = False):
        from ..kq import KqFile
        from ..reference import Qwen2Runner
        self.source = Path(kq_path)
        self.dev = device
        self.device = device.name
        self.timeout_s = timeout_s
        self.fuse = fuse
        self.last_logits_only = last_logits_only
        self.ident = device.check_identity(expected)
        kq = KqFile(kq_path)
        check_model(kq, self.ident)
        self.kq = kq
        self.config = cfg = kq.config
        self.quant = kq.quant
        self.limits = lim = self.ident.limits
        self.tokens_max = lim.tokens
        self.tokenizer = load_tokenizer(kq)
        self.timings: list[StepTiming] = []
        self._step: StepTiming | None = None
        self._stash: dict[str, tuple[object, np.ndarray]] = {}
        self._act_cache: dict[tuple[int, int, int], tuple] = {}
        self._act_tokens: dict[int, int] = {}
        self._out_cache: dict[tuple[str, int], object] = {}
        self._lists: dict[int, object] = {}

        self.linears: dict[str, _Linear] = {}
        plan = []
        for name in cfg.linear_names():
            n, k = cfg.shape_of(name)
            packed, weight = kq.entries.get((name, "packed")), kq.entries.get((name, "weight"))
            kind = (packed or weight)["kind"]
            lin = _Linear(name, n, k)
            executable = packed is not None and bool(
                lim.weight_kinds & (WEIGHT_KIND_INT8 if kind == "int8" else WEIGHT_KIND_INT4))
            if not executable:
                if not host_fallback:
                    raise DeviceError(f"{self.source.name}: linear {name} is {kind}, which the loaded design "
                                      f"({self.ident.describe()}) cannot execute")
                lin.host = self._host_linear(kq, name)
            else:
                lin.weight_bytes = packed["nbytes"]
                plan.append(lin)
            self.linears[name] = lin
        self.host_linears = [l.name for l in self.linears.values() if l.host is not None]
        self._allocate(kq, plan)
        self.runner = Qwen2Runner(cfg, self._params(kq), self.linear)

    # ---- loading ---------------------------------------------------------------
    @staticmethod
    def _params(kq) -> dict[str, np.ndarray]:
        params = {}
        for t in kq.header["tensors"]:
            if t["role"] != "param":
                continue
            a = kq.array(t)
            params[t["name"]] = ((a.astype(np.uint32) << 16).view(F32) if t["dtype"] == "bf16"
                                 else np.array(a, F32))
        return params

    @staticmethod
    def _host_linear(kq, name):
        from ..contract.layout import unpack_linear
        from ..qmodel import QuantLinear
        e = kq.entries
        bias = np.array(kq.array(e[(name, "bias")])) if (name, "bias") in e else None
        packed = e.get((name, "packed"))
        if packed is None:
            w = e[(name, "weight")]
            return QuantLinear("fp16", w["group_size"], weight=np.array(kq.array(w)), bias=bias)
        blob, layout = kq.linear_blob(name)
        codes, scales, zeros = unpack_linear(layout, blob)
        return QuantLinear(packed["kind"], packed["group_size"], codes=codes, scales=scales, zeros=zeros, bias=bias)

    def _allocate(self, kq, plan: list[_Linear]) -> None:
        dev, lim, T = self.dev, self.limits, self.tokens_max
        g, r = lim.group_size, lim.tile_rows
        ks = sorted({l.k for l in plan})
        roles = {}
        for l in plan:
            roles[_role(l.name)] = max(roles.get(_role(l.name), 0), l.n)
        need = (sum(-(-l.weight_bytes // ALIGN) * ALIGN for l in plan)
                + sum(bias_bytes(l.n, r) for l in plan if (l.name, "bias") in kq.entries)
                + sum(activation_layout(k, g, T).total_bytes for k in ks)
                + sum(output_layout(n, T, r).total_bytes for n in roles.values())
                + 3 * len(plan) * DESCRIPTOR_BYTES + 64 * ALIGN)
        cap = getattr(dev, "capacity", None)
        if cap is not None and need > cap:
            raise DeviceError(f"{self.source.name} needs {need / 2**20:.1f} MiB of DMA memory but the {dev.name} "
                              f"device has {cap / 2**20:.1f} MiB; give the DMA buffer more room "
                              f"(docs/driver.md: u-dma-buf size)")
        self.weight_bytes_per_token = sum(l.weight_bytes for l in plan)
        acts = {k: dev.alloc(activation_layout(k, g, T).total_bytes, f"act.k{k}") for k in ks}
        outs = {role: dev.alloc(output_layout(n, T, r).total_bytes, f"out.{role}") for role, n in roles.items()}
        self._cmds = []
        for l in plan:
            weight_addr, bias_addr, layout = upload_linear(dev, kq, l.name, r, g, self.source.name)
            l.act, l.out, l.index = acts[l.k], outs[_role(l.name)], len(self._cmds)
            self._cmds.append(dict(n=l.n, k=l.k, group_size=g, tile_rows=r, weight_addr=weight_addr,
                                   act_addr=l.act.phys, out_addr=l.out.phys, bias_addr=bias_addr,
                                   weight_int8=layout.bits == 8, tag=l.index))
        # fused runs: consecutive device linears of one layer that read the same input
        for l in plan:
            l.run = (l.name,)
        if self.fuse:
            for layer in range(self.config.num_hidden_layers):
                for group in FUSED_RUNS:
                    names = [f"model.layers.{layer}.{s}" for s in group]
                    ls = [self.linears[n] for n in names]
                    if all(x.host is None for x in ls) and \
                            [x.index for x in ls] == list(range(ls[0].index, ls[0].index + len(ls))):
                        ls[0].run = tuple(names)
        for t in sorted({1, T}):
            self._command_list(t)

    def _command_list(self, tokens: int):
        """The model's command list for `tokens` token lanes, built and flushed once."""
        buf = self._lists.get(tokens)
        if buf is None:
            data = pack_command_list(linear_command(tokens=tokens, **c) for c in self._cmds)
            buf = self.dev.alloc(len(data), f"cmds.t{tokens}")
            buf.write(0, data)
            buf.sync_for_device()
            self._lists[tokens] = buf
        return buf

    # ---- the LinearFn -------------------------------------------------------------
    def _act_views(self, buf, k: int, t: int):
        """Views of `buf` for a [t, K] activation buffer: codes int8 [t, K], scales fp32 [t, ng],
        qsums int32 [t, ng]; cached per (buffer, K, t)."""
        key = (buf.phys, k, t)
        v = self._act_cache.get(key)
        if v is None:
            L = activation_layout(k, self.limits.group_size, t)
            a, ng, ms = buf.array, L.groups, L.meta_stride
            codes = a[:t * L.codes_stride].reshape(t, L.codes_stride)[:, :k].view(np.int8)
            scales = a[L.scales_offset:L.scales_offset + t * ms].view("<f4").reshape(t, ms // 4)[:, :ng]
            qsums = a[L.qsums_offset:L.qsums_offset + t * ms].view("<i4").reshape(t, ms // 4)[:, :ng]
            v = self._act_cache[key] = (L.total_bytes, codes, scales, qsums)
        return v

    def _write_activations(self, buf, x: np.ndarray) -> int:
        """Quantize x [t, K] per group (sw.contract.numerics.quantize_activations, bit for bit) straight into
        the activation buffer (sw.contract.commands layout, padding zero); returns the bytes to flush."""
        t, k = x.shape
        g = self.limits.group_size
        total, codes, scales, qsums = self._act_views(buf, k, t)
        if self._act_tokens.get(buf.phys) != t:
            buf.array[:] = 0            # a new layout: clear padding left by another token count
            self._act_tokens[buf.phys] = t
        xg = x.reshape(t, k // g, g)
        amax = np.abs(xg).max(axis=-1)
        if amax.min() >= AMAX_MIN:
            # the contract's steps without its dead-group masking (no group is dead here)
            q = xg * (F32(QMAX_A) / amax)[..., None]
            np.rint(q, out=q)
            np.clip(q, -QMAX_A, QMAX_A, out=q)
            codes[...] = q.reshape(t, k)
            scales[...] = amax / F32(QMAX_A)
            qsums[...] = q.sum(axis=-1)          # integers below 2^24: exact in fp32
        else:
            q8, s_a, qsum = quantize_activations(x, g)
            codes[...] = q8
            scales[...] = s_a
            qsums[...] = qsum
        return total

    def _run(self, names: tuple[str, ...], x: np.ndarray, ys: list[np.ndarray], row: int) -> None:
        """One start of the consecutive descriptors of `names` on x [t, K] (t <= T lanes); the
        outputs go to ys[i][row:row+t]."""
        first = self.linears[names[0]]
        t = x.shape[0]
        nbytes = self._write_activations(first.act, x)
        first.act.sync_for_device(0, nbytes)
        base = self._command_list(t).phys + first.index * DESCRIPTOR_BYTES
        stats = self.dev.run(base, len(names), self.timeout_s)
        step = self._step
        if step is not None:
            step.device_wall_s += stats.wall_s
            step.accel_s += stats.accel_s
            step.runs += 1
            step.commands += len(names)
            self._accel_kind = stats.cycles_kind if stats.cycles is not None else "measured (wall time start..wait)"
        for name, y in zip(names, ys):
            lin = self.linears[name]
            key = (name, t)
            L = self._out_cache.get(key)
            if L is None:
                L = self._out_cache[key] = output_layout(lin.n, t, self.limits.tile_rows)
            lin.out.sync_for_cpu(0, L.total_bytes)
            y[row:row + t] = lin.out.array[:L.total_bytes].view(F32).reshape(t, L.stride // 4)[:, :lin.n]

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """sw.reference.LinearFn: y [T, N] = linear `name` of x [T, K], computed by the device."""
        lin = self.linears[name]
        if lin.host is not None:
            return lin.host(x)
        hit = self._stash.pop(name, None)
        if hit is not None and hit[0] is x:
            return hit[1]
        names = lin.run if lin.run[0] == name else (name,)
        xf = np.asarray(x, F32)
        n_tok, T = xf.shape[0], self.tokens_max
        ys = [np.empty((n_tok, self.linears[n].n), F32) for n in names]
        for s in range(0, n_tok, T):
            self._run(names, xf[s:s + T], ys, s)
        for other, y in zip(names[1:], ys[1:]):
            self._stash[other] = (x, y)
        return ys[0]

    # ---- OpenModel-compatible surface ---------------------------------------------
    def new_cache(self):
        return self.runner.new_cache()

    def forward(self, ids, cache) -> np.ndarray:
        """Logits [T, vocab] of tokens `ids` at positions cache.length.. (Qwen2Runner.forward); with
        last_logits_only, [1, vocab] of the last position only, so a prefill streams the LM head once."""
        ids = np.asarray(ids, dtype=np.int64)
        self._stash.clear()
        self._step = step = StepTiming(tokens=int(ids.size))
        x0 = getattr(self.dev, "sim_io_wall_s", 0.0)
        acc0 = self.dev.register_accesses
        t0 = time.perf_counter()
        try:
            logits = self.runner.forward(ids, cache, last_only=self.last_logits_only)
        finally:
            step.wall_s = time.perf_counter() - t0
            step.register_accesses = self.dev.register_accesses - acc0
            step.transfer_s = getattr(self.dev, "sim_io_wall_s", 0.0) - x0
            self._step = None
            self._stash.clear()
        self.timings.append(step)
        return logits

    def seek(self, cache, depth: int) -> None:
        """Make `cache` hold `depth` positions (of zeros) without computing them: the timing of a
        decode step at context depth `depth` does not depend on what the cache holds (bench)."""
        cache.reserve(depth + 1)
        cache.length = depth

    owns_device = False        # set by open_accelerated when it opened the device for this model

    def close(self) -> None:
        """Close the .kq, and the device too when it was opened for this model (open_accelerated):
        the sim device's simulator exits, the board's mappings are released."""
        self.kq.close()
        if self.owns_device:
            self.owns_device = False
            self.dev.close()


# ---------------------------------------------------------------------------
# The bench report
# ---------------------------------------------------------------------------

SPLIT_DETAIL = {
    "hybrid": "fabric: every linear incl. LM head; host: embedding, RMSNorm, RoPE, attention + KV cache, "
              "SiLU x up, activation quantization, sampling",
    "fabric": "fabric: the whole decoder (embedding, norms, RoPE, INT8 KV cache + attention, SiLU x up, "
              "residuals, activation quantization, every linear, greedy argmax), one start per token; host: "
              "RUN_POS/RUN_TOKEN, start, wait, read the token id (or the logits for sampling)",
}


def _mean(xs):
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def host_description() -> str:
    import os
    return f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs"


def depth_sweep(model, depths: list[int], new_tokens: int = 4, progress=None) -> list[dict]:
    """Decode `new_tokens` greedy tokens at each context depth (llama-bench's -d): the cache is
    seeked to the depth (zeros; timing does not depend on the values), then per token the host
    time (measured), the accelerator time (the device's kind), register accesses and starts."""
    rows = []
    on_board = model.dev.name == "kv260"
    for d in depths:
        cache = model.new_cache()
        model.seek(cache, d)
        model.timings.clear()
        nxt = 1
        for _ in range(new_tokens):
            if hasattr(model, "forward_greedy"):
                nxt = model.forward_greedy([nxt], cache)
            else:
                nxt = int(np.argmax(model.forward([nxt], cache)[-1]))
            if progress is not None:
                progress()
        steps = list(model.timings)
        host, acc, wall = _mean(s.host_s for s in steps), _mean(s.accel_s for s in steps), _mean(s.wall_s for s in steps)
        rows.append({"depth": d, "tokens": len(steps), "host_s": host, "accelerator_s": acc,
                     "tok_s": 1.0 / wall if on_board else 1.0 / (host + acc),
                     "register_accesses": _mean(s.register_accesses for s in steps),
                     "runs": _mean(s.runs for s in steps), "commands": _mean(s.commands for s in steps)})
    model.timings.clear()
    return rows


def bench_report(model: AcceleratedModel, prompt_ids: list[int], max_new_tokens: int = 16, sampler=None,
                 *, model_path=None) -> dict:
    """Generate and report: tokens/s, time to first token, and the per-token split into host and
    accelerator time, each labelled with how it was obtained. The JSON of `kriallm bench --json`."""
    from ..runtime import generate
    from ..sampling import Sampler, SamplingParams
    sampler = sampler or Sampler(SamplingParams())
    model.timings.clear()
    keep, model.last_logits_only = model.last_logits_only, True
    try:
        gen = generate(model, list(prompt_ids), max_new_tokens, sampler)
    finally:
        model.last_logits_only = keep
    steps = list(model.timings)
    prefill, decode = steps[0], steps[1:]
    kind = getattr(model, "_accel_kind", model.dev.cycles_kind)
    modeled = kind.startswith("modeled")
    host_kind = f"measured on this machine ({host_description()})"
    if any(s.transfer_s > 0 for s in steps):
        host_kind += ("; the simulator's register and buffer I/O (simulator_io_s per step) is not host work "
                      "and is left out")
    host_tok = _mean(s.host_s for s in decode)
    acc_tok = _mean(s.accel_s for s in decode)
    wall_tok = _mean(s.wall_s for s in decode)
    on_board = model.dev.name == "kv260"
    rep = {
        "device": model.dev.name,
        "model": str(model_path or model.source),
        "hardware": model.ident.to_dict(),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(gen.new_ids),
        "new_ids": gen.new_ids,
        "decode_tok_s": (1.0 / wall_tok) if on_board else 1.0 / (host_tok + acc_tok),
        "decode_tok_s_basis": ("measured end to end on the board" if on_board else
                               f"host time {host_kind} + accelerator time {kind}"),
        "decode_tok_s_accelerator_only": 1.0 / acc_tok if acc_tok > 0 else None,
        "time_to_first_token_s": prefill.wall_s if on_board else prefill.host_s + prefill.accel_s,
        "per_token": {
            "host_s": host_tok, "host_s_median": float(np.median([s.host_s for s in decode])) if decode else None,
            "host_kind": host_kind,
            "accelerator_s": acc_tok, "accelerator_kind": kind,
            "device_wall_s": _mean(s.device_wall_s for s in decode),
            "device_wall_note": ("wall time inside start..wait on this host" +
                                 (": the time to compute the model, not an accelerator time" if modeled else "")),
            "runs": _mean(s.runs for s in decode), "commands": _mean(s.commands for s in decode),
            "register_accesses": _mean(s.register_accesses for s in decode),
            "weight_bytes": model.weight_bytes_per_token,
        },
        "prefill": {"tokens": prefill.tokens, "host_s": prefill.host_s, "accelerator_s": prefill.accel_s,
                    "runs": prefill.runs, "commands": prefill.commands, "token_lanes": model.tokens_max},
        "steps": [{"tokens": s.tokens, "host_s": s.host_s, "accelerator_s": s.accel_s,
                   "device_wall_s": s.device_wall_s, "simulator_io_s": s.transfer_s, "runs": s.runs}
                  for s in steps],
        "host_linears": model.host_linears,
        "split": model.split,
        "split_detail": SPLIT_DETAIL[model.split],
        "assumptions": model.dev.describe(),
    }
    return rep
