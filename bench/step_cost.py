"""Cost of the KD-AIF online student step against the plain KD step, CIFAR-shaped.

Usage (from the repository root):
    .venv/bin/python bench/step_cost.py            # both pairs, every setting
    .venv/bin/python bench/step_cost.py --quick    # one pair, fewer settings, 3 repeats

What is timed: the per-device step of ``kdaif_jax.step.make_kd_step`` (the one the
trainer shard_maps), built with ``axis_name=None`` and jitted, on one batch of 128
random uint8 images [128, 32, 32, 3] with 100 classes (CIFAR-100 shapes), a
validation batch of 128, ``prepare`` = normalisation only (no augmentation), the
student optimiser of configs (SGD, Nesterov, weight decay, cosine). Every step is
compiled ahead (``jit(...).lower(...).compile()``, compile time recorded), run once
untimed, then timed ``--repeats`` times with ``block_until_ready``; the median is
reported. The same state is fed to every call (nothing donated), so every call does
the same work (unrolled CG runs all k iterations; converged ones are masked).

Settings (all with the config defaults: GGN curvature, damping 0.1, sigmoid weights,
CG warm-started, unrolled on CPU):
  plain            mechanism none: teacher forward + one student KD update
  online_cgK       mechanism online, refresh step (g_V + K CG iterations + scores +
                   weighted update), K in {1, 3, 5, 10}; K = 5 is the default
  online_stale     mechanism online, ``refresh=False`` (reuses s: scores + update)
  online_identity  solver identity (s = g_V, gradient alignment), refresh step
  teacher_forward  the teacher's forward pass alone (context: part of every step)
Refresh interval R: amortised per-step cost (t_refresh + (R - 1) t_stale) / R,
R in {1, 5, 10}, from online_cg5 and online_stale.

Target (the issue): online step with the default settings (cg_iters 5,
refresh_every 1) <= 3x the plain KD step. Reported as met or missed.

Writes bench/results/step_cost.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import _common  # bench/_common.py (the script's folder is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax import config as config_lib
from kdaif_jax import data, models, optim
from kdaif_jax import step as step_lib

BATCH = 128
VAL_BATCH = 128
NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
TARGET_RATIO = 3.0
DEFAULT_PAIRS = ("wrn_16_2:wrn_40_2", "resnet8x4:resnet32x4")
CG_ITERS = (1, 3, 5, 10)
REFRESH = (1, 5, 10)


def make_cfg(mechanism: str, cg_iters: int = 5, solver: str = "cg"):
  cfg = config_lib.base_config()
  cfg.kdaif.mechanism = mechanism
  cfg.kdaif.cg_iters = cg_iters
  cfg.kdaif.solver = solver
  config_lib.validate(cfg)
  return cfg


def build_inputs(student: models.Model, teacher: models.Model, tx, seed: int = 0):
  """A TrainState and one (batch, val) pair of random CIFAR-shaped data."""
  key = jax.random.key(seed)
  k_s, k_t, k_run, k_s0 = jax.random.split(key, 4)
  sample = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
  s_params, s_ms = student.init(k_s, sample)
  t_params, t_ms = teacher.init(k_t, sample)
  # A non-zero warm start, as after the first step (CG then starts from a residual
  # that is not the right-hand side; the cost is the same either way when unrolled).
  s0 = jax.tree.map(lambda p: 1e-3 * jax.random.normal(k_s0, p.shape, p.dtype), s_params)
  known = dict(
      step=jnp.zeros((), jnp.int32),
      key=jax.random.key_data(k_run),
      student=step_lib.NetState(s_params, s_ms, tx.init(s_params)),
      teacher=step_lib.NetState(t_params, t_ms, ()),
      s=s0,
      example_weights=jnp.ones((BATCH,), jnp.float32),
      last_scores=jnp.zeros((BATCH,), jnp.float32),
      last_weights=jnp.ones((BATCH,), jnp.float32),
      solve_stats=jnp.zeros((3,), jnp.float32),
      ema=s_params,
  )
  # TrainState grows fields as the library evolves; fill the ones it has.
  names = [f.name for f in dataclasses.fields(step_lib.TrainState)]
  missing = [n for n in names if n not in known]
  if missing:
    raise RuntimeError(f"bench/step_cost.py does not know TrainState field(s) {missing}; "
                       "add their initial values to build_inputs")
  state = step_lib.TrainState(**{n: known[n] for n in names})
  rng = np.random.default_rng(seed)
  batch = {
      "images": jnp.asarray(rng.integers(0, 256, (BATCH, *IMAGE_SHAPE)), jnp.uint8),
      "labels": jnp.asarray(rng.integers(0, NUM_CLASSES, BATCH), jnp.int32),
      "noisy": jnp.asarray(rng.random(BATCH) < 0.2),
      "weights": jnp.ones((BATCH,), jnp.float32),
  }
  val = {
      "images": jnp.asarray(rng.integers(0, 256, (VAL_BATCH, *IMAGE_SHAPE)), jnp.uint8),
      "labels": jnp.asarray(rng.integers(0, NUM_CLASSES, VAL_BATCH), jnp.int32),
  }
  return state, batch, val


def prepare(key, images):
  del key  # no augmentation: the step's cost, not the augmentation's
  return data.normalize(images, CIFAR_MEAN, CIFAR_STD)


def _flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None
  except Exception:  # noqa: BLE001 - optional information, backend dependent
    return None


def measure(fn, args, repeats: int, label: str) -> dict:
  """Compile ahead, one untimed run, ``repeats`` timed runs; returns the record."""
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  trace_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  r = _common.time_fn(compiled, args, repeats, warmup=1)
  out = r.pop("out")
  rec = {"median_ms": r["median_ms"], "min_ms": r["min_ms"], "max_ms": r["max_ms"],
         "times_ms": r["times_ms"], "trace_s": round(trace_s, 3), "compile_s": round(compile_s, 3),
         "first_run_s": round(r["first_call_s"], 3), "flops": _flops(compiled)}
  metrics = out[1] if isinstance(out, tuple) and len(out) > 1 else None
  if isinstance(metrics, dict) and "cg_iterations" in metrics:
    rec["cg_iterations"] = float(metrics["cg_iterations"])
    rec["cg_residual"] = float(metrics["cg_residual"])
  print(f"  {label:18s} {rec['median_ms']:10.1f} ms   (compile {compile_s:6.1f} s, "
        f"trace {trace_s:4.1f} s, range {rec['min_ms']:.0f}-{rec['max_ms']:.0f} ms)", flush=True)
  return rec


def run_pair(student_name: str, teacher_name: str, settings: list[str], repeats: int) -> dict:
  student = models.create(student_name, NUM_CLASSES)
  teacher = models.create(teacher_name, NUM_CLASSES)
  base = config_lib.base_config()
  tx = optim.make_optimizer(base.student.optimizer, steps_per_epoch=390, epochs=240)
  state, batch, val = build_inputs(student, teacher, tx)
  counts = {"student": models.param_count(state.student.params),
            "teacher": models.param_count(state.teacher.params)}
  print(f"\n{student_name} ({counts['student']:,} params) <- {teacher_name} "
        f"({counts['teacher']:,} params), batch {BATCH}, val batch {VAL_BATCH}", flush=True)
  res: dict[str, dict] = {}
  args = (state, batch, val)
  for name in settings:
    if name == "teacher_forward":
      x = prepare(None, batch["images"])
      fn = lambda tp, tms, x: teacher.apply(tp, tms, x, False)[0]
      res[name] = measure(fn, (state.teacher.params, state.teacher.model_state, x), repeats, name)
      continue
    if name == "plain":
      cfg, refresh = make_cfg("none"), True
    elif name == "online_stale":
      cfg, refresh = make_cfg("online"), False
    elif name == "online_identity":
      cfg, refresh = make_cfg("online", solver="identity"), True
    elif name.startswith("online_cg"):
      cfg, refresh = make_cfg("online", cg_iters=int(name[len("online_cg"):])), True
    else:
      raise ValueError(f"unknown setting {name!r}")
    fn = step_lib.make_kd_step(student, teacher, tx, None, prepare, cfg, refresh=refresh,
                               axis_name=None)
    res[name] = measure(fn, args, repeats, name)
  return {"student": student_name, "teacher": teacher_name, "param_counts": counts,
          "steps": res}


def summarise(pair: dict) -> dict:
  """Ratios to the plain step and the amortised cost of refresh intervals."""
  steps = pair["steps"]
  plain = steps["plain"]["median_ms"]
  ratios = {n: r["median_ms"] / plain for n, r in steps.items() if n != "plain"}
  amortised = {}
  if "online_cg5" in steps and "online_stale" in steps:
    t_ref, t_stale = steps["online_cg5"]["median_ms"], steps["online_stale"]["median_ms"]
    for r in REFRESH:
      ms = (t_ref + (r - 1) * t_stale) / r
      amortised[f"R{r}"] = {"ms": ms, "ratio": ms / plain}
  default = ratios.get("online_cg5")
  target = {"setting": "online, cg_iters 5, refresh_every 1", "max_ratio": TARGET_RATIO,
            "ratio": default, "met": None if default is None else bool(default <= TARGET_RATIO)}
  return {"ratios_to_plain": ratios, "refresh_interval_amortised": amortised, "target": target}


def print_table(pair: dict, summ: dict) -> None:
  steps = pair["steps"]
  print(f"\n### {pair['student']} <- {pair['teacher']}"
        + (f"  ({pair['note']})" if pair.get("note") else ""))
  print("| step | median ms | x plain | compile s |")
  print("|---|---:|---:|---:|")
  for name, r in steps.items():
    ratio = 1.0 if name == "plain" else summ["ratios_to_plain"][name]
    print(f"| {name} | {r['median_ms']:.1f} | {ratio:.2f} | {r['compile_s']:.1f} |")
  for name, a in summ["refresh_interval_amortised"].items():
    print(f"| online_cg5, refresh every {name[1:]} (amortised) | {a['ms']:.1f} | "
          f"{a['ratio']:.2f} | - |")
  t = summ["target"]
  if t["ratio"] is not None:
    print(f"target: {t['setting']} <= {t['max_ratio']:.1f}x plain KD: measured {t['ratio']:.2f}x"
          f" -> {'MET' if t['met'] else 'MISSED'}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="one pair, settings plain/online_cg5/online_stale, 3 repeats")
  ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; quick 3)")
  ap.add_argument("--pairs", nargs="+", default=None, metavar="STUDENT:TEACHER",
                  help=f"student:teacher pairs (default {' '.join(DEFAULT_PAIRS)})")
  ap.add_argument("--cg-iters", type=int, nargs="+", default=None,
                  help=f"CG iterations to time (default {' '.join(map(str, CG_ITERS))})")
  ap.add_argument("--note", action="append", default=[],
                  help="free-text note stored in the JSON (e.g. why a teacher was swapped)")
  ap.add_argument("--out", default=str(_common.RESULTS_DIR / "step_cost.json"))
  args = ap.parse_args()
  repeats = args.repeats or (3 if args.quick else 5)
  pairs = args.pairs or (DEFAULT_PAIRS[:1] if args.quick else DEFAULT_PAIRS)
  cg_iters = args.cg_iters or ((5,) if args.quick else CG_ITERS)
  if 5 not in cg_iters:
    cg_iters = (*cg_iters, 5)  # the default setting is always measured (the target)
  settings = ["plain", "online_stale"]
  if not args.quick:
    settings += ["online_identity", "teacher_forward"]
  settings += [f"online_cg{k}" for k in sorted(set(cg_iters))]

  env = _common.environment()
  print(f"kdaif_jax step cost: jax {env['jax_version']}, {env['backend']} "
        f"({env['device_kind']}), {env['cpu_count']} CPUs, batch {BATCH}, median of {repeats}",
        flush=True)
  t_start = time.perf_counter()
  results = []
  for spec in pairs:
    student_name, teacher_name = spec.split(":")
    pair = run_pair(student_name, teacher_name, settings, repeats)
    if teacher_name != dict(p.split(":") for p in DEFAULT_PAIRS).get(student_name, teacher_name):
      pair["note"] = (f"teacher {teacher_name} replaces the default teacher of {student_name} "
                      "(see notes)")
    pair.update(summarise(pair))
    results.append(pair)
  total_s = time.perf_counter() - t_start

  for pair in results:
    print_table(pair, pair)
  for note in args.note:
    print(f"note: {note}")
  out = {
      "benchmark": "step_cost",
      **env,
      "quick": bool(args.quick),
      "batch": BATCH,
      "val_batch": VAL_BATCH,
      "num_classes": NUM_CLASSES,
      "image_shape": list(IMAGE_SHAPE),
      "dtype": "float32",
      "repeats": repeats,
      "timing": "jit(...).lower().compile(), 1 untimed run, median of `repeats` timed runs "
                "with block_until_ready; same inputs every call, nothing donated",
      "kdaif": {k: v for k, v in config_lib.base_config().kdaif.to_dict().items()
                if k in ("curvature", "solver", "damping", "cg_iters", "cg_tol", "warm_start",
                         "refresh_every", "unroll", "weights")},
      "settings": settings,
      "refresh_intervals": list(REFRESH),
      "target": {"setting": "online, cg_iters 5, refresh_every 1", "max_ratio": TARGET_RATIO},
      "pairs": results,
      "notes": args.note,
      "bench_wall_s": round(total_s, 1),
  }
  path = _common.write_json(args.out, out)
  print(f"\nwrote {path} ({total_s:.0f} s)")


if __name__ == "__main__":
  main()
