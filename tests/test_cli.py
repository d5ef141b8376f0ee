"""The `kriallm` command end to end on the tiny synthetic model, and its error messages."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from sw.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ckpt, kq = d / "tiny", d / "tiny.kq"
    assert main(["synth-model", "--model-preset", "tiny", "--seed", "3", "--out", str(ckpt)]) == 0
    assert main(["quantize", str(ckpt), "--method", "awq", "--group-size", "64", "--lm-head", "int4",
                 "--quiet", "--out", str(kq)]) == 0
    return ckpt, kq


def _json_out(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_golden_from_kq_matches_in_memory_quantization(tiny, capsys, tmp_path):
    ckpt, kq = tiny
    dump = tmp_path / "logits.npy"
    out = _json_out(capsys, ["generate", str(kq), "--device", "golden", "--prompt-ids", "5,6,7",
                             "--max-new-tokens", "4", "--json", "--dump-logits", str(dump)])
    assert len(out["new_ids"]) == 4 and out["prompt_ids"] == [5, 6, 7]
    logits = np.load(dump)
    assert logits.shape == (4, 512)
    # greedy: every new token is the argmax of the logits that produced it
    assert list(logits.argmax(-1)) == out["new_ids"]


def test_generate_reference_and_sampling(tiny, capsys):
    ckpt, _ = tiny
    a = _json_out(capsys, ["generate", str(ckpt), "--device", "reference", "--prompt-ids", "1,2",
                           "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "20", "--seed", "4", "--json"])
    b = _json_out(capsys, ["generate", str(ckpt), "--device", "reference", "--prompt-ids", "1,2",
                           "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "20", "--seed", "4", "--json"])
    assert a["new_ids"] == b["new_ids"]


def test_eval_reports_metrics(tiny, capsys, tmp_path):
    ckpt, kq = tiny
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(map(str, np.random.default_rng(0).integers(0, 512, 64))))
    res = _json_out(capsys, ["eval", str(kq), "--token-file", str(toks), "--json"])
    assert 0.0 <= res["top1_agreement"] <= 1.0 and res["kl_ref_test"] >= 0 and res["perplexity"] > 1
    ref = _json_out(capsys, ["eval", str(ckpt), "--device", "reference", "--token-file", str(toks), "--json"])
    assert ref["top1_agreement"] == 1.0 and abs(ref["kl_ref_test"]) < 1e-9
    assert ref["perplexity"] == pytest.approx(res["perplexity_reference"], rel=1e-9)


def test_info(tiny, capsys):
    out = _json_out(capsys, ["info", str(tiny[1]), "--json"])
    assert out["checksums"] == "ok" and out["quant"]["method"] == "awq"


@pytest.mark.parametrize("argv,message", [
    (["generate", "/no/such/model", "--prompt-ids", "1"], "no such file"),
    (["generate", "{kq}", "--prompt-ids", "99999"], "outside the vocabulary"),
    (["generate", "{kq}", "--prompt", "hello"], "only --prompt-ids works"),
    (["generate", "{kq}"], "exactly one of --prompt"),
    (["generate", "{kq}", "--device", "reference", "--prompt-ids", "1"], "needs the checkpoint directory"),
    (["quantize", "/no/such/dir", "--out", "x.kq"], "/no/such/dir"),
    (["quantize", "{ckpt}", "--group-size", "64", "--calib", "/no/calib.txt", "--out", "{tmp}/x.kq"], "calib"),
    (["eval", "{kq}"], "exactly one of --token-file"),
    (["info", "{ckpt}"], "directory"),
    (["generate", "{kq}", "--prompt-ids", "1", "--top-p", "2"], "top-p"),
])
def test_errors_are_one_line(tiny, capsys, tmp_path, argv, message):
    ckpt, kq = tiny
    argv = [a.format(kq=kq, ckpt=ckpt, tmp=tmp_path) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0] and "Traceback" not in err[0]


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "sw.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("synth-model", "quantize", "generate", "bench", "bench-engine", "eval", "info", "elaborate",
                "resources", "build"):
        assert cmd in out


def _one_line_error(capsys, argv, *fragments):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


# --------------------------------------------------------------------------- one spelling per fact
def _tile_rows(capsys, kq) -> int:
    return _json_out(capsys, ["info", str(kq), "--json"])["tile_rows"]


def test_quantize_takes_the_tile_rows_from_the_hardware_config(tiny, capsys, tmp_path):
    from sw.contract.config import PRESETS
    ckpt, kq = tiny
    assert _tile_rows(capsys, kq) == PRESETS["kv260"].rows          # the default design
    for name in ("test-8x16-g64", "test-4x4-g32"):
        out = tmp_path / f"{name}.kq"
        assert main(["quantize", str(ckpt), "--method", "rtn", "--quiet", "--hw-config", name, "--out", str(out)]) == 0
        assert _tile_rows(capsys, out) == PRESETS[name].rows
        assert _json_out(capsys, ["info", str(out), "--json"])["quant"]["group_size"] == PRESETS[name].group_size
    # an ArrayConfig JSON file and an elaboration manifest with rows = 16
    cfg = {"rows": 16, "cols": 8, "tokens": 2, "group_size": 64, "port_bits": 512}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "manifest.json").write_text(json.dumps({"config": cfg}))
    for spec in ("cfg.json", "manifest.json"):
        out = tmp_path / f"{spec}.kq"
        assert main(["quantize", str(ckpt), "--method", "rtn", "--quiet", "--hw-config", str(tmp_path / spec),
                     "--out", str(out)]) == 0
        assert _tile_rows(capsys, out) == 16


def test_a_kq_runs_on_the_design_it_was_quantized_for(tiny, capsys, tmp_path):
    ckpt, kq = tiny
    out = tmp_path / "m8.kq"
    assert main(["quantize", str(ckpt), "--method", "rtn", "--quiet", "--hw-config", "test-8x16-g64",
                 "--out", str(out)]) == 0
    gen = _json_out(capsys, ["generate", str(out), "--device", "golden", "--hw-config", "test-8x16-g64",
                             "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json"])
    assert len(gen["new_ids"]) == 2
    # the kv260 .kq on the 8-row design: refused in one line
    _one_line_error(capsys, ["generate", str(kq), "--device", "golden", "--hw-config", "test-8x16-g64",
                             "--prompt-ids", "1,2"], "tile_rows 32")


def test_quantize_group_size_defaults_to_the_design_and_a_mismatch_is_noted(tiny, capsys, tmp_path):
    ckpt, _ = tiny
    out = tmp_path / "g.kq"
    capsys.readouterr()
    assert main(["quantize", str(ckpt), "--method", "rtn", "--quiet", "--hw-config", "test-16x8-g128",
                 "--group-size", "64", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "note" in err[0] and "128" in err[0] and "64" in err[0], err


def test_old_spellings_still_work_with_a_note(tiny, capsys, tmp_path):
    ckpt, _ = tiny
    capsys.readouterr()
    assert main(["synth-model", "--preset", "tiny", "--seed", "3", "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kriallm synth-model: note: --preset is deprecated; use --model-preset"]
    # the same checkpoint as the new spelling writes
    for f in ("config.json", "model.safetensors"):
        if (ckpt / f).exists():
            assert (tmp_path / "t" / f).read_bytes() == (ckpt / f).read_bytes()
    out = tmp_path / "r16.kq"
    assert main(["quantize", str(ckpt), "--method", "rtn", "--quiet", "--tile-rows", "16", "--out", str(out)]) == 0
    assert "--tile-rows is deprecated; use --hw-config" in capsys.readouterr().err
    assert _tile_rows(capsys, out) == 16
    capsys.readouterr()
    assert main(["quantize", str(ckpt), "--tile-rows", "16", "--hw-config", "kv260", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "deprecated" in err[0], err                # the note, then the one error
    assert "error" in err[1] and "not --tile-rows" in err[1]


def test_bench_preset_points_at_bench_engine(capsys):
    msg = _one_line_error(capsys, ["bench", "--preset", "kv260", "--model-preset", "qwen2.5-0.5b", "--layers", "1",
                                   "--json"], "kriallm bench-engine --hw-config")
    assert msg.startswith("kriallm bench: error:")
    _one_line_error(capsys, ["bench"], "MODEL.kq", "kriallm bench --help")


def test_bench_engine_parses_the_one_spelling():
    from sw.cli import build_parser, cmd_bench_engine
    a = build_parser().parse_args(["bench-engine", "--hw-config", "kv260", "--model-preset", "qwen2.5-0.5b",
                                   "--layers", "1", "--json"])
    assert a.func is cmd_bench_engine
    assert (a.hw_config, a.model_preset, a.layers, a.json, a.lm_head_rows, a.tokens) == \
        ("kv260", "qwen2.5-0.5b", 1, True, 4096, 1)
    assert build_parser().parse_args(["bench-engine"]).hw_config == "kv260"


@pytest.mark.parametrize("argv,message", [
    (["bench-engine", "--hw-config", "nope"], "neither a preset"),
    (["bench-engine", "--layers", "9"], "--layers must be 1..4"),
    (["bench-engine", "--model-preset", "qwen9"], "unknown model preset"),
    (["quantize", "{ckpt}", "--hw-config", "nope", "--out", "{tmp}/x.kq"], "neither a preset"),
    (["generate", "{kq}", "--prompt", "a", "--prompt-ids", "1"], "not allowed with"),
    (["synth-model", "--model-preset", "huge", "--out", "{tmp}/h"], "invalid choice"),
    (["quantize", "{ckpt}"], "--out"),
    (["info"], "MODEL.kq"),
])
def test_usage_errors_are_one_line(tiny, capsys, tmp_path, argv, message):
    ckpt, kq = tiny
    argv = [a.format(kq=kq, ckpt=ckpt, tmp=tmp_path) for a in argv]
    err = _one_line_error(capsys, argv, message)
    assert "Traceback" not in err and err.startswith(f"kriallm {argv[0]}")


def _help(capsys, cmd):
    capsys.readouterr()
    assert main([cmd, "--help"]) == 0
    return re.sub(r"\s+", " ", re.sub(r"-\n\s*", "-", capsys.readouterr().out))    # undo the wrapping


def test_subcommand_help_shows_defaults_and_hides_old_spellings(capsys):
    out = _help(capsys, "bench")
    assert "--preset" not in out and "bench-engine" in out and "(default: golden)" in out
    out = _help(capsys, "quantize")
    assert "--tile-rows" not in out and "--hw-config PRESET|FILE" in out and "(default: kv260)" in out
    out = _help(capsys, "synth-model")
    assert "--model-preset NAME" in out and "--preset " not in out


@pytest.mark.parametrize("argv, option", [
    (["generate", "m.kq", "--timeout", "nan"], "--timeout"),        # used to poll forever
    (["generate", "m.kq", "--timeout", "0"], "--timeout"),
    (["eval", "m.kq", "--window", "0"], "--window"),                # used to be a traceback
    (["generate", "m.kq", "--temperature", "nan"], "--temperature"),  # used to be a traceback
    (["generate", "m.kq", "--temperature", "-1"], "--temperature"),
    (["generate", "m.kq", "--top-p", "1.5"], "--top-p"),
    (["bench", "m.kq", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["quantize", "d", "--out", "x.kq", "--calib-tokens", "inf"], "--calib-tokens"),
    (["synth-model", "--model-preset", "tiny", "--out", "d", "--seed", "-1"], "--seed"),
])
def test_numeric_options_are_checked_when_parsed(argv, option):
    r = subprocess.run([sys.executable, "-m", "sw.cli", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "Traceback" not in r.stderr, r.stderr
