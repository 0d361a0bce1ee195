"""Streaming a checkpoint's tensors from safetensors files, one at a time, without loading a whole shard."""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's shard files: those the index names if there is one, else every ``*.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors checkpoint in {model_dir} (native models read *.safetensors only; "
            f"convert the checkpoint or use model_impl='transformers')"
        )
    return files


def iterate_safetensors(model_dir: str | Path, views: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint, each read into a tensor of its own; with
    ``views``, tensors over the memory-mapped files instead (``MappedFiles``: read from the page cache as they
    are used, nothing copied first), for consumers that copy what they keep."""
    for path in safetensors_files(model_dir):
        if views:
            files = MappedFiles()
            for name, entry in tensor_entries([path]).items():
                yield name, files.tensor(entry) if entry.dtype in MAPPED_DTYPES else _read(path, name)
            continue
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, framework="pt", device="cpu") as f:
        return f.get_tensor(name)


# safetensors' dtype names -> the torch dtypes ``MappedFiles`` views in place
MAPPED_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lies in a safetensors file: its dtype name, shape and byte range from the file's start."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def tensor_entries(files: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor of ``files`` by name, read from their headers."""
    entries = {}
    for path in files:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                entries[name] = TensorEntry(path, info["dtype"], tuple(info["shape"]), 8 + header_size + start,
                                            8 + header_size + end)
    return entries


class MappedFiles:
    """Tensors over safetensors files, each file mapped once and copy-on-write (writable views without a copy;
    nothing written reaches the file). A view keeps its mapping alive; ``storages`` holds the data pointers of
    every view's storage, to tell them from copies."""

    def __init__(self):
        self.maps: dict[Path, mmap.mmap] = {}
        self.storages: set[int] = set()

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        if entry.path not in self.maps:
            with open(entry.path, "rb") as f:
                self.maps[entry.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        dtype = MAPPED_DTYPES[entry.dtype]
        count = (entry.end - entry.start) // dtype.itemsize
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        tensor = torch.frombuffer(self.maps[entry.path], dtype=dtype, count=count, offset=entry.start)
        self.storages.add(tensor.untyped_storage().data_ptr())
        return tensor.view(entry.shape)


def checkpoint_tensor_names(model_dir: str | Path) -> list[str]:
    """Names of every tensor of the checkpoint, read from the files' headers without loading any tensor."""
    return list(tensor_entries(safetensors_files(model_dir)))