"""``validate(config)``: every option the trainer reads, checked before any data is
read or any function compiled; a bad one raises a one-line ``ValueError`` naming
the option, its value and what is allowed. Re-exported by ``kdaif_jax.config``.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from kdaif_jax import (
  checkpoint_files,
  data,
  influence,
  models,
  objectives,
  optim,
  options,
  weights,
)
from kdaif_jax.options import MECHANISMS

UNROLL = ("auto", "unroll", "loop")
DTYPES = ("float32", "bfloat16")
PROGRESS = ("auto", "bar", "log", "none")
MEMORY_INITS = ("none", "teacher")
SSL_MECHANISMS = ("none", "online", "joint", "oracle")
SSL_TARGETS = ("soft", "hard", "fixmatch", "labels")


def _fail(option: str, value: Any, allowed: str) -> None:
  raise ValueError(f"config.{option}={value!r} is invalid; allowed: {allowed}")


def _choice(cfg, option: str, allowed) -> None:
  value = _get(cfg, option)
  if value not in allowed:
    _fail(option, value, ", ".join(map(str, allowed)))


def _get(cfg, option: str):
  node = cfg
  for part in option.split("."):
    node = node[part]
  return node


def _number(
  cfg,
  option: str,
  lo: float,
  hi: float = math.inf,
  *,
  lo_open: bool = False,
  hi_open: bool = False,
  integer: bool = False,
) -> None:
  value = _get(cfg, option)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok and integer:
    ok = float(value).is_integer()
  if ok:
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    ok = above and below and math.isfinite(value)
  if not ok:
    kind = "an integer" if integer else "a number"
    upper = f" and {'<' if hi_open else '<='} {hi}" if hi < math.inf else ""
    bound = f"{'>' if lo_open else '>='} {lo}{upper}"
    _fail(option, value, f"{kind} {bound}")


def validate(cfg: ml_collections.ConfigDict, paths: bool = False) -> None:
  """Checks names and ranges of every option the trainer reads.

  Args:
    cfg: the experiment config.
    paths: also check that the files it names exist (``teacher.init``), as the
      trainer does; off for configs built only to read results back.

  Raises:
    ValueError: one line naming the option, its value and what is allowed.
    FileNotFoundError: with ``paths``, a ``teacher.init`` without checkpoints.
  """
  data.validate_config(cfg.data)
  text = cfg.data.name in data.glue.TEXT_DATASETS
  for net in ("teacher", "student"):
    _choice(cfg, f"{net}.model", models.text_names() if text else models.names())
    # Pre-trained weights index the vocabulary of their own tokenizer, not a trained one.
    if text and cfg[net].get("pretrained") and not data.glue.text_option(cfg.data, "tokenizer"):
      _fail("data.text.tokenizer", "", f"a pre-trained tokenizer with {net}.pretrained set")
    _choice(cfg, f"{net}.optimizer.name", optim.OPTIMIZERS)
    _choice(cfg, f"{net}.optimizer.schedule", optim.SCHEDULES)
    _number(cfg, f"{net}.optimizer.lr", 0, lo_open=True)
    _number(cfg, f"{net}.optimizer.momentum", 0, 1)
    _number(cfg, f"{net}.optimizer.weight_decay", 0)
    _number(cfg, f"{net}.optimizer.warmup_epochs", 0)
    _number(cfg, f"{net}.optimizer.clip_norm", 0)
  _number(cfg, "teacher.epochs", 0 if cfg.teacher.init else 1, integer=True)
  if paths and cfg.teacher.init:  # before the data loads, not 20 s into the run
    checkpoint_files.init_folder(cfg.teacher.init)
  _number(cfg, "student.epochs", 1, integer=True)
  _number(cfg, "batch_size", 1, integer=True)
  _number(cfg, "eval_batch_size", 1, integer=True)
  _number(cfg, "num_devices", 0, integer=True)
  _number(cfg, "distributed.num_processes", 0, integer=True)
  _number(cfg, "distributed.process_id", -1, integer=True)
  d = cfg.distributed
  if d.coordinator_address and ":" not in d.coordinator_address:
    _fail("distributed.coordinator_address", d.coordinator_address, "HOST:PORT, or '' (unset)")
  if d.num_processes > 0 and d.process_id >= d.num_processes:
    _fail("distributed.process_id", d.process_id, f"-1 or 0..{d.num_processes - 1}")
  if not cfg.multihost and (d.coordinator_address or d.num_processes or d.process_id >= 0):
    _fail("multihost", cfg.multihost, "True when config.distributed.* is set")
  _choice(cfg, "dtype", DTYPES)
  if text and cfg.dtype != "float32":
    _fail("dtype", cfg.dtype, "float32 for text models (the BERT encoders compute in float32)")
  _number(cfg, "augment.pad", 0, integer=True)
  _number(cfg, "kd.temperature", 0, lo_open=True)
  _number(cfg, "kd.alpha", 0, 1)
  k = "kdaif"
  _choice(cfg, f"{k}.mechanism", MECHANISMS)
  if text and data.glue.is_regression(cfg.data.name) and cfg.kdaif.mechanism == "joint":
    _fail(f"{k}.mechanism", "joint", "any but joint for regression (its pseudo-labels are classes)")
  if cfg.kdaif.mechanism == "oracle":
    ssl_split, noise = cfg.data.num_labelled > 0, cfg.data.noise.rate > 0
    if not (noise or ssl_split):
      _fail(
        f"{k}.mechanism",
        "oracle",
        "any but oracle without injected noise (data.noise.rate 0) or a semi-supervised split",
      )
    if noise and ssl_split:
      # The semi-supervised oracle weighs the unlabelled examples only: the flips
      # injected into the labelled set would stay at full weight.
      _fail(f"{k}.mechanism", "oracle", "any but oracle with both data.num_labelled and noise")
  _choice(cfg, f"{k}.weights", weights.MAPS)
  _choice(cfg, f"{k}.curvature", influence.CURVATURES)
  _choice(cfg, f"{k}.solver", influence.SOLVERS)
  _choice(cfg, f"{k}.unroll", UNROLL)
  _choice(cfg, f"{k}.scope", options.SCOPES)
  _choice(cfg, f"{k}.matmul_precision", objectives.PRECISIONS)
  _number(cfg, f"{k}.weight_temperature", 0, lo_open=True)
  _number(cfg, f"{k}.score_memory", 0, 1, hi_open=True)
  _choice(cfg, f"{k}.memory_init", MEMORY_INITS)
  if cfg.kdaif.memory_init == "teacher" and cfg.data.num_labelled > 0:
    _fail(
      f"{k}.memory_init",
      "teacher",
      "none when data.num_labelled > 0 (the memory belongs to the supervised online step)",
    )
  # A whole network's batch curvature has rank <= B·K, far below its parameter count:
  # without damping the solve has no answer (CG grows without bound). The classifier
  # layer's null space (softmax shifts) is orthogonal to g_V, so 0 is allowed there.
  whole = cfg.kdaif.scope == "all" and cfg.kdaif.solver != "identity"
  _number(cfg, f"{k}.damping", 0, lo_open=whole)
  # None: the whole-set scorer takes kdaif.damping. Set, it must be > 0 in every scope:
  # the scorer's self-influence factors C + λI, singular at 0 in the classifier layer too.
  if cfg.kdaif.whole_set.damping is not None:
    _number(cfg, f"{k}.whole_set.damping", 0, lo_open=True)
  _number(cfg, f"{k}.cg_iters", 1, integer=True)
  _number(cfg, f"{k}.cg_tol", 0)
  _number(cfg, f"{k}.refresh_every", 1, integer=True)
  _number(cfg, f"{k}.lissa_scale", 0, lo_open=True)
  _number(cfg, f"{k}.val_batch_size", 0, integer=True)
  _number(cfg, f"{k}.period_epochs", 1, integer=True)
  _number(cfg, f"{k}.proxy_epochs", 0, integer=True)
  _number(cfg, f"{k}.whole_set.cg_iters", 1, integer=True)
  _number(cfg, f"{k}.whole_set.curvature_size", 1, integer=True)
  _number(cfg, f"{k}.whole_set.trajectory", 0, integer=True)
  traj = cfg.kdaif.whole_set.trajectory
  if traj == 1:  # the final scoring alone: final_influence again
    _fail(f"{k}.whole_set.trajectory", 1, "0 (off) or an integer >= 2 (the final one included)")
  if traj >= 2 and cfg.student.epochs < 2:  # no epoch to score before the final one
    _fail(f"{k}.whole_set.trajectory", traj, "0 when student.epochs < 2")
  _number(cfg, f"{k}.joint.mu", 0)
  _number(cfg, f"{k}.joint.lr", 0, lo_open=True)
  _number(cfg, f"{k}.joint.every", 1, integer=True)
  if cfg.kdaif.solver == "lissa" and cfg.kdaif.damping == 0 and cfg.kdaif.curvature == "hessian":
    _fail(f"{k}.damping", 0.0, "> 0 with solver=lissa on the (indefinite) hessian")
  _choice(cfg, "ssl.targets", SSL_TARGETS)
  if cfg.ssl.targets in ("fixmatch", "labels") and cfg.kdaif.mechanism != "none":
    _fail(
      "ssl.targets",
      cfg.ssl.targets,
      f"soft or hard with a KD-AIF mechanism ({cfg.ssl.targets}: with none)",
    )
  if cfg.ssl.targets == "labels" and cfg.data.num_labelled == 0:
    _fail("ssl.targets", "labels", "soft, hard or fixmatch (labels needs data.num_labelled > 0)")
  _number(cfg, "ssl.fixmatch_threshold", 0, 1)
  _number(cfg, "ssl.unlabelled_ratio", 1, integer=True)
  _number(cfg, "ssl.unlabelled_weight", 0)
  _number(cfg, "ssl.uda_weight", 0)
  _number(cfg, "ssl.uda_threshold", 0, 1)
  _number(cfg, "ssl.uda_temperature", 0, lo_open=True)
  _number(cfg, "ssl.ema", 0, 1)
  if cfg.ssl.ema >= 1:
    _fail("ssl.ema", cfg.ssl.ema, "a number >= 0 and < 1")
  _number(cfg, "ssl.finetune_epochs", 0, integer=True)
  _number(cfg, "ssl.finetune_lr", 0, lo_open=True)
  _number(cfg, "ssl.strong.num_ops", 0, integer=True)
  _number(cfg, "ssl.strong.magnitude", 0, 10)
  _number(cfg, "ssl.strong.cutout", 0, integer=True)
  if cfg.data.num_labelled > 0 and cfg.kdaif.mechanism not in SSL_MECHANISMS:
    _fail(
      "kdaif.mechanism",
      cfg.kdaif.mechanism,
      f"{', '.join(SSL_MECHANISMS)} when data.num_labelled > 0 (semi-supervised)",
    )
  _number(cfg, "log_every_steps", 1, integer=True)
  _number(cfg, "eval_every_epochs", 1, integer=True)
  _number(cfg, "checkpoint_every_steps", 1, integer=True)
  _choice(cfg, "progress", PROGRESS)
