"""Digits accuracy under label noise: plain KD against the KD-AIF mechanisms.

Usage (from the repository root):
    .venv/bin/python bench/accuracy_digits.py                 # 3 seeds x 3 noise rates
    .venv/bin/python bench/accuracy_digits.py --quick         # seed 0, noise 0.4,
                                                              # none + online, 3 student epochs
    .venv/bin/python bench/accuracy_digits.py --seeds 0 1 2 --noise 0 0.2 0.4 \\
        --mechanisms none static periodic online online_identity

Every run is ``kdaif_jax.trainer.train_and_evaluate`` in this process, with
configs/default.py (``--config``; ``get_config(None)``: digits, cnn_large ->
cnn_small, 15 teacher and 20 student epochs) and, per (noise, seed): ``seed``, ``data.seed`` and
``data.noise.seed`` = seed, ``data.noise.rate`` = noise (symmetric). The teacher is
trained ONCE per (noise, seed), by the ``none`` run (always run first, added when not
asked for); every other mechanism loads it with ``teacher.init = <none workdir>``. The
teacher's test accuracy must then be identical across mechanisms; the bench checks it.

Mechanism labels: any of ``kdaif_jax.config.MECHANISMS`` (``none`` is plain KD,
``small_loss`` the small-loss baseline), and the ``online`` variants
``online_identity`` (``kdaif.solver=identity``: gradient alignment, the
Learning-to-Reweight / TracIn baseline of docs/method.md §7), ``online_all``
(``kdaif.scope=all``: the exact full-network solve every step) and ``online_head``
(``kdaif.scope=head``).

``--noise-kind asymmetric`` flips c -> c+1 mod 10 (configs/digits_asym.py's task).

Resumable: runs live in bench/workdirs/accuracy_digits/<tag>/noise<r>_seed<s>/<label>
(<tag> names the epochs and the noise kind); a run whose workdir holds summary.json
is read back, not rerun, and an interrupted one resumes from its checkpoints.

Reported per (noise, mechanism): student test accuracy mean ± sample std over seeds,
teacher test accuracy, AUROC of the weights for the flipped labels (summary.json's
noise_detection; for ``none`` it ranks the final whole-set influence), wall time per
run. Targets (the issue): at 40% noise ``online`` beats ``none`` by >= 3 points; at 0%
``online`` is within 0.5 points of ``none`` or better. Printed as MET / MISSED.

Writes bench/results/accuracy_digits.json (``--quick``: accuracy_digits_quick.json)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time
import traceback

import _common  # bench/_common.py (the script's folder is on sys.path)
import jax
import numpy as np

from kdaif_jax import config as config_lib
from kdaif_jax import report, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKDIRS = ROOT / "bench" / "workdirs" / "accuracy_digits"
DEFAULT_MECHANISMS = ("none", "static", "periodic", "online", "online_identity")
# (noise rate, required gain of online over none in points, kind)
TARGETS = (
  {
    "noise": 0.4,
    "kind": "gain",
    "points": 3.0,
    "text": "at 40% noise online beats none by >= 3 points",
  },
  {
    "noise": 0.0,
    "kind": "within",
    "points": 0.5,
    "text": "at 0% noise online within 0.5 points of none or better",
  },
)


def load_config(name: str = "default", arg=None):
  """``configs/NAME.py``'s ``get_config(arg)``, loaded by path (as the tests do)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# Labels beyond the mechanisms: ablation arms of `online` (config overrides on kdaif).
VARIANTS = {
  "online_identity": {"mechanism": "online", "solver": "identity"},
  "online_all": {"mechanism": "online", "scope": "all"},  # full network, every step
  "online_head": {"mechanism": "online", "scope": "head"},
  # Per-example score memory (online.remember) off / at β = 0.5, 0.8.
  "online_no_memory": {"mechanism": "online", "score_memory": 0.0},
  "online_memory_0.5": {"mechanism": "online", "score_memory": 0.5},
  "online_memory_0.8": {"mechanism": "online", "score_memory": 0.8},
}


def resolve_label(label: str) -> dict:
  """Config overrides (of ``kdaif``) of a mechanism label; ValueError for an unknown one.

  Besides the names above, ``LABEL@key=value,key=value`` adds ``kdaif`` overrides
  to a label (values parsed as numbers where they are), for ablations such as
  ``online@score_memory=0.9,weight_temperature=0.1``.
  """
  if "@" in label:
    base, _, extra = label.partition("@")
    out = resolve_label(base)
    for item in extra.split(","):
      key, sep, value = item.partition("=")
      if not sep or key not in config_lib.base_config().kdaif:
        raise ValueError(f"label {label!r}: {item!r} is not kdaif_option=value")
      try:
        out[key] = float(value) if "." in value or "e" in value else int(value)
      except ValueError:
        out[key] = value
    return out
  if label in VARIANTS:
    return dict(VARIANTS[label])
  if label in config_lib.MECHANISMS:
    return {"mechanism": label}
  raise ValueError(
    f"unknown mechanism label {label!r}; allowed: {', '.join((*config_lib.MECHANISMS, *VARIANTS))}"
  )


