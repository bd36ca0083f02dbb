"""The `cmx` command: one module per command group, the root group and error handling in `main`."""

from cmx.cli.main import cli, main

__all__ = ["cli", "main"]
