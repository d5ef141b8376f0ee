"""Build-once, run-many cocotb runs through cocotb's Python runner.

Each (toplevel, parameter point) gets its own build directory, so pytest -k
and -n work and a rebuild happens only when the Verilog changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
from pathlib import Path

from sw.contract.errors import ToolchainError

from .toolchain import default_simulator, setup_simulator

REPO = Path(__file__).resolve().parent.parent


def _default_build_root() -> Path:
    """The per-user cache (XDG_CACHE_HOME, else ~/.cache), so an installed copy never writes into its
    source tree and every checkout shares the compiled models; KRIALLM_SIM_BUILD overrides it."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kriallm" / "sim_build"


BUILD_ROOT = Path(os.environ.get("KRIALLM_SIM_BUILD") or _default_build_root()).expanduser().resolve()

# Amaranth output trips WIDTH/UNUSED warnings that are harmless for simulation;
# lint runs (scripts/elaborate, tests/test_lint) keep -Wall and list waivers.
VERILATOR_BUILD_ARGS = ["-Wno-fatal", "-Wno-WIDTH", "-Wno-UNUSED", "-Wno-UNOPTFLAT", "-Wno-PINCONNECTEMPTY"]


def write_verilog(verilog: str, name: str) -> Path:
    """Store generated Verilog under sim_build/ keyed by its content hash."""
    digest = hashlib.sha256(verilog.encode()).hexdigest()[:16]
    d = BUILD_ROOT / "src" / f"{name}-{digest}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.v"
    if not path.exists():
        path.write_text(verilog)
    return path


def run_cocotb(*, sources: list[Path], toplevel: str, test_module: str, build_name: str,
               extra_env: dict[str, str] | None = None, simulator: str | None = None,
               test_dir: Path | None = None, waves: bool = False, timescale=("1ns", "1ps"),
               fast_compile: bool = False, build_args: list[str] | None = None) -> Path:
    """Build `sources` (once per build_name) and run cocotb module `test_module`.

    ``fast_compile`` builds Verilator's C++ without optimization (gcc -O0): large designs with
    short runs (deep function pipelines) compile several times faster and simulate a little slower.
    ``build_args`` are added to the simulator's build command (e.g. Verilator's ``--timing``).

    Raises AssertionError when any cocotb test fails or every one was skipped,
    ToolchainError when the simulator is missing. Returns the results.xml path.
    """
    sim = setup_simulator(simulator or default_simulator())
    try:
        from cocotb_tools.runner import get_runner
    except ImportError:
        raise ToolchainError("cocotb is not installed: run `pip install -e '.[sim]'`") from None
    runner = get_runner(sim)
    build_dir = BUILD_ROOT / f"{build_name}-{sim}"
    extra = list(build_args or [])
    build_args = (list(VERILATOR_BUILD_ARGS) if sim == "verilator" else []) + extra
    if fast_compile and sim == "verilator":
        build_args += ["-CFLAGS", "-O0"]     # after make's OPT_FAST on the compile line: the last -O wins
    build_dir.mkdir(parents=True, exist_ok=True)
    # pytest -n spreads one module's tests over workers: only one may build a directory.
    with _locked(build_dir / ".build.lock"):
        runner.build(sources=[str(s) for s in sources], hdl_toplevel=toplevel, build_dir=str(build_dir),
                     build_args=build_args, always=False, timescale=timescale, waves=waves)
    env = dict(extra_env or {})
    results = build_dir / f"results-{test_module}-{os.getpid()}-{next(_RUN_IDS)}.xml"
    try:
        runner.test(hdl_toplevel=toplevel, test_module=test_module, build_dir=str(build_dir),
                    test_dir=str(test_dir or build_dir), extra_env=env, waves=waves,
                    results_xml=str(results))
    except SystemExit as e:
        # Under pytest, cocotb's runner exits on a failing test; report which one instead.
        if results.exists():
            _check_results(results)
        raise AssertionError(f"simulation of {toplevel} ({test_module}) exited with status {e.code}") from None
    _check_results(results)
    return results


_RUN_IDS = itertools.count()


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_results(path: Path) -> None:
    import xml.etree.ElementTree as ET
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    if not cases:
        raise AssertionError(f"cocotb ran no test ({path})")
    if failed:
        raise AssertionError(f"cocotb test(s) failed: {', '.join(failed)} (see {path})")
    # A run that checked nothing must not pass: a skip condition or a test filter gone wrong.
    if len(skipped) == len(cases):
        reasons = sorted({s.find("skipped").get("message") or "no reason given" for s in skipped})
        raise AssertionError(f"cocotb skipped every test ({', '.join(c.get('name') for c in skipped)}: "
                             f"{'; '.join(reasons)}), so nothing was checked (see {path})")
