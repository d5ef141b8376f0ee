"""The host driver: one Device interface, three backends, the decode loop and the bench report.

    from sw.driver import open_device, AcceleratedModel
    dev = open_device("golden", args)               # or "kv260" (or "sim", once it exists)
    model = AcceleratedModel("model.kq", dev)       # loads weights, builds the command list
    sw.runtime.generate(model, prompt_ids, 8, sampler)

The CLI wires `add_device_args(parser)` into `generate`/`bench` and calls
`open_accelerated(path, device_name, args)`; `bench_report(model, ...)` gives the
JSON of `kriallm bench --json`. See docs/driver.md.

Importing this package pulls in neither Amaranth nor cocotb (the board has neither).
"""

from __future__ import annotations

import argparse

from ..argtypes import float_range, int_range
from ..contract.errors import ConfigError, DeviceError
from .device import (Buffer, Device, ExpectedHardware, Identity, RunStats, check_identity, check_model,
                     expected_hardware, hardware_config)

DEVICE_NAMES = ("golden", "sim", "kv260")
SPLITS = ("auto", "fabric", "hybrid")

# Backends outside the driver plug in through this entry-point group (pyproject.toml): the RTL
# simulation backend, sim.device:open_sim_device, registers itself as "sim". The driver never
# imports it, so the board install (no Amaranth, no cocotb) stays free of it.
DEVICE_ENTRY_POINTS = "kriallm.devices"


def _plugin_opener(name: str):
    """The opener a package registered for device `name`, or None if none did."""
    from importlib.metadata import entry_points
    for ep in entry_points(group=DEVICE_ENTRY_POINTS):
        if ep.name != name:
            continue
        try:
            return ep.load()
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)
            raise DeviceError(f"the {name} device is not available ({missing} could not be imported): it needs "
                              f"the simulation tools (pip install -e '.[hw,sim]')") from None
    if name == "sim":
        raise DeviceError("the sim device is not registered: install kriallm with pip install -e '.[hw,sim]' "
                          f"(it plugs in through the {DEVICE_ENTRY_POINTS!r} entry points)")
    return None

__all__ = ["Buffer", "Device", "ExpectedHardware", "Identity", "RunStats", "check_identity", "check_model",
           "expected_hardware", "hardware_config", "DEVICE_NAMES", "add_device_args", "open_device",
           "open_accelerated", "AcceleratedModel", "bench_report", "depth_sweep"]


def __getattr__(name):
    if name in ("AcceleratedModel", "bench_report", "StepTiming", "depth_sweep"):
        from . import runner
        return getattr(runner, name)
    raise AttributeError(name)


def _int0(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer such as 0xA0000000, got {text!r}") from None


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """The driver's options (not --device itself, whose choices the command owns)."""
    g = parser.add_argument_group("accelerator device options (golden, sim, kv260)")
    g.add_argument("--hw-config", metavar="PRESET|FILE", default=None,
                   help="golden/sim: the hardware config to model, a preset of sw/contract/config.py or an "
                        "ArrayConfig JSON / elaboration manifest.json (default: kv260); kv260: the loaded design "
                        "is read from the board")
    g.add_argument("--manifest", metavar="FILE", default=None,
                   help="the elaboration manifest.json of the loaded design; the driver refuses a design whose "
                        "CONFIG_HASH differs (kv260: default /lib/firmware/xilinx/APP/manifest.json with --app)")
    g.add_argument("--timeout", type=float_range(0.0, 1e6, lo_open=True), default=5.0, metavar="S",
                   help="seconds to wait for one command run before giving up (default: %(default)s)")
    g.add_argument("--split", choices=SPLITS, default="auto",
                   help="what runs on the accelerator: fabric = the whole decoder, one start per token; hybrid = "
                        "the linear layers only, the host does the rest (the paper's split); auto = fabric when "
                        "the design has the fabric decoder (HW_PARAMS3), else hybrid (default: %(default)s)")
    g.add_argument("--context", type=int_range(1, 1 << 20), default=None, metavar="N",
                   help="fabric split: KV-cache positions to allocate (default: the design's max_context)")
    g.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="run q/k/v and gate/up as separate starts instead of one start each")
    k = parser.add_argument_group("kv260 options")
    k.add_argument("--kv260-access", choices=["auto", "pynq", "uio", "devmem"], default="auto",
                   help="registers and buffers through PYNQ (MMIO + allocate), UIO + u-dma-buf, or /dev/mem + "
                        "u-dma-buf; auto (the default) = PYNQ when installed, else devmem with --mem-base, else uio")
    k.add_argument("--app", metavar="NAME", help="the xmutil app the design was loaded as (finds its manifest)")
    k.add_argument("--uio", default=None, metavar="NAME",
                   help="name of the accelerator's UIO device (/sys/class/uio/uio*/name; default: the build "
                        "manifest's, else kriallm)")
    k.add_argument("--mem-base", type=_int0, metavar="ADDR",
                   help="physical address of the register window, to use /dev/mem instead of UIO "
                        "(0xA0000000 in the board build)")
    k.add_argument("--udmabuf", default=None, metavar="NAME",
                   help="u-dma-buf device (default: the build manifest's, else udmabuf-kriallm, else udmabuf0)")
    k.add_argument("--udmabuf-sync", choices=["combined", "separate"], default="combined",
                   help="u-dma-buf cache sync: one write of offset/size/direction to sync_for_* (u-dma-buf "
                        ">= 3.2) or sync_offset/sync_size/sync_direction then sync_for_* (older) (default: "
                        "%(default)s)")
    k.add_argument("--irq", action="store_true", help="wait on the UIO interrupt instead of polling STATUS")
    k.add_argument("--bitstream", metavar="FILE.bit", help="PYNQ: load this overlay (needs the .hwh beside it)")
    k.add_argument("--no-manifest-check", dest="manifest_check", action="store_false",
                   help="with --app but no manifest.json beside the app: run anyway, without checking the "
                        "design's config hash against the one the .kq expects (a warning says so)")
    k.add_argument("--firmware-root", default="/lib/firmware/xilinx", help=argparse.SUPPRESS)
    k.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    k.add_argument("--dev-root", default="/dev", help=argparse.SUPPRESS)


