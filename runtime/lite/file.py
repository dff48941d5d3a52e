"""The lite model file: everything the native decode step reads, in its layout, as one safetensors file
(`lite.safetensors`, beside the model's `tokenizer.model`), read here without torch.

Tensors: `embedding` fp32 [V, dim]; `norm.<i>` fp32 [dim] (per layer attention then MLP); `final_norm` fp32 [dim];
`rope_cos` / `rope_sin` fp32 [positions, head_dim / 2]; per projection j (per layer wqkv, wo, w13, w2, then the
lm_head) and part i: `proj.<j>.<i>.w` (fp32, int8 or uint8 int4 codes in chunk order), `.scale`, `.zs`, `.levels`
where its format has them (csrc/cpu_linear_base.h's Linear). The header's metadata `codellama_rt_lite` holds the
JSON config: format version, dims, eps, special ids and each part's kind, N, K, group and the tensors it holds
(`tensors`, e.g. ["w", "scale", "zs"]: an int4 weight's zero points and an NF4 weight's levels are optional in
the layout, so a file names what it has; files written before it say nothing, and their tensors are taken as
found).

Read by mapping the file (`read`): the arrays are views of the mapping, so a weight costs memory only as the step
touches it, and several processes share one copy. (The safetensors package's numpy loader copies every tensor;
the format itself is 8 bytes of header length, the JSON header, then the data.) Written by `write`: every tensor
starts ALIGN bytes-aligned in the file, so on the page-aligned mapping too (the gaps are uint8 entries named
`__pad.<i>`, which the reader skips: the file stays valid safetensors, its data without holes).
"""
from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError

FILE_NAME = "lite.safetensors"
METADATA_KEY = "codellama_rt_lite"
VERSION = 1
KINDS = {"dense": 0, "int8": 1, "int4": 2, "int8_x16": 3, "int4_x8": 4}  # csrc's Kind
_DTYPES = {"F32": np.float32, "I8": np.int8, "U8": np.uint8}
_MAX_HEADER = 100 << 20
ALIGN = 64  # bytes: a cache line (24 bytes off, every 64-byte vector load of a weight row straddled two lines)
PAD_PREFIX = "__pad."
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_INT_KEYS = ("dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "layers", "max_seq_len")


class LiteFile(NamedTuple):
    """A read lite file: config (the metadata's JSON) and arrays (name -> read-only numpy view of the mapping)."""
    config: dict
    arrays: dict


def read(path) -> LiteFile:
    """Maps `path` (a lite.safetensors) and returns its config and arrays; CheckpointError names what is wrong."""
    path = os.fspath(path)
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError("not a regular file", file=path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError("too short for a safetensors file", file=path)
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise CheckpointError("lite model file not found (write one with `codellama-rt export-lite`)",
                              file=path) from None
    except OSError as e:
        raise CheckpointError(f"cannot read it: {e.strerror or e}", file=path) from None
    (n,) = struct.unpack("<Q", mapped[:8])
    if n > min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"header length {n} exceeds the file ({size} bytes)", file=path)
    try:
        header = json.loads(bytes(mapped[8:8 + n]))
        config = json.loads(header.get("__metadata__", {})[METADATA_KEY])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise CheckpointError(f"not a lite model file (no '{METADATA_KEY}' metadata in a safetensors "
                              "header)", file=path) from None
    if not isinstance(config, dict) or config.get("version") != VERSION:
        version = config.get("version") if isinstance(config, dict) else None
        raise CheckpointError(f"lite format version {version!r}, this runtime reads {VERSION}", file=path)
    bad = [k for k in _INT_KEYS if not isinstance(config.get(k), int) or isinstance(config.get(k), bool)
           or config[k] <= 0]
    if bad or not isinstance(config.get("norm_eps"), (int, float)) or not isinstance(config.get("projections"), list):
        raise CheckpointError(f"config ({METADATA_KEY}): {', '.join(bad) or 'norm_eps or projections'} missing or "
                              "not a positive number", file=path)
    if not 0 < config["norm_eps"] < 1:  # (NaN fails it too)
        raise CheckpointError(f"config ({METADATA_KEY}): norm_eps={config['norm_eps']!r} is not in (0, 1)", file=path)
    eos = config.get("eos_ids", [])
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            and 0 <= i < config["vocab_size"] for i in eos):
        raise CheckpointError(f"config ({METADATA_KEY}): eos_ids={eos!r} is not a list of token ids below "
                              f"vocab_size {config['vocab_size']}", file=path)
    buffer = np.frombuffer(mapped, dtype=np.uint8)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__" or name.startswith(PAD_PREFIX):
            continue
        try:
            dtype, shape, (start, end) = _DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in (*shape, start, end)):
                raise ValueError(shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"unsupported entry {info!r} (lite files hold F32, I8 and U8, non-negative "
                                  "shapes and offsets)", file=path, tensor=name) from None
        count = int(np.prod(shape, dtype=np.int64))
        begin = 8 + n + start
        if end - start != count * np.dtype(dtype).itemsize or begin + (end - start) > size:
            raise CheckpointError(f"data offsets {start}..{end} do not hold {shape} {info['dtype']} within the "
                                  "file", file=path, tensor=name)
        array = buffer[begin:begin + end - start].view(dtype).reshape(shape)
        if begin % np.dtype(dtype).itemsize:
            array = array.copy()  # (an unaligned tensor: the kernels read whole elements)
        arrays[name] = array
    return LiteFile(config, arrays)


def write(path, arrays: dict, config: dict) -> None:
    """Writes `arrays` (name -> numpy array: float32, int8 or uint8) and `config` (the metadata's JSON) as a lite file
    at `path`, each tensor's data ALIGN-byte aligned (the header padded with spaces, uint8 `__pad.<i>` entries
    between tensors); through a temporary file beside it, so a failure leaves no half-written file."""
    header, layout, offset = {"__metadata__": {METADATA_KEY: json.dumps(config)}}, [], 0
    for name, a in arrays.items():
        if name.startswith(PAD_PREFIX) or a.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: {a.dtype} (lite files hold float32, int8 and uint8; names not "
                             f"starting with {PAD_PREFIX!r})")
        gap = -offset % ALIGN
        if gap:
            pad = f"{PAD_PREFIX}{len(layout)}"
            header[pad] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            layout.append(bytes(gap))
            offset += gap
        a = np.ascontiguousarray(a)
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        layout.append(a)
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for chunk in layout:
                f.write(memoryview(chunk).cast("B") if isinstance(chunk, np.ndarray) else chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
