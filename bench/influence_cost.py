"""Cost of the influence primitives relative to one gradient, on a CIFAR-shaped CNN.

Usage (from the repository root):
    .venv/bin/python bench/influence_cost.py            # full run (make bench)
    .venv/bin/python bench/influence_cost.py --quick    # fewer repeats, fewer CG steps

Every function is jitted; each is compiled and run once (warm-up), then timed
``--repeats`` times with ``block_until_ready``; the median is reported. One process,
one batch of 128 random 32x32x3 images, float32. The model is a pure function
(no BatchNorm), so influence sees exactly what the step would.

Measured: grad of the mean CE; ``influence.hvp``; one ``make_gnvp`` product (the
linearisation included); ``cg_solve`` with the Gauss-Newton matvec, k iterations,
``unroll`` True and False, at the default tol and at tol=0 (all k iterations run),
reported per iteration; ``influence.scores`` (one jvp for the whole batch); and the
per-example alternative ``vmap(grad)`` followed by a dot with s.

Writes bench/results/influence_cost.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax import influence, losses

BATCH = 128
NUM_CLASSES = 10
DAMPING = 0.1
TARGETS = {  # ratio name -> (upper bound, where it applies)
  "hvp/grad": (2.0, "all"),
  "cg_iter_unroll/hvp": (1.2, "cpu"),
  "scores/grad": (1.0, "all"),
}


class CifarNet(nn.Module):
  """3 conv layers (16, 32, 64 channels) with 2x2 average pools, then 2 dense layers.

  About 352k parameters, most in the first dense layer; most FLOPs in the convs.
  """

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate((16, 32, 64)):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      if i < 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(80)(x))
    return nn.Dense(NUM_CLASSES)(x)


def build(model):
  """The jitted functions under test, all of (params, vector, x, y)."""
  apply = lambda p, x: model.apply({"params": p}, x)
  per_example = lambda p, x, y: losses.cross_entropy(apply(p, x), y)
  mean_ce = lambda p, x, y: jnp.mean(per_example(p, x, y))

  def gnvp_matvec(p, x, y):
    return influence.make_gnvp(
      lambda q: apply(q, x), lambda z: jnp.mean(losses.cross_entropy(z, y)), p
    )

  def vmap_grad_dot(p, s, x, y):
    single = lambda q, xi, yi: per_example(q, xi[None], yi[None])[0]
    g = jax.vmap(jax.grad(single), in_axes=(None, 0, 0))(p, x, y)
    return -sum(
      jnp.tensordot(gi, si, axes=si.ndim)
      for gi, si in zip(jax.tree.leaves(g), jax.tree.leaves(s), strict=True)
    )

  fns = {
    "grad": jax.jit(lambda p, v, x, y: jax.grad(mean_ce)(p, x, y)),
    "hvp": jax.jit(lambda p, v, x, y: influence.hvp(mean_ce, p, v, x, y)),
    "gnvp": jax.jit(lambda p, v, x, y: gnvp_matvec(p, x, y)(v)),
    "scores": jax.jit(lambda p, s, x, y: influence.scores(per_example, p, s, x, y)),
    "vmapgrad": jax.jit(vmap_grad_dot),
  }

  def cg(k, unroll, tol):
    def run(p, b, x, y):
      return influence.cg_solve(
        gnvp_matvec(p, x, y), b, damping=DAMPING, maxiter=k, tol=tol, unroll=unroll
      )

    return jax.jit(run)

  return fns, cg, per_example


def time_fn(fn, args, repeats):
  """(median ms, compile+first-run s, last output) after one warm-up call."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times), first, out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="3 repeats, 3 CG iterations")
  ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 3)")
  ap.add_argument("--cg-iters", type=int, default=None, help="k for CG (default 5; quick 3)")
  ap.add_argument(
    "--out", default=str(pathlib.Path(__file__).parent / "results" / "influence_cost.json")
  )
  args = ap.parse_args()
  repeats = args.repeats or (3 if args.quick else 5)
  k = args.cg_iters or (3 if args.quick else 5)

  model = CifarNet()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, size=BATCH), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
  fns, cg, _ = build(model)

  ms, first_s, info = {}, {}, {}
  for name in ("grad", "hvp", "gnvp", "scores", "vmapgrad"):
    ms[name], first_s[name], _ = time_fn(fns[name], (params, v, x, y), repeats)
    print(f"  {name:22s} {ms[name]:9.2f} ms  (compile+first {first_s[name]:.1f} s)", flush=True)
  b = fns["grad"](params, v, x, y)  # a realistic right-hand side
  for unroll in (True, False):
    for tol in (1e-6, 0.0):
      name = f"cg{k}_{'unroll' if unroll else 'loop'}_tol{tol:g}"
      ms[name], first_s[name], (_, sinfo) = time_fn(cg(k, unroll, tol), (params, b, x, y), repeats)
      info[name] = {
        "iterations": int(sinfo.iterations),
        "residual": float(sinfo.residual),
        "negative_curvature": bool(sinfo.negative_curvature),
      }
      print(
        f"  {name:22s} {ms[name]:9.2f} ms  (compile+first {first_s[name]:.1f} s, "
        f"{info[name]['iterations']} iterations)",
        flush=True,
      )

  per_iter = {}
  for mode in ("unroll", "loop"):
    for tol in ("1e-06", "0"):
      name = f"cg{k}_{mode}_tol{tol}"
      per_iter[f"cg_iter_{mode}" + ("" if tol == "0" else "_tol1e-6")] = ms[name] / k
  ratios = {
    "hvp/grad": ms["hvp"] / ms["grad"],
    "gnvp/grad": ms["gnvp"] / ms["grad"],
    "scores/grad": ms["scores"] / ms["grad"],
    "scores/vmapgrad": ms["scores"] / ms["vmapgrad"],
    "vmapgrad/grad": ms["vmapgrad"] / ms["grad"],
  }
  for name, t in per_iter.items():
    ratios[f"{name}/hvp"] = t / ms["hvp"]
    ratios[f"{name}/gnvp"] = t / ms["gnvp"]
  backend = jax.default_backend()

  print(
    f"\nkdaif_jax influence cost: {n_params:,} params, batch {BATCH}, float32, "
    f"{backend} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, "
    f"jax {jax.__version__}, median of {repeats}, CG k={k}, damping {DAMPING}"
  )
  rows = dict(ms)
  rows.update({f"{n} (per iteration)": t for n, t in per_iter.items()})
  print(f"{'operation':40s} {'median ms':>10s} {'x grad':>7s}")
  for name, t in rows.items():
    print(f"{name:40s} {t:10.2f} {t / ms['grad']:7.2f}")
  print(f"\n{'ratio':40s} {'value':>10s}  target")
  results_targets = {}
  for name, r in ratios.items():
    target = TARGETS.get(name)
    mark = ""
    if target is not None and (target[1] == "all" or target[1] == backend):
      ok = r <= target[0]
      results_targets[name] = {"target_max": target[0], "met": ok}
      mark = f"<= {target[0]:.1f}  {'ok' if ok else 'MISSED'}"
    print(f"{name:40s} {r:10.2f}  {mark}")

  out = {
    "benchmark": "influence_cost",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "jax_version": jax.__version__,
    "backend": backend,
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "model": "CifarNet (3 conv + 2 dense, no BatchNorm), 32x32x3 input, 10 classes",
    "param_count": n_params,
    "batch": BATCH,
    "dtype": "float32",
    "repeats": repeats,
    "quick": bool(args.quick),
    "cg_iters": k,
    "damping": DAMPING,
    "median_ms": ms,
    "cg_per_iteration_ms": per_iter,
    "compile_and_first_run_s": first_s,
    "cg_info": info,
    "ratios": ratios,
    "targets": results_targets,
  }
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2) + "\n")
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
