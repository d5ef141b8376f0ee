"""The .kq loader under a fuzzer (tests/fuzz_kq.py): the regression corpus, a bounded coverage-guided
run, and the damaged headers a structured fuzzer found before the loader validated its header."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sw.contract.errors import FormatError
from sw.kq import KqFile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fuzz_kq  # noqa: E402

CORPUS = HERE / "fuzz_corpus" / "kq"
FUZZ_SECONDS = 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fuzz_kq.Base(tmp_path_factory.mktemp("kqfuzz"))


def _header(base) -> dict:
    return json.loads(base.seed_bytes)


def _load(base, h) -> None:
    assert base.write(json.dumps(h).encode())
    KqFile(base.path).to_model()


def test_the_seed_loads_as_the_original(base):
    oracle = fuzz_kq.Oracle(base)
    oracle(base.seed_bytes)
    assert oracle.loaded == 1


def test_regression_corpus_replays_clean(base):
    files = sorted(f for f in CORPUS.iterdir() if f.is_file())
    assert len(files) >= 6, "the regression corpus is missing"
    oracle = fuzz_kq.Oracle(base)
    for f in files:
        oracle(f.read_bytes())          # raises on anything but the project's error classes


def test_bounded_fuzz_run(tmp_path):
    """libFuzzer for FUZZ_SECONDS on a copy of the corpus: no crash, no accepted different model, < 2 GB."""
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    r = subprocess.run([sys.executable, str(HERE / "fuzz_kq.py"), f"-max_total_time={FUZZ_SECONDS}", "-seed=1",
                        str(corpus)], capture_output=True, text=True, timeout=FUZZ_SECONDS + 240,
                       env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1"})
    tail = r.stderr[-3000:]
    assert r.returncode == 0, tail
    done = re.search(r"Done (\d+) runs", r.stderr)
    assert done and int(done.group(1)) > 500, tail
    cov = re.findall(r"cov: (\d+)", r.stderr)
    assert cov and int(cov[-1]) > 150, tail


# The cases a structured fuzzer found in the loader before it validated its header (issue 12).

@pytest.mark.parametrize("damage, words", [
    (lambda h: h["tensors"][3].pop("role"), "role"),
    (lambda h: next(t for t in h["tensors"] if t["role"] == "linear").pop("rows"), "rows must be an integer"),
    (lambda h: h.__setitem__("quant", None), "quant must be a JSON object"),
    (lambda h: h.__setitem__("model", None), "model must be a JSON object"),
    (lambda h: h["tensors"][2].__setitem__("offset", -4096), "offset must be a non-negative"),
    (lambda h: h["model"].__setitem__("rope_theta", "1e6"), "rope_theta"),
    (lambda h: h["model"].__setitem__("rms_norm_eps", -1e-6), "rms_norm_eps"),
    (lambda h: h["model"].__setitem__("architectures", 5), "architectures"),
    (lambda h: h["model"].__setitem__("head_dim", "x"), "head_dim"),
    (lambda h: h["model"].__setitem__("quantization_config", "awq"), "quantization_config"),
])
def test_damaged_fields_name_the_field(base, damage, words):
    h = _header(base)
    damage(h)
    with pytest.raises(FormatError, match=re.escape(words)):
        _load(base, h)


def test_a_removed_bias_is_refused(base):
    """It used to load, with logits off by up to 0.3, while `info` said "checksums ok"."""
    h = _header(base)
    h["tensors"] = [t for t in h["tensors"] if not (t["name"].endswith("layers.0.self_attn.q_proj")
                                                      and t.get("part") == "bias")]
    with pytest.raises(FormatError, match="needs a bias entry"):
        _load(base, h)


def test_a_lowered_layer_count_is_refused(base):
    h = _header(base)
    h["model"]["num_hidden_layers"] -= 1
    with pytest.raises(FormatError, match="not part of the model the header describes"):
        _load(base, h)


def test_two_entries_aliasing_the_same_bytes_are_refused(base):
    h = _header(base)
    norms = [t for t in h["tensors"] if t["name"].endswith("input_layernorm.weight")]
    norms[1].update(offset=norms[0]["offset"], crc32=norms[0]["crc32"])
    with pytest.raises(FormatError, match="share bytes"):
        _load(base, h)


def test_a_billion_layers_is_refused_before_allocating(base):
    """It made `kriallm info` grow to 8 GB in 20 s."""
    import resource
    h = _header(base)
    h["model"]["num_hidden_layers"] = 10 ** 9
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError, match="num_hidden_layers"):
        _load(base, h)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000      # KiB


def test_huge_shapes_are_refused(base):
    h = _header(base)
    h["tensors"][1]["shape"] = [2 ** 70]
    with pytest.raises(FormatError, match="shape"):
        _load(base, h)
