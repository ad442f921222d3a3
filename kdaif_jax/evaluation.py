"""Evaluation of a run's networks: chunked, sharded accuracy and loss of a split,
the task metrics of text, and the per-epoch eval records of ``metrics.jsonl``.

Examples are evaluated with clean labels and frozen batch statistics; a chunk is
padded to one compiled size and its padding masked out of the sums.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import numpy as np

from kdaif_jax import data, models, parallel
from kdaif_jax import step as step_lib
from kdaif_jax.logs import log
from kdaif_jax.parallel import BATCH, REPLICATED
from kdaif_jax.text import tokenize

if TYPE_CHECKING:  # the loop imports this module
  from kdaif_jax import loop


@functools.cache
def _eval_fn(model: models.Model, prepare, mesh):
  fn = step_lib.make_eval_step(model, prepare)
  return jax.jit(
    parallel.shard_map(fn, mesh, (REPLICATED, REPLICATED, BATCH, BATCH, BATCH), (REPLICATED, BATCH))
  )


def evaluate(
  run: loop.Run,
  model: models.Model,
  net: step_lib.NetState,
  split: data.Split,
  return_logits: bool = False,
) -> dict:
  """Accuracy and mean CE of ``net`` on ``split`` (clean labels), chunked and sharded.

  Text (GLUE) splits also get the task's official metrics (``text.metrics``), on
  every evaluation; a regression task (stsb) has no accuracy (None) and its loss
  is the squared error.
  """
  fn = _eval_fn(model, run.prepare, run.mesh)
  ndev = run.mesh.shape[parallel.AXIS]
  run_sharded = parallel.sharded(run.mesh)
  size = max(ndev, run.cfg.eval_batch_size // ndev * ndev)
  n = len(split)
  tot = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  text = run.ds.text
  keep_logits = return_logits or text is not None
  logits = []
  for start in range(0, n, size):
    idx = np.arange(start, start + size)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    images = split.images[idx]
    if text is not None:
      length = tokenize.batch_length(tokenize.token_lengths(images), mask, images.shape[-1])
      images = images[..., :length]
    chunk = parallel.place((images, split.clean_labels[idx], mask), run_sharded)
    sums, lg = fn(net.params, net.model_state, *chunk)
    for k, v in jax.device_get(sums).items():
      tot[k] += float(v)
    if keep_logits:
      logits.append(parallel.to_host(lg)[mask])
  out = {
    "accuracy": tot["correct"] / max(tot["count"], 1.0),
    "loss": tot["loss"] / max(tot["count"], 1.0),
  }
  all_logits = np.concatenate(logits) if logits else np.zeros((0, model.num_classes))
  if text is not None:
    from kdaif_jax.text.metrics import task_metrics

    out.update(task_metrics(text.task, all_logits, split.clean_labels))
    if text.regression:
      out["accuracy"] = None
  if return_logits:
    out["logits"] = all_logits
  return out


def eval_and_log(
  run: loop.Run, state: step_lib.TrainState, phase: str, epoch: int, nets: tuple[str, ...]
) -> dict:
  results = {}
  for name in nets:
    model = run.teacher if name == "teacher" else run.student
    for split_name in ("val", "test"):
      r = evaluate(run, model, eval_net(run, state, name), getattr(run.ds, split_name))
      results[(name, split_name)] = r
      run.writer.write(
        {
          "kind": "eval",
          "phase": phase,
          "net": name,
          "split": split_name,
          "step": int(state.step),
          "epoch": epoch,
          **r,
        }
      )
  # One console line per evaluation (the full records are in metrics.jsonl).
  parts = []
  for (name, split_name), r in results.items():
    value = r.get("accuracy")
    shown = f"{100 * value:.2f}%" if value is not None else f"loss {r['loss']:.4g}"
    parts.append(f"{name} {split_name} {shown}" if len(nets) > 1 else f"{split_name} {shown}")
  log.info("%s epoch %d: %s", phase, epoch, ", ".join(parts))
  return results


def eval_net(run: loop.Run, state: step_lib.TrainState, name: str) -> step_lib.NetState:
  """The network evaluated as ``name``: the student's EMA params when ``ssl.ema`` > 0."""
  net = getattr(state, name)
  if name == "student" and run.semi_supervised and run.cfg.ssl.ema > 0:
    net = net.replace(params=state.ema)
  return net
