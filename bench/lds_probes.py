"""Probes of the LDS shortfall: unrolled differentiation, ensembles, roughness.

Usage (from the repository root):
    .venv/bin/python bench/lds_probes.py                       # unrolled + ensemble, logreg and MLP
    .venv/bin/python bench/lds_probes.py --probes unrolled --tasks logreg --tests 60

The full-batch protocol of bench/lds.py is deterministic: every subset is
retrained from one shared initialisation by the same 500 full-batch Adam steps.
Its first-order attribution is therefore exactly computable, without the
influence function's assumption that training converged to an optimum:

  unrolled   τ_it = ∂ ℓ_t(θ_T(w)) / ∂ w_i at w = 1, with θ_T(w) the parameters
             after the T training steps on the weighted loss Σ w_i ℓ_i / Σ w_i
             (reverse mode through the whole ``lax.scan``; Hara et al. 2019,
             "Data cleansing for models trained with SGD"; Bae et al. 2024,
             SOURCE). The bench's own trainer with ``w = 1`` is the whole-set
             model bit for bit (checked and recorded).
  ensemble   the influence scores (a bench/lds.py method) at K models, each
             trained on its own random half of the training set by the same
             protocol, standardised per test example and averaged, with and
             without the whole-set model's scores (TRAK's ensembles over
             subsets; Park et al. 2023). Not a single model: K more trainings.
             ``ensemble_seeds``: K models on the whole training set, each
             with its own seeds (TRAK's usual ensemble; under the full
             protocol, its own initialisation).
  datamodel  an additive attribution estimated from retrainings (Ilyas et al.
             2022, "Datamodels"): n more retrainings of random halves by the
             same protocol (seeded: each with its own seeds; full: the shared
             init), and per test example a ridge regression of the retrained
             loss on the subset mask; its coefficients are scores like any
             method's. Its LDS on the m evaluation subsets, as n grows, is a
             lower bound on what a sum-of-scores attribution can reach on the
             task (the noise ceiling counts only the retraining noise, not the
             non-additive part of the response), tight only once it stops
             rising. Ridge's penalty is chosen by 5-fold LDS on the n
             fitting subsets (never on the evaluation subsets). Fitted twice:
             shrunk toward 0, and toward the whole-set influence (the
             reference method, rescaled), whether the retrainings reveal
             additive structure that influence misses.
  roughness  float64 central differences of one test loss along one direction
             of w as ε shrinks, against the forward-mode jvp: whether the
             training's response to its example weights is smooth.

The unrolled derivative and the ensembles are scored against bench/lds.py's LDS
ground truth (bench/results/lds_cache/, m = 50) next to the whole-set model's
influence on the same test examples. Writes bench/results/lds_probes.json (each
run adds its environment and command line to ``runs``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import types

import _common
import jax
import jax.numpy as jnp
import lds as bench  # bench/lds.py: data, models, trainers, ground truths, methods
import numpy as np

from kdaif_jax import lds, losses, trajectory

# The whole-set influence each probe is compared with: the task's best whole-network
# method of bench/lds.py at its default iterations (BENCHMARKS.md §5).
# cnn_small: its best (the last layer), seeded ensembles only (its retraining is a Python
# loop of jitted steps on CPU, as in bench/lds.py; no unrolled or float64 probe).
REFERENCE = {
  "logreg": ("all", "ggn", "cg", 1e-3, 100),
  "mlp": ("all", "ggn", "cg", 3e-3, 30),
  "cnn_small": ("head", "ggn", "cg", 1e-3, 20),
}


def _lds(scores: np.ndarray, masks, truth) -> float:
  return round(float(lds.lds(jnp.asarray(scores), masks, jnp.asarray(truth)).mean), 4)


def _weighted_training(task: str, x, y, dtype=jnp.float32):
  """``(train(w [N]) -> params, apply)``: the full-batch protocol on the weighted loss."""
  cfg = bench.TASKS[task]
  lr, steps, _ = cfg["full"]
  init, apply = bench.make_model(task)
  cast = lambda key: jax.tree.map(lambda a: a.astype(dtype), init(key))
  train = bench.make_trainer(cast, apply, cfg["wd"], lr, steps, None, x.astype(dtype), y)[1]
  keys = bench.whole_keys("full", 0)  # the protocol's shared init
  return (lambda w: train(jnp.arange(bench.N_TRAIN), *keys, w)), apply


def unrolled(task: str, data, masks, truth, whole, nt: int, chunk: int) -> dict:
  """LDS of the exact derivative of the full-batch training, and its magnitude."""
  (x, y), (xt, yt), _ = data
  train, apply = _weighted_training(task, x, y)
  trained = jax.jit(train)(jnp.ones(bench.N_TRAIN))
  pairs = zip(jax.tree.leaves(trained), jax.tree.leaves(whole))
  same = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)

  def test_losses(w, xs, ys):
    return losses.cross_entropy(apply(train(w), xs), ys)

  jac = jax.jit(jax.jacrev(test_losses))
  t0 = time.perf_counter()
  rows = [
    np.asarray(jac(jnp.ones(bench.N_TRAIN), xt[a : a + chunk], yt[a : a + chunk]))
    for a in range(0, nt, chunk)
  ]
  seconds = time.perf_counter() - t0
  scores = np.concatenate(rows).T  # [N, nt]
  # A check of the reverse pass: central differences along random ±1 directions v of
  # w (a change of one w_i alone is below float32's resolution of the test loss).
  loss0 = jax.jit(lambda w: test_losses(w, xt[:1], yt[:1])[0])
  checks = []
  for j, eps in enumerate((1e-3, 1e-2, 1e-1)):
    v = jax.random.rademacher(jax.random.key(j), (bench.N_TRAIN,), jnp.float32)
    fd = (float(loss0(1 + eps * v)) - float(loss0(1 - eps * v))) / (2 * eps)
    jv = float(scores[:, 0] @ np.asarray(v))
    checks.append({"eps": eps, "reverse": jv, "central_difference": fd})
  rec = {
    "lds": _lds(scores, masks, truth[:, :nt]),
    "seconds": round(seconds, 1),
    "max_abs_derivative": float(np.max(np.abs(scores))),
    "median_abs_derivative": float(np.median(np.abs(scores))),
    "whole_model_max_abs_difference": same,  # w = 1 retrains the whole-set model
    "directional_check": checks,  # J v against (ℓ(1 + εv) − ℓ(1 − εv)) / 2ε
  }
  print(f"  {task} unrolled: LDS {rec['lds']} over {nt} tests ({seconds:.1f} s), "
        f"|∂ℓ/∂w| up to {rec['max_abs_derivative']:.3g}", flush=True)  # fmt: skip
  return rec


def roughness(task: str, data) -> dict:
  """Central differences of one test loss along one ±1 direction of w, in float64.

  A smooth response converges as ε shrinks (and equals the forward-mode jvp); a
  chaotic one (the trajectory's sensitivity exploding over the steps) does not.
  """
  (x, y), (xt, yt), _ = data
  train, apply = _weighted_training(task, x, y, jnp.float64)
  xt = xt.astype(jnp.float64)
  f = jax.jit(lambda w: losses.cross_entropy(apply(train(w), xt[:1]), yt[:1])[0])
  one = jnp.ones(bench.N_TRAIN, jnp.float64)
  v = jax.random.rademacher(jax.random.key(0), (bench.N_TRAIN,), jnp.float64)
  jvp = float(jax.jit(lambda w, v: jax.jvp(f, (w,), (v,))[1])(one, v))
  diffs = {}
  for e in range(1, 8):
    eps = 10.0**-e
    diffs[f"{eps:g}"] = (float(f(one + eps * v)) - float(f(one - eps * v))) / (2 * eps)
  print(f"  {task} roughness: jvp {jvp:.6g}, central differences {diffs}", flush=True)
  return {"jvp": jvp if np.isfinite(jvp) else str(jvp), "central_differences": diffs}


# The ensemble probes -> (their members' name in the record, the record of one member
# alone, the offset of the members' seeds): each member trained on its own random half
# ("ensemble"), or on the whole training set with its own seeds ("ensemble_seeds").
MEMBERS = {
  "ensemble": ("halves", "single_half", 5000),
  "ensemble_seeds": ("seeds", "single_seed", 6000),
}
PROBES = {"unrolled", "roughness", "datamodel", *MEMBERS}
RIDGE = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)  # penalties tried (masks are 0/1)


def _ridge(masks: np.ndarray, outputs: np.ndarray, alpha: float, prior=None) -> np.ndarray:
  """Coefficients [N, T] of the ridge regression of outputs [n, T] on masks [n, N].

  ``prior`` [N, T] (optional): the regression shrinks toward c_t·prior_t instead of 0,
  c_t the least-squares scale of test t's prior predictions (so a large penalty
  returns the prior's ranking, and a small one the data's).
  """
  xc, yc = masks - masks.mean(0), outputs - outputs.mean(0)
  base = 0.0
  if prior is not None:
    pred = xc @ prior
    base = prior * np.sum(pred * yc, 0) / np.maximum(np.sum(pred * pred, 0), 1e-30)
    yc = yc - xc @ base
  gram = xc.T @ xc + alpha * np.eye(masks.shape[1])
  return base + np.linalg.solve(gram, xc.T @ yc)


def _ridge_alpha(masks: np.ndarray, outputs: np.ndarray, prior=None, folds=5) -> tuple[float, dict]:
  """The penalty with the best mean held-out LDS over ``folds`` folds of the fits."""
  parts = np.array_split(np.arange(masks.shape[0]), folds)
  cv = {}
  for alpha in RIDGE + ((1e4, 1e5) if prior is not None else ()):  # large: the prior alone
    held = []
    for part in parts:
      fit = np.setdiff1d(np.arange(masks.shape[0]), part)
      coef = _ridge(masks[fit], outputs[fit], alpha, prior)
      held.append(_lds(coef, jnp.asarray(masks[part]), outputs[part]))
    cv[alpha] = round(float(np.mean(held)), 4)
  return max(cv, key=cv.get), cv


def datamodel(task, protocol, data, masks, truth, prior, n: int, block: int) -> dict:
  """LDS of ridge datamodels fitted on n more retrainings, at n = block, 2·block, ...;
  plain (shrunk toward 0) and shrunk toward the whole-set influence ``prior`` [N, T]."""
  # Block b's masks from its own key: a larger n extends the same draws (and caches).
  draw = lambda b: lds.sample_masks(
    jax.random.fold_in(jax.random.key(4321), b), block, bench.N_TRAIN
  )
  fit_masks = np.concatenate([np.asarray(draw(b)) for b in range(-(-n // block))])
  quiet = types.SimpleNamespace(quick=False)
  rec = {"n": [], "seconds": [], "influence_alone": _lds(prior, masks, truth)}
  outs, t0 = [], 0.0
  for b in range(0, n, block):
    # seeded: seeds 100, 101, ..., keys unlike the evaluation (0) and ceiling (1, 2)
    # retrainings; full: seed 0, the init every evaluation subset shares.
    seed = 0 if protocol == "full" else 100 + b // block
    part = jnp.asarray(fit_masks[b : b + block])
    y, _, secs = bench.ground_truth(task, protocol, seed, part, data, quiet)
    outs.append(y[:, : truth.shape[1]])
    t0 += secs
    y_fit = np.concatenate(outs)
    rec["n"].append(len(y_fit))
    rec["seconds"].append(round(t0, 1))
    for name, p in (("plain", None), ("influence_prior", prior)):
      alpha, cv = _ridge_alpha(fit_masks[: len(y_fit)], y_fit, p)
      coef = _ridge(fit_masks[: len(y_fit)], y_fit, alpha, p)
      rec.setdefault(name, {"lds": [], "alpha": [], "cv_lds": []})
      rec[name]["lds"].append(_lds(coef, masks, truth))
      rec[name]["alpha"].append(alpha)
      rec[name]["cv_lds"].append(cv)
    print(f"  {task}/{protocol} datamodel n={len(y_fit)}: LDS {rec['plain']['lds'][-1]}, "
          f"toward influence {rec['influence_prior']['lds'][-1]} (influence alone "
          f"{rec['influence_alone']}; {t0:.0f} s of retraining)", flush=True)  # fmt: skip
  return rec


def ensemble(task, protocol, data, masks, truth, whole, k: int, method, probe="ensemble") -> dict:
  """LDS of influence averaged over K models (``MEMBERS[probe]``), as K grows."""
  (x, y), _, _ = data
  cfg = bench.TASKS[task]
  lr, steps, batch = cfg[protocol]
  init, apply = bench.make_model(task)
  loop = bench.python_loop(task)
  train_one = bench.make_trainer(init, apply, cfg["wd"], lr, steps, batch, x, y, loop)[0]
  args = types.SimpleNamespace(quick=False)
  name, single, offset = MEMBERS[probe]
  halves = name == "halves"
  if halves:
    subsets = lds.subset_indices(lds.sample_masks(jax.random.key(999), k, bench.N_TRAIN, 0.5))
  else:
    subsets = jnp.tile(jnp.arange(bench.N_TRAIN), (k, 1))
  whole_scores, whole_seconds = bench.influence_scores(task, whole, data, method, args)
  rec = {"whole_model": _lds(whole_scores, masks, truth), "whole_seconds": round(whole_seconds, 1)}
  rec.update(
    {name: [], f"{name}_and_whole": [], "whole_half_weight": [], single: [], "seconds": []}
  )
  base, acc, t0 = jax.random.key(0), [], time.perf_counter()
  for j in range(k):
    # Halves under the full protocol share its one init; every other member has its own
    # init (and, seeded, its own data order).
    if protocol == "full" and halves:
      keys = (base, base)
    else:
      keys = jax.random.split(jax.random.fold_in(base, offset + j))
    scores = bench.influence_scores(task, train_one(subsets[j], *keys), data, method, args)[0]
    acc.append(trajectory.standardised(scores))
    rec[single].append(_lds(scores, masks, truth))
    rec[name].append(_lds(np.mean(acc, 0), masks, truth))
    both = (np.sum(acc, 0) + trajectory.standardised(whole_scores)) / (len(acc) + 1)
    rec[f"{name}_and_whole"].append(_lds(both, masks, truth))  # every model alike
    even = 0.5 * np.mean(acc, 0) + 0.5 * trajectory.standardised(whole_scores)
    rec["whole_half_weight"].append(_lds(even, masks, truth))  # the whole model half the vote
    rec["seconds"].append(round(time.perf_counter() - t0 + whole_seconds, 1))
    print(f"  {task}/{protocol} ensemble of {name} K={j + 1}: {rec[name][-1]}, "
          f"with the whole model {rec[f'{name}_and_whole'][-1]} / {rec['whole_half_weight'][-1]} "
          f"(half the vote) ({rec['seconds'][-1]} s)", flush=True)  # fmt: skip
  return rec


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--probes",
    default="unrolled,ensemble",
    help="comma-separated: unrolled, ensemble (of halves), ensemble_seeds, "
    "datamodel, roughness (alone: float64)",
  )
  ap.add_argument("--tasks", default="logreg,mlp")
  ap.add_argument("--protocols", default="full", help="for the ensemble (unrolled: full only)")
  ap.add_argument("--tests", type=int, default=100, help="test examples for the unrolled probe")
  ap.add_argument("--chunk", type=int, default=20, help="test examples per reverse pass")
  ap.add_argument("--members", type=int, default=10, help="K, each ensemble's models")
  ap.add_argument("--fits", type=int, default=2000, help="n, the datamodel's retrainings")
  ap.add_argument("--fit-block", type=int, default=500, help="datamodel refits every this many")
  ap.add_argument(
    "--subsets", type=int, default=50, help="m (bench/lds.py's masks and cached truths)"
  )
  ap.add_argument("--out", default=str(_common.RESULTS_DIR / "lds_probes.json"))
  args = ap.parse_args()
  probes = set(args.probes.split(","))
  if probes - PROBES:
    ap.error(f"--probes: {sorted(probes - PROBES)} not among {sorted(PROBES)}")
  protocols = args.protocols.split(",")
  if set(protocols) - {"full", "seeded"}:
    ap.error(f"--protocols: {args.protocols!r}; allowed: full, seeded (comma-separated)")
  if "unrolled" in probes and "full" not in protocols:
    ap.error("--probes: unrolled needs --protocols to include full (seeded is not deterministic)")
  if "roughness" in probes:  # float64 throughout: a process of its own
    if probes != {"roughness"}:
      ap.error("--probes: run roughness alone (it switches JAX to float64)")
    jax.config.update("jax_enable_x64", True)
  for task in args.tasks.split(","):
    if task not in REFERENCE:
      ap.error(f"--tasks: {task!r} is not one of {sorted(REFERENCE)}")
    if task == "cnn_small" and probes - set(MEMBERS) - {"datamodel"}:
      ap.error("--tasks: cnn_small takes only the ensemble and datamodel probes")
  data = bench.load_data()
  masks = lds.sample_masks(jax.random.key(1234), args.subsets, bench.N_TRAIN, 0.5)  # lds.py's
  at_m = "" if args.subsets == 50 else f"_m{args.subsets}"  # records at another m apart
  quiet = types.SimpleNamespace(quick=False)
  payload = {"subsets": "50 unless a record's name ends in _mM", "runs": [], "results": {}}
  if pathlib.Path(args.out).exists():  # keep the other probes' records
    old = json.loads(pathlib.Path(args.out).read_text())
    payload["results"], payload["runs"] = old.get("results", {}), old.get("runs", [])
    if "environment" in old:  # the first runs' record (before "runs")
      payload["runs"].append({"environment": old["environment"], "argv": None})
  payload["runs"].append({"environment": _common.environment(), "argv": sys.argv[1:]})
  for task in args.tasks.split(","):
    rec = payload["results"].setdefault(task, {"reference_method": str(REFERENCE[task])})
    if "roughness" in probes:
      rec["roughness_float64"] = roughness(task, data)
      _common.write_json(args.out, payload)
      continue
    for protocol in protocols:
      truth, whole, _ = bench.ground_truth(task, protocol, 0, masks, data, quiet)
      nt = min(bench.TESTS[task], truth.shape[1])  # as bench/lds.py: the CNN's first 100
      truth, tdata = truth[:, :nt], (data[0], (data[1][0][:nt], data[1][1][:nt]), data[2])
      ceiling = None  # bench/lds.py's two ceiling retrainings (cached), for the seeded records
      if protocol == "seeded" and probes & {"datamodel", *MEMBERS}:
        ceiling = float(bench.seeded_ceiling(task, masks, data, quiet, nt)[0].mean_ceiling)
      if "unrolled" in probes and protocol == "full":
        nt = min(args.tests, truth.shape[1])
        sub = (data[0], (data[1][0][:nt], data[1][1][:nt]), data[2])
        ref = bench.influence_scores(task, whole, sub, REFERENCE[task], quiet)[0]
        rec["unrolled" + at_m] = unrolled(task, data, masks, truth, whole, nt, args.chunk)
        rec["unrolled" + at_m]["influence_same_tests"] = _lds(ref, masks, truth[:, :nt])
        rec["unrolled" + at_m]["num_test"] = nt
      if "datamodel" in probes:
        prior = bench.influence_scores(task, whole, tdata, REFERENCE[task], quiet)[0]
        dm = datamodel(task, protocol, data, masks, truth, prior, args.fits, args.fit_block)
        if ceiling is not None:
          dm["noise_ceiling"] = ceiling
        rec[f"datamodel_{protocol}{at_m}"] = dm
        _common.write_json(args.out, payload)
      for probe in sorted(probes & set(MEMBERS)):
        ens = ensemble(
          task, protocol, tdata, masks, truth, whole, args.members, REFERENCE[task], probe
        )
        if ceiling is not None:
          ens["noise_ceiling"] = ceiling
        rec[f"{probe}_{protocol}{at_m}"] = ens
      _common.write_json(args.out, payload)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
