"""Each GLUE task's official metrics (Wang et al., 2019), via scikit-learn and scipy.

CoLA: Matthews correlation; MRPC and QQP: F1 (of the positive class) and accuracy;
STS-B: Pearson and Spearman correlation; the others: accuracy.
"""

from __future__ import annotations

import numpy as np

# task -> its metric names, the first one the task's headline number
TASK_METRICS = {
  "cola": ("matthews",),
  "sst2": ("accuracy",),
  "mrpc": ("f1", "accuracy"),
  "qqp": ("f1", "accuracy"),
  "stsb": ("pearson", "spearman"),
  "mnli": ("accuracy",),
  "mnli_mismatched": ("accuracy",),
  "qnli": ("accuracy",),
  "rte": ("accuracy",),
  "wnli": ("accuracy",),
}


def task_metrics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """The official metrics of ``task`` for a model's outputs.

  Args:
    task: a key of ``TASK_METRICS``.
    outputs: [N, K] logits, or [N, 1] / [N] regression outputs (stsb).
    labels: [N] class ids, or float scores (stsb).

  Returns:
    {metric name: value}, in ``TASK_METRICS[task]`` order; NaN where a metric is
    undefined (e.g. a correlation of constant predictions).

  Raises:
    ValueError: an unknown task or outputs and labels of different lengths.
  """
  from scipy import stats
  from sklearn import metrics

  if task not in TASK_METRICS:
    raise ValueError(f"unknown GLUE task {task!r}; allowed: {', '.join(TASK_METRICS)}")
  outputs, labels = np.asarray(outputs), np.asarray(labels)
  if len(outputs) != len(labels):
    raise ValueError(f"{len(outputs)} outputs but {len(labels)} labels")
  if task == "stsb":
    pred = outputs.reshape(len(outputs), -1)[:, 0].astype(np.float64)
    y = labels.astype(np.float64)
    constant = np.ptp(pred) == 0 or np.ptp(y) == 0 if len(y) else True
    if constant:  # scipy warns (and returns NaN) on constant input
      return {"pearson": float("nan"), "spearman": float("nan")}
    return {
      "pearson": float(stats.pearsonr(pred, y)[0]),
      "spearman": float(stats.spearmanr(pred, y)[0]),
    }
  pred = outputs.argmax(-1)
  fns = {
    "accuracy": metrics.accuracy_score,
    "f1": lambda y, p: metrics.f1_score(y, p, zero_division=0.0),
    "matthews": metrics.matthews_corrcoef,
  }
  return {name: float(fns[name](labels, pred)) for name in TASK_METRICS[task]}
