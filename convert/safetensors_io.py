"""Streaming safetensors I/O: read one tensor at a time with plain reads, write shards tensor by tensor.

`safetensors.safe_open` memory-maps the file, and every page it touches stays resident (and counted in the
process RSS) until the file is closed; reading with `readinto` into a fresh array keeps only that array. The
writer lays out the header first (all names, shapes and dtypes are known from the plan), sizes the file, and
then writes each tensor at its offset as it arrives, in any order.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from doge_jax.hf_names import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20


def _bad(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or truncated safetensors file ({why})")


def read_header(path: str) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype, int, int]], int]:
    """({name: (shape, dtype, start, end)}, data offset) of a safetensors file, validated against its size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise _bad(path, f"header length {n} does not fit in the file's {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except Exception:
        raise _bad(path, "header is not valid JSON") from None
    header.pop("__metadata__", None)
    out, data_len = {}, size - 8 - n
    for name, info in header.items():
        kind = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(kind, str) and kind not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {kind}, which convert does not read "
                                  f"(supported: {', '.join(sorted(DTYPES))})")
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except Exception:
            raise _bad(path, f"bad header entry for {name!r}") from None
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start < 0:
            raise _bad(path, f"{name}: offsets do not match shape {shape} {info['dtype']}")
        if end > data_len:
            raise _bad(path, f"{name} ends at byte {end} of the data, but only {data_len} bytes are present")
        out[name] = (shape, dtype, start, end)
    return out, 8 + n


def read_tensors(path: str, names=None):
    """Yield (name, array) in file order, one at a time (`names`: only these)."""
    header, base = read_header(path)
    order = sorted(header, key=lambda k: header[k][2])
    with open(path, "rb") as f:
        for name in order:
            if names is not None and name not in names:
                continue
            shape, dtype, start, end = header[name]
            arr = np.empty(shape, dtype)
            f.seek(base + start)
            got = f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
            if got != end - start:
                raise _bad(path, f"{name}: read {got} of {end - start} bytes")
            yield name, arr


class SafetensorsWriter:
    """One safetensors file whose header is fixed up front; `put` writes each tensor at its offset."""

    def __init__(self, path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]], metadata=None):
        # Larger itemsizes first (as safetensors does), so every tensor is aligned to its itemsize.
        specs = sorted(specs, key=lambda s: (-np.dtype(s[2]).itemsize, s[0]))
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.slots: dict[str, tuple[tuple[int, ...], np.dtype, int, int]] = {}
        pos = 0
        for name, shape, dtype in specs:
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self.slots[name] = (tuple(shape), dtype, pos, pos + nbytes)
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.base, self.pending = path, 8 + len(raw), set(self.slots)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, struct.pack("<Q", len(raw)) + raw)
        os.ftruncate(self.fd, self.base + pos)

    def put(self, name: str, arr: np.ndarray) -> None:
        shape, dtype, start, end = self.slots[name]
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            raise CheckpointError(f"{name}: got {arr.shape} {arr.dtype}, planned {shape} {dtype}")
        buf = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        off = self.base + start
        while len(buf):
            n = os.pwrite(self.fd, buf, off)
            buf, off = buf[n:], off + n
        self.pending.discard(name)

    def close(self) -> None:
        os.close(self.fd)
        if self.pending:
            raise CheckpointError(f"{self.path}: tensors never written: {', '.join(sorted(self.pending))}")
