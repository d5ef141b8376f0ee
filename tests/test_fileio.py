"""Safe writes (sw/fileio.py): a file appears whole or not at all, and nothing that was there is lost.

In-process tests make the operating system fail on purpose (a full disk, a read-only file system,
an interrupt in the middle of a write); the subprocess tests run `kriallm quantize` as a user would
against a FIFO, a device node, a directory and a file-size limit.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sw.contract.errors import OutputError
from sw.fileio import safe_write_bytes, safe_writer


def _debris(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if "partial" in p.name)


def test_writes_whole_file_and_keeps_the_mode(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    safe_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _debris(tmp_path) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied"), (errno.EFBIG, "file-size limit")])
def test_os_failure_mid_write_is_one_sentence_and_leaves_the_old_file(tmp_path, monkeypatch, code, words):
    target = tmp_path / "model.kq"
    target.write_bytes(b"the good file")

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputError) as e:
        with safe_writer(target, "quantized model") as f:
            f.write(b"x" * 100_000)
    msg = str(e.value)
    assert words in msg and str(target) in msg and "\n" not in msg
    assert target.read_bytes() == b"the good file"
    assert _debris(tmp_path) == []


def test_failure_to_create_the_temporary_file(tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match="read-only"):
        safe_write_bytes(tmp_path / "x.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_mid_write_removes_the_temporary_file(tmp_path):
    target = tmp_path / "model.kq"
    target.write_bytes(b"the good file")
    with pytest.raises(KeyboardInterrupt):
        with safe_writer(target) as f:
            f.write(b"x" * 100_000)
            raise KeyboardInterrupt
    assert target.read_bytes() == b"the good file"
    assert _debris(tmp_path) == []


def test_an_exception_in_the_producer_writes_nothing(tmp_path):
    target = tmp_path / "new.bin"
    with pytest.raises(ValueError):
        with safe_writer(target) as f:
            f.write(b"half")
            raise ValueError("producer failed")
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        safe_write_bytes(tmp_path / "nope" / "x.bin", b"1")


# ---------------------------------------------------------------------------
# kriallm quantize --out <something that is not a regular file>, as a user runs it
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from sw.synth import write_synthetic_checkpoint
    d = tmp_path_factory.mktemp("fileio") / "tiny"
    write_synthetic_checkpoint(d, "tiny", seed=0)
    return d


def _quantize(ckpt: Path, out: Path, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sw.cli", "quantize", str(ckpt), "--method", "rtn",
                           "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec)


def _one_sentence(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_quantize_refuses_a_fifo(tiny_ckpt, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = _quantize(tiny_ckpt, fifo)
    _one_sentence(r, "FIFO", str(fifo))
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert _debris(tmp_path) == []


def test_quantize_refuses_a_device_node(tiny_ckpt, tmp_path):
    dev = tmp_path / "full"
    try:           # a private copy of /dev/full (char 1:7), so a regression destroys nothing real
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    r = _quantize(tiny_ckpt, dev)
    _one_sentence(r, "device", str(dev))
    assert stat.S_ISCHR(dev.stat().st_mode)
    assert _debris(tmp_path) == []


def test_quantize_refuses_a_directory_and_leaves_no_debris(tiny_ckpt, tmp_path):
    d = tmp_path / "existing"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    r = _quantize(tiny_ckpt, d)
    _one_sentence(r, "directory", str(d))
    assert (d / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_quantize_under_a_file_size_limit(tiny_ckpt, tmp_path):
    out = tmp_path / "tiny.kq"
    out.write_bytes(b"an older model")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = _quantize(tiny_ckpt, out, preexec=limit)
    _one_sentence(r, "file-size limit", str(out))
    assert out.read_bytes() == b"an older model"
    assert _debris(tmp_path) == []


def test_synth_model_under_a_file_size_limit_leaves_nothing(tmp_path):
    """It used to leave a truncated model.safetensors (issue 12); now the checkpoint appears whole or not."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, "-m", "sw.cli", "synth-model", "--model-preset", "tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, preexec_fn=limit)
    _one_sentence(r, "file-size limit")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, tiny_ckpt, monkeypatch):
    from sw.checkpoint import load_checkpoint, save_checkpoint
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ckpt = load_checkpoint(out)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="disk is full"):
        save_checkpoint(out, ckpt.config, ckpt.tensors, shard_bytes=1 << 20)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_ctrl_c_during_the_kq_write_exits_130_and_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the .kq is being written used to leave the .partial file behind."""
    import sw.kq
    from sw.cli import main

    class InterruptingPrefix:           # the prefix is the first thing written inside the safe writer
        size = sw.kq._PREFIX.size

        def pack(self, *a):
            raise KeyboardInterrupt

    out = tmp_path / "tiny.kq"
    out.write_bytes(b"an older model")
    monkeypatch.setattr(sw.kq, "_PREFIX", InterruptingPrefix())
    assert main(["quantize", str(tiny_ckpt), "--method", "rtn", "--quiet", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
    assert out.read_bytes() == b"an older model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.kq"]