def make_config(args, noise: float, seed: int, label: str, teacher_init: str = ""):
  cfg = load_config(args.config, None)
  cfg.seed = seed
  cfg.data.seed = seed
  cfg.data.noise.seed = seed
  cfg.data.noise.rate = float(noise)
  cfg.data.noise.kind = args.noise_kind
  if args.student_epochs is not None:
    cfg.student.epochs = args.student_epochs
  if args.teacher_epochs is not None:
    cfg.teacher.epochs = args.teacher_epochs
  for key, value in resolve_label(label).items():
    cfg.kdaif[key] = value
  cfg.teacher.init = teacher_init
  cfg.progress = args.progress
  config_lib.validate(cfg)
  return cfg


def tag_of(args) -> str:
  base = load_config(args.config, None)
  te = args.teacher_epochs if args.teacher_epochs is not None else base.teacher.epochs
  se = args.student_epochs if args.student_epochs is not None else base.student.epochs
  kind = "" if args.noise_kind == "symmetric" else f"_{args.noise_kind}"
  recipe = "" if args.config == "default" else f"_{args.config}"
  return f"te{te}_se{se}{kind}{recipe}"


def run_dir(args, noise: float, seed: int, label: str) -> pathlib.Path:
  return pathlib.Path(args.workdirs) / tag_of(args) / f"noise{noise:g}_seed{seed}" / label


def run_one(args, noise: float, seed: int, label: str, teacher_init: str) -> dict:
  """Runs (or reads back) one (noise, seed, label); returns its record."""
  wd = run_dir(args, noise, seed, label)
  summary_path, record_path = wd / "summary.json", wd / "bench_run.json"
  rec = {"noise": noise, "seed": seed, "mechanism": label, "workdir": str(wd)}
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    prev = json.loads(record_path.read_text()) if record_path.exists() else {}
    rec.update(status="reused", wall_s=prev.get("wall_s"))
    print(f"[skip] {wd} has summary.json", flush=True)
    # A workdir of an older default (e.g. before kdaif.score_memory) is not this arm.
    stale = _kdaif_drift(wd, make_config(args, noise, seed, label, teacher_init))
    if stale:
      rec["config_drift"] = stale
      print(
        f"[warn] {wd} ran with other kdaif settings ({'; '.join(stale)}): "
        "its numbers are not this label's under today's defaults; delete it "
        "or use --workdirs to rerun",
        flush=True,
      )
  else:
    cfg = make_config(args, noise, seed, label, teacher_init)
    print(f"[run ] noise {noise:g} seed {seed} {label} -> {wd}", flush=True)
    t0 = time.perf_counter()
    summary = trainer.train_and_evaluate(cfg, str(wd))
    wall = time.perf_counter() - t0
    _common.write_json(record_path, {"wall_s": wall, **_common.environment()})
    rec.update(status="ran", wall_s=wall)
    jax.clear_caches()  # every run compiles fresh closures; keep the process small
  det = summary.get("noise_detection") or {}
  rec.update(
    student_test_accuracy=summary["student"]["test_accuracy"],
    student_val_accuracy=summary["student"]["val_accuracy"],
    teacher_test_accuracy=summary["teacher"]["test_accuracy"],
    auroc=det.get("auroc"),
    precision_at_k=det.get("precision_at_k"),
    num_noisy=det.get("num_noisy"),
    num_train=summary.get("num_train"),
    trainer_wall_time_s=summary.get("wall_time_s"),
    steps_per_second=summary.get("steps_per_second"),
    memory_init_auroc=_memory_init_auroc(wd / "metrics.jsonl"),
  )
  print(
    f"       student {rec['student_test_accuracy']:.4f}  teacher "
    f"{rec['teacher_test_accuracy']:.4f}  auroc {_fmt(rec['auroc'], '.3f')}  "
    f"wall {_fmt(rec['wall_s'], '.0f')} s",
    flush=True,
  )
  return rec


def _memory_init_auroc(path: pathlib.Path):
  """AUROC of the teacher's scores that started the score memory (kdaif.memory_init)."""
  records, _ = report.read_metrics(str(path))
  found = [r for r in records if r["kind"] == "scoring" and r.get("phase") == "memory_init"]
  return found[0].get("auroc") if found else None


