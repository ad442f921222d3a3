"""Raw data sources: scikit-learn digits, synthetic images, TFDS array_record.

Each source returns a `RawSource`: a clean training pool and a clean test split
with stable example ids. Assembly into a `Dataset` (validation slice, subsets,
SSL split, label noise, channel statistics) is `kdaif_jax.data.load`.

Ids: an example's id is its index in its source split plus a per-split offset
(`SPLIT_ID_OFFSET`: train 0, test 10**9), so ids are unique across all splits of
a dataset and do not depend on any seed. Digits has one source array, so its ids
are simply the indices into `sklearn.datasets.load_digits()`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from kdaif_jax.data.splits import Split, make_split, stratified_subset
from kdaif_jax.logs import absl_quiet

SPLIT_ID_OFFSET = {"train": 0, "test": 10**9}

# Facts of each dataset, known without touching data (for validate_config and
# kdaif_jax.data.facts; synthetic's come from its config section).
TFDS_DATASETS = {
  # name: (num_classes, train examples, test examples, image shape (H, W, C))
  "cifar10": (10, 50_000, 10_000, (32, 32, 3)),
  "cifar100": (100, 50_000, 10_000, (32, 32, 3)),
  "svhn_cropped": (10, 73_257, 26_032, (32, 32, 3)),
}
DIGITS_SIZE = 1797
DIGITS_CLASSES = 10
DIGITS_IMAGE_SHAPE = (8, 8, 1)

# Streams of np.random.default_rng([seed, stream]) for independent seeded stages.
STREAM_VAL, STREAM_NUM_TRAIN, STREAM_LABELLED, STREAM_TEST = 0, 1, 2, 3
_STREAM_SYNTH_PROTO, _STREAM_SYNTH_TRAIN, _STREAM_SYNTH_TEST = 10, 11, 12


class DataNotPreparedError(RuntimeError):
  """A TFDS dataset is not prepared (in array_record format) in `data_dir`.

  Attributes:
    name: the TFDS dataset name.
    data_dir: the directory that was searched.
    command: the shell command that prepares the dataset there.
  """

  def __init__(self, name: str, data_dir: str, reason: str):
    self.name = name
    self.data_dir = data_dir
    root = data_dir if data_dir else "DIR"
    self.command = (
      f"pip install tensorflow && tfds build {name} --file_format=array_record --data_dir={root}"
    )
    super().__init__(
      f"Dataset {name!r} is not ready to read in {data_dir!r}: {reason}. "
      f"Prepare it once (needs internet; TensorFlow only for this step): "
      f"`{self.command}` (or in Python: tfds.builder({name!r}, "
      f"data_dir={root!r}, file_format='array_record').download_and_prepare()),"
      f" then set --config.data.data_dir={root} (or TFDS_DATA_DIR)."
    )


@dataclasses.dataclass(frozen=True, eq=False)
class RawSource:
  """A source before assembly: clean training pool and clean test split."""

  train: Split
  test: Split
  num_classes: int
  class_names: tuple[str, ...]


# ---------------------------------------------------------------------------
# scikit-learn digits (bundled with scikit-learn: offline)
# ---------------------------------------------------------------------------


def digits_test_count(test_size: float) -> int:
  """test_size < 1 is a fraction of the 1797 digits, >= 1 a count."""
  if test_size < 1:
    return int(np.floor(test_size * DIGITS_SIZE + 0.5))
  return int(test_size)


def digits_source(test_size: float, seed: int) -> RawSource:
  """The 8x8 scikit-learn digits, with a seeded stratified test split.

  Pixels in load_digits are integers 0..16; they are stored as uint8 by
  multiplying by 16 and clipping to 255 (16 * 16 = 256 -> 255), so they share
  the [0, 255] scale of the other datasets.

  Args:
    test_size: fraction (< 1) or count (>= 1) of the 1797 examples held out as
      test, stratified by class.
    seed: RNG seed of the test split.

  Returns:
    RawSource with images uint8 [N, 8, 8, 1]; ids are indices into
    load_digits().
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = np.clip(digits.images * 16.0, 0, 255).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  pool = make_split(images, labels, np.arange(len(labels)))
  test_idx = stratified_subset(
    labels,
    total=digits_test_count(test_size),
    seed=[seed, STREAM_TEST],
    num_classes=DIGITS_CLASSES,
  )
  train_mask = np.ones(len(labels), bool)
  train_mask[test_idx] = False
  return RawSource(
    train=pool.take(np.flatnonzero(train_mask)),
    test=pool.take(test_idx),
    num_classes=DIGITS_CLASSES,
    class_names=tuple(str(c) for c in range(DIGITS_CLASSES)),
  )


# ---------------------------------------------------------------------------
# Synthetic class-conditional images
# ---------------------------------------------------------------------------


