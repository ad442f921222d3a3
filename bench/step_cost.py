"""Cost of the KD-AIF online student step against the plain KD step, CIFAR-shaped.

Usage (from the repository root):
    .venv/bin/python bench/step_cost.py            # both pairs, every setting timed
    .venv/bin/python bench/step_cost.py --quick    # first pair, core settings, 3 repeats
    .venv/bin/python bench/step_cost.py --sweep-pairs first --untimed online_cg10
                                                   # what fits ~30 min on 2 shared cores

What is timed: the per-device step of ``kdaif_jax.step.make_kd_step`` (the one the
trainer shard_maps), built with ``axis_name=None`` and jitted, on one batch of 128
random uint8 images [128, 32, 32, 3] with 100 classes (CIFAR-100 shapes), a
validation batch of 128, ``prepare`` = normalisation only (no augmentation), the
student optimiser of the base config (SGD, Nesterov, weight decay, cosine). Every
step is compiled ahead (``jit(...).lower(...).compile()``, compile time recorded),
run once untimed, then timed ``--repeats`` times with ``block_until_ready``; the
median is reported. The same state is fed to every call (nothing donated), so every
call does the same work (unrolled CG runs all k iterations; converged ones are
masked). XLA's FLOP count of every compiled step is recorded too: on a CPU shared
with other jobs the FLOP ratio is the load-independent view of the same cost.

Pairs (student <- teacher): wrn_16_2 <- wrn_40_2 and resnet8x4 <- resnet32x4.
Settings (config defaults: GGN curvature, damping 0.1, sigmoid weights, CG
warm-started, unrolled on CPU):
  plain            mechanism none: teacher forward + one student KD update
  online_cgK       mechanism online, refresh step (g_V + K CG iterations + scores +
                   weighted update), K in {1, 3, 5, 10}; K = 5 is the default
  online_stale     mechanism online, ``refresh=False`` (reuses s: scores + update)
  online_identity  solver identity (s = g_V, gradient alignment), refresh step
  teacher_forward  the teacher's forward pass alone (part of every step)
Core settings (plain, default, online_stale, online_cg5) are timed on every pair; the sweep
(the others) on the pairs of ``--sweep-pairs`` and compiled only (FLOPs) elsewhere;
``--untimed`` compiles the named settings only, everywhere.
Refresh interval R: amortised per-step cost (t_refresh + (R - 1) t_stale) / R,
R in {1, 5, 10}, from online_cg5 and online_stale.

  default          mechanism online with every other option at the base config's
                   defaults: what a user gets (the target below)
  default_tf32     default with kdaif.matmul_precision=default: the backend's
                   matrix-product precision for the influence maths (TensorFloat-32
                   on NVIDIA GPUs; the same program as default on CPU)
  online_head      kdaif.scope=head (influence in the classifier layer), CG 5
The online_cgK / online_stale / online_identity settings use kdaif.scope=all (the
full-network solve every step; `--config.kdaif.scope=all` in a run).
FLOP breakdown (compiled only) of the default and online_cg5 influence blocks:
validation gradient, CG (solve minus validation gradient), scores.

Target (the issue): the default online step <= 1.5x the plain KD step, in wall
time and in FLOPs. Printed as MET or MISSED.

Writes bench/results/step_cost.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common  # bench/_common.py (the script's folder is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax import config as config_lib
from kdaif_jax import data, influence, models, objectives, online, optim
from kdaif_jax import step as step_lib

BATCH = 128
VAL_BATCH = 128
NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
TARGET_RATIO = 1.5
DEFAULT_PAIRS = ("wrn_16_2:wrn_40_2", "resnet8x4:resnet32x4")
REFRESH = (1, 5, 10)
# Timed on every pair: the target (default) and what the refresh interval needs.
CORE = ("plain", "default", "online_stale", "online_cg5")
# Timed on the pairs of --sweep-pairs; compiled only (FLOPs) on the others.
SWEEP = (
  "teacher_forward",
  "online_head",
  "online_identity",
  "online_cg1",
  "online_cg3",
  "online_cg10",
)
ALL_SETTINGS = (
  "plain",
  "default",
  "default_tf32",
  "teacher_forward",
  "online_head",
  "online_stale",
  "online_identity",
  "online_cg1",
  "online_cg3",
  "online_cg5",
  "online_cg10",
)


def make_cfg(mechanism: str, cg_iters: int | None = None, solver: str | None = None, **kdaif):
  """The base config with ``mechanism``; other ``kdaif`` options at their defaults
  unless given (so ``default`` measures what a user gets)."""
  cfg = config_lib.base_config()
  cfg.kdaif.mechanism = mechanism
  if cg_iters is not None:
    cfg.kdaif.cg_iters = cg_iters
  if solver is not None:
    cfg.kdaif.solver = solver
  for key, value in kdaif.items():
    cfg.kdaif[key] = value
  config_lib.validate(cfg)
  return cfg


def part_flops(student, teacher, state, batch, val, cfg) -> dict:
  """XLA FLOPs of each part of the online step's influence block (compiled only).

  val_gradient: g_V on the validation batch; solve: g_V and the CG solve together
  (``influence.solve_direction``), so CG = solve - val_gradient; scores: the one
  jvp of the batch; teacher_forward is timed as its own setting.
  """
  opts = config_lib.step_options(cfg)
  stu = state.student
  x, xv, y = prepare(batch["images"]), prepare(val["images"]), batch["labels"]
  t_logits = teacher.apply(state.teacher.params, state.teacher.model_state, x, False)[0]

  def scoped(params, t_logits):
    precision = opts.influence.precision
    train = objectives.training_loss(
      student, stu.model_state, x, lambda out: opts.kd(out, t_logits, y), precision
    )
    vl = objectives.validation_loss(student, stu.model_state, xv, val["labels"], precision)
    return online.scope_restrict(opts.influence.scope, params, train, vl)

  def val_gradient(params, t_logits):
    r = scoped(params, t_logits)
    return jax.grad(r.val_loss_fn)(r.params)

  def solve(params, t_logits, s0):
    r = scoped(params, t_logits)
    return influence.solve_direction(
      r.params, r.train_loss, r.val_loss_fn, x0=s0, **opts.influence.solver._asdict()
    )[0]

  def scores(params, t_logits, s):
    r = scoped(params, t_logits)
    return influence.scores(r.train_loss, r.params, s)

  sub = scoped(stu.params, t_logits).params
  s0 = jax.tree.map(jnp.zeros_like, sub)
  out = {}
  for name, fn, args in (
    ("val_gradient", val_gradient, (stu.params, t_logits)),
    ("solve", solve, (stu.params, t_logits, s0)),
    ("scores", scores, (stu.params, t_logits, s0)),
  ):
    out[name] = _flops(jax.jit(fn).lower(*args).compile())
  if out["solve"] and out["val_gradient"]:
    out["cg"] = out["solve"] - out["val_gradient"]
  return out


def build_inputs(
  student: models.Model,
  teacher: models.Model,
  tx,
  seed: int = 0,
  *,
  batch_size: int = BATCH,
  num_classes: int = NUM_CLASSES,
):
  """A TrainState and one (batch, val) pair of random CIFAR-shaped data."""
  key = jax.random.key(seed)
  k_s, k_t, k_run, k_s0 = jax.random.split(key, 4)
  sample = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
  s_params, s_ms = student.init(k_s, sample)
  t_params, t_ms = teacher.init(k_t, sample)
  # A non-zero warm start, as after the first step (CG then starts from a residual
  # that is not the right-hand side; the cost is the same either way when unrolled).
  s0 = jax.tree.map(lambda p: 1e-3 * jax.random.normal(k_s0, p.shape, p.dtype), s_params)
  state = step_lib.new_train_state(
    key=jax.random.key_data(k_run),
    student=step_lib.NetState(s_params, s_ms, tx.init(s_params)),
    teacher=step_lib.NetState(t_params, t_ms, ()),
    num_examples=batch_size,
    s=s0,
  )
  rng = np.random.default_rng(seed)
  b = batch_size
  batch = {
    "images": jnp.asarray(rng.integers(0, 256, (b, *IMAGE_SHAPE)), jnp.uint8),
    "labels": jnp.asarray(rng.integers(0, num_classes, b), jnp.int32),
    "noisy": jnp.asarray(rng.random(b) < 0.2),
    "weights": jnp.ones((b,), jnp.float32),
  }
  val = {
    "images": jnp.asarray(rng.integers(0, 256, (VAL_BATCH, *IMAGE_SHAPE)), jnp.uint8),
    "labels": jnp.asarray(rng.integers(0, num_classes, VAL_BATCH), jnp.int32),
  }
  return state, batch, val


def prepare(images):
  # No augmentation: the step's cost, not the augmentation's.
  return data.normalize(images, CIFAR_MEAN, CIFAR_STD)


def _flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None
  except Exception:  # noqa: BLE001 - optional information, backend dependent
    return None


def _memory_bytes(compiled) -> int | None:
  """Device memory a compiled step needs: arguments + outputs + temporaries (XLA)."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - optional information, backend dependent
    return None


