"""Finding a checkpoint and reading its tensors: HF layout (single or sharded safetensors, or .bin) and
Meta layout (params.json + consolidated.NN.pth shards), each tensor checked against the shape the config
implies. Every failure raises CheckpointError naming the file and tensor."""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePath

import torch

from ..errors import CheckpointError
from ..model.config import ModelArgs
from ..model.config_rules import generation_eos_ids, read_json
from .layouts import Part, interleaved_to_rotate_half
from .quantized import read_quantization
from .tensor_files import open_tensor_file

SUPPORTED_SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- locating a checkpoint -----------------------------------------------------------------

def _hub_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def resolve_path(path) -> Path:
    """A model directory, or a hub id ('org/name') found in the local Hugging Face cache.

    Nothing is downloaded.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError("expected a model directory, got a file", file=p)
    name = os.fspath(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        for cache in _hub_cache_dirs():
            repo = cache / ("models--" + name.replace("/", "--"))
            ref = repo / "refs" / "main"
            snapshots = repo / "snapshots"
            if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
                return snapshots / ref.read_text().strip()
            if snapshots.is_dir():
                found = sorted(snapshots.iterdir(), key=lambda d: d.stat().st_mtime)
                if found:
                    return found[-1]
        raise CheckpointError("no such directory, and not in the local Hugging Face cache "
                              "(nothing is downloaded)", file=name)
    raise CheckpointError("no such model directory", file=p)


def detect_layout(directory: Path) -> str:
    if (directory / "config.json").is_file():
        return "hf"
    if (directory / "params.json").is_file():
        return "meta"
    raise CheckpointError("not a model directory: neither config.json (Hugging Face layout) nor "
                          "params.json (Meta layout) found", file=directory)


# ---- tensor sources ------------------------------------------------------------------------

class HFSource:
    """Tensors of an HF-layout directory: model.safetensors, sharded safetensors with
    model.safetensors.index.json, or the same for pytorch_model*.bin."""

    def __init__(self, directory: Path):
        self.directory = directory
        for stem in ("model.safetensors", "pytorch_model.bin"):
            index, single = directory / f"{stem}.index.json", directory / stem
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError("index has no 'weight_map'", file=index)
                _check_weight_map(weight_map, index)
                for name, f in weight_map.items():
                    if not (directory / f).is_file():
                        raise CheckpointError(f"shard file not found (index {index.name} places this tensor in it)",
                                              file=directory / f, tensor=name)
                readers = {f: open_tensor_file(directory / f) for f in sorted(set(weight_map.values()))}
                self.where = {}
                for reader in readers.values():
                    for name in reader.keys():
                        self.where.setdefault(name, reader)
                for name, f in weight_map.items():
                    if name not in readers[f].keys():
                        raise CheckpointError(f"index {index.name} places this tensor here, but the file "
                                              "does not contain it", file=directory / f, tensor=name)
                self.files = list(readers.values())
                self.weights_file = index
                return
            if single.is_file():
                reader = open_tensor_file(single)
                self.where = {name: reader for name in reader.keys()}
                self.files = [reader]
                self.weights_file = single
                return
        raise CheckpointError("no weights found (expected model.safetensors, sharded safetensors with "
                              "model.safetensors.index.json, or pytorch_model.bin)", file=directory)

    def names(self) -> set[str]:
        return set(self.where)

    def file_of(self, name: str) -> Path:
        return self.where[name].path

    def total_bytes(self) -> int:
        return sum(r.path.stat().st_size for r in self.files)

    def check(self, part: Part) -> None:
        """Shape and dtype of `part` against the file's metadata (no data read)."""
        _check(self._reader(part.name), part.name, part.shape)

    def read(self, part: Part) -> torch.Tensor:
        self.check(part)
        return self.where[part.name].get(part.name)

    reads_rows = True  # `read_rows` reads only the rows asked for

    def read_rows(self, part: Part, start: int, length: int) -> torch.Tensor:
        """Rows start .. start + length - 1 of `part` (reading only those where the file allows)."""
        self.check(part)
        return self.where[part.name].get_part(part.name, 0, start, length)

    def read_into(self, part: Part, out: torch.Tensor) -> None:
        """`read`, into `out` (its shape): straight from the file where the reader can (safetensors, same dtype,
        CPU), else through a copy."""
        self.check(part)
        reader = self.where[part.name]
        if not (hasattr(reader, "get_into") and reader.get_into(part.name, out)):
            out.copy_(reader.get(part.name))

    def read_shard(self, part: Part, rank: int, world: int) -> torch.Tensor:
        """Rank `rank`'s slice of `part` along its tp_dim, reading only that slice."""
        self.check(part)
        start, length = shard_range(part, rank, world)
        return self.where[part.name].get_part(part.name, part.tp_dim, start, length)

    # raw access for quantized checkpoints (any dtype; the caller validates shapes)
    def has(self, name: str) -> bool:
        return name in self.where

    def _reader(self, name: str):
        reader = self.where.get(name)
        if reader is None:
            raise CheckpointError("missing tensor", file=self.weights_file, tensor=name)
        return reader

    def shape(self, name: str) -> tuple:
        return self._reader(name).shape(name)

    def dtype(self, name: str):
        return self._reader(name).dtype(name)

    def raw(self, name: str) -> torch.Tensor:
        return self._reader(name).get(name)


