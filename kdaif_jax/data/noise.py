"""Seeded label noise for the labelled training split.

Two kinds, both flipping an exact, seeded number of labels:

* ``symmetric``: m = round(rate * N) examples, drawn uniformly without
  replacement from all N, each get a label drawn uniformly from the K - 1 classes
  that differ from its true one.
* ``asymmetric`` (class-dependent, Patrini et al. 2017): a fixed class map T.
  For CIFAR-10: truck -> automobile, bird -> airplane, deer -> horse,
  cat -> dog, dog -> cat; the other five classes are not mappable. For every
  other dataset: c -> (c + 1) mod K, so every class is mappable. Let N_map be
  the number of examples whose class is mappable; m = round(rate * N_map) of
  them, stratified by class (each mappable class contributes round-ish
  rate * n_c, exact total m), get the label T(y). ``rate`` is therefore the flip
  fraction *within* the mappable classes, as in the literature; the overall
  flip fraction on CIFAR-10 is about rate / 2.

round() is round-half-up: round(x) = floor(x + 0.5). Flipped labels always
differ from the true label (T has no fixed point on mappable classes). The
validation and test splits are never passed here: they stay clean.
"""

from __future__ import annotations

import numpy as np

from kdaif_jax.data.splits import Seed, stratified_subset

NOISE_KINDS = ("symmetric", "asymmetric")

# CIFAR-10 class indices: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer,
# 5 dog, 6 frog, 7 horse, 8 ship, 9 truck.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def num_to_flip(rate: float, n: int) -> int:
  """Returns round-half-up(rate * n): how many of n labels get flipped."""
  return int(np.floor(rate * n + 0.5))


def asymmetric_map(num_classes: int, dataset_name: str | None = None) -> np.ndarray:
  """The class map T of asymmetric noise.

  Args:
    num_classes: K.
    dataset_name: 'cifar10' selects the CIFAR-10 semantic map; anything else
      the cyclic map c -> (c + 1) mod K.

  Returns:
    int32 [K]: T[c] is the noisy label of class c; T[c] == c means class c is
    not mappable (never flipped).
  """
  if dataset_name == "cifar10":
    if num_classes != 10:
      raise ValueError(f"cifar10 has 10 classes, got num_classes={num_classes}")
    target = np.arange(10, dtype=np.int32)
    for src, dst in CIFAR10_ASYMMETRIC.items():
      target[src] = dst
    return target
  return ((np.arange(num_classes) + 1) % num_classes).astype(np.int32)


def inject_noise(
  labels: np.ndarray,
  num_classes: int,
  rate: float,
  kind: str,
  seed: Seed,
  dataset_name: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Flips an exact, seeded number of labels (see the module docstring).

  Args:
    labels: int [N] clean labels in [0, K).
    num_classes: K >= 2.
    rate: flip fraction in [0, 1).
    kind: 'symmetric' or 'asymmetric'.
    seed: RNG seed (int or sequence of ints); same seed, same flips.
    dataset_name: selects the asymmetric class map ('cifar10' is special).

  Returns:
    (noisy_labels int32 [N], flipped bool [N]); noisy_labels[i] != labels[i]
    exactly where flipped[i].
  """
  labels = np.asarray(labels, np.int32)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"noise rate={rate} must be in [0, 1)")
  if kind not in NOISE_KINDS:
    raise ValueError(f"noise kind={kind!r}; allowed values: {NOISE_KINDS}")
  if num_classes < 2:
    raise ValueError(f"label noise needs num_classes >= 2, got {num_classes}")
  noisy = labels.copy()
  flipped = np.zeros(len(labels), bool)
  rng = np.random.default_rng(seed)
  if kind == "symmetric":
    m = num_to_flip(rate, len(labels))
    idx = rng.choice(len(labels), size=m, replace=False)
    # An offset in [1, K) modulo K is uniform over the K - 1 other classes.
    offset = rng.integers(1, num_classes, size=m)
    noisy[idx] = (labels[idx] + offset) % num_classes
  else:
    target = asymmetric_map(num_classes, dataset_name)
    candidates = np.flatnonzero(target[labels] != labels)
    m = num_to_flip(rate, len(candidates))
    # Stratified so every mappable class is flipped at (about) the same rate.
    pick = stratified_subset(labels[candidates], total=m, seed=seed, num_classes=num_classes)
    idx = candidates[pick]
    noisy[idx] = target[labels[idx]]
  flipped[idx] = True
  return noisy, flipped
