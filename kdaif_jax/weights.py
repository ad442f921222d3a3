"""Influence scores -> per-example weights (docs/method.md §2).

Every map returns weights with mean exactly 1 over the batch (so the learning
rate keeps its meaning), finite for constant, single-element or extreme
inputs, and is meant to be used under ``jax.lax.stop_gradient``.

Non-finite scores (NaN, ±inf: a broken solve or an overflow) get weight 0;
the other weights stay finite, with mean 1 over the finite entries (with
``axis_name``: over the finite entries of the global batch), ranked as the
map ranks them. If no score is finite every weight is 0. ``num_nonfinite``
counts the dropped entries, for the step's metrics. Whenever every score is
finite and today's formula gives finite weights, the result is that formula's,
bit for bit: the non-finite handling only replaces a result that would
otherwise be NaN or inf (``jnp.where`` on a batch-global flag, so it costs a
few [B]-sized operations under ``jit``).

Input checks: ``scores`` must be a non-empty 1-D [B] vector (static shape, so
checked under ``jit`` too) and the options finite (τ > 0, ε ≥ 0; checked
when concrete), else a one-line ValueError.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from kdaif_jax import _checks

MAPS = ("sigmoid", "sigmoid_down", "exp_minmax", "none")
_TEMPERED = ("sigmoid", "sigmoid_down")  # the maps that take τ

__all__ = [
  "MAPS",
  "WeightMap",
  "exp_minmax",
  "extremes",
  "get",
  "moments",
  "none",
  "num_nonfinite",
  "oracle",
  "sigmoid",
  "sigmoid_down",
  "small_loss",
]


def moments(x: jax.Array, axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean and std over the batch (and over devices when ``axis_name`` is set).

  The project's one standard deviation: the weight maps, the step's weight
  statistics and the ``joint`` feedback all use it.

  Scaled by max|x| and computed in two passes, so neither 1e30-sized scores
  (overflow) nor a large common offset (cancellation in E[x²] − E[x]²) break it.
  """
  peak = jnp.max(jnp.abs(x))
  if axis_name is not None:
    peak = jax.lax.pmax(peak, axis_name)
  peak = jnp.where(peak > 0, peak, 1.0)
  xs = x / peak
  mean = jnp.mean(xs)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(xs - mean))
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return mean * peak, jnp.sqrt(var) * peak


def extremes(x: jax.Array, axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """(min, max) over the batch (and over devices when ``axis_name`` is set)."""
  lo, hi = jnp.min(x), jnp.max(x)
  if axis_name is not None:
    lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
  return lo, hi


def _normalise_log(log_w: jax.Array, axis_name: str | None) -> jax.Array:
  """exp(log_w) / mean(exp(log_w)), computed in log space so nothing overflows."""
  peak = jnp.max(log_w)
  if axis_name is not None:
    peak = jax.lax.pmax(peak, axis_name)
  w = jnp.exp(log_w - peak)
  mean = jnp.mean(w)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  return w / mean


def num_nonfinite(scores: jax.Array, axis_name: str | None = None) -> jax.Array:
  """How many entries of ``scores`` are NaN or ±inf: those the maps weigh 0.

  Args:
    scores: [B] influence values (or losses, for ``small_loss``).
    axis_name: mapped axis the batch is sharded over (the count then covers
      the global batch), or None.

  Returns:
    int32 scalar count, for the training step's metrics.
  """
  _checks.check_vector(scores, "scores", allow_empty=True)
  n = jnp.sum(~jnp.isfinite(scores), dtype=jnp.int32)
  if axis_name is not None:
    n = jax.lax.psum(n, axis_name)
  return n


def _check_map(x: jax.Array, name: str, temperature: float | None, eps: float) -> None:
  _checks.check_vector(x, name)
  if temperature is not None:
    _checks.check_positive(temperature, "temperature")
  _checks.check_nonnegative(eps, "eps")


def _guarded(
  x: jax.Array,
  exact: Callable[[jax.Array], jax.Array],
  robust: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array],
  axis_name: str | None,
) -> jax.Array:
  """``exact(x)`` when it is usable for the whole (global) batch, else ``robust``.

  ``exact`` is a map's plain formula; it is selected, unchanged, when every
  entry of x and of its result is finite over the global batch. Otherwise
  ``robust(x, finite, count, peak)`` computes the weights of the finite
  entries only (count: their global number; peak: their global max |x|, > 0).
  """
  finite = jnp.isfinite(x)
  w = exact(x)
  counts = jnp.stack([jnp.sum(~finite), jnp.sum(finite), jnp.sum(~jnp.isfinite(w))]).astype(
    jnp.float32
  )
  peak = jnp.max(jnp.where(finite, jnp.abs(x), 0))
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
    peak = jax.lax.pmax(peak, axis_name)
  ok = (counts[0] == 0) & (counts[2] == 0)
  peak = jnp.where(peak > 0, peak, 1.0)
  return jnp.where(ok, w, robust(x, finite, counts[1], peak))


