"""The SAFE report of a run: Sustainability, Accuracy, Fairness, Explainability.

  python -m kdaif_jax.report WORKDIR [--baseline PLAIN_KD_WORKDIR] [--out DIR]

``write_report`` writes ``report.md``, a self-contained ``report.html`` (pictures
embedded) and the PNGs into ``WORKDIR/report/``. It reads only the workdir's files
(config.json, summary.json, metrics.jsonl, weights.csv, predictions.npz,
splits.json), the dataset named in config.json (pictures of training examples) and
the teacher checkpoint (its predictions on them), so it works on a copy of a
workdir made elsewhere. A missing or unreadable file is named in the report's
"Missing" section with the parts it disabled; it never stops the rest.

Definitions:
  ECE          sum over 15 equal-width confidence bins of n_b/N * |acc_b - conf_b|
               (Guo et al. 2017); confidence = max softmax probability; bin b holds
               (b/15, (b+1)/15], a confidence of 0 goes to the first bin.
  AUROC        P(flipped example gets a lower weight than a clean one), ties count
               half (``scoring.detection_metrics``; = roc_auc_score(noisy, -weight)).
  precision@k  share of flipped labels among the k lowest weights, k = number flipped.
  FLOPs        XLA's cost analysis of one compiled inference forward of one example:
               a dot or convolution counts 2 per multiply-add, an elementwise op
               (bias add, ReLU) 1 per element.
  influence share  see ``_influence_share``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax import _report_plots as plots
from kdaif_jax import checkpoint, models, scoring

_GRID = 12  # examples per grid
_WEIGHT_COLUMNS = ("id", "label", "clean_label", "noisy", "influence", "weight")

# --------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------


def read_metrics(path: str) -> tuple[list[dict], list[str]]:
  """Reads metrics.jsonl: the last line per (kind, phase, net, split, step).

  Args:
    path: the file.

  Returns:
    (records in the order of their last occurrence, problems): problems are
    one-line strings, e.g. an unparsable (truncated) line that was skipped, or
    the file missing (then records is empty).
  """
  if not os.path.exists(path):
    return [], [f"{os.path.basename(path)} not found"]
  records: dict[tuple, dict] = {}
  problems = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        problems.append(f"line {n} is not valid JSON (truncated?); skipped")
        continue
      if not isinstance(rec, dict) or "kind" not in rec:
        problems.append(f"line {n} is not a metrics record; skipped")
        continue
      key = tuple(rec.get(k) for k in ("kind", "phase", "net", "split", "step"))
      records.pop(key, None)
      records[key] = rec
  return list(records.values()), problems


def _calibration(probs, labels, num_bins: int):
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  b = np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  count = np.bincount(b, minlength=num_bins)
  return count, np.bincount(b, conf, num_bins), np.bincount(b, correct, num_bins)


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
  """ECE: sum_b n_b/N * |accuracy_b - mean confidence_b| over equal-width bins.

  Args:
    probs: [N, K] predicted probabilities.
    labels: [N] true classes.
    num_bins: bins of [0, 1]; bin b holds confidences in (b/B, (b+1)/B].

  Returns:
    The ECE in [0, 1] (NaN for N = 0).
  """
  count, conf_sum, acc_sum = _calibration(probs, labels, num_bins)
  n = count.sum()
  return float(np.abs(acc_sum - conf_sum).sum() / n) if n else float("nan")


def per_class_accuracy(logits, labels, num_classes: int) -> np.ndarray:
  """Accuracy of argmax(logits) within each true class.

  Returns:
    float64 [num_classes]; NaN for a class with no examples.
  """
  labels = np.asarray(labels)
  correct = np.asarray(logits).argmax(-1) == labels
  count = np.bincount(labels, minlength=num_classes).astype(np.float64)
  hits = np.bincount(labels, correct.astype(np.float64), num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, hits / np.maximum(count, 1), np.nan)


def forward_flops(model, input_shape) -> float | None:
  """FLOPs XLA counts for one inference forward pass (its compiled cost analysis).

  Args:
    model: a ``kdaif_jax.models.Model`` (applied with ``train=False``) or a Flax
      linen module (``module.apply(variables, x)``). Only shapes are initialised
      (``jax.eval_shape``); nothing is computed.
    input_shape: the full input shape, batch included, e.g. (1, 8, 8, 1).

  Returns:
    The count, or None when the backend gives no cost analysis.
  """
  x = jax.ShapeDtypeStruct(tuple(int(d) for d in input_shape), jnp.float32)
  key = jax.random.key(0)
  if isinstance(model, models.Model):
    params, state = jax.eval_shape(model.init, key, x)
    fn, args = (lambda p, s, x: model.apply(p, s, x, False)[0]), (params, state, x)
  else:
    variables = jax.eval_shape(model.init, key, x)
    fn, args = (lambda v, x: model.apply(v, x)), (variables, x)
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, dict):
    cost = [cost]
  flops = [c.get("flops") for c in (cost or []) if isinstance(c, dict)]
  flops = [float(f) for f in flops if f is not None and f >= 0]
  return sum(flops) if flops else None


# --------------------------------------------------------------------------
# Reading a workdir (every problem recorded, nothing raised)
# --------------------------------------------------------------------------


class _Files:
  """Reads one workdir's files; each failure becomes a ``missing`` entry."""

  def __init__(self, workdir: str, label: str, missing: list[dict]):
    self.dir, self.label, self.missing = workdir, label, missing

  def note(self, name: str, problem: str, disabled: str) -> None:
    self.missing.append({"file": f"{self.label}/{name}", "problem": problem, "disabled": disabled})

  def _path(self, name: str, disabled: str) -> str | None:
    path = os.path.join(self.dir, name)
    if not os.path.exists(path):
      self.note(name, "not found", disabled)
      return None
    return path

  def json(self, name: str, disabled: str) -> dict | None:
    path = self._path(name, disabled)
    if path is None:
      return None
    try:
      with open(path, encoding="utf-8") as f:
        return dict(json.load(f))
    except (ValueError, TypeError, OSError) as err:
      self.note(name, f"unreadable ({type(err).__name__}: {err})", disabled)
      return None

  def metrics(self, disabled: str) -> list[dict]:
    path = self._path("metrics.jsonl", disabled)
    if path is None:
      return []
    records, problems = read_metrics(path)
    for p in problems:
      self.note("metrics.jsonl", p, "nothing else: the other lines are used")
    return records

  def weights(self, disabled: str) -> dict | None:
    path = self._path("weights.csv", disabled)
    if path is None:
      return None
    cols: dict[str, list] = {}
    bad = 0
    try:
      with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        names = [c for c in (reader.fieldnames or []) if c in (*_WEIGHT_COLUMNS, "final_influence")]
        if not set(_WEIGHT_COLUMNS) <= set(names):
          raise ValueError(f"columns {reader.fieldnames}, need {', '.join(_WEIGHT_COLUMNS)}")
        for row in reader:
          try:
            vals = {c: float(row[c]) for c in names}
          except (TypeError, ValueError):
            bad += 1
            continue
          for c, v in vals.items():
            cols.setdefault(c, []).append(v)
    except (ValueError, OSError, csv.Error) as err:
      self.note("weights.csv", f"unreadable ({err})", disabled)
      return None
    if bad:
      self.note("weights.csv", f"{bad} incomplete row(s) skipped", "nothing else")
    if not cols:
      self.note("weights.csv", "no rows", disabled)
      return None
    out = {c: np.asarray(v, np.float64) for c, v in cols.items()}
    for c in ("id", "label", "clean_label"):
      out[c] = out[c].astype(np.int64)
    out["noisy"] = out["noisy"] > 0
    return out

  def predictions(self, disabled: str) -> dict | None:
    path = self._path("predictions.npz", disabled)
    try:
      if path is None:
        return None
      with np.load(path, allow_pickle=False) as z:
        out = {k: np.asarray(z[k]) for k in ("labels", "teacher_logits", "student_logits")}
      n = len(out["labels"])
      if any(out[k].ndim != 2 or len(out[k]) != n for k in ("teacher_logits", "student_logits")):
        raise ValueError("logits and labels disagree in shape")
      return out
    except Exception as err:  # noqa: BLE001 - a truncated zip raises many kinds
      self.note("predictions.npz", f"unreadable ({type(err).__name__}: {err})", disabled)
      return None


