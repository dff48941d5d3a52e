"""Readers of tensor files (safetensors, read tensor by tensor; torch .pth/.bin, memory-mapped).

Each reader gives names, shapes and dtypes without reading data, and wraps every failure
in a CheckpointError naming the file and tensor.
"""
from __future__ import annotations

import json
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import CheckpointError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """A safetensors file: names, shapes and dtypes from its header; tensor data read with plain file reads
    into tensors of their own (a memory map would keep every page read resident in the process until the file
    is closed, so loading would peak at twice the checkpoint's size)."""

    READ_CHUNK = 1 << 28  # bytes per read call (Linux caps one read near 2 GiB)
    PARALLEL_MIN = 1 << 24  # bytes a reading thread takes at least

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError("file not found", file=self.path)
        try:
            self._f = safe_open(str(self.path), framework="pt", device="cpu")  # validates the header and sizes
            self._names = list(self._f.keys())
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._header = json.loads(f.read(n))
            self._data_start = 8 + n
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            cut = _cut_tensor(self.path)
            if cut is not None:
                raise CheckpointError(f"file is truncated: the tensor's data ends at byte {cut[1]} of the data "
                                      f"section, which has only {cut[2]} bytes",
                                      file=self.path, tensor=cut[0]) from None
            raise CheckpointError(f"cannot read safetensors file (truncated or corrupt?): {e}",
                                  file=self.path) from None

    def keys(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple:
        _require(self, name)
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str):
        _require(self, name)
        code = self._header[name]["dtype"]
        return _SAFETENSORS_DTYPES.get(code, code)

    def get(self, name: str) -> torch.Tensor:
        dtype = self.dtype(name)
        if not isinstance(dtype, torch.dtype):  # a dtype this reader does not map: safetensors' own copy
            try:
                return self._f.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor data: {e}", file=self.path, tensor=name) from None
        out = torch.empty(self.shape(name), dtype=dtype)
        self._read_into(name, self._header[name]["data_offsets"][0], out)
        return out

    def get_into(self, name: str, out: torch.Tensor) -> bool:
        """Read the tensor straight into `out` where it is a contiguous CPU tensor of its shape and dtype (no
        copy of it in between); False where not (nothing read)."""
        if (out.device.type != "cpu" or not out.is_contiguous() or out.dtype != self.dtype(name)
                or tuple(out.shape) != self.shape(name)):
            return False
        self._read_into(name, self._header[name]["data_offsets"][0], out)
        return True

    def get_part(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """Elements start..start+length-1 along `dim` (0 or 1) of a 2-D tensor, reading only those rows."""
        shape, dtype = self.shape(name), self.dtype(name)
        if len(shape) != 2 or not isinstance(dtype, torch.dtype) or not 0 <= start <= start + length <= shape[dim]:
            try:
                view = self._f.get_slice(name)
                return view[start:start + length] if dim == 0 else view[:, start:start + length]
            except Exception as e:
                raise CheckpointError(f"cannot read tensor data: {e}", file=self.path, tensor=name) from None
        rows, cols = shape
        begin = self._header[name]["data_offsets"][0]
        row_bytes = cols * dtype.itemsize
        if dim == 0:
            out = torch.empty(length, cols, dtype=dtype)
            self._read_into(name, begin + start * row_bytes, out)
            return out
        out = torch.empty(rows, length, dtype=dtype)
        step = max(1, self.READ_CHUNK // max(row_bytes, 1))  # whole rows a read, their columns kept
        for r in range(0, rows, step):
            block = torch.empty(min(step, rows - r), cols, dtype=dtype)
            self._read_into(name, begin + r * row_bytes, block)
            out[r:r + block.shape[0]] = block[:, start:start + length]
        return out

    def _read_into(self, name: str, offset: int, out: torch.Tensor) -> None:
        """Fill contiguous `out` with its byte size of data from `offset` of the data section; a large tensor in
        torch's thread count of pieces read at once (one thread copying, and faulting in, 1 GB takes ~2x as long
        as two)."""
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if not len(buf):
            return
        pieces = max(1, min(torch.get_num_threads(), len(buf) // self.PARALLEL_MIN))
        size = -(-len(buf) // pieces)
        spans = [(i, min(i + size, len(buf))) for i in range(0, len(buf), size)]
        try:
            if len(spans) == 1:
                self._read_span(buf, offset, *spans[0])
            else:
                with ThreadPoolExecutor(len(spans)) as pool:
                    list(pool.map(lambda span: self._read_span(buf, offset, *span), spans))
        except OSError as e:
            raise CheckpointError(f"cannot read tensor data: {e}", file=self.path, tensor=name) from None

    def _read_span(self, buf: memoryview, offset: int, start: int, stop: int) -> None:
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + offset + start)
            done = start
            while done < stop:
                got = f.readinto(buf[done:min(done + self.READ_CHUNK, stop)])
                if not got:
                    raise OSError(f"the file ends {len(buf) - done} bytes short of the tensor's data")
                done += got


class TorchReader:
    """A torch.save'd state dict (Meta `consolidated.NN.pth`, HF `pytorch_model*.bin`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError("file not found", file=self.path)
        try:
            sd = torch.load(str(self.path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(_torch_load_failure(self.path, e), file=self.path) from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError("expected a flat dict of tensors", file=self.path)
        self._sd = sd

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple:
        _require(self, name)
        return tuple(self._sd[name].shape)

    def dtype(self, name: str):
        _require(self, name)
        return self._sd[name].dtype

    def get(self, name: str) -> torch.Tensor:
        t = self._sd[name]
        try:  # touch the last element: a truncated mmapped file fails here, not deep inside a copy
            if t.numel():
                t.reshape(-1)[-1].item()
        except Exception as e:
            raise CheckpointError(f"cannot read tensor data: {e}", file=self.path, tensor=name) from None
        return t

    def get_part(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """Elements start..start+length-1 along `dim` (memory-mapped: only those pages are read)."""
        return self.get(name).narrow(dim, start, length)


def _torch_load_failure(path: Path, err: Exception) -> str:
    """Why torch.load refused `path`: the legacy format, unsafe pickled objects, or a damaged file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"cannot read file: {e}"
    if magic[:1] == b"\x80":  # a raw pickle stream: torch.save(..., _use_new_zipfile_serialization=False)
        return ("legacy (non-zip) torch serialization format, which cannot be memory-mapped; re-save it with a "
                "current torch: python -c \"import torch; "
                f"torch.save(torch.load({str(path)!r}, weights_only=True), {str(path)!r})\"")
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        return (f"contains pickled Python objects other than tensors{f' ({found[1]})' if found else ''}: refused "
                "for safety (loading it could run code); convert it to safetensors with a tool you trust")
    if not magic:
        return "file is empty"
    if magic != b"PK\x03\x04":
        return "not a torch checkpoint (neither a zip archive nor a legacy pickle stream)"
    return f"cannot read torch checkpoint (truncated or corrupt?): {' '.join(str(err).split())}"


def _require(reader, name: str) -> None:
    if name not in reader.keys():
        raise CheckpointError("missing tensor", file=reader.path, tensor=name)


def _cut_tensor(path: Path):
    """(name, end, available) of the first tensor whose data a truncated safetensors file lacks; None when
    the header itself is unreadable or every tensor's data is present."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                return None
            header = json.loads(f.read(n))
        available = size - 8 - n
        cut = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in header.items()
                     if name != "__metadata__" and info["data_offsets"][1] > available)
    except Exception:
        return None
    return (cut[0][2], cut[0][1], available) if cut else None


def open_tensor_file(path: Path):
    path = Path(path)
    return SafetensorsReader(path) if path.suffix == ".safetensors" else TorchReader(path)
