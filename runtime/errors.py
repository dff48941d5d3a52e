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
