"""The kvsqueeze command line."""

from kvsqueeze.cli.main import main

__all__ = ["main"]
