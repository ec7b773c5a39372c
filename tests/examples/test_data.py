"""Offline loaders: bundled digits, the stdlib corpus, and user-data paths."""

import pickle

import chex
import numpy as np
import pytest

from madam_examples import data


def decode_text(ids, vocab=data.VOCAB):
  """The inverse of ``data.encode_text`` (up to unknown characters)."""
  return "".join(vocab[int(i)] for i in ids)


def _write_cifar_batch(path, n, seed):
  rng = np.random.default_rng(seed)
  batch = {
    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    b"labels": list(rng.integers(0, 10, n)),
    b"batch_label": b"synthetic",
  }
  with open(path, "wb") as f:
    pickle.dump(batch, f)
  return batch


def test_digits_split_is_deterministic_and_stratified():
  a, b = data.load_digits(), data.load_digits()
  chex.assert_shape(a.x_train, (1347, 8, 8, 1))
  chex.assert_shape(a.x_test, (450, 8, 8, 1))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert a.num_classes == 10 and a.y_train.dtype == np.int32
  # Stratified: each class's share of the test set is its share overall
  # (to within one image of rounding).
  counts_train = np.bincount(a.y_train, minlength=10)
  counts_test = np.bincount(a.y_test, minlength=10)
  expected = (counts_train + counts_test) * 450 / 1797
  assert np.all(np.abs(counts_test - expected) <= 1), counts_test
  other = data.load_digits(seed=1)
  assert not np.array_equal(other.y_test, a.y_test)


def test_digits_scaling_standardised_or_unit_range():
  unit = data.load_digits(standardise=False)
  std = data.load_digits()
  assert unit.x_train.dtype == std.x_train.dtype == np.float32
  assert 0.0 <= unit.x_train.min() and unit.x_train.max() <= 1.0
  np.testing.assert_array_equal(unit.y_train, std.y_train)  # same split
  # Standardised with the training split's statistics only.
  mean, sd = unit.x_train.mean(), unit.x_train.std()
  np.testing.assert_allclose(
    std.x_train, (unit.x_train - mean) / sd, rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    std.x_test, (unit.x_test - mean) / sd, rtol=1e-6, atol=1e-6
  )
  assert abs(float(std.x_train.mean())) < 1e-5
  assert abs(float(std.x_train.std()) - 1.0) < 1e-5


def test_cifar10_pickle_directory(tmp_path):
  b1 = _write_cifar_batch(tmp_path / "data_batch_1", 5, 0)
  _write_cifar_batch(tmp_path / "data_batch_2", 4, 1)
  _write_cifar_batch(tmp_path / "test_batch", 3, 2)
  images = data.load_cifar10(tmp_path)
  chex.assert_shape(images.x_train, (9, 32, 32, 3))
  chex.assert_shape(images.x_test, (3, 32, 32, 3))
  assert images.x_train.dtype == np.float32 and images.y_train.dtype == np.int32
  # Channel-major rows: the first 1024 bytes are the red plane.
  red = b1[b"data"][0, :1024].reshape(32, 32) / 255.0
  np.testing.assert_allclose(images.x_train[0, :, :, 0], red, rtol=1e-6)
  np.testing.assert_array_equal(images.y_train[:5], b1[b"labels"])


def test_cifar10_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="data_batch_1"):
    data.load_cifar10(tmp_path)
  with open(tmp_path / "data_batch_1", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump({b"nothing": 1}, f)
  with pytest.raises(ValueError, match="3072"):
    data.load_cifar10(tmp_path)


def test_text_files_file_and_folder(tmp_path):
  (tmp_path / "a.txt").write_text("hello world. " * 20, encoding="utf-8")
  (tmp_path / "b.txt").write_text(
    "caf\u00e9 and more text! " * 10, encoding="utf-8"
  )
  (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
  folder = data.load_text_files(tmp_path)
  single = data.load_text_files(tmp_path / "a.txt")
  for t in (folder, single):
    assert t.train.dtype == np.int32
    assert t.train.min() >= 0 and t.train.max() < len(t.vocab)
  text = decode_text(np.concatenate([folder.train, folder.valid]))
  assert text.startswith("hello world.")
  assert "caf? and more" in text  # non-ASCII becomes '?'
  assert len(single.valid) == int(len("hello world. " * 20) * 0.1)


def test_text_too_short_is_a_clear_error(tmp_path):
  (tmp_path / "t.txt").write_text("tiny", encoding="utf-8")
  with pytest.raises(ValueError, match="at least 100"):
    data.load_text_files(tmp_path / "t.txt")


def test_encode_decode_round_trip():
  s = "Madam, I'm Adam.\n~{}"
  assert decode_text(data.encode_text(s)) == s


def test_stdlib_corpus_is_real_deterministic_prose():
  a = data.stdlib_docstring_corpus(50_000)
  b = data.stdlib_docstring_corpus(50_000)
  assert a == b and len(a) == 50_000
  words = a.split()
  assert sum(w.lower() in ("the", "a", "of", "to", "is") for w in words) > 500
