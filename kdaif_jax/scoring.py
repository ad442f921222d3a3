"""Whole-training-set influence (the ``static`` and ``periodic`` mechanisms, and
the final per-example record in weights.csv).

One inverse solve s = (C + λI)⁻¹ ∇L_V with C the curvature on a random
sample of training examples and L_V on the validation set (more CG
iterations than the online step), then I_i = −∇ℓ_iᵀ s for every training
example, chunk by chunk, by one jvp per chunk.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax import config as config_lib
from kdaif_jax import influence, losses, parallel
from kdaif_jax.parallel import BATCH, REPLICATED
from kdaif_jax.step import TrainState, device_local


def _per_example(student, stu, teacher, tea, prepare, kd, images, labels):
  x = prepare(None, images)
  t_logits = jax.lax.stop_gradient(teacher.apply(tea.params, tea.model_state, x, False)[0])
  return influence.PerExampleLoss(
    outputs_fn=lambda p: student.apply(p, stu.model_state, x, False)[0],
    loss_fn=lambda out: losses.kd_loss(
      out, t_logits, labels, temperature=kd.temperature, alpha=kd.alpha
    ),
  )


_CG_CHUNK = 10


def make_whole_set_scorer(student, teacher, prepare: Callable, cfg, mesh) -> Callable:
  """Builds ``score(state, arrays, key) -> (scores [N] numpy, SolveInfo)``.

  Args:
    student, teacher: ``models.Model``s.
    prepare: ``(key|None, images_uint8) -> inputs``.
    cfg: run config (kd, kdaif.curvature/solver/damping/whole_set, batch sizes).
    mesh: the 'data' mesh.

  Returns:
    A host function scoring every training example with the state's student.
    ``arrays`` holds device arrays train_images/train_labels/val_images/val_labels.
  """
  k, kd = cfg.kdaif, cfg.kd
  axis = parallel.AXIS

  chunk_iters = min(k.whole_set.cg_iters, _CG_CHUNK)

  def solve(state: TrainState, curv: dict, val: dict, x0):
    stu, tea = state.student, state.teacher
    train_loss = _per_example(
      student, stu, teacher, tea, prepare, kd, curv["images"], curv["labels"]
    )
    xv = prepare(None, val["images"])

    def val_loss(p):
      logits = student.apply(p, stu.model_state, xv, False)[0]
      return jnp.mean(losses.cross_entropy(logits, val["labels"]))

    params = device_local(stu.params, axis)
    g_v = jax.lax.pmean(jax.grad(val_loss)(params), axis)
    if k.solver == "identity":
      return influence.inverse_hvp(lambda v: v, g_v, solver="identity")
    local = influence.curvature_matvec(train_loss, params, k.curvature)
    return influence.inverse_hvp(
      lambda v: jax.lax.pmean(local(device_local(v, axis)), axis),
      g_v,
      solver=k.solver,
      damping=k.damping,
      maxiter=chunk_iters,
      tol=k.cg_tol,
      x0=x0,
      lissa_scale=k.lissa_scale,
      unroll=config_lib.unroll_option(k.unroll),
    )

  def chunk(state: TrainState, s, batch: dict):
    train_loss = _per_example(
      student, state.student, teacher, state.teacher, prepare, kd, batch["images"], batch["labels"]
    )
    return influence.scores(train_loss, state.student.params, s)

  solve_fn = jax.jit(
    parallel.shard_map(
      solve, mesh, (REPLICATED, BATCH, BATCH, REPLICATED), (REPLICATED, REPLICATED)
    )
  )
  chunk_fn = jax.jit(parallel.shard_map(chunk, mesh, (REPLICATED, REPLICATED, BATCH), BATCH))
  ndev = mesh.shape[axis]

  def score(state: TrainState, arrays: dict, key: jax.Array):
    n = arrays["train_labels"].shape[0]
    m = min(k.whole_set.curvature_size, n) // ndev * ndev
    idx = jax.random.choice(key, n, (m,), replace=False)
    curv = {"images": arrays["train_images"][idx], "labels": arrays["train_labels"][idx]}
    nv = arrays["val_labels"].shape[0] // ndev * ndev
    val = {"images": arrays["val_images"][:nv], "labels": arrays["val_labels"][:nv]}
    # Restarted CG: one compiled chunk of iterations, called until the budget is spent,
    # each warm-started from the last. Unrolling 50 iterations would cost minutes of
    # XLA:CPU compile time; a while-loop runs 20x slower there (DESIGN.md).
    s = jax.tree.map(jnp.zeros_like, state.student.params)
    done = 0
    restarts = 1 if k.solver != "cg" else -(-k.whole_set.cg_iters // chunk_iters)
    for _ in range(restarts):
      s, info = solve_fn(state, curv, val, s)
      done += int(info.iterations)
      if int(info.iterations) < chunk_iters:
        break
    info = info._replace(iterations=jnp.asarray(done))
    out = np.zeros((n,), np.float32)
    size = max(ndev, cfg.eval_batch_size // ndev * ndev)
    for start in range(0, n, size):
      ids = np.arange(start, start + size) % n  # wrap the last chunk; extras are dropped
      batch = {"images": arrays["train_images"][ids], "labels": arrays["train_labels"][ids]}
      vals = np.asarray(chunk_fn(state, s, batch))
      stop = min(start + size, n)
      out[start:stop] = vals[: stop - start]
    return out, jax.device_get(info)

  return score


def detection_metrics(weights: np.ndarray, noisy: np.ndarray) -> dict[str, Any]:
  """How well LOW weights find flipped labels.

  Args:
    weights: [N] per-example weights.
    noisy: [N] bool, label was flipped.

  Returns:
    dict with ``auroc`` (probability a flipped example has a lower weight than a
    clean one; ties count half) and ``precision_at_k`` (share of flipped among
    the k lowest weights, k = number flipped); None when there is no noise
    (precision also None when all weights are equal).
  """
  noisy = np.asarray(noisy, bool)
  weights = np.asarray(weights, np.float64)
  k = int(noisy.sum())
  if k == 0 or k == noisy.size:
    return {"auroc": None, "precision_at_k": None, "num_noisy": k}
  score = -weights  # higher = more suspicious
  order = np.argsort(score, kind="mergesort")
  ranks = np.empty(score.size, np.float64)
  sorted_scores = score[order]
  # Average ranks for ties (Mann-Whitney U).
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = first + (counts - 1) / 2.0 + 1.0
  ranks[order] = np.repeat(avg, counts)
  u = ranks[noisy].sum() - k * (k + 1) / 2.0
  auroc = u / (k * (noisy.size - k))
  if np.all(weights == weights.flat[0]):
    # Constant weights (plain KD): AUROC is 0.5, but "the k lowest" would be arbitrary.
    return {"auroc": float(auroc), "precision_at_k": None, "num_noisy": k}
  lowest = np.argsort(weights, kind="mergesort")[:k]
  return {"auroc": float(auroc), "precision_at_k": float(noisy[lowest].mean()), "num_noisy": k}
