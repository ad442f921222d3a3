"""Our side: kdaif_jax's public influence API on the shared weights and split.

I_i = -∇ℓ_iᵀ (C + λI)⁻¹ ∇L_V for every training example, C the curvature of the
mean training loss over the whole training split (1238 examples), L_V the mean
cross-entropy of the 200 clean validation examples; the README's library recipe
(``influence.batch_influence``: g_V by ``jax.grad``, CG on the Gauss-Newton product
of ``make_gnvp``, the scores by ONE ``jax.jvp``), jitted as one function.
"""

from __future__ import annotations

from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax import influence, losses, models, online


def problem(flat: dict, split: dict) -> dict[str, Any]:
  """The model, params and the loss functions the influence pipeline takes."""
  model = models.create(common.MODEL, common.NUM_CLASSES)
  params = jax.tree.map(jnp.asarray, common.unflatten_params(flat))
  x, y = jnp.asarray(split["x"]), jnp.asarray(split["y"])
  xv, yv = jnp.asarray(split["xv"]), jnp.asarray(split["yv"])
  logits = lambda p, xs: model.apply(p, {}, xs, False)[0]
  train_loss = influence.PerExampleLoss(
    lambda p: logits(p, x), lambda o: losses.cross_entropy(o, y)
  )
  val_loss = lambda p: losses.cross_entropy(logits(p, xv), yv).mean()
  return {"model": model, "params": params, "train_loss": train_loss, "val_loss": val_loss}


def influence_fn(
  prob: dict,
  *,
  scope: str = "all",
  curvature: str = "ggn",
  solver: str = "cg",
  damping: float = 0.1,
  maxiter: int = 20,
  lissa_scale: float = 10.0,
  unroll: bool | None = None,
):
  """A jitted ``params -> (scores [N], SolveInfo)``: the whole pipeline, one call."""

  def run(params):
    sc = online.scope_restrict(scope, params, prob["train_loss"], prob["val_loss"])
    res = influence.batch_influence(
      sc.params,
      sc.train_loss,
      sc.val_loss_fn,
      curvature=curvature,
      solver=solver,
      damping=damping,
      maxiter=maxiter,
      lissa_scale=lissa_scale,
      unroll=unroll,
    )
    return res.scores, res.info

  return jax.jit(run)


def grad_fn(prob: dict):
  """Jitted gradient of the mean training loss over the whole split (the unit of cost)."""
  tl = prob["train_loss"]
  return jax.jit(jax.grad(lambda p: tl(p).mean()))


def info_dict(info) -> dict:
  return {
    "iterations": int(info.iterations),
    "residual": float(info.residual),
    "negative_curvature": bool(info.negative_curvature),
    "diverged": bool(info.diverged),
  }


def timed(fn, params, repeats: int) -> tuple[np.ndarray, Any, dict]:
  """Times ``fn(params)`` (compile included in ``first_s``); returns scores, info, times."""
  t = common.median_time(lambda: jax.block_until_ready(fn(params)), repeats=repeats)
  scores, info = t.pop("out")
  return np.asarray(scores), info, t


