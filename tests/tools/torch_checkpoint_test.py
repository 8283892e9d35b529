"""Tests for the PyTorch-free checkpoint reader."""

import collections
import io
import pickle
import struct
import zipfile

import numpy as np
import pytest

from asl_tf.tools import torch_checkpoint as tc
from parity_cases import parity_file
import restricted_pickle_test

_CASES = ("thumos_like", "anet_like")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Global:
  """A global written by name, as torch's pickles name `torch._utils._rebuild_tensor_v2`."""

  def __init__(self, module, name):
    self.module = module
    self.name = name

  def __call__(self, *args):
    raise AssertionError("never called while pickling")


class _Storage:

  def __init__(self, key, storage_type, flat, view=None):
    self.key = key
    self.storage_type = storage_type
    self.flat = flat
    self.view = view  # legacy files: (view key, offset, numel) of a view into this storage


class _Tensor:
  """Pickles like a torch tensor over `storage` (a `_Storage`)."""

  def __init__(self, storage, offset, size, stride, v3_dtype=None, parameter=False):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())
    self.v3_dtype = v3_dtype
    self.parameter = parameter

  def __reduce__(self):
    if self.v3_dtype is not None:
      rebuilt = (_Global("torch._utils", "_rebuild_tensor_v3"),
                 self.args + (_Global("torch", self.v3_dtype),))
    else:
      rebuilt = (_Global("torch._utils", "_rebuild_tensor_v2"), self.args)
    if self.parameter:
      return (_Global("torch._utils", "_rebuild_parameter"),
              (_Reduced(rebuilt), True, collections.OrderedDict()))
    return rebuilt


class _Reduced:

  def __init__(self, rv):
    self.rv = rv

  def __reduce__(self):
    return self.rv


