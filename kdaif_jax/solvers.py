"""Inverse solves on pytrees: conjugate gradient and LiSSA.

Both solve (A + λI) x = b for a linear map A given as a function on pytrees
(a Hessian- or Gauss-Newton-vector product from ``kdaif_jax.influence``), are
pure and jittable, and report a ``SolveInfo``. Re-exported by
``kdaif_jax.influence``.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from optax import tree_utils as otu

from kdaif_jax import _checks

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

# How s = (C + λI)⁻¹ b is computed ("identity": s = b, the gradient-alignment baseline).
SOLVERS = ("cg", "lissa", "identity")

# Relative slack of lissa's divergence tests: rounding never reaches it, and a
# diverging recursion passes it after a few steps.
_DIVERGENCE_SLACK = 1e-3
_B_HINT = (
  " (the right-hand side; batch_influence/solve_direction pass the validation "
  "gradient of params here, so check params and the validation loss for overflow)"
)


class SolveInfo(NamedTuple):
  """Diagnostics of an inverse solve (all jnp scalars, so jittable).

  iterations: int32, matvec iterations that changed x.
  residual: relative residual ||b - (A + λI) x|| / ||b||; for ``cg_solve``
    CG's recursively updated residual, which tracks the true one up to
    rounding (in float32 it can read 0 where the true value is ~1e-7).
  negative_curvature: bool, a search direction with pᵀ(A + λI)p ≤ 0 was met
    (CG stopped there; raise the damping or use the Gauss-Newton curvature).
  finite: bool, x is finite.
  diverged: bool, the solve blew up and x must not be used. Set when x is not
    finite (every solver), for ``cg_solve`` when its residual is not finite
    (a NaN curvature product) or exceeds 1/√ε of its dtype (x is thousands
    of times worse than x = 0: A + λI singular, e.g. a Gauss-Newton matrix with
    damping 0, and b outside its range), and, for ``lissa``, when the Neumann recursion grew:
    the final iterate's norm exceeds (depth + 1)·||b|| (a bound every
    convergent recursion obeys), or, with a single matvec, the relative
    residual exceeds 1 (x is worse than x = 0). Both mean ``scale`` is below
    half the largest eigenvalue of A + λI (or A is indefinite): raise
    ``scale``. Defaults to False, so four positional fields still build a
    ``SolveInfo``.
  """

  iterations: jax.Array
  residual: jax.Array
  negative_curvature: jax.Array
  finite: jax.Array
  diverged: jax.Array = np.bool_(False)


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
  there, keeps the last iterate and sets ``info.negative_curvature``. With
  damping 0 and a singular A (a batch's Gauss-Newton matrix has rank at most
  B·K, usually below the parameter count) the system has no solution for b
  outside A's range and x grows without bound: use damping > 0.

  Args:
    matvec: linear map v -> A v on pytrees like ``b``.
    b: right-hand side pytree.
    damping: λ ≥ 0 added to the diagonal.
    maxiter: maximum number of iterations (≥ 1); each costs one ``matvec``.
    tol: stop when ||r|| ≤ tol·||b|| (relative residual); a finite number
      ≥ 0 (0 runs all ``maxiter`` iterations unless the residual reaches
      exactly 0).
    x0: warm start (pytree like ``b``); zeros when None. Started from the
      answer, CG takes 0 iterations.
    unroll: True unrolls the ``maxiter`` iterations in the traced program (fast
      on XLA:CPU; converged iterations are masked out), False uses
      ``lax.while_loop`` (stops early; best on GPU/TPU). None: ``default_unroll()``.

  Returns:
    ``(x, info)``: x a pytree like ``b``; ``info`` a ``SolveInfo``
    (``info.diverged`` when x or the residual is not finite, or blew up).

  Raises:
    ValueError: a negative or non-finite ``damping`` or ``tol``, ``maxiter``
      not an integer ≥ 1, ``b`` not floating point or (when concrete) not
      finite, ``x0`` not shaped like ``b`` or (when concrete) not finite.
  """
  _checks.check_nonnegative(damping, "damping")
  _checks.check_nonnegative(tol, "tol")
  _checks.check_positive_int(maxiter, "maxiter")
  _checks.check_float_tree(b, "b")
  _checks.check_finite_tree(b, "b", _B_HINT)
  if x0 is not None:
    _checks.check_tree_match(b, x0, "x0", "b")
    _checks.check_finite_tree(x0, "x0")
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
  finite = tree_isfinite(x)
  residual = jnp.sqrt(rr / jnp.where(bb > 0, bb, 1.0))
  blown_up = residual > 1.0 / np.sqrt(np.finfo(residual.dtype).eps)
  info = SolveInfo(
    iterations=it,
    residual=residual,
    negative_curvature=neg,
    finite=finite,
    # A non-finite residual fails the solve even where x stayed finite: the while
    # loop never runs when the first residual is NaN (x stays x0, seen on a GPU),
    # while the unrolled iterations carry the NaN into x.
    diverged=~finite | ~jnp.isfinite(rr) | blown_up,
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
    ``(x, info)`` with ``info.iterations == depth``, the relative residual
    measured with the first matvec, and ``info.diverged`` set when the
    recursion blew up (too small a ``scale``; see ``SolveInfo``): then x is
    garbage (often huge but finite) and must not be used.

  Raises:
    ValueError: a negative or non-finite ``damping``, ``scale`` not a finite
      number > 0, ``depth`` not an integer ≥ 1, ``b`` not floating point or
      (when concrete) not finite, too few matvecs or batches.
  """
  _checks.check_nonnegative(damping, "damping")
  _checks.check_positive_int(depth, "depth")
  _checks.check_positive(scale, "scale")
  _checks.check_float_tree(b, "b")
  _checks.check_finite_tree(b, "b", _B_HINT)
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
  residual = jnp.sqrt(otu.tree_vdot(r, r) / jnp.where(bb > 0, bb, 1.0))
  finite = tree_isfinite(x)
  # With every step's I − M_j a contraction (0 ⪯ M_j ⪯ 2I, the convergence
  # condition) ||h_j|| ≤ ||b|| + ||h_{j−1}||, so ||h_depth|| ≤ (depth + 1)·||b||;
  # with one M, r = (I − M)^(depth+1) b, so ||r|| ≤ ||b||. Exceeding either
  # (beyond rounding) proves the recursion expanded. An ||h||² that overflows
  # (inf) or is NaN counts as grown.
  grown = otu.tree_vdot(h, h) > jnp.square((1.0 + _DIVERGENCE_SLACK) * (depth + 1)) * bb
  grown = grown | ~jnp.isfinite(otu.tree_vdot(h, h))
  if steps is None:
    grown = grown | ~(residual <= 1.0 + _DIVERGENCE_SLACK)
  info = SolveInfo(
    iterations=jnp.asarray(depth, jnp.int32),
    residual=residual,
    negative_curvature=jnp.zeros((), bool),
    finite=finite,
    diverged=~finite | grown,
  )
  return x, info


def restarted(
  solve_chunk: Callable[[PyTree], tuple[PyTree, SolveInfo]],
  x0: PyTree,
  *,
  chunk_iters: int,
  total_iters: int,
  solver: str = "cg",
) -> tuple[PyTree, SolveInfo]:
  """Runs a compiled chunk of CG iterations again and again, each call warm-started
  from the last iterate, until ``total_iters`` are spent or the solve ends early.

  Host-side (not jittable): the point is to compile ``chunk_iters`` unrolled
  iterations once instead of unrolling ``total_iters`` (minutes of XLA:CPU compile
  time at 50) or running a ``while`` loop (about 20x slower on CPU with
  convolutions; ``default_unroll``). Restarting CG from its iterate discards the
  conjugate directions, so a restarted solve needs a few more iterations than one
  long run to reach the same residual; it converges to the same solution.

  A chunk that did fewer than ``chunk_iters`` iterations stopped by itself (the
  tolerance was reached, or negative curvature was met), so the loop stops there,
  and on a diverged solve (``info.diverged``). ``solve_chunk`` may be ``vmap``ped
  over several right-hand sides: the loop then stops when every one of them
  stopped, or when any one diverged.

  Args:
    solve_chunk: ``x0 -> (x, SolveInfo)``, e.g. a jitted ``solve_direction`` or
      ``cg_solve`` with ``maxiter=chunk_iters``.
    x0: the first iterate (zeros for a cold start).
    chunk_iters: the ``maxiter`` of one call of ``solve_chunk``.
    total_iters: the iteration budget; the number of calls is
      ⌈total_iters / chunk_iters⌉ (at least one).
    solver: the solver ``solve_chunk`` runs, one of ``SOLVERS``. Only CG
      continues from an iterate; LiSSA's recursion and the identity do not, so
      for them ``solve_chunk`` is called once and ``total_iters`` is ignored.

  Returns:
    ``(x, info)``: the last iterate and the last chunk's ``SolveInfo`` with
    ``iterations`` replaced by the total over all calls (per right-hand side
    when vmapped).
  """
  _checks.check_positive_int(chunk_iters, "chunk_iters")
  _checks.check_positive_int(total_iters, "total_iters")
  _checks.check_choice(solver, "solver", SOLVERS)
  calls = -(-total_iters // chunk_iters) if solver == "cg" else 1
  x, done, info = x0, 0, None
  for _ in range(calls):
    x, info = solve_chunk(x)
    iters = np.asarray(info.iterations)
    done = done + iters
    if np.max(iters) < chunk_iters or np.any(np.asarray(info.diverged)):
      break
  return x, info._replace(iterations=jnp.asarray(done))


def _call_with_batch(matvec, v, *, batch):
  return matvec(v, batch)


def tree_isfinite(tree: PyTree) -> jax.Array:
  """Scalar bool: every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
