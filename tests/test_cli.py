"""The `kriallm` command end to end on the tiny synthetic model, and its error messages."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sw.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ckpt, kq = d / "tiny", d / "tiny.kq"
    assert main(["synth-model", "--preset", "tiny", "--seed", "3", "--out", str(ckpt)]) == 0
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
    for cmd in ("synth-model", "quantize", "generate", "eval", "info", "elaborate", "resources"):
        assert cmd in out
