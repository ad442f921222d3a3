"""The SAFE report's overview, Accuracy and Fairness sections, and the Missing list.

A section takes the ``Context`` and appends blocks (see ``kdaif_jax.report.render``) and
figures to it; the Explainability section is in ``explain``, Sustainability in ``cost``.
"""

from __future__ import annotations

import datetime

import numpy as np

from kdaif_jax import metrics
from kdaif_jax.report import plots
from kdaif_jax.report.render import fmt, num, pct, thousands
from kdaif_jax.report.workdir import Context, pseudo_label_by_epoch


def _series(records: list[dict], kind: str, phase: str, net: str | None, split: str | None):
  """(epochs, {metric: per-epoch mean}) of the matching metrics.jsonl records.

  Eval records carry the number of epochs done; a train record carries the epoch it is
  in, so it is placed at the end of that epoch (epoch + 1).
  """
  by: dict[int, dict[str, list]] = {}
  for r in records:
    if (r.get("kind"), r.get("phase"), r.get("net"), r.get("split")) != (kind, phase, net, split):
      continue
    e = int(num(r.get("epoch", 0))) + (kind == "train")
    for m in ("accuracy", "loss"):
      by.setdefault(e, {}).setdefault(m, []).append(num(r.get(m)))
  xs = sorted(by)
  return xs, {m: [float(np.mean(by[e].get(m, [np.nan]))) for e in xs] for m in ("accuracy", "loss")}


def _curve_lines(
  records: list[dict],
  phase: str,
  net: str,
  name: str,
  color: str,
  offset: int = 0,
  splits: tuple[str, ...] = ("val", "test"),
) -> list[dict]:
  """Lines for ``plots.training_curves``: eval accuracy/loss of ``net`` in ``phase`` per split,
  and (when ``net`` is the phase's own network) the epoch mean of the train objective."""
  out = []
  for split, ls, marker in zip(splits, ("-", "--"), ("o", "x"), strict=False):
    x, ys = _series(records, "eval", phase, net, split)
    if x:
      out.append(
        {
          "label": f"{name} {split}",
          "x": [e + offset for e in x],
          **ys,
          "color": color,
          "ls": ls,
          "marker": marker,
        }
      )
  if splits == ("val", "test"):
    x, ys = _series(records, "train", phase, None, None)
    if x and net == phase:
      out.append(
        {
          "label": f"{name} train (objective)",
          "x": [e + offset for e in x],
          "loss": ys["loss"],
          "color": color,
          "ls": ":",
        }
      )
  return out


def _pseudo_label_line(records: list[dict], offset: int) -> list[dict]:
  """SSL runs: the epoch mean of the teacher's pseudo-label accuracy on the
  unlabelled batches (against their hidden true labels), as a teacher line."""
  by = pseudo_label_by_epoch(records)
  if not by:
    return []
  return [
    {
      "label": "teacher pseudo-labels (unlabelled, hidden truth)",
      "x": [e + 1 + offset for e in by],
      "accuracy": list(by.values()),
      "color": "tab:green",
      "ls": "-.",
    }
  ]


def overview(c: Context) -> None:
  """Title, run description and the accuracy table (baseline student and gain too)."""
  s = c.summary or {}
  dataset = s.get("dataset") or c.cfg("data.name", "?")
  mech = s.get("mechanism") or c.cfg("kdaif.mechanism", "?")
  rate, kind = (
    s.get("noise_rate", c.cfg("data.noise.rate")),
    s.get("noise_kind", c.cfg("data.noise.kind")),
  )
  arch = {n: c.net(n, "architecture") or c.cfg(f"{n}.model", "?") for n in ("teacher", "student")}
  noise = f"{pct(num(rate))} {kind} label noise" if num(rate) > 0 else "no label noise"
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
  # The trainer's collapse warnings (summary.json ``warnings``): a finished run that
  # did not learn must not read like a result.
  for warning in s.get("warnings") or []:
    c.add("p", f"**Warning:** {warning}")
  c.numbers["warnings"] = list(s.get("warnings") or [])
  rows = []
  for net in ("teacher", "student"):
    rows.append(
      [
        net if net == "teacher" else f"student ({mech})",
        arch[net],
        thousands(c.net(net, "parameters")),
        pct(c.net(net, "val_accuracy")),
        pct(c.net(net, "test_accuracy")),
      ]
    )
  b = (c.base_summary or {}).get("student") or {}
  if b:
    rows.append(
      [
        f"baseline student ({c.base_summary.get('mechanism', '?')})",
        b.get("architecture", "?"),
        thousands(b.get("parameters")),
        pct(b.get("val_accuracy")),
        pct(b.get("test_accuracy")),
      ]
    )
    d = num(c.net("student", "test_accuracy")) - num(b.get("test_accuracy"))
    c.numbers["student_test_gain_vs_baseline"] = d
    rows.append(["difference (points)", "", "", "", fmt(100 * d, "+.2f")])
  c.add("table", ["network", "architecture", "parameters", "val accuracy", "test accuracy"], rows)
  tm = s.get("task_metrics") or {}  # GLUE: the task's official metrics (STS-B: no accuracy)
  names = list(tm.get("student") or {})
  if names:
    c.add("p", "The task's official metrics on its test (dev) split:")
    nets = [n for n in ("teacher", "student") if n in tm]
    c.add("table", ["network", *names], [[n, *(fmt(tm[n].get(k)) for k in names)] for n in nets])