def converged_fn(
  prob: dict,
  *,
  scope: str = "all",
  curvature: str = "ggn",
  damping: float = 0.1,
  chunk: int = 20,
  max_chunks: int = 25,
  tol: float = 1e-5,
):
  """``params -> (scores, info, chunks)``: CG restarted from its last iterate
  (``x0``) in chunks of ``chunk`` unrolled iterations until the relative residual
  of (C + λI) s = g_V is below ``tol`` (the reference "converged CG" solution)."""

  @jax.jit
  def solve(params, x0):
    sc = online.scope_restrict(scope, params, prob["train_loss"], prob["val_loss"])
    s, _, info = influence.solve_direction(
      sc.params,
      sc.train_loss,
      sc.val_loss_fn,
      curvature=curvature,
      damping=damping,
      maxiter=chunk,
      tol=tol,
      x0=x0,
    )
    return s, info

  @jax.jit
  def score(params, s):
    sc = online.scope_restrict(scope, params, prob["train_loss"], None)
    return influence.scores(sc.train_loss, sc.params, s)

  def run(params):
    s0 = jax.tree.map(jnp.zeros_like, online.scope_params(scope, params))
    s, info = influence.restarted(
      lambda x0: solve(params, x0), s0, chunk_iters=chunk, total_iters=chunk * max_chunks
    )
    return np.asarray(score(params, s)), info, -(-int(info.iterations) // chunk)

  return run


def logits_np(prob: dict, x: np.ndarray) -> np.ndarray:
  """The model's logits on ``x`` (numpy), for accuracies."""
  model = prob["model"]
  return np.asarray(jax.jit(lambda p, x: model.apply(p, {}, x, False)[0])(prob["params"], x))


def lissa_fn(
  prob: dict,
  *,
  scope: str = "all",
  curvature: str = "hessian",
  damping: float = 0.01,
  scale: float = 25.0,
  depth: int = 200,
):
  """``params -> (scores, SolveInfo)`` by ``influence.lissa`` driven from Python.

  The recursion runs outside ``jit`` (``influence.lissa`` with ``unroll=True`` is a
  Python loop when not traced), each curvature product one call of a jitted
  ``v -> C v``; g_V and the scores are jitted too. The same maths as
  ``batch_influence(solver="lissa")`` under ``jit``, whose 200 unrolled Hessian
  products take XLA:CPU minutes to compile, and whose ``lax.fori_loop`` form runs
  convolutions ~20x slower on CPU (see ``cg_solve``'s ``unroll``).
  """

  def restricted(params):
    return online.scope_restrict(scope, params, prob["train_loss"], prob["val_loss"])

  @jax.jit
  def val_grad(params):
    sc = restricted(params)
    return jax.grad(sc.val_loss_fn)(sc.params)

  @jax.jit
  def matvec(params, v):
    sc = restricted(params)
    return influence.curvature_matvec(sc.train_loss, sc.params, curvature)(v)

  @jax.jit
  def scores(params, s):
    sc = restricted(params)
    return influence.scores(sc.train_loss, sc.params, s)

  def run(params):
    s, info = influence.lissa(
      lambda v: matvec(params, v),
      val_grad(params),
      damping=damping,
      scale=scale,
      depth=depth,
      unroll=True,
    )
    return scores(params, s), info

  return run


def blockdiag_fn(prob: dict, *, damping: float = 0.1, maxiter: int = 20):
  """A jitted ``params -> (scores, SolveInfo)`` with a block-diagonal Gauss-Newton.

  One ``influence.restrict`` scope per layer (each top-level params entry): layer
  L's influence -∇_L ℓ_iᵀ (G_LL + λI)⁻¹ ∇_L L_V by CG in that layer's space, and
  the scores summed over layers, i.e. the curvature without its cross-layer blocks
  (the structure K-FAC / EK-FAC assume, with each block exact here). The info
  holds the total iterations and the largest relative residual over the layers.
  """

  @jax.jit
  def run(params):
    total, infos = 0.0, []
    for key in sorted(params):
      r = influence.restrict(params, prob["train_loss"], prob["val_loss"], (key,))
      res = influence.batch_influence(
        r.params, r.train_loss, r.val_loss_fn, damping=damping, maxiter=maxiter
      )
      total = total + res.scores
      infos.append(res.info)
    stack = lambda name: jnp.stack([getattr(i, name) for i in infos])
    info = influence.SolveInfo(
      iterations=jnp.sum(stack("iterations")),
      residual=jnp.max(stack("residual")),
      negative_curvature=jnp.any(stack("negative_curvature")),
      finite=jnp.all(stack("finite")),
      diverged=jnp.any(stack("diverged")),
    )
    return total, info

  return run