def _num(v: Any) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


def _pct(v: float | None) -> str:
  return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.2f}%"


def _f(v: float | None, fmt: str = ".3f") -> str:
  return "n/a" if v is None or not np.isfinite(v) else format(v, fmt)


def _count(v: int | None) -> str:
  return f"{int(v):,}" if v else "n/a"


def _si(v: float | None) -> str:
  if v is None or not np.isfinite(v):
    return "unknown"
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(v) >= scale:
      return f"{v / scale:.3g}{unit}"
  return f"{v:.3g}"


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _image_shape(cfg_data: dict) -> tuple[int, int, int] | None:
  name = cfg_data.get("name")
  if name == "digits":
    return (8, 8, 1)
  if name == "synthetic":
    s = cfg_data.get("synthetic", {})
    return (int(s.get("image_size", 8)), int(s.get("image_size", 8)), int(s.get("channels", 3)))
  return (32, 32, 3) if name in ("cifar10", "cifar100", "svhn_cropped") else None


def _restore_net(workdir: str, phase: str, net: str) -> tuple[Any, Any, int]:
  """(params, model_state, step) of ``net`` in the newest readable checkpoint of ``phase``."""
  return checkpoint.restore_net_arrays(os.path.join(workdir, "checkpoints", phase), net)


# --------------------------------------------------------------------------
# Sections (each returns blocks: ("h", level, text), ("p", text),
# ("table", header, rows), ("ul", items), ("img", file, alt))
# --------------------------------------------------------------------------
# --------------------------------------------------------------------------
# Sections: each appends blocks (see _report_plots.render_markdown) to ctx.blocks
# --------------------------------------------------------------------------


