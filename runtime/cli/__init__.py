"""The `codellama-rt` command line."""
from .app import main

__all__ = ["main"]
