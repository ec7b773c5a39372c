"""Offline data for the examples: nothing here touches the network.

* Images: scikit-learn's bundled handwritten digits (1797 greyscale 8x8
  images, 10 classes), or the user's CIFAR-10 in the python-pickle format.
* Text: the docstrings of a fixed list of standard-library modules (English
  prose that ships with every Python), or the user's own text files.

Every loader is deterministic: the same call returns the same arrays.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pickle
from typing import NamedTuple
import warnings

import numpy as np

from madam_examples.cli import InputError

# The char-level LM's vocabulary: printable ASCII and newline; anything else
# is read as UNKNOWN_CHAR. User text with a larger share of unknown
# characters than MAX_UNKNOWN_FRACTION (random bytes, UTF-16) is refused.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN_CHAR = "?"
MAX_UNKNOWN_FRACTION = 0.05
CIFAR10_FIX = (
  "pass the cifar-10-batches-py folder of the 'CIFAR-10 python "
  "version' (data_batch_1 ... data_batch_5 and test_batch)"
)

# The built-in corpus's modules: fixed, so it is the same on every run.
STDLIB_CORPUS_MODULES = tuple(
  """
  argparse ast asyncio base64 bisect calendar collections contextlib copy
  csv dataclasses datetime decimal difflib email enum fractions ftplib
  functools getopt gettext glob gzip heapq hmac html http.client imaplib
  inspect ipaddress json locale logging mailbox math mimetypes numbers
  operator optparse os pathlib pickle pprint pydoc queue random re sched
  shlex shutil smtplib socket statistics string subprocess tarfile tempfile
  textwrap threading timeit tokenize trace traceback typing unittest
  urllib.parse uuid warnings weakref zipfile
  """.split()
)


class ImageData(NamedTuple):
  """Train/test images (N, H, W, C) float32 in [0, 1] and int32 labels."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


class TextData(NamedTuple):
  """Train/validation token ids (int32) over ``vocab``; ``unknown`` counts
  the text's characters outside ``vocab`` (encoded as ``UNKNOWN_CHAR``)."""

  train: np.ndarray
  valid: np.ndarray
  vocab: str
  unknown: int = 0

  @property
  def num_chars(self) -> int:
    """The characters of the text, train and validation."""
    return len(self.train) + len(self.valid)


def load_digits(
  test_fraction: float = 0.25, seed: int = 0, *, standardise: bool = True
) -> ImageData:
  """scikit-learn's bundled 8x8 digits, split once, stratified by class.

  Pixels are scaled to [0, 1]; with ``standardise``, then to
  ``(x - mean_train) / std_train`` (two scalars from the training images).

  Args:
    test_fraction: the share of the 1797 images held out for testing (the
      default 0.25 holds out 450).
    seed: the seed of the one fixed split.
    standardise: standardised images (classifiers) or images in [0, 1].

  Returns:
    ``ImageData`` with images of shape (N, 8, 8, 1), float32.

  Example:
    >>> digits = load_digits()
    >>> digits.x_train.shape, digits.x_test.shape
    ((1347, 8, 8, 1), (450, 8, 8, 1))
  """
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  from sklearn import model_selection  # pylint: disable=import-outside-toplevel

  digits = datasets.load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
    x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  if standardise:
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  return ImageData(x_train, y_train, x_test, y_test, 10)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
  except OSError as e:
    raise InputError(f"cannot read {path}: {e.strerror}.") from e
  except Exception as e:  # pylint: disable=broad-except
    # Junk fails to unpickle in many ways (UnpicklingError, EOFError,
    # ValueError, KeyError, ...): all mean the same to the user.
    raise InputError(
      f"{path} is not a CIFAR-10 python batch (it does not unpickle: "
      f"{type(e).__name__}); {CIFAR10_FIX}."
    ) from e
  if not isinstance(batch, dict):
    raise InputError(
      f"{path} is not a CIFAR-10 python batch (it holds a "
      f"{type(batch).__name__}, not a dict); {CIFAR10_FIX}."
    )
  data = np.asarray(batch.get(b"data", []), dtype=np.uint8)
  labels = np.asarray(batch.get(b"labels", []), np.int32)
  if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != data.shape[:1]:
    raise InputError(
      f"{path}: b'data' has shape {data.shape} and b'labels' "
      f"{labels.shape}; a CIFAR-10 batch holds N rows of 3072 bytes "
      f"(3 x 32 x 32, channel-major) and N labels; {CIFAR10_FIX}."
    )
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images.astype(np.float32) / 255.0, labels