def _arg(args, name, default=None):
    return getattr(args, name, default) if args is not None else default


def open_device(name: str, args=None) -> Device:
    """A Device for `name` with the options of add_device_args (args may be None: defaults)."""
    if name == "golden":
        from .golden_device import GoldenDevice
        return GoldenDevice(hardware_config(_arg(args, "hw_config") or "kv260"))
    if name == "kv260":
        from .kv260 import open_kv260
        return open_kv260(args)
    opener = _plugin_opener(name)
    if opener is not None:
        return opener(args)
    raise ConfigError(f"unknown device {name!r}; choose from {', '.join(DEVICE_NAMES)}")


def expected_from_args(name: str, args) -> ExpectedHardware | None:
    """The design the user says is loaded: --manifest, or the app's manifest on the board.

    With --app and no manifest beside the app, the config hash cannot be checked: that is refused
    unless --no-manifest-check is given, and then a warning says so."""
    manifest = _arg(args, "manifest")
    app = _arg(args, "app")
    if manifest is None and name == "kv260" and app:
        import sys
        from pathlib import Path
        p = Path(_arg(args, "firmware_root") or "/lib/firmware/xilinx") / app / "manifest.json"
        if p.is_file():
            manifest = p
        elif _arg(args, "manifest_check", True):
            raise DeviceError(f"app {app!r} has no {p}, so the loaded design's config hash cannot be checked "
                              f"against the .kq; pass --manifest FILE (the build's manifest.json) or "
                              f"--no-manifest-check to run unchecked")
        else:
            print(f"kriallm: warning: app {app!r} has no {p}; the design's config hash was not checked",
                  file=sys.stderr)
    return expected_hardware(manifest) if manifest else None


def open_accelerated(model_path, name: str, args=None, device: Device | None = None, *,
                     last_logits_only: bool = False):
    """Open `name`, check its identity against the manifest, load the .kq: a FabricModel (the whole
    decoder on the device) or an AcceleratedModel (the hybrid split), per --split; both are drop-ins
    for sw.runtime.OpenModel. last_logits_only=True for generate/bench (a prefill then runs the LM
    head for the last prompt token only); False for eval, which needs every position."""
    from .runner import AcceleratedModel
    dev = device or open_device(name, args)
    try:
        expected = expected_from_args(name, args)
        split = _arg(args, "split", "auto") or "auto"
        if split not in SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
        if split == "auto":
            split = "fabric" if dev.check_identity(expected).limits.fabric_ops else "hybrid"
        if split == "fabric":
            from .fabric_model import FabricModel
            model = FabricModel(model_path, dev, expected=expected, timeout_s=_arg(args, "timeout", 5.0),
                                capacity=_arg(args, "context"), last_logits_only=last_logits_only)
        else:
            model = AcceleratedModel(model_path, dev, expected=expected,
                                     timeout_s=_arg(args, "timeout", 5.0), fuse=_arg(args, "fuse", True),
                                     last_logits_only=last_logits_only)
    except BaseException:
        dev.close()
        raise
    model.owns_device = device is None      # model.close() closes a device opened here
    return model