def synthetic_source(
  num_train: int,
  num_test: int,
  image_size: int,
  channels: int,
  num_classes: int,
  seed: int,
) -> RawSource:
  """Deterministic class-conditional images a small model can learn.

  Every class has a fixed prototype: a random coarse (about image_size / 4
  cells a side) pattern, upsampled by repetition so it is spatially smooth.
  An example is 0.5 * prototype + 64 + Gaussian pixel noise (std 40), clipped
  to uint8. Labels are balanced (class counts differ by at most one).

  Args:
    num_train: size of the training pool (validation is sliced from it).
    num_test: size of the test split.
    image_size: H = W.
    channels: C.
    num_classes: K.
    seed: everything is a function of it.

  Returns:
    RawSource with images uint8 [N, image_size, image_size, channels].
  """
  cells = max(2, image_size // 4)
  reps = -(-image_size // cells)  # ceil: repeat, then crop to image_size
  proto_rng = np.random.default_rng([seed, _STREAM_SYNTH_PROTO])
  coarse = proto_rng.uniform(0.0, 255.0, (num_classes, cells, cells, channels))
  protos = coarse.repeat(reps, axis=1).repeat(reps, axis=2)
  protos = protos[:, :image_size, :image_size]

  def draw(n: int, stream: int, offset: int) -> Split:
    rng = np.random.default_rng([seed, stream])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    noise = rng.normal(0.0, 40.0, (n, image_size, image_size, channels))
    images = np.clip(0.5 * protos[labels] + 64.0 + noise, 0, 255)
    return make_split(images.astype(np.uint8), labels, offset + np.arange(n))

  return RawSource(
    train=draw(num_train, _STREAM_SYNTH_TRAIN, SPLIT_ID_OFFSET["train"]),
    test=draw(num_test, _STREAM_SYNTH_TEST, SPLIT_ID_OFFSET["test"]),
    num_classes=num_classes,
    class_names=tuple(f"class_{c}" for c in range(num_classes)),
  )


# ---------------------------------------------------------------------------
# TFDS (array_record, read with tfds.data_source: no TensorFlow needed)
# ---------------------------------------------------------------------------


def _not_prepared_reason(name: str, data_dir: str | None) -> tuple[str, str] | None:
  """Why `name` cannot be read from `data_dir`, or None if it looks fine.

  Returns:
    (TFDS data directory searched, reason) or None.
  """
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir)
  root = os.fspath(getattr(builder, "data_dir_root", None) or data_dir or "")
  where = os.fspath(builder.data_dir)
  if not builder.is_prepared():
    return root, f"no prepared dataset (dataset_info.json) in {where}"
  fmt = builder.info.file_format
  readable = (
    tfds.core.FileFormat.ARRAY_RECORD,
    tfds.core.FileFormat.PARQUET,
  )
  if fmt not in readable:
    return root, (
      f"it is prepared in {where} as {getattr(fmt, 'value', fmt)}, which "
      "has no random access; rebuild it with --file_format=array_record"
    )
  return None


def open_tfds_split(name: str, split: str, data_dir: str | None) -> Any:
  """Opens a TFDS split as a random-access data source (no download).

  Raises:
    DataNotPreparedError: the dataset is missing or not in array_record format.
  """
  import tensorflow_datasets as tfds

  try:
    with absl_quiet():  # tfds warns per variant folder before our one-line error
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as err:
    # tfds reports a missing dataset as an unrelated-looking error (e.g.
    # "random access ... TFRECORD is not supported"), so diagnose here and
    # re-raise anything that is not a preparation problem unchanged.
    with absl_quiet():
      diagnosis = _not_prepared_reason(name, data_dir)
    if diagnosis is None:
      raise
    root, reason = diagnosis
    raise DataNotPreparedError(name, data_dir or root, reason) from err


def read_source_split(source: Any, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole random-access source into numpy with batched reads.

  Args:
    source: len() and __getitems__(keys) -> list of {'image', 'label', ...}.
    batch_size: records per __getitems__ call.

  Returns:
    (images uint8 [N, H, W, C], labels int32 [N]) in source order.
  """
  n = len(source)
  if n == 0:
    raise ValueError(f"{source!r} is empty")
  first = np.asarray(source[0]["image"])
  images = np.empty((n, *first.shape), np.uint8)
  labels = np.empty(n, np.int32)
  for start in range(0, n, batch_size):
    keys = list(range(start, min(n, start + batch_size)))
    for j, record in enumerate(source.__getitems__(keys)):
      images[start + j] = record["image"]
      labels[start + j] = record["label"]
  return images, labels


def _class_names(source: Any, num_classes: int) -> tuple[str, ...]:
  try:
    names = source.dataset_info.features["label"].names
  except (AttributeError, KeyError, TypeError):
    names = None
  if not names or len(names) != num_classes:
    names = [str(c) for c in range(num_classes)]
  return tuple(str(n) for n in names)


def tfds_source(
  name: str,
  data_dir: str | None,
  open_fn: Callable[[str, str, str | None], Any] = open_tfds_split,
) -> RawSource:
  """Reads the train and test splits of a TFDS image dataset into numpy.

  Args:
    name: 'cifar10', 'cifar100' or 'svhn_cropped'.
    data_dir: TFDS data directory; None for the TFDS default.
    open_fn: (name, split, data_dir) -> data source; a seam for tests.

  Returns:
    RawSource; ids are the index in the TFDS split plus SPLIT_ID_OFFSET.
  """
  num_classes = TFDS_DATASETS[name][0]
  splits = {}
  class_names: tuple[str, ...] = ()
  for split in ("train", "test"):
    source = open_fn(name, split, data_dir)
    images, labels = read_source_split(source)
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"{name}/{split}: labels outside [0, {num_classes})")
    ids = SPLIT_ID_OFFSET[split] + np.arange(len(labels))
    splits[split] = make_split(images, labels, ids)
    class_names = class_names or _class_names(source, num_classes)
  return RawSource(
    train=splits["train"],
    test=splits["test"],
    num_classes=num_classes,
    class_names=class_names,
  )
