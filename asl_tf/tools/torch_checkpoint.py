"""Reads PyTorch checkpoints (`torch.save` files) into numpy without PyTorch and without risk.

A `torch.save` file is a pickle, and unpickling runs whatever callables the file names. The reader
here uses a restricted `pickle.Unpickler` whose `find_class` only hands out the handful of globals
a checkpoint of tensors needs (tensor rebuild functions, storage and dtype names, `OrderedDict`,
numbers, strings and containers built only from values the pickle holds), replaced by local
stand-ins, so that no code is reached and no builtin turns a few bytes into gigabytes;
any other global (`os.system`, `builtins.eval`, ...) is refused when the pickle names it, before
anything is called. Tensors become numpy arrays.

Both formats written by `torch.save` are read: the zip archive (torch >= 1.6, `<name>/data.pkl` plus
one `<name>/data/<key>` record per storage) and the older stream of pickles followed by raw storage
bytes. The pre-1.0 tar format is refused with a hint to re-save the file.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import reprlib
import struct
import tarfile
import zipfile
from typing import Any, Callable, Dict, NamedTuple, Tuple

import numpy as np

from asl_tf import restricted_pickle

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MODULE_PREFIX = "module."
# The pickle of a checkpoint describes tensors (kilobytes to a few MiB); a larger one is refused
# before it is decompressed.
MAX_PICKLE_BYTES = 256 << 20
# The arrays of a checkpoint may add up to at most this many times its file size (a state dict
# stores each weight once; views of one storage count once per view).
MAX_EXPANSION = 4


class CheckpointError(ValueError):
  """A file that cannot be read as a PyTorch checkpoint; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
  """A checkpoint whose pickle names a global outside the allow-list."""


class _Name(str):
  """An immutable stand-in for a torch storage type or dtype named by the pickle."""

  __slots__ = ()


# torch name -> (numpy dtype of the stored elements, numpy dtype handed back).
_TORCH_DTYPES = {
    "float32": ("<f4", np.float32),
    "float64": ("<f8", np.float64),
    "float16": ("<f2", np.float16),
    "bfloat16": ("<u2", np.float32),
    "complex64": ("<c8", np.complex64),
    "complex128": ("<c16", np.complex128),
    "int64": ("<i8", np.int64),
    "int32": ("<i4", np.int32),
    "int16": ("<i2", np.int16),
    "int8": ("<i1", np.int8),
    "uint8": ("<u1", np.uint8),
    "uint16": ("<u2", np.uint16),
    "uint32": ("<u4", np.uint32),
    "uint64": ("<u8", np.uint64),
    "bool": ("|u1", np.bool_),
}
_STORAGE_TYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "UntypedStorage": "uint8",
}
_NUMBER_BUILTINS = ("int", "float", "complex", "bool")
_MAX_NUMBER_TEXT = 64  # characters of a number written out as text
# Called only over a container the pickle itself holds: no lazy or sized argument (range(2**30),
# bytes(2**30), list(b"..."): a file of a few bytes asking for gigabytes).
_CONTAINER_BUILTINS = ("set", "frozenset", "list", "tuple", "dict")
_CONTAINERS = (list, tuple, set, frozenset, dict)


def _over_container(constructor: type) -> Callable[..., Any]:
  """`constructor` over a container the pickle holds; what it hashes (set items, dict keys)
  passes `restricted_pickle.check_hashable` first."""
  def make(*args):
    if len(args) > 1 or (args and not isinstance(args[0], _CONTAINERS)):
      raise TypeError(f"{constructor.__name__}() is only allowed over a container the pickle "
                      "holds")
    if args and constructor in (set, frozenset):
      for item in args[0]:
        restricted_pickle.check_hashable(item)
    elif args and issubclass(constructor, dict) and not isinstance(args[0], dict):
      for pair in args[0]:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
          raise TypeError(f"{constructor.__name__}() takes (key, value) pairs")
        restricted_pickle.check_hashable(pair[0])
    return constructor(*args)
  return make


def _number_of(constructor: type) -> Callable[..., Any]:
  def make(*args):
    if len(args) > 1 or (args and not isinstance(args[0], (int, float, complex, bool)) and not (
        isinstance(args[0], (str, bytes)) and len(args[0]) <= _MAX_NUMBER_TEXT)):
      raise TypeError(f"{constructor.__name__}() is only allowed of a number or a short text")
    return constructor(*args)
  return make