class _Ctx:
  """What the sections share: the files read, the figures written, the numbers found."""

  def __init__(self, workdir: str, baseline: str | None, out_dir: str):
    self.workdir, self.baseline, self.out_dir = workdir, baseline, out_dir
    self.blocks: list[tuple] = []
    self.missing: list[dict] = []
    self.figures: dict[str, str] = {}
    self.numbers: dict[str, Any] = {}
    self.dataset = None
    self.files = _Files(workdir, "workdir", self.missing)
    self.config = self.files.json("config.json", "dataset pictures, FLOPs, teacher predictions")
    self.summary = self.files.json("summary.json", "overview numbers, wall time, throughput")
    self.records = self.files.metrics("training curves, CG statistics")
    self.weights = self.files.weights("weight histograms, noise detection, example pictures")
    self.preds = self.files.predictions("per-class accuracy, calibration (ECE)")
    self.base_summary, self.base_records, self.base_config = None, [], None
    if baseline:
      base = _Files(baseline, "baseline", self.missing)
      if not os.path.isdir(baseline):
        base.note("", "not a folder", "every baseline comparison")
      else:
        self.base_config = base.json("config.json", "baseline batch-size check")
        self.base_summary = base.json("summary.json", "baseline accuracy, influence share")
        self.base_records = base.metrics("baseline training curves")

  def add(self, *block) -> None:
    self.blocks.append(block)

  def figure(self, name: str, fn, *args, alt: str = "") -> None:
    path = fn(os.path.join(self.out_dir, name), *args)
    self.figures[name] = path
    self.add("img", name, alt or name)

  def cfg(self, dotted: str, default: Any = None) -> Any:
    node = self.config or {}
    for part in dotted.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    return default if node is None else node

  def net(self, net: str, key: str) -> Any:
    return ((self.summary or {}).get(net) or {}).get(key)