def _sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  total = jnp.sum(x)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def _masked_moments(
  xs: jax.Array, finite: jax.Array, count: jax.Array, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
  """Mean and std of the finite entries of the already scaled ``xs`` (|xs| ≤ 1)."""
  n = jnp.maximum(count, 1.0)
  mean = _sum(jnp.where(finite, xs, 0.0), axis_name) / n
  var = _sum(jnp.where(finite, jnp.square(xs - mean), 0.0), axis_name) / n
  return mean, jnp.sqrt(var)


def _masked_normalise_log(
  log_w: jax.Array, finite: jax.Array, count: jax.Array, axis_name: str | None
) -> jax.Array:
  """``_normalise_log`` over the finite entries; weight 0 for the others."""
  keep = finite & jnp.isfinite(log_w)
  peak = jnp.max(jnp.where(keep, log_w, -jnp.inf))
  if axis_name is not None:
    peak = jax.lax.pmax(peak, axis_name)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  w = jnp.where(keep, jnp.exp(jnp.where(keep, log_w, peak) - peak), 0.0)
  mean = _sum(w, axis_name) / jnp.maximum(count, 1.0)
  return w / jnp.where(mean > 0, mean, 1.0)


def _scale_down(x: jax.Array, peak: jax.Array) -> jax.Array:
  """x / peak in two halves: XLA:CPU divides by multiplying with 1/peak, which
  flushes to 0 for peak above ~8e37 in float32 (a subnormal)."""
  root = jnp.sqrt(peak)
  return x / root / root


def _safe_scale(spread: jax.Array, eps: float, peak: jax.Array) -> jax.Array:
  """τ·std + ε in units of ``peak``, never 0 (ε/peak may underflow)."""
  den = spread + eps / peak
  return jnp.where(den > 0, den, 1.0)


def sigmoid(
  scores: jax.Array, *, temperature: float = 1.0, eps: float = 1e-8, axis_name: str | None = None
) -> jax.Array:
  """w_i = 2σ(−I_i / (τ·std_B(I) + ε)), divided by its batch mean.

  Before the normalisation helpful examples (I_i < 0) get 2σ > 1 and harmful ones
  2σ < 1; after it the weights above 1 go to the examples more helpful than the
  batch's average (in a batch of mostly helpful ones, a mildly helpful example can
  land below 1). The factor 2 cancels in the normalisation; the division happens in log space
  (log σ), so a batch where every σ underflows still gets finite weights.
  Non-finite scores get weight 0 and are left out of std and mean (see the
  module docstring).

  Args:
    scores: [B] influence values I (1-D, non-empty).
    temperature: τ > 0 (finite); larger flattens the weights towards 1.
    eps: ε ≥ 0 keeps the scale positive when all scores are equal.
    axis_name: mapped axis over which the batch is sharded (std and mean then
      cover the global batch), or None.

  Returns:
    [B] weights with mean 1 (over the finite scores).

  Raises:
    ValueError: ``scores`` not a non-empty 1-D vector; τ ≤ 0 or non-finite
      (it would swap helpful and harmful, or divide by zero); ε < 0.
  """
  return _sigmoid_map(scores, temperature, eps, axis_name, cap=False)


def sigmoid_down(
  scores: jax.Array, *, temperature: float = 1.0, eps: float = 1e-8, axis_name: str | None = None
) -> jax.Array:
  """w_i = min(1, 2σ(−I_i / (τ·std_B(I) + ε))), divided by its batch mean.

  ``sigmoid`` without the up-weighting: every helpful example (I_i ≤ 0) gets the
  same weight, only harmful ones are down-weighted, as a perfect detector of bad
  labels (``oracle``) would weigh them. Non-finite scores get weight 0 (see the
  module docstring).

  Args:
    scores, temperature, eps, axis_name: as in ``sigmoid``.

  Returns:
    [B] weights with mean 1 (over the finite scores).

  Raises:
    ValueError: as ``sigmoid``.
  """
  return _sigmoid_map(scores, temperature, eps, axis_name, cap=True)


def _sigmoid_map(scores, temperature, eps, axis_name, cap: bool) -> jax.Array:
  _check_map(scores, "scores", temperature, eps)
  # log σ(z) ≤ log ½ exactly where z ≤ 0: the cap at 2σ = 1 (the 2 cancels).
  log_w = (
    (lambda z: jnp.minimum(jax.nn.log_sigmoid(z), -jnp.log(2.0))) if cap else jax.nn.log_sigmoid
  )

  def exact(x):
    _, std = moments(x, axis_name)
    z = -x / (temperature * std + eps)
    return _normalise_log(log_w(z), axis_name)

  def robust(x, finite, count, peak):
    xs = _scale_down(jnp.where(finite, x, 0.0), peak)
    _, std = _masked_moments(xs, finite, count, axis_name)
    z = -xs / _safe_scale(temperature * std, eps, peak)
    return _masked_normalise_log(log_w(z), finite, count, axis_name)

  return _guarded(scores, exact, robust, axis_name)


def exp_minmax(scores: jax.Array, *, eps: float = 1e-12, axis_name: str | None = None) -> jax.Array:
  """w_i = exp(minmax_[-1,1](−I_i)), divided by its batch mean.

  The authors' example map with the sign fixed: the most helpful example gets
  e, the most harmful e⁻¹ (before normalisation), so weights span a factor e².

  Finite for any finite input, ±1e38 included (the range is then taken in
  units of max|I|, so it cannot overflow); non-finite scores get weight 0 and
  are left out of the range and the mean (see the module docstring).

  Args:
    scores: [B] influence values I (1-D, non-empty).
    eps: ε ≥ 0 keeps the range positive for constant inputs (all weights
      become 1).
    axis_name: as in ``sigmoid``.

  Returns:
    [B] weights with mean 1 (over the finite scores).

  Raises:
    ValueError: ``scores`` not a non-empty 1-D vector; ε < 0.
  """
  _check_map(scores, "scores", None, eps)

  def exact(x):
    h = -x
    lo, hi = extremes(h, axis_name)
    scaled = 2.0 * (h - lo) / (hi - lo + eps) - 1.0
    return _normalise_log(scaled, axis_name)

  def robust(x, finite, count, peak):
    hs = _scale_down(jnp.where(finite, -x, 0.0), peak)  # in [-1, 1]: no range overflows
    lo, hi = jnp.min(jnp.where(finite, hs, jnp.inf)), jnp.max(jnp.where(finite, hs, -jnp.inf))
    if axis_name is not None:
      lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    den = jnp.where(count > 0, hi - lo, 0.0) + eps / peak
    den = jnp.where(den > 0, den, 1.0)
    scaled = jnp.where(finite, 2.0 * (hs - jnp.where(count > 0, lo, 0.0)) / den - 1.0, 0.0)
    return _masked_normalise_log(scaled, finite, count, axis_name)

  return _guarded(scores, exact, robust, axis_name)


def none(scores: jax.Array, **_) -> jax.Array:
  """w_i = 1 (plain KD, the baseline). Returns ones [B] like ``scores``.

  Every example keeps weight 1, whatever its score (NaN included): this map
  ignores the scores. Raises ValueError unless ``scores`` is a non-empty 1-D
  vector.
  """
  _checks.check_vector(scores, "scores")
  return jnp.ones_like(scores)


def small_loss(
  losses: jax.Array, *, temperature: float = 1.0, eps: float = 1e-8, axis_name: str | None = None
) -> jax.Array:
  """Small-loss baseline (docs/method.md §7): large training losses get low weight.

  w_i ∝ σ(−(ℓ_i − mean ℓ) / (τ·std ℓ + ε)), mean 1. Not influence: the classic
  noisy-label heuristic that KD-AIF must beat to be worth its cost.

  Non-finite losses get weight 0 and are left out of mean, std and the
  normalisation (see the module docstring).

  Args:
    losses: [B] per-example training losses (1-D, non-empty).
    temperature, eps, axis_name: as in ``sigmoid``.

  Returns:
    [B] weights with mean 1 (over the finite losses).

  Raises:
    ValueError: as ``sigmoid``.
  """
  _check_map(losses, "losses", temperature, eps)

  def exact(x):
    mean, std = moments(x, axis_name)
    z = -(x - mean) / (temperature * std + eps)
    return _normalise_log(jax.nn.log_sigmoid(z), axis_name)

  def robust(x, finite, count, peak):
    xs = _scale_down(jnp.where(finite, x, 0.0), peak)
    mean, std = _masked_moments(xs, finite, count, axis_name)
    z = -(xs - mean) / _safe_scale(temperature * std, eps, peak)
    return _masked_normalise_log(jax.nn.log_sigmoid(z), finite, count, axis_name)

  return _guarded(losses, exact, robust, axis_name)


def oracle(noisy: jax.Array) -> jax.Array:
  """The oracle reference for benchmarks: the weights a perfect detector would give.

  w_i = 0 where example i's label was flipped by the injected noise, 1 elsewhere,
  scaled to mean 1. Only synthetic noise has the flip mask; a method that matches
  this arm has nothing left to gain from finding the flipped labels.

  Args:
    noisy: [N] bool, True where the training label was flipped.

  Returns:
    [N] float32 weights with mean 1 (all ones if every label was flipped or none).

  Raises:
    ValueError: ``noisy`` is not 1-D or is empty.
  """
  noisy = jnp.asarray(noisy)
  if noisy.ndim != 1 or noisy.size == 0:
    raise ValueError(f"noisy must be a non-empty 1-D mask, got shape {noisy.shape}")
  clean = (~noisy.astype(bool)).astype(jnp.float32)
  mean = jnp.mean(clean)
  return jnp.where(mean > 0, clean / jnp.where(mean > 0, mean, 1.0), 1.0)


def get(name: str) -> Callable[..., jax.Array]:
  """The weight map called ``name`` (one of ``MAPS``)."""
  _checks.check_choice(name, "weights", MAPS)
  maps = {"sigmoid": sigmoid, "sigmoid_down": sigmoid_down, "exp_minmax": exp_minmax, "none": none}
  return maps[name]


class WeightMap(NamedTuple):
  """A weight map with its options: ``WeightMap("sigmoid", 0.5)(scores)``.

  name: one of ``MAPS``.
  temperature: τ of ``sigmoid`` and ``sigmoid_down`` (the other maps take none).
  """

  name: str = "sigmoid"
  temperature: float = 1.0

  def __call__(self, scores: jax.Array, axis_name: str | None = None) -> jax.Array:
    """[B] weights with mean 1 of the [B] influence ``scores`` (see the named map)."""
    kwargs = {"temperature": self.temperature} if self.name in _TEMPERED else {}
    return get(self.name)(scores, axis_name=axis_name, **kwargs)