def measure(fn, args, repeats: int | None, label: str, warmup: int = 1) -> dict:
  """Compile ahead, ``warmup`` untimed runs, ``repeats`` timed runs; returns the record.

  ``repeats=None`` compiles only (compile time and XLA's FLOP count, no run).
  ``memory_bytes``: XLA's static estimate of the compiled step's device memory.
  """
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  trace_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  rec = {
    "timed": repeats is not None,
    "trace_s": round(trace_s, 3),
    "compile_s": round(compile_s, 3),
    "flops": _flops(compiled),
    "memory_bytes": _memory_bytes(compiled),
  }
  gflop = f"{rec['flops'] / 1e9:7.1f} GFLOP" if rec["flops"] else "  ? GFLOP"
  if repeats is None:
    print(f"  {label:18s} {'(not timed)':>13s}   {gflop}  (compile {compile_s:6.1f} s)", flush=True)
    return rec
  r = _common.time_fn(compiled, args, repeats, warmup=warmup)
  out = r.pop("out")
  rec.update(
    median_ms=r["median_ms"],
    min_ms=r["min_ms"],
    max_ms=r["max_ms"],
    times_ms=r["times_ms"],
    first_run_s=round(r["first_call_s"], 3),
  )
  metrics = out[1] if isinstance(out, tuple) and len(out) > 1 else None
  if isinstance(metrics, dict) and "cg_iterations" in metrics:
    rec["cg_iterations"] = float(metrics["cg_iterations"])
    rec["cg_residual"] = float(metrics["cg_residual"])
  print(
    f"  {label:18s} {rec['median_ms']:10.1f} ms   {gflop}  (compile {compile_s:6.1f} s, "
    f"range {rec['min_ms']:.0f}-{rec['max_ms']:.0f} ms)",
    flush=True,
  )
  return rec


