#!/usr/bin/env python3
"""The README's demo: the whole chain on the synthetic `tiny` model, in a minute or two.

synth-model -> quantize (AWQ) -> generate on the float reference and on the
golden model -> eval (perplexity, top-1, KL) -> elaborate the accelerator.
Every step is a `kriallm` subcommand, so this is also what a user would type.
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
    step("1. synthesize a tiny Qwen2 checkpoint", ["synth-model", "--preset", "tiny", "--seed", "0", "--out", str(ckpt)])
    step("2. quantize it with AWQ (INT4 g64, INT4 LM head)", ["quantize", str(ckpt), "--method", "awq", "--group-size", "64",
                                                          "--lm-head", "int4", "--out", str(kq)])
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
        from rtl import elaborate  # noqa: F401
    except ImportError:
        print("\n(skipping elaboration: the hardware generator is not installed)")
    else:
        step("5. elaborate the kv260 accelerator", ["elaborate", "--preset", "kv260", "--out", str(OUT / "kv260")])
    print("\ndemo finished; outputs are in", OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
