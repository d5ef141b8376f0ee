"""Engine-level benchmark: a decoder layer's linears and an LM-head slice through the RTL simulation.

    kriallm bench-engine --hw-config kv260 --model-preset qwen2.5-0.5b --layers 1 --json [--out DIR]
    python -m sim.bench --hw-config kv260 --model-preset qwen2.5-0.5b --layers 1

No model file: the weights, activations and biases are random, with the real
shapes (the cycle count of a linear depends on its shape only). The linears of
``--layers`` decoder layers (q, k, v with bias, o, gate, up, down; the same
weights for every layer, which changes nothing for the DDR model, it has no
cache) and an ``--lm-head-rows`` slice of the LM head go into DDR as one command
list and run through the accelerator RTL (rtl.top.build_top) with every HP port on
the Verilog DDR model (sim/hdl/hp_ddr_model.v): one Verilator build, one run.
Outputs are checked bit for bit against sw.contract.numerics.golden_linear (``--no-verify``
skips that).

Per linear the report gives the cycles the command processor logged for the
command (CMD_LOG_CYCLES: from the previous command's completion to this one's),
the bytes it moved (weights, bias, activations, descriptor, outputs), bytes per
cycle against the DDR model's cap, and the utilization. Per token it gives the
modeled time of all linears of all layers plus the whole LM head, the LM head
extrapolated linearly in rows from the slice, at the config's clock, next to the
bandwidth roofline of the same format (weight bytes per token / the modeled
bandwidth). Every number is **modeled**: the RTL's cycle count with the DDR
model's assumptions, which the report prints beside the numbers.

Writes DIR/bench.json and DIR/utilization.png (bar chart per layer type).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from sw.argtypes import DeprecatedOption, float_range, int_range, run_cli
from sw.fileio import safe_write_text, safe_writer

ACCEPT_UTILIZATION = 0.90
ACCEPT_ROOFLINE_RATIO = 1.15
MAX_LAYERS = 4            # 8 commands per layer: the 32-entry cycle log holds four layers' commands


def add_bench_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The engine-level bench options (`kriallm bench-engine`, `python -m sim.bench`)."""
    from sw.contract.config import PRESETS as HW_PRESETS
    from sw.config import PRESETS as MODEL_PRESETS
    parser.add_argument("--hw-config", metavar="PRESET|FILE", default="kv260",
                        help=f"the hardware config: a preset of sw/contract/config.py ({', '.join(HW_PRESETS)}) "
                             f"or an ArrayConfig JSON / elaboration manifest.json (default: %(default)s)")
    parser.add_argument("--preset", dest="hw_config", action=DeprecatedOption, use="--hw-config", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    parser.add_argument("--model-preset", default="qwen2.5-0.5b", metavar="NAME",
                        help=f"the model's shapes (sw/config.py): {', '.join(MODEL_PRESETS)} (default: %(default)s)")
    parser.add_argument("--layers", type=int_range(1, 1024), default=1, metavar="N",
                        help=f"decoder layers to simulate, 1..{MAX_LAYERS} (default: %(default)s)")
    parser.add_argument("--lm-head-rows", type=int_range(1, 1 << 22), default=4096, metavar="N",
                        help="rows of the LM-head slice; the whole head is extrapolated from it (default: %(default)s)")
    parser.add_argument("--tokens", type=int_range(1, 256), default=1, metavar="T",
                        help="tokens per linear, 1..the config's token lanes; 1 is decode (default: %(default)s)")
    parser.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0, help="seed of the random weights and activations (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder for bench.json and utilization.png (default: out/bench-CONFIG-MODEL)")
    parser.add_argument("--read-latency", type=int_range(1, 100_000), default=None, metavar="CYCLES",
                        help="DDR model read latency (default: the model's 30)")
    parser.add_argument("--gap-rate", type=float_range(0.0, 1.0, hi_open=True), default=None, metavar="P",
                        help="DDR model random back-pressure per channel and cycle (default: the model's, none)")
    parser.add_argument("--shared-hp12", action="store_true",
                        help="model HP1 and HP2 sharing one DDR controller port (the pessimistic case)")
    parser.add_argument("--no-verify", action="store_true", help="skip the bit-exact check of the outputs")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    return parser


def config_label(spec) -> str:
    """A short name for the hardware config: the preset, or the file's stem."""
    from sw.contract.config import PRESETS as HW_PRESETS
    text = str(spec)
    return text if text in HW_PRESETS else Path(text).stem


def _layer_linears(mcfg) -> list[tuple[str, int, int, bool]]:
    h, i = mcfg.hidden_size, mcfg.intermediate_size
    kv = mcfg.num_key_value_heads * mcfg.head_dim
    return [("q_proj", mcfg.num_attention_heads * mcfg.head_dim, h, True), ("k_proj", kv, h, True),
            ("v_proj", kv, h, True), ("o_proj", h, mcfg.num_attention_heads * mcfg.head_dim, False),
            ("gate_proj", i, h, False), ("up_proj", i, h, False), ("down_proj", h, i, False)]