def _overview(c: _Ctx) -> None:
  s = c.summary or {}
  dataset = s.get("dataset") or c.cfg("data.name", "?")
  mech = s.get("mechanism") or c.cfg("kdaif.mechanism", "?")
  rate, kind = (
    s.get("noise_rate", c.cfg("data.noise.rate")),
    s.get("noise_kind", c.cfg("data.noise.kind")),
  )
  arch = {n: c.net(n, "architecture") or c.cfg(f"{n}.model", "?") for n in ("teacher", "student")}
  noise = f"{_pct(_num(rate))} {kind} label noise" if _num(rate) > 0 else "no label noise"
  c.add(
    "h", 1, f"SAFE report: {dataset}, {arch['teacher']} → {arch['student']}, mechanism `{mech}`"
  )
  c.add(
    "p",
    f"Workdir `{c.workdir}`; {noise}; {s.get('num_train', '?')} training examples; "
    f"backend {s.get('backend', '?')} x{s.get('device_count', '?')}, jax "
    f"{s.get('jax_version', '?')}. Baseline: "
    + (f"`{c.baseline}`." if c.baseline else "none given.")
    + f" Written {datetime.datetime.now():%Y-%m-%d %H:%M}.",
  )
  rows = []
  for net in ("teacher", "student"):
    rows.append(
      [
        net if net == "teacher" else f"student ({mech})",
        arch[net],
        _count(c.net(net, "parameters")),
        _pct(c.net(net, "val_accuracy")),
        _pct(c.net(net, "test_accuracy")),
      ]
    )
  b = (c.base_summary or {}).get("student") or {}
  if b:
    rows.append(
      [
        f"baseline student ({c.base_summary.get('mechanism', '?')})",
        b.get("architecture", "?"),
        _count(b.get("parameters")),
        _pct(b.get("val_accuracy")),
        _pct(b.get("test_accuracy")),
      ]
    )
    d = _num(c.net("student", "test_accuracy")) - _num(b.get("test_accuracy"))
    c.numbers["student_test_gain_vs_baseline"] = d
    rows.append(["difference (points)", "", "", "", _f(100 * d, "+.2f")])
  c.add("table", ["network", "architecture", "parameters", "val accuracy", "test accuracy"], rows)


def _accuracy(c: _Ctx) -> None:
  c.add("h", 2, "Accuracy: training curves")
  if not c.records and not c.base_records:
    c.add("p", "No curves: metrics.jsonl is missing or empty (see Missing).")
    return
  mech = c.cfg("kdaif.mechanism") or (c.summary or {}).get("mechanism", "run")
  t_epochs = max(plots.series(c.records, "eval", "teacher", "teacher", "val")[0] or [0])
  lines = plots.curve_lines
  rows = {
    "teacher": lines(c.records, "teacher", "teacher", "teacher", "tab:blue")
    + lines(
      c.records, "student", "teacher", "teacher (joint updates)", "tab:purple", offset=t_epochs
    ),
    "student": lines(c.records, "student", "student", f"student ({mech})", "tab:blue")
    + lines(c.records, "proxy", "student", "proxy (plain KD)", "tab:gray", splits=("val",)),
  }
  if c.base_records:
    bm = (c.base_summary or {}).get("mechanism") or (c.base_config or {}).get("kdaif", {}).get(
      "mechanism", "?"
    )
    rows["student"] += lines(c.base_records, "student", "student", f"baseline ({bm})", "tab:orange")
  c.figure("training_curves.png", plots.training_curves, rows, alt="training curves")
  c.add(
    "p",
    "Eval lines: clean validation/test labels, after each epoch. Train lines: the "
    "epoch's mean of the logged step objective (weighted KD loss for the student, on the "
    "possibly noisy labels).",
  )


def _explainability(c: _Ctx) -> None:
  c.add("h", 2, "Explainability: weights, flipped labels, influential examples")
  w = c.weights
  if w is None:
    c.add(
      "p",
      "No weights, detection or example pictures: weights.csv is missing or "
      "unreadable (see Missing).",
    )
    return
  noisy, weight = w["noisy"], w["weight"]
  fi = w.get("final_influence")
  fi = fi if fi is not None and np.isfinite(fi).all() else None
  k = int(noisy.sum())
  signals = {}
  if np.ptp(weight) > 0:  # plain KD: every weight 1, nothing to rank
    signals["low training weight (`weight`)"] = -weight
  if fi is not None:
    signals["high final influence (`final_influence`)"] = fi
  det = {name: scoring.detection_metrics(-score, noisy) for name, score in signals.items()}
  roc = None
  if 0 < k < len(noisy) and signals:
    from sklearn.metrics import roc_curve

    roc = {}
    for name, score in signals.items():
      fpr, tpr, _ = roc_curve(noisy, score)
      roc[name.split(" (")[0]] = (fpr, tpr, det[name]["auroc"])
  c.figure(
    "weights.png", plots.weights_and_detection, weight, fi, noisy, roc, alt="weight distribution"
  )
  c.numbers["detection"] = det
  if k == 0:
    c.add("p", "No label was flipped in this run, so there is no noise to detect.")
  else:
    rows = [[n, _f(d["auroc"]), _f(d["precision_at_k"])] for n, d in det.items()]
    sd = (c.summary or {}).get("noise_detection")
    if sd:
      rows.append(
        [
          "summary.json `noise_detection` (as written by the trainer)",
          _f(sd.get("auroc")),
          _f(sd.get("precision_at_k")),
        ]
      )
    c.add(
      "p",
      f"{k} of {len(noisy)} training labels were flipped. How well each signal ranks "
      f"them first (AUROC: chance 0.5; precision at k = {k}: chance {k / len(noisy):.3f}):",
    )
    c.add("table", ["signal", "AUROC", f"precision@{k}"], rows)
    c.add(
      "p",
      f"Mean weight: clean {_f(weight[~noisy].mean())}, flipped "
      f"{_f(weight[noisy].mean())}; weight < 0.5: {_pct((weight[~noisy] < 0.5).mean())} of "
      f"clean, {_pct((weight[noisy] < 0.5).mean())} of flipped."
      + (
        " Every weight is equal (plain KD), so weights rank nothing." if np.ptp(weight) == 0 else ""
      ),
    )
  _grids(c, fi)