class _TorchLikePickler(pickle._Pickler):  # pylint: disable=protected-access
  """Protocol-2 pickler writing storages as persistent ids, like `torch.save`."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, f, legacy):
    super().__init__(f, protocol=2)
    self.legacy = legacy
    self.storages = {}

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = _save_global

  def persistent_id(self, obj):
    if not isinstance(obj, _Storage):
      return None
    self.storages[obj.key] = obj
    pid = ("storage", _Global("torch", obj.storage_type), obj.key, "cpu", obj.flat.size)
    return pid + (obj.view,) if self.legacy else pid


def _write_zip(path, obj, top="archive", byteorder="little"):
  buf = io.BytesIO()
  pickler = _TorchLikePickler(buf, legacy=False)
  pickler.dump(obj)
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{top}/data.pkl", buf.getvalue())
    zf.writestr(f"{top}/byteorder", byteorder)
    for key, storage in pickler.storages.items():
      order = ">" if byteorder == "big" else "<"
      flat = storage.flat.astype(storage.flat.dtype.newbyteorder(order))
      zf.writestr(f"{top}/data/{key}", flat.tobytes())
    zf.writestr(f"{top}/version", "3\n")


def _write_legacy(path, obj):
  buf = io.BytesIO()
  for header in (_LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
    pickle.dump(header, buf, protocol=2)
  pickler = _TorchLikePickler(buf, legacy=True)
  pickler.dump(obj)
  keys = list(pickler.storages)
  pickle.dump(keys, buf, protocol=2)
  for key in keys:
    flat = pickler.storages[key].flat
    buf.write(struct.pack("<q", flat.size) + flat.astype(flat.dtype.newbyteorder("<")).tobytes())
  with open(path, "wb") as f:
    f.write(buf.getvalue())


def _bf16_bits(values):
  return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _synthetic():
  """A checkpoint object exercising strides, offsets, dtypes and containers, and its expectation."""
  w = np.arange(24, dtype=np.float32).reshape(4, 6) - 7.5
  ws = _Storage("0", "FloatStorage", w.ravel())
  long_flat = np.array([3, -2, 2**40, 7], np.int64)
  bf16 = np.array([1.5, -2.0, 0.15625, 2.0**127], np.float32)
  u16 = np.array([1, 65535, 300], np.uint16)
  state = collections.OrderedDict([
      ("module.conv.weight", _Tensor(ws, 0, (4, 6), (6, 1), parameter=True)),
      ("module.conv.weight_t", _Tensor(ws, 0, (6, 4), (1, 6))),
      ("module.row2", _Tensor(ws, 12, (6,), (1,))),
      ("module.scale", _Tensor(ws, 5, (), ())),
      ("module.empty", _Tensor(ws, 0, (0, 3), (3, 1))),
      ("module.steps", _Tensor(_Storage("1", "LongStorage", long_flat), 1, (3,), (1,))),
      ("module.half", _Tensor(_Storage("2", "HalfStorage", np.array([0.5, -1.25], np.float16)),
                              0, (2,), (1,))),
      ("module.bf16", _Tensor(_Storage("3", "BFloat16Storage", _bf16_bits(bf16)), 0, (2, 2),
                              (2, 1))),
      ("module.mask", _Tensor(_Storage("4", "BoolStorage", np.array([1, 0, 1], np.uint8)), 0, (3,),
                              (1,))),
      ("module.i8", _Tensor(_Storage("5", "CharStorage", np.array([-128, 5], np.int8)), 0, (2,),
                            (1,))),
      ("module.u8", _Tensor(_Storage("6", "ByteStorage", np.array([255, 0], np.uint8)), 0, (2,),
                            (1,))),
      ("module.f64", _Tensor(_Storage("7", "DoubleStorage", np.array([np.pi])), 0, (1, 1),
                             (1, 1))),
      ("module.u16", _Tensor(_Storage("8", "UntypedStorage", u16.view(np.uint8)), 1, (2,), (1,),
                             v3_dtype="uint16")),
  ])
  # pylint: disable-next=protected-access
  state._metadata = collections.OrderedDict([("", {"version": 1})])
  obj = {
      "epoch": 12,
      "state_dict": state,
      "optimizer": {"state": {0: {"step": 3, "exp_avg": _Tensor(ws, 6, (6,), (1,))}},
                    "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1],
                                      "amsgrad": False, "foreach": None}]},
      "scheduler": {"tags": {"a", "b"}, "blob": b"\x00\xff", "inf": float("inf")},
  }
  expected = {
      "conv.weight": w,
      "conv.weight_t": w.T,
      "row2": w[2],
      "scale": np.array(w.ravel()[5]),
      "empty": np.zeros((0, 3), np.float32),
      "steps": long_flat[1:],
      "half": np.array([0.5, -1.25], np.float16),
      "bf16": bf16.reshape(2, 2),
      "mask": np.array([True, False, True]),
      "i8": np.array([-128, 5], np.int8),
      "u8": np.array([255, 0], np.uint8),
      "f64": np.array([[np.pi]]),
      "u16": u16[1:],
  }
  return obj, expected


def _assert_arrays_equal(got, want):
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert isinstance(got[name], np.ndarray), name
    assert got[name].dtype == value.dtype, name
    assert got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("case", _CASES)
def test_fixture_checkpoint_matches_npz_exactly(case):
  ckpt = tc.load_torch_checkpoint(parity_file(case + ".pth.tar"))
  params = np.load(parity_file(case + ".npz"))
  want = {k[len("param/"):]: params[k] for k in params.files if k.startswith("param/")}
  assert len(want) > 200
  assert ckpt["epoch"] == 35
  assert set(ckpt) == {"epoch", "state_dict", "state_dict_ema"}
  _assert_arrays_equal(tc.select_state_dict(ckpt, use_ema=False), want)
  _assert_arrays_equal(tc.select_state_dict(ckpt, use_ema=True), want)
  assert ckpt["state_dict"]["reg_head.scale.0.scale"].shape == ()


@pytest.mark.parametrize("writer", [_write_zip, _write_legacy], ids=["zip", "legacy"])
def test_synthetic_checkpoint_round_trip(tmp_path, writer):
  obj, expected = _synthetic()
  path = tmp_path / "synthetic.pth.tar"
  writer(path, obj)
  ckpt = tc.load_torch_checkpoint(path)
  assert ckpt["epoch"] == 12
  assert type(ckpt["state_dict"]) is dict  # pylint: disable=unidiomatic-typecheck
  _assert_arrays_equal(tc.select_state_dict(ckpt, use_ema=False), expected)
  assert all(v.flags.c_contiguous and v.flags.writeable for v in ckpt["state_dict"].values())
  ckpt["state_dict"]["module.conv.weight"][0, 0] = 100.0
  assert ckpt["state_dict"]["module.conv.weight_t"][0, 0] == expected["conv.weight"][0, 0]
  group = ckpt["optimizer"]["param_groups"][0]
  assert group == {"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1], "amsgrad": False,
                   "foreach": None}
  np.testing.assert_array_equal(ckpt["optimizer"]["state"][0]["exp_avg"], expected["row2"] - 6)
  assert ckpt["scheduler"] == {"tags": {"a", "b"}, "blob": b"\x00\xff", "inf": float("inf")}


def test_big_endian_archive_is_byteswapped(tmp_path):
  values = np.array([1.5, -3.25, 1e-3], np.float32)
  obj = {"state_dict": {"w": _Tensor(_Storage("0", "FloatStorage", values), 0, (3,), (1,))}}
  path = tmp_path / "be.pth"
  _write_zip(path, obj, top="some_name", byteorder="big")
  got = tc.load_torch_checkpoint(path)["state_dict"]["w"]
  assert got.dtype == np.float32 and got.dtype.isnative
  np.testing.assert_array_equal(got, values)


def _zip_with_pickle(path, data_pkl):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("ckpt/data.pkl", data_pkl)
    zf.writestr("ckpt/byteorder", "little")


def _reduce_payload(module, name, arg, proto=2):
  """A pickle calling `module.name(arg)` via GLOBAL (or STACK_GLOBAL) + REDUCE."""
  if proto >= 4:
    head = (pickle.PROTO + bytes([proto]) + pickle.SHORT_BINUNICODE + bytes([len(module)])
            + module.encode() + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode()
            + pickle.STACK_GLOBAL)
  else:
    head = pickle.PROTO + bytes([proto]) + pickle.GLOBAL + f"{module}\n{name}\n".encode()
  encoded = arg.encode()
  return (head + pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded + pickle.TUPLE1
          + pickle.REDUCE + pickle.STOP)


@pytest.mark.parametrize("module,name,code,proto", [
    ("os", "system", "touch {}", 2),
    ("posix", "system", "touch {}", 2),
    ("builtins", "eval", "open({!r}, 'w').close()", 2),
    ("builtins", "exec", "open({!r}, 'w').close()", 4),
    ("subprocess", "getoutput", "touch {}", 2),
])
def test_malicious_archive_is_refused_without_running(tmp_path, module, name, code, proto):
  marker = tmp_path / "pwned"
  payload = _reduce_payload(module, name, code.format(str(marker)), proto)
  path = tmp_path / "ckpt.pth.tar"
  _zip_with_pickle(path, payload)
  with pytest.raises(tc.UnsafeCheckpointError,
                     match=rf"refusing to unpickle {module}\.{name} from .*ckpt\.pth\.tar: only "
                     "tensors and plain containers are allowed"):
    tc.load_torch_checkpoint(path)
  assert not marker.exists()


def _call(module, name, arg_opcodes):
  """Pickle opcodes calling `module.name(<arg_opcodes>)`."""
  return (pickle.GLOBAL + f"{module}\n{name}\n".encode() + arg_opcodes + pickle.TUPLE1
          + pickle.REDUCE)


_INT_2_30 = pickle.BININT + struct.pack("<i", 2 ** 30)


@pytest.mark.parametrize("body", [
    _call("builtins", "bytearray", _INT_2_30),  # 1 GiB of zeros from a few bytes
    _call("builtins", "bytes", _INT_2_30),
    _call("builtins", "list", _call("builtins", "range",  # 2**20 ints (2**30 as easily)
                                    pickle.BININT + struct.pack("<i", 2 ** 20))),
    _call("builtins", "set", pickle.SHORT_BINBYTES + bytes([4]) + b"abcd"),  # one int per byte
], ids=["bytearray", "bytes", "list_of_range", "set_of_bytes"])
def test_builtins_cannot_make_memory_the_file_does_not_hold(tmp_path, body):
  """The allowed builtins were plain callables: a 180-byte checkpoint asked for 1 GiB."""
  path = tmp_path / "bomb.pth"
  _zip_with_pickle(path, pickle.PROTO + bytes([3]) + body + pickle.STOP)
  with pytest.raises(tc.CheckpointError, match=r"bomb\.pth"):
    tc.load_torch_checkpoint(path)


@pytest.mark.parametrize("view,ok", [(("v", 1, 2), True), (("v", 3, -1), False),
                                     (("v", 2, 3), False)])
def test_legacy_storage_views_must_lie_inside_their_storage(tmp_path, view, ok):
  storage = _Storage("0", "FloatStorage", np.arange(4, dtype=np.float32), view=view)
  path = tmp_path / "legacy_view.pt"
  _write_legacy(path, {"w": _Tensor(storage, 0, (0,), (1,))})
  if ok:
    assert tc.load_torch_checkpoint(path)["w"].shape == (0,)
  else:
    with pytest.raises(tc.CheckpointError, match=r"storage view out of range in .*legacy_view"):
      tc.load_torch_checkpoint(path)


def _doubling_lists(depth):
  """Pickle opcodes leaving L_depth on the stack, L_0 = [], L_i = [L_(i-1), L_(i-1)] (memo
  references: 2**depth leaves from a few bytes per level)."""
  ops = pickle.EMPTY_LIST + pickle.BINPUT + b"\x00"
  for i in range(1, depth + 1):
    ops += (pickle.MARK + pickle.BINGET + bytes([i - 1]) + pickle.BINGET + bytes([i - 1])
            + pickle.LIST + pickle.BINPUT + bytes([i]))
  return ops


@pytest.mark.parametrize("opcode", sorted(restricted_pickle_test.HASHING_OPCODES) + [
    "set_of", "dict_of", "ordered_dict_of"])
def test_a_checkpoint_cannot_make_the_reader_hash_slowly(tmp_path, opcode):
  """A dict key or set item of T_28, T_i = (T_(i-1), T_(i-1)), took 2 s, doubling per level;
  also through the allowed containers that hash what they are given."""
  slow_key = restricted_pickle_test.SLOW_KEY
  body = restricted_pickle_test.HASHING_OPCODES.get(opcode) or {
      "set_of": _call("builtins", "set", pickle.MARK + slow_key + pickle.LIST),
      "dict_of": _call("builtins", "dict", pickle.MARK + slow_key + pickle.NONE + pickle.TUPLE2
                       + pickle.LIST),
      "ordered_dict_of": _call("collections", "OrderedDict", pickle.MARK + slow_key + pickle.NONE
                               + pickle.TUPLE2 + pickle.LIST),
  }[opcode]
  path = tmp_path / "slow.pth"
  _zip_with_pickle(path, restricted_pickle_test.with_protocol(body))
  with pytest.raises(tc.CheckpointError, match=r"slow\.pth is not a readable PyTorch checkpoint: "
                                               r"a dict key or set item is (a tuple|an integer)"):
    tc.load_torch_checkpoint(path)


def test_a_legacy_checkpoints_storage_keys_cannot_be_slow_to_hash(tmp_path):
  """The legacy format's last pickle lists the storage keys, each then looked up in a dict: a
  list of one self-doubling tuple (314 bytes at depth 28) took 2.6 s, doubling per level."""
  buf = io.BytesIO()
  for header in (_LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}, {}):
    pickle.dump(header, buf, protocol=2)
  buf.write(restricted_pickle_test.with_protocol(
      pickle.MARK + restricted_pickle_test.SLOW_KEY + pickle.LIST, protocol=2))
  path = tmp_path / "legacy_keys.pt"
  path.write_bytes(buf.getvalue())
  with pytest.raises(tc.CheckpointError, match=r"legacy_keys\.pt: the storage key list is not a "
                                               "list of strings"):
    tc.load_torch_checkpoint(path)


def test_str_of_a_shared_structure_cannot_blow_up(tmp_path):
  """str() of nested lists sharing their halves: 249 bytes made a 100 MB string at depth 24."""
  path = tmp_path / "bomb.pth"
  _zip_with_pickle(path, pickle.PROTO + bytes([3]) + _doubling_lists(16) + pickle.POP
                   + _call("builtins", "str", pickle.BINGET + bytes([16])) + pickle.STOP)
  with pytest.raises(tc.CheckpointError, match=r"bomb\.pth"):
    tc.load_torch_checkpoint(path)


def test_messages_show_a_bounded_part_of_what_the_file_holds(tmp_path):
  """A tensor size of nested lists sharing their halves: its full repr in the error message was
  671 MB from a 337-byte file at depth 26."""
  nested = []
  for _ in range(18):
    nested = [nested, nested]
  path = tmp_path / "deep.pth"
  _write_zip(path, {"w": _Tensor(_Storage("0", "FloatStorage", np.ones(2, np.float32)), 0,
                                 nested, (1,))})
  assert path.stat().st_size < 4096
  with pytest.raises(tc.CheckpointError) as e:
    tc.load_torch_checkpoint(path)
  assert "size" in str(e.value) and len(str(e.value)) < 1000


@pytest.mark.parametrize("body", [
    pickle.GLOBAL + b"builtins\nstr\n" + pickle.MARK + pickle.SHORT_BINBYTES + b"\x03abc"
    + pickle.SHORT_BINUNICODE + b"\x08punycode" + pickle.TUPLE + pickle.REDUCE,
    pickle.GLOBAL + b"builtins\nbytes\n" + pickle.MARK + pickle.SHORT_BINUNICODE + b"\x03abc"
    + pickle.SHORT_BINUNICODE + b"\x08punycode" + pickle.TUPLE + pickle.REDUCE,
], ids=["str", "bytes"])
def test_text_conversions_take_plain_codecs_only(tmp_path, body):
  """punycode and the like take time quadratic in their input (8 s for 800 KB)."""
  path = tmp_path / "codec.pth"
  _zip_with_pickle(path, pickle.PROTO + bytes([3]) + body + pickle.STOP)
  with pytest.raises(tc.CheckpointError, match=r"codec\.pth"):
    tc.load_torch_checkpoint(path)


def test_the_builtins_a_checkpoint_uses_still_load(tmp_path):
  """Sets, tuples and protocol-2 bytes (what `torch.save` pickles hold besides tensors)."""
  path = tmp_path / "plain.pth"
  obj = {"epoch": 3, "names": {"a", "b"}, "shape": (1, 2), "blob": b"\x00\xff", "lr": 0.5}
  _zip_with_pickle(path, pickle.dumps(obj, protocol=2))
  assert tc.load_torch_checkpoint(path) == obj


def test_payload_is_live_with_plain_pickle(tmp_path):
  marker = tmp_path / "control"
  pickle.loads(_reduce_payload("builtins", "exec", f"open({str(marker)!r}, 'w').close()", 4))
  assert marker.exists()


def test_malicious_legacy_stream_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "legacy.pt"
  path.write_bytes(_reduce_payload("os", "system", f"touch {marker}"))
  with pytest.raises(tc.UnsafeCheckpointError, match=r"os\.system from .*legacy\.pt"):
    tc.load_torch_checkpoint(path)
  assert not marker.exists()


def test_malicious_storage_type_is_refused(tmp_path):
  storage = _Storage("0", "FloatStorage", np.ones(2, np.float32))
  path = tmp_path / "evil_storage.pth"
  _write_zip(path, {"w": _Tensor(storage, 0, (2,), (1,))})
  with zipfile.ZipFile(path) as zf:
    entries = {n: zf.read(n) for n in zf.namelist()}
  entries["archive/data.pkl"] = entries["archive/data.pkl"].replace(
      b"ctorch\nFloatStorage\n", b"cos\nsystem\n")
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in entries.items():
      zf.writestr(name, data)
  with pytest.raises(tc.UnsafeCheckpointError, match=r"os\.system"):
    tc.load_torch_checkpoint(path)


def test_out_of_bounds_tensor_is_refused(tmp_path):
  storage = _Storage("0", "FloatStorage", np.ones(4, np.float32))
  path = tmp_path / "oob.pth"
  _write_zip(path, {"w": _Tensor(storage, 2, (2, 2), (2, 1))})
  with pytest.raises(tc.CheckpointError, match=r"reads past its storage of 4 elements in .*oob"):
    tc.load_torch_checkpoint(path)


@pytest.mark.parametrize("size,stride", [
    ((4096, 4096), (0, 0)),          # 64 MiB out of one stored float
    ((1 << 20, 1 << 20), (0, 0)),    # 4 TiB: MemoryError before the check
    ((3, 2), (1, 1)),                # overlapping rows: 6 elements over a storage of 4
])
def test_tensors_with_more_elements_than_their_storage_are_refused(tmp_path, size, stride):
  storage = _Storage("0", "FloatStorage", np.ones(4, np.float32))
  path = tmp_path / "expanded.pth"
  _write_zip(path, {"w": _Tensor(storage, 0, size, stride)})
  assert path.stat().st_size < 1000
  with pytest.raises(tc.CheckpointError, match=r"has \d+ elements but its storage holds 4 in "
                                               r".*expanded.pth"):
    tc.load_torch_checkpoint(path)


def test_many_tensors_over_one_storage_cannot_multiply_memory(tmp_path):
  """Each of 10 tensors fits its 1 MiB storage; together they would be 10 MiB from a ~1 MiB
  file (200 such made 209 MB from 1 MB)."""
  storage = _Storage("0", "FloatStorage", np.zeros(1 << 18, np.float32))
  path = tmp_path / "views.pth"
  _write_zip(path, {f"w{i}": _Tensor(storage, 0, (1 << 18,), (1,)) for i in range(10)})
  with pytest.raises(tc.CheckpointError, match=r"add up to more than 4x the file's size"):
    tc.load_torch_checkpoint(path)
  _write_zip(path, {f"w{i}": _Tensor(storage, 0, (1 << 18,), (1,)) for i in range(2)})
  assert len(tc.load_torch_checkpoint(path)) == 2  # a tied weight or two: fine


def _zip_checkpoint_with_record(path, declared, record_bytes, compress):
  storage = _Storage("0", "FloatStorage", np.zeros(declared, np.float32))
  buf = io.BytesIO()
  _TorchLikePickler(buf, legacy=False).dump({"w": _Tensor(storage, 0, (declared,), (1,))})
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/data/0", record_bytes,
                compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)


def test_compressed_or_short_storage_records_are_refused_before_reading(tmp_path):
  bomb = tmp_path / "bomb.pth"
  _zip_checkpoint_with_record(bomb, 1 << 22, bytes(16 << 20), compress=True)
  assert bomb.stat().st_size < 100_000  # 16 MiB of zeros inflate from a few KB
  with pytest.raises(tc.CheckpointError, match=r"data/0 in .*bomb.pth is compressed"):
    tc.load_torch_checkpoint(bomb)
  short = tmp_path / "short.pth"
  _zip_checkpoint_with_record(short, 1 << 20, bytes(400), compress=False)
  with pytest.raises(tc.CheckpointError, match=r"holds 400 bytes but its storage declares "
                                               r"4194304: truncated or forged"):
    tc.load_torch_checkpoint(short)


def test_truncated_and_foreign_files_name_the_file(tmp_path):
  with open(parity_file("thumos_like.pth.tar"), "rb") as f:
    raw = f.read()
  truncated = tmp_path / "truncated.pth.tar"
  truncated.write_bytes(raw[:len(raw) // 2])
  text = tmp_path / "notes.txt"
  text.write_text("just some text\n")
  legacy_cut = tmp_path / "legacy_cut.pt"
  obj, _ = _synthetic()
  _write_legacy(legacy_cut, obj)
  legacy_cut.write_bytes(legacy_cut.read_bytes()[:-10])
  for path in (truncated, text, legacy_cut, tmp_path / "missing.pth"):
    with pytest.raises(tc.CheckpointError, match=path.name):
      tc.load_torch_checkpoint(path)


def test_select_state_dict_strips_module_prefix_and_names_missing_keys():
  w = np.ones(3, np.float32)
  ckpt = {"epoch": 1, "state_dict": {"module.a.weight": w, "b.bias": w}, "optimizer": {}}
  assert list(tc.select_state_dict(ckpt, use_ema=False)) == ["a.weight", "b.bias"]
  with pytest.raises(tc.CheckpointError,
                     match=r"no 'state_dict_ema'; keys present: \['epoch', 'optimizer', "
                     r"'state_dict'\]"):
    tc.select_state_dict(ckpt, use_ema=True)
  with pytest.raises(tc.CheckpointError, match="both 'a' and 'module.a'"):
    tc.select_state_dict({"state_dict": {"a": w, "module.a": w}}, use_ema=False)


def test_build_cannot_change_a_checked_stride(tmp_path):
  storage = _Storage("0", "FloatStorage", np.ones(4, np.float32))
  rebuild = (_Global("torch._utils", "_rebuild_tensor_v2"),
             (storage, 0, (4,), (1,), False, collections.OrderedDict()),
             (None, {"stride": (-(2**40),)}))
  path = tmp_path / "build.pth"
  _write_zip(path, {"w": _Reduced(rebuild)})
  with pytest.raises(tc.CheckpointError, match="build.pth"):
    tc.load_torch_checkpoint(path)


def test_build_cannot_alter_the_module_functions(tmp_path):
  defaults = tc._rebuild_tensor_v2.__defaults__  # pylint: disable=protected-access
  payload = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n"
             + pickle.NONE + pickle.EMPTY_DICT + pickle.SHORT_BINUNICODE + b"\x0c__defaults__"
             + pickle.BININT1 + b"\x07" + pickle.TUPLE1 + pickle.SETITEM + pickle.TUPLE2
             + pickle.BUILD + pickle.POP + pickle.EMPTY_DICT + pickle.STOP)
  path = tmp_path / "mutate.pth"
  _zip_with_pickle(path, payload)
  assert tc.load_torch_checkpoint(path) == {}
  assert tc._rebuild_tensor_v2.__defaults__ == defaults  # pylint: disable=protected-access