def run_bench(args) -> int:
    report = bench_report(args)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
    return 0


def bench_report(args) -> dict:
    from sw.config import preset as model_preset
    from sw.driver.device import hardware_config
    from sw.contract.errors import ConfigError
    from sw.contract.layout import TileLayout

    from .top_tb import SIM_DDR, Scenario, Workspace, build_sim_top, compare_bits, put_commands, random_linear, \
        run_scenario

    # `args.config` (an ArrayConfig) overrides --hw-config, which then only names it: the tests use a
    # reduced kv260.
    spec = getattr(args, "hw_config", None) or "kv260"
    cfg = getattr(args, "config", None) or hardware_config(spec)
    label = config_label(spec)
    mcfg = model_preset(args.model_preset)
    if not 1 <= args.layers <= MAX_LAYERS:
        raise ConfigError(f"--layers must be 1..{MAX_LAYERS} (the command log holds {MAX_LAYERS} layers' commands)")
    if not 1 <= args.tokens <= cfg.tokens:
        raise ConfigError(f"--tokens must be 1..{cfg.tokens} for hardware config {label}")
    if args.lm_head_rows < 1:
        raise ConfigError(f"--lm-head-rows must be at least 1, got {args.lm_head_rows}")
    rows = min(args.lm_head_rows, mcfg.vocab_size)
    # Absolute before anything reaches the simulator, which runs in its own build directory.
    out_dir = Path(args.out or f"out/bench-{label}-{args.model_preset}").expanduser().resolve()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {out_dir}: {e.strerror}") from None
    work = out_dir / "work"
    ddr = SIM_DDR.replace(ports=cfg.engines)
    changes = {}
    if args.read_latency is not None:
        changes["read_latency"] = args.read_latency
    if args.gap_rate is not None:
        changes["gap_rate"] = args.gap_rate
    if getattr(args, "shared_hp12", False):
        changes["shared_hp12"] = True
    run_ddr = ddr.replace(**changes)

    t0 = time.perf_counter()
    build = build_sim_top(cfg, ddr)
    rng = np.random.default_rng(args.seed)
    ws = Workspace(limit=ddr.mem_bytes)
    shapes = _layer_linears(mcfg)
    x_hidden = (rng.standard_normal((args.tokens, mcfg.hidden_size))).astype(np.float32)
    lins = [random_linear(ws, cfg, n, k, args.tokens, rng, bias=b, name=name,
                          x=x_hidden if k == mcfg.hidden_size else None) for name, n, k, b in shapes]
    head = random_linear(ws, cfg, rows, mcfg.hidden_size, args.tokens, rng, bias=False, name="lm_head_slice",
                         x=x_hidden)
    cmds = [lin.cmd for _ in range(args.layers) for lin in lins] + [head.cmd]
    base = put_commands(ws, cmds)
    sc = Scenario(work, ddr=dataclasses.asdict(ddr))
    sc.load(ws)
    if changes:
        sc.configure_ddr(**changes)
    dumps = [(lin.out_addr, lin.out_bytes, lin.name) for lin in lins + [head]]
    total_bytes = sum(lin.bytes_read + lin.out_bytes for lin in lins) * args.layers + head.bytes_read + head.out_bytes
    limit = int(20 * total_bytes / ddr.cap_bytes_per_cycle) + 100_000
    sc.run("bench", base, len(cmds), timeout=limit, dumps=dumps if not args.no_verify else [])
    setup_s = time.perf_counter() - t0
    res = run_scenario(build, sc)
    run = res["runs"]["bench"]
    if run["timeout"] or run["status"]["error"] or not run["status"]["done"]:
        raise RuntimeError(f"the bench run did not complete: {run['status']}, timeout={run['timeout']}")
    verified = None
    if not args.no_verify:
        for lin, (_, _, path) in zip(lins + [head], sc.steps[-1]["dumps"]):
            compare_bits(Path(path).read_bytes(), lin.expected, lin.name)
        verified = True

    cap = run_ddr.cap_bytes_per_cycle
    clock = cfg.clock_mhz * 1e6
    log = run["cmd_cycles"]
    per = []
    for j, lin in enumerate(lins + [head]):
        idx = [j + L * len(lins) for L in range(args.layers)] if lin is not head else [len(cmds) - 1]
        cyc = [log[i] for i in idx]
        c = float(np.mean(cyc))
        moved = lin.bytes_read + 64 + lin.out_bytes
        per.append({
            "name": lin.name, "n": lin.n, "k": lin.k, "bias": lin.cmd.has_bias, "tiles": -(-lin.n // cfg.rows),
            "cycles": c, "cycles_per_layer": cyc, "time_us": c / clock * 1e6,
            "weight_bytes": lin.weight_bytes, "bytes_read": lin.bytes_read + 64, "bytes_written": lin.out_bytes,
            "bytes_per_cycle": moved / c, "cap_bytes_per_cycle": cap, "utilization": moved / c / cap,
            "peak_bytes_per_cycle": run_ddr.peak_bytes_per_cycle,
            "utilization_of_peak": moved / c / run_ddr.peak_bytes_per_cycle,
            "weight_bytes_per_cycle": lin.weight_bytes / c, "weight_utilization": lin.weight_bytes / c / cap,
        })
    layer_cycles = sum(p["cycles"] for p in per[:-1])
    head_full = TileLayout(rows=mcfg.vocab_size, cols=mcfg.hidden_size, group_size=cfg.group_size,
                           tile_rows=cfg.rows).total_bytes
    head_cycles = per[-1]["cycles"] * mcfg.vocab_size / rows
    token_cycles = layer_cycles * mcfg.num_hidden_layers + head_cycles
    weight_bytes_token = sum(lin.weight_bytes for lin in lins) * mcfg.num_hidden_layers + head_full
    # The modeled bandwidth: the cap, or less when the ports cannot reach it (HP1/HP2 shared).
    bw = run_ddr.peak_bytes_per_cycle * clock
    roof_s = weight_bytes_token / bw
    model_s = token_cycles / clock
    sim_cycles = run.get("sim_cycles") or run["counters"]["BUSY_CYCLES"]
    utils = [p["utilization_of_peak"] for p in per]
    report = {
        "schema": "kriallm.engine-bench/1",
        "kind": "modeled (RTL simulation: cycle counts of rtl/top.py in Verilator with the DDR model)",
        "preset": label, "hw_config": str(spec), "config": cfg.to_dict(), "config_hash": cfg.config_hash,
        "model_preset": args.model_preset, "layers_simulated": args.layers, "tokens": args.tokens,
        "weights": "random INT4 g%d (asymmetric, fp16 scale, 4-bit zero), .kq tile layout; the same weights for "
                   "every simulated layer" % cfg.group_size,
        "ddr_model": run_ddr.describe(),
        "ddr_model_text": run_ddr.describe_text(),
        "linears": per,
        "cycles_note": "cycles of a linear are the command processor's log for its command: from the previous "
                       "command's completion to its own. Two commands are in flight at once, so part of a "
                       "command's traffic (activation load, first tiles) falls in the previous command's period; "
                       "a utilization slightly above 100 % is that overlap. The run as a whole: see run_utilization.",
        "run_utilization": (run["counters"]["BYTES_READ"] + run["counters"]["BYTES_WRITTEN"])
                           / (run["counters"]["BUSY_CYCLES"] * cap),
        "per_token": {
            "kind": "modeled",
            "linears_cycles_per_layer": layer_cycles,
            "layers": mcfg.num_hidden_layers,
            "lm_head_cycles": head_cycles,
            "lm_head_basis": f"extrapolated linearly in rows from the {rows}-row slice "
                             f"({per[-1]['cycles']:.0f} cycles) to {mcfg.vocab_size} rows",
            "cycles": token_cycles,
            "clock_mhz": cfg.clock_mhz,
            "seconds": model_s,
            "tokens_per_s": 1.0 / model_s,
            "weight_bytes": weight_bytes_token,
            "roofline_basis": f"weight bytes per token (linears x {mcfg.num_hidden_layers} + the whole LM head, "
                              f"INT4 g{cfg.group_size} .kq layout) / the modeled bandwidth "
                              f"{bw / 1e9:.3g} GB/s (the DDR model's peak: min(cap, ports))",
            "roofline_seconds": roof_s,
            "roofline_tokens_per_s": 1.0 / roof_s,
            "ratio_to_roofline": model_s / roof_s,
        },
        "verified_bit_exact": verified,
        "simulation": {
            "sim_cycles": sim_cycles,
            "sim_wall_s": run["wall_s"],
            "sim_cycles_per_s": sim_cycles / run["wall_s"] if run["wall_s"] else None,
            "layer_linears_wall_s": run["wall_s"] * layer_cycles / sim_cycles if sim_cycles else None,
            "setup_s": setup_s, "scenario_wall_s": res["wall_s"], "built": res.get("built"),
            "counters": run["counters"], "ddr_stats": run.get("ddr"),
        },
        "acceptance": {
            "basis": "utilization of the DDR model's peak (= its cap unless HP1/HP2 are shared) per linear; "
                     "modeled time per token over the roofline",
            "utilization_min": min(utils),
            "utilization_required": ACCEPT_UTILIZATION,
            "ratio_to_roofline": model_s / roof_s,
            "ratio_required": ACCEPT_ROOFLINE_RATIO,
            "passed": min(utils) >= ACCEPT_UTILIZATION and model_s / roof_s <= ACCEPT_ROOFLINE_RATIO,
        },
    }
    report["files"] = {"json": str(out_dir / "bench.json"), "png": str(out_dir / "utilization.png")}
    plot_utilization(report, out_dir / "utilization.png")
    safe_write_text(out_dir / "bench.json", json.dumps(report, indent=1), "bench report")
    return report


def plot_utilization(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = report["linears"]
    names = [p["name"].replace("_proj", "").replace("_slice", "\n(slice)") for p in per]
    util = [100 * p["utilization"] for p in per]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bars = ax.bar(names, util, color=["#4477aa" if u >= 100 * ACCEPT_UTILIZATION else "#cc6677" for u in util])
    ax.axhline(100 * ACCEPT_UTILIZATION, color="k", ls="--", lw=1, label=f"{ACCEPT_UTILIZATION:.0%} target")
    for b, u, p in zip(bars, util, per):
        ax.text(b.get_x() + b.get_width() / 2, u + 0.5, f"{u:.1f}%\n{p['cycles']:.0f} cyc", ha="center",
                va="bottom", fontsize=7)
    ax.set_ylim(0, 112)
    ax.set_ylabel("modeled DDR bandwidth utilization (%)")
    pt = report["per_token"]
    ax.set_title(f"{report['preset']} / {report['model_preset']}, T={report['tokens']}: bytes moved per cycle vs "
                 f"the DDR model's cap (modeled)\nper token: {pt['seconds'] * 1e3:.2f} ms modeled vs "
                 f"{pt['roofline_seconds'] * 1e3:.2f} ms roofline ({pt['ratio_to_roofline']:.3f}x)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.01, report["ddr_model_text"], fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with safe_writer(path, "utilization chart") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def print_table(report: dict) -> None:
    pt = report["per_token"]
    print(f"Engine bench ({report['kind']})")
    print(f"  {report['ddr_model_text']}")
    print(f"  preset {report['preset']}, model {report['model_preset']}, {report['layers_simulated']} layer(s) "
          f"simulated, T={report['tokens']}, verified bit-exact: {report['verified_bit_exact']}")
    print()
    print(f"  {'linear':<15}{'N x K':>13}{'cycles':>10}{'us':>9}{'B/cycle':>9}{'cap':>6}{'util':>8}{'weights':>9}")
    for p in report["linears"]:
        print(f"  {p['name']:<15}{p['n']:>6} x {p['k']:<5}{p['cycles']:>10.0f}{p['time_us']:>9.2f}"
              f"{p['bytes_per_cycle']:>9.2f}{p['cap_bytes_per_cycle']:>6.0f}{p['utilization']:>8.1%}"
              f"{p['weight_utilization']:>9.1%}")
    print()
    print(f"  per token (modeled, {pt['clock_mhz']} MHz): {pt['layers']} layers x {pt['linears_cycles_per_layer']:.0f} "
          f"cycles + LM head {pt['lm_head_cycles']:.0f} cycles ({pt['lm_head_basis']})")
    print(f"    = {pt['seconds'] * 1e3:.3f} ms ({pt['tokens_per_s']:.1f} tok/s) vs roofline "
          f"{pt['roofline_seconds'] * 1e3:.3f} ms ({pt['roofline_tokens_per_s']:.1f} tok/s): "
          f"{pt['ratio_to_roofline']:.3f}x")
    print(f"    roofline: {pt['roofline_basis']}")
    print(f"  whole run: {report['run_utilization']:.1%} of the cap (every byte read and written over the busy "
          f"cycles); per-linear cycles overlap by one command (see cycles_note in the JSON)")
    s = report["simulation"]
    print(f"  simulation: {s['sim_cycles']} cycles in {s['sim_wall_s']:.1f} s = {s['sim_cycles_per_s']:.0f} cycles/s; "
          f"one layer's linears {s['layer_linears_wall_s']:.1f} s of simulation")
    a = report["acceptance"]
    print(f"  acceptance: min utilization {a['utilization_min']:.1%} (>= {a['utilization_required']:.0%}), "
          f"{a['ratio_to_roofline']:.3f}x roofline (<= {a['ratio_required']}): "
          f"{'PASS' if a['passed'] else 'FAIL'}")
    print(f"  files: {report['files']['json']}, {report['files']['png']}")


def main(argv=None) -> int:
    return run_cli("python -m sim.bench", __doc__.split("\n\n")[0], add_bench_args, run_bench, argv)


if __name__ == "__main__":
    sys.exit(main())