def _load_dataset(c: _Ctx):
  """The run's dataset from config.json (None, with the reason noted, if it cannot be)."""
  if c.config is None:
    return None, "config.json is missing"
  try:
    import ml_collections

    from kdaif_jax import data

    ds = data.load(ml_collections.ConfigDict(c.config["data"]))
  except Exception as err:  # noqa: BLE001 - e.g. CIFAR not prepared on this machine
    return None, f"the dataset could not be loaded here ({type(err).__name__}: {err})"
  splits = c.files.json("splits.json", "the id check of the reloaded dataset") or {}
  if "train" in splits and list(splits["train"]) != [int(i) for i in ds.train.ids]:
    return None, "the reloaded dataset's training ids differ from splits.json"
  c.dataset = ds
  return ds, None


def _teacher_predictions(c: _Ctx, ds, images: np.ndarray):
  order = [("student", "teacher"), ("teacher", "teacher")]
  if c.cfg("kdaif.mechanism") != "joint":
    order.reverse()  # the trained teacher; the student phase carries a copy of it too
  errors = []
  for phase, net in order:
    try:
      params, state, step = _restore_net(c.workdir, phase, net)
      from kdaif_jax import data

      model = models.create(c.cfg(f"{net}.model"), ds.num_classes)
      logits, _ = model.apply(params, state, data.normalize(images, ds.mean, ds.std), False)
      return np.asarray(logits).argmax(-1), f"checkpoints/{phase} step {step}"
    except Exception as err:  # noqa: BLE001 - no checkpoint, or one that cannot be read
      errors.append(f"checkpoints/{phase}: {type(err).__name__}: {err}")
  c.files.note("checkpoints/teacher", "; ".join(errors), "teacher predictions in the pictures")
  return None, None


def _grids(c: _Ctx, fi) -> None:
  w = c.weights
  score, name = (fi, "final_influence") if fi is not None else (w["influence"], "influence")
  order = np.argsort(score, kind="mergesort")
  picks = {"helpful": order[:_GRID], "harmful": order[::-1][:_GRID]}
  rate = w["noisy"].mean()
  c.add("h", 3, "Most helpful and most harmful training examples")
  c.add(
    "p",
    f"Ranked by `{name}` (I_i = -grad l_i^T (C + lambda I)^-1 grad L_V: negative = "
    "up-weighting the example lowers the validation loss). Flipped: "
    + ", ".join(f"{int(w['noisy'][i].sum())} of the {len(i)} most {k}" for k, i in picks.items())
    + f" ({_pct(rate)} of all).",
  )
  ds, why = _load_dataset(c)
  pos = {} if ds is None else {int(v): j for j, v in enumerate(ds.train.ids)}
  if ds is not None and any(
    int(w["id"][i]) not in pos for i in np.concatenate(list(picks.values()))
  ):
    ds, why = None, "some example ids are not in the reloaded dataset"
  if ds is None:
    c.add("p", f"No pictures: {why}.")
    c.files.note("(dataset)", why, "example pictures")
    rows = [
      [
        k,
        int(w["id"][i]),
        int(w["label"][i]),
        int(w["clean_label"][i]),
        _f(w["weight"][i]),
        _f(score[i], ".3g"),
      ]
      for k, idx in picks.items()
      for i in idx
    ]
    c.add("table", ["group", "id", "label", "clean label", "weight", name], rows)
    return
  sel = np.concatenate(list(picks.values()))
  images = ds.train.images[[pos[int(w["id"][i])] for i in sel]]
  preds, source = _teacher_predictions(c, ds, images)
  names = [n[:9] for n in ds.class_names]
  start = 0
  for kind, idx in picks.items():
    caps = []
    for j, i in enumerate(idx, start):
      lab = names[int(w["label"][i])] + (
        f" (true {names[int(w['clean_label'][i])]})" if w["noisy"][i] else ""
      )
      t = "" if preds is None else f"T:{names[int(preds[j])]} "
      caps.append(f"#{int(w['id'][i])} y:{lab}\n{t}w:{w['weight'][i]:.2f} I:{score[i]:+.2g}")
    c.figure(
      f"most_{kind}.png",
      plots.example_grid,
      f"most {kind} ({name}); red = flipped label",
      images[start : start + len(idx)],
      caps,
      w["noisy"][idx],
      alt=f"most {kind}",
    )
    start += len(idx)
  c.add(
    "p",
    "Captions: id, given label y (true label if flipped), T: teacher prediction, "
    "w: training weight, I: influence. "
    + (
      f"Teacher from {source}."
      if preds is not None
      else "No teacher predictions: no readable teacher checkpoint (see Missing)."
    ),
  )