# Text codecs a checkpoint's strings may name: linear-time ones (punycode, say, is quadratic).
_CODECS = ("utf-8", "utf8", "latin1", "latin-1", "ascii")


def _str_of_data(*args):
  if not args or (len(args) == 1 and isinstance(args[0], str)) or (
      len(args) == 2 and isinstance(args[0], bytes) and args[1] in _CODECS):
    return str(*args)
  raise TypeError("str() is only allowed of a str, or of bytes and a plain text encoding")


def _bytes_of_data(*args):
  if not args or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))) or (
      len(args) == 2 and isinstance(args[0], str) and args[1] in _CODECS):
    return bytes(*args)
  raise TypeError("bytes() is only allowed of bytes, or of a str and a plain text encoding")


class _Storage(NamedTuple):
  """A storage named by a persistent id: which record, its element type and length."""

  key: str
  torch_dtype: str
  numel: int
  view_offset: int = 0


class _PendingTensor(NamedTuple):
  """A tensor whose storage bytes are attached once the whole pickle has been read.

  Immutable (as is `_Storage`), so a BUILD opcode cannot change a checked size or stride.
  """

  storage: _Storage
  offset: int
  size: Tuple[int, ...]
  stride: Tuple[int, ...]
  torch_dtype: str


def _int_tuple(value: Any, what: str) -> Tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise TypeError(f"tensor {what} must be a tuple of ints, got {reprlib.repr(value)}")
  return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise TypeError(f"tensor storage must come from a persistent id, got {type(storage).__name__}")
  return _make_pending(storage, storage_offset, size, stride, storage.torch_dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage) or storage.torch_dtype != "uint8":
    raise TypeError("_rebuild_tensor_v3 expects an untyped storage")
  if not isinstance(dtype, _Name) or dtype not in _TORCH_DTYPES:
    raise TypeError(f"unsupported tensor dtype {reprlib.repr(dtype)}")
  return _make_pending(storage, storage_offset, size, stride, str(dtype))


def _make_pending(storage, storage_offset, size, stride, torch_dtype):
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise TypeError("tensor storage offset must be a non-negative int, got "
                    f"{reprlib.repr(storage_offset)}")
  size = _int_tuple(size, "size")
  stride = _int_tuple(stride, "stride")
  if len(size) != len(stride) or any(v < 0 for v in size + stride):
    raise TypeError(f"invalid tensor size {size} / stride {stride}")
  return _PendingTensor(storage, storage_offset, size, stride, torch_dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, _PendingTensor):
    raise TypeError("a parameter must wrap a tensor")
  return data


def _allowed_global(module: str, name: str) -> Any:
  """Returns the local stand-in for an allowed global, or None."""
  if module in ("builtins", "__builtin__"):
    if name in _NUMBER_BUILTINS:
      return _number_of(getattr(builtins, name))
    if name in _CONTAINER_BUILTINS:
      return _over_container(getattr(builtins, name))
    stand_in = {"str": _str_of_data, "bytes": _bytes_of_data}.get(name)
    return stand_in and restricted_pickle.fresh(stand_in)
  if module == "collections" and name == "OrderedDict":
    return _over_container(collections.OrderedDict)
  if module == "_codecs" and name == "encode":
    return restricted_pickle.fresh(restricted_pickle.latin1_encode)
  if module == "torch._utils":
    fn = {
        "_rebuild_tensor_v2": _rebuild_tensor_v2,
        "_rebuild_tensor_v3": _rebuild_tensor_v3,
        "_rebuild_parameter": _rebuild_parameter,
        "_rebuild_parameter_with_state": _rebuild_parameter,
    }.get(name)
    return fn and restricted_pickle.fresh(fn)
  if module in ("torch", "torch.storage") and name in _STORAGE_TYPES:
    return _Name("storage:" + _STORAGE_TYPES[name])
  if module == "torch" and name in _TORCH_DTYPES:
    return _Name(name)
  return None


