"""`kriallm estimate`: the fabric decoder timed from shapes alone (sw/driver/estimate.py).

The oracle is the golden device running the real model through the driver: the
estimate, which never sees a weight, must give the same accelerator cycles for
every start (prefill chunks with and without the LM head, decode at several
positions). The full-size numbers are then checked against bounds worked out
here from the weight bytes alone, and against the issue's modeled targets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sw.cli import main
from sw.config import preset as model_preset
from sw.contract.config import preset
from sw.contract.errors import ConfigError
from sw.driver.estimate import FabricEstimate
from sw.driver.fabric_model import FabricModel
from sw.driver.golden_device import GoldenDevice

FABRIC = preset("kv260-fabric-tiny")
PROMPT = [5, 17, 3, 99, 250, 7, 7, 42, 1, 0, 511, 64, 9]      # 13 tokens: chunks of 8 + 5


def _cycles(model) -> int:
    """The last forward's accelerator cycles: the BUSY_CYCLES of each start (the driver reads
    them after every run; a start clears them), as the step's modeled seconds."""
    return round(model.timings[-1].accel_s * FABRIC.clock_mhz * 1e6)


def test_estimate_equals_the_golden_device_start_by_start(make_tiny_kq):
    model = FabricModel(make_tiny_kq("int4"), GoldenDevice(FABRIC), last_logits_only=True)
    est = FabricEstimate(model_preset("tiny"), FABRIC)
    cache = model.new_cache()
    model.forward(PROMPT, cache)                      # 8 rows without the head, then 5 rows with it
    chunks = est.prefill(len(PROMPT))
    assert [(c.tokens, c.pos, c.head) for c in chunks] == [(8, 0, False), (5, 8, True)]
    assert model.timings[-1].runs == 2
    assert _cycles(model) == sum(c.cycles for c in chunks)
    for pos in range(len(PROMPT), len(PROMPT) + 3):   # decode: one row at RUN_POS = pos
        model.forward_greedy([1], cache)
        assert _cycles(model) == est.step(1, pos).cycles
    model.seek(cache, 200)                            # deeper in the cache: attention grows with depth
    model.forward_greedy([1], cache)
    deep = est.step(1, 200)
    assert _cycles(model) == deep.cycles
    assert deep.by_class["attention"] > est.step(1, 16).by_class["attention"]
    model.close()


def test_full_size_estimate_against_the_weight_roofline_and_the_targets():
    cfg, hw = model_preset("qwen2.5-0.5b"), preset("kv260-fabric")
    rep = FabricEstimate(cfg, hw).report(128, [64, 512, 2048])
    # INT4 codes (half a byte per weight) are a lower bound on the bytes a token streams; at
    # 16 GB/s the decoder's linears and the LM head cannot take less than that
    h, i, q, kv, L = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim, cfg.num_hidden_layers
    layer_weights = h * (q + 2 * kv) + q * h + 3 * h * i
    head_weights = cfg.vocab_size * h
    floor_s = (L * layer_weights + head_weights) / 2 / 16e9
    d64 = rep["by_depth"][0]
    linear_s = d64["accelerator_s_by_class"]["linears"] + d64["accelerator_s_by_class"]["lm_head"]
    assert floor_s < linear_s < 1.15 * floor_s                  # g64 scales and zeros add ~12 %
    # the modeled decode targets (issue 11: >= 50 tok/s at depth 512, >= 45 at 2048)
    tok = {r["depth"]: r["tok_s"] for r in rep["by_depth"]}
    assert tok[64] > tok[512] > tok[2048]
    assert tok[512] >= 50 and tok[2048] >= 45, tok
    assert rep["prefill"]["starts"] == 16 and rep["starts_per_token"] == 1


def test_full_size_time_to_first_token_target():
    """Issue 11: at most 0.3 s for a 128-token prompt. It holds because the norms, the RoPE of q and
    SiLU x up quantize their own results (QUANT_OUT): with a QUANT pass after each it is 0.302 s."""
    cfg, hw = model_preset("qwen2.5-0.5b"), preset("kv260-fabric")
    fused = FabricEstimate(cfg, hw).report(128, [])["time_to_first_token_s"]
    separate = FabricEstimate(cfg, hw, fuse_quant=False).report(128, [])["time_to_first_token_s"]
    assert fused <= 0.3 < separate, (fused, separate)


def test_cli_estimate_json_and_its_errors(capsys, tmp_path):
    png = tmp_path / "est.png"
    assert main(["estimate", "qwen2.5-0.5b", "--depths", "64,512", "--host-ms", "0.2", "--json",
                 "--plot", str(png)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and rep["plot"] == str(png)
    assert [r["depth"] for r in rep["by_depth"]] == [64, 512]
    assert rep["assumptions"]["host_s_per_start"] == pytest.approx(2e-4)
    r = rep["by_depth"][1]
    assert r["tok_s"] == pytest.approx(1 / (r["accelerator_s"] + 2e-4))
    for argv, words in ((["estimate", "nope"], "neither a .kq file nor a model preset"),
                        (["estimate", "qwen2.5-0.5b", "--hw-config", "kv260"], "no fabric decoder"),
                        (["estimate", "qwen2.5-0.5b", "--depths", "5000"], "longer than the KV cache"),
                        (["estimate", "tiny"], "head_dim 64")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_an_int8_head_streams_more_than_an_int4_one():
    cfg, hw = model_preset("qwen2.5-0.5b"), preset("kv260-fabric")
    i4 = FabricEstimate(cfg, hw, lm_head="int4").step(1, 64).by_class["lm_head"]
    i8 = FabricEstimate(cfg, hw, lm_head="int8").step(1, 64).by_class["lm_head"]
    assert 1.8 < i8 / i4 < 2.1
    with pytest.raises(ConfigError):
        FabricEstimate(cfg, hw, lm_head="fp16")
