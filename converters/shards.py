"""Read and write safetensors weights one shard at a time.

Reading: `read_layout(model_dir)` parses only the safetensors headers (names, dtypes, shapes) of
every shard, following `model.safetensors.index.json` when there is one, so a converter can check
a whole model before it loads a byte of weights. `iter_tensors(files)` then yields the tensors
shard by shard through `mx.load`, which is lazy: a tensor's bytes are read from disk only when it
is evaluated, and freed when the caller drops it.

Writing: `ShardWriter` buffers evaluated tensors until the next one would take the shard past
`max_shard_bytes`, then writes the shard and frees the buffer (a tensor larger than the limit gets
a shard of its own). `close()` names the shards `model-0000i-of-0000n.safetensors` (or
`model.safetensors` when there is one) and writes `model.safetensors.index.json`. Peak memory is
about one shard plus the tensor being converted, never the whole model.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # mlx-lm's and transformers' usual shard limit
HEADER_LIMIT = 100 * 2**20  # a header larger than this is a corrupt file, not a real one

# safetensors dtype code -> (name used by numpy / torch / mlx, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, from a safetensors header (no data read)."""

    file: Path
    dtype: str  # numpy-style name: "float32", "bfloat16", "uint32", ...
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """(`__metadata__`, {name: TensorInfo}) of one safetensors file, tensors in file order.

    Format: 8-byte little-endian header length N, then N bytes of JSON mapping each name to
    {"dtype", "shape", "data_offsets"}, then the data.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= HEADER_LIMIT:
                raise ValueError("header length is invalid")
            header = json.loads(handle.read(size))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a safetensors file ({error})") from error
    try:
        metadata = header.pop("__metadata__", None) or {}
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    except (AttributeError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{path}: not a safetensors file (bad header: {error!r})") from error
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in entries:
        if entry.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unknown dtype {entry.get('dtype')}")
        start, end = entry["data_offsets"]
        tensors[name] = TensorInfo(path, DTYPES[entry["dtype"]][0], tuple(entry["shape"]),
                                   end - start)
        data_end = max(data_end, end)
    actual = path.stat().st_size
    if 8 + size + data_end > actual:
        raise ValueError(f"{path}: truncated: its header describes {8 + size + data_end} bytes, "
                         f"the file has {actual}")
    return metadata, tensors


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors shards of a model dir: those its index names, else `model*.safetensors`."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_index(index_path)
        files: list[Path] = []
        for name, file in weight_map.items():
            path = model_dir / file
            if not path.is_file():
                raise FileNotFoundError(f"{index_path}: {name} is in {file}, which does not exist")
            if path not in files:
                files.append(path)
        return sorted(files)
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no model*.safetensors weight files")
    return files


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path}: not a safetensors index ({error!r})") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: weight_map is empty or not an object")
    return weight_map


def read_layout(model_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a model dir by name, from the shard headers; checks the index agrees."""
    model_dir = Path(model_dir)
    layout: dict[str, TensorInfo] = {}
    for file in weight_files(model_dir):
        for name, info in read_header(file)[1].items():
            if name in layout:
                raise ValueError(f"{file}: tensor {name} is also in {layout[name].file.name}")
            layout[name] = info
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        for name, file in _read_index(index_path).items():
            if name not in layout or layout[name].file.name != file:
                raise ValueError(f"{index_path}: {name} is not in {file}")
    return layout


def iter_tensors(files: Sequence[Path]) -> Iterator[tuple[Path, str, Any]]:
    """(file, name, lazy mx.array) for every tensor, shard after shard, in file order.

    The arrays are lazy: evaluating one reads just its bytes; dropping it frees them.
    """
    import mlx.core as mx

    for file in files:
        order = read_header(file)[1]
        arrays = mx.load(str(file))
        for name in order:
            yield file, name, arrays.pop(name)
        del arrays


def parse_size(text: str | int) -> int:
    """Bytes from `5GB`, `500MB`, `2GiB`, `1024` (decimal units are powers of 1000)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?|B?)\s*", text, re.IGNORECASE)
        if match is None:
            raise ValueError(f"max shard size {text!r} is not a size like 5GB, 500MB or 1024")
        number, unit, binary = match.groups()
        scale = (1024 if binary else 1000) ** ("KMGT".index(unit.upper()) + 1) if unit else 1
        size = int(float(number) * scale)
    if size <= 0:
        raise ValueError(f"max shard size must be positive, got {text!r}")
    return size


class ShardWriter:
    """Write tensors into size-limited safetensors shards plus `model.safetensors.index.json`."""

    def __init__(self, directory: str | os.PathLike,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {"format": "mlx"})
        self.weight_map: dict[str, int] = {}  # name -> shard number (from 1)
        self.shard_sizes: list[int] = []
        self._buffer: dict[str, Any] = {}
        self._buffer_bytes = 0
        self._closed = False

    def add(self, name: str, array: Any) -> None:
        """Queue one tensor (an mx.array, evaluated here); flushes the shard first when full."""
        import mlx.core as mx

        if self._closed:
            raise ValueError(f"ShardWriter for {self.directory} is closed; cannot add {name}")
        if name in self.weight_map or name in self._buffer:
            raise ValueError(f"tensor {name} written twice")
        mx.eval(array)
        if self._buffer and self._buffer_bytes + array.nbytes > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = array
        self._buffer_bytes += array.nbytes

    def flush(self) -> None:
        """Write the buffered tensors as the next shard and free them."""
        import mlx.core as mx

        if not self._buffer:
            return
        number = len(self.shard_sizes) + 1
        mx.save_safetensors(str(self._partial(number)), self._buffer, metadata=self.metadata)
        self.weight_map.update(dict.fromkeys(self._buffer, number))
        self.shard_sizes.append(self._buffer_bytes)
        self._buffer, self._buffer_bytes = {}, 0
        mx.clear_cache()  # give the freed buffers back to the OS, not to MLX's cache

    def close(self) -> dict[str, Any]:
        """Flush, give the shards their final names, write and return the index."""
        self.flush()
        self._closed = True
        count = len(self.shard_sizes)
        if count == 0:
            raise ValueError(f"{self.directory}: no tensors were written")
        names = {i: (f"model-{i:05d}-of-{count:05d}.safetensors" if count > 1
                     else "model.safetensors") for i in range(1, count + 1)}
        for number, name in names.items():
            os.replace(self._partial(number), self.directory / name)
        index = {"metadata": {"total_size": sum(self.shard_sizes)},
                 "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return index

    def _partial(self, number: int) -> Path:
        return self.directory / f".partial-{number:05d}.safetensors"