class _RestrictedUnpickler(restricted_pickle.BoundedUnpickler):
  """Unpickler that resolves only allow-listed globals and turns storages into `_Storage`."""

  def __init__(self, stream: io.BytesIO, path: str, legacy: bool):
    super().__init__(stream, encoding="utf-8")
    self._path = path
    self._legacy = legacy
    self.storages: Dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    found = _allowed_global(module, name)
    if found is None:
      raise UnsafeCheckpointError(
          f"refusing to unpickle {module}.{name} from {self._path}: only tensors and plain "
          "containers are allowed")
    return found

  def persistent_load(self, pid: Any) -> _Storage:
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      kind = pid[0] if isinstance(pid, tuple) and pid else pid
      raise CheckpointError(
          f"unsupported persistent object {reprlib.repr(kind)} in {self._path}: only tensor "
          "storages are allowed (pickled nn.Module objects are not)")
    if self._legacy:
      if len(pid) != 6:
        raise CheckpointError(f"malformed storage reference in {self._path}: {reprlib.repr(pid)}")
      _, storage_type, key, _, numel, view = pid
    else:
      if len(pid) != 5:
        raise CheckpointError(f"malformed storage reference in {self._path}: {reprlib.repr(pid)}")
      _, storage_type, key, _, numel = pid
      view = None
    if not isinstance(storage_type, _Name) or not storage_type.startswith("storage:"):
      raise CheckpointError(f"unknown storage type {reprlib.repr(storage_type)} in {self._path}")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise CheckpointError(f"malformed storage reference in {self._path}: {reprlib.repr(pid)}")
    torch_dtype = storage_type[len("storage:"):]
    root = self.storages.setdefault(key, _Storage(key, torch_dtype, numel))
    if root.torch_dtype != torch_dtype:
      raise CheckpointError(f"storage {key} has two dtypes in {self._path}")
    if view is None:
      return root
    view_key, offset, view_numel = view
    if not (isinstance(offset, int) and isinstance(view_numel, int) and offset >= 0
            and view_numel >= 0 and offset + view_numel <= root.numel):
      raise CheckpointError(f"storage view out of range in {self._path}: {reprlib.repr(view)}")
    return _Storage(key, torch_dtype, view_numel, offset)


def _to_array(tensor: _PendingTensor, flat: np.ndarray, path: str) -> np.ndarray:
  """Builds the strided tensor from its storage's 1-D array, checking every bound first."""
  storage = tensor.storage
  stored, target = _TORCH_DTYPES[tensor.torch_dtype]
  if storage.torch_dtype != tensor.torch_dtype:
    item = np.dtype(stored).itemsize
    byte_lo = storage.view_offset * flat.dtype.itemsize
    byte_len = storage.numel * flat.dtype.itemsize
    base = flat.view(np.uint8)[byte_lo:byte_lo + byte_len]
    base = base[:len(base) // item * item].view(stored)
  else:
    base = flat[storage.view_offset:storage.view_offset + storage.numel]
  elements = 1
  for n in tensor.size:
    elements *= n  # Python ints: no overflow
  if elements > len(base):
    # Checked before allocating: stride-0 (expanded) or overlapping tensors would let a tiny file
    # ask for any amount of memory.
    raise CheckpointError(
        f"tensor of size {tensor.size} / stride {tensor.stride} has {elements} elements but its "
        f"storage holds {len(base)} in {path}: expanded or overlapping tensors are not "
        "supported (save tensor.contiguous())")
  if elements == 0:
    array = np.zeros(tensor.size, dtype=stored)
  else:
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= len(base):
      raise CheckpointError(
          f"tensor of size {tensor.size} / stride {tensor.stride} / offset {tensor.offset} "
          f"reads past its storage of {len(base)} elements in {path}")
    item = base.dtype.itemsize
    array = np.lib.stride_tricks.as_strided(
        base[tensor.offset:], shape=tensor.size, strides=[s * item for s in tensor.stride],
        writeable=False).copy()
  if tensor.torch_dtype == "bfloat16":
    return (array.astype(np.uint32) << 16).view(np.float32)
  return np.asarray(array, dtype=target)


def _materialize(obj: Any, arrays: Callable[[_PendingTensor], np.ndarray],
                 memo: Dict[int, Any]) -> Any:
  """Replaces pending tensors with arrays and dict subclasses with plain dicts, keeping sharing."""
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _PendingTensor):
    out = arrays(obj)
  elif isinstance(obj, _Storage):
    raise TypeError("a torch storage outside a tensor")
  elif isinstance(obj, dict):
    out = {}
    memo[id(obj)] = out
    for k, v in obj.items():
      out[k] = _materialize(v, arrays, memo)
  elif isinstance(obj, list):
    out = []
    memo[id(obj)] = out
    out.extend(_materialize(v, arrays, memo) for v in obj)
  elif isinstance(obj, tuple):
    out = tuple(_materialize(v, arrays, memo) for v in obj)
  elif isinstance(obj, _Name):
    if obj.startswith("storage:"):
      raise TypeError(f"a torch storage type outside a tensor: {obj}")
    out = str(obj)
  else:
    return obj
  memo[id(obj)] = out
  return out


