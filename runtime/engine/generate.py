"""The engine's public names in one place: `Engine` (scheduler.py), `Run` (run.py), `Completion`."""
from .events import Completion
from .run import Run
from .scheduler import Engine

__all__ = ["Completion", "Engine", "Run"]
