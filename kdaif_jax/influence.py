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

import functools
import itertools
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from optax import tree_utils as otu

from kdaif_jax import _checks

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
# Inverse solves
# --------------------------------------------------------------------------


class SolveInfo(NamedTuple):
  """Diagnostics of an inverse solve (all jnp scalars, so jittable).

  iterations: int32, matvec iterations that changed x.
  residual: relative residual ||b - (A + λI) x|| / ||b||.
  negative_curvature: bool, a search direction with pᵀ(A + λI)p ≤ 0 was met
    (CG stopped there; raise the damping or use the Gauss-Newton curvature).
  finite: bool, x is finite.
  """

  iterations: jax.Array
  residual: jax.Array
  negative_curvature: jax.Array
  finite: jax.Array


def default_unroll() -> bool:
  """Whether solvers unroll their fixed iterations by default.

  True on CPU: XLA:CPU runs convolutions inside ``while`` bodies about 20x
  slower than outside them (bench/influence_cost.py measures it); a loop is
  cheaper to compile and as fast on GPU/TPU.
  """
  return jax.default_backend() == "cpu"


def cg_solve(
  matvec: Matvec,
  b: PyTree,
  *,
  damping: float | jax.Array = 0.0,
  maxiter: int = 10,
  tol: float = 1e-6,
  x0: PyTree | None = None,
  unroll: bool | None = None,
) -> tuple[PyTree, SolveInfo]:
  """Solves (A + damping·I) x = b by conjugate gradient on pytrees.

  A must be symmetric; CG converges for A + λI positive definite. When a
  direction of non-positive curvature appears (indefinite Hessian), CG stops
  there, keeps the last iterate and sets ``info.negative_curvature``.

  Args:
    matvec: linear map v -> A v on pytrees like ``b``.
    b: right-hand side pytree.
    damping: λ ≥ 0 added to the diagonal.
    maxiter: maximum number of iterations (≥ 1); each costs one ``matvec``.
    tol: stop when ||r|| ≤ tol·||b|| (relative residual).
    x0: warm start (pytree like ``b``); zeros when None. Started from the
      answer, CG takes 0 iterations.
    unroll: True unrolls the ``maxiter`` iterations in the traced program (fast
      on XLA:CPU; converged iterations are masked out), False uses
      ``lax.while_loop`` (stops early; best on GPU/TPU). None: ``default_unroll()``.

  Returns:
    ``(x, info)``: x a pytree like ``b``; ``info`` a ``SolveInfo``.
  """
  _checks.check_nonnegative(damping, "damping")
  _checks.check_positive_int(maxiter, "maxiter")
  _checks.check_finite_tree(b, "b")
  if x0 is not None:
    _checks.check_tree_match(b, x0, "x0", "b")
  unroll = default_unroll() if unroll is None else unroll
  damped = lambda v: otu.tree_add_scale(matvec(v), damping, v)

  x = otu.tree_zeros_like(b) if x0 is None else x0
  r = b if x0 is None else otu.tree_sub(b, damped(x0))
  bb = otu.tree_vdot(b, b)
  threshold = jnp.square(tol) * bb
  rr = otu.tree_vdot(r, r)
  zero = jnp.zeros((), jnp.int32)
  state = (x, r, r, rr, zero, jnp.zeros((), bool), rr > threshold)

  def body(state):
    x, r, p, rr, it, neg, active = state
    ap = damped(p)
    pap = otu.tree_vdot(p, ap)
    bad = pap <= 0
    step = active & ~bad
    alpha = jnp.where(step, rr / jnp.where(bad, 1.0, pap), 0.0)
    x = otu.tree_add_scale(x, alpha, p)
    r = otu.tree_add_scale(r, -alpha, ap)
    rr_new = jnp.where(step, otu.tree_vdot(r, r), rr)
    beta = jnp.where(step, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
    p = jax.tree.map(lambda ri, pi: jnp.where(step, ri + beta * pi, pi), r, p)
    neg = neg | (active & bad)
    it = it + step.astype(jnp.int32)
    active = step & (rr_new > threshold)
    return x, r, p, rr_new, it, neg, active

  if unroll:
    for _ in range(maxiter):
      state = body(state)
  else:
    cond = lambda s: s[6] & (s[4] < maxiter)
    state = jax.lax.while_loop(cond, body, state)
  x, _, _, rr, it, neg, _ = state
  info = SolveInfo(
    iterations=it,
    residual=jnp.sqrt(rr / jnp.where(bb > 0, bb, 1.0)),
    negative_curvature=neg,
    finite=_tree_isfinite(x),
  )
  return x, info


def lissa(
  matvec: Matvec | Sequence[Matvec],
  b: PyTree,
  *,
  damping: float = 0.0,
  scale: float = 10.0,
  depth: int = 100,
  batches: Iterable[Any] | None = None,
  unroll: bool | None = None,
) -> tuple[PyTree, SolveInfo]:
  """Approximates (A + damping·I)⁻¹ b by the (stochastic) Neumann series, LiSSA.

  Agarwal et al. 2017, as used by Koh & Liang: with M = (A + λI)/scale,

      h_0 = b,   h_j = b + (I - M) h_{j-1},   x = h_depth / scale,

  which tends to (A + λI)⁻¹ b when 0 ≺ M ≺ 2I, i.e. ``scale`` above half the
  largest eigenvalue of A + λI (take ``scale`` ≥ that eigenvalue to be safe).
  With stochastic matvecs (a new batch per step) it is the unbiased LiSSA
  estimator; averaging several calls reduces its variance. ``damping`` means
  the same as in ``cg_solve`` (unlike some LiSSA codes where it is scaled).

  Args:
    matvec: ``v -> A v``; or a sequence of ``depth`` such maps, one per step
      (each over its own batch); or, with ``batches``, ``(v, batch) -> A v``.
    b: right-hand side pytree.
    damping: λ ≥ 0.
    scale: the Neumann scale (> 0).
    depth: number of recursion steps (≥ 1).
    batches: optional iterable; step j calls ``matvec(v, next(batches))``.
    unroll: loop unrolling (see ``cg_solve``); a sequence of matvecs or a
      batch iterator is always unrolled in Python.

  Returns:
    ``(x, info)`` with ``info.iterations == depth`` and the relative residual
    measured with the first matvec.
  """
  _checks.check_nonnegative(damping, "damping")
  _checks.check_positive_int(depth, "depth")
  if not (isinstance(scale, jax.core.Tracer) or float(scale) > 0):
    raise ValueError(f"scale must be > 0, got {scale}")
  _checks.check_finite_tree(b, "b")
  if isinstance(matvec, Sequence):
    if len(matvec) != depth:
      raise ValueError(f"lissa got {len(matvec)} matvecs but depth={depth}; pass one per step")
    steps = list(matvec)
    first = steps[0]
  elif batches is not None:
    batch_list = list(itertools.islice(iter(batches), depth))
    if len(batch_list) < depth:
      raise ValueError(
        f"lissa got {len(batch_list)} batches but depth={depth}; pass at least one batch per step"
      )
    steps = [functools.partial(_call_with_batch, matvec, batch=bt) for bt in batch_list]
    first = steps[0]
  else:
    steps = None
    first = matvec

  def step(h, mv):
    mh = otu.tree_add_scale(mv(h), damping, h)
    return jax.tree.map(lambda bi, hi, mi: bi + hi - mi / scale, b, h, mh)

  h = b
  unroll = default_unroll() if unroll is None else unroll
  if steps is not None:
    for mv in steps:
      h = step(h, mv)
  elif unroll:
    for _ in range(depth):
      h = step(h, first)
  else:
    h = jax.lax.fori_loop(0, depth, lambda _, h: step(h, first), h)
  x = otu.tree_scale(1.0 / scale, h)
  r = otu.tree_sub(b, otu.tree_add_scale(first(x), damping, x))
  bb = otu.tree_vdot(b, b)
  info = SolveInfo(
    iterations=jnp.asarray(depth, jnp.int32),
    residual=jnp.sqrt(otu.tree_vdot(r, r) / jnp.where(bb > 0, bb, 1.0)),
    negative_curvature=jnp.zeros((), bool),
    finite=_tree_isfinite(x),
  )
  return x, info


def _call_with_batch(matvec, v, *, batch):
  return matvec(v, batch)


def _tree_isfinite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


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
  return b, SolveInfo(zero, jnp.zeros(()), jnp.zeros((), bool), _tree_isfinite(b))


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
