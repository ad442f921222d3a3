"""Influence functions over pytrees: curvature products, inverse solves, scores.

Everything here is a pure function of pytrees and composes with ``jax.jit``,
``jax.vmap`` and ``jax.shard_map``. The maths follows Koh & Liang (ICML 2017):

    I_up,loss(z_i, V) = -∇_θ ℓ_i(θ)ᵀ (C + λI)⁻¹ ∇_θ L_V(θ)

with C the Hessian (``hvp``) or the Gauss-Newton matrix (``gnvp``) of the
training loss, the inverse applied by conjugate gradient (``cg_solve``), the
stochastic Neumann series (``lissa``) or not at all (``identity``), and all B
scores of a batch obtained with ONE forward-mode product (``scores``).

The pipeline g_V -> s -> I has one implementation: ``solve_direction`` (g_V
and s, axis-aware for ``jax.shard_map``) and ``scores`` (I), composed by
``batch_influence``. The training steps (supervised and semi-supervised) and
the whole-set scorer all call these, so the dense-oracle tests check the code
that trains. The curvature products live in ``kdaif_jax.curvature`` and the
solvers in ``kdaif_jax.solvers``; both are re-exported here.

Sign convention: I_i < 0 means up-weighting example i lowers the validation
loss (it helps); I_i > 0 means it hurts.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from kdaif_jax import _checks, parallel
from kdaif_jax.curvature import (
  CURVATURES,
  curvature_matvec,
  gnvp,
  hvp,
  make_gnvp,
  make_hvp,
)
from kdaif_jax.solvers import (
  SOLVERS,
  SolveInfo,
  cg_solve,
  default_unroll,
  lissa,
  restarted,
  tree_isfinite,
)

__all__ = [
  "CURVATURES",
  "SOLVERS",
  "Influence",
  "PerExampleLoss",
  "Restricted",
  "SolveInfo",
  "SolverOptions",
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
  "restarted",
  "restrict",
  "scores",
  "solve_direction",
]

PyTree = Any
Matvec = Callable[[PyTree], PyTree]


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

  Raises:
    ValueError: ``params`` not floating point, ``s`` not shaped like
      ``params``, the loss not a [B] vector, or (for concrete, i.e. not traced,
      inputs) NaN or inf in ``params`` or ``s``. Under ``jit`` values are not
      checked: see the README's "Library input checks".
  """
  _checks.check_float_tree(params, "params")
  _checks.check_tree_match(params, s, "s", "params")
  _checks.check_finite_tree(params, "params")
  _checks.check_finite_tree(s, "s")
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


class SolverOptions(NamedTuple):
  """How ``(C + λI)⁻¹`` is applied: the keyword arguments of ``solve_direction``.

  A small hashable record, so a trainer can build it once from its config and
  pass it down (``solve_direction(..., **opts._asdict())``).

  curvature: "ggn" (Gauss-Newton, PSD; default) or "hessian".
  solver: "cg", "lissa" or "identity" (s = g_V: gradient alignment).
  damping: λ ≥ 0.
  maxiter: CG iterations / LiSSA depth.
  tol: CG relative-residual tolerance.
  lissa_scale: the LiSSA scale.
  unroll: unroll the iterations inside ``jit`` (None: by backend, see
    ``default_unroll``).
  """

  curvature: str = "ggn"
  solver: str = "cg"
  damping: float = 0.1
  maxiter: int = 10
  tol: float = 1e-6
  lissa_scale: float = 10.0
  unroll: bool | None = None


