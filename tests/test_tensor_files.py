"""The safetensors reader (runtime/checkpoint/tensor_files.py): its plain file reads give safetensors' own
tensors, whole, sliced along either dim, or straight into a caller's tensor, and leave none of the file
resident in the process (a memory map would keep every page read until the file is closed)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from codellama_rt.checkpoint.tensor_files import SafetensorsReader

TENSORS = {
    "f32": torch.randn(37, 19),
    "f16": torch.randn(5, 8).half(),
    "bf16": torch.randn(3, 4, 6).bfloat16(),
    "i8": torch.randint(-128, 127, (11, 7), dtype=torch.int8),
    "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
    "i32": torch.randint(-2**31, 2**31 - 1, (4, 5), dtype=torch.int32),
    "i64": torch.arange(6, dtype=torch.int64),
    "bool": torch.rand(13) > 0.5,
    "empty": torch.zeros(0, 4),
}


@pytest.fixture(scope="module")
def file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    save_file(TENSORS, str(path))
    return path


@pytest.mark.parametrize("threads", [1, 3])
def test_whole_tensors_are_safetensors_own(file, monkeypatch, threads):
    monkeypatch.setattr(SafetensorsReader, "PARALLEL_MIN", 16)  # larger tensors: `threads` pieces read at once
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    reader = SafetensorsReader(file)
    with safe_open(str(file), framework="pt") as ref:
        for name in TENSORS:
            got = reader.get(name)
            assert reader.shape(name) == tuple(TENSORS[name].shape) and reader.dtype(name) == TENSORS[name].dtype
            assert got.dtype == TENSORS[name].dtype and torch.equal(got, ref.get_tensor(name)), name


@pytest.mark.parametrize("dim", [0, 1])
def test_slices_read_only_their_part(file, dim, monkeypatch):
    reader = SafetensorsReader(file)
    monkeypatch.setattr(SafetensorsReader, "READ_CHUNK", 3 * 19 * 4)  # column slices in blocks of 3 rows
    for name in ("f32", "i8", "f16"):
        full = TENSORS[name]
        for start, length in [(0, 1), (2, 3), (0, full.shape[dim]), (full.shape[dim] - 2, 2)]:
            want = full.narrow(dim, start, length)
            got = reader.get_part(name, dim, start, length)
            assert got.shape == want.shape and torch.equal(got, want), (name, dim, start, length)


def test_reads_into_a_matching_tensor_only(file):
    reader = SafetensorsReader(file)
    out = torch.empty(37, 19)
    assert reader.get_into("f32", out) and torch.equal(out, TENSORS["f32"])
    big = torch.zeros(40, 19)
    assert reader.get_into("f32", big[1:38]) and torch.equal(big[1:38], TENSORS["f32"])  # contiguous rows
    untouched = torch.zeros(37, 19, dtype=torch.float64)
    assert not reader.get_into("f32", untouched) and not untouched.any()  # another dtype: the caller copies
    assert not reader.get_into("f32", torch.zeros(19, 37).t())  # not contiguous


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_reading_leaves_the_file_out_of_memory(tmp_path):
    path = tmp_path / "big.safetensors"
    saved = {f"w{i}": torch.randn(256, 1024) for i in range(8)}  # 8 MiB of data
    save_file(saved, str(path))
    reader = SafetensorsReader(path)
    for name in reader.keys():  # every byte used (a tensor viewing a memory map would page the file in here)
        assert torch.equal(reader.get(name), saved[name])

    def resident_kib() -> int:  # of this process's mappings of the file
        kib, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's first line
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                kib += int(line.split()[1])
        return kib

    assert resident_kib() < 256  # the header's pages at most, not the 8 MiB read
