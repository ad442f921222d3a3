"""The GPU protocol: step costs, influence costs and one CIFAR-shaped epoch, one JSON.

Usage (from the repository root; ``bench/gpu_check.sh`` installs what is missing
and calls this):
    python bench/gpu_check.py --out gpu_check.json           # on a GPU, < 8 minutes
    .venv/bin/python bench/gpu_check.py --tiny --out /tmp/g.json  # any machine, seconds

Parts, in order (each one's failure is recorded and the next one runs; the JSON
is rewritten after every part, so a run stopped by a time limit keeps what it
measured):
  influence  bench/influence_cost.py --quick: grad, hvp, GN product, CG iteration
             and scores of a CIFAR-shaped CNN at batch 128, float32.
  steps      the KD-AIF vs plain KD student step (bench/step_cost.py's timing) for
             resnet8x4 <- resnet32x4 (CIFAR-100, batch 128) and WRN-28-2 <- WRN-28-2
             (CIFAR-10, batch 512 = the SSL configs' 64 labelled + 448 unlabelled),
             in float32 and bfloat16: plain (mechanism none), default (online with
             the base config's defaults: head scope, influence products in full
             float32), default_tf32 (the same with the backend's precision for them:
             TensorFloat-32 on NVIDIA GPUs) and online_cg5 (full network, CG 5):
             median ms (after ``WARMUP`` untimed calls), steps/s, ratio to plain,
             XLA FLOPs, XLA's memory estimate of each compiled step.
  epoch      ``train_and_evaluate`` on synthetic CIFAR-100-shaped data (50,000
             training images), resnet32x4 teacher one epoch, resnet8x4 student one
             epoch of default online KD-AIF, float32 and bfloat16: steps/s of each
             phase as the trainer logs them (data, augmentation, eval included).
  tests      (not in the default --parts; about 4 minutes on an H200) pytest on the
             test files whose results can differ on an accelerator (``GPU_TESTS``):
             counts and each failure's first line.
Peak device memory (``memory_stats``, where the backend reports it) after every part.
``--budget-s`` skips the parts that would start after it (recorded as skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import _common  # bench/_common.py (the script's folder is on sys.path)
import jax
import step_cost

from kdaif_jax import config as config_lib
from kdaif_jax import trainer

PAIRS = (  # student, teacher, batch, classes
  ("resnet8x4", "resnet32x4", 128, 100),
  ("wrn_28_2", "wrn_28_2", 512, 10),
)
TINY_PAIRS = (("cnn_small", "cnn_large", 16, 10),)
SETTINGS = ("plain", "default", "default_tf32", "online_cg5")
DTYPES = ("float32", "bfloat16")
BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
# The maths checked against float64 oracles and against each other at tight
# tolerances: where an accelerator's arithmetic (TensorFloat-32, loop forms) shows.
GPU_TESTS = (
  "tests/test_influence.py",
  "tests/test_loo.py",
  "tests/test_precision.py",
  "tests/test_step.py",
  "tests/test_seam.py",
  "tests/test_scope.py",
)
PARTS = ("influence", "steps", "epoch", "tests")
WARMUP = 10  # untimed calls before each step's timed ones (GPU)


def _one(e: Exception) -> str:
  return f"{type(e).__name__}: {e}".splitlines()[0][:500]


def _peak_memory() -> dict | None:
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def influence_part(tiny: bool) -> dict:
  """bench/influence_cost.py --quick in a subprocess (its own JSON, read back)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "influence_cost.json")
    cmd = [sys.executable, os.path.join(BENCH, "influence_cost.py"), "--quick", "--out", out]
    if tiny:
      cmd += ["--repeats", "1", "--cg-iters", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode:
      raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed")
    with open(out) as f:
      return json.load(f)


def steps_part(tiny: bool, repeats: int, results: list, save) -> list[dict]:
  """The student step of each pair and dtype: plain, default online, full-network CG 5.

  Appends each pair's record to ``results`` as it is measured and calls ``save()``.
  """
  for student, teacher, batch, classes in TINY_PAIRS if tiny else PAIRS:
    for dtype in DTYPES:
      try:
        pair = step_cost.run_pair(
          student,
          teacher,
          list(SETTINGS),
          [],
          repeats,
          batch_size=batch,
          num_classes=classes,
          dtype=dtype,
          breakdown=False,
          # In the H200 run of 2026-11-30 one plain step still sped up from 16-17 ms
          # to 13 ms after 7 timed calls that followed a single warm-up call.
          warmup=1 if tiny else WARMUP,
        )
      except Exception as e:  # noqa: BLE001 - the other pairs still run
        traceback.print_exc()
        results.append({"student": student, "teacher": teacher, "dtype": dtype, "error": _one(e)})
        save()
        continue
      pair.update(step_cost.summarise(pair))
      for rec in pair["steps"].values():
        if rec.get("median_ms"):
          rec["steps_per_s"] = round(1e3 / rec["median_ms"], 2)
      results.append(pair)
      step_cost.print_table(pair)
      save()
  return results


def epoch_config(dtype: str, tiny: bool):
  """One teacher and one student epoch on synthetic CIFAR-100-shaped data."""
  cfg = config_lib.base_config()
  cfg.dtype = dtype
  cfg.data.name = "synthetic"
  n = 256 if tiny else 50_000
  cfg.data.synthetic.update(
    dict(
      num_train=n,  # the validation examples come on top (data.assemble)
      num_val=32 if tiny else 1000,
      num_test=64 if tiny else 10_000,
      image_size=32,
      channels=3,
      num_classes=10 if tiny else 100,
    )
  )
  cfg.augment.pad, cfg.augment.flip = 4, True
  cfg.teacher.model, cfg.student.model = (
    ("cnn_large", "cnn_small") if tiny else ("resnet32x4", "resnet8x4")
  )
  cfg.teacher.epochs = cfg.student.epochs = 1
  cfg.batch_size = 32 if tiny else 128
  cfg.eval_batch_size = 64 if tiny else 1000
  cfg.kdaif.val_batch_size = 32 if tiny else 128
  cfg.log_every_steps = 4 if tiny else 50
  cfg.checkpoint_every_steps = 10_000
  cfg.progress = "log"
  cfg.report = False
  config_lib.validate(cfg)
  return cfg


def _logged_rates(path: str) -> dict:
  """Steady-state steps/s of each phase: from its first to its last logged train step."""
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  rates = {}
  for phase in ("teacher", "student"):
    train = [r for r in rows if r.get("kind") == "train" and r.get("phase") == phase]
    if len(train) >= 2 and train[-1]["time"] > train[0]["time"]:
      steps = train[-1]["step"] - train[0]["step"]
      rates[phase] = round(steps / (train[-1]["time"] - train[0]["time"]), 2)
  return rates


def epoch_part(tiny: bool) -> dict:
  """``train_and_evaluate`` for one epoch of each phase, per dtype; the trainer's own
  steps/s (from summary.json) and the wall time of the whole call."""
  out = {}
  for dtype in DTYPES:
    cfg = epoch_config(dtype, tiny)
    with tempfile.TemporaryDirectory() as workdir:
      t0 = time.perf_counter()
      summary = trainer.train_and_evaluate(cfg, workdir)
      wall = time.perf_counter() - t0
      logged = _logged_rates(os.path.join(workdir, "metrics.jsonl"))
    out[dtype] = {
      "wall_s": round(wall, 1),
      "steps_per_second": summary.get("steps_per_second"),
      "steps_per_second_between_logs": logged,
      "wall_time_s": summary.get("wall_time_s"),
      "student_test_accuracy": summary["student"]["test_accuracy"],
      "teacher_test_accuracy": summary["teacher"]["test_accuracy"],
      "peak_memory": _peak_memory(),
    }
    print(f"epoch {dtype}: {json.dumps(out[dtype])}", flush=True)
  out["config"] = {
    k: v
    for k, v in epoch_config("float32", tiny).to_dict().items()
    if k in ("data", "teacher", "student", "batch_size", "kdaif")
  }
  return out


def tests_part(files, keyword: str | None = None) -> dict:
  """pytest on ``files`` (``-k keyword``) in a subprocess, from the repository root;
  counts and each failure's first line from its JUnit XML."""
  args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
  args += ["-k", keyword] if keyword else []
  with tempfile.TemporaryDirectory() as tmp:
    xml = os.path.join(tmp, "junit.xml")
    cmd = [sys.executable, *args, f"--junitxml={xml}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(res.stdout[-3000:], flush=True)
    if not os.path.exists(xml):
      raise RuntimeError(f"pytest wrote no report (exit {res.returncode}): {res.stderr[-300:]}")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
      for bad in list(case.findall("failure")) + list(case.findall("error")):
        message = (bad.get("message") or bad.text or "").strip().splitlines()
        failed.append(
          f"{case.get('classname')}::{case.get('name')}: {message[0][:300] if message else ''}"
        )
  counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
  return {
    "command": "python " + " ".join(args),
    **counts,
    "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
    "wall_s": round(time.perf_counter() - t0, 1),
    "failed": failed,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="the JSON to write (rewritten after each part)")
  ap.add_argument("--tiny", action="store_true", help="small models and data: checks the script")
  ap.add_argument("--repeats", type=int, default=10, help="timed calls per step (default 10)")
  ap.add_argument("--budget-s", type=float, default=420.0, help="no part starts after this")
  ap.add_argument(
    "--parts", nargs="+", default=["influence", "steps", "epoch"], help=f"of {', '.join(PARTS)}"
  )
  args = ap.parse_args()
  unknown = set(args.parts) - set(PARTS)
  if unknown:
    ap.error(f"--parts {' '.join(sorted(unknown))}: unknown; allowed: {', '.join(PARTS)}")
  if args.repeats < 1:
    ap.error("--repeats must be >= 1")
  t0 = time.perf_counter()
  record = {"benchmark": "gpu_check", "environment": _common.environment(), "tiny": args.tiny}
  record["command"] = " ".join(sys.argv)
  # Rewrites the JSON with what is measured so far (a killed run keeps it).
  save = lambda: _common.write_json(args.out, record)
  runs = {
    "influence": lambda: influence_part(args.tiny),
    "steps": lambda: steps_part(
      args.tiny, 2 if args.tiny else args.repeats, record.setdefault("steps", []), save
    ),
    "epoch": lambda: epoch_part(args.tiny),
    "tests": lambda: (
      tests_part(["tests/test_influence.py"], "nan_curvature")
      if args.tiny
      else tests_part(GPU_TESTS)
    ),
  }
  for part in args.parts:
    started = time.perf_counter() - t0
    if started > args.budget_s:
      record[part] = {"skipped": f"budget: {started:.0f} s > --budget-s {args.budget_s:.0f}"}
    else:
      print(f"\n== {part} (at {started:.0f} s)", flush=True)
      try:
        record[part] = runs[part]()
      except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
        traceback.print_exc()
        record.setdefault("errors", {})[part] = _one(e)
    record[f"{part}_s"] = round(time.perf_counter() - t0 - started, 1)
    record["peak_memory"] = _peak_memory()
    record["total_s"] = round(time.perf_counter() - t0, 1)
    save()
  failed = sorted(record.get("errors", {}))
  failed += [f"steps {r['student']} {r['dtype']}" for r in record.get("steps", []) if "error" in r]
  if record.get("tests", {}).get("failed"):
    failed.append(f"tests ({len(record['tests']['failed'])} failed)")
  print(f"\nwrote {args.out} in {record['total_s']} s; failed parts: {failed or 'none'}")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