def _fairness(c: _Ctx) -> None:
  c.add("h", 2, "Fairness: per-class accuracy and calibration")
  p = c.preds
  if p is None:
    c.add(
      "p",
      "No per-class accuracy or calibration: predictions.npz is missing or "
      "unreadable (see Missing).",
    )
    return
  k = p["teacher_logits"].shape[1]
  names = (
    list(c.dataset.class_names)
    if c.dataset is not None and len(c.dataset.class_names) == k
    else [str(i) for i in range(k)]
  )
  rows, curves = [], {}
  acc = {}
  for net in ("teacher", "student"):
    logits = p[f"{net}_logits"]
    acc[net] = a = per_class_accuracy(logits, p["labels"], k)
    probs = _softmax(logits)
    ece = expected_calibration_error(probs, p["labels"])
    count, conf_sum, acc_sum = _calibration(probs, p["labels"], 15)
    with np.errstate(invalid="ignore", divide="ignore"):
      curves[net] = (count, conf_sum / count, acc_sum / count, ece)
    worst, best = int(np.nanargmin(a)), int(np.nanargmax(a))
    c.numbers[f"{net}_ece"], c.numbers[f"{net}_class_gap"] = ece, a[best] - a[worst]
    rows.append(
      [
        net,
        _pct(float((logits.argmax(-1) == p["labels"]).mean())),
        f"{names[worst]} ({_pct(a[worst])})",
        f"{names[best]} ({_pct(a[best])})",
        _f(100 * (a[best] - a[worst]), ".1f"),
        _f(ece, ".4f"),
      ]
    )
  c.add(
    "p",
    f"Test set, {len(p['labels'])} examples, {k} classes. Gap = best minus worst class "
    "accuracy, in points. ECE: expected calibration error, 15 equal-width confidence bins "
    "(0 = calibrated).",
  )
  c.add("table", ["network", "accuracy", "worst class", "best class", "gap", "ECE"], rows)
  c.figure(
    "per_class_accuracy.png",
    plots.per_class,
    acc["teacher"],
    acc["student"],
    names,
    alt="per-class accuracy",
  )
  c.figure("reliability.png", plots.reliability, curves, alt="reliability diagrams")


def _flops_of(c: _Ctx) -> dict:
  """{net: (flops, parameters)} of one forward of one example; reasons noted on failure."""
  shape = _image_shape(c.cfg("data", {}))
  k = None if c.preds is None else c.preds["teacher_logits"].shape[1]
  if k is None and c.config is not None:
    from kdaif_jax.data import sources

    name = c.cfg("data.name")
    k = {"digits": sources.DIGITS_CLASSES, "synthetic": c.cfg("data.synthetic.num_classes")}.get(
      name, sources.TFDS_DATASETS.get(name, (None,))[0]
    )
  out = {}
  for net in ("teacher", "student"):
    arch = c.cfg(f"{net}.model") or c.net(net, "architecture")
    try:
      if shape is None or k is None or arch is None:
        raise ValueError("input shape, classes or architecture unknown (config.json)")
      model = models.create(arch, int(k))
      params, _ = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *shape), jnp.float32)
      )
      out[net] = (forward_flops(model, (1, *shape)), models.param_count(params))
    except Exception as err:  # noqa: BLE001 - e.g. an architecture this version lacks
      out[net] = (None, None)
      c.files.note(
        "config.json", f"FLOPs of the {net}: {type(err).__name__}: {err}", f"{net} FLOPs"
      )
  return out


