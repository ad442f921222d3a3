"""kronfluence (EK-FAC) on the same torch module, split and validation set.

The task: the training loss is the summed cross-entropy of a batch (with labels
sampled from the model's own predictive distribution when kronfluence asks for
``sample=True``, so its covariances estimate the true Fisher, which equals the
Gauss-Newton of the cross-entropy in expectation); the measurement is the summed
validation cross-entropy. kronfluence normalises its factors by the number of
examples, so its ``damping_factor`` means the same as our λ (the curvature is that
of the MEAN training loss).

Sign: kronfluence's pairwise score is g_queryᵀ (F + λI)⁻¹ g_train, positive for a
training example that LOWERS the query loss; ours is I_i = -∇ℓ_iᵀ s with s for the
MEAN validation loss, negative for a helpful example. So ours ≈ -(scores summed over
the 200 validation queries) / 200, and the flipped-label ranking uses -kronfluence.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F
import torch_side
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch.utils.data import TensorDataset


class ClassificationTask(Task):
  """Cross-entropy classification: summed training loss, summed validation loss."""

  def compute_train_loss(self, batch, model, sample=False):
    inputs, labels = batch
    logits = model(inputs)
    if sample:
      with torch.no_grad():
        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
    return F.cross_entropy(logits, labels, reduction="sum")

  def compute_measurement(self, batch, model):
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels, reduction="sum")


def run(
  flat: dict,
  split: dict,
  *,
  settings=((0.1, True),),
  batch_size: int = 256,
  seed: int = 0,
) -> dict:
  """Fits EK-FAC once and scores the training split against the validation set.

  Args:
    flat: Flax weights (``common.flatten_params``).
    split: ``common.load_split``.
    settings: ``(damping, aggregate)`` pairs to score with, each after the one
      factor fit: damping is kronfluence's ``damping_factor`` (None: its
      heuristic, 0.1 x the mean eigenvalue); aggregate True scores with the
      summed query gradient (one preconditioned vector, as ours), False with
      kronfluence's default per-query pairwise [200, N] scores, summed afterwards.
    batch_size: per-device batch size of the factor and training-gradient passes.
    seed: torch seed (the sampled labels of the Fisher).

  Returns:
    dict: ``factors_s`` and, per (damping, aggregate) setting, the [N] influence in
    OUR sign and scale convention and its scoring seconds.
  """
  torch.manual_seed(seed)
  model = torch_side.load_flax(torch_side.TorchCNN(), flat).eval()
  task = ClassificationTask()
  model = prepare_model(model, task)
  train = TensorDataset(torch_side.nchw(split["x"]), torch.from_numpy(split["y"]).long())
  query = TensorDataset(torch_side.nchw(split["xv"]), torch.from_numpy(split["yv"]).long())
  out_dir = tempfile.mkdtemp(prefix="kdaif_peers_kron_")
  try:
    analyzer = Analyzer(
      "peers",
      model,
      task,
      cpu=True,
      disable_tqdm=True,
      log_level=logging.WARNING,
      output_dir=out_dir,
    )
    t0 = time.perf_counter()
    analyzer.fit_all_factors(
      "ekfac",
      dataset=train,
      per_device_batch_size=batch_size,
      factor_args=FactorArguments(strategy="ekfac"),
      overwrite_output_dir=True,
    )
    res = {"factors_s": time.perf_counter() - t0, "scores": {}}
    for damping, agg in settings:
      name = f"scores_{damping}_{agg}"
      t0 = time.perf_counter()
      analyzer.compute_pairwise_scores(
        name,
        "ekfac",
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=len(query),
        per_device_train_batch_size=batch_size,
        score_args=ScoreArguments(damping_factor=damping, aggregate_query_gradients=agg),
        overwrite_output_dir=True,
      )
      secs = time.perf_counter() - t0
      pair = analyzer.load_pairwise_scores(name)["all_modules"].double().numpy()
      res["scores"][(damping, agg)] = {
        "influence": -pair.sum(0) / len(query),
        "scores_s": secs,
        "shape": list(pair.shape),
      }
    return res
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
