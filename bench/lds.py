"""Linear datamodeling score (LDS) of the influence methods on digits, with noise ceilings.

Usage (from the repository root):
    .venv/bin/python bench/lds.py            # default: m = 50 subsets of 50%
    .venv/bin/python bench/lds.py --quick    # m = 10, 60 test examples, fewer methods

Data: scikit-learn digits (offline), pixels / 16 as [8, 8, 1] images; a seeded
split into 1000 training, 300 test and 497 validation examples. Tasks:
logistic regression, an MLP 64-128-10 and ``cnn_small``; the loss is the mean
cross-entropy + (wd/2)‖θ‖². Retraining protocols (``kdaif_jax.lds`` for the maths):

  full    full-batch Adam, cosine-decayed, from ONE initialisation shared by
          every subset: deterministic, so the noise ceiling is 1;
  seeded  minibatch Adam, each subset with its own initialisation and data-order
          seed (as the model would be retrained in practice); the noise ceiling
          comes from two more retrainings of the same subsets with seeds 1 and 2.

Retraining is one ``jax.vmap`` over the subsets (the CNN on CPU: one subset at a
time, see ``python_loop``); every ground truth (test losses [m, T]) is cached in
bench/results/lds_cache/ by task, protocol, seed and a hash of the settings;
``--tasks``, ``--wd``, ``--full-steps``, ``--iters``, ``--curv-examples``, ``--hessian`` and
``--methods`` run variants (merged into the results file). The attributions are
computed at the model trained on the whole training set by the same protocol
(seed 0), by the library pipeline (``influence.solve_direction`` vmapped over
test examples, then ``influence.scores``); the ``trajectory`` methods average
them over K checkpoints of that model's one training run (``--checkpoints``,
``--first-checkpoint``); times are wall seconds, compiling included.

The ``detect`` part trains each task once on labels with 20% symmetric flips and
ranks the examples by self-influence (``kdaif_jax.self_influence``, exact in the
classifier layer), by training loss, and by validation influence (GN-CG on the
497 clean validation examples), reporting each ranking's AUROC for the flips.
Writes bench/results/lds.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shlex
import sys
import time

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from sklearn.datasets import load_digits

from kdaif_jax import influence, lds, losses, metrics, models, online, trajectory
from kdaif_jax import self_influence as si

K = 10
N_TRAIN, N_TEST = 1000, 300
# name -> model, weight decay, and (lr, steps, batch) of each protocol.
TASKS = {
  "logreg": dict(wd=1e-3, full=(0.1, 500, None), seeded=(0.05, 600, 50)),
  "mlp": dict(wd=1e-3, full=(0.01, 500, None), seeded=(0.01, 600, 50)),
  "cnn_small": dict(wd=5e-4, full=(0.01, 200, None), seeded=(0.01, 400, 50)),
}
DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
# CG iterations (logistic regression's κ ≈ λ_max / wd needs ~100) and test examples
# scored per task (a CNN solve costs a linearisation over 250 examples per test).
ITERS = {"logreg": 100, "mlp": 30, "cnn_small": 20}
# Training examples in the curvature C of a whole-network (not last-layer) solve.
CURV_EXAMPLES = {"logreg": N_TRAIN, "mlp": N_TRAIN, "cnn_small": 250}
TESTS = {"logreg": N_TEST, "mlp": N_TEST, "cnn_small": 100}


class LogReg(nn.Module):
  """Multinomial logistic regression on the flattened pixels (head ``Dense_0``)."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(K)(x.reshape(x.shape[0], -1))


def make_model(name: str):
  """``(init(key) -> params, apply(params, x) -> logits)`` for a task."""
  if name == "logreg":
    module = LogReg()
  else:
    module = models.create(name, K, **({"hidden": 128} if name == "mlp" else {})).module
  init = lambda key: module.init(key, jnp.zeros((1, 8, 8, 1)))["params"]
  return init, lambda p, x: module.apply({"params": p}, x)


