"""Whole-training-set influence (the ``static`` and ``periodic`` mechanisms, and
the final per-example record in weights.csv).

One inverse solve s = (C + λI)⁻¹ ∇L_V with C the curvature on a random
sample of training examples and L_V on the validation set (more CG
iterations than the online step), then I_i = −∇ℓ_iᵀ s for every training
example, chunk by chunk, by one jvp per chunk.

The returned scorer also carries ``score.self_influence``: the self-influence
I_ii = ∇ℓ_iᵀ (C + λI)⁻¹ ∇ℓ_i of every example, exact in the classifier layer
(``kdaif_jax.self_influence``), for the ``self_influence`` column of weights.csv.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax import influence, objectives, online, parallel
from kdaif_jax import self_influence as self_influence_lib
from kdaif_jax.options import ScorerOptions
from kdaif_jax.parallel import BATCH, REPLICATED
from kdaif_jax.step import TrainState


def _training_loss(
  student, teacher, state: TrainState, prepare, opts: ScorerOptions, images, labels
):
  stu, tea = state.student, state.teacher
  x = prepare(images)
  t_logits = jax.lax.stop_gradient(teacher.apply(tea.params, tea.model_state, x, False)[0])
  return objectives.training_loss(
    student, stu.model_state, x, lambda out: opts.kd(out, t_logits, labels), opts.precision
  )


def make_whole_set_scorer(
  student, teacher, prepare: Callable, opts: ScorerOptions, mesh
) -> Callable:
  """Builds ``score(state, arrays, key) -> (scores [N] numpy, SolveInfo)``.

  Args:
    student, teacher: ``models.Model``s.
    prepare: ``images_uint8 -> inputs``.
    opts: the KD loss, the solver (``maxiter``: one compiled chunk of CG
      iterations), the total iterations, the curvature sample and chunk sizes.
    mesh: the 'data' mesh.

  Returns:
    A host function scoring every training example with the state's student.
    ``arrays`` holds device arrays train_images/train_labels/val_images/val_labels.
    Its attribute ``self_influence`` is ``make_self_influence_scorer``'s function
    for the same inputs.
  """
  axis = parallel.AXIS
  solver = opts.solver

  def solve(state: TrainState, curv: dict, val: dict, x0):
    stu = state.student
    scoped = online.scope_restrict(
      opts.scope,
      stu.params,
      _training_loss(student, teacher, state, prepare, opts, curv["images"], curv["labels"]),
      objectives.validation_loss(
        student, stu.model_state, prepare(val["images"]), val["labels"], opts.precision
      ),
    )
    s, _, info = influence.solve_direction(
      scoped.params,
      scoped.train_loss,
      scoped.val_loss_fn,
      x0=x0,
      axis_name=axis,
      **solver._asdict(),
    )
    return s, info

  def chunk(state: TrainState, s, batch: dict):
    train_loss = _training_loss(
      student, teacher, state, prepare, opts, batch["images"], batch["labels"]
    )
    scoped = online.scope_restrict(opts.scope, state.student.params, train_loss, None)
    return influence.scores(scoped.train_loss, scoped.params, s)

  solve_fn = jax.jit(
    parallel.shard_map(
      solve, mesh, (REPLICATED, BATCH, BATCH, REPLICATED), (REPLICATED, REPLICATED)
    )
  )
  chunk_fn = jax.jit(parallel.shard_map(chunk, mesh, (REPLICATED, REPLICATED, BATCH), BATCH))
  ndev = mesh.shape[axis]

  def score(state: TrainState, arrays: dict, key: jax.Array):
    n = arrays["train_labels"].shape[0]
    m = min(opts.curvature_size, n) // ndev * ndev
    idx = jax.random.choice(key, n, (m,), replace=False)
    curv = {"images": arrays["train_images"][idx], "labels": arrays["train_labels"][idx]}
    nv = arrays["val_labels"].shape[0] // ndev * ndev
    val = {"images": arrays["val_images"][:nv], "labels": arrays["val_labels"][:nv]}
    # Restarted CG: one compiled chunk of iterations, warm-started until the budget is
    # spent (solvers.restarted says why not one long unrolled or looped solve).
    s0 = jax.tree.map(jnp.zeros_like, online.scope_params(opts.scope, state.student.params))
    s, info = influence.restarted(
      lambda x0: solve_fn(state, curv, val, x0),
      s0,
      chunk_iters=solver.maxiter,
      total_iters=opts.total_iters,
      solver=solver.solver,
    )
    out = np.zeros((n,), np.float32)
    size = max(ndev, opts.chunk_size // ndev * ndev)
    for start in range(0, n, size):
      ids = np.arange(start, start + size) % n  # wrap the last chunk; extras are dropped
      batch = {"images": arrays["train_images"][ids], "labels": arrays["train_labels"][ids]}
      vals = parallel.to_host(chunk_fn(state, s, batch))
      stop = min(start + size, n)
      out[start:stop] = vals[: stop - start]
    return out, jax.device_get(info)

  score.self_influence = make_self_influence_scorer(student, teacher, prepare, opts, mesh)
  return score


def make_teacher_scorer(teacher, prepare: Callable, opts: ScorerOptions, mesh) -> Callable:
  """Builds ``score(state, arrays, key) -> (scores [N] numpy, SolveInfo)`` for the teacher.

  The influence of each training example on the TEACHER's validation loss,
  I_i = −∇ℓ_iᵀ (C + λI)⁻¹ ∇L_V, in the teacher's classifier layer (``scope="head"``,
  whatever ``opts.scope``) and on its own training loss, cross-entropy on the
  labels (``opts.kd`` with α = 1). ``make_whole_set_scorer`` on the teacher
  network; the state's student is not used. It starts the online student's
  score memory (``kdaif.memory_init="teacher"``): the teacher, trained on the
  same labels, has already met every example.

  Args:
    teacher: the teacher ``models.Model``.
    prepare, mesh: as in ``make_whole_set_scorer``.
    opts: the whole-set solver, curvature sample and chunk size.

  Returns:
    A host function as ``make_whole_set_scorer``'s, reading ``state.teacher``.
  """
  opts = opts._replace(kd=opts.kd._replace(alpha=1.0), scope="head")
  score = make_whole_set_scorer(teacher, teacher, prepare, opts, mesh)

  def teacher_score(state: TrainState, arrays: dict, key: jax.Array):
    return score(state.replace(student=state.teacher), arrays, key)

  return teacher_score


def make_self_influence_scorer(
  student, teacher, prepare: Callable, opts: ScorerOptions, mesh
) -> Callable:
  """Builds ``self_score(state, arrays, key) -> [N] numpy``: I_ii for every example.

  Always in the classifier layer (``scope="head"``), whatever ``opts.scope``:
  there the dense factor of C + λI is small and the result exact
  (``kdaif_jax.self_influence``); over the whole student it would take P²
  floats. C is the curvature of the training loss on ``opts.curvature_size``
  examples drawn from ``key`` as the whole-set scorer draws its sample (the
  same sample on one device), λ and the curvature kind are ``opts.solver``'s.
  Runs under plain ``jit`` (the sample and the chunks may be
  sharded over ``mesh``; XLA gathers what it needs: the head is small).

  Args:
    student, teacher, prepare, opts, mesh: as in ``make_whole_set_scorer``.

  Returns:
    A host function returning float32 [N] (NaN if the factor does not exist,
    e.g. an indefinite Hessian with too little damping).
  """
  del mesh  # one device program; the inputs keep their shardings
  solver = opts.solver

  @jax.jit
  def factor(state: TrainState, images, labels):
    train_loss = _training_loss(student, teacher, state, prepare, opts, images, labels)
    scoped = online.scope_restrict("head", state.student.params, train_loss, None)
    return self_influence_lib.damped_cholesky(
      scoped.params, scoped.train_loss, curvature=solver.curvature, damping=solver.damping
    )

  @jax.jit
  def chunk(state: TrainState, chol, images, labels):
    train_loss = _training_loss(student, teacher, state, prepare, opts, images, labels)
    scoped = online.scope_restrict("head", state.student.params, train_loss, None)
    return self_influence_lib.self_influence(scoped.train_loss, scoped.params, chol)

  def self_score(state: TrainState, arrays: dict, key: jax.Array):
    n = arrays["train_labels"].shape[0]
    m = min(opts.curvature_size, n)
    idx = jax.random.choice(key, n, (m,), replace=False)
    chol = factor(state, arrays["train_images"][idx], arrays["train_labels"][idx])
    out = np.zeros((n,), np.float32)
    size = max(1, opts.chunk_size)
    for start in range(0, n, size):
      ids = np.arange(start, start + size) % n  # wrap the last chunk: one compiled shape
      vals = parallel.to_host(
        chunk(state, chol, arrays["train_images"][ids], arrays["train_labels"][ids])
      )
      stop = min(start + size, n)
      out[start:stop] = vals[: stop - start]
    return out

  return self_score
