"""The unpickler both restricted readers build on: what a file may hash, and that plain data
still loads exactly as `pickle.loads` gives it."""

import io
import pickle
import time

import pytest

from asl_tf import restricted_pickle


class _PlainUnpickler(restricted_pickle.BoundedUnpickler):
  """Allows what protocols 0-2 write bytes with, as both readers do."""

  def find_class(self, module, name):
    if (module, name) == ("_codecs", "encode"):
      return restricted_pickle.fresh(restricted_pickle.latin1_encode)
    return super().find_class(module, name)


def _loads(data):
  return _PlainUnpickler(io.BytesIO(data)).load()


def doubling_tuples(depth):
  """Pickle opcodes leaving T_depth on the stack, T_0 = (), T_i = (T_(i-1), T_(i-1)): 8 bytes
  per level, and hashing T_depth takes 2**depth steps (depth 28: about 2 s here)."""
  ops = pickle.EMPTY_TUPLE + pickle.BINPUT + b"\x00"
  for i in range(1, depth + 1):
    ops += (pickle.POP + pickle.BINGET + bytes([i - 1]) + pickle.BINGET + bytes([i - 1])
            + pickle.TUPLE2 + pickle.BINPUT + bytes([i]))
  return ops


SLOW_KEY = doubling_tuples(28)
# hash(k * (2**61 - 1)) == 0 for every k: such keys collide, and each insert scans all the others.
COLLIDING_INT = pickle.LONG1 + bytes([8]) + (2 ** 61 - 1).to_bytes(8, "little", signed=True)

# Each leaves one dict or set on the stack that would hash SLOW_KEY (or a colliding integer).
HASHING_OPCODES = {
    "setitem": pickle.EMPTY_DICT + SLOW_KEY + pickle.EMPTY_LIST + pickle.SETITEM,
    "setitems": (pickle.EMPTY_DICT + pickle.MARK + SLOW_KEY + pickle.NONE + pickle.SETITEMS),
    "dict": pickle.MARK + SLOW_KEY + pickle.NONE + pickle.DICT,
    "additems": pickle.EMPTY_SET + pickle.MARK + SLOW_KEY + pickle.ADDITEMS,
    "frozenset": pickle.MARK + SLOW_KEY + pickle.FROZENSET,
    "colliding_int": pickle.EMPTY_DICT + COLLIDING_INT + pickle.NONE + pickle.SETITEM,
}


def with_protocol(body, protocol=4):
  return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


@pytest.mark.parametrize("opcode", sorted(HASHING_OPCODES))
def test_a_file_cannot_make_the_reader_hash_slowly(opcode):
  """A 233-byte pickle of a self-doubling tuple as a dict key took 2 s to load (2**28 steps);
  each further level doubles it. Such keys and set items are refused before they are hashed."""
  start = time.perf_counter()
  with pytest.raises(pickle.UnpicklingError, match=r"a dict key or set item is (a tuple|an "
                                                   r"integer of 2\*\*60 or more); only text"):
    _loads(with_protocol(HASHING_OPCODES[opcode]))
  assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("value,ok", [
    ("video_test_0000004", True), (b"k", True), (None, True), (True, True), (0, True),
    (2 ** 60 - 1, True), (-(2 ** 60 - 1), True), (2 ** 60, False), (-(2 ** 60), False),
    (1.5, False), ((), False), ((1, 2), False), (frozenset(), False),
    (type("Name", (str,), {})("x"), False),  # a str subclass may hash as it likes
])
def test_check_hashable_takes_values_whose_hash_cannot_be_chosen(value, ok):
  if ok:
    assert restricted_pickle.check_hashable(value) is value
  else:
    with pytest.raises(pickle.UnpicklingError, match="a dict key or set item is"):
      restricted_pickle.check_hashable(value)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_plain_data_loads_as_pickle_loads_it(protocol):
  data = {"v1": [0.25, -1, None], 7: {"b": (1, "x", b"yz")}, b"k": True, "nested": [[], {}]}
  if protocol >= 4:  # sets pickle as opcodes from protocol 4 (before, as calls of builtins.set)
    data["sets"] = [{"a", 1}, frozenset({b"b", None})]
  raw = pickle.dumps(data, protocol=protocol)
  assert _loads(raw) == pickle.loads(raw) == data


def test_memo_indices_from_the_file_stay_in_the_binary_opcodes_range():
  """Text PUT / GET take any integer: k * (2**61 - 1) all hash to 0, so 16,000 PUTs (400 KB)
  took 2 s and the time grew with the square of the file (the C unpickler's memo is an array)."""
  puts = b"".join(b"p%d\n" % (k * (2 ** 61 - 1)) for k in range(1, 200))
  with pytest.raises(pickle.UnpicklingError, match=r"memo index b'2305843009213693951' is not in "
                                                   r"\[0, 2\*\*32\)"):
    _loads(with_protocol(pickle.NONE + puts + pickle.EMPTY_DICT, protocol=2))
  for bad in (b"g-1\n", b"g4294967296\n", b"g 1\n"):
    with pytest.raises(pickle.UnpicklingError, match="memo index"):
      _loads(with_protocol(pickle.NONE + b"p0\n" + bad, protocol=2))
  assert _loads(with_protocol(pickle.NONE + b"p0\n0" + b"g0\n", protocol=2)) is None


def test_extension_codes_are_refused_whatever_copyreg_holds():
  """EXT opcodes look globals up through copyreg's process-wide cache, where a stand-in would
  stay for every later unpickling in the process."""
  with pytest.raises(pickle.UnpicklingError, match="extension code 1 .* refused"):
    _loads(with_protocol(pickle.EXT1 + b"\x01", protocol=2))


def test_it_resolves_no_global():
  raw = pickle.dumps(__import__("collections").deque([1]))
  with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle collections\.deque"):
    restricted_pickle.BoundedUnpickler(io.BytesIO(raw)).load()


def test_fresh_copies_are_independent_and_equal():
  copy = restricted_pickle.fresh(restricted_pickle.latin1_encode)
  copy.__defaults__ = ("latin1",)
  assert copy("\xe9") == b"\xe9" and copy is not restricted_pickle.latin1_encode
  assert restricted_pickle.latin1_encode.__defaults__ == ("utf-8",)
  with pytest.raises(pickle.UnpicklingError, match="only of a str to latin-1"):
    restricted_pickle.latin1_encode("\xe9")