def load_data():
  """Seeded train / test / validation split of the 1797 digits, images in [0, 1]."""
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  order = np.random.default_rng(0).permutation(len(x))
  x, y = jnp.asarray(x[order]), jnp.asarray(d.target[order].astype(np.int32))
  a, b = N_TRAIN, N_TRAIN + N_TEST
  return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def sq_norm(p):
  return sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(p))


def make_trainer(
  init, apply, wd: float, lr: float, steps: int, batch: int | None, x, y, loop=False
):
  """``train(idx [k], init_key, data_key, w=None) -> params``: one retraining on ``x[idx]``.

  Both returned trainers take ``keep`` (a static, increasing tuple of step counts in
  1..steps): then they return the parameters after each of those steps, stacked on a
  leading axis [K, ...] (the checkpoints of the one run, for the ``trajectory``
  method; the scan holds every step's parameters until it selects them).

  ``w`` (optional, [N]): per-example weights, the loss Σ w_i ℓ_i / Σ w_i over each
  batch, so that the trained parameters are a differentiable function of them
  (bench/lds_probes.py's unrolled derivative; ``w = 1`` is the plain mean).
  ``loop``: the steps run from Python, each one jitted call, instead of in a
  ``lax.scan`` (XLA:CPU runs convolutions inside loop bodies ~20x slower).
  """
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss(p, xb, yb, wb):
    ce = losses.cross_entropy(apply(p, xb), yb)
    data = jnp.mean(ce) if wb is None else jnp.sum(wb * ce) / jnp.sum(wb)
    return data + 0.5 * wd * sq_norm(p)

  def step(carry, t, idx, data_key, w=None):
    p, st = carry
    k = idx.shape[0]
    if batch is None:
      b = idx
    else:  # a fresh permutation each epoch, from this retraining's own data seed
      perm = jax.random.permutation(jax.random.fold_in(data_key, t // (k // batch)), k)
      b = idx[jax.lax.dynamic_slice(perm, ((t % (k // batch)) * batch,), (batch,))]
    g = jax.grad(loss)(p, x[b], y[b], None if w is None else w[b])
    upd, st = opt.update(g, st, p)
    return (optax.apply_updates(p, upd), st), None

  def check(keep):
    if list(keep) != sorted(set(keep)) or (keep and not 1 <= keep[0] <= keep[-1] <= steps):
      raise ValueError(f"keep: {keep!r}; allowed: increasing step counts in 1..{steps}")

  def train(idx, init_key, data_key, w=None, keep=()):
    check(keep)
    p = init(init_key)

    def body(c, t):
      c = step(c, t, idx, data_key, w)[0]
      return c, (c[0] if keep else None)  # every step's parameters only when asked

    (p, _), path = jax.lax.scan(body, (p, opt.init(p)), jnp.arange(steps))
    return jax.tree.map(lambda a: a[jnp.asarray(keep) - 1], path) if keep else p

  jstep = jax.jit(lambda c, t, idx, dk: step(c, t, idx, dk)[0])

  def train_loop(idx, init_key, data_key, keep=()):
    check(keep)
    carry = (init(init_key), None)
    carry = (carry[0], opt.init(carry[0]))
    kept = []
    for t in range(steps):
      carry = jstep(carry, jnp.asarray(t), idx, data_key)
      if t + 1 in keep:
        kept.append(carry[0])
    return jax.tree.map(lambda *a: jnp.stack(a), *kept) if keep else carry[0]

  return train_loop if loop else jax.jit(train, static_argnames="keep"), train


def python_loop(task: str) -> bool:
  """Whether ``task`` trains from Python, a jitted call per step (``make_trainer``'s
  ``loop``): the CNN on CPU, where vmapped kernels become grouped convolutions (1.6 s
  per step for 50 models against 10.8 ms per model one at a time) and convolutions in
  a ``lax.scan`` body run ~20x slower."""
  return task == "cnn_small" and jax.default_backend() == "cpu"


def schedule(task: str, protocol: str, quick: bool):
  """(learning rate, steps, batch) of one protocol's training (quick: half the steps)."""
  lr, steps, batch = TASKS[task][protocol]
  return lr, max(1, steps // (2 if quick else 1)), batch


def whole_keys(protocol: str, seed: int):
  """(init key, data-order key) of the model trained on the whole training set."""
  base = jax.random.key(seed)
  if protocol == "full":  # the init every subset shares
    return base, base
  return tuple(jax.random.split(jax.random.fold_in(base, 10**6)))


def ground_truth(task, protocol, seed, masks, data, args):
  """Test losses [m, T] of the m retrainings (cached), and the whole-set model."""
  cfg = TASKS[task]
  lr, steps, batch = schedule(task, protocol, args.quick)
  (x, y), (xt, yt), _ = data
  init, apply = make_model(task)
  settings = [task, protocol, seed, cfg["wd"], lr, steps, batch, N_TRAIN, xt.shape[0]]
  tag = hashlib.sha1(json.dumps(settings + [np.asarray(masks).tobytes().hex()]).encode())
  path = (
    _common.RESULTS_DIR / "lds_cache" / f"{task}-{protocol}-seed{seed}-{tag.hexdigest()[:10]}.npz"
  )
  loop = python_loop(task)  # then subset by subset
  train_one, train = make_trainer(init, apply, cfg["wd"], lr, steps, batch, x, y, loop)
  base = jax.random.key(seed)
  # full: one shared init; seeded: subset j's own init and data-order keys.
  shared = protocol == "full"
  whole = train_one(jnp.arange(N_TRAIN), *whole_keys(protocol, seed))
  if path.exists():
    cached = np.load(path)
    return cached["outputs"], whole, float(cached["seconds"])
  m = masks.shape[0]
  idx = lds.subset_indices(masks)
  keys = jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(m))
  dkeys = jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(base, 7), j))(jnp.arange(m))
  axes = (0, None, None) if shared else (0, 0, 0)
  t0 = time.perf_counter()
  ks, dks = (base, base) if shared else (keys, dkeys)
  if loop:
    one = [train_one(idx[j], *((ks, dks) if shared else (ks[j], dks[j]))) for j in range(m)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *one)
  else:
    params = jax.jit(jax.vmap(train, in_axes=axes))(idx, ks, dks)
  outputs = jax.vmap(lambda p: losses.cross_entropy(apply(p, xt), yt))(params)
  outputs = np.asarray(jax.block_until_ready(outputs))
  seconds = time.perf_counter() - t0
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, outputs=outputs, seconds=seconds, settings=json.dumps(settings))
  print(f"  retrained {task}/{protocol}/seed{seed}: {m} models in {seconds:.1f} s", flush=True)
  return outputs, whole, seconds


def seeded_ceiling(task, masks, data, args, nt: int):
  """The seeded protocol's noise ceiling (``lds.noise_ceiling``) over the first nt test
  examples, from the retrainings of the same subsets with seeds 1 and 2 (cached), and
  those retrainings' seconds."""
  ya, _, sa = ground_truth(task, "seeded", 1, masks, data, args)
  yb, _, sb = ground_truth(task, "seeded", 2, masks, data, args)
  return lds.noise_ceiling(jnp.asarray(ya[:, :nt]), jnp.asarray(yb[:, :nt])), sa + sb


def power_max_eig(matvec, like, iters=20):
  """Largest eigenvalue of a PSD map by power iteration (LiSSA's scale)."""
  v, lam = jax.tree.map(lambda a: jnp.ones_like(a) / np.sqrt(a.size), like), 0.0
  for _ in range(iters):  # ‖C v‖ with ‖v‖ = 1 tends to λ_max
    w = matvec(v)
    lam = float(jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(w))))
    v = jax.tree.map(lambda a: a / lam, w)
  return lam


def influence_scores(task, params, data, method, args, apply=None):
  """Scores I [N, T] of one method (the library pipeline) and the seconds it took.

  Scope "blocks": the curvature's layer-diagonal blocks (the structure K-FAC and
  EK-FAC approximate, here exact): one solve per top-level params entry, the
  entries' scores summed. "leaves": the same with one block per parameter array
  (a layer's kernel and bias apart).
  """
  scope = method[0]
  if scope == "leaves":  # the params as a flat dict, so that each array is an entry
    flat = traverse_util.flatten_dict(params, sep="/")
    nested = make_model(task)[1]
    unflat = lambda fp, x: nested(traverse_util.unflatten_dict(fp, sep="/"), x)
    return influence_scores(task, flat, data, ("blocks", *method[1:]), args, unflat)
  if scope == "blocks":
    parts = [influence_scores(task, params, data, ((k,), *method[1:]), args, apply) for k in params]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)
  (x, y), (xt, yt), _ = data
  apply = apply or make_model(task)[1]
  scope, curvature, solver, damping, iters = method
  # The CNN's curvature on a sample of the training set, as the whole-set scorer does.
  ncurv = CURV_EXAMPLES[task] if scope != "head" else N_TRAIN
  curv = influence.PerExampleLoss(
    lambda p: apply(p, x[:ncurv]), lambda o: losses.cross_entropy(o, y[:ncurv])
  )
  full = influence.PerExampleLoss(lambda p: apply(p, x), lambda o: losses.cross_entropy(o, y))
  if isinstance(scope, tuple):  # one block of "blocks"
    sub = {k: params[k] for k in scope}
    restrict = lambda _, p, loss, val: influence.restrict(p, loss, val, scope)
  else:
    sub, restrict = online.scope_params(scope, params), online.scope_restrict
  t0 = time.perf_counter()
  scale = 1.0
  if solver == "lissa":
    sc = restrict(scope, params, curv, None)
    mv = influence.curvature_matvec(sc.train_loss, sc.params, curvature)
    scale = 1.1 * power_max_eig(mv, sub) + damping  # LiSSA needs scale > λ_max / 2
  chunk_iters = iters if solver == "lissa" else min(iters, 10)

  # params enter as arguments: the library checks only concrete values, not traced ones.
  def solve_one(params, s0, xi, yi):
    val = lambda p: jnp.mean(losses.cross_entropy(apply(p, xi[None]), yi[None]))
    sc = restrict(scope, params, curv, val)
    s, _, info = influence.solve_direction(
      sc.params, sc.train_loss, sc.val_loss_fn, curvature=curvature, solver=solver,
      damping=damping, maxiter=chunk_iters, tol=1e-8, x0=s0, lissa_scale=scale,
      unroll=False if solver == "lissa" else None,  # 100 unrolled LiSSA steps: minutes of compile
    )  # fmt: skip
    return s, info

  def score_one(params, s):
    sc = restrict(scope, params, full, None)
    return influence.scores(sc.train_loss, sc.params, s)

  solve = jax.jit(jax.vmap(solve_one, in_axes=(None, 0, 0, 0)))
  score = jax.jit(jax.vmap(score_one, in_axes=(None, 0)))
  tchunk = 20 if task == "cnn_small" else xt.shape[0]
  out = []
  for a in range(0, xt.shape[0], tchunk):
    n = min(tchunk, xt.shape[0] - a)
    s0 = jax.tree.map(lambda q: jnp.zeros((n, *q.shape), q.dtype), sub)
    s, _ = influence.restarted(  # as kdaif_jax.scoring: one compiled chunk, warm-started
      lambda x0: solve(params, x0, xt[a : a + n], yt[a : a + n]),
      s0,
      chunk_iters=chunk_iters,
      total_iters=iters,
      solver=solver,
    )
    out.append(np.asarray(score(params, s)))
  return np.concatenate(out).T, time.perf_counter() - t0


# The trajectory methods: K checkpoints of the one run, log-spaced from first·T to T
# (the early steps, where the network moves fastest, sampled densely; the first ~2%
# sit near the random initialisation, whose scores rank poorly: BENCHMARKS.md §5),
# scored by each task's best single-model setting of the sweeps.
# The identity solver at the same checkpoints is TracIn-CP (Pruthi et al. 2020).
TRAJECTORY = (10, trajectory.FIRST)
TRAJECTORY_INNER = {
  "logreg": (("all", "cg", 1e-3), ("all", "identity", 0.0)),
  "mlp": (("all", "cg", 3e-3), ("blocks", "cg", 1e-3), ("all", "identity", 0.0)),
  "cnn_small": (("head", "cg", 1e-3), ("all", "identity", 0.0)),
}


def trajectory_scores(task, protocol, seed, data, method, args):
  """Influence averaged over the checkpoints of the one whole-set training run.

  The whole-set model of ``seed`` is retrained by its protocol (its own keys, as in
  ``ground_truth``) keeping the parameters at ``trajectory.checkpoint_steps``; the
  inner method scores every checkpoint, and ``trajectory.average`` averages the scores
  (early checkpoints' gradients are orders of magnitude larger). Like TracIn's
  checkpoints (Pruthi et al. 2020) with the inverse curvature at each, and in the
  spirit of SOURCE's segments (Bae et al. 2024): one training run, no retraining.
  Returns (scores [N, T], seconds, steps, each checkpoint's scores).
  """
  _, k, first, inner = method
  lr, steps, batch = schedule(task, protocol, args.quick)
  (x, y), _, _ = data
  init, apply = make_model(task)
  loop = python_loop(task)
  train_one = make_trainer(init, apply, TASKS[task]["wd"], lr, steps, batch, x, y, loop)[0]
  keep = trajectory.checkpoint_steps(steps, k, first)
  t0 = time.perf_counter()
  path = train_one(jnp.arange(N_TRAIN), *whole_keys(protocol, seed), keep=keep)
  each = [
    influence_scores(task, jax.tree.map(lambda a, j=j: a[j], path), data, inner, args)[0]
    for j in range(len(keep))
  ]
  mean = trajectory.average(each)  # standardised per test example, then averaged
  return mean, time.perf_counter() - t0, keep, each


def methods_for(
  task,
  quick,
  hessian=False,
  dampings=None,
  array_blocks=False,
  checkpoints=TRAJECTORY,
  head_dampings=None,
):
  """(label, (scope, curvature, solver, damping, iterations)) of the methods compared.

  ``dampings`` replaces the task's GN-CG damping sweep when given, ``head_dampings``
  the last layer's (1e-3, 1e-2). The trajectory
  methods are ("trajectory", K, first, inner method) with ``checkpoints`` = (K, first).
  """
  it = 10 if quick else ITERS[task]
  default = {"logreg": DAMPINGS, "mlp": DAMPINGS[1:], "cnn_small": (1e-3, 1e-2)}[task]
  head_dampings = head_dampings or (1e-3, 1e-2)
  dampings = dampings or default
  out = [(f"GN-CG λ={d:g}, {it} it.", ("all", "ggn", "cg", d, it)) for d in dampings]
  if task == "logreg" or hessian:  # λ = wd = 1e-3: logistic regression's exact Hessian
    hd = (1e-3,) if task == "logreg" else dampings[:2]
    out += [(f"Hessian-CG λ={d:g}, {it} it.", ("all", "hessian", "cg", d, it)) for d in hd]
  if task != "cnn_small" and not quick:
    out.append(("LiSSA λ=1e-2, depth 100", ("all", "ggn", "lissa", 1e-2, 100)))
  out.append(("identity (gradient dot)", ("all", "ggn", "identity", 0.0, 1)))
  if task != "logreg":  # logistic regression is all head
    out += [
      (f"last layer GN-CG λ={d:g}, {it} it.", ("head", "ggn", "cg", d, it)) for d in head_dampings
    ]
  if task != "logreg" and not quick:  # K-FAC's block structure, exact blocks (logreg: one)
    out += [
      (f"layer blocks GN-CG λ={d:g}, {it} it.", ("blocks", "ggn", "cg", d, it)) for d in dampings
    ]
  k, first = checkpoints
  for scope, solver, d in TRAJECTORY_INNER[task]:
    name = {"all": "GN-CG", "head": "last layer GN-CG", "blocks": "layer blocks GN-CG"}[scope]
    name = f"{name} λ={d:g}, {it} it." if solver == "cg" else "identity (TracIn-CP)"
    inner = (scope, "ggn", solver, d, it if solver == "cg" else 1)
    out.append(
      (f"trajectory ({k} checkpoints from {first:g}T) {name}", ("trajectory", k, first, inner))
    )
  if task != "logreg" and array_blocks:  # finer: measured worse (BENCHMARKS.md §5), on request
    out += [
      (f"array blocks GN-CG λ={d:g}, {it} it.", ("leaves", "ggn", "cg", d, it)) for d in dampings
    ]
  return out


def run_lds(task, protocol, data, masks, args) -> dict:
  """LDS of every method for one task and protocol (with the noise ceiling if seeded)."""
  truth, whole, seconds = ground_truth(task, protocol, 0, masks, data, args)
  nt = min(TESTS[task], truth.shape[1])  # the LDS over the first nt test examples
  truth = truth[:, :nt]
  rec = {"retrain_seconds": round(seconds, 1), "num_test": nt, "methods": {}}
  rec["settings"] = {  # variants describe themselves
    **TASKS[task], "cg_iters": ITERS[task], "curvature_examples": CURV_EXAMPLES[task],
    "subsets": int(masks.shape[0]),
  }  # fmt: skip
  if protocol == "seeded":
    nc, secs = seeded_ceiling(task, masks, data, args, nt)
    rec.update(
      reliability=float(nc.mean_reliability),
      noise_ceiling=float(nc.mean_ceiling),
      ceiling_retrain_seconds=round(secs, 1),
    )
  else:
    rec.update(reliability=1.0, noise_ceiling=1.0)  # deterministic retraining
  train, (xt, yt), val = data
  data = (train, (xt[:nt], yt[:nt]), val)
  _, apply = make_model(task)
  rec["whole_model_test_accuracy"] = float(jnp.mean(jnp.argmax(apply(whole, xt), -1) == yt))
  array_blocks = "array blocks" in args.methods
  checkpoints = (args.checkpoints, args.first_checkpoint)
  listed = methods_for(
    task, args.quick, args.hessian, args.dampings, array_blocks, checkpoints, args.head_dampings
  )
  parts = args.methods.split(",") if args.methods else []
  for part in parts:  # matched as written, spaces included (labels hold ", ")
    if not any(part in label for label, _ in listed):
      print(f"  {task}/{protocol}: --methods entry {part!r} matches no method", flush=True)
  for label, method in listed:
    if parts and not any(part in label for part in parts):
      continue
    each = None
    if method[0] == "trajectory":
      scores, secs, steps, each = trajectory_scores(task, protocol, 0, data, method, args)
    else:
      scores, secs = influence_scores(task, whole, data, method, args)
    res = lds.lds(jnp.asarray(scores), masks, jnp.asarray(truth))
    score = float(res.mean)
    boot = lds.bootstrap_subsets(jnp.asarray(scores), masks, jnp.asarray(truth), jax.random.key(0))
    se_subsets = float(jnp.std(boot))
    rec["methods"][label] = {
      "lds": round(score, 4),
      "se_tests": round(float(res.stderr_tests), 4),  # from the T test examples
      "se_subsets": round(se_subsets, 4),  # bootstrap over the m subsets
      "fraction_of_ceiling": round(score / rec["noise_ceiling"], 3),
      "seconds": round(secs, 1),
    }
    if each is not None:  # which checkpoints, and what each alone would have scored
      rec["methods"][label]["checkpoint_steps"] = list(steps)
      rec["methods"][label]["lds_each_checkpoint"] = [
        round(float(lds.lds(jnp.asarray(e), masks, jnp.asarray(truth)).mean), 4) for e in each
      ]
    if args.blocks > 1:  # what m / blocks subsets would have measured, block by block
      rows = np.array_split(np.arange(masks.shape[0]), args.blocks)
      rec["methods"][label]["lds_blocks"] = [
        round(float(lds.lds(jnp.asarray(scores), masks[r], jnp.asarray(truth[r])).mean), 4)
        for r in rows
      ]
    print(
      f"  {task}/{protocol} {label}: LDS {score:.3f} (s.e. {float(res.stderr_tests):.3f} "
      f"tests, {se_subsets:.3f} subsets; {secs:.1f} s)",
      flush=True,
    )
  return rec


def run_detect(task, data, args) -> dict:
  """Flipped-label AUROC of self-influence, training loss and validation influence."""
  (x, y), _, (xv, yv) = data
  rng = np.random.default_rng(5)
  noisy = rng.random(N_TRAIN) < 0.2
  y_noisy = jnp.where(jnp.asarray(noisy), (y + jnp.asarray(rng.integers(1, K, N_TRAIN))) % K, y)
  init, apply = make_model(task)
  lr, steps, batch = TASKS[task]["seeded"]
  loop = python_loop(task)
  train = make_trainer(init, apply, TASKS[task]["wd"], lr, steps, batch, x, y_noisy, loop)[0]
  params = train(jnp.arange(N_TRAIN), jax.random.key(0), jax.random.key(1))
  loss = influence.PerExampleLoss(lambda p: apply(p, x), lambda o: losses.cross_entropy(o, y_noisy))
  val = lambda p: jnp.mean(losses.cross_entropy(apply(p, xv), yv))
  rec = {}

  def put(name, suspicious, secs):
    det = metrics.detection_metrics(-np.asarray(suspicious), noisy)
    rec[name] = {"auroc": round(det["auroc"], 4), "seconds": round(secs, 2)}
    rec[name]["precision_at_k"] = round(det["precision_at_k"], 4)
    print(f"  detect {task} {name}: AUROC {det['auroc']:.3f} ({secs:.1f} s)", flush=True)

  for lam in (1e-3, 1e-2):
    t0 = time.perf_counter()
    sc = online.scope_restrict("head", params, loss, val)
    chol = jax.jit(lambda p: si.damped_cholesky(p, sc.train_loss, damping=lam))(sc.params)
    put(
      f"self-influence (last layer, λ={lam:g})",
      si.self_influence(sc.train_loss, sc.params, chol),
      time.perf_counter() - t0,
    )
  t0 = time.perf_counter()
  put("training loss", loss(params), time.perf_counter() - t0)
  for scope in ("all", "head") if task != "logreg" else ("all",):
    t0 = time.perf_counter()
    sc = online.scope_restrict(scope, params, loss, val)
    res = jax.jit(
      lambda p, sc=sc: (
        influence.batch_influence(p, sc.train_loss, sc.val_loss_fn, damping=1e-2, maxiter=30).scores
      )
    )(sc.params)
    put(f"validation influence ({scope}, GN-CG λ=1e-2)", res, time.perf_counter() - t0)
  rec["num_flipped"] = int(noisy.sum())
  return rec


def merge_record(old: dict | None, new: dict, name: str, out: str) -> dict:
  """``new`` with the methods of an earlier run into the same file kept.

  Runs that differ only in their methods (another damping, another solver) add to
  the record; a run with other settings (iterations, curvature examples, weight
  decay, subsets) replaces it, with a line saying so.
  """
  if old is None:
    return new
  as_read = json.loads(json.dumps(new["settings"]))  # tuples come back from JSON as lists
  same = old.get("settings") == as_read and old.get("num_test") == new["num_test"]
  if not same:
    print(f"  {name}: replacing the record in {out} made with other settings", flush=True)
    return new
  return {**old, **new, "methods": {**old.get("methods", {}), **new["methods"]}}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="m = 10, 60 test examples, short training")
  ap.add_argument("--subsets", type=int, default=None, help="m (default 50; quick 10)")
  ap.add_argument("--tasks", default="logreg,mlp,cnn_small")
  ap.add_argument("--protocols", default="full,seeded")
  ap.add_argument("--no-detect", action="store_true", help="skip the flipped-label part")
  ap.add_argument("--out", default=None, help="default results/lds.json (quick: lds_quick.json)")
  ap.add_argument("--wd", type=float, default=None, help="override every task's weight decay")
  ap.add_argument("--full-steps", type=int, default=None, help="override the full-batch steps")
  ap.add_argument("--iters", type=int, default=None, help="override the CG iterations")
  ap.add_argument(
    "--curv-examples",
    type=int,
    default=None,
    help=f"training examples in C of the CNN's whole-network solves (default 250; max {N_TRAIN})",
  )
  floats = lambda v: tuple(float(x) for x in v.split(","))  # "1e-3,1e-2" -> (0.001, 0.01)
  ap.add_argument(
    "--dampings",
    type=floats,
    default=None,
    help="GN-CG dampings to sweep, comma-separated (default: each task's)",
  )
  ap.add_argument(
    "--head-dampings",
    type=floats,
    default=None,
    help="the last layer's GN-CG dampings, comma-separated (default 1e-3,1e-2)",
  )
  ap.add_argument("--hessian", action="store_true", help="Hessian-CG on every task")
  ap.add_argument(
    "--cnn-full",
    action="store_true",
    help="also the cnn_small full-batch protocol (50 x 200 full-batch CNN steps: ~30 min here)",
  )
  ap.add_argument("--methods", default="", help="only methods whose label contains one of these")
  ap.add_argument(
    "--checkpoints", type=int, default=TRAJECTORY[0], help="K, the trajectory methods' checkpoints"
  )
  ap.add_argument(
    "--first-checkpoint",
    type=float,
    default=TRAJECTORY[1],
    help="the trajectory methods' first checkpoint, a fraction of the steps (then log-spaced)",
  )
  ap.add_argument(
    "--blocks",
    type=int,
    default=1,
    help="also the LDS of each of K disjoint blocks of the m subsets (how m shifts it)",
  )
  args = ap.parse_args()
  if args.methods and not all(part.strip() for part in args.methods.split(",")):
    ap.error(f"--methods: {args.methods!r} has an empty entry (it would match every method)")
  for cfg in TASKS.values():  # variants (the cache is keyed by these settings)
    cfg["wd"] = args.wd or cfg["wd"]
    cfg["full"] = (cfg["full"][0], args.full_steps or cfg["full"][1], None)
  ITERS.update({t: args.iters or i for t, i in ITERS.items()})
  if args.curv_examples is not None:
    if not 1 <= args.curv_examples <= N_TRAIN:
      ap.error(f"--curv-examples must be in 1..{N_TRAIN}, got {args.curv_examples}")
    CURV_EXAMPLES["cnn_small"] = args.curv_examples
  m = args.subsets or (10 if args.quick else 50)
  train, test, val = load_data()
  if args.quick:
    test = (test[0][:60], test[1][:60])
  data = (train, test, val)
  masks = lds.sample_masks(jax.random.key(1234), m, N_TRAIN, 0.5)
  settings = dict(subsets=m, fraction=0.5, num_train=N_TRAIN, num_test=int(test[1].shape[0]))
  settings.update(tasks=TASKS, cg_iters=ITERS, curvature_examples=CURV_EXAMPLES, quick=args.quick)
  payload = {"environment": _common.environment(), "settings": settings, "lds": {}, "detect": {}}
  args.out = args.out or str(_common.RESULTS_DIR / ("lds_quick.json" if args.quick else "lds.json"))
  commands = []
  if pathlib.Path(args.out).exists():  # keep the other tasks' records of an earlier run
    old = json.loads(pathlib.Path(args.out).read_text())
    payload["lds"], payload["detect"] = old.get("lds", {}), old.get("detect", {})
    commands = old.get("commands", [])
  payload["commands"] = [*commands, shlex.join(["python", *sys.argv])]  # each run into the file
  for task in args.tasks.split(","):
    for protocol in args.protocols.split(","):
      if task == "cnn_small" and protocol == "full" and not (args.quick or args.cnn_full):
        continue  # 200 full-batch CNN steps x 50 subsets: see BENCHMARKS.md
      new = run_lds(task, protocol, data, masks, args)
      records = payload["lds"].setdefault(task, {})
      records[protocol] = merge_record(records.get(protocol), new, f"{task}/{protocol}", args.out)
      _common.write_json(args.out, payload)
    if not args.no_detect:
      payload["detect"][task] = run_detect(task, data, args)
      _common.write_json(args.out, payload)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
