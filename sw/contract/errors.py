"""One exception family for every user-facing failure.

The CLI catches :class:`KriaError` and prints its message on one line; anything
else is a bug and keeps its traceback.
"""


class KriaError(Exception):
    """A problem the user can fix: bad path, bad file, bad config, missing tool."""


class ConfigError(KriaError):
    """A model or hardware configuration that is invalid or unsupported."""


class CheckpointError(KriaError):
    """A Hugging Face checkpoint directory that cannot be read."""


class FormatError(KriaError):
    """A .kq file that is corrupt, truncated or of an unknown version."""


class ToolchainError(KriaError):
    """An external tool (simulator, synthesiser, dtc) is missing or failed."""


class DeviceError(KriaError):
    """The accelerator (real, simulated or modelled) misbehaved or timed out."""


class OutputError(KriaError):
    """An output file that cannot be written safely (see sw/fileio.py): nothing was written."""
