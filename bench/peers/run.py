"""Peers, side by side: our influence vs torch.func, kronfluence (EK-FAC) and LiSSA.

Usage (from the repository root):
    make bench-peers                                   # installs .venv-peers, runs all
    .venv-peers/bin/python bench/peers/run.py          # all parts
    .venv-peers/bin/python bench/peers/run.py --only speed        # ours vs torch.func
    .venv-peers/bin/python bench/peers/run.py --only profile      # per-layer times
    .venv-peers/bin/python bench/peers/run.py --only variants     # scopes, curvatures, LiSSA
    .venv-peers/bin/python bench/peers/run.py --only kronfluence  # EK-FAC
Options: --noise RATE (default 0.4, configs/digits_noisy.py), --repeats R (timed
rounds, default 5), --no-markdown (JSON only), --out PATH, --render-only (rewrite
the BENCHMARKS.md section from the JSON without running anything).

Needs the `peers` extra (torch==2.13.0, kronfluence==1.0.1) next to the project:
`make bench-peers` builds that environment in .venv-peers (torch first, so the
CPU build is the one kronfluence finds). Not part of `make test`.

One problem for every method: scikit-learn digits (offline) with the data section
of configs/digits_noisy.py (40% symmetric label flips on the 1238 training
examples; a clean class-balanced 200-example validation slice), and ONE cnn_small
trained on the noisy labels by plain Adam (400 steps of 64, ``common.TRAIN``),
saved once as .npz under bench/results/peers_cache/ and loaded by every run (the
torch copy's logits are checked against Flax's first). Influence of every training
example on the mean validation loss, I_i = -∇ℓ_iᵀ (C + λI)⁻¹ ∇L_V, C the curvature
of the MEAN training loss over the whole training split.

* speed: ours (``influence.batch_influence``: Gauss-Newton, λ = 0.1, CG 20
  iterations, one jvp for the scores; jitted) against the same computation in
  torch.func (``torch_side.TorchFuncInfluence``, in two forms of the J v product:
  a ``jvp`` per product, or ``torch.func.linearize`` once), and one gradient of the
  mean training loss in each framework. The timed calls are interleaved round by
  round, so a change of load on the shared machine hits both sides alike; medians
  of ``--repeats`` rounds after one untimed call (whose time, compilation included
  for JAX, is reported as ``first``). Cost of one CG iteration =
  (T(CG 20) - T(CG 1)) / 19, in gradients of the same framework.
* profile: where the time goes, each layer's forward and forward + backward in
  both frameworks (``layer_profile``).
* variants: our other scopes (the classifier layer, ``online.scope_restrict``),
  curvatures (Hessian), dampings, per-layer scopes summed (a block-diagonal
  Gauss-Newton), gradient alignment (no curvature), the authors'
  solver (LiSSA, damping 0.01, scale 25, depth 200, as their code's
  h <- v + (1 - 0.01) h - H h / 25, i.e. our λ = 0.25, and with our λ = 0.01;
  ``influence.lissa`` driven from Python, one jitted product per step, since 200
  unrolled Hessian products take XLA:CPU minutes to compile) and the training
  loss alone.
* kronfluence: EK-FAC factors fitted once on the training split, then the
  validation-set scores at λ = 0.1 (ours) and at kronfluence's default damping
  (1e-8) and heuristic (0.1 x mean eigenvalue), with the summed query gradient
  (one preconditioned vector, as ours) and with its default per-query pairwise
  scores ([200, N], summed afterwards).

Every method is reported with its wall time, its Spearman correlation with our
converged CG solution (all parameters, Gauss-Newton, λ = 0.1, restarted CG to a
relative residual of 1e-5), and the AUROC of ranking the flipped labels by its
influence (high = harmful; the training loss: high = flipped).

Writes bench/results/peers.json (merged with the parts already there) and the
"Peers, side by side" section at the end of BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import common
import jax
import numpy as np
import ours
import report
import torch
import torch_side

RESULTS = common.BENCH / "results" / "peers.json"
PARTS = ("speed", "profile", "variants", "kronfluence")
LAMBDA, ITERS = 0.1, 20
LISSA = dict(damping=0.01, scale=25.0, depth=200)


def method_record(scores, ref, noisy, seconds=None, **extra) -> dict:
  rec = {
    "auroc": round(common.auroc(scores, noisy), 4),
    "spearman_vs_converged": round(common.spearman(scores, ref), 4),
  }
  if seconds is not None:
    rec["seconds"] = round(float(seconds), 4)
  rec.update(extra)
  return rec


def run_speed(prob, tf, ref, noisy, repeats: int) -> dict:
  """Ours vs torch.func on the same algorithm, interleaved round by round."""
  p = prob["params"]
  f20, f1 = ours.influence_fn(prob, maxiter=ITERS), ours.influence_fn(prob, maxiter=1)
  g = ours.grad_fn(prob)
  fns = {
    "ours_cg20": lambda: jax.block_until_ready(f20(p)),
    "ours_cg1": lambda: jax.block_until_ready(f1(p)),
    "ours_grad": lambda: jax.block_until_ready(g(p)),
    "torch_jvp_cg20": lambda: tf.run(LAMBDA, ITERS, jv="jvp"),
    "torch_jvp_cg1": lambda: tf.run(LAMBDA, 1, jv="jvp"),
    "torch_lin_cg20": lambda: tf.run(LAMBDA, ITERS, jv="linearize"),
    "torch_lin_cg1": lambda: tf.run(LAMBDA, 1, jv="linearize"),
    "torch_grad": tf.grad_train,
  }
  first, out, times = {}, {}, {k: [] for k in fns}
  for k, fn in fns.items():  # the untimed first call (JAX: compilation)
    t0 = time.perf_counter()
    out[k] = fn()
    first[k] = time.perf_counter() - t0
  for r in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
    print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()))
  med = {k: float(np.median(v)) for k, v in times.items()}
  rec = {
    "first_call_s": {k: round(v, 3) for k, v in first.items()},
    "median_s": {k: round(v, 4) for k, v in med.items()},
    "min_s": {k: round(float(np.min(v)), 4) for k, v in times.items()},
    "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
  }
  ours_scores, ours_info = out["ours_cg20"]
  ours_scores = np.asarray(ours_scores)
  for side in ("ours", "torch_jvp", "torch_lin"):
    grad_key = "ours_grad" if side == "ours" else "torch_grad"
    per_iter = (med[f"{side}_cg20"] - med[f"{side}_cg1"]) / (ITERS - 1)
    rec[side] = {
      "seconds": round(med[f"{side}_cg20"], 4),
      "grad_s": round(med[grad_key], 4),
      "per_iteration_s": round(per_iter, 4),
      "iteration_in_grads": round(per_iter / med[grad_key], 3),
      "total_in_grads": round(med[f"{side}_cg20"] / med[grad_key], 2),
    }
  rec["ours"].update(method_record(ours_scores, ref, noisy), solve=ours.info_dict(ours_info))
  for side in ("torch_jvp", "torch_lin"):
    sc, info = out[f"{side}_cg20"]
    rec[side].update(
      method_record(sc, ref, noisy),
      spearman_vs_ours=round(common.spearman(sc, ours_scores), 6),
      pearson_vs_ours=round(common.pearson(sc, ours_scores), 6),
      max_rel_diff_vs_ours=float(np.abs(sc - ours_scores).max() / np.abs(ours_scores).max()),
      solve=info,
    )
  best = min(("torch_jvp", "torch_lin"), key=lambda s: rec[s]["seconds"])
  rec["torch_best"] = best
  return rec


def run_profile(prob, tf, model) -> dict:
  """Per-layer forward / backward times in both frameworks (``layer_profile``)."""
  import layer_profile

  p = prob["params"]
  fwd, g = jax.jit(prob["train_loss"].outputs_fn), ours.grad_fn(prob)

  def torch_forward():
    with torch.no_grad():
      return model(tf.x)

  whole = {
    "jax_forward": lambda: jax.block_until_ready(fwd(p)),
    "jax_grad": lambda: jax.block_until_ready(g(p)),
    "torch_forward": torch_forward,
    "torch_grad": tf.grad_train,
  }
  rec = layer_profile.run(int(tf.x.shape[0]), whole)
  for k in rec["jax"]:
    print(f"  {k}: JAX {rec['jax'][k]} ms, torch {rec['torch'][k]} ms", flush=True)
  return rec


def timed_variant(fn, p, ref, noisy, repeats: int, **extra) -> dict:
  scores, info, t = ours.timed(fn, p, repeats)
  return method_record(
    scores,
    ref,
    noisy,
    t["median_s"],
    first_call_s=round(t["first_s"], 2),
    solve=ours.info_dict(info),
    **extra,
  )


def run_variants(prob, ref, noisy, repeats: int) -> dict:
  """Our scopes / curvatures / dampings / solvers, and the training loss."""
  p = prob["params"]
  rec = {}
  cases = [
    ("all, GGN, λ=0.3, CG 20", dict(scope="all", curvature="ggn", damping=0.3)),
    ("all, GGN, λ=0.01, CG 20", dict(scope="all", curvature="ggn", damping=0.01)),
    ("all, Hessian, λ=0.1, CG 20", dict(scope="all", curvature="hessian", damping=0.1)),
    ("head, GGN (= Hessian), λ=0.1, CG 20", dict(scope="head", curvature="ggn", damping=0.1)),
    ("head, GGN (= Hessian), λ=0.01, CG 20", dict(scope="head", curvature="ggn", damping=0.01)),
    ("all, gradient alignment (no curvature)", dict(scope="all", solver="identity")),
    ("head, gradient alignment (no curvature)", dict(scope="head", solver="identity")),
  ]
  for name, kw in cases:
    fn = ours.influence_fn(prob, maxiter=ITERS, **kw)
    rec[name] = timed_variant(fn, p, ref, noisy, repeats, options=kw)
    print(f"  {name}: AUROC {rec[name]['auroc']:.4f}, {rec[name]['seconds']:.3f} s", flush=True)
  # Per-layer scopes summed: the block-diagonal Gauss-Newton (EK-FAC's structure).
  for lam in (0.1, 0.01):
    name = f"per layer (block-diagonal GGN), λ={lam:g}, CG 20 per layer"
    fn = ours.blockdiag_fn(prob, damping=lam, maxiter=ITERS)
    rec[name] = timed_variant(fn, p, ref, noisy, repeats, options={"damping": lam})
    print(f"  {name}: AUROC {rec[name]['auroc']:.4f}, {rec[name]['seconds']:.3f} s", flush=True)
  # The authors' LiSSA: damping 0.01, scale 25, depth 200 (Koh & Liang's settings).
  # Their code's recursion is h <- v + (1 - 0.01) h - H h / 25, i.e. our λ = 0.01 x 25.
  lissa_cases = [
    ("Hessian, λ=0.01", "hessian", LISSA["damping"]),
    ("Hessian, λ=0.25 (= 0.01 x 25, their code's damping)", "hessian", 0.25),
    ("GGN, λ=0.01", "ggn", LISSA["damping"]),
  ]
  for label, curv, lam in lissa_cases:
    name = f"LiSSA (authors' settings), {label}, scale 25, depth 200"
    fn = ours.lissa_fn(
      prob, curvature=curv, damping=lam, scale=LISSA["scale"], depth=LISSA["depth"]
    )
    t0 = time.perf_counter()
    scores, info = jax.block_until_ready(fn(p))
    secs = time.perf_counter() - t0
    rec[name] = method_record(
      np.asarray(scores),
      ref,
      noisy,
      secs,
      solve=ours.info_dict(info),
      options=dict(LISSA, curvature=curv, damping=lam),
      timing="one call: a Python loop of 200 jitted products (compilation included)",
    )
    print(f"  {name}: AUROC {rec[name]['auroc']:.4f}, {secs:.1f} s", flush=True)
  tl = prob["train_loss"]
  loss_fn = jax.jit(lambda q: tl(q))
  t = common.median_time(lambda: jax.block_until_ready(loss_fn(p)), repeats=repeats)
  loss = np.asarray(t.pop("out"))
  rec["training loss alone"] = {
    "auroc": round(common.auroc(loss, noisy), 4),
    "spearman_vs_converged": round(common.spearman(loss, ref), 4),
    "seconds": round(t["median_s"], 4),
  }
  return rec


def run_kronfluence(flat, split, ref, noisy) -> dict:
  """EK-FAC fitted once, then scored with four settings (see ``kron_side.run``)."""
  import kron_side

  labels = {0.1: "λ=0.1", 1e-8: "λ=1e-8 (its default)", None: "λ=heuristic (0.1 x mean eigenvalue)"}
  settings = ((0.1, True), (1e-8, True), (None, True), (1e-8, False))
  t0 = time.perf_counter()
  res = kron_side.run(flat, split, settings=settings, batch_size=256)
  rec = {"factors_s": round(res["factors_s"], 2), "wall_s": round(time.perf_counter() - t0, 2)}
  methods = {}
  for (damping, agg), v in res["scores"].items():
    query = "summed query gradient" if agg else "pairwise [200, N], summed"
    methods[f"EK-FAC, {labels[damping]}, {query}"] = method_record(
      v["influence"],
      ref,
      noisy,
      res["factors_s"] + v["scores_s"],
      factors_s=round(res["factors_s"], 2),
      scores_s=round(v["scores_s"], 2),
      settings={"damping_factor": damping, "aggregate_query_gradients": agg},
    )
    print(f"  {list(methods)[-1]}: AUROC {methods[list(methods)[-1]]['auroc']:.4f}", flush=True)
  rec["methods"] = methods
  return rec


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
  ap.add_argument("--noise", type=float, default=0.4)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=str(RESULTS))
  ap.add_argument("--no-markdown", action="store_true")
  ap.add_argument(
    "--render-only", action="store_true", help="rewrite BENCHMARKS.md from the JSON, run nothing"
  )
  args = ap.parse_args()
  if args.render_only:
    payload = json.load(open(args.out))
    payload["goals"] = report.goals(payload)
    common.bench_common.write_json(args.out, payload)
    report.write_markdown(payload, common.ROOT / "BENCHMARKS.md")
    print(json.dumps(payload["goals"], indent=2, ensure_ascii=False))
    return
  parts = [s.strip() for s in args.only.split(",") if s.strip()]
  bad = sorted(set(parts) - set(PARTS))
  if bad:
    ap.error(f"--only: unknown part(s) {bad}; allowed: {', '.join(PARTS)}")
  warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
  warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
  torch.set_num_threads(os.cpu_count() or 1)

  import kronfluence

  versions = {
    "torch_version": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "kronfluence_version": getattr(kronfluence, "__version__", None),
  }
  split = common.load_split(args.noise, args.seed)
  flat, train_info = common.train_weights(split, args.noise, args.seed)
  prob = ours.problem(flat, split)
  model = torch_side.load_flax(torch_side.TorchCNN(), flat)
  tf = torch_side.TorchFuncInfluence(model, split)

  # The same network on both sides: logits on the training split.
  lj = np.asarray(jax.jit(prob["train_loss"].outputs_fn)(prob["params"]))
  with torch.no_grad():
    lt = model(torch_side.nchw(split["x"])).numpy()
  logit_diff = float(np.abs(lj - lt).max())
  if logit_diff > 1e-4:
    raise SystemExit(f"torch and Flax logits differ by {logit_diff:.3g}: the weight copy is wrong")
  acc = lambda xs, ys: float((np.argmax(ours.logits_np(prob, xs), -1) == ys).mean())
  setup = {
    "data": "digits, configs/digits_noisy.py data section",
    "noise_rate": args.noise,
    "num_train": int(len(split["x"])),
    "num_flipped": int(split["noisy"].sum()),
    "num_val": int(len(split["xv"])),
    "model": common.MODEL,
    "num_params": int(sum(v.size for v in flat.values())),
    "training": dict(common.TRAIN, **train_info),
    "train_acc_noisy_labels": acc(split["x"], split["y"]),
    "val_acc": acc(split["xv"], split["yv"]),
    "test_acc": acc(split["xt"], split["yt"]),
    "max_abs_logit_diff_torch_vs_flax": logit_diff,
  }
  print("setup:", json.dumps(setup), flush=True)

  t0 = time.perf_counter()
  ref, ref_info, chunks = ours.converged_fn(prob, damping=LAMBDA)(prob["params"])
  reference = {
    "method": "ours, all parameters, GGN, λ=0.1, CG restarted in chunks of 20 to residual 1e-5",
    "chunks": chunks,
    "solve": ours.info_dict(ref_info),
    "auroc": round(common.auroc(ref, split["noisy"]), 4),
    "seconds_incl_compile": round(time.perf_counter() - t0, 2),
  }
  print("reference:", json.dumps(reference), flush=True)
  noisy = split["noisy"]

  out = os.path.abspath(args.out)
  payload = json.load(open(out)) if os.path.exists(out) else {}
  payload.update(setup=setup, reference=reference)
  payload.setdefault("environment", {})
  payload["commands"] = {
    "all": "make bench-peers",
    **{p: f".venv-peers/bin/python bench/peers/run.py --only {p}" for p in PARTS},
  }
  runners = {
    "speed": lambda: run_speed(prob, tf, ref, noisy, args.repeats),
    "profile": lambda: run_profile(prob, tf, model),
    "variants": lambda: run_variants(prob, ref, noisy, args.repeats),
    "kronfluence": lambda: run_kronfluence(flat, split, ref, noisy),
  }
  for part in PARTS:
    if part not in parts:
      continue
    print(f"{part}:", flush=True)
    stamp = dict(common.bench_common.environment(), **versions)
    payload[part] = runners[part]()
    stamp["load_average_end"] = list(os.getloadavg())
    payload["environment"][part] = stamp
    payload["goals"] = report.goals(payload)
    common.bench_common.write_json(out, payload)  # after every part
  print(json.dumps(payload["goals"], indent=2, ensure_ascii=False))
  if not args.no_markdown:
    report.write_markdown(payload, common.ROOT / "BENCHMARKS.md")
    print("wrote BENCHMARKS.md section 'Peers, side by side'")


if __name__ == "__main__":
  main()