def load_cifar10(directory: str | os.PathLike) -> ImageData:
  """A user's CIFAR-10 in the python-pickle format, images in [0, 1].

  Args:
    directory: the ``cifar-10-batches-py`` folder, holding ``data_batch_1``
      ... ``data_batch_5`` (any that exist are used) and ``test_batch``.

  Raises:
    InputError: (a ``ValueError``) if ``directory`` holds no readable
      CIFAR-10 batches.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    what = "is not a folder" if os.path.exists(directory) else "does not exist"
    raise InputError(f"{directory!r} {what}; {CIFAR10_FIX}.")
  names = sorted(n for n in os.listdir(directory) if n.startswith("data_batch"))
  if not names or not os.path.exists(os.path.join(directory, "test_batch")):
    raise InputError(f"{directory!r} holds no CIFAR-10 batches; {CIFAR10_FIX}.")
  parts = [_read_cifar_batch(os.path.join(directory, n)) for n in names]
  x_train = np.concatenate([p[0] for p in parts])
  y_train = np.concatenate([p[1] for p in parts])
  x_test, y_test = _read_cifar_batch(os.path.join(directory, "test_batch"))
  return ImageData(x_train, y_train, x_test, y_test, 10)


def encode_text(text: str, vocab: str = VOCAB) -> np.ndarray:
  """Maps characters to ids in ``vocab``; unknown characters become '?'."""
  table = np.full(0x110000, vocab.index(UNKNOWN_CHAR), dtype=np.int32)
  for i, ch in enumerate(vocab):
    table[ord(ch)] = i
  codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  return table[codes]


def stdlib_docstring_corpus(max_chars: int | None = None) -> str:
  """English prose from the docstrings of ``STDLIB_CORPUS_MODULES``.

  For each module in turn: its docstring, then those of its public classes,
  functions and methods, in name order (about 400,000 characters, built
  once per process, cut to ``max_chars``).
  """
  text = _stdlib_docstrings()
  return text[:max_chars] if max_chars else text


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings() -> str:
  pieces: list[str] = []
  seen: set[str] = set()

  def add(obj):
    doc = inspect.getdoc(obj)
    if doc and doc not in seen and len(doc) > 40:
      seen.add(doc)
      pieces.append(doc.strip() + "\n\n")

  with warnings.catch_warnings():  # deprecated aliases (typing.io) warn
    warnings.simplefilter("ignore")
    for name in STDLIB_CORPUS_MODULES:
      try:
        module = importlib.import_module(name)
      except Exception:  # pylint: disable=broad-except
        continue
      add(module)
      for attr, obj in sorted(vars(module).items()):
        mine = getattr(obj, "__module__", None) == module.__name__
        if attr.startswith("_") or not mine:
          continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
          add(obj)
        if inspect.isclass(obj):
          for member, fn in sorted(vars(obj).items()):
            if not member.startswith("_") and inspect.isfunction(fn):
              add(fn)
  return "".join(pieces)


def unknown_count(text: str, vocab: str = VOCAB) -> int:
  """The characters of ``text`` outside ``vocab``.

  Example:
    >>> unknown_count("caf\u00e9 \u2014 ok")
    2
  """
  codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  return int(np.count_nonzero(~np.isin(codes, [ord(c) for c in vocab])))


def _split_text(text: str, valid_fraction: float) -> TextData:
  ids = encode_text(text)
  n_valid = max(int(len(ids) * valid_fraction), 1)
  return TextData(ids[:-n_valid], ids[-n_valid:], VOCAB, unknown_count(text))


def load_stdlib_text(
  max_chars: int | None = 400_000, valid_fraction: float = 0.1
) -> TextData:
  """The built-in corpus, encoded; the last ``valid_fraction`` is held out."""
  return _split_text(stdlib_docstring_corpus(max_chars), valid_fraction)


def load_text_files(
  path: str | os.PathLike,
  valid_fraction: float = 0.1,
  *,
  max_unknown_fraction: float = MAX_UNKNOWN_FRACTION,
) -> TextData:
  """A user's own text: one file, or a folder's ``.txt`` files in name order.

  Read as UTF-8 (undecodable bytes replaced); the last ``valid_fraction``
  of the characters is held out. Characters outside ``VOCAB`` are encoded
  as ``UNKNOWN_CHAR``; more than ``max_unknown_fraction`` of them, a
  missing path, no ``.txt`` file or under 100 characters raise
  :class:`~madam_examples.cli.InputError` (a ``ValueError``).
  """
  path = os.fspath(path)
  files = [path]
  if not os.path.exists(path):
    raise InputError(
      f"{path!r} does not exist; expected a text file or a "
      "folder of .txt files."
    )
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
    files = [os.path.join(path, n) for n in names]
    files = [f for f in files if os.path.isfile(f)]
  if not files:
    raise InputError(
      f"folder {path!r} holds no .txt files; put UTF-8 text in files ending "
      "in .txt there (other files are ignored), or give one text file."
    )
  texts = []
  for f in files:
    try:
      with open(f, encoding="utf-8", errors="replace") as fh:
        texts.append(fh.read())
    except OSError as e:
      raise InputError(f"cannot read {f}: {e.strerror}.") from e
  text = "\n".join(texts)
  where = files[0] if len(files) == 1 else f"{len(files)} files"
  if len(text) < 100:
    raise InputError(
      f"the text in {where} has {len(text)} characters; the language model "
      "needs at least 100 (and many thousands to learn anything)."
    )
  data = _split_text(text, valid_fraction)
  if data.unknown > max_unknown_fraction * len(text):
    raise InputError(
      f"{data.unknown:,} of the {len(text):,} characters read from {where} "
      f"({data.unknown / len(text):.0%}) are outside the model's "
      f"vocabulary (printable ASCII and newline) and would train as "
      f"{UNKNOWN_CHAR!r}; is it UTF-8 text? At most "
      f"{max_unknown_fraction:.0%} is accepted: raise max_unknown_fraction "
      "(--max-unknown-fraction) to train on it anyway."
    )
  return data
