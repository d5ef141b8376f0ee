"""Yosys resource counts: the folding into K26 classes, DSP packing, and stored baselines.

Baselines live in tests/baselines/resources_<preset>.json. After an intended
hardware change, regenerate them with

    KRIALLM_UPDATE_BASELINES=1 pytest tests/test_resources.py -m "slow or not slow"
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from rtl.config import preset
from rtl.resources import count_resources, resource_report

BASELINES = Path(__file__).resolve().parent / "baselines"
TOLERANCE = 0.10          # relative, per resource class
ABS_SLACK = 2             # for classes with a handful of cells
COMPARED = ("LUT", "FF", "CARRY8", "DSP", "BRAM36", "URAM")


def test_count_resources_folds_primitives():
    cells = {"LUT1": 1, "LUT2": 2, "LUT6": 3, "INV": 4, "RAM64M8": 2, "SRL16E": 5, "FDRE": 10, "FDSE": 1,
             "FDCE": 2, "FDPE": 3, "CARRY4": 5, "CARRY8": 1, "DSP48E2": 7, "RAMB36E2": 2, "RAMB18E2": 3,
             "URAM288": 1, "MUXF7": 2, "BUFG": 1}
    r = count_resources(cells, multiplier=2)
    assert r["LUT_logic"] == 2 * 10 and r["LUT_memory"] == 2 * (16 + 5) and r["LUT"] == 2 * 31
    assert r["FF"] == 32 and r["CARRY8"] == 2 * (1 + 3) and r["DSP"] == 14
    assert r["BRAM36"] == 2 * 3.5 and r["URAM"] == 2


def _check_baseline(name: str, rep: dict) -> None:
    path = BASELINES / f"resources_{name}.json"
    if os.environ.get("KRIALLM_UPDATE_BASELINES"):
        BASELINES.mkdir(exist_ok=True)
        keep = {k: rep[k] for k in ("preset", "config", "config_hash", "scope", "synthesized", "multiplier",
                                    "tool", "command", "used", "utilization_percent", "cells")}
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


@pytest.mark.sim
def test_dsp_packing_halves_multipliers():
    """Same array, packing on vs off: one DSP48E2 per product pair vs one per product."""
    cfg = dataclasses.replace(preset("test-4x4-g32"), engines=1)
    products = cfg.rows * cfg.cols * cfg.tokens
    on = resource_report(dataclasses.replace(cfg, dsp_packing=True), scope="array")
    off = resource_report(dataclasses.replace(cfg, dsp_packing=False), scope="array")
    assert off["used"]["DSP"] == products
    assert on["used"]["DSP"] == products // 2


@pytest.mark.sim
def test_small_preset_matches_baseline():
    name = "test-4x4-g32"
    _check_baseline(name, resource_report(preset(name), scope="engine", preset_name=name))


@pytest.mark.slow
@pytest.mark.sim
@pytest.mark.parametrize("name", ["kv260", "kv260-nopack"])
def test_kv260_matches_baseline(name):
    rep = resource_report(preset(name), scope="engine", preset_name=name)
    _check_baseline(name, rep)
    if name == "kv260":
        assert rep["budget"]["fits"], rep["utilization_percent"]
