"""Errors raised for bad checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and, where known, the tensor."""

    def __init__(self, message: str, *, file=None, tensor=None):
        parts = []
        if file is not None:
            parts.append(f"{file}")
        if tensor is not None:
            parts.append(f"tensor '{tensor}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file = None if file is None else str(file)
        self.tensor = tensor


class ModelBusyError(RuntimeError):
    """The engine's request queue is full (`max_queue` requests already wait for a slot): retry later.
    (The server answers it with 429.)"""


def is_allocation_failure(e: BaseException) -> bool:
    """Whether `e` is torch failing to allocate memory (torch.OutOfMemoryError on CUDA, a RuntimeError
    from the CPU allocator)."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in ("out of memory", "can't allocate",
                                                                   "cannot allocate"))


class MissingExtraError(ImportError):
    """A feature needs an optional extra that is not installed; the message says how to install it."""