def _influence_share(c: _Ctx) -> str:
  """How much of the student's training time went to influence, and how we know.

  none: nothing. static/periodic: measured, the whole-set scorings' seconds
  (metrics.jsonl scoring lines) against the student-side time. online/joint: the
  influence runs inside every step, so only a comparison tells: 1 - rate/rate_plain
  with the steps/s of a plain-KD baseline's student (same architecture, batch size,
  backend and device count); otherwise unknown.
  """
  s, mech = c.summary or {}, c.cfg("kdaif.mechanism") or (c.summary or {}).get("mechanism")
  wall = s.get("wall_time_s") or {}
  if mech == "none":
    return "Plain KD (`none`): no influence during training (0%)."
  if mech in ("static", "periodic"):
    secs = sum(_num(r.get("seconds")) for r in c.records if r.get("kind") == "scoring")
    if not secs or not wall:
      return "Share of time on influence: unknown (no scoring lines or no wall times)."
    proxy = _num(wall.get("proxy", 0)) if mech == "static" else 0.0
    # static scores between the proxy and student phases; periodic inside the student phase.
    total = _num(wall.get("student")) + proxy + (secs if mech == "static" else 0.0)
    c.numbers["influence_share"] = secs / total
    return (
      f"Share of time on influence: {_pct(secs / total)}, measured: the whole-set "
      f"scorings took {secs:.1f} s (metrics.jsonl scoring lines) of {total:.1f} s of "
      "student-side training"
      + (
        " (proxy + scoring + student). With the proxy student "
        f"it needs, `static` spends {_pct((secs + proxy) / total)}"
        " of that time beyond training the final student."
        if mech == "static"
        else " (scorings included)."
      )
    )
  b = c.base_summary or {}
  rate, rate_plain = (
    _num((s.get("steps_per_second") or {}).get("student")),
    _num((b.get("steps_per_second") or {}).get("student")),
  )
  same = (
    b.get("mechanism") == "none"
    and all(b.get(key) == s.get(key) for key in ("backend", "device_count"))
    and (b.get("student") or {}).get("architecture") == c.net("student", "architecture")
    and (c.base_config or {}).get("batch_size") == c.cfg("batch_size")
  )
  if not b or not same or not rate > 0 or not rate_plain > 0:
    return (
      "Share of time on influence: unknown. It runs inside every step; estimating it "
      "needs a plain-KD baseline workdir with the same student, batch size and hardware "
      "(`--baseline`)."
    )
  share = 1 - rate / rate_plain
  c.numbers["influence_share"] = share
  return (
    f"Share of time on influence: about {_pct(share)}, estimated as 1 - rate/rate_plain "
    f"from the student steps/s ({rate:.3g} here vs {rate_plain:.3g} for plain KD in the "
    "baseline); both runs' other loads on the machine enter this estimate."
    + (" Negative: the difference is within timing noise." if share < 0 else "")
  )


