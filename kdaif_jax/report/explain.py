"""The SAFE report's Explainability section: weights, flipped-label detection, examples.

The pictures of the most helpful and most harmful training examples come from the
dataset named in config.json, reloaded here, and the teacher's predictions on them from
its checkpoint; when either is unavailable the section says why and goes on without.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from sklearn.metrics import roc_curve

from kdaif_jax import checkpoint, data, metrics, models
from kdaif_jax.report import plots
from kdaif_jax.report.render import fmt, pct
from kdaif_jax.report.workdir import Context

_GRID = 12  # examples per grid


def _restore_net(workdir: str, phase: str, net: str) -> tuple[Any, Any, int]:
  """(params, model_state, step) of ``net`` in the newest readable checkpoint of ``phase``."""
  return checkpoint.restore_net_arrays(os.path.join(workdir, "checkpoints", phase), net)


def explainability(c: Context) -> None:
  """Weight and influence histograms, flipped-label detection, most helpful/harmful examples."""
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
  oracle = c.cfg("kdaif.mechanism") == "oracle"
  if np.ptp(weight) > 0:  # plain KD: every weight 1, nothing to rank
    # The oracle's weight is its answer: the flips, or (semi-supervised) the right pseudo-labels.
    ssl_run = c.cfg("data.num_labelled", 0) > 0
    answer = "the teacher's right pseudo-labels" if ssl_run else "the flip mask itself"
    name = f"the oracle's weight ({answer})" if oracle else "low training weight"
    signals[f"{name} (`weight`)"] = -weight
  if fi is not None:
    signals["high final influence (`final_influence`)"] = fi
  det = {name: metrics.detection_metrics(-score, noisy) for name, score in signals.items()}
  roc = None
  if 0 < k < len(noisy) and signals:
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
    rows = [[n, fmt(d["auroc"]), fmt(d["precision_at_k"])] for n, d in det.items()]
    sd = (c.summary or {}).get("noise_detection")
    if sd:
      rows.append(
        [
          "summary.json `noise_detection` (as written by the trainer)",
          fmt(sd.get("auroc")),
          fmt(sd.get("precision_at_k")),
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
      f"Mean weight: clean {fmt(weight[~noisy].mean())}, flipped "
      f"{fmt(weight[noisy].mean())}; weight < 0.5: {pct((weight[~noisy] < 0.5).mean())} of "
      f"clean, {pct((weight[noisy] < 0.5).mean())} of flipped."
      + (
        " Every weight is equal (plain KD), so weights rank nothing." if np.ptp(weight) == 0 else ""
      ),
    )
  _grids(c, fi)


def _load_dataset(c: Context):
  """The run's dataset from config.json (None, with the reason noted, if it cannot be)."""
  if c.config is None:
    return None, "config.json is missing"
  try:
    ds = data.load(ml_collections.ConfigDict(c.config["data"]))
  except Exception as err:  # noqa: BLE001 - e.g. CIFAR not prepared on this machine
    return None, f"the dataset could not be loaded here ({type(err).__name__}: {err})"
  splits = c.files.json("splits.json", "the id check of the reloaded dataset") or {}
  if "train" in splits and list(splits["train"]) != [int(i) for i in ds.train.ids]:
    return None, "the reloaded dataset's training ids differ from splits.json"
  c.dataset = ds
  return ds, None


def _teacher_predictions(c: Context, ds, images: np.ndarray):
  """(teacher argmax on ``images``, "checkpoints/PHASE step N"), or (None, None), noted."""
  order = [("student", "teacher"), ("teacher", "teacher")]
  if c.cfg("kdaif.mechanism") != "joint":
    order.reverse()  # the trained teacher; the student phase carries a copy of it too
  errors = []
  for phase, net in order:
    try:
      params, state, step = _restore_net(c.workdir, phase, net)
      model = models.create(c.cfg(f"{net}.model"), ds.num_classes)
      logits, _ = model.apply(params, state, data.normalize(images, ds.mean, ds.std), False)
      return np.asarray(logits).argmax(-1), f"checkpoints/{phase} step {step}"
    except Exception as err:  # noqa: BLE001 - no checkpoint, or one that cannot be read
      errors.append(f"checkpoints/{phase}: {type(err).__name__}: {err}")
  c.files.note("checkpoints/teacher", "; ".join(errors), "teacher predictions in the pictures")
  return None, None


def _grids(c: Context, fi) -> None:
  """Pictures (or, without the dataset, a table) of the most helpful and harmful examples."""
  w = c.weights
  score, name = (fi, "final_influence") if fi is not None else (w["influence"], "influence")
  order = np.argsort(score, kind="mergesort")
  picks = {"helpful": order[:_GRID], "harmful": order[::-1][:_GRID]}
  rate = w["noisy"].mean()
  c.add("h", 3, "Most helpful and most harmful training examples")
  if "text" in w:  # GLUE: the sentences themselves, not pictures
    _text_table(c, w, score, name, picks)
    return
  c.add(
    "p",
    f"Ranked by `{name}` (I_i = -grad l_i^T (C + lambda I)^-1 grad L_V: negative = "
    "up-weighting the example lowers the validation loss). Flipped: "
    + ", ".join(f"{int(w['noisy'][i].sum())} of the {len(i)} most {k}" for k, i in picks.items())
    + f" ({pct(rate)} of all).",
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
        fmt(w["weight"][i]),
        fmt(score[i], ".3g"),
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


def _text_table(c: Context, w: dict, score: np.ndarray, name: str, picks: dict) -> None:
  """The most helpful and harmful training sentences (weights.csv's ``text``), as a table."""
  c.add(
    "p",
    f"Ranked by `{name}` (negative = up-weighting the example lowers the validation "
    "loss). Flipped: "
    + ", ".join(f"{int(w['noisy'][i].sum())} of the {len(i)} most {k}" for k, i in picks.items())
    + f" ({pct(w['noisy'].mean())} of all).",
  )
  regression = np.issubdtype(w["label"].dtype, np.floating)  # STS-B's scores
  rows = [
    [
      k,
      int(w["id"][i]),
      str(w["text"][i])[:160].replace("|", "/"),
      fmt(w["label"][i], ".3g") if regression else int(w["label"][i]),
      "yes" if w["noisy"][i] else "",
      fmt(w["weight"][i]),
      fmt(score[i], ".3g"),
    ]
    for k, idx in picks.items()
    for i in idx
  ]
  c.add("table", ["group", "id", "text", "label", "flipped", "weight", name], rows)