def accuracy(c: Context) -> None:
  """Training curves of teacher and student (proxy, joint teacher, baseline if any)."""
  c.add("h", 2, "Accuracy: training curves")
  if not c.records and not c.base_records:
    c.add("p", "No curves: metrics.jsonl is missing or empty (see Missing).")
    return
  mech = c.cfg("kdaif.mechanism") or (c.summary or {}).get("mechanism", "run")
  t_epochs = max(_series(c.records, "eval", "teacher", "teacher", "val")[0] or [0])
  lines = _curve_lines
  rows = {
    "teacher": lines(c.records, "teacher", "teacher", "teacher", "tab:blue")
    + lines(
      c.records, "student", "teacher", "teacher (joint updates)", "tab:purple", offset=t_epochs
    )
    + _pseudo_label_line(c.records, t_epochs),
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
  pseudo = _pseudo_label_line(c.records, t_epochs)
  if pseudo:
    acc = pseudo[0]["accuracy"]
    c.numbers["pseudo_label_accuracy"] = {"first_epoch": acc[0], "last_epoch": acc[-1]}
    c.add(
      "p",
      f"The teacher's pseudo-labels on the unlabelled batches were right for "
      f"{pct(acc[0])} of the examples in the student's first epoch and {pct(acc[-1])} in "
      "its last (against the true labels the splits keep for analysis only; with "
      "`joint` the teacher learns from the student's feedback in between).",
    )


def fairness(c: Context) -> None:
  """Per-class test accuracy, worst/best class gap and calibration (ECE, reliability)."""
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
  if np.issubdtype(np.asarray(p["labels"]).dtype, np.floating):  # regression (GLUE STS-B)
    c.add("p", "No classes (a regression task): see summary.json `task_metrics`.")
    return
  names = (
    list(c.dataset.class_names)
    if c.dataset is not None and len(c.dataset.class_names) == k
    else [str(i) for i in range(k)]
  )
  rows, curves = [], {}
  acc = {}
  for net in ("teacher", "student"):
    logits = p[f"{net}_logits"]
    acc[net] = a = metrics.per_class_accuracy(logits, p["labels"], k)
    probs = metrics.softmax(logits)
    ece = metrics.expected_calibration_error(probs, p["labels"])
    count, conf_sum, acc_sum = metrics.calibration_bins(probs, p["labels"], 15)
    with np.errstate(invalid="ignore", divide="ignore"):
      curves[net] = (count, conf_sum / count, acc_sum / count, ece)
    worst, best = int(np.nanargmin(a)), int(np.nanargmax(a))
    c.numbers[f"{net}_ece"], c.numbers[f"{net}_class_gap"] = ece, a[best] - a[worst]
    rows.append(
      [
        net,
        pct(float((logits.argmax(-1) == p["labels"]).mean())),
        f"{names[worst]} ({pct(a[worst])})",
        f"{names[best]} ({pct(a[best])})",
        fmt(100 * (a[best] - a[worst]), ".1f"),
        fmt(ece, ".4f"),
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


def missing(c: Context) -> None:
  """The Missing table: every file that could not be used, and what it disabled."""
  c.add("h", 2, "Missing")
  if not c.missing:
    c.add("p", "Nothing: every file was found and read.")
    return
  c.add(
    "table",
    ["file", "problem", "disabled"],
    [[m["file"], m["problem"], m["disabled"]] for m in c.missing],
  )