def _sustainability(c: _Ctx) -> None:
  c.add("h", 2, "Sustainability: size, compute, time")
  cost = _flops_of(c)
  par = {n: c.net(n, "parameters") or cost[n][1] for n in ("teacher", "student")}
  fl = {n: cost[n][0] for n in ("teacher", "student")}
  ratio = lambda d: (
    (_f(d["teacher"] / d["student"], ".2f") + "x") if d["teacher"] and d["student"] else "n/a"
  )
  c.numbers.update(
    compression_ratio=par["teacher"] / par["student"]
    if par["teacher"] and par["student"]
    else None,
    flops=fl,
  )
  c.add(
    "table",
    ["", "teacher", "student", "compression (teacher / student)"],
    [
      ["parameters", _count(par["teacher"]), _count(par["student"]), ratio(par)],
      ["FLOPs per example (forward)", _si(fl["teacher"]), _si(fl["student"]), ratio(fl)],
    ],
  )
  c.add(
    "p",
    "FLOPs: XLA's cost analysis of the compiled inference forward pass of one example "
    "(2 per multiply-add; elementwise ops 1 each).",
  )
  s = c.summary or {}
  wall, rates = s.get("wall_time_s") or {}, s.get("steps_per_second") or {}
  if wall:
    known = ("teacher", "proxy", "student", "final", "total_this_invocation")
    phases = [k for k in known if k in wall] + [k for k in wall if k not in known]
    rows = [
      [k, _f(_num(wall[k]), ".1f"), _f(_num(rates.get(k)), ".2f") if k in rates else ""]
      for k in phases
    ]
    c.add("table", ["phase", "wall time (s)", "steps/s"], rows)
    c.add(
      "p",
      "Wall time of the last invocation for `total_this_invocation`; phases resumed "
      "from a checkpoint include the time before the restart. `final`: evaluation plus the "
      "whole-set influence written to weights.csv. Steps/s exclude the first (compiling) "
      "step.",
    )
  cg = [
    r
    for r in c.records
    if r.get("kind") == "train" and r.get("phase") == "student" and "cg_iterations" in r
  ]
  if cg:
    its = np.nanmean([_num(r["cg_iterations"]) for r in cg])
    res = np.nanmedian([_num(r.get("cg_residual")) for r in cg])
    c.add("p", f"CG per logged student step: {its:.1f} iterations, residual {res:.2e} (median).")
  c.add("p", _influence_share(c))


def _missing(c: _Ctx) -> None:
  c.add("h", 2, "Missing")
  if not c.missing:
    c.add("p", "Nothing: every file was found and read.")
    return
  c.add(
    "table",
    ["file", "problem", "disabled"],
    [[m["file"], m["problem"], m["disabled"]] for m in c.missing],
  )


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def write_report(workdir: str, baseline: str | None = None, out_dir: str | None = None) -> dict:
  """Writes the SAFE report of ``workdir`` (see the module docstring).

  Args:
    workdir: a run's folder (complete, partial, or copied from elsewhere).
    baseline: optional plain-KD workdir to compare with (curves, accuracy, cost).
    out_dir: where to write; default ``WORKDIR/report``.

  Returns:
    dict: ``report_md``, ``report_html`` (paths), ``figures`` ({file name: path}),
    ``missing`` (list of {file, problem, disabled}), ``numbers`` (headline values:
    ECEs, detection metrics, compression ratio, FLOPs, influence share, ...).

  Raises:
    FileNotFoundError: ``workdir`` is not a folder (anything missing inside it is
      reported, not raised).
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} is not a folder")
  out_dir = out_dir or os.path.join(workdir, "report")
  os.makedirs(out_dir, exist_ok=True)
  c = _Ctx(workdir, baseline, out_dir)
  for section in (_overview, _accuracy, _explainability, _fairness, _sustainability):
    try:
      section(c)
    except Exception as err:  # noqa: BLE001 - one broken section must not cost the rest
      c.add("p", f"This section failed: {type(err).__name__}: {err}")
      c.files.note(
        "(report)",
        f"{section.__name__[1:]} failed: {type(err).__name__}: {err}",
        f"the {section.__name__[1:]} section",
      )
  _missing(c)
  md = os.path.join(out_dir, "report.md")
  with open(md, "w", encoding="utf-8") as f:
    f.write(plots.render_markdown(c.blocks))
  page = os.path.join(out_dir, "report.html")
  with open(page, "w", encoding="utf-8") as f:
    f.write(plots.render_html(c.blocks, out_dir, f"SAFE report: {workdir}"))
  return {
    "report_md": md,
    "report_html": page,
    "figures": c.figures,
    "missing": c.missing,
    "numbers": c.numbers,
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m kdaif_jax.report",
    description=("Write the SAFE report (report.md, report.html, PNGs) of a kdaif_jax workdir."),
  )
  parser.add_argument("workdir")
  parser.add_argument("--baseline", help="a plain-KD workdir to compare with")
  parser.add_argument("--out", help="output folder (default WORKDIR/report)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    parser.error(f"{args.workdir} is not a folder")
  out = write_report(args.workdir, args.baseline, args.out)
  print(f"wrote {out['report_md']} and {out['report_html']} ({len(out['figures'])} figures)")
  for m in out["missing"]:
    print(f"missing: {m['file']}: {m['problem']} (disabled: {m['disabled']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
