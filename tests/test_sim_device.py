"""The driver's `sim` device on the real kv260 top (slow: the kv260 Verilator builds).

* `kriallm generate --device sim` and `--device golden` on `tiny`: 8 new tokens, identical tokens,
  bit-identical logits (through the CLI, as the demo runs it).
* The full-size Qwen2.5-0.5B synthetic model: 1 new token (the prefill's), identical token and
  bit-identical logits; then `kriallm bench --device sim` on it: modeled accelerator time per
  token from RTL cycles, host time measured here.

The full-size .kq is made here (synth-model + RTN quantize, a few minutes) unless
KRIALLM_FULL_KQ names one. The fast version of the first check runs on a reduced kv260 in
tests/test_top.py::test_sim_device_runs_the_driver_bit_identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sw.cli import main as cli

pytestmark = [pytest.mark.slow, pytest.mark.sim]

PROMPT = "3,14,15,92"


def _same_bits(a: Path, b: Path) -> bool:
    x, y = np.load(a), np.load(b)
    return x.shape == y.shape and np.array_equal(x.view(np.uint32), y.view(np.uint32))


def _generate(capsys, kq, device, n, logits):
    assert cli(["generate", str(kq), "--device", device, "--hw-config", "kv260", "--prompt-ids", PROMPT,
                "--max-new-tokens", str(n), "--json", "--dump-logits", str(logits)]) == 0
    return json.loads(capsys.readouterr().out)


def test_tiny_sim_vs_golden_8_tokens_cli(tmp_path, capsys):
    assert cli(["synth-model", "--model-preset", "tiny", "--seed", "0", "--out", str(tmp_path / "tiny")]) == 0
    kq = tmp_path / "tiny.kq"
    assert cli(["quantize", str(tmp_path / "tiny"), "--method", "awq", "--group-size", "64", "--lm-head", "int4",
                "--quiet", "--out", str(kq)]) == 0
    capsys.readouterr()
    sim = _generate(capsys, kq, "sim", 8, tmp_path / "sim.npy")
    gold = _generate(capsys, kq, "golden", 8, tmp_path / "gold.npy")
    assert len(sim["new_ids"]) == 8
    assert sim["new_ids"] == gold["new_ids"]
    assert _same_bits(tmp_path / "sim.npy", tmp_path / "gold.npy")


def test_full_size_sim_vs_golden_1_token(full_kq, tmp_path, capsys):
    capsys.readouterr()
    sim = _generate(capsys, full_kq, "sim", 1, tmp_path / "sim.npy")
    gold = _generate(capsys, full_kq, "golden", 1, tmp_path / "gold.npy")
    assert sim["new_ids"] == gold["new_ids"] and len(sim["new_ids"]) == 1
    assert np.load(tmp_path / "sim.npy").shape == (1, 151936)
    assert _same_bits(tmp_path / "sim.npy", tmp_path / "gold.npy")


def test_full_size_bench_on_sim(full_kq, capsys):
    assert cli(["bench", str(full_kq), "--device", "sim", "--prompt-len", "4", "--max-new-tokens", "2",
                "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    with capsys.disabled():
        print("\nbench --device sim, full size:", json.dumps({k: rep[k] for k in (
            "decode_tok_s", "decode_tok_s_accelerator_only", "time_to_first_token_s", "per_token")}, indent=1))
    pt = rep["per_token"]
    assert pt["accelerator_kind"].startswith("modeled")
    # Every linear and the LM head stream 266 MB of INT4 weights per token at <= 16 GB/s:
    # the modeled accelerator time cannot beat the bandwidth roofline (16.6 ms).
    assert pt["weight_bytes"] > 250e6
    assert pt["accelerator_s"] >= pt["weight_bytes"] / 16e9
    assert pt["accelerator_s"] <= 1.15 * pt["weight_bytes"] / 16e9
    assert rep["decode_tok_s"] == pytest.approx(1.0 / (pt["host_s"] + pt["accelerator_s"]))
