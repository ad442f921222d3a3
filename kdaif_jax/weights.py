"""Influence scores -> per-example weights (docs/method.md §2).

Every map returns weights with mean exactly 1 over the batch (so the learning
rate keeps its meaning), finite for constant, single-element or extreme
inputs, and is meant to be used under ``jax.lax.stop_gradient``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from kdaif_jax import _checks

MAPS = ("sigmoid", "exp_minmax", "none")

__all__ = [
  "MAPS",
  "WeightMap",
  "exp_minmax",
  "extremes",
  "get",
  "moments",
  "none",
  "sigmoid",
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


def sigmoid(
  scores: jax.Array, *, temperature: float = 1.0, eps: float = 1e-8, axis_name: str | None = None
) -> jax.Array:
  """w_i = 2σ(−I_i / (τ·std_B(I) + ε)), divided by its batch mean.

  Helpful examples (I_i < 0) get weights above 1, harmful ones below. The
  factor 2 cancels in the normalisation; the division happens in log space
  (log σ), so a batch where every σ underflows still gets finite weights.

  Args:
    scores: [B] influence values I.
    temperature: τ > 0; larger flattens the weights towards 1.
    eps: ε keeps the scale positive when all scores are equal.
    axis_name: mapped axis over which the batch is sharded (std and mean then
      cover the global batch), or None.

  Returns:
    [B] weights with mean 1.
  """
  _, std = moments(scores, axis_name)
  z = -scores / (temperature * std + eps)
  return _normalise_log(jax.nn.log_sigmoid(z), axis_name)


def exp_minmax(scores: jax.Array, *, eps: float = 1e-12, axis_name: str | None = None) -> jax.Array:
  """w_i = exp(minmax_[-1,1](−I_i)), divided by its batch mean.

  The authors' example map with the sign fixed: the most helpful example gets
  e, the most harmful e⁻¹ (before normalisation), so weights span a factor e².

  Args:
    scores: [B] influence values I.
    eps: keeps the range positive for constant inputs (all weights become 1).
    axis_name: as in ``sigmoid``.

  Returns:
    [B] weights with mean 1.
  """
  h = -scores
  lo, hi = extremes(h, axis_name)
  scaled = 2.0 * (h - lo) / (hi - lo + eps) - 1.0
  return _normalise_log(scaled, axis_name)


def none(scores: jax.Array, **_) -> jax.Array:
  """w_i = 1 (plain KD, the baseline). Returns ones [B] like ``scores``."""
  return jnp.ones_like(scores)


def small_loss(
  losses: jax.Array, *, temperature: float = 1.0, eps: float = 1e-8, axis_name: str | None = None
) -> jax.Array:
  """Small-loss baseline (docs/method.md §7): large training losses get low weight.

  w_i ∝ σ(−(ℓ_i − mean ℓ) / (τ·std ℓ + ε)), mean 1. Not influence: the classic
  noisy-label heuristic that KD-AIF must beat to be worth its cost.

  Args:
    losses: [B] per-example training losses.
    temperature, eps, axis_name: as in ``sigmoid``.

  Returns:
    [B] weights with mean 1.
  """
  mean, std = moments(losses, axis_name)
  z = -(losses - mean) / (temperature * std + eps)
  return _normalise_log(jax.nn.log_sigmoid(z), axis_name)


def get(name: str) -> Callable[..., jax.Array]:
  """The weight map called ``name`` (one of ``MAPS``)."""
  _checks.check_choice(name, "weights", MAPS)
  return {"sigmoid": sigmoid, "exp_minmax": exp_minmax, "none": none}[name]


class WeightMap(NamedTuple):
  """A weight map with its options: ``WeightMap("sigmoid", 0.5)(scores)``.

  name: one of ``MAPS``.
  temperature: τ of ``sigmoid`` (the other maps take none).
  """

  name: str = "sigmoid"
  temperature: float = 1.0

  def __call__(self, scores: jax.Array, axis_name: str | None = None) -> jax.Array:
    """[B] weights with mean 1 of the [B] influence ``scores`` (see the named map)."""
    kwargs = {"temperature": self.temperature} if self.name == "sigmoid" else {}
    return get(self.name)(scores, axis_name=axis_name, **kwargs)
