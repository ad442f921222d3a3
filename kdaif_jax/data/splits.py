"""Split containers and seeded, class-aware index selection.

Everything here is plain numpy on the host. Selection helpers return sorted
index arrays so that a subset's order never depends on the RNG stream, only its
membership does; the same seed always gives the same members.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

# A seed for np.random.default_rng: an int, or a sequence of ints (used to derive
# independent streams for the separate stages of a split, e.g. [seed, stage]).
Seed = int | Sequence[int]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a dataset, as numpy arrays on the host.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int32 [N]; the labels training may see: noisy where noise was
      injected, -1 for unlabelled examples.
    ids: int64 [N]; stable example ids, unique across all splits of a dataset.
    clean_labels: int32 [N]; the true labels, for analysis and reporting only.
    noisy: bool [N]; True where the label was flipped.
  """

  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  clean_labels: np.ndarray
  noisy: np.ndarray

  def __post_init__(self):
    n = len(self.images)
    for field in ("labels", "ids", "clean_labels", "noisy"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"Split.{field} has {len(getattr(self, field))} entries, images {n}")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def take(self, indices: np.ndarray) -> Split:
    """Returns the examples at `indices` (int [M]) as a new Split of size M."""
    return Split(
      images=self.images[indices],
      labels=self.labels[indices],
      ids=self.ids[indices],
      clean_labels=self.clean_labels[indices],
      noisy=self.noisy[indices],
    )


