#!/usr/bin/env python3
"""The README's demo: the whole chain on the synthetic `tiny` model (about 12 minutes with cold builds).

synth-model -> quantize (AWQ) -> generate on the float reference and on the
golden model -> eval (perplexity, top-1, KL) -> elaborate the accelerator ->
generate on the accelerator RTL in Verilator (--device sim) and check tokens and
logits bit for bit against --device golden -> the engine bench: the modeled
KV260 decode rate of the full-size Qwen2.5-0.5B, with its assumptions -> the
whole decoder on the fabric (kv260-fabric-tiny) on the RTL against golden, and
the bench of both splits on the RTL -> the modeled rate of the full-size model on
the kv260-fabric design (`kriallm estimate`, from its shapes).
Every step is a `kriallm` subcommand, so this is also what a user would type.
The first --device sim run of each design builds its top in Verilator (a few
minutes, cached in ~/.cache/kriallm/sim_build); the benches reuse those builds.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sw.cli import main as kriallm  # noqa: E402

OUT = REPO / "demo"


def step(title: str, argv: list[str], capture_json: bool = False):
    print(f"\n== {title}\n$ kriallm {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    t0 = time.perf_counter()
    buf = StringIO()
    if capture_json:
        with redirect_stdout(buf):
            rc = kriallm(argv)
    else:
        rc = kriallm(argv)
    if rc:
        sys.exit(f"demo step failed: {title}")
    print(f"   ({time.perf_counter() - t0:.1f} s)")
    return json.loads(buf.getvalue()) if capture_json else None


def main() -> int:
    OUT.mkdir(exist_ok=True)
    ckpt, kq = OUT / "tiny", OUT / "tiny.kq"
    prompt = "3,14,15,92,65"
    step("1. synthesize a tiny Qwen2 checkpoint", ["synth-model", "--model-preset", "tiny", "--seed", "0", "--out", str(ckpt)])
    step("2. quantize it with AWQ for the kv260 design (INT4 g64, INT4 LM head)",
         ["quantize", str(ckpt), "--hw-config", "kv260", "--method", "awq", "--group-size", "64", "--lm-head", "int4",
          "--out", str(kq)])
    ref = step("3a. generate on the float reference", ["generate", str(ckpt), "--device", "reference",
                                                       "--prompt-ids", prompt, "--max-new-tokens", "8", "--json"], True)
    gold = step("3b. generate on the golden model (the accelerator's exact arithmetic)",
                ["generate", str(kq), "--device", "golden", "--prompt-ids", prompt, "--max-new-tokens", "8", "--json"], True)
    print(f"   reference tokens: {ref['new_ids']}\n   golden tokens   : {gold['new_ids']}")
    # Synthetic models have no corpus: evaluate on text the float model itself samples.
    from sw.runtime import open_model, sample_tokens
    tokens = OUT / "eval_tokens.txt"
    tokens.write_text(" ".join(map(str, sample_tokens(open_model(ckpt, "reference"), 256, seed=1))))
    ev = step("4. evaluate golden vs reference", ["eval", str(kq), "--token-file", str(tokens), "--json"], True)
    print(f"   perplexity golden {ev['perplexity']:.3f} vs reference {ev['perplexity_reference']:.3f}, "
          f"top-1 agreement {ev['top1_agreement']:.3f}, KL {ev['kl_ref_test']:.2e}")
    try:
        import amaranth  # noqa: F401
        import cocotb  # noqa: F401
        from boards import elaborate  # noqa: F401
    except ImportError:
        print("\n(skipping elaboration and simulation: the hardware/simulation tools are not installed)")
        print("\ndemo finished; outputs are in", OUT)
        return 0
    step("5. elaborate the kv260 accelerator", ["elaborate", "--hw-config", "kv260", "--out", str(OUT / "kv260")])
    sim_logits, gold_logits = OUT / "logits_sim.npy", OUT / "logits_golden.npy"
    sim = step("6a. generate on the kv260 accelerator RTL (Verilator + DDR model)",
               ["generate", str(kq), "--device", "sim", "--hw-config", "kv260", "--prompt-ids", prompt,
                "--max-new-tokens", "8", "--json", "--dump-logits", str(sim_logits)], True)
    gold6 = step("6b. the same on the golden device model", ["generate", str(kq), "--device", "golden", "--hw-config", "kv260",
                                                     "--prompt-ids", prompt, "--max-new-tokens", "8", "--json",
                                                     "--dump-logits", str(gold_logits)], True)
    import numpy as np
    a, b = np.load(sim_logits), np.load(gold_logits)
    same_logits = a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    print(f"   sim tokens   : {sim['new_ids']}\n   golden tokens: {gold6['new_ids']}")
    same_tokens = sim["new_ids"] == gold6["new_ids"]
    print(f"   check: tokens {'identical' if same_tokens else 'DIFFER'}, logits "
          f"{'bit-identical' if same_logits else 'DIFFER'} ({a.shape[0]} steps x {a.shape[1]} logits)")
    if not (same_tokens and same_logits):
        sys.exit("demo check failed: --device sim and --device golden disagree")
    bench = step("7. engine bench: one Qwen2.5-0.5B decoder layer + LM-head slice on the kv260 RTL",
                 ["bench-engine", "--hw-config", "kv260", "--model-preset", "qwen2.5-0.5b", "--layers", "1", "--json",
                  "--out", str(OUT / "bench")], True)
    pt, ddr = bench["per_token"], bench["ddr_model"]
    print(f"   modeled KV260 decode of the full-size Qwen2.5-0.5B, accelerator time (every linear + LM head "
          f"on the fabric):\n   {pt['seconds'] * 1e3:.2f} ms/token = at most {pt['tokens_per_s']:.1f} tok/s, "
          f"{pt['ratio_to_roofline']:.3f}x the bandwidth roofline ({pt['roofline_tokens_per_s']:.1f} tok/s); "
          f"the paper measured 5.1 tok/s on the board.")
    print(f"   assumptions (modeled, not measured on a board): {bench['ddr_model_text']}; the read latency "
          f"of {ddr['read_latency_cycles']} cycles is assumed.\n"
          f"   The host's share per token (attention, norms, sampling on the A53) is not in this number; "
          f"`kriallm bench MODEL.kq --device sim` reports it as measured on this machine.")
    fabric_demo(kq)
    print("\ndemo finished; outputs are in", OUT)
    return 0


def fabric_demo(kq: Path) -> None:
    """Step 8: the whole decoder on the fabric (kv260-fabric-tiny: the kv260 linears plus the fabric
    engines built for `tiny`): a 12-token prompt (prefill chunks of 8 + 4) and 8 new tokens on the RTL,
    bit for bit against golden; then the bench of both splits on the RTL (modeled accelerator time
    from RTL cycles, host time measured here, register accesses per token)."""
    import numpy as np
    hw = ["--hw-config", "kv260-fabric-tiny"]
    prompt = "3,14,15,92,65,35,89,79,32,38,46,26"
    sim_logits, gold_logits = OUT / "logits_fabric_sim.npy", OUT / "logits_fabric_golden.npy"
    sim = step("8a. the whole decoder on the fabric: generate on the kv260-fabric-tiny RTL (Verilator + DDR model), "
               "one start per token", ["generate", str(kq), "--device", "sim", *hw, "--prompt-ids", prompt,
                                       "--max-new-tokens", "8", "--json", "--dump-logits", str(sim_logits)], True)
    gold = step("8b. the same on the golden device model", ["generate", str(kq), "--device", "golden", *hw,
                                                            "--prompt-ids", prompt, "--max-new-tokens", "8", "--json",
                                                            "--dump-logits", str(gold_logits)], True)
    a, b = np.load(sim_logits), np.load(gold_logits)
    same_logits = a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    same_tokens = sim["new_ids"] == gold["new_ids"]
    print(f"   sim tokens   : {sim['new_ids']}\n   golden tokens: {gold['new_ids']}")
    print(f"   check: tokens {'identical' if same_tokens else 'DIFFER'}, logits "
          f"{'bit-identical' if same_logits else 'DIFFER'} ({a.shape[0]} steps x {a.shape[1]} logits)")
    if not (same_tokens and same_logits):
        sys.exit("demo check failed: the fabric decoder on --device sim and --device golden disagree")
    step("8c. bench both splits on the RTL: tok/s, host vs accelerator time, register accesses per token",
         ["bench", str(kq), "--device", "sim", *hw, "--prompt-len", "12", "--max-new-tokens", "4",
          "--depths", "64,192", "--depth-tokens", "1", "--plot", str(OUT / "tps_by_depth.png")])
    print(f"   plot of tok/s against context depth: {OUT / 'tps_by_depth.png'}")
    est = step("8d. the modeled end-to-end rate of the full-size Qwen2.5-0.5B (INT4 g64, INT4 LM head) on the "
               "kv260-fabric design, from its shapes (no model file)",
               ["estimate", "qwen2.5-0.5b", "--hw-config", "kv260-fabric", "--prompt-len", "128",
                "--depths", "64,512,2048", "--json", "--plot", str(OUT / "tps_full_size_modeled.png")], True)
    for d in est["by_depth"]:
        print(f"   decode at context depth {d['depth']:>4}: {d['tok_s']:6.2f} tok/s (modeled)")
    print(f"   time to first token, 128-token prompt: {est['time_to_first_token_s']:.3f} s (modeled, "
          f"{est['prefill']['starts']} starts of {est['hardware']['token_lanes']} token lanes)")
    a = est["assumptions"]
    print(f"   assumptions (modeled, not measured on a board): {a['clock_mhz']:.0f} MHz, {a['cap_GB_s']:.0f} GB/s "
          f"PL->DDR, vector ops {a['vector_lanes']} lanes, attention {a['attn_macs']} MACs x {a['attn_exp_lanes']} exp "
          f"lanes, host {a['host_s_per_start'] * 1e3:.2f} ms per start (measured on x86, not the board's A53)")


if __name__ == "__main__":
    sys.exit(main())
