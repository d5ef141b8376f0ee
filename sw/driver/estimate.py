"""The fabric decoder's modeled rate from shapes alone: `kriallm estimate`.

FINN and hls4ml print a performance estimate before anything is built; this is
ours. It writes the same command lists the driver runs (sw/driver/program.py's
:class:`FabricProgram`, with placeholder addresses and no weights) and times
every descriptor with the golden device's cost rules (:meth:`CommandExecutor.linear_cost`
for LINEAR, :meth:`FabricPerf.cost` for the fabric opcodes). So it gives the
same accelerator cycles as ``kriallm bench MODEL.kq --device golden --split
fabric`` (tests/test_estimate.py checks that, step by step), in milliseconds
instead of minutes and without a model file: for any preset's shapes on any
hardware config.

The host's time is not modeled: each start is charged a stated time
(``host_s_per_start``, by default the golden bench's median measured on an x86
machine; the board's Cortex-A53 is slower). Everything printed is *modeled*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..contract.commands import ALIGN, LinearCommand
from ..contract.errors import ConfigError
from ..contract.fabric_commands import FabricCommand, Opcode
from .golden_device import GoldenDevice
from .program import FINAL_LAYER, FUSE_QUANT, FabricProgram, LinearAddr

HOST_S_PER_START = 5e-5     # kriallm bench --device golden --split fabric, median host time per token (x86)
LM_HEADS = ("int4", "int8")


@dataclass
class StepEstimate:
    """One start of the list: `tokens` rows at position `pos`."""
    tokens: int
    pos: int
    head: bool
    cycles: int
    by_class: dict[str, int] = field(default_factory=dict)


def _op_class(cmd) -> str:
    if isinstance(cmd, FabricCommand):
        return "attention" if cmd.opcode == int(Opcode.ATTEND) else "vector"
    return "lm_head" if cmd.tag >> 8 == FINAL_LAYER else "linears"      # the list's tags (program.py)


class FabricEstimate:
    """Times the fabric decoder's command lists for model config `cfg` on hardware config `hw`
    (an ArrayConfig with max_context > 0), without weights."""

    def __init__(self, cfg, hw, *, lm_head: str = "int4", capacity: int | None = None,
                 host_s_per_start: float = HOST_S_PER_START, fuse_quant: bool = FUSE_QUANT):
        if not getattr(hw, "max_context", 0):
            raise ConfigError("the hardware config has no fabric decoder (max_context 0): estimate times the "
                              "fabric split; choose a config with the fabric engines, e.g. --hw-config kv260-fabric")
        if lm_head not in LM_HEADS:
            raise ConfigError(f"--lm-head must be one of {', '.join(LM_HEADS)}, got {lm_head!r}")
        if not host_s_per_start >= 0:
            raise ConfigError("the host time per start must be >= 0")
        self.cfg, self.hw = cfg, hw
        self.host_s_per_start = float(host_s_per_start)
        self.dev = GoldenDevice(hw)          # its cost rules; no memory is touched
        self.clock_hz = hw.clock_mhz * 1e6
        self.program = FabricProgram(cfg, self.dev.limits, capacity, fuse_quant=fuse_quant)
        self.capacity = self.program.capacity
        addr, nxt = {}, GoldenDevice.DDR_BASE
        for name, size in self.program.sizes.items():          # placeholder addresses, in plan order
            addr[name], nxt = nxt, nxt + -(-size // ALIGN) * ALIGN
        self.linears = {}
        for name in cfg.linear_names():
            self.linears[name] = LinearAddr(nxt, nxt if cfg.has_bias(name) else None,
                                            name == "lm_head" and lm_head == "int8")
        self.addr = addr
        self.lm_head = lm_head
        self._lists: dict[int, list] = {}

    def _commands(self, tokens: int) -> list:
        hit = self._lists.get(tokens)
        if hit is None:
            hit = self._lists[tokens] = self.program.commands(self.addr, self.linears, tokens,
                                                              token_reg=tokens == 1)
        return hit

    def step(self, tokens: int, pos: int, head: bool = True) -> StepEstimate:
        """One start: the golden device's BUSY cycles for this list at RUN_POS `pos`."""
        if pos + tokens > self.capacity:
            raise ConfigError(f"a context of {pos + tokens} tokens is longer than the KV cache of "
                              f"{self.capacity} positions the design holds")
        cmds = self._commands(tokens)
        if not head:
            cmds = cmds[:len(cmds) - self.program.head_commands]
        ex = self.dev.executor
        by: dict[str, int] = {}
        for c in cmds:
            if isinstance(c, LinearCommand):
                cycles = ex.linear_cost(c)[0]
            else:
                cycles = ex.fabric.perf.cost(c, pos)[0]
            k = _op_class(c)
            by[k] = by.get(k, 0) + cycles
        return StepEstimate(tokens, pos, head, sum(by.values()) + 1, by)   # + 1: the run's last cycle

    def prefill(self, prompt_len: int) -> list[StepEstimate]:
        """The prompt in chunks of the design's T token lanes; the LM head on the last chunk only."""
        T = self.program.T
        return [self.step(min(T, prompt_len - s), s, head=s + T >= prompt_len) for s in range(0, prompt_len, T)]

    def report(self, prompt_len: int = 128, depths=(64, 512, 2048)) -> dict:
        if prompt_len < 1:
            raise ConfigError("the prompt needs at least one token")
        sec = lambda cycles: cycles / self.clock_hz       # noqa: E731
        pre = self.prefill(prompt_len)
        pre_cycles = sum(s.cycles for s in pre)
        rows = []
        for d in depths:
            s = self.step(1, d)
            acc = sec(s.cycles)
            rows.append({"depth": d, "accelerator_s": acc, "host_s": self.host_s_per_start,
                         "tok_s": 1.0 / (acc + self.host_s_per_start),
                         "accelerator_s_by_class": {k: sec(v) for k, v in s.by_class.items()}})
        by_pre: dict[str, float] = {}
        for s in pre:
            for k, v in s.by_class.items():
                by_pre[k] = by_pre.get(k, 0.0) + sec(v)
        dev_perf = self.dev.describe()["accelerator_time"]
        return {
            "kind": "modeled (analytical): the golden device's cost rules over the driver's command lists; "
                    "no weights, no RTL simulation",
            "model": {k: getattr(self.cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads", "head_dim",
                                                        "vocab_size")},
            "lm_head": self.lm_head,
            "hardware": {"config_hash": self.hw.config_hash, "clock_mhz": self.hw.clock_mhz,
                         "engines": self.hw.engines, "token_lanes": self.program.T,
                         "max_context": self.hw.max_context},
            "assumptions": {**dev_perf, "host_s_per_start": self.host_s_per_start,
                            "host_source": "stated, not modeled: by default the median host time per token that "
                                           "kriallm bench --device golden --split fabric measured on an x86 "
                                           "machine (the KV260's Cortex-A53 is slower)"},
            "commands_per_step": len(self._commands(1)),
            "starts_per_token": 1,
            "prefill": {"tokens": prompt_len, "starts": len(pre), "accelerator_s": sec(pre_cycles),
                        "host_s": len(pre) * self.host_s_per_start,
                        "accelerator_s_by_class": by_pre},
            "time_to_first_token_s": sec(pre_cycles) + len(pre) * self.host_s_per_start,
            "by_depth": rows,
        }


def format_report(rep: dict) -> list[tuple[str, str, str]]:
    """Rows for the CLI's table."""
    a = rep["assumptions"]
    basis = f"modeled: {a['clock_mhz']:.0f} MHz, {a['cap_GB_s']:.1f} GB/s DDR, host {a['host_s_per_start'] * 1e3:.2f} ms/start"
    pre = rep["prefill"]
    rows = [("time to first token s", f"{rep['time_to_first_token_s']:.4f}",
             f"{pre['tokens']} prompt tokens in {pre['starts']} starts; "
             + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(pre["accelerator_s_by_class"].items())))]
    for d in rep["by_depth"]:
        parts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(d["accelerator_s_by_class"].items()))
        rows.append((f"decode tok/s at depth {d['depth']}", f"{d['tok_s']:.2f}", f"ms: {parts}"))
    rows.append(("starts, commands / token", f"1, {rep['commands_per_step']}", basis))
    return rows


__all__ = ["FabricEstimate", "StepEstimate", "format_report", "HOST_S_PER_START"]