def make_split(images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> Split:
  """Builds a clean, fully labelled Split (no noise yet).

  Args:
    images: uint8 [N, H, W, C].
    labels: int [N], true labels.
    ids: int [N], stable example ids.

  Returns:
    Split with labels == clean_labels and no example marked noisy.
  """
  labels = np.asarray(labels, np.int32)
  return Split(
    images=np.asarray(images, np.uint8),
    labels=labels.copy(),
    ids=np.asarray(ids, np.int64),
    clean_labels=labels.copy(),
    noisy=np.zeros(len(labels), bool),
  )


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A loaded dataset: all splits plus the metadata a trainer needs.

  Attributes:
    name: dataset name, as in the config.
    num_classes: K.
    image_shape: (H, W, C).
    mean: float32 [C], per-channel mean of the training images in [0, 1] scale.
    std: float32 [C], per-channel standard deviation, same scale.
    train: labelled training examples (noisy labels where noise was injected).
    val: held-out, clean, labelled validation examples (never the test split).
    test: clean test examples.
    unlabelled: SSL only: the rest of the training split, labels all -1.
    class_names: K human-readable class names.
    text: text datasets only (GLUE): a ``kdaif_jax.data.glue.TextInfo``; then
      ``images`` are int32 [N, 3, L] token batches and ``image_shape`` (3, L).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  train: Split
  val: Split
  test: Split
  unlabelled: Split | None
  class_names: tuple[str, ...]
  text: Any = None


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Returns int [K]: how many of `labels` (int [N]) fall in each class."""
  return np.bincount(np.asarray(labels), minlength=num_classes)[:num_classes]


def _take_per_class(labels: np.ndarray, counts: np.ndarray, seed: Seed) -> np.ndarray:
  """Seeded selection of counts[c] examples of every class c; sorted indices."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  # One permutation of everything, then the first counts[c] of each class in
  # permuted order: a uniform draw without replacement within every class.
  perm = rng.permutation(len(labels))
  permuted_labels = labels[perm]
  chosen = []
  for c, k in enumerate(counts):
    members = perm[permuted_labels == c]
    if k > len(members):
      raise ValueError(f"class {c} has {len(members)} examples, {int(k)} were requested")
    chosen.append(members[:k])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def balanced_subset(
  labels: np.ndarray,
  *,
  seed: Seed,
  total: int | None = None,
  per_class: int | None = None,
  num_classes: int | None = None,
) -> np.ndarray:
  """Seeded class-balanced subset: the same number of examples of every class.

  Give exactly one of `total` and `per_class`. With `total` not divisible by K,
  every class gets total // K and a seeded choice of (total mod K) classes get
  one more, so per-class counts differ by at most one and sum to `total`.

  Args:
    labels: int [N], class of every candidate (values in [0, K)).
    seed: RNG seed (int or sequence of ints); same seed, same subset.
    total: size of the subset.
    per_class: examples per class (subset size K * per_class).
    num_classes: K; defaults to max(labels) + 1.

  Returns:
    int64 [M] sorted indices into `labels`.

  Raises:
    ValueError: if a class has fewer candidates than it must contribute.
  """
  if (total is None) == (per_class is None):
    raise ValueError("give exactly one of total= and per_class=")
  labels = np.asarray(labels)
  k = int(num_classes if num_classes is not None else labels.max() + 1)
  if per_class is not None:
    counts = np.full(k, int(per_class))
  else:
    counts = np.full(k, int(total) // k)
    extra = int(total) % k
    if extra:
      # A separate stream so the extra classes do not depend on N.
      lucky = np.random.default_rng(_substream(seed, 1)).choice(k, extra, replace=False)
      counts[lucky] += 1
  return _take_per_class(labels, counts, seed)


def stratified_subset(
  labels: np.ndarray, *, total: int, seed: Seed, num_classes: int | None = None
) -> np.ndarray:
  """Seeded subset of exactly `total` examples, stratified by class.

  Class c gets floor(total * n_c / N) examples (n_c: its count among the N
  candidates); the leftover slots go to the classes with the largest fractional
  parts (ties broken by a seeded draw). Class proportions are thus preserved to
  within one example, like sklearn's stratified split.

  Args:
    labels: int [N].
    total: subset size, 0 <= total <= N.
    seed: RNG seed (int or sequence of ints).
    num_classes: K; defaults to max(labels) + 1.

  Returns:
    int64 [total] sorted indices into `labels`.
  """
  labels = np.asarray(labels)
  n = len(labels)
  if not 0 <= total <= n:
    raise ValueError(f"total={total} must be in [0, {n}]")
  if n == 0:
    return np.zeros(0, np.int64)
  k = int(num_classes if num_classes is not None else labels.max() + 1)
  n_c = class_counts(labels, k)
  exact = total * n_c / n
  counts = np.floor(exact).astype(np.int64)
  leftover = total - int(counts.sum())
  if leftover:
    tiebreak = np.random.default_rng(_substream(seed, 1)).random(k)
    # Largest fractional part first; classes already full are never picked.
    frac = np.where(counts < n_c, exact - counts, -1.0)
    order = np.lexsort((tiebreak, -frac))
    counts[order[:leftover]] += 1
  return _take_per_class(labels, counts, seed)


def complement(n: int, indices: np.ndarray) -> np.ndarray:
  """Returns int64 sorted indices of range(n) that are not in `indices`."""
  mask = np.ones(n, bool)
  mask[np.asarray(indices, np.int64)] = False
  return np.flatnonzero(mask).astype(np.int64)


def _substream(seed: Seed, stream: int) -> list[int]:
  """Derives an independent seed for a sub-stream of `seed`."""
  base = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
  return base + [1_000_003, stream]


def save_split_ids(dataset: Dataset, path: str | os.PathLike[str]) -> None:
  """Writes the example ids of every split as JSON, to audit or reproduce a run.

  The file holds the ids of train / val / test / unlabelled (null when not
  SSL), and for the noisy train examples their ids, clean labels and the noisy
  labels training saw.

  Args:
    dataset: a loaded Dataset.
    path: output file; parent directories are created.
  """

  def ids(split: Split | None) -> list[int] | None:
    return None if split is None else [int(i) for i in split.ids]

  noisy = dataset.train.noisy
  record: dict[str, Any] = {
    "name": dataset.name,
    "num_classes": int(dataset.num_classes),
    "train": ids(dataset.train),
    "val": ids(dataset.val),
    "test": ids(dataset.test),
    "unlabelled": ids(dataset.unlabelled),
    "noisy": {
      "ids": [int(i) for i in dataset.train.ids[noisy]],
      "clean_labels": [int(y) for y in dataset.train.clean_labels[noisy]],
      "noisy_labels": [int(y) for y in dataset.train.labels[noisy]],
    },
  }
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f)


def load_split_ids(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads a file written by `save_split_ids` (dict of lists of ids)."""
  with open(path) as f:
    return json.load(f)