def run_pair(
  student_name: str,
  teacher_name: str,
  timed: list[str],
  untimed: list[str],
  repeats: int,
  *,
  batch_size: int = BATCH,
  num_classes: int = NUM_CLASSES,
  dtype: str = "float32",
  breakdown: bool = True,
  warmup: int = 1,
) -> dict:
  """Measures ``timed`` settings and compiles ``untimed`` ones (FLOPs only) for one pair.

  ``dtype``: the networks' compute dtype (``config.dtype``; influence stays float32).
  ``breakdown``: also compile the parts of the influence block (FLOPs only).
  ``warmup``: untimed runs before the timed ones (a GPU's clocks and autotuned
  kernels settle over the first few).
  """
  precision = {} if dtype == "float32" else {"dtype": dtype}
  student = models.create(student_name, num_classes, **precision)
  teacher = models.create(teacher_name, num_classes, **precision)
  base = config_lib.base_config()
  tx = optim.make_optimizer(base.student.optimizer, steps_per_epoch=390, epochs=240)
  state, batch, val = build_inputs(
    student, teacher, tx, batch_size=batch_size, num_classes=num_classes
  )
  counts = {
    "student": models.param_count(state.student.params),
    "teacher": models.param_count(state.teacher.params),
  }
  print(
    f"\n{student_name} ({counts['student']:,} params) <- {teacher_name} "
    f"({counts['teacher']:,} params), batch {batch_size}, val batch {VAL_BATCH}, {dtype}",
    flush=True,
  )
  res: dict[str, dict] = {}
  args = (state, batch, val)
  for name in [n for n in ALL_SETTINGS if n in timed or n in untimed]:
    reps = repeats if name in timed else None
    if name == "teacher_forward":
      x = prepare(batch["images"])
      fn = lambda tp, tms, x: teacher.apply(tp, tms, x, False)[0]
      teacher_args = (state.teacher.params, state.teacher.model_state, x)
      res[name] = measure(fn, teacher_args, reps, name, warmup)
      continue
    cfg, refresh = setting_config(name)
    fn = step_lib.make_kd_step(
      student,
      teacher,
      tx,
      None,
      prepare,
      config_lib.step_options(cfg),
      refresh=refresh,
      axis_name=None,
    )
    res[name] = measure(fn, args, reps, name, warmup)
  parts = {}
  for name in ("default", "online_cg5") if breakdown else ():
    cfg, _ = setting_config(name)
    parts[name] = part_flops(student, teacher, state, batch, val, cfg)
  return {
    "student": student_name,
    "teacher": teacher_name,
    "batch_size": batch_size,
    "num_classes": num_classes,
    "dtype": dtype,
    "param_counts": counts,
    "steps": res,
    "breakdown": parts,
    "warmup": warmup,
  }