def _flat_array(data: bytes, torch_dtype: str, numel: int, big_endian: bool) -> np.ndarray:
  stored = np.dtype(_TORCH_DTYPES[torch_dtype][0])
  if big_endian:
    stored = stored.newbyteorder(">")
  flat = np.frombuffer(data, dtype=stored, count=numel)
  return flat.astype(stored.newbyteorder("=")) if big_endian else flat


def _load_zip(path: str) -> Tuple[Any, Dict[str, np.ndarray]]:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    if any(n.endswith("/constants.pkl") for n in names):
      raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), not a checkpoint")
    pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkls) != 1:
      raise CheckpointError(f"{path} is a zip file but not a torch.save archive (no data.pkl)")
    if zf.getinfo(pkls[0]).file_size > MAX_PICKLE_BYTES:
      raise CheckpointError(f"{path}: {pkls[0]} declares {zf.getinfo(pkls[0]).file_size} bytes "
                            f"(> {MAX_PICKLE_BYTES}); not a checkpoint of tensors")
    prefix = pkls[0][:-len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = zf.read(prefix + "byteorder").strip() == b"big"
    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), path, legacy=False)
    obj = unpickler.load()
    flats = {}
    for key, storage in unpickler.storages.items():
      record = f"{prefix}data/{key}"
      if record not in names:
        raise CheckpointError(f"{path} lacks the storage record {record}")
      nbytes = storage.numel * np.dtype(_TORCH_DTYPES[storage.torch_dtype][0]).itemsize
      info = zf.getinfo(record)
      if info.compress_type != zipfile.ZIP_STORED:
        # torch.save stores storages uncompressed; a compressed one could inflate without bound.
        raise CheckpointError(f"storage record {record} in {path} is compressed; torch.save "
                              "writes storages uncompressed (re-save the checkpoint)")
      if info.file_size < nbytes:
        raise CheckpointError(f"storage record {record} in {path} holds {info.file_size} bytes "
                              f"but its storage declares {nbytes}: truncated or forged")
      with zf.open(record) as f:
        data = f.read(nbytes)
      if len(data) < nbytes:
        raise CheckpointError(f"storage record {record} in {path} is shorter than its tensors")
      flats[key] = _flat_array(data, storage.torch_dtype, storage.numel, big_endian)
  return obj, flats


