"""The SAFE report of a run: Sustainability, Accuracy, Fairness, Explainability.

  python -m kdaif_jax.report WORKDIR [--baseline PLAIN_KD_WORKDIR] [--out DIR]

``write_report`` writes ``report.md``, a self-contained ``report.html`` (pictures
embedded) and the PNGs into ``WORKDIR/report/``. It reads only the workdir's files
(config.json, summary.json, metrics.jsonl, weights.csv, predictions.npz,
splits.json), the dataset named in config.json (pictures of training examples) and
the teacher checkpoint (its predictions on them), so it works on a copy of a
workdir made elsewhere. A missing or unreadable file is named in the report's
"Missing" section with the parts it disabled; it never stops the rest.

This package imports no training module (step, ssl, scoring, loop, trainer, config):
only ``kdaif_jax.metrics``, ``models``, ``checkpoint`` and ``data``. Its modules:
  workdir   reading a workdir's files, the missing-files bookkeeping, the shared Context
  sections  the overview, Accuracy and Fairness sections and the Missing list
  explain   the Explainability section (weights, flipped-label detection, examples)
  cost      the Sustainability section (parameters, FLOPs, time, influence share)
  plots     the matplotlib figures
  render    number formatting, Markdown and HTML pages
  write     write_report and the command line (main)

Definitions:
  ECE          sum over 15 equal-width confidence bins of n_b/N * |acc_b - conf_b|
               (Guo et al. 2017); confidence = max softmax probability; bin b holds
               (b/15, (b+1)/15], a confidence of 0 goes to the first bin
               (``kdaif_jax.metrics.expected_calibration_error``).
  AUROC        P(flipped example gets a lower weight than a clean one), ties count
               half (``kdaif_jax.metrics.detection_metrics``; = roc_auc_score(noisy, -weight)).
  precision@k  share of flipped labels among the k lowest weights, k = number flipped.
  FLOPs        XLA's cost analysis of one compiled inference forward of one example:
               a dot or convolution counts 2 per multiply-add, an elementwise op
               (bias add, ReLU) 1 per element; input shape and class count from
               ``kdaif_jax.data.image_shape`` / ``num_classes``.
  influence share  see ``kdaif_jax.report.cost._influence_share``.
"""

from kdaif_jax.metrics import expected_calibration_error, per_class_accuracy
from kdaif_jax.report.cost import forward_flops
from kdaif_jax.report.workdir import pseudo_label_by_epoch, read_metrics
from kdaif_jax.report.write import main, write_report

__all__ = [
  "expected_calibration_error",
  "forward_flops",
  "main",
  "per_class_accuracy",
  "pseudo_label_by_epoch",
  "read_metrics",
  "write_report",
]