def setting_config(name: str):
  """(config, refresh) of a step setting."""
  if name == "plain":
    return make_cfg("none"), True
  if name == "default":
    return make_cfg("online"), True
  if name == "default_tf32":
    return make_cfg("online", matmul_precision="default"), True
  if name == "online_head":
    return make_cfg("online", cg_iters=5, scope="head"), True
  if name == "online_stale":
    return make_cfg("online", cg_iters=5, scope="all"), False
  if name == "online_identity":
    return make_cfg("online", solver="identity", scope="all"), True
  if name.startswith("online_cg"):
    return make_cfg("online", cg_iters=int(name[len("online_cg") :]), scope="all"), True
  raise ValueError(f"unknown setting {name!r}; known: {', '.join(ALL_SETTINGS)}")


def summarise(pair: dict) -> dict:
  """Ratios to the plain step (time and FLOPs) and the amortised cost of refresh intervals."""
  steps = pair["steps"]
  plain = steps["plain"]
  ratios = {
    n: r["median_ms"] / plain["median_ms"]
    for n, r in steps.items()
    if n != "plain" and r["timed"] and plain["timed"]
  }
  flop_ratios = {
    n: r["flops"] / plain["flops"]
    for n, r in steps.items()
    if n != "plain" and r["flops"] and plain["flops"]
  }
  amortised = {}
  ref, stale = steps.get("online_cg5"), steps.get("online_stale")
  if ref and stale and ref["timed"] and stale["timed"] and plain["timed"]:
    for r in REFRESH:
      ms = (ref["median_ms"] + (r - 1) * stale["median_ms"]) / r
      amortised[f"R{r}"] = {"ms": ms, "ratio": ms / plain["median_ms"]}
  default, default_flops = ratios.get("default"), flop_ratios.get("default")
  met = None
  if default is not None and default_flops is not None:
    met = bool(default <= TARGET_RATIO and default_flops <= TARGET_RATIO)
  target = {
    "setting": "online with the base config's defaults (time and FLOPs)",
    "max_ratio": TARGET_RATIO,
    "ratio": default,
    "flop_ratio": default_flops,
    "met": met,
  }
  return {
    "ratios_to_plain": ratios,
    "flop_ratios_to_plain": flop_ratios,
    "refresh_interval_amortised": amortised,
    "target": target,
  }


