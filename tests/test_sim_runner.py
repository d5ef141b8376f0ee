"""The cocotb runner itself: a passing run passes, a failing cocotb test fails pytest by name, and a
run in which every cocotb test was skipped fails too (it checked nothing)."""

from pathlib import Path

import pytest
from amaranth import Elaboratable, Module, Signal
from amaranth.back import verilog

from sim.runner import _check_results, run_cocotb, write_verilog

SIM_DIR = Path(__file__).resolve().parent.parent / "sim"


class Counter(Elaboratable):
    def __init__(self):
        self.en = Signal()
        self.q = Signal(8)

    def elaborate(self, platform):
        m = Module()
        with m.If(self.en):
            m.d.sync += self.q.eq(self.q + 1)
        return m


@pytest.fixture(scope="module")
def source():
    c = Counter()
    return write_verilog(verilog.convert(c, name="selftest_counter", ports=[c.en, c.q]), "selftest_counter")


def _run(source, expect, skip=False):
    return run_cocotb(sources=[source], toplevel="selftest_counter", test_module="tb_runner_selftest",
                      build_name="selftest_counter", test_dir=SIM_DIR,
                      extra_env={"SELFTEST_EXPECT": str(expect), "SELFTEST_SKIP": "1" if skip else "0"})


@pytest.mark.sim
def test_passing_run_returns_results(source):
    assert _run(source, 10).exists()


@pytest.mark.sim
def test_failing_cocotb_test_fails_pytest_with_its_name(source):
    with pytest.raises(AssertionError, match="counter_counts"):
        _run(source, 11)


@pytest.mark.sim
def test_run_with_every_test_skipped_fails_pytest(source):
    with pytest.raises(AssertionError, match=r"skipped every test \(counter_counts"):
        _run(source, 10, skip=True)


# The verdict on a results file alone (no simulator): what cocotb 2.1 writes for each outcome.
CASE = {"pass": '<testcase name="{n}" />',
        "fail": '<testcase name="{n}"><failure message="boom" /></testcase>',
        "error": '<testcase name="{n}"><error message="crash" /></testcase>',
        "skip": '<testcase name="{n}"><skipped message="{n} was skipped" /></testcase>'}


def _results(tmp_path, *outcomes):
    cases = "".join(CASE[o].format(n=f"t{i}_{o}") for i, o in enumerate(outcomes))
    path = tmp_path / "results.xml"
    path.write_text(f'<testsuites><testsuite name="tb">{cases}</testsuite></testsuites>')
    return path


@pytest.mark.parametrize("outcomes, verdict", [
    (("pass",), None),
    (("pass", "skip"), None),                               # some tests may skip legitimately
    (("pass", "fail", "skip"), r"test\(s\) failed: t1_fail"),
    (("error",), r"test\(s\) failed: t0_error"),
    (("skip", "skip"), r"skipped every test \(t0_skip, t1_skip: t0_skip was skipped; t1_skip was skipped\)"),
    ((), "ran no test"),
])
def test_results_verdict(tmp_path, outcomes, verdict):
    path = _results(tmp_path, *outcomes)
    if verdict is None:
        _check_results(path)
    else:
        with pytest.raises(AssertionError, match=verdict):
            _check_results(path)
