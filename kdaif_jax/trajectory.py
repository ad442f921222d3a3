"""Whole-set influence averaged over the student's training run.

The influence of the final student alone, I_i = −∇ℓ_iᵀ (C + λI)⁻¹ ∇L_V at θ_T,
sees one point of a non-convex run. Scoring the whole training set at K
checkpoints of the same run, log-spaced in time (the early epochs, where the
network moves fastest, sampled densely), standardising each checkpoint's scores
(their scales differ by orders of magnitude) and averaging them,

    Ī_i = (1/K) Σ_k I_i(θ_k) / std_j I_j(θ_k),

is TracIn's checkpoint sum (Pruthi et al. 2020) with the inverse curvature at
each checkpoint, in the spirit of SOURCE (Bae et al. 2024): one training run, no
retraining. On digits' linear datamodeling score (BENCHMARKS.md §5) ten
checkpoints lift a 64-128-10 MLP from 0.757 to 0.812 (full-batch retraining;
0.751 to 0.785 seeded) and ``cnn_small``'s classifier layer from 0.145 to 0.211
(seeded), and cost convex, converged logistic regression 0.005-0.022.

``kdaif.whole_set.trajectory = K`` (0: off) scores the set at the start of
``scoring_epochs(E, K)`` of the student's E epochs, saves each score vector in
``WORKDIR/influence_epochs/epoch_EEEE.npy`` (written before any step of that
epoch, so a checkpoint taken later in the epoch never lacks it: a killed run
keeps them), and the final scoring pass adds θ_T; weights.csv's
``trajectory_influence`` column is their ``average``.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np

from kdaif_jax import checkpoint_files

__all__ = [
  "FIRST",
  "FOLDER",
  "average",
  "checkpoint_steps",
  "load",
  "save",
  "scoring_epochs",
  "standardised",
]

FOLDER = "influence_epochs"
# The first checkpoint, as a fraction of training: earlier ones sit near the random
# initialisation and rank poorly (BENCHMARKS.md §5).
FIRST = 0.02


def checkpoint_steps(total: int, k: int, first: float = FIRST) -> tuple[int, ...]:
  """K step (or epoch) counts log-spaced from ``first``·total to ``total``, distinct.

  Args:
    total: the run's length T (steps or epochs), ≥ 1.
    k: how many checkpoints, ≥ 1 (fewer come back when rounding merges some).
    first: the first checkpoint as a fraction of T (at least step 1).

  Returns:
    An increasing tuple of integers in 1..T that ends with T.
  """
  integers = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (total, k))
  if not integers or total < 1 or k < 1 or not 0 < first <= 1:
    raise ValueError(
      f"checkpoint_steps: total={total!r}, k={k!r}, first={first}; allowed: integers "
      "total, k >= 1 and 0 < first <= 1"
    )
  start = max(1.0, first * total) if k > 1 else total  # geomspace's one point is its start
  grid = np.round(np.geomspace(start, total, k)).astype(int)
  return tuple(int(t) for t in np.unique(grid))


def scoring_epochs(epochs: int, k: int) -> tuple[int, ...]:
  """The epochs at whose start the student is scored for a K-checkpoint trajectory.

  Args:
    epochs: the student phase's length E.
    k: K, the checkpoints with the final one (``kdaif.whole_set.trajectory``; 0: off).

  Returns:
    The epochs e, 1 ≤ e < E, of ``checkpoint_steps(E, K)`` without its last (E, the
    final scoring pass after training); ``()`` for K = 0 or E = 1.
  """
  if k <= 0:
    return ()
  return checkpoint_steps(epochs, k)[:-1]


def standardised(scores: np.ndarray) -> np.ndarray:
  """Scores over their standard deviation across the training examples (axis 0).

  Args:
    scores: [N] or [N, T] (one column per test example or validation target).

  Returns:
    The same shape, float64. A constant column (it ranks nothing) becomes 0 rather
    than NaN; a non-finite score becomes 0 (no evidence either way) and the spread is
    taken over the finite ones. Not centred: the sign of an influence (helps or hurts)
    is kept.
  """
  scores = np.asarray(scores, np.float64)
  finite = np.isfinite(scores)
  clean = np.where(finite, scores, np.nan)
  with warnings.catch_warnings():  # an all-non-finite column: NaN spread, handled below
    warnings.simplefilter("ignore", RuntimeWarning)
    std = np.nanstd(clean, axis=0, keepdims=True)
  ok = np.isfinite(std) & (std > 0)
  return np.where(finite & ok, clean / np.where(ok, std, 1.0), 0.0)


def average(checkpoints: Sequence[np.ndarray]) -> np.ndarray:
  """Mean of the ``standardised`` scores of several checkpoints (or models).

  Args:
    checkpoints: K arrays of one shape, [N] or [N, T].

  Returns:
    [N] or [N, T] float64, in units of each checkpoint's standard deviation.

  Raises:
    ValueError: no checkpoints, or checkpoints of different shapes.
  """
  if not checkpoints:
    raise ValueError("average: no checkpoints to average")
  shapes = {np.shape(s) for s in checkpoints}
  if len(shapes) > 1:
    raise ValueError(f"average: checkpoints must have one shape, got {sorted(shapes)}")
  return np.mean([standardised(s) for s in checkpoints], axis=0)


def _path(workdir: str, epoch: int) -> str:
  return os.path.join(workdir, FOLDER, f"epoch_{epoch:04d}.npy")


def save(workdir: str, epoch: int, scores: np.ndarray) -> None:
  """Writes one checkpoint's scores (atomically: a killed write leaves none).

  Args:
    workdir: the run's folder (the file goes to ``FOLDER/epoch_EEEE.npy`` in it).
    epoch: the epochs completed when the scores were taken.
    scores: [N] influence of every scored example, kept as float32.
  """
  path = _path(workdir, epoch)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  scores = np.asarray(scores, np.float32)
  checkpoint_files.write_atomic(path, lambda f: np.save(f, scores), binary=True)


def load(workdir: str, epochs: Sequence[int]) -> tuple[list[np.ndarray], list[int]]:
  """The scores ``save`` wrote for some epochs.

  Args:
    workdir: the run's folder.
    epochs: the epochs asked for.

  Returns:
    ``(found, missing)``: the [N] arrays of the epochs that have a file, in order,
    and the epochs that have none.
  """
  found, missing = [], []
  for e in epochs:
    path = _path(workdir, e)
    if os.path.exists(path):
      found.append(np.load(path))
    else:
      missing.append(e)
  return found, missing