def print_table(pair: dict) -> None:
  steps = pair["steps"]
  pc = pair["param_counts"]
  print(
    f"\n### {pair['student']} ({pc['student']:,} params) <- {pair['teacher']} "
    f"({pc['teacher']:,} params)"
  )
  print("| step | median ms | x plain (time) | GFLOP | x plain (FLOPs) | compile s |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, r in steps.items():
    plain = name == "plain"
    ms = f"{r['median_ms']:.0f}" if r["timed"] else "not timed"
    ratio = (
      "1.00"
      if plain
      else (f"{pair['ratios_to_plain'][name]:.2f}" if name in pair["ratios_to_plain"] else "-")
    )
    gflop = (
      "?"
      if not r["flops"]
      else (f"{r['flops'] / 1e9:.0f}" if r["flops"] >= 1e10 else f"{r['flops'] / 1e9:.2g}")
    )
    fratio = (
      "1.00"
      if plain
      else (
        f"{pair['flop_ratios_to_plain'][name]:.2f}" if name in pair["flop_ratios_to_plain"] else "-"
      )
    )
    print(f"| {name} | {ms} | {ratio} | {gflop} | {fratio} | {r['compile_s']:.1f} |")
  for name, a in pair["refresh_interval_amortised"].items():
    print(
      f"| online_cg5, refresh every {name[1:]} (amortised) | {a['ms']:.0f} | "
      f"{a['ratio']:.2f} | - | - | - |"
    )
  t = pair["target"]
  if t["met"] is not None:
    print(
      f"target: {t['setting']} <= {t['max_ratio']:.1f}x plain KD: measured {t['ratio']:.2f}x"
      f" time, {t['flop_ratio']:.2f}x FLOPs -> {'MET' if t['met'] else 'MISSED'}"
    )
  else:
    print("target: not measured (default or plain not timed)")
  for setting, parts in pair.get("breakdown", {}).items():
    plain_flops = pair["steps"]["plain"]["flops"] or float("nan")
    teacher = pair["steps"].get("teacher_forward", {}).get("flops")
    row = ", ".join(
      f"{k} {v / 1e9:.2f} GFLOP ({v / plain_flops:.2f}x plain)" for k, v in parts.items() if v
    )
    extra = f"; teacher forward {teacher / 1e9:.2f} GFLOP" if teacher else ""
    print(f"breakdown of {setting}: {row}{extra}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--quick",
    action="store_true",
    help="first pair, core settings (plain, default, online_stale, online_cg5), 3 repeats",
  )
  ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; quick 3)")
  ap.add_argument(
    "--pairs",
    nargs="+",
    default=None,
    metavar="STUDENT:TEACHER",
    help=f"student:teacher pairs (default {' '.join(DEFAULT_PAIRS)})",
  )
  ap.add_argument(
    "--sweep-pairs",
    choices=("all", "first", "none"),
    default="all",
    help="pairs on which the sweep settings (" + ", ".join(SWEEP) + ") are timed; "
    "on the others they are compiled only (FLOPs, compile time)",
  )
  ap.add_argument(
    "--untimed",
    nargs="*",
    default=[],
    metavar="SETTING",
    help="settings compiled only, on every pair (e.g. online_cg10)",
  )
  ap.add_argument(
    "--note",
    action="append",
    default=[],
    help="free-text note stored in the JSON (e.g. why settings were reduced)",
  )
  ap.add_argument("--batch", type=int, default=BATCH, help=f"training batch (default {BATCH})")
  ap.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="the networks' compute dtype (config.dtype); influence stays float32",
  )
  ap.add_argument("--out", default=str(_common.RESULTS_DIR / "step_cost.json"))
  args = ap.parse_args()
  if args.batch < 1:
    ap.error("--batch must be >= 1")
  for name in args.untimed:
    if name not in ALL_SETTINGS:
      ap.error(f"--untimed {name}: unknown setting; known: {', '.join(ALL_SETTINGS)}")
  if args.repeats is not None and args.repeats < 1:
    ap.error("--repeats must be >= 1")
  repeats = args.repeats or (3 if args.quick else 5)
  pairs = args.pairs or (DEFAULT_PAIRS[:1] if args.quick else DEFAULT_PAIRS)
  sweep_pairs = "none" if args.quick else args.sweep_pairs
  plan = []
  for i, spec in enumerate(pairs):
    if spec.count(":") != 1:
      ap.error(f"--pairs {spec}: expected STUDENT:TEACHER")
    sweep = sweep_pairs == "all" or (sweep_pairs == "first" and i == 0)
    timed = [n for n in CORE + (SWEEP if sweep else ()) if n not in args.untimed]
    untimed = [n for n in ALL_SETTINGS if n not in timed and (not args.quick or n in args.untimed)]
    plan.append((spec, timed, untimed))

  env = _common.environment()
  print(
    f"kdaif_jax step cost: jax {env['jax_version']}, {env['backend']} "
    f"({env['device_kind']}), {env['cpu_count']} CPUs, load average "
    f"{env['load_average_1_5_15']}, batch {args.batch}, {args.dtype}, median of {repeats}",
    flush=True,
  )
  t_start = time.perf_counter()
  results = []
  for spec, timed, untimed in plan:
    student_name, teacher_name = spec.split(":")
    pair = run_pair(
      student_name, teacher_name, timed, untimed, repeats, batch_size=args.batch, dtype=args.dtype
    )
    default_teacher = dict(p.split(":") for p in DEFAULT_PAIRS).get(student_name)
    if default_teacher and teacher_name != default_teacher:
      pair["teacher_note"] = f"teacher {teacher_name} replaces the default {default_teacher}"
    pair.update(summarise(pair))
    results.append(pair)
  total_s = time.perf_counter() - t_start

  for pair in results:
    print_table(pair)
    if pair.get("teacher_note"):
      print(f"note: {pair['teacher_note']}")
  for note in args.note:
    print(f"note: {note}")
  out = {
    "benchmark": "step_cost",
    **env,
    "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    "command": " ".join(sys.argv),
    "quick": bool(args.quick),
    "batch": args.batch,
    "val_batch": VAL_BATCH,
    "num_classes": NUM_CLASSES,
    "image_shape": list(IMAGE_SHAPE),
    "dtype": args.dtype,
    "repeats": repeats,
    "timing": "jit(...).lower().compile(), 1 untimed run, median of `repeats` timed runs "
    "with block_until_ready; same inputs every call, nothing donated. "
    "flops: XLA cost_analysis of the compiled step (untimed settings: compiled only)",
    "kdaif": {
      k: v
      for k, v in config_lib.base_config().kdaif.to_dict().items()
      if k
      in (
        "curvature",
        "solver",
        "damping",
        "cg_iters",
        "cg_tol",
        "warm_start",
        "refresh_every",
        "unroll",
        "weights",
        "weight_temperature",
        "scope",
      )
    },
    "settings": {spec: {"timed": timed, "compiled_only": untimed} for spec, timed, untimed in plan},
    "refresh_intervals": list(REFRESH),
    "target": {"setting": "online, base config defaults", "max_ratio": TARGET_RATIO},
    "pairs": results,
    "notes": args.note,
    "bench_wall_s": round(total_s, 1),
  }
  path = _common.write_json(args.out, out)
  print(f"\nwrote {path} ({total_s:.0f} s)")


if __name__ == "__main__":
  main()