def inverse_hvp(
  matvec: Matvec | None,
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
    matvec: ``v -> C v`` (unused, and may be None, for ``identity``).
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
  if solver == "identity":  # the options are unused, but a wrong one is still a mistake
    _checks.check_nonnegative(damping, "damping")
    _checks.check_positive_int(maxiter, "maxiter")
    _checks.check_float_tree(b, "b")
    _checks.check_finite_tree(b, "b")
    zero, finite = jnp.zeros((), jnp.int32), tree_isfinite(b)
    return b, SolveInfo(zero, jnp.zeros(()), jnp.zeros((), bool), finite, ~finite)
  if matvec is None:
    raise ValueError(f"solver={solver!r} needs a curvature matvec, got None")
  if solver == "cg":
    return cg_solve(matvec, b, damping=damping, maxiter=maxiter, tol=tol, x0=x0, unroll=unroll)
  return lissa(matvec, b, damping=damping, scale=lissa_scale, depth=maxiter, unroll=unroll)


def solve_direction(
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
  axis_name: str | None = None,
) -> tuple[PyTree, PyTree, SolveInfo]:
  """Steps 1-2 of docs/method.md §1: g_V = ∇L_V(θ) and s = (C + λI)⁻¹ g_V.

  The one place the inverse-curvature direction is computed: the online steps
  (supervised and semi-supervised) and the whole-set scorer all call it.

  Axis-aware: inside ``jax.shard_map`` pass the mesh axis; each device then
  holds a shard of the training batch (and of the validation batch), and g_V
  and every curvature product are averaged over devices with ``pmean``, so the
  result is that of the global batch. With ``axis_name=None`` it is the plain
  single-device computation.

  Args:
    params: pytree θ (replicated across devices when ``axis_name`` is set).
    train_loss: per-example training loss of the (local) batch, split at the
      outputs; C is the curvature of its mean.
    val_loss_fn: ``params -> []`` mean validation loss of the (local) batch.
    curvature: "ggn" or "hessian".
    solver, damping, maxiter, tol, x0, lissa_scale, unroll: see ``inverse_hvp``.
    axis_name: mesh axis the batch is sharded over, or None.

  Returns:
    ``(s, g_v, info)``: pytrees like ``params`` and the solve's ``SolveInfo``.
  """
  _checks.check_choice(curvature, "curvature", CURVATURES)
  _checks.check_choice(solver, "solver", SOLVERS)
  _checks.check_float_tree(params, "params")
  _checks.check_scalar_fn(val_loss_fn, "val_loss_fn", params)
  local = parallel.device_local(params, axis_name)
  g_v = parallel.pmean(jax.grad(val_loss_fn)(local), axis_name)
  matvec = None
  if solver != "identity":
    local_mv = curvature_matvec(train_loss, local, curvature)
    matvec = lambda v: parallel.pmean(local_mv(parallel.device_local(v, axis_name)), axis_name)
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
  return s, g_v, info


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
  axis_name: str | None = None,
) -> Influence:
  """docs/method.md §1 for one batch: I = -∇ℓ_Bᵀ (C + λI)⁻¹ ∇L_V.

  1. g_V = ∇_θ val_loss_fn(θ);
  2. s = (C + λI)⁻¹ g_V with C the curvature of mean_i ℓ_i on the batch
     (``solve_direction``);
  3. I_i = -∇ℓ_i(θ)ᵀ s for all i by one jvp (``scores``).

  This is the function the training steps run; with ``axis_name`` set (inside
  ``jax.shard_map``) each device gets the scores of its own examples, equal to
  the single-device result on the whole batch.

  Args:
    params: pytree θ.
    train_loss: per-example training loss split at the outputs.
    val_loss_fn: ``params -> []`` mean validation loss.
    curvature: "ggn" or "hessian".
    solver, damping, maxiter, tol, x0, lissa_scale, unroll: see ``inverse_hvp``.
    axis_name: mesh axis the batch is sharded over, or None.

  Returns:
    ``Influence`` (scores [B] (the local shard's under ``shard_map``), s,
    val_grad, info).
  """
  s, g_v, info = solve_direction(
    params,
    train_loss,
    val_loss_fn,
    curvature=curvature,
    solver=solver,
    damping=damping,
    maxiter=maxiter,
    tol=tol,
    x0=x0,
    lissa_scale=lissa_scale,
    unroll=unroll,
    axis_name=axis_name,
  )
  local = lambda tree: parallel.device_local(tree, axis_name)
  return Influence(scores(train_loss, local(params), local(s)), s, g_v, info)


class Restricted(NamedTuple):
  """Influence restricted to a subset of the parameters (``restrict``).

  params: the selected top-level entries of the params dict.
  train_loss: the training loss as a function of them (the rest held fixed).
  val_loss_fn: the validation loss as a function of them.
  """

  params: PyTree
  train_loss: PerExampleLoss
  val_loss_fn: Callable[[PyTree], jax.Array]


def restrict(
  params: dict,
  train_loss: PerExampleLoss,
  val_loss_fn: Callable[[PyTree], jax.Array],
  keys: tuple[str, ...],
) -> Restricted:
  """The influence pipeline's inputs restricted to the params entries ``keys``.

  Influence on a parameter subset θ_S (the rest held fixed): g_V, the curvature
  and the scores all live in θ_S's space, I_i = -∇_S ℓ_iᵀ (C_SS + λI)⁻¹ ∇_S L_V.
  With ``keys`` = every entry, the functions are the originals (same scores).
  Restricted to the classifier head, the curvature is that of a linear model on
  the last hidden features: a solve in a small space, and the network body is
  only run forward.

  Args:
    params: a dict of top-level parameter entries (a Flax params dict).
    train_loss: per-example training loss of the full params.
    val_loss_fn: ``params -> []`` validation loss of the full params.
    keys: the top-level entries to keep.

  Returns:
    ``Restricted``; pass its fields to ``batch_influence`` / ``solve_direction``.

  Raises:
    ValueError: a key that is not in ``params``.
  """
  missing = [k for k in keys if k not in params]
  if missing or not keys:
    raise ValueError(f"keys {list(keys)} must be non-empty entries of params {sorted(params)}")
  merge = lambda sub: {**params, **sub}
  return Restricted(
    {k: params[k] for k in keys},
    PerExampleLoss(lambda sub: train_loss.outputs_fn(merge(sub)), train_loss.loss_fn),
    lambda sub: val_loss_fn(merge(sub)),
  )


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
