"""The linear datamodeling score (LDS) of a data attribution, and its noise ceiling.

Park et al. (TRAK, ICML 2023): draw m random subsets S_1..S_m of the training
set, retrain a model on each and record its output on every test example t
(here its loss, y_jt). An attribution gives a score τ_it for every training
example i and test example t; its prediction for subset j is the sum of the
scores of the subset's examples,

    ŷ_jt = Σ_{i ∈ S_j} τ_it = (M τ)_jt        (M the [m, N] 0/1 subset masks),

and the score is the mean over test examples of the Spearman rank correlation,
across subsets, between prediction and retrained output:

    LDS = mean_t  ρ_S(ŷ_·t, y_·t).

With the influence I_it = −∇ℓ_iᵀ (C + λI)⁻¹ ∇ℓ_t of ``kdaif_jax.influence``
(including example i raises test loss t by about I_it / N), τ = I is
positively correlated with the retrained loss, so a good attribution has LDS
near 1 and random scores ≈ 0.

When retraining is random (init, minibatch order), one retrained output is a
noisy measurement y = f(S) + ε and no function of S can reach 1. The ceiling
is estimated from two more retrainings of the same subsets with other seeds,
y^a and y^b: their per-test correlation r_t = ρ_S(y^a_·t, y^b_·t) is the
split-half reliability of ONE retraining (Var f / Var y for Pearson), and the
best possible correlation of any function of S with one retraining is
√r_t. No Spearman-Brown step-up is applied: the target is a single
retraining, not the mean of two. ``noise_ceiling`` reports mean_t √max(r_t, 0).

The LDS depends on m, not only through its spread: the sample Spearman
correlation of m points is biased toward 0, E[r_S] = ((m − 2)·ρ_S + 3·τ)/(m + 1)
(Kendall; ρ_S and τ the population Spearman and Kendall correlations). Near
ρ_S ≈ 0.96 that is about −0.008 at m = 50 and −0.002 at m = 200 (a bivariate
normal simulation agrees to 1e-4), so compare LDS figures at the same m
(bench/lds.py ``--blocks`` measures it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import rankdata

from kdaif_jax import _checks

__all__ = [
  "LDSResult",
  "NoiseCeiling",
  "bootstrap_subsets",
  "lds",
  "noise_ceiling",
  "predictions",
  "sample_masks",
  "spearman",
  "subset_indices",
]


class LDSResult(NamedTuple):
  """Result of ``lds``.

  per_test: [T] Spearman correlation of each test example (NaN where the
    outputs or the predictions do not vary across subsets).
  mean: [] mean of ``per_test`` over the test examples where it is defined.
  stderr_tests: [] standard error of ``mean`` over the test examples,
    std(per_test) / √T (sample std over the defined ones). The subsets'
    share of the uncertainty: ``bootstrap_subsets``.
  """

  per_test: jax.Array
  mean: jax.Array
  stderr_tests: jax.Array


class NoiseCeiling(NamedTuple):
  """Result of ``noise_ceiling``.

  reliability: [T] split-half reliability r_t = ρ_S(y^a_·t, y^b_·t).
  ceiling: [T] √max(r_t, 0), the best LDS term reachable for test t.
  mean_reliability: [] mean of r_t.
  mean_ceiling: [] mean of ``ceiling`` (the figure an LDS is compared with).
  """

  reliability: jax.Array
  ceiling: jax.Array
  mean_reliability: jax.Array
  mean_ceiling: jax.Array


def sample_masks(
  key: jax.Array, num_subsets: int, num_train: int, fraction: float = 0.5
) -> jax.Array:
  """Random subsets of equal size, as 0/1 masks.

  Every subset holds exactly k = max(1, round(fraction · N)) examples, drawn without
  replacement and independently of the other subsets (TRAK's protocol).

  Args:
    key: a PRNG key (``jax.random.key``).
    num_subsets: m ≥ 1.
    num_train: N ≥ 1.
    fraction: the subset size as a fraction of N, in (0, 1].

  Returns:
    bool array [m, N], each row with k True entries.

  Raises:
    ValueError: a non-positive count or a fraction outside (0, 1].
  """
  if num_subsets < 1 or num_train < 1 or not 0.0 < fraction <= 1.0:
    raise ValueError(
      f"need num_subsets >= 1, num_train >= 1 and 0 < fraction <= 1, got "
      f"{num_subsets}, {num_train}, {fraction}"
    )
  k = max(1, int(round(fraction * num_train)))
  keys = jax.random.split(key, num_subsets)
  perms = jax.vmap(lambda kk: jax.random.permutation(kk, num_train))(keys)
  # The first k positions of each random permutation are the subset.
  ranks = jnp.argsort(perms, axis=1)
  return ranks < k


def subset_indices(masks: jax.Array) -> jax.Array:
  """The sorted example indices of each equal-size subset (for gathering batches).

  Args:
    masks: bool [m, N] with the same number k of True entries per row.

  Returns:
    int32 [m, k].

  Raises:
    ValueError: ``masks`` not 2-D, or rows of different sizes.
  """
  _check_matrix(masks, "masks")
  counts = np.asarray(jnp.sum(masks, axis=1))  # k must be concrete: masks are too
  if np.any(counts != counts[0]):
    raise ValueError(
      f"masks must hold the same number of True entries in every row, got "
      f"{int(counts.min())} to {int(counts.max())}"
    )
  k = int(counts[0])
  order = jnp.argsort(~masks, axis=1, stable=True)  # True entries first, in index order
  return order[:, :k].astype(jnp.int32)


def predictions(scores: jax.Array, masks: jax.Array) -> jax.Array:
  """ŷ_jt = Σ_{i ∈ S_j} τ_it: the attribution's prediction for each subset.

  Args:
    scores: [N, T] attribution scores (training example x test example).
    masks: [m, N] 0/1 subset masks.

  Returns:
    [m, T] float array.
  """
  return jnp.asarray(masks, scores.dtype) @ scores


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
  """Spearman rank correlation of each column of ``a`` with the same column of ``b``.

  Pearson correlation of the ranks (ties get their average rank). A column
  whose ranks are constant gives NaN.

  Args:
    a, b: [m, T] arrays (m observations of T variables).

  Returns:
    [T] correlations in [-1, 1].

  Raises:
    ValueError: ``a`` and ``b`` not 2-D arrays of one shape.
  """
  _check_matrix(a, "a")
  if np.shape(a) != np.shape(b):
    raise ValueError(f"a and b must have one shape [m, T], got {np.shape(a)} and {np.shape(b)}")
  ra = jax.vmap(rankdata, in_axes=1, out_axes=1)(a)
  rb = jax.vmap(rankdata, in_axes=1, out_axes=1)(b)
  ra = ra - jnp.mean(ra, axis=0)
  rb = rb - jnp.mean(rb, axis=0)
  num = jnp.sum(ra * rb, axis=0)
  den = jnp.sqrt(jnp.sum(ra * ra, axis=0) * jnp.sum(rb * rb, axis=0))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def lds(scores: jax.Array, masks: jax.Array, outputs: jax.Array) -> LDSResult:
  """The linear datamodeling score of an attribution (module docstring).

  Args:
    scores: [N, T] attribution τ_it (for influence: I_it, positive = raises
      test loss t).
    masks: [m, N] 0/1 subset masks.
    outputs: [m, T] the retrained models' outputs (test losses).

  Returns:
    ``LDSResult`` (per-test correlations [T] and their mean).

  Raises:
    ValueError: shapes that do not fit together, ``masks`` without a True
      entry, or (when concrete) NaN or inf in ``scores`` or ``outputs`` (a
      failed retraining would otherwise drop out of the mean unnoticed).
  """
  _check_shapes(scores, masks, outputs)
  per_test = spearman(predictions(scores, masks), outputs)
  defined = jnp.sum(jnp.isfinite(per_test))
  stderr = jnp.nanstd(per_test, ddof=1) / jnp.sqrt(jnp.maximum(defined, 1))
  return LDSResult(per_test, jnp.nanmean(per_test), stderr)


def bootstrap_subsets(
  scores: jax.Array, masks: jax.Array, outputs: jax.Array, key: jax.Array, num: int = 200
) -> jax.Array:
  """The LDS recomputed on ``num`` bootstrap resamples of the m subsets.

  Each resample draws m subsets with replacement (the rows of ``masks`` and
  ``outputs`` together) and takes ``lds``' mean. Their spread is the
  uncertainty of an LDS that comes from which subsets were drawn (m = 50 is a
  small sample of the 2^N possible ones); ``LDSResult.stderr_tests`` is the
  test examples' share.

  Args:
    scores, masks, outputs: as in ``lds``.
    key: a ``jax.random.key``.
    num: number of resamples.

  Returns:
    [num] LDS means; their std is the bootstrap standard error.
  """
  _check_shapes(scores, masks, outputs)
  pred = predictions(scores, masks)
  m = masks.shape[0]
  rows = jax.random.randint(key, (num, m), 0, m)
  one = lambda r: jnp.nanmean(spearman(pred[r], outputs[r]))
  return jax.lax.map(one, rows)


def _check_matrix(x: jax.Array, name: str) -> None:
  if np.ndim(x) != 2:
    raise ValueError(f"{name} must be a 2-D array, got shape {np.shape(x)}")


def _check_shapes(scores: jax.Array, masks: jax.Array, outputs: jax.Array) -> None:
  """Shapes [N, T], [m, N], [m, T]; at least one True mask entry; finite values."""
  for x, name in ((scores, "scores"), (masks, "masks"), (outputs, "outputs")):
    _check_matrix(x, name)
  n, t = scores.shape
  if masks.shape[1] != n or outputs.shape != (masks.shape[0], t):
    raise ValueError(
      f"scores [N, T]={scores.shape}, masks [m, N]={masks.shape} and outputs "
      f"[m, T]={outputs.shape} do not fit together"
    )
  if not _checks.is_traced(masks) and not np.any(np.asarray(masks)):
    raise ValueError("masks has no True entry: every subset is empty")
  _checks.check_finite_tree(scores, "scores")
  _checks.check_finite_tree(outputs, "outputs", " (a failed retraining? drop its row first)")


def noise_ceiling(outputs_a: jax.Array, outputs_b: jax.Array) -> NoiseCeiling:
  """Split-half noise ceiling from two retrainings of the same subsets (module docstring).

  Args:
    outputs_a, outputs_b: [m, T] outputs of the same m subsets retrained with
      two other seeds than the outputs the LDS is measured against.

  Returns:
    ``NoiseCeiling``: r_t, √max(r_t, 0) and their means over T.

  Raises:
    ValueError: not 2-D, different shapes, or (when concrete) NaN or inf.
  """
  _check_matrix(outputs_a, "outputs_a")
  if outputs_a.shape != outputs_b.shape:
    raise ValueError(f"outputs of different shapes: {outputs_a.shape} vs {outputs_b.shape}")
  _checks.check_finite_tree(outputs_a, "outputs_a")
  _checks.check_finite_tree(outputs_b, "outputs_b")
  r = spearman(outputs_a, outputs_b)
  ceiling = jnp.sqrt(jnp.maximum(r, 0.0))
  return NoiseCeiling(r, ceiling, jnp.nanmean(r), jnp.nanmean(ceiling))
