"""Numpy metrics shared by the trainer and the SAFE report (``kdaif_jax.report``).

Plain numpy (and scikit-learn) on host arrays: nothing here imports JAX or the
training stack, so the report can use them without loading it.

  detection_metrics           how well LOW weights find flipped labels (AUROC, precision@k)
  softmax                     row-wise softmax of logits
  calibration_bins            per-bin counts, confidence and accuracy sums (for ECE and plots)
  expected_calibration_error  ECE over equal-width confidence bins (Guo et al. 2017)
  per_class_accuracy          accuracy of argmax(logits) within each true class
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = [
  "calibration_bins",
  "detection_metrics",
  "expected_calibration_error",
  "per_class_accuracy",
  "softmax",
]


def detection_metrics(weights, noisy) -> dict[str, Any]:
  """How well LOW weights find flipped labels.

  AUROC = P(w_flipped < w_clean) + 1/2 P(w_flipped = w_clean) over all (flipped, clean)
  pairs (the Mann-Whitney U statistic / (k (N - k))), computed as
  ``sklearn.metrics.roc_auc_score(noisy, -weights)``. precision@k = share of flipped
  labels among the k lowest weights, k = number flipped (ties broken by position, a
  stable sort).

  Args:
    weights: [N] per-example weights (finite; to rank by a score where HIGH is
      suspicious, pass ``-score``).
    noisy: [N] bool (or 0/1), label was flipped.

  Returns:
    dict with ``auroc`` (float), ``precision_at_k`` (float) and ``num_noisy`` (int, k).
    ``auroc`` and ``precision_at_k`` are None when no label or every label was
    flipped (k = 0 or k = N); ``precision_at_k`` is also None when all weights are
    equal (plain KD: AUROC is then 0.5, but "the k lowest" would be arbitrary).
  """
  noisy = np.asarray(noisy, bool).reshape(-1)
  weights = np.asarray(weights, np.float64).reshape(-1)
  k = int(noisy.sum())
  if k == 0 or k == noisy.size:
    return {"auroc": None, "precision_at_k": None, "num_noisy": k}
  auroc = float(roc_auc_score(noisy, -weights))  # higher -weight = more suspicious
  if np.all(weights == weights[0]):
    return {"auroc": auroc, "precision_at_k": None, "num_noisy": k}
  lowest = np.argsort(weights, kind="mergesort")[:k]
  return {"auroc": auroc, "precision_at_k": float(noisy[lowest].mean()), "num_noisy": k}


def softmax(logits) -> np.ndarray:
  """Softmax over the last axis, in float64: exp(z - max z) / sum exp(z - max z).

  Args:
    logits: [..., K] scores.

  Returns:
    float64 [..., K] probabilities; each row sums to 1.
  """
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def calibration_bins(probs, labels, num_bins: int = 15):
  """Per-bin sums behind ECE and reliability diagrams.

  Confidence = max probability; correct = (argmax == label). Bin b (0-based) holds
  confidences in (b/B, (b+1)/B]; a confidence of 0 goes to bin 0.

  Args:
    probs: [N, K] predicted probabilities.
    labels: [N] true classes.
    num_bins: B, equal-width bins of [0, 1].

  Returns:
    (count, confidence_sum, correct_sum), each [B]: examples, summed confidences and
    summed correct predictions per bin (count int64, the sums float64).
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  b = np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  count = np.bincount(b, minlength=num_bins)
  return count, np.bincount(b, conf, num_bins), np.bincount(b, correct, num_bins)


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
  """ECE: sum_b n_b/N * |accuracy_b - mean confidence_b| over equal-width bins.

  Bins as in ``calibration_bins`` (Guo et al. 2017; confidence = max probability).

  Args:
    probs: [N, K] predicted probabilities.
    labels: [N] true classes.
    num_bins: bins of [0, 1]; bin b holds confidences in (b/B, (b+1)/B].

  Returns:
    The ECE in [0, 1] (NaN for N = 0).
  """
  count, conf_sum, acc_sum = calibration_bins(probs, labels, num_bins)
  n = count.sum()
  return float(np.abs(acc_sum - conf_sum).sum() / n) if n else float("nan")


def per_class_accuracy(logits, labels, num_classes: int) -> np.ndarray:
  """Accuracy of argmax(logits) within each true class: hits_c / count_c.

  Args:
    logits: [N, K] scores (or probabilities).
    labels: [N] true classes in [0, num_classes).
    num_classes: length of the result.

  Returns:
    float64 [num_classes]; NaN for a class with no examples.
  """
  labels = np.asarray(labels)
  correct = np.asarray(logits).argmax(-1) == labels
  count = np.bincount(labels, minlength=num_classes).astype(np.float64)
  hits = np.bincount(labels, correct.astype(np.float64), num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, hits / np.maximum(count, 1), np.nan)