def _kdaif_drift(wd: pathlib.Path, cfg) -> list[str]:
  """The ``kdaif`` options whose value in ``wd/config.json`` differs from ``cfg``'s."""
  path = wd / "config.json"
  if not path.exists():
    return []
  saved = json.loads(path.read_text()).get("kdaif", {})
  now = cfg.kdaif.to_dict()
  return [
    f"kdaif.{k}: {saved.get(k, 'absent')!r} -> {v!r}"
    for k, v in sorted(now.items())
    if saved.get(k, "absent") != v
  ]


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def _mean_std(xs: list) -> tuple[float | None, float | None, int]:
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None, 0
  arr = np.asarray(xs, np.float64)
  return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr)


def aggregate(records: list[dict], noises, labels) -> dict:
  """Per (noise, mechanism): means and sample stds over seeds; teacher identity check."""
  agg = {}
  for noise in noises:
    for label in labels:
      rs = [
        r for r in records if r["noise"] == noise and r["mechanism"] == label and "error" not in r
      ]
      if not rs:
        continue
      entry = {"seeds": [r["seed"] for r in rs]}
      for key in ("student_test_accuracy", "teacher_test_accuracy", "auroc", "wall_s"):
        m, s, n = _mean_std([r.get(key) for r in rs])
        entry[key] = {"mean": m, "std": s, "n": n}
      agg[f"{noise:g}/{label}"] = entry
  teacher_check = {}
  for noise in noises:
    for seed in sorted({r["seed"] for r in records}):
      accs = {
        r["mechanism"]: r["teacher_test_accuracy"]
        for r in records
        if r["noise"] == noise and r["seed"] == seed and "error" not in r
      }
      if accs:
        teacher_check[f"{noise:g}/{seed}"] = {
          "identical": len(set(accs.values())) == 1,
          "accuracies": accs,
        }
  return {"by_noise_mechanism": agg, "teacher_identical": teacher_check}


def check_targets(agg: dict) -> list[dict]:
  out = []
  for t in TARGETS:
    none = agg.get(f"{t['noise']:g}/none")
    online = agg.get(f"{t['noise']:g}/online")
    res = {**t, "met": None, "gain_points": None}
    if (
      none
      and online
      and none["student_test_accuracy"]["n"]
      and online["student_test_accuracy"]["n"]
    ):
      gain = 100.0 * (
        online["student_test_accuracy"]["mean"] - none["student_test_accuracy"]["mean"]
      )
      res["gain_points"] = gain
      res["met"] = gain >= t["points"] if t["kind"] == "gain" else gain >= -t["points"]
      res["seeds"] = {"none": none["seeds"], "online": online["seeds"]}
    out.append(res)
  return out


