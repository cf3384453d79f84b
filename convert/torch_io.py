"""Streaming writer of a PyTorch state-dict file, readable by `torch.load(..., weights_only=True)`.

`torch.save` needs every tensor in memory at once. This writes the same zip archive (data.pkl + one record per
storage, as torch.serialization._save does) but pickles placeholders first — names, shapes and dtypes are known
from the plan — and then appends each tensor's bytes as it arrives, in any order.
"""

from __future__ import annotations

import collections
import io
import pickle
import warnings

import ml_dtypes
import numpy as np

from doge_jax.hf_names import CheckpointError

_STORAGE_TYPES = {
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class _Storage:
    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            import torch

            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            import torch

            args = (obj.storage, 0, obj.shape, _strides(obj.shape), False, collections.OrderedDict())
            return torch._utils._rebuild_tensor_v2, args
        return NotImplemented


class _File:
    """The archive's file, written through Python: after the first failed write (a full disk) every later write is
    dropped, so that the zip writer's destructor, which writes the end of the archive, cannot raise again (an
    exception there aborts the process). The first error is what the caller sees."""

    def __init__(self, path: str):
        self.f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.error: OSError | None = None

    def write(self, data) -> int:
        if self.error is not None:
            return len(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        if self.error is None:
            self.f.flush()

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:
            if self.error is None:
                raise


class TorchStateDictWriter:
    """`specs`: (name, shape, dtype) of every tensor; each gets its own storage record data/<i>."""

    def __init__(self, path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]]):
        import torch
        from torch.serialization import _get_storage_alignment, get_crc32_options

        self.path, self.slots, self.pending = path, {}, set()
        obj: dict[str, _Tensor] = {}
        for i, (name, shape, dtype) in enumerate(sorted(specs)):
            st = _Storage(str(i), np.dtype(dtype), int(np.prod(shape, dtype=np.int64)))
            self.slots[name] = (tuple(shape), np.dtype(dtype), st)
            obj[name] = _Tensor(st, shape)
            self.pending.add(name)
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        align = str(_get_storage_alignment())
        self.torch, self.file = torch, _File(path)
        self.writer = torch._C.PyTorchFileWriter(self.file, get_crc32_options(), _get_storage_alignment())
        for rec, val in (("data.pkl", data), (".format_version", "1"), (".storage_alignment", align),
                         ("byteorder", "little")):
            self._write(rec, val, len(val))

    def _write(self, record: str, val, nbytes: int) -> None:
        self._call(self.writer.write_record, record, val, nbytes)

    def _call(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            if self.file.error is not None:  # torch re-raises the file's error as a RuntimeError
                raise self.file.error from None
            raise

    def put(self, name: str, arr: np.ndarray) -> None:
        shape, dtype, st = self.slots[name]
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            raise CheckpointError(f"{name}: got {arr.shape} {arr.dtype}, planned {shape} {dtype}")
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        with warnings.catch_warnings():  # read-only inputs: torch warns, but we only read the bytes
            warnings.simplefilter("ignore", UserWarning)
            storage = self.torch.from_numpy(flat).untyped_storage()
        self._write(f"data/{st.key}", storage, flat.nbytes)
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            raise CheckpointError(f"{self.path}: tensors never written: {', '.join(sorted(self.pending))}")
        self._call(self.writer.write_end_of_file)
        self.file.close()
