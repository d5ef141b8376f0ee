"""Yosys resource counts: the folding into K26 classes, DSP packing, memory mapping, and stored baselines.

`kriallm resources` synthesizes the whole accelerator top by default (scope
``full``: rtl.top.Accelerator as the board build makes it); scope ``engine``
is the compute only (LinearCore x engines). The default test set synthesizes a
small preset (about 1 min each); the kv260 full top takes about 10-20 min and is
``slow``.

Baselines live in tests/baselines/resources_<preset>.json (scope full) and
resources_<preset>_<scope>.json (other scopes). After an intended hardware
change, regenerate them with

    KRIALLM_UPDATE_BASELINES=1 pytest tests/test_resources.py -m "slow or not slow"
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from sw.contract.config import preset
from boards.resources import BUDGET_PERCENT, count_resources, memory_mapping, memory_summary, resource_report

BASELINES = Path(__file__).resolve().parent / "baselines"
TOLERANCE = 0.10          # relative, per resource class
ABS_SLACK = 2             # for classes with a handful of cells
COMPARED = ("LUT", "FF", "CARRY8", "DSP", "BRAM36", "URAM")
SMALL = "test-4x4-g32"


def test_count_resources_folds_primitives():
    cells = {"LUT1": 1, "LUT2": 2, "LUT6": 3, "INV": 4, "RAM64M8": 2, "SRL16E": 5, "FDRE": 10, "FDSE": 1,
             "FDCE": 2, "FDPE": 3, "CARRY4": 5, "CARRY8": 1, "DSP48E2": 7, "RAMB36E2": 2, "RAMB18E2": 3,
             "URAM288": 1, "MUXF7": 2, "BUFG": 1}
    r = count_resources(cells, multiplier=2)
    assert r["LUT_logic"] == 2 * 10 and r["LUT_memory"] == 2 * (16 + 5) and r["LUT"] == 2 * 31
    assert r["FF"] == 32 and r["CARRY8"] == 2 * (1 + 3) and r["DSP"] == 14
    assert r["BRAM36"] == 2 * 3.5 and r["URAM"] == 2


def test_memory_mapping_reads_the_yosys_log():
    log = ("2.24. Executing MEMORY_LIBMAP pass (mapping memories to cells).\n"
           "mapping memory kriallm_top.actbuf.codes via $__XILINX_BLOCKRAM_TDP_\n"
           "mapping memory kriallm_top.rd0.bursts.storage via $__XILINX_LUTRAM_SDP_\n"
           "using FF mapping for memory kriallm_top.tiny\n")
    mapping = memory_mapping(log)
    assert mapping == {"kriallm_top.actbuf.codes": "XILINX_BLOCKRAM_TDP",
                       "kriallm_top.rd0.bursts.storage": "XILINX_LUTRAM_SDP", "kriallm_top.tiny": "FF"}
    assert memory_summary(mapping) == {"count": 3, "by_cell": {"FF": 1, "XILINX_BLOCKRAM_TDP": 1,
                                                               "XILINX_LUTRAM_SDP": 1},
                                       "in_flip_flops": ["kriallm_top.tiny"]}


def _baseline_path(name: str, scope: str) -> Path:
    return BASELINES / (f"resources_{name}.json" if scope == "full" else f"resources_{name}_{scope}.json")


def _check_baseline(name: str, rep: dict) -> None:
    path = _baseline_path(name, rep["scope"])
    if os.environ.get("KRIALLM_UPDATE_BASELINES"):
        BASELINES.mkdir(exist_ok=True)
        keep = {k: rep[k] for k in ("preset", "config", "config_hash", "scope", "synthesized", "top", "multiplier",
                                    "tool", "command", "used", "utilization_percent", "budget", "memories", "cells",
                                    "seconds") if k in rep}
        path.write_text(json.dumps(keep, indent=2) + "\n")
        return
    assert path.exists(), f"no baseline {path}; create it with KRIALLM_UPDATE_BASELINES=1"
    base = json.loads(path.read_text())
    assert base["config_hash"] == rep["config_hash"], (
        f"preset {name} changed since {path.name} was recorded; regenerate the baseline")
    off = {}
    for k in COMPARED:
        b, u = base["used"][k], rep["used"][k]
        if abs(u - b) > max(TOLERANCE * b, ABS_SLACK):
            off[k] = (b, u)
    assert not off, f"{name}: resources moved beyond ±{TOLERANCE:.0%} of {path.name}: {off} (baseline, now)"
    if "memories" in base:
        assert rep["memories"]["by_cell"] == base["memories"]["by_cell"], (
            f"{name}: memories map differently from {path.name}")


def _check_memories(rep: dict) -> None:
    """Buffers and FIFOs land in block RAM, UltraRAM or LUT RAM, never in flip-flops (Yosys memory_libmap)."""
    mem = rep["memories"]
    assert mem["count"] > 0 and mem["in_flip_flops"] == [], mem
    mapping = mem["mapping"]
    # the activation buffer's code memory (T x 128 bits x 2 max_k/16 words) is block RAM (or UltraRAM)
    codes = [cell for name, cell in mapping.items() if name.endswith("actbuf.codes")]
    assert codes and all("BLOCKRAM" in c or "HUGERAM" in c for c in codes), mapping
    assert rep["used"]["BRAM36"] + rep["used"]["URAM"] > 0 and rep["used"]["LUT_memory"] > 0


@pytest.mark.synth
def test_dsp_packing_halves_multipliers():
    """Same array, packing on vs off: one DSP48E2 per product pair vs one per product."""
    cfg = dataclasses.replace(preset(SMALL), engines=1)
    products = cfg.rows * cfg.cols * cfg.tokens
    on = resource_report(dataclasses.replace(cfg, dsp_packing=True), scope="array")
    off = resource_report(dataclasses.replace(cfg, dsp_packing=False), scope="array")
    assert off["used"]["DSP"] == products
    assert on["used"]["DSP"] == products // 2


@pytest.mark.synth
def test_small_full_top_matches_baseline():
    """The whole accelerator top (DMA masters, CSRs, command processor, activation buffer, engine)."""
    rep = resource_report(preset(SMALL), preset_name=SMALL)
    assert rep["scope"] == "full" and rep["synthesized"] == "kriallm_top"
    assert rep["top"]["parameters"]["config_hash"] == preset(SMALL).config_hash
    _check_memories(rep)
    # the top is more than its compute: at least the engine scope's LUTs, DSPs exactly the engine's
    engine = json.loads(_baseline_path(SMALL, "engine").read_text())["used"]
    assert rep["used"]["LUT"] > engine["LUT"] and rep["used"]["DSP"] >= engine["DSP"]
    _check_baseline(SMALL, rep)


@pytest.mark.synth
def test_small_engine_matches_baseline():
    _check_baseline(SMALL, resource_report(preset(SMALL), scope="engine", preset_name=SMALL))


@pytest.mark.slow
@pytest.mark.synth
def test_kv260_full_top_fits_the_budget():
    """Acceptance: the whole kv260 top within 60 % LUT and 50 % DSP of the K26 (Yosys estimate)."""
    rep = resource_report(preset("kv260"), preset_name="kv260")
    assert rep["scope"] == "full" and rep["config"]["engines"] == preset("kv260").engines
    _check_memories(rep)
    util = rep["utilization_percent"]
    assert util["LUT"] < BUDGET_PERCENT["LUT"] and util["DSP"] < BUDGET_PERCENT["DSP"], util
    assert rep["budget"]["fits"]
    _check_baseline("kv260", rep)


@pytest.mark.slow
@pytest.mark.synth
@pytest.mark.parametrize("name", ["kv260", "kv260-nopack"])
def test_kv260_engine_matches_baseline(name):
    rep = resource_report(preset(name), scope="engine", preset_name=name)
    _check_baseline(name, rep)


@pytest.mark.slow
@pytest.mark.synth
def test_kv260_fabric_full_top_dsp_and_memories_fit():
    """The KV260 build's top with the fabric decoder (about 30-60 min of Yosys): issue 11's budget
    (< 75 % of the K26's LUTs, < 60 % of its DSP48E2) and the K26's block RAM and UltraRAM hold,
    every memory is block, Ultra or LUT RAM except small ROMs (constant tables of the engines'
    control, mapped to LUT logic), and the counts match the baseline."""
    rep = resource_report(preset("kv260-fabric"), preset_name="kv260-fabric")
    assert rep["scope"] == "full" and rep["budget"]["DSP_percent_max"] == 60
    util = rep["utilization_percent"]
    assert util["LUT"] < 75 and util["DSP"] < 60 and util["BRAM36"] <= 100 and util["URAM"] <= 100, util
    mem = rep["memories"]
    assert all("proc_rom" in name for name in mem["in_flip_flops"]), mem["in_flip_flops"]
    _check_baseline("kv260-fabric", rep)
