"""Figures of the SAFE report (``kdaif_jax.report``): plain data in, one PNG file out.

Uses ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot): no display, no
global backend switch, no open-figure registry to leak. Each function takes the output
path first and returns it.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_DPI = 110
_CLEAN, _FLIPPED = "tab:blue", "tab:red"


def _save(fig: Figure, path: str) -> str:
  fig.savefig(path, dpi=_DPI, format="png")
  return path


def _empty(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
  ax.set_xticks([])
  ax.set_yticks([])


def training_curves(path: str, rows: dict[str, list[dict]]) -> str:
  """Accuracy and loss per epoch, one row of two panels per network.

  Args:
    path: output PNG.
    rows: {"teacher": [line, ...], "student": [...]}; a line is a dict with
      ``label``, ``x`` (epochs), ``accuracy`` and/or ``loss`` (lists, NaN allowed;
      a key may be absent), ``color``, ``ls`` (line style).
  """
  fig = Figure(figsize=(10, 3.2 * len(rows)), layout="constrained")
  axes = fig.subplots(len(rows), 2, squeeze=False)
  for r, (net, lines) in enumerate(rows.items()):
    for c, metric in enumerate(("accuracy", "loss")):
      ax = axes[r, c]
      drawn = 0
      for line in lines:
        y = line.get(metric)
        if y is None or not np.isfinite(np.asarray(y, float)).any():
          continue
        ax.plot(
          line["x"],
          y,
          line.get("ls", "-"),
          color=line.get("color"),
          marker=line.get("marker", "."),
          label=line["label"],
        )
        drawn += 1
      if drawn:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_title(f"{net}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
      else:
        _empty(ax, f"{net}: no {metric} logged")
  return _save(fig, path)


def weights_and_detection(
  path: str,
  weight: np.ndarray,
  influence: np.ndarray | None,
  noisy: np.ndarray,
  roc: dict[str, tuple] | None,
) -> str:
  """Histograms of the training weights and of the final influence (clean vs flipped),
  and ROC curves of flipped-label detection.

  Args:
    weight: [N] weights training used.
    influence: [N] whole-set influence of the final student, or None.
    noisy: [N] bool, label flipped.
    roc: {label: (fpr, tpr, auroc)} curves, or None when no label was flipped.
  """
  panels = 2 + (roc is not None)
  fig = Figure(figsize=(4.2 * panels, 3.4), layout="constrained")
  axes = fig.subplots(1, panels, squeeze=False)[0]
  for ax, values, name in ((axes[0], weight, "weight"), (axes[1], influence, "final influence")):
    finite = None if values is None else np.isfinite(values)
    if values is None or not finite.any():
      _empty(ax, f"no {name}")
      continue
    v = values[finite]
    lo, hi = float(v.min()), float(v.max())
    bins = np.linspace(lo - 0.5, hi + 0.5, 3) if hi - lo < 1e-9 else np.linspace(lo, hi, 41)
    groups = [(v[~noisy[finite]], "clean", _CLEAN)]
    if noisy.any():
      groups.append((v[noisy[finite]], "flipped", _FLIPPED))
    for g, label, color in groups:
      if g.size:
        ax.hist(g, bins=bins, alpha=0.55, color=color, label=f"{label} ({g.size})")
    ax.set_xlabel(name + (" (negative = helpful)" if name != "weight" else ""))
    ax.set_ylabel("training examples")
    ax.set_title(f"{name} distribution")
    ax.legend(fontsize=7)
  if roc is not None:
    ax = axes[2]
    for label, (fpr, tpr, auc) in roc.items():
      ax.plot(fpr, tpr, label=f"{label} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (flipped found)")
    ax.set_title("finding flipped labels")
    ax.legend(fontsize=7, loc="lower right")
  return _save(fig, path)


def example_grid(
  path: str,
  title: str,
  images: np.ndarray,
  captions: list[str],
  flipped: np.ndarray,
  ncols: int = 6,
) -> str:
  """Training images with captions; flipped labels captioned in red.

  Args:
    images: uint8 [M, H, W, C].
    captions: M strings (two short lines each).
    flipped: [M] bool.
  """
  m = len(images)
  nrows = max(1, -(-m // ncols))
  fig = Figure(figsize=(1.75 * ncols, 2.0 * nrows + 0.4), layout="constrained")
  fig.suptitle(title, fontsize=10)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.set_xticks([])
    ax.set_yticks([])
    if i >= m:
      ax.set_axis_off()
      continue
    img = np.asarray(images[i])
    if img.ndim == 3 and img.shape[-1] == 1:
      ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
      ax.imshow(img, interpolation="nearest")
    ax.set_title(captions[i], fontsize=7, color=_FLIPPED if flipped[i] else "black")
  return _save(fig, path)


def per_class(
  path: str, teacher: np.ndarray | None, student: np.ndarray | None, class_names: list[str]
) -> str:
  """Bars of per-class test accuracy of teacher and student."""
  k = len(class_names)
  fig = Figure(figsize=(min(max(6.0, 0.45 * k + 2), 18), 3.4), layout="constrained")
  ax = fig.subplots()
  x = np.arange(k)
  for offset, acc, label, color in (
    (-0.2, teacher, "teacher", "tab:gray"),
    (0.2, student, "student", "tab:green"),
  ):
    if acc is not None:
      ax.bar(x + offset, np.nan_to_num(acc), width=0.4, label=label, color=color)
  if k <= 30:
    ax.set_xticks(x, class_names, rotation=45 if k > 10 else 0, fontsize=7)
  ax.set_xlabel("class")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1.18)
  ax.set_yticks(np.linspace(0, 1, 6))
  ax.set_title("per-class test accuracy")
  ax.legend(fontsize=7, loc="upper center", ncols=2)
  return _save(fig, path)


def reliability(path: str, curves: dict[str, tuple]) -> str:
  """Reliability diagrams: accuracy per confidence bin against the diagonal.

  Args:
    curves: {net: (count [B], mean_confidence [B], accuracy [B], ece)}.
  """
  fig = Figure(figsize=(4.0 * len(curves), 3.6), layout="constrained")
  axes = fig.subplots(1, len(curves), squeeze=False)[0]
  for ax, (net, (count, conf, acc, ece)) in zip(axes, curves.items(), strict=True):
    b = len(count)
    edges = np.linspace(0, 1, b + 1)
    has = count > 0
    ax.bar(
      edges[:-1][has],
      acc[has],
      width=1 / b,
      align="edge",
      edgecolor="black",
      color="tab:blue",
      alpha=0.75,
      label="accuracy",
    )
    ax.bar(
      edges[:-1][has],
      conf[has],
      width=1 / b,
      align="edge",
      fill=False,
      edgecolor="tab:red",
      hatch="//",
      label="mean confidence",
    )
    ax.bar(
      edges[:-1] + 0.5 / b,
      count / max(count.sum(), 1),
      width=0.4 / b,
      color="0.2",
      zorder=3,
      label="share of examples",
    )
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{net}: ECE {ece:.3f}")
    ax.legend(fontsize=7, loc="upper left")
  return _save(fig, path)
