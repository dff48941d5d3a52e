"""Readers of tensor files (safetensors, memory-mapped; torch .pth/.bin, memory-mapped).

Each reader gives names, shapes and dtypes without reading data, and wraps every failure
in a CheckpointError naming the file and tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError("file not found", file=self.path)
        try:
            self._f = safe_open(str(self.path), framework="pt", device="cpu")
            self._names = list(self._f.keys())
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"cannot read safetensors file (truncated or corrupt?): {e}",
                                  file=self.path) from None

    def keys(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple:
        return tuple(self._f.get_slice(name).get_shape())

    def dtype(self, name: str):
        code = self._f.get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES.get(code, code)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor data: {e}", file=self.path, tensor=name) from None


class TorchReader:
    """A torch.save'd state dict (Meta `consolidated.NN.pth`, HF `pytorch_model*.bin`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError("file not found", file=self.path)
        try:
            sd = torch.load(str(self.path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read torch checkpoint (truncated or corrupt?): {e}",
                                  file=self.path) from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError("expected a flat dict of tensors", file=self.path)
        self._sd = sd

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple:
        return tuple(self._sd[name].shape)

    def dtype(self, name: str):
        return self._sd[name].dtype

    def get(self, name: str) -> torch.Tensor:
        t = self._sd[name]
        try:  # touch the last element: a truncated mmapped file fails here, not deep inside a copy
            if t.numel():
                t.reshape(-1)[-1].item()
        except Exception as e:
            raise CheckpointError(f"cannot read tensor data: {e}", file=self.path, tensor=name) from None
        return t


def open_tensor_file(path: Path):
    path = Path(path)
    return SafetensorsReader(path) if path.suffix == ".safetensors" else TorchReader(path)
