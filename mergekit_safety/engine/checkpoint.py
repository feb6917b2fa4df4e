"""The one reader of model checkpoints: safetensors shards of a model directory.

Every part of the package that reads weights outside mergekit's own loader (fingerprints,
config checks, calibration, SOMF training, Antidote scoring) goes through this module, so a
checkpoint layout (an index file, or loose ``*.safetensors`` files) is understood the same way
everywhere. Only safetensors are ever read: no pickle is loaded.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any, Dict, List, Tuple


class CheckpointError(ValueError):
    """A model directory has no readable safetensors weights, or lacks a tensor."""


INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(directory: str) -> List[str]:
    """Paths of the weight files of a model directory (from its index file if it has one)."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        with open(index, "r", encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        return sorted({os.path.join(directory, name) for name in weight_map.values()})
    if not os.path.isdir(directory):
        return []
    names = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    return [os.path.join(directory, name) for name in names]


def read_header(path: str) -> Dict[str, Any]:
    """The JSON header of one safetensors file (names, dtypes, shapes, offsets)."""
    return _header_and_data_start(path)[0]


def _header_and_data_start(path: str) -> Tuple[Dict[str, Any], int]:
    """(header, byte where the tensor data begin: offsets in the header count from there)."""
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (truncated header)")
        (length,) = struct.unpack("<Q", raw_length)
        if length > os.path.getsize(path) - 8:
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        return json.loads(handle.read(length)), 8 + length


def header_shapes(directory: str) -> Dict[str, Tuple[int, ...]]:
    """Tensor name → shape of a model directory, from the safetensors headers only."""
    shapes = {}
    for path in safetensors_files(directory):
        for name, info in read_header(path).items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    return shapes


_DTYPES_BY_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name (None for the ones read through the map)."""
    import torch

    return getattr(torch, _DTYPES_BY_NAME[name]) if name in _DTYPES_BY_NAME else None


def refuse_non_finite(tensor, name: str, model: str) -> None:
    """Raise :class:`CheckpointError` naming the model and tensor if it has NaN or Inf values.

    One float32 sum finds them at a fraction of a full scan (NaN/Inf propagate); only a
    non-finite sum (or an overflow) pays for the full check."""
    import torch

    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return
    if not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(
            f"tensor {name} of model {model} contains NaN or Inf values; refusing to use a "
            "corrupted checkpoint"
        )


class Checkpoint:
    """Lazy, read-only, thread-safe access to the tensors of a model directory.

    File handles (memory maps) are opened on first use and kept until :meth:`release`: pages
    of memory-mapped shards count in the resident set until their handle closes, so streaming
    readers release after each layer (docs/performance_calibration.md).
    """

    def __init__(self, directory: str, check_finite: bool = False):
        from safetensors import safe_open

        self.directory = os.path.abspath(directory)
        #: refuse tensors with NaN/Inf values (naming model and tensor) as they are read
        self.check_finite = check_finite
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index, "r", encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            self.weight_map: Dict[str, str] = {n: os.path.join(self.directory, f) for n, f in weight_map.items()}
        else:
            files = safetensors_files(self.directory)
            if not files:
                raise CheckpointError(f"{self.directory}: no safetensors weights found")
            self.weight_map = {}
            for path in files:
                with safe_open(path, framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        self.weight_map[name] = path
        if not self.weight_map:
            raise CheckpointError(f"{self.directory}: no safetensors weights found")
        #: names read as another tensor: a model with tied embeddings stores no ``lm_head``
        self.aliases: Dict[str, str] = {}
        if "lm_head.weight" not in self.weight_map:
            embedding = next((n for n in sorted(self.weight_map) if n.endswith("embed_tokens.weight")), None)
            if embedding is not None:
                self.aliases["lm_head.weight"] = embedding
        self.files = sorted(set(self.weight_map.values()))
        self._handles: Dict[str, Any] = {}
        self._lock = threading.Lock()

    def names(self) -> List[str]:
        return sorted(self.weight_map)

    def names_in(self, file: str) -> List[str]:
        """Tensor names stored in ``file`` (a path from :attr:`files`)."""
        return sorted(n for n, f in self.weight_map.items() if f == file)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        from safetensors import safe_open

        path = self.weight_map.get(name)
        if path is None:
            raise CheckpointError(f"{self.directory}: tensor {name!r} not found in the checkpoint")
        handle = self._handles.get(path)
        if handle is None:
            handle = safe_open(path, framework="pt", device="cpu")
            self._handles[path] = handle
        return handle

    def get(self, name: str):
        name = name if name in self.weight_map else self.aliases.get(name, name)
        with self._lock:
            tensor = self._handle(name).get_tensor(name)
        if self.check_finite:
            refuse_non_finite(tensor, name, self.directory)
        return tensor

    def get_rows(self, name: str, index):
        """Rows ``index`` (sorted, unique) of tensor ``name``, read from the file with ``pread``
        run by run of consecutive rows: an embedding's rows for the tokens in use. Not through
        the memory map, where scattered rows fault in (and count in the resident set) most of
        the matrix around them. The NaN check covers the rows read."""
        import torch

        name = name if name in self.weight_map else self.aliases.get(name, name)
        path = self.weight_map.get(name)
        if path is None:
            raise CheckpointError(f"{self.directory}: tensor {name!r} not found in the checkpoint")
        header, data_start = _header_and_data_start(path)
        entry = header[name]
        dtype = _torch_dtype(entry["dtype"])
        shape = entry["shape"]
        if dtype is None or len(shape) != 2:  # an unusual layout: through the memory map
            with self._lock:
                tensor = self._handle(name).get_tensor(name)[index]
        else:
            rows = [int(i) for i in index]
            if rows != sorted(set(rows)) or (rows and not 0 <= rows[0] <= rows[-1] < shape[0]):
                raise CheckpointError(f"{self.directory}: rows of {name} must be sorted, unique and in range")
            row_bytes = shape[1] * dtype.itemsize
            start = data_start + entry["data_offsets"][0]
            chunks = []
            with open(path, "rb") as handle:
                run = 0
                while run < len(rows):
                    end = run
                    while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
                        end += 1
                    count = end - run + 1
                    data = os.pread(handle.fileno(), count * row_bytes, start + rows[run] * row_bytes)
                    chunks.append(torch.frombuffer(bytearray(data), dtype=dtype).view(count, shape[1]))
                    run = end + 1
            tensor = torch.cat(chunks) if chunks else torch.empty((0, shape[1]), dtype=dtype)
        if self.check_finite:
            refuse_non_finite(tensor, name, self.directory)
        return tensor

    def shape(self, name: str) -> Tuple[int, ...]:
        name = name if name in self.weight_map else self.aliases.get(name, name)
        with self._lock:
            return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype string of a tensor (``F32``, ``BF16``, ``I64``, …)."""
        with self._lock:
            return self._handle(name).get_slice(name).get_dtype()

    def describe(self) -> str:
        return self.directory

    def release(self) -> None:
        """Close the file handles (and their memory maps); they reopen on the next read."""
        with self._lock:
            self._handles.clear()
