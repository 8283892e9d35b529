"""What the two restricted unpicklers share: the score-file reader (`postprocess`) and the
PyTorch-checkpoint reader (`tools.torch_checkpoint`).

Each reader resolves a few globals to local stand-ins and refuses the rest, so a file runs no
code. What remains is pickle's own opcodes, and some of them hash what the file built: a dict
key (SETITEM, SETITEMS, DICT) and a set item (ADDITEMS, FROZENSET). Hashing is where a small
file can cost unbounded time: a tuple made of itself twice, 40 levels deep, is 330 bytes and
takes 2**40 steps to hash; tuples of integers can be chosen to share one hash, which makes
every insert scan all the others. `BoundedUnpickler` therefore lets the file hash only values
whose hash is cheap and cannot be chosen to collide: str, bytes (hashed with Python's random
seed), None, bool, and integers of magnitude below 2**60 (each its own hash). The memo's keys
come from the file too (PUT / GET take any integer as text): they must lie in [0, 2**32), as
the binary opcodes' do. Extension codes (EXT1 / 2 / 4), whose lookups go through the
process-wide copyreg cache, are refused.
"""

import pickle
import types

_MAX_KEY_INT = 1 << 60
_MAX_MEMO_INDEX = 1 << 32  # LONG_BINPUT's range


def fresh(fn: types.FunctionType) -> types.FunctionType:
  """A private copy of `fn` for one use, so a BUILD opcode cannot change the module's own."""
  return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)


def latin1_encode(text, encoding="utf-8"):
  """`_codecs.encode` as protocol-2 pickles of bytes call it: a str to latin-1 bytes only."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError("_codecs.encode is allowed only of a str to latin-1 (how "
                                 "protocol-2 pickles write bytes)")
  return text.encode("latin1")


def check_hashable(value):
  """Returns `value` if the file may use it as a dict key or set item; raises otherwise.

  Raises:
    pickle.UnpicklingError: not a str, bytes, None, bool or an integer below 2**60 in magnitude.
  """
  kind = type(value)
  if kind in (str, bytes, bool) or value is None or (
      kind is int and -_MAX_KEY_INT < value < _MAX_KEY_INT):
    return value
  what = "an integer of 2**60 or more" if kind is int else f"a {kind.__name__}"
  raise pickle.UnpicklingError(f"a dict key or set item is {what}; only text, bytes, None, "
                               "booleans and integers below 2**60 may be")


def _memo_index(line: bytes) -> int:
  """A PUT / GET argument (decimal text) as a memo index in [0, 2**32)."""
  text = line[:-1]
  if not 0 < len(text) <= 10 or not text.isdigit() or int(text) >= _MAX_MEMO_INDEX:
    raise pickle.UnpicklingError(f"memo index {text[:20]!r} is not in [0, 2**32)")
  return int(text)


class BoundedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Python's own unpickler, with every dict key and set item passed through `check_hashable`
  before it is hashed.

  The C unpickler hashes inside opcodes a subclass cannot reach; this is CPython's pure-Python
  `pickle._Unpickler`, whose opcode table a subclass can extend. It resolves no global; a
  subclass allows its own in `find_class`.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")

  def load_setitem(self):
    value = self.stack.pop()
    key = check_hashable(self.stack.pop())
    self.stack[-1][key] = value

  def load_setitems(self):
    items = self.pop_mark()
    target = self.stack[-1]
    for i in range(0, len(items), 2):
      target[check_hashable(items[i])] = items[i + 1]

  def load_dict(self):
    items = self.pop_mark()
    self.append({check_hashable(items[i]): items[i + 1] for i in range(0, len(items), 2)})

  def load_additems(self):
    items = self.pop_mark()
    add = self.stack[-1].add
    for item in items:
      add(check_hashable(item))

  def load_frozenset(self):
    items = self.pop_mark()  # before `self.append` is looked up: it changes with the stack
    self.append(frozenset(check_hashable(item) for item in items))

  def load_put(self):
    self.memo[_memo_index(self.readline())] = self.stack[-1]

  def load_get(self):
    index = _memo_index(self.readline())
    if index not in self.memo:
      raise pickle.UnpicklingError(f"memo value not found at index {index}")
    self.append(self.memo[index])

  def get_extension(self, code):
    raise pickle.UnpicklingError(f"extension code {code} (EXT opcodes) refused")

  dispatch[pickle.PUT[0]] = load_put
  dispatch[pickle.GET[0]] = load_get
  dispatch[pickle.SETITEM[0]] = load_setitem
  dispatch[pickle.SETITEMS[0]] = load_setitems
  dispatch[pickle.DICT[0]] = load_dict
  dispatch[pickle.ADDITEMS[0]] = load_additems
  dispatch[pickle.FROZENSET[0]] = load_frozenset