def print_table(agg: dict, targets: list[dict], noises, labels) -> None:
  by = agg["by_noise_mechanism"]
  print(
    "\n| noise | mechanism | student test acc % | teacher test acc % | AUROC (flipped) "
    "| wall s / run | seeds |"
  )
  print("|---:|---|---:|---:|---:|---:|---:|")
  for noise in noises:
    for label in labels:
      e = by.get(f"{noise:g}/{label}")
      if e is None:
        continue
      s, t, a, w = (
        e[k] for k in ("student_test_accuracy", "teacher_test_accuracy", "auroc", "wall_s")
      )
      pct = lambda d: "-" if d["mean"] is None else f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"
      auroc = "-" if a["mean"] is None else f"{a['mean']:.3f} ± {a['std']:.3f}"
      wall = "-" if w["mean"] is None else f"{w['mean']:.0f}"
      print(f"| {100 * noise:.0f}% | {label} | {pct(s)} | {pct(t)} | {auroc} | {wall} | {s['n']} |")
  print("\nmean ± sample std over seeds (std 0 with one seed).")
  bad = [k for k, v in agg["teacher_identical"].items() if not v["identical"]]
  print(
    "teacher test accuracy identical across mechanisms per (noise, seed): "
    + ("yes" if not bad else f"NO for {', '.join(bad)}")
  )
  print("\ntargets:")
  for t in targets:
    if t["met"] is None:
      print(f"  {t['text']}: not measured (needs none and online at {100 * t['noise']:.0f}%)")
    else:
      print(
        f"  {t['text']}: online - none = {t['gain_points']:+.2f} points -> "
        f"{'MET' if t['met'] else 'MISSED'}"
      )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--quick",
    action="store_true",
    help="seed 0, noise 0.4, mechanisms none online, 3 student epochs",
  )
  ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
  ap.add_argument("--noise", type=float, nargs="+", default=None, help="default 0 0.2 0.4")
  ap.add_argument(
    "--config",
    default="default",
    help="configs/NAME.py whose recipe every arm uses (e.g. digits_asym); the bench "
    "sets the seeds, the noise rate and kind, and the mechanism",
  )
  ap.add_argument(
    "--noise-kind",
    default="symmetric",
    choices=("symmetric", "asymmetric"),
    help="label noise kind (asymmetric on digits: c -> c+1 mod 10)",
  )
  ap.add_argument(
    "--mechanisms",
    nargs="+",
    default=None,
    help=f"labels (default {' '.join(DEFAULT_MECHANISMS)}); none always runs "
    "first (it trains the shared teacher)",
  )
  ap.add_argument(
    "--student-epochs",
    type=int,
    default=None,
    help="student epochs (default: the config's, 20; quick 3)",
  )
  ap.add_argument(
    "--teacher-epochs", type=int, default=None, help="teacher epochs (default: the config's, 15)"
  )
  ap.add_argument("--progress", default="none", choices=("log", "none"))
  ap.add_argument("--workdirs", default=str(WORKDIRS))
  ap.add_argument(
    "--out", default=None, help="JSON path (default bench/results/accuracy_digits[_quick].json)"
  )
  args = ap.parse_args()
  if args.quick:
    args.seeds = args.seeds or [0]
    args.noise = args.noise or [0.4]
    args.mechanisms = args.mechanisms or ["none", "online"]
    args.student_epochs = args.student_epochs if args.student_epochs is not None else 3
  seeds = args.seeds or [0, 1, 2]
  noises = [float(n) for n in (args.noise or [0.0, 0.2, 0.4])]
  labels = list(dict.fromkeys(["none", *(args.mechanisms or DEFAULT_MECHANISMS)]))
  for label in labels:
    try:
      resolve_label(label)
    except ValueError as e:
      ap.error(str(e))
  for n in noises:
    if not 0.0 <= n < 1.0:
      ap.error(f"--noise {n}: allowed 0 <= rate < 1")
  out_path = pathlib.Path(
    args.out
    or _common.RESULTS_DIR
    / ("accuracy_digits_quick.json" if args.quick else "accuracy_digits.json")
  )

  env = _common.environment()
  print(
    f"kdaif_jax digits accuracy: seeds {seeds}, noise {noises}, mechanisms {labels}, "
    f"workdirs {pathlib.Path(args.workdirs) / tag_of(args)}; jax {env['jax_version']}, "
    f"{env['backend']}, {env['cpu_count']} CPUs",
    flush=True,
  )
  base = load_config(args.config, None)
  t_start = time.perf_counter()
  records: list[dict] = []
  failed = 0

  def save():
    agg = aggregate(records, noises, labels)
    _common.write_json(
      out_path,
      {
        "benchmark": "accuracy_digits",
        **env,
        "command": " ".join(sys.argv),
        "quick": bool(args.quick),
        "config": f"configs/{args.config}.py get_config(None)",
        "seeds": seeds,
        "noise_rates": noises,
        "noise_kind": args.noise_kind,
        "mechanisms": labels,
        "teacher_epochs": args.teacher_epochs or base.teacher.epochs,
        "student_epochs": args.student_epochs or base.student.epochs,
        "teacher_model": base.teacher.model,
        "student_model": base.student.model,
        "workdirs": str(pathlib.Path(args.workdirs) / tag_of(args)),
        "std": "sample std (ddof=1) over seeds; 0 with one seed",
        "bench_wall_s": round(time.perf_counter() - t_start, 1),
        "runs": records,
        **agg,
        "targets": check_targets(agg["by_noise_mechanism"]),
      },
    )
    return agg

  for noise in noises:
    for seed in seeds:
      teacher_dir = ""
      for label in labels:
        if label != "none" and not teacher_dir:
          records.append(
            {
              "noise": noise,
              "seed": seed,
              "mechanism": label,
              "error": "skipped: the none run (teacher source) failed",
            }
          )
          failed += 1
          continue
        try:
          rec = run_one(args, noise, seed, label, teacher_dir if label != "none" else "")
        except Exception as e:  # noqa: BLE001 - record, go on with the other runs
          traceback.print_exc()
          rec = {
            "noise": noise,
            "seed": seed,
            "mechanism": label,
            "error": f"{type(e).__name__}: {e}",
          }
          failed += 1
        records.append(rec)
        if label == "none" and "error" not in rec:
          teacher_dir = os.path.abspath(rec["workdir"])
        save()

  agg = save()
  print_table(agg, check_targets(agg["by_noise_mechanism"]), noises, labels)
  print(
    f"\nwrote {out_path} ({time.perf_counter() - t_start:.0f} s"
    + (f", {failed} run(s) FAILED" if failed else "")
    + ")"
  )
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