class MetaSource:
    """Tensors of Meta's layout: consolidated.NN.pth shards split for model parallelism."""

    def __init__(self, directory: Path):
        self.directory = directory
        paths = sorted(directory.glob("consolidated.*.pth"))
        if not paths:
            raise CheckpointError("no consolidated.NN.pth weight files found", file=directory)
        self.shards = [open_tensor_file(p) for p in paths]
        self.files = self.shards
        self.weights_file = paths[0]

    def names(self) -> set[str]:
        return set().union(*(s.keys() for s in self.shards))

    def file_of(self, name: str) -> Path:
        return next(s.path for s in self.shards if name in s.keys())

    def total_bytes(self) -> int:
        return sum(s.path.stat().st_size for s in self.shards)

    # metadata of one shard's copy or slice (the first shard holding it)
    def has(self, name: str) -> bool:
        return any(name in s.keys() for s in self.shards)

    def _shard(self, name: str):
        shard = next((s for s in self.shards if name in s.keys()), None)
        if shard is None:
            raise CheckpointError("missing tensor", file=self.shards[0].path, tensor=name)
        return shard

    def shape(self, name: str) -> tuple:
        return self._shard(name).shape(name)

    def dtype(self, name: str):
        return self._shard(name).dtype(name)

    def _used_shards(self, part: Part) -> list:
        """The shards `part` is read from (all for a split tensor, the first for a replicated one)."""
        return self.shards if part.cat_dim is not None else self.shards[:1]

    def check(self, part: Part) -> None:
        """Shape and dtype of `part`'s slice in each shard it is read from (no data read)."""
        n = len(self.shards)
        if part.cat_dim is None:
            shard_shape = part.shape
        else:
            if part.shape[part.cat_dim] % n:
                raise CheckpointError(f"dimension {part.shape[part.cat_dim]} does not split over {n} shards",
                                      file=self.shards[0].path, tensor=part.name)
            shard_shape = tuple(d // n if i == part.cat_dim else d for i, d in enumerate(part.shape))
        for shard in self._used_shards(part):
            if part.name not in shard.keys():
                raise CheckpointError("missing tensor", file=shard.path, tensor=part.name)
            _check(shard, part.name, shard_shape)

    def read(self, part: Part) -> torch.Tensor:
        self.check(part)
        pieces = [shard.get(part.name) for shard in self._used_shards(part)]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=part.cat_dim)
        return interleaved_to_rotate_half(t, part.rope_heads) if part.rope_heads else t

    reads_rows = False  # (a tensor may be split over shards, its q/k rows permuted: read whole)

    def read_into(self, part: Part, out: torch.Tensor) -> None:
        """`read`, into `out` (its shape)."""
        out.copy_(self.read(part))

    def read_shard(self, part: Part, rank: int, world: int) -> torch.Tensor:
        """Rank `rank`'s slice of `part` along its tp_dim. Meta's shards are model-parallel slices already:
        with one per rank, split the same way, rank r reads only consolidated.r's piece."""
        if len(self.shards) != world or part.cat_dim != part.tp_dim:
            return shard_of(self.read(part), part, rank, world)
        self.check(part)
        t = self.shards[rank].get(part.name)
        return interleaved_to_rotate_half(t, part.rope_heads // world) if part.rope_heads else t


def shard_range(part: Part, rank: int, world: int) -> tuple[int, int]:
    """(start, length) of rank `rank`'s of `world` equal slices of `part` along its tp_dim."""
    size = part.shape[part.tp_dim]
    if size % world:
        raise CheckpointError(f"dimension {part.tp_dim} ({size}) does not split over {world} tensor-parallel ranks",
                              tensor=part.name)
    return rank * (size // world), size // world


def shard_of(t: torch.Tensor, part: Part, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s of `world` equal slices of `t` along `part.tp_dim` (a view)."""
    return t.narrow(part.tp_dim, *shard_range(part, rank, world))


def _check(reader, name: str, shape: tuple) -> None:
    got = reader.shape(name)
    if got != tuple(shape):
        raise CheckpointError(f"has shape {list(got)}, the model config implies {list(shape)} "
                              "(config and weights disagree?)", file=reader.path, tensor=name)
    dtype = reader.dtype(name)
    if dtype not in SUPPORTED_SOURCE_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype} (expected float32, float16 or bfloat16)",
                              file=reader.path, tensor=name)


def _check_weight_map(weight_map: dict, index: Path) -> None:
    """Every entry names a tensor and a file inside the model directory, judged lexically: symlinks are
    not resolved (the Hugging Face cache links each snapshot file into ../../blobs)."""
    for name, f in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"weight_map key {name!r} is not a tensor name (expected a string)", file=index)
        if not isinstance(f, str) or not f or PurePath(f).is_absolute() or ".." in PurePath(f).parts:
            raise CheckpointError(f"weight_map places this tensor in {f!r}: refused, expected a file name inside "
                                  "the model directory (not absolute, no '..')", file=index, tensor=name)

def read_args(directory: Path, layout: str) -> ModelArgs:
    if layout == "hf":
        config = read_json(directory / "config.json")
        read_quantization(config, directory / "config.json")  # an unsupported quantization fails here
        args = ModelArgs.from_hf_config(config, file=directory / "config.json")
        gen = directory / "generation_config.json"
        if gen.is_file():
            extra = generation_eos_ids(read_json(gen), file=gen)
            args.eos_ids = tuple(dict.fromkeys([*args.eos_ids, *extra]))
        return args
    return ModelArgs.from_meta_params(read_json(directory / "params.json"), file=directory / "params.json")

def open_source(directory: Path, layout: str):
    return HFSource(directory) if layout == "hf" else MetaSource(directory)