def _load_legacy(path: str, raw: bytes) -> Tuple[Any, Dict[str, np.ndarray]]:
  stream = io.BytesIO(raw)
  try:
    magic = _RestrictedUnpickler(stream, path, legacy=True).load()
  except UnsafeCheckpointError:
    raise
  except Exception:  # pylint: disable=broad-except
    magic = None
  if magic != _LEGACY_MAGIC:
    if tarfile.is_tarfile(path):
      raise CheckpointError(
          f"{path} uses the pre-1.0 tar checkpoint format: re-save it with a recent torch "
          "(torch.save(torch.load(f), f))")
    raise CheckpointError(
        f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor the legacy "
        "format); is it truncated or another kind of file?")
  protocol = _RestrictedUnpickler(stream, path, legacy=True).load()
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointError(f"{path}: unknown legacy checkpoint protocol {reprlib.repr(protocol)}")
  sys_info = _RestrictedUnpickler(stream, path, legacy=True).load()
  big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
  unpickler = _RestrictedUnpickler(stream, path, legacy=True)
  obj = unpickler.load()
  keys = _RestrictedUnpickler(stream, path, legacy=True).load()
  if not isinstance(keys, list) or any(type(k) is not str for k in keys):  # hashed below
    raise CheckpointError(f"{path}: the storage key list is not a list of strings")
  flats = {}
  for key in keys:
    if key not in unpickler.storages:
      raise CheckpointError(f"{path}: storage {reprlib.repr(key)} is listed but never referenced")
    storage = unpickler.storages[key]
    header = stream.read(8)
    if len(header) != 8:
      raise CheckpointError(f"{path} is truncated in the storage data")
    (numel,) = struct.unpack(">q" if big_endian else "<q", header)
    nbytes = numel * np.dtype(_TORCH_DTYPES[storage.torch_dtype][0]).itemsize
    data = stream.read(nbytes)
    if numel < storage.numel or len(data) != nbytes:
      raise CheckpointError(f"{path} is truncated in the storage data")
    flats[key] = _flat_array(data, storage.torch_dtype, storage.numel, big_endian)
  return obj, flats


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` checkpoint safely, without PyTorch.

  Args:
    path: a file written by `torch.save` (zip archive or the legacy non-zip format).

  Returns:
    The saved object with every tensor as a numpy array (bfloat16 widened to float32) and every
    dict (including `OrderedDict`) as a plain dict; lists, tuples and scalars are kept.

  Raises:
    UnsafeCheckpointError: the pickle names a global outside the allow-list (nothing is executed).
    CheckpointError: the file is missing, truncated, not a checkpoint or malformed.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
  try:
    if raw[:4] == b"PK\x03\x04":
      obj, flats = _load_zip(path)
    else:
      obj, flats = _load_legacy(path, raw)
    budget = [MAX_EXPANSION * max(len(raw), 1 << 20)]

    def array(tensor):
      out = _to_array(tensor, flats[tensor.storage.key], path)
      budget[0] -= out.nbytes
      if budget[0] < 0:
        # Each tensor fits its storage, but many tensors over one storage could still turn a
        # small file into any amount of memory.
        raise CheckpointError(f"{path}: its tensors add up to more than {MAX_EXPANSION}x the "
                              "file's size (many tensors over shared storage); refused")
      return out

    result = _materialize(obj, array, {})
  except CheckpointError:
    raise
  except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError,
          AttributeError, IndexError, KeyError, OverflowError, RecursionError, struct.error,
          MemoryError) as e:
    raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
  return result


def select_state_dict(ckpt: Dict[str, Any], use_ema: bool) -> Dict[str, np.ndarray]:
  """Picks the model weights out of a loaded ActionFormer / ASL checkpoint.

  Args:
    ckpt: the result of `load_torch_checkpoint`.
    use_ema: take `state_dict_ema` (the EMA weights used for evaluation) instead of `state_dict`.

  Returns:
    `{parameter name: array}` with a leading DataParallel `module.` prefix removed.

  Raises:
    CheckpointError: the key is missing, or is not a flat dict of arrays.
  """
  key = "state_dict_ema" if use_ema else "state_dict"
  if not isinstance(ckpt, dict) or key not in ckpt:
    present = (reprlib.repr(sorted(k for k in ckpt if isinstance(k, str)))
               if isinstance(ckpt, dict) else type(ckpt).__name__)
    raise CheckpointError(f"checkpoint has no {key!r}; keys present: {present}")
  state = ckpt[key]
  if not isinstance(state, dict):
    raise CheckpointError(f"checkpoint[{key!r}] is a {type(state).__name__}, not a dict")
  out = {}
  for name, value in state.items():
    if not isinstance(value, np.ndarray):
      raise CheckpointError(f"checkpoint[{key!r}][{reprlib.repr(name)}] is a "
                            f"{type(value).__name__}, not a tensor")
    short = name[len(_MODULE_PREFIX):] if name.startswith(_MODULE_PREFIX) else name
    if short in out:
      raise CheckpointError(f"checkpoint[{key!r}] has both {reprlib.repr(short)} and "
                            f"{reprlib.repr(name)}")
    out[short] = value
  return out
