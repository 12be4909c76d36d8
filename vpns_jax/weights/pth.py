"""Read PyTorch `.pth` state dicts as numpy arrays without running pickled code (no torch needed).

Supports torch.save's zip format (`<name>/data.pkl` + `<name>/data/<key>` storages) and the legacy
(pre-1.6) stream format. The unpickler resolves only the globals that rebuilding tensors needs and
replaces them with local functions; any other global (os.system, builtins.eval, a model class, ...)
makes the whole file refused with a `WeightsError`, before anything it names is called.
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vpns_jax.errors import WeightsError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    """Stand-in for a `torch.<X>Storage` class: only carries the numpy dtype."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


class _Storage:
    """A 1-D numpy view of one storage's elements."""

    def __init__(self, data: np.ndarray):
        self.data = data


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple,
                    *unused: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor(_v2): the tensor as a numpy array (a read-only view of the
    storage when contiguous, else a copy), after checking it lies inside the storage."""
    if not isinstance(storage, _Storage):
        raise _Corrupt("a tensor does not point at a storage")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    data = storage.data
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise _Corrupt("negative tensor size, stride or offset")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= data.size:
            raise _Corrupt("a tensor reaches past the end of its storage")
    if data.size == 0 or 0 in size:
        return np.zeros(size, data.dtype)
    numel = int(np.prod(size))
    contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    if all(n == 1 or s == c for n, s, c in zip(size, stride, contiguous, strict=True)):
        return data[offset:offset + numel].reshape(size)  # a view; callers copy when converting
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=size,
                                           strides=tuple(s * item for s in stride))
    return np.array(view, copy=True)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
    """torch._utils._rebuild_parameter: a Parameter is just its data here."""
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Corrupt(Exception):
    """Internal: the pickle is well-formed but its tensors are inconsistent."""


class _Refused(Exception):
    """Internal: the pickle names a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `_ALLOWED` globals and storage persistent ids."""

    def __init__(self, file: io.BufferedIOBase, load_storage: Callable[[tuple], _Storage]):
        super().__init__(file, encoding="latin1")
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])  # fresh: a BUILD cannot alter shared state
        if module == "torch" and name.endswith("Storage"):
            raise _Corrupt(f"tensors of type torch.{name} are not supported; re-save the state "
                           "dict as float32 (`{k: v.float() for k, v in sd.items()}`)")
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise _Corrupt(f"unexpected persistent id {str(pid)[:80]}")
        return self._load_storage(pid)


def _unpickle(data: bytes, load_storage: Callable[[tuple], _Storage], path: Path) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), load_storage).load()
    except _Refused as e:
        raise WeightsError(
            f"{path}: the file asks to run code ({e}) while unpickling and is refused for "
            "security. "
            "Only plain state dicts of tensors are read. Re-save it on a trusted machine with "
            "`torch.save(model.state_dict(), FILE)` or as .safetensors.") from None
    except _Corrupt as e:
        raise WeightsError(f"{path}: unreadable PyTorch file ({e}).") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, struct.error) as e:
        raise WeightsError(f"{path}: corrupt or truncated PyTorch file ({type(e).__name__}: {e}); "
                           "download it again.") from None


def _storage_dtype(storage_type: Any) -> np.dtype:
    if not isinstance(storage_type, _StorageType):
        raise _Corrupt(f"unknown storage type {storage_type!r}")
    return storage_type.dtype


def _read_zip(path: Path, raw: bytes) -> Any:
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"{path}: corrupt or truncated PyTorch zip file ({e}); "
                           "download it again.") from None
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkls:
        raise WeightsError(f"{path}: not a PyTorch checkpoint (no data.pkl in the zip archive).")
    prefix = pkls[0][: -len("data.pkl")]
    big = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
    cache: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        _, storage_type, key, _location, numel = pid[:5]
        dtype = _storage_dtype(storage_type)
        if key not in cache:
            try:
                buf = zf.read(f"{prefix}data/{key}")
            except (KeyError, zipfile.BadZipFile, OSError, EOFError) as e:
                raise _Corrupt(f"storage {key}: {e}") from None
            dt = dtype.newbyteorder(">") if big else dtype
            if len(buf) < int(numel) * dt.itemsize:
                raise _Corrupt(f"storage {key} is shorter than its {numel} elements")
            flat = np.frombuffer(buf, dt, count=int(numel))
            cache[key] = _Storage(flat.astype(dtype, copy=False))
        return cache[key]

    try:
        data = zf.read(pkls[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise WeightsError(f"{path}: corrupt or truncated PyTorch file ({e}).") from None
    return _unpickle(data, load_storage, path)


def _read_legacy(path: Path, raw: bytes) -> Any:
    """torch.save(..., _use_new_zipfile_serialization=False): pickles then raw storages."""
    f = io.BytesIO(raw)

    def plain() -> Any:
        return _unpickle_plain(f, path)

    if plain() != _LEGACY_MAGIC:
        raise WeightsError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy "
                           "torch.save stream).")
    plain()  # protocol version
    sys_info = plain()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise WeightsError(f"{path}: big-endian legacy PyTorch files are not supported.")
    storages: dict[str, tuple[np.dtype, _Storage]] = {}

    def load_storage(pid: tuple) -> _Storage:
        _, storage_type, key, _location, numel = pid[:5]
        dtype = _storage_dtype(storage_type)
        if key not in storages:
            if not 0 <= int(numel) * dtype.itemsize <= len(raw):
                raise _Corrupt(f"storage {key} claims {numel} elements, more than the file holds")
            storages[key] = (dtype, _Storage(np.zeros(int(numel), dtype)))
        return storages[key][1]

    # The object's pickle comes first; storages are filled afterwards, in place.
    obj = _unpickle_stream(f, load_storage, path)
    keys = _unpickle_plain(f, path)
    if not isinstance(keys, list) or any(k not in storages for k in keys):
        raise WeightsError(f"{path}: corrupt PyTorch file (storage list does not match).")
    for key in keys:
        dtype, storage = storages[key]
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated PyTorch file (storage {key} missing).")
        (numel,) = struct.unpack("<q", head)
        buf = f.read(numel * dtype.itemsize)
        if len(buf) < numel * dtype.itemsize or numel != storage.data.size:
            raise WeightsError(f"{path}: truncated or corrupt PyTorch file (storage {key}).")
        storage.data[:] = np.frombuffer(buf, dtype)
    return _resolve(obj)


class _Lazy:
    """A tensor of a legacy file whose storage bytes come later in the stream."""

    def __init__(self, args: tuple):
        self.args = args


def _lazy_rebuild(*args: Any) -> _Lazy:
    return _Lazy(args)


def _resolve(obj: Any) -> Any:
    if isinstance(obj, _Lazy):
        try:
            return _rebuild_tensor(*obj.args)
        except (_Corrupt, ValueError, TypeError) as e:
            raise WeightsError(f"corrupt PyTorch file ({e}).") from None
    if isinstance(obj, dict):
        return OrderedDict((k, _resolve(v)) for k, v in obj.items())
    return obj


def _unpickle_stream(f: io.BytesIO, load_storage: Callable[[tuple], _Storage], path: Path) -> Any:
    class Legacy(_RestrictedUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in (("torch._utils", "_rebuild_tensor_v2"),
                                  ("torch._utils", "_rebuild_tensor")):
                return _lazy_rebuild
            return super().find_class(module, name)

    try:
        return Legacy(f, load_storage).load()
    except _Refused as e:
        raise WeightsError(
            f"{path}: the file asks to run code ({e}) while unpickling and is refused for "
            "security. "
            "Only plain state dicts of tensors are read.") from None
    except (_Corrupt, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            KeyError, AttributeError, struct.error) as e:
        raise WeightsError(f"{path}: corrupt or truncated PyTorch file ({e}).") from None


def _unpickle_plain(f: io.BytesIO, path: Path) -> Any:
    def no_storage(pid: tuple) -> _Storage:
        raise _Corrupt("unexpected storage reference")

    return _unpickle_stream(f, no_storage, path)


def read_pth(path: str | Path) -> Any:
    """Unpickle a `.pth` file safely; tensors become numpy arrays (dicts become OrderedDicts)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:4] == b"PK\x03\x04":
        return _read_zip(path, raw)
    return _read_legacy(path, raw)
