"""Self-influence I_ii = ∇ℓ_iᵀ (C + λI)⁻¹ ∇ℓ_i of every training example, without an N×N matrix.

Self-influence is how much example i moves its own loss when up-weighted (Koh
& Liang 2017; Pruthi et al. 2020): large for atypical, memorised and
mislabelled examples, so it ranks suspects without a validation set.

Method: exact, in a small parameter space. C + λI (the curvature of the mean
training loss, as in ``kdaif_jax.influence``) is materialised as a dense
[P, P] matrix by P curvature-vector products and Cholesky-factored once,
C + λI = L Lᵀ; then for each chunk of examples the per-example gradients
G [B, P] give

    I_ii = ‖L⁻¹ g_i‖²,

one triangular solve per chunk. Memory is P² + B·P, never N²; time is P
curvature products, one O(P³) factorisation and N per-example gradients.
That is cheap exactly where P is small: in the classifier layer
(``kdaif.scope = "head"``, P = (features + 1) · classes, e.g. 330 for
``cnn_small`` on 10 classes) the per-example gradient is the outer product
of the last hidden features and the logit residual, the body runs forward
only, and the result is exact, not an estimate. Over a whole network
(P ~ 10⁵-10⁷) the dense factor is out of reach; ``max_params`` refuses it
rather than allocate P² floats (restrict the params with
``influence.restrict`` first).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from kdaif_jax import _checks
from kdaif_jax.curvature import CURVATURES, curvature_matvec

__all__ = ["MAX_PARAMS", "damped_cholesky", "self_influence"]

PyTree = Any

# 8192² float32 = 256 MiB: the largest dense factor built by default.
MAX_PARAMS = 8192


def damped_cholesky(
  params: PyTree,
  train_loss,
  *,
  curvature: str = "ggn",
  damping: float = 0.1,
  max_params: int = MAX_PARAMS,
  column_chunk: int = 256,
) -> jax.Array:
  """The lower Cholesky factor L of C + λI, C the curvature of the mean training loss.

  C is built column by column from ``curvature.curvature_matvec`` (the same
  products the inverse solves use), ``column_chunk`` columns at a time, then
  symmetrised ((C + Cᵀ)/2, which removes rounding asymmetry) before the
  factorisation. Jittable.

  Args:
    params: pytree θ (P scalars in all).
    train_loss: ``influence.PerExampleLoss`` of the curvature sample.
    curvature: "ggn" (PSD: L exists for every λ > 0) or "hessian" (L is NaN
      where H + λI is not positive definite).
    damping: λ ≥ 0.
    max_params: refuse P above this (the factor takes P² floats).
    column_chunk: curvature products evaluated together.

  Returns:
    [P, P] lower-triangular array in the order of ``jax.flatten_util.ravel_pytree``.

  Raises:
    ValueError: an unknown curvature, a negative damping, P > ``max_params``
      or ``column_chunk`` not an integer ≥ 1.
  """
  _checks.check_choice(curvature, "curvature", CURVATURES)
  _checks.check_nonnegative(damping, "damping")
  _checks.check_positive_int(column_chunk, "column_chunk")
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  p = flat.size
  if p > max_params:
    raise ValueError(
      f"self-influence builds a dense [P, P] curvature; P={p} exceeds max_params={max_params}: "
      "restrict the params (influence.restrict, e.g. to the classifier head) or raise max_params"
    )
  matvec = curvature_matvec(train_loss, params, curvature)
  column = lambda e: jax.flatten_util.ravel_pytree(matvec(unravel(e)))[0]
  eye = jnp.eye(p, dtype=flat.dtype)
  c = jax.lax.map(column, eye, batch_size=min(column_chunk, p))  # row j = C e_j = column j
  c = 0.5 * (c + c.T) + damping * eye
  return jnp.linalg.cholesky(c)


def self_influence(
  per_example_loss_fn: Callable[..., jax.Array],
  params: PyTree,
  chol: jax.Array,
  *args,
  **kwargs,
) -> jax.Array:
  """I_ii = ∇ℓ_iᵀ (C + λI)⁻¹ ∇ℓ_i = ‖L⁻¹ ∇ℓ_i‖² for every example of a batch.

  The per-example gradients are the rows of the Jacobian of the [B] loss
  vector (``jax.jacrev``): exact when each example's loss depends on its own
  inputs only (inference mode, as ``kdaif_jax.objectives`` builds it).

  Args:
    per_example_loss_fn: ``(params, *args, **kwargs) -> [B]`` losses.
    params: pytree θ, the space of ``chol``.
    chol: [P, P] lower factor from ``damped_cholesky`` (same params layout).
    *args, **kwargs: batch arguments of the loss (not differentiated).

  Returns:
    float array [B], ≥ 0 (NaN where ``chol`` is NaN); large = self-influential.

  Raises:
    ValueError: params not floating point, the loss not a [B] vector,
      ``chol`` not [P, P] or (when concrete) not lower-triangular (its upper
      half would be ignored: an upper factor Lᵀ gives wrong values).
  """
  _checks.check_float_tree(params, "params")
  f = lambda p: per_example_loss_fn(p, *args, **kwargs)
  out = jax.eval_shape(f, params)
  if getattr(out, "ndim", None) != 1:
    raise ValueError(f"per_example_loss_fn must return [B] losses, got {out}")
  p = jax.flatten_util.ravel_pytree(params)[0].size
  if chol.shape != (p, p):
    raise ValueError(f"chol must be [P, P] = [{p}, {p}] for these params, got {chol.shape}")
  upper = None if _checks.is_traced(chol) else jnp.triu(chol, 1)  # NaN: no factor (documented)
  if upper is not None and bool(jnp.any(jnp.isfinite(upper) & (upper != 0))):
    raise ValueError("chol must be lower-triangular (damped_cholesky's L, not its transpose)")
  b = out.shape[0]
  jac = jax.jacrev(f)(params)  # leaves [B, *leaf.shape], in ravel_pytree's leaf order
  g = jnp.concatenate([jnp.reshape(x, (b, -1)) for x in jax.tree.leaves(jac)], axis=1)
  z = solve_triangular(chol, g.T.astype(chol.dtype), lower=True)  # [P, B]
  return jnp.sum(z * z, axis=0)
