"""Influence functions over pytrees: curvature products, inverse solves, scores.

Everything here is a pure function of pytrees and composes with ``jax.jit``,
``jax.vmap`` and ``jax.shard_map``. The maths follows Koh & Liang (ICML 2017):

    I_up,loss(z_i, V) = -∇_θ ℓ_i(θ)ᵀ (C + λI)⁻¹ ∇_θ L_V(θ)

with C the Hessian (``hvp``) or the Gauss-Newton matrix (``gnvp``) of the
training loss, the inverse applied by conjugate gradient (``cg_solve``), the
stochastic Neumann series (``lissa``) or not at all (``identity``), and all B
scores of a batch obtained with ONE forward-mode product (``scores``).

Sign convention: I_i < 0 means up-weighting example i lowers the validation
loss (it helps); I_i > 0 means it hurts.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from kdaif_jax import _checks
from kdaif_jax.solvers import SolveInfo, cg_solve, default_unroll, lissa, tree_isfinite

__all__ = [
  "CURVATURES",
  "SOLVERS",
  "Influence",
  "PerExampleLoss",
  "SolveInfo",
  "batch_influence",
  "cg_solve",
  "curvature_matvec",
  "default_unroll",
  "dense_matrix",
  "flatten",
  "gnvp",
  "hvp",
  "inverse_hvp",
  "lissa",
  "make_gnvp",
  "make_hvp",
  "scores",
]

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

SOLVERS = ("cg", "lissa", "identity")
CURVATURES = ("ggn", "hessian")


# --------------------------------------------------------------------------
# Curvature-vector products
# --------------------------------------------------------------------------


def hvp(f: Callable[..., jax.Array], params: PyTree, v: PyTree, *args, **kwargs) -> PyTree:
  """Hessian-vector product ∇²_θ f(θ, *args) · v by forward-over-reverse.

  Computed as ``jax.jvp(jax.grad(f), (θ,), (v,))[1]``: about 1.5x the cost of
  one gradient, exact (no finite differences).

  Args:
    f: scalar function ``f(params, *args, **kwargs) -> []``.
    params: pytree θ at which the Hessian is taken.
    v: pytree with the same structure, shapes and dtypes as ``params``.
    *args, **kwargs: extra arguments of ``f`` (not differentiated).

  Returns:
    Pytree like ``params``: H v.

  Raises:
    ValueError: ``v`` does not match ``params``, or ``f`` is not scalar.
  """
  _checks.check_tree_match(params, v, "v", "params")
  _checks.check_scalar_fn(f, "f", params, *args, **kwargs)
  grad_f = lambda p: jax.grad(f)(p, *args, **kwargs)
  return jax.jvp(grad_f, (params,), (v,))[1]


def make_hvp(f: Callable[[PyTree], jax.Array], params: PyTree) -> Matvec:
  """Returns ``v -> ∇²f(params) v`` with the gradient linearised once.

  ``jax.linearize`` runs the forward and backward pass of ``grad f`` once and
  keeps its residuals, so each later product costs only the linear part. Use
  this when many products share one ``params`` (an iterative solve).

  Args:
    f: scalar function of ``params`` alone (close over data).
    params: pytree θ.

  Returns:
    A linear function mapping a pytree like ``params`` to H v.
  """
  _checks.check_scalar_fn(f, "f", params)
  _, lin = jax.linearize(jax.grad(f), params)
  return _checked_matvec(lin, params)


def make_gnvp(
  outputs_fn: Callable[[PyTree], Any],
  loss_fn: Callable[[Any], jax.Array],
  params: PyTree,
) -> Matvec:
  """Returns the Gauss-Newton product ``v -> Jᵀ H_out J v``, linearised once.

  For a loss of the form L(θ) = loss_fn(outputs_fn(θ)), the generalised
  Gauss-Newton matrix is G = Jᵀ H_out J with J = ∂outputs/∂θ and H_out the
  Hessian of ``loss_fn`` in the outputs. For convex ``loss_fn`` (cross-entropy,
  KL, squared error) G is positive semi-definite whatever the network, so CG
  on G + λI is stable (Martens 2010; Schraudolph 2002).

  The model is linearised once (one forward pass, residuals kept); each
  product then costs one linear forward (J v), one output-space HVP and one
  transposed linear pass (Jᵀ u).

  Args:
    outputs_fn: ``params -> outputs`` (e.g. logits [B, K]); close over inputs.
    loss_fn: ``outputs -> []`` scalar loss; close over targets.
    params: pytree θ.

  Returns:
    A linear function mapping a pytree like ``params`` to G v.
  """
  outputs, jvp_fn = jax.linearize(outputs_fn, params)
  _checks.check_scalar_fn(loss_fn, "loss_fn", outputs)
  vjp_fn = jax.linear_transpose(jvp_fn, params)
  _, out_hvp = jax.linearize(jax.grad(loss_fn), outputs)

  def matvec(v):
    return vjp_fn(out_hvp(jvp_fn(v)))[0]

  return _checked_matvec(matvec, params)


def gnvp(
  outputs_fn: Callable[[PyTree], Any],
  loss_fn: Callable[[Any], jax.Array],
  params: PyTree,
  v: PyTree,
) -> PyTree:
  """Gauss-Newton vector product Jᵀ H_out J v (always PSD for convex losses).

  Args:
    outputs_fn: ``params -> outputs`` (e.g. logits [B, K]).
    loss_fn: ``outputs -> []`` scalar loss of the outputs.
    params: pytree θ.
    v: pytree like ``params``.

  Returns:
    Pytree like ``params``: G v with G = Jᵀ ∇²loss_fn(outputs) J.
  """
  _checks.check_tree_match(params, v, "v", "params")
  outputs, jv = jax.jvp(outputs_fn, (params,), (v,))
  _checks.check_scalar_fn(loss_fn, "loss_fn", outputs)
  hjv = jax.jvp(jax.grad(loss_fn), (outputs,), (jv,))[1]
  _, vjp_fn = jax.vjp(outputs_fn, params)
  return vjp_fn(hjv)[0]


def _checked_matvec(fn: Matvec, params: PyTree) -> Matvec:
  def matvec(v):
    _checks.check_tree_match(params, v, "v", "params")
    return fn(v)

  return matvec


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------


def scores(
  per_example_loss_fn: Callable[..., jax.Array],
  params: PyTree,
  s: PyTree,
  *args,
  **kwargs,
) -> jax.Array:
  """Influence of every example of a batch: I_i = -∇_θ ℓ_i(θ)ᵀ s.

  All B values come from ONE forward-mode product of the per-example loss
  vector along s, ``-jax.jvp(ℓ, (θ,), (s,))[1]``: about the cost of one
  forward pass plus its tangent, and no per-example gradient is ever built
  (7x cheaper than ``vmap(grad)`` measured here).

  Args:
    per_example_loss_fn: ``(params, *args, **kwargs) -> [B]`` losses.
    params: pytree θ.
    s: pytree like ``params``, usually (C + λI)⁻¹ ∇L_V.
    *args, **kwargs: batch arguments of the loss (not differentiated).

  Returns:
    float array [B]; I_i < 0 marks a helpful example, I_i > 0 a harmful one.
  """
  _checks.check_tree_match(params, s, "s", "params")
  out = jax.eval_shape(lambda p: per_example_loss_fn(p, *args, **kwargs), params)
  if getattr(out, "ndim", None) != 1:
    raise ValueError(
      "per_example_loss_fn must return a 1-D vector of per-example losses [B], "
      f"got shape {getattr(out, 'shape', type(out))}"
    )
  f = lambda p: per_example_loss_fn(p, *args, **kwargs)
  return -jax.jvp(f, (params,), (s,))[1]


class PerExampleLoss(NamedTuple):
  """A training loss split at the model outputs, as the Gauss-Newton needs.

  outputs_fn: ``params -> outputs`` for the batch (e.g. logits [B, K]).
  loss_fn: ``outputs -> [B]`` per-example losses (convex in the outputs for a
    PSD Gauss-Newton matrix).
  """

  outputs_fn: Callable[[PyTree], Any]
  loss_fn: Callable[[Any], jax.Array]

  def __call__(self, params: PyTree) -> jax.Array:
    return self.loss_fn(self.outputs_fn(params))


class Influence(NamedTuple):
  """Result of ``batch_influence``.

  scores: [B] I_i = -∇ℓ_iᵀ s (negative = helpful).
  s: pytree like params, the inverse-curvature-weighted validation gradient.
  val_grad: pytree like params, ∇L_V.
  info: ``SolveInfo`` of the inverse solve.
  """

  scores: jax.Array
  s: PyTree
  val_grad: PyTree
  info: SolveInfo


def curvature_matvec(train_loss: PerExampleLoss, params: PyTree, curvature: str = "ggn") -> Matvec:
  """The curvature of the mean training loss as a linear map, linearised once.

  Args:
    train_loss: the batch loss split at the outputs.
    params: pytree θ.
    curvature: "ggn" (Gauss-Newton, PSD) or "hessian" (exact, may be indefinite).

  Returns:
    ``v -> C v`` with C the curvature of mean_i ℓ_i(θ).
  """
  _checks.check_choice(curvature, "curvature", CURVATURES)
  mean_loss = lambda out: jnp.mean(train_loss.loss_fn(out))
  if curvature == "ggn":
    return make_gnvp(train_loss.outputs_fn, mean_loss, params)
  return make_hvp(lambda p: mean_loss(train_loss.outputs_fn(p)), params)


def inverse_hvp(
  matvec: Matvec,
  b: PyTree,
  *,
  solver: str = "cg",
  damping: float = 0.1,
  maxiter: int = 10,
  tol: float = 1e-6,
  x0: PyTree | None = None,
  lissa_scale: float = 10.0,
  unroll: bool | None = None,
) -> tuple[PyTree, SolveInfo]:
  """Applies (C + λI)⁻¹ to b with the named solver.

  Args:
    matvec: ``v -> C v``.
    b: right-hand side pytree.
    solver: "cg" (warm-started from ``x0``), "lissa" (``maxiter`` steps of the
      Neumann series with ``lissa_scale``) or "identity" (returns b: gradient
      alignment, as in Learning-to-Reweight / TracIn).
    damping, maxiter, tol, x0, unroll: as in ``cg_solve``.
    lissa_scale: the LiSSA scale.

  Returns:
    ``(s, info)``.
  """
  _checks.check_choice(solver, "solver", SOLVERS)
  if solver == "cg":
    return cg_solve(matvec, b, damping=damping, maxiter=maxiter, tol=tol, x0=x0, unroll=unroll)
  if solver == "lissa":
    return lissa(matvec, b, damping=damping, scale=lissa_scale, depth=maxiter, unroll=unroll)
  _checks.check_finite_tree(b, "b")
  zero = jnp.zeros((), jnp.int32)
  return b, SolveInfo(zero, jnp.zeros(()), jnp.zeros((), bool), tree_isfinite(b))


def batch_influence(
  params: PyTree,
  train_loss: PerExampleLoss,
  val_loss_fn: Callable[[PyTree], jax.Array],
  *,
  curvature: str = "ggn",
  solver: str = "cg",
  damping: float = 0.1,
  maxiter: int = 10,
  tol: float = 1e-6,
  x0: PyTree | None = None,
  lissa_scale: float = 10.0,
  unroll: bool | None = None,
) -> Influence:
  """METHOD.md section 1 for one batch: I = -∇ℓ_Bᵀ (C + λI)⁻¹ ∇L_V.

  1. g_V = ∇_θ val_loss_fn(θ);
  2. s = (C + λI)⁻¹ g_V with C the curvature of mean_i ℓ_i on the batch;
  3. I_i = -∇ℓ_i(θ)ᵀ s for all i by one jvp.

  Args:
    params: pytree θ.
    train_loss: per-example training loss split at the outputs.
    val_loss_fn: ``params -> []`` mean validation loss.
    curvature: "ggn" or "hessian".
    solver, damping, maxiter, tol, x0, lissa_scale, unroll: see ``inverse_hvp``.

  Returns:
    ``Influence`` (scores [B], s, val_grad, info).
  """
  _checks.check_choice(curvature, "curvature", CURVATURES)
  _checks.check_choice(solver, "solver", SOLVERS)
  _checks.check_scalar_fn(val_loss_fn, "val_loss_fn", params)
  g_v = jax.grad(val_loss_fn)(params)
  matvec = (
    (lambda v: v) if solver == "identity" else curvature_matvec(train_loss, params, curvature)
  )
  s, info = inverse_hvp(
    matvec,
    g_v,
    solver=solver,
    damping=damping,
    maxiter=maxiter,
    tol=tol,
    x0=x0,
    lissa_scale=lissa_scale,
    unroll=unroll,
  )
  return Influence(scores(lambda p: train_loss(p), params, s), s, g_v, info)


def flatten(tree: PyTree) -> jax.Array:
  """Concatenates a pytree's leaves into one vector (for dense oracles)."""
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def dense_matrix(matvec: Matvec, like: PyTree) -> np.ndarray:
  """Materialises a linear map on pytrees as a dense [P, P] matrix (tests, small P).

  Args:
    matvec: linear map on pytrees like ``like``.
    like: a pytree fixing structure, shapes and dtypes.

  Returns:
    numpy array [P, P] with column j = matvec(e_j).
  """
  flat, unravel = jax.flatten_util.ravel_pytree(like)
  eye = jnp.eye(flat.size, dtype=flat.dtype)
  cols = jax.vmap(lambda e: jax.flatten_util.ravel_pytree(matvec(unravel(e)))[0])(eye)
  return np.asarray(cols).T
