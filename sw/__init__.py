"""kriallm software: model I/O, quantizers, golden model, packed format, driver, CLI."""

__version__ = "0.1.0"
