#!/usr/bin/env python3
"""The benchmark sweep a paper reports, on whatever device the driver opens.

For each prompt length (default 16, 64, 128, 256): time to first token (the
prompt's forward pass), prefill tokens/s, decode tokens/s, end-to-end tokens/s,
the per-token split between host and accelerator when the device reports one,
and the board power from /sys/class/hwmon while the run lasts (every
``power*_input`` found, in microwatts, sampled in a background thread), with
the energy per decoded token. Writes JSON (machines) and prints a table (people).

    python scripts/bench_board.py MODEL.kq --device golden --out bench.json
    python scripts/bench_board.py MODEL.kq --device kv260 --app kriallm-kv260 --out bench_kv260.json

Devices: everything goes through :func:`open_device`, the one place that knows
how a device is opened and driven. ``reference`` and ``golden`` run on the host
through sw.runtime (the float model, and the accelerator's arithmetic in NumPy);
``kv260`` (the board) and ``sim`` (the RTL in Verilator) run a .kq through the
host driver, sw.driver, exactly as `kriallm generate --device kv260` does, with
the same device options (--app, --manifest, --kv260-access, --uio, ...). The
driver reports how long the accelerator was busy per token (kv260: measured;
sim: modeled cycles), so the table splits host and accelerator time; on
reference and golden those columns say n/a.

Only NumPy and the board-side sw modules are imported: no Amaranth, no cocotb.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sw.argtypes import float_range, int_range  # noqa: E402
from sw.fileio import safe_write_text  # noqa: E402

SCHEMA = "kriallm.bench-board/1"
DEFAULT_LENGTHS = (16, 64, 128, 256)
HOST_DEVICES = ("golden", "reference")   # sw.runtime, on this host
DRIVER_DEVICES = ("kv260", "sim")         # sw.driver: the board, the RTL simulation
DEVICES = HOST_DEVICES + DRIVER_DEVICES


# ---------------------------------------------------------------------------
# The device: open_device is the one place that knows how
# ---------------------------------------------------------------------------

@dataclass
class RunTiming:
    prefill_s: float
    decode_s: list[float]
    new_ids: list[int]
    accel_prefill_s: float | None = None          # accelerator busy time, when the device reports it
    accel_decode_s: list[float] | None = None


@dataclass
class BenchDevice:
    name: str
    model_path: Path
    vocab_size: int
    max_positions: int
    _model: object = field(repr=False, default=None)
    accel_kind: str | None = None          # how the accelerator time is obtained (driver devices)

    def run(self, prompt_ids: list[int], new_tokens: int) -> RunTiming:
        from sw.runtime import generate
        from sw.sampling import Sampler, SamplingParams
        timings = getattr(self._model, "timings", None)        # sw.driver.AcceleratedModel: one per forward
        if timings is not None:
            timings.clear()
        gen = generate(self._model, prompt_ids, new_tokens, Sampler(SamplingParams(temperature=0.0)))
        run = RunTiming(gen.prefill_s, list(gen.decode_s), list(gen.new_ids))
        if timings:
            run.accel_prefill_s = timings[0].accel_s
            run.accel_decode_s = [t.accel_s for t in timings[1:]]
            self.accel_kind = getattr(self._model, "_accel_kind", None) or self._model.dev.cycles_kind
        return run

    def close(self) -> None:
        if hasattr(self._model, "close"):
            self._model.close()


def open_device(model_path: Path, device: str, args=None) -> BenchDevice:
    """Open MODEL on DEVICE: reference/golden through the runtime API, kv260/sim through the host
    driver with the device options in args (sw.driver.add_device_args), as `kriallm generate` does."""
    if device in DRIVER_DEVICES:
        from sw.contract.errors import ConfigError
        from sw.driver import open_accelerated
        if not Path(model_path).is_file():
            raise ConfigError(f"--device {device} runs a quantized .kq file, and {model_path} is not a file")
        model = open_accelerated(model_path, device, args, last_logits_only=True)
    else:
        from sw.runtime import open_model
        model = open_model(model_path, device, progress=False)
    cfg = model.config
    return BenchDevice(device, Path(model_path), int(cfg.vocab_size), int(cfg.max_position_embeddings), model)


# ---------------------------------------------------------------------------
# Power from hwmon
# ---------------------------------------------------------------------------

def read_power(root: Path) -> dict[str, float]:
    """Every power*_input under root/hwmon*/ in watts, keyed 'chip/powerN' (chip from the `name` file)."""
    out = {}
    root = Path(root)
    if not root.is_dir():
        return out
    for hw in sorted(root.iterdir()):
        try:
            chip = (hw / "name").read_text().strip() or hw.name
        except OSError:
            chip = hw.name
        for f in sorted(hw.glob("power*_input")):
            try:
                out[f"{chip}/{f.name.removesuffix('_input')}"] = int(f.read_text().strip()) / 1e6
            except (OSError, ValueError):
                continue
    return out


class PowerMonitor:
    """Samples read_power() every `interval` s while a block runs; mean/max per sensor."""

    def __init__(self, root: Path, interval: float = 0.1):
        self.root, self.interval = Path(root), interval
        self.sensors = sorted(read_power(self.root))
        self._samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = None

    @property
    def available(self) -> bool:
        return bool(self.sensors)

    def __enter__(self):
        self._samples, self._stop = [], threading.Event()
        if self.available:
            self._samples.append(read_power(self.root))
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._samples.append(read_power(self.root))

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._samples.append(read_power(self.root))
        return False

    def summary(self) -> dict | None:
        if not self._samples:
            return None
        per = {}
        for s in self.sensors:
            vals = [x[s] for x in self._samples if s in x]
            if vals:
                per[s] = {"mean_w": statistics.fmean(vals), "max_w": max(vals)}
        totals = [sum(x.values()) for x in self._samples]
        return {"samples": len(self._samples), "sensors": per, "sum_mean_w": statistics.fmean(totals),
                "sum_max_w": max(totals)}


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------

def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    import numpy as np
    return [int(i) for i in np.random.default_rng(seed + length).integers(0, vocab, size=length)]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def bench_length(dev: BenchDevice, length: int, new_tokens: int, repeats: int, seed: int,
                 monitor: PowerMonitor | None) -> dict:
    ids = prompt_ids(length, dev.vocab_size, seed)
    runs, power = [], None
    if monitor is not None and monitor.available:
        with monitor:
            runs = [dev.run(ids, new_tokens) for _ in range(repeats)]
        power = monitor.summary()
    else:
        runs = [dev.run(ids, new_tokens) for _ in range(repeats)]

    ttft = _median([r.prefill_s for r in runs])
    decode_total = _median([sum(r.decode_s) for r in runs])
    n_decode = len(runs[0].decode_s)          # tokens after the first (the first comes from the prefill)
    decode_tok_s = n_decode / decode_total if n_decode and decode_total > 0 else None
    e2e = _median([r.prefill_s + sum(r.decode_s) for r in runs])
    per_token_ms = 1e3 * decode_total / n_decode if n_decode else None
    accel_ms = host_ms = None
    if all(r.accel_decode_s is not None for r in runs) and n_decode:
        accel_ms = 1e3 * _median([sum(r.accel_decode_s) for r in runs]) / n_decode
        host_ms = per_token_ms - accel_ms
    row = {
        "prompt_tokens": length, "new_tokens": len(runs[0].new_ids), "repeats": repeats,
        "ttft_s": ttft, "prefill_tok_s": length / ttft if ttft else None,
        "decode_tok_s": decode_tok_s, "end_to_end_tok_s": len(runs[0].new_ids) / e2e if e2e else None,
        "decode_ms_per_token": per_token_ms, "host_ms_per_token": host_ms, "accel_ms_per_token": accel_ms,
        "accel_prefill_s": _median([r.accel_prefill_s for r in runs]),
        "power": power,
        "energy_j_per_decoded_token": (power["sum_mean_w"] / decode_tok_s
                                       if power and decode_tok_s else None),
        "new_ids": runs[0].new_ids,
    }
    return row


def run_sweep(args) -> dict:
    dev = open_device(args.model, args.device, args)
    try:
        return _sweep(dev, args)
    finally:
        dev.close()


def _sweep(dev: BenchDevice, args) -> dict:
    lengths, skipped = [], []
    for n in args.lengths:
        (lengths if n + args.new_tokens <= dev.max_positions else skipped).append(n)
    monitor = PowerMonitor(args.hwmon_root, args.power_interval)
    idle = None
    if monitor.available and args.idle_s > 0:
        with monitor:
            time.sleep(args.idle_s)
        idle = monitor.summary()
    if args.warmup:
        dev.run(prompt_ids(min(lengths or [1]), dev.vocab_size, args.seed), 2)
    rows = [bench_length(dev, n, args.new_tokens, args.repeats, args.seed, monitor) for n in lengths]
    notes = [f"device {args.device}: times are measured on {platform.node() or 'this host'}"
             + ("" if args.device == "kv260" else ", not on the board")]
    if skipped:
        notes.append(f"skipped prompt lengths {skipped}: prompt + {args.new_tokens} new tokens exceed the "
                     f"model's {dev.max_positions} positions")
    if not monitor.available:
        notes.append(f"no power*_input under {args.hwmon_root}: power not measured")
    if all(r["accel_ms_per_token"] is None for r in rows):
        notes.append(f"device {args.device} does not report accelerator time: no host/accelerator split")
    elif dev.accel_kind:
        notes.append(f"accelerator time on {args.device}: {dev.accel_kind}")
    return {
        "schema": SCHEMA,
        "device": args.device,
        "model": str(args.model),
        "host": {"node": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
                 "cpus": os.cpu_count()},
        "settings": {"lengths": list(args.lengths), "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "warmup": args.warmup, "seed": args.seed, "sampling": "greedy",
                     "hwmon_root": str(args.hwmon_root), "power_interval_s": args.power_interval},
        "power_sensors": monitor.sensors,
        "idle_power": idle,
        "rows": rows,
        "notes": notes,
    }


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def print_table(report: dict, out=sys.stdout) -> None:
    header = ("prompt", "new", "TTFT s", "prefill tok/s", "decode tok/s", "e2e tok/s", "ms/tok",
              "host ms", "accel ms", "power W", "J/tok")
    rows = [(str(r["prompt_tokens"]), str(r["new_tokens"]), _fmt(r["ttft_s"], ".4f"),
             _fmt(r["prefill_tok_s"], ".1f"), _fmt(r["decode_tok_s"], ".2f"), _fmt(r["end_to_end_tok_s"], ".2f"),
             _fmt(r["decode_ms_per_token"], ".2f"), _fmt(r["host_ms_per_token"], ".2f"),
             _fmt(r["accel_ms_per_token"], ".2f"),
             _fmt(r["power"]["sum_mean_w"] if r["power"] else None, ".2f"),
             _fmt(r["energy_j_per_decoded_token"], ".3f")) for r in report["rows"]]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    print(f"device {report['device']}, model {report['model']}", file=out)
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)), file=out)
    for n in report["notes"]:
        print(f"note: {n}", file=out)


def _lengths(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError("prompt lengths must be positive")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_board.py", description="Prompt-length sweep: TTFT, tokens/s, "
                                "host/accelerator split and board power; JSON plus a table.")
    p.add_argument("model", type=Path, metavar="MODEL", help=".kq file (or checkpoint dir for --device reference)")
    p.add_argument("--device", choices=DEVICES, default="golden",
                   help="reference: the float model; golden: the accelerator's arithmetic in NumPy; kv260: the "
                        "board, through the host driver; sim: the RTL in Verilator (default: %(default)s)")
    p.add_argument("--lengths", type=_lengths, default=list(DEFAULT_LENGTHS), metavar="N,N,...",
                   help="prompt lengths (default: %s)" % ",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--new-tokens", type=int_range(1, 1 << 20), default=32, help="tokens generated per run (default %(default)s)")
    p.add_argument("--repeats", type=int_range(1, 1000), default=3, help="runs per length; medians are reported (default %(default)s)")
    p.add_argument("--warmup", type=int_range(0, 1), default=1, help="1: one short untimed run first (default %(default)s)")
    p.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0, help="seed of the random prompt ids (default: %(default)s)")
    p.add_argument("--hwmon-root", type=Path, default=Path("/sys/class/hwmon"), metavar="DIR",
                   help="where the power*_input sensors are read (default: %(default)s)")
    p.add_argument("--power-interval", type=float_range(0.0, 60.0, lo_open=True), default=0.1, metavar="S",
                   help="seconds between power samples (default: %(default)s)")
    p.add_argument("--idle-s", type=float_range(0.0, 3600.0), default=1.0, metavar="S",
                   help="seconds of idle power measured first; 0 skips it (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="JSON report (default: bench_board_<device>.json)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    from sw.driver import add_device_args      # kv260/sim: the options of `kriallm generate`
    add_device_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 2:
        print("bench_board: error: --new-tokens must be at least 2 (one prefill token, one decoded)", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("bench_board: error: --repeats must be at least 1", file=sys.stderr)
        return 2
    from sw.contract.errors import KriaError
    try:
        report = run_sweep(args)
    except KriaError as e:
        print(f"bench_board: error: {e}", file=sys.stderr)
        return 2
    if not report["rows"]:
        print(f"bench_board: error: no prompt length fits the model ({'; '.join(report['notes'])})", file=sys.stderr)
        return 2
    out = args.out or Path(f"bench_board_{args.device}.json")
    safe_write_text(out, json.dumps(report, indent=2) + "\n", "bench report")
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
