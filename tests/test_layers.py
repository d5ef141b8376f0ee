"""The package layers of docs/contract.md, enforced by import-linter (pyproject.toml).

The test runs `lint-imports` on the real tree, then on a copy with one forbidden
import added, to show that the contract is not vacuous: the copy must fail and
name the offending import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sw", "rtl", "sim", "boards")


def _lint(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or pytest.fail("lint-imports is not installed (pip install -e '.[dev]')")
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([exe, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def _copy_tree(dst: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.v", "hdl"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


def test_the_tree_keeps_its_layers():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("victim, line, contract", [
    # the contract reaching up into the RTL
    ("sw/contract/numerics.py", "from rtl import top", "layers: one direction of arrows"),
    # the driver importing the simulator instead of letting it plug in
    ("sw/driver/device.py", "import sim.device", "layers: one direction of arrows"),
    # the RTL reading a fact from the model files
    ("rtl/engine.py", "from sw.kq import KqFile", "rtl: contract facts only"),
    # the contract pulling in Amaranth
    ("sw/contract/config.py", "import amaranth", "contract: numpy and stdlib only"),
])
def test_a_forbidden_import_fails_the_lint(tmp_path, victim, line, contract):
    _copy_tree(tmp_path)
    path = tmp_path / victim
    path.write_text(path.read_text() + f"\n{line}  # injected by tests/test_layers.py\n")
    r = _lint(tmp_path)
    assert r.returncode != 0, r.stdout
    broken = [ln for ln in r.stdout.splitlines() if ln.strip().endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), r.stdout
    assert victim.replace("/", ".").removesuffix(".py") in r.stdout


def test_every_sw_module_has_a_layer():
    """A new module in sw/ must be placed in a layer, or the contract silently ignores it."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in cfg if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    modules = {f"sw.{p.stem}" for p in (ROOT / "sw").glob("*.py") if p.stem != "__init__"}
    modules |= {f"sw.{p.name}" for p in (ROOT / "sw").iterdir() if (p / "__init__.py").exists()}
    assert modules - named == set(), f"modules of sw/ in no layer: {sorted(modules - named)}"
