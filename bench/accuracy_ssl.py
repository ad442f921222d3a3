"""Semi-supervised digits (10 labels per class): labelled-only vs pseudo-labels vs KD-AIF.

Usage (from the repository root):
    .venv/bin/python bench/accuracy_ssl.py                # 3 seeds, every arm but the references
    .venv/bin/python bench/accuracy_ssl.py --quick        # seed 0, 3 student epochs
    .venv/bin/python bench/accuracy_ssl.py --seeds 0 1 2 --arms labelled_only joint

Every run is ``kdaif_jax.trainer.train_and_evaluate`` on configs/digits_ssl.py
(100 labelled digits, the rest unlabelled, 50 for validation; cnn_large teacher
trained on the labels, cnn_small student), with ``seed``, ``data.seed`` = seed.
Arms:
  labelled_only  the student on the 100 labels alone (``ssl.unlabelled_weight=0``)
  pseudo_label   plain KD on the unlabelled data: teacher soft targets, weights 1
  online         + KD-AIF influence weights on the unlabelled examples
  joint          + the teacher learns from the student's influence feedback
  fixmatch       the baseline a user would pick instead (Sohn et al. 2020): the
                 student's own confident weak-view predictions (max softmax >=
                 ``ssl.fixmatch_threshold`` = 0.95) as hard labels for its strong
                 views (``ssl.targets=fixmatch``, mechanism none); no teacher
  oracle         a reference, not a method: pseudo_label with weight 0 on the
                 unlabelled examples whose teacher pseudo-label is wrong (the
                 hidden labels say which), i.e. perfect detection of bad targets
  all_labels     a reference, not a method: the student with the hidden true label
                 of every unlabelled example as its target (``ssl.targets=labels``,
                 mechanism none), the same views and schedule: what the recipe
                 reaches with every target right and every example labelled
The teacher is trained once per seed (by the labelled_only run) and loaded by the
others with ``teacher.init``; ``--teacher-init PATH`` (``{seed}`` replaced by the
seed) gives every requested arm that teacher instead, and trains none.
Resumable: a run whose workdir has summary.json is read back.
Targets: joint >= 94%, and joint beats labelled_only by >= 8 points,
pseudo_label by >= 3, online by >= 1 and fixmatch by >= 0; printed as MET / MISSED.
Each run also records the teacher's pseudo-label accuracy on the unlabelled
batches (first and last student epoch) from its metrics.jsonl.

Writes bench/results/accuracy_ssl.json (``--quick``: accuracy_ssl_quick.json;
``--out`` another name).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import pathlib
import time

import _common  # bench/_common.py
import numpy as np

from kdaif_jax import config as config_lib
from kdaif_jax import report, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARMS = ("labelled_only", "pseudo_label", "online", "joint", "fixmatch", "oracle", "all_labels")
REFERENCES = ("oracle", "all_labels")  # read the hidden labels: run only when asked for
TARGETS = (("labelled_only", 8.0), ("pseudo_label", 3.0), ("online", 1.0), ("fixmatch", 0.0))
JOINT_TARGET = 94.0


def load_config(arg=None):
  spec = importlib.util.spec_from_file_location("digits_ssl", ROOT / "configs" / "digits_ssl.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def make_config(args, seed: int, arm: str, teacher_init: str):
  cfg = load_config()
  cfg.seed = cfg.data.seed = seed
  if args.student_epochs is not None:
    cfg.student.epochs = args.student_epochs
  plain = ("labelled_only", "pseudo_label", "fixmatch", "all_labels")
  cfg.kdaif.mechanism = "none" if arm in plain else arm
  if arm == "fixmatch":
    cfg.ssl.targets = "fixmatch"
  if arm == "all_labels":
    cfg.ssl.targets = "labels"
  if arm == "labelled_only":
    cfg.ssl.unlabelled_weight = 0.0
  for key, value in _overrides(args.set):
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  cfg.teacher.init = teacher_init
  cfg.progress = args.progress
  cfg.report = False
  config_lib.validate(cfg)
  return cfg


def _overrides(items: list[str]) -> list[tuple[str, object]]:
  """``KEY=VALUE`` pairs of ``--set``: VALUE a Python literal (1e-3, True, (1, 2)) or a string."""
  out = []
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--set {item}: expected KEY=VALUE, e.g. student.optimizer.clip_norm=0")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    out.append((key, value))
  return out


def run_one(args, seed: int, arm: str, teacher_init: str) -> dict:
  tag = f"se{args.student_epochs}" if args.student_epochs is not None else "full"
  wd = pathlib.Path(args.workdirs) / tag / f"seed{seed}" / arm
  path = wd / "summary.json"
  t0 = time.time()
  if not path.exists():
    trainer.train_and_evaluate(make_config(args, seed, arm, teacher_init), str(wd))
  summary = json.loads(path.read_text())
  return {
    "seed": seed,
    "arm": arm,
    "workdir": str(wd),
    "student_test_accuracy": summary["student"]["test_accuracy"],
    "teacher_test_accuracy": summary["teacher"]["test_accuracy"],
    "wall_s_this_call": time.time() - t0,
    "wall_time_s": summary["wall_time_s"],
    "pseudo_label_accuracy": _pseudo_label_accuracy(wd / "metrics.jsonl"),
  }


def _pseudo_label_accuracy(path: pathlib.Path) -> dict:
  """The teacher's pseudo-label accuracy in the first and the last student epoch."""
  by = report.pseudo_label_by_epoch(report.read_metrics(str(path))[0])
  if not by:
    return {}
  first, last = min(by), max(by)
  return {"first_epoch": by[first], "last_epoch": by[last]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument(
    "--arms", nargs="+", default=[a for a in ARMS if a not in REFERENCES], choices=ARMS
  )
  p.add_argument("--student-epochs", type=int, default=None)
  p.add_argument("--progress", default="log", choices=config_lib.PROGRESS)
  p.add_argument("--workdirs", default=str(ROOT / "bench" / "workdirs" / "accuracy_ssl"))
  p.add_argument("--out", default=None, help="JSON name under bench/results/")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="config override for every arm (repeatable), e.g. --set student.model=cnn_small_bn; "
    "use a separate --workdirs per recipe",
  )
  p.add_argument(
    "--teacher-init",
    default="",
    help="the teacher of every arm: a workdir or checkpoint folder, {seed} replaced by "
    "the seed (e.g. bench/workdirs/ssl_bn_uda/full/seed{seed}/joint/checkpoints/student)",
  )
  args = p.parse_args()
  if args.quick:
    args.seeds, args.student_epochs = [0], args.student_epochs or 3
  runs = []
  if args.teacher_init:
    arms = list(dict.fromkeys(args.arms))
    for seed in args.seeds:
      runs += [run_one(args, seed, arm, args.teacher_init.format(seed=seed)) for arm in arms]
  else:
    arms = ["labelled_only"] + [a for a in args.arms if a != "labelled_only"]
    for seed in args.seeds:
      first = run_one(args, seed, arms[0], "")
      runs.append(first)
      for arm in arms[1:]:
        runs.append(run_one(args, seed, arm, str(pathlib.Path(first["workdir"]))))
  table = {}
  for arm in arms:
    acc = [100 * r["student_test_accuracy"] for r in runs if r["arm"] == arm]
    table[arm] = {
      "mean": float(np.mean(acc)),
      "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
      "n": len(acc),
      "runs": acc,
    }
  teacher = sorted({round(100 * r["teacher_test_accuracy"], 4) for r in runs})
  targets = []
  if "joint" in table:
    mean = table["joint"]["mean"]
    gain = mean - JOINT_TARGET
    targets.append({"text": f"joint >= {JOINT_TARGET}%", "gain": gain, "met": gain >= 0})
    for base, points in TARGETS:
      if base in table:
        gain = table["joint"]["mean"] - table[base]["mean"]
        targets.append(
          {"text": f"joint beats {base} by >= {points} points", "gain": gain, "met": gain >= points}
        )
  print("\n| arm | student test accuracy % (mean ± std, n) |\n|---|---|")
  for arm, t in table.items():
    print(f"| {arm} | {t['mean']:.2f} ± {t['std']:.2f} (n={t['n']}) |")
  print(f"teacher test accuracy per seed (%): {teacher}")
  for t in targets:
    print(f"target: {t['text']}: gain {t['gain']:+.2f} -> {'MET' if t['met'] else 'MISSED'}")
  name = args.out or ("accuracy_ssl_quick.json" if args.quick else "accuracy_ssl.json")
  _common.write_json(
    _common.RESULTS_DIR / name,
    {
      "environment": _common.environment(),
      "args": vars(args),
      "table": table,
      "teacher_test_accuracy": teacher,
      "targets": targets,
      "runs": runs,
    },
  )


if __name__ == "__main__":
  main()
