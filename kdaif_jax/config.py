"""The base experiment config, the ``smoke`` shrink, and the records the trainer
passes down (its validation, ``validate``, is in ``config_checks``).

Every file in ``configs/`` starts from ``base_config()`` and changes what its
experiment needs. ``validate(config)`` runs before any data is read or any
function compiled and raises a one-line ``ValueError`` naming the option and
what is allowed. ``step_options`` and ``scorer_options`` turn a validated
config into the small typed records of ``kdaif_jax.options``: the config is
read here, at the edge, and nowhere below the trainer.
"""

from __future__ import annotations

import copy

import ml_collections

from kdaif_jax import data, influence, losses, optim, options, weights

# The allowed values and validate() live in config_checks; re-exported here.
from kdaif_jax.config_checks import (  # noqa: F401
  DTYPES,
  PROGRESS,
  SSL_MECHANISMS,
  SSL_TARGETS,
  UNROLL,
  validate,
)
from kdaif_jax.options import MECHANISMS  # noqa: F401 (re-exported: config.MECHANISMS)


def base_config() -> ml_collections.ConfigDict:
  """Defaults: digits, cnn_large -> cnn_small, KD-AIF online (GGN, CG, damping 0.1)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = data.default_data_config()
  c.batch_size = 64
  c.eval_batch_size = 256
  c.num_devices = 0  # 0: all visible devices
  # Compute dtype of the networks' forward/backward passes; parameters, optimiser
  # state and all influence maths (g_V, curvature products, CG, scores) stay float32.
  c.dtype = "float32"
  c.multihost = False
  # With multihost: "" / 0 / -1 take JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  # JAX_PROCESS_ID, else JAX's detection (TPU pods, Slurm, Open MPI); README "Multi-host".
  c.distributed = ml_collections.ConfigDict(
    dict(coordinator_address="", num_processes=0, process_id=-1)
  )
  c.augment = ml_collections.ConfigDict(dict(pad=1, flip=False))
  c.teacher = ml_collections.ConfigDict(
    dict(model="cnn_large", init="", epochs=15, optimizer=optim.default_optimizer_config(0.05))
  )
  c.student = ml_collections.ConfigDict(
    dict(model="cnn_small", epochs=20, optimizer=optim.default_optimizer_config(0.05))
  )
  # The digits CNNs have no batch norm; without clipping SGD 0.05 was unstable in
  # bench/accuracy_digits.py (a teacher at 92.5%, students between 10% and 91%).
  c.teacher.optimizer.clip_norm = c.student.optimizer.clip_norm = 1.0
  c.kd = ml_collections.ConfigDict(dict(temperature=4.0, alpha=0.5))
  c.kdaif = ml_collections.ConfigDict(
    dict(
      mechanism="online",
      weights="sigmoid",
      weight_temperature=1.0,
      curvature="ggn",
      solver="cg",
      damping=0.1,
      cg_iters=5,
      cg_tol=1e-6,
      warm_start=True,
      scope="head",  # influence in the classifier layer ("all": the whole student)
      # Matrix products of the influence maths in full float32 ("default": the
      # backend's choice, TensorFloat-32 on NVIDIA GPUs; no difference on CPU).
      matmul_precision="highest",
      # β of each example's running memory of its standardised scores (0: this step's
      # only). Digits, 40% noise, 3 seeds (BENCHMARKS.md §3c): AUROC of the online
      # weights 0.959 -> 0.984 (symmetric), 0.943 -> 0.984 (asymmetric).
      score_memory=0.8,
      # "teacher": the memory starts from the teacher's whole-set influence (one
      # scoring pass in its classifier layer); "none": from each example's first
      # visit. Used by online/joint with score_memory > 0 (supervised runs).
      memory_init="none",
      refresh_every=1,
      unroll="auto",
      lissa_scale=10.0,
      val_batch_size=0,  # 0: the whole validation set every refresh
      period_epochs=5,  # periodic: rescore the training set every K epochs
      proxy_epochs=0,  # static: epochs of the plain-KD proxy student (0: student.epochs)
      # trajectory: K >= 2 also scores the set at K - 1 log-spaced epochs of the student's
      # run and averages them with the final scores into weights.csv's
      # trajectory_influence (kdaif_jax.trajectory; each costs one whole-set pass).
      whole_set=ml_collections.ConfigDict(dict(cg_iters=50, curvature_size=1024, trajectory=0)),
      # joint: feedback strength, the teacher's learning rate, and how often it steps
      # (every K student steps, on the mean of K feedback gradients).
      joint=ml_collections.ConfigDict(dict(mu=1.0, lr=0.01, every=1)),
    )
  )
  # The whole-set scorer's damping (static, periodic, the teacher memory, weights.csv's
  # final / self / trajectory influence); None: kdaif.damping. A large one finds flipped
  # labels best, one near the student's weight decay predicts retraining best (LDS):
  # docs/method.md §1 "Whole-training-set influence", BENCHMARKS.md §5.
  c.kdaif.whole_set.damping = ml_collections.config_dict.placeholder(float)
  # Semi-supervised (active when data.num_labelled > 0), docs/method.md §5.
  c.ssl = ml_collections.ConfigDict(
    dict(
      unlabelled_ratio=7,  # unlabelled batch = ratio x labelled batch (UDA/MPL use 7)
      # The student learns the teacher's soft targets, or its "hard" pseudo-labels;
      # "fixmatch": its own confident weak-view predictions (the baseline arm); "labels":
      # the hidden true labels (a reference: every example labelled; mechanism none).
      targets="soft",
      fixmatch_threshold=0.95,  # FixMatch's confidence threshold τ
      unlabelled_weight=1.0,  # λ_u; 0 trains the student on labelled data only
      uda_weight=0.0,  # teacher's UDA consistency (joint only)
      uda_threshold=0.8,
      uda_temperature=0.4,
      ema=0.0,  # EMA decay of student params for evaluation (0: off)
      finetune_epochs=0,  # final student fine-tuning on the labelled set (as MPL)
      finetune_lr=0.01,
      strong=ml_collections.ConfigDict(dict(num_ops=2, magnitude=10.0, cutout=16)),
    )
  )
  c.log_every_steps = 20
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 200
  c.progress = "auto"
  c.report = True  # write WORKDIR/report/ (the SAFE report) at the end of the run
  return c


def _unroll(option: str) -> bool | None:
  """Maps ``kdaif.unroll`` ("auto", "unroll", "loop") to ``cg_solve``'s ``unroll``."""
  return {"auto": None, "unroll": True, "loop": False}[option]


def _solver(k: ml_collections.ConfigDict, maxiter: int) -> influence.SolverOptions:
  return influence.SolverOptions(
    curvature=k.curvature,
    solver=k.solver,
    damping=float(k.damping),
    maxiter=int(maxiter),
    tol=float(k.cg_tol),
    lissa_scale=float(k.lissa_scale),
    unroll=_unroll(k.unroll),
  )


def kd_options(cfg: ml_collections.ConfigDict) -> losses.KDOptions:
  """The distillation loss of ``cfg.kd``."""
  return losses.KDOptions(temperature=float(cfg.kd.temperature), alpha=float(cfg.kd.alpha))


def weight_map(cfg: ml_collections.ConfigDict) -> weights.WeightMap:
  """The weight map of ``cfg.kdaif`` (also the small-loss baseline's temperature)."""
  return weights.WeightMap(cfg.kdaif.weights, float(cfg.kdaif.weight_temperature))


def step_options(
  cfg: ml_collections.ConfigDict, mechanism: str | None = None
) -> options.StepOptions:
  """The record the KD and SSL steps take.

  Args:
    cfg: a validated experiment config.
    mechanism: overrides ``kdaif.mechanism`` (the ``static`` proxy student is
      plain KD: ``"none"``).

  Returns:
    ``options.StepOptions``.
  """
  k, ssl = cfg.kdaif, cfg.ssl
  return options.StepOptions(
    mechanism=options.Mechanism(mechanism or k.mechanism),
    kd=kd_options(cfg),
    influence=options.InfluenceOptions(
      solver=_solver(k, k.cg_iters),
      weights=weight_map(cfg),
      warm_start=bool(k.warm_start),
      scope=k.scope,
      memory=float(k.score_memory),
      precision=k.matmul_precision,
    ),
    joint_mu=float(k.joint.mu),
    ssl=options.SSLOptions(
      targets=ssl.targets,
      unlabelled_weight=float(ssl.unlabelled_weight),
      uda_weight=float(ssl.uda_weight),
      uda_threshold=float(ssl.uda_threshold),
      uda_temperature=float(ssl.uda_temperature),
      fixmatch_threshold=float(ssl.fixmatch_threshold),
      ema=float(ssl.ema),
    ),
  )


# The whole-set scorer restarts CG in compiled chunks of at most this many iterations.
_CG_CHUNK = 10


def whole_set_damping(cfg: ml_collections.ConfigDict) -> float:
  """The whole-set scorer's damping: ``kdaif.whole_set.damping``, else ``kdaif.damping``."""
  k = cfg.kdaif
  return float(k.damping if k.whole_set.damping is None else k.whole_set.damping)


def scorer_options(cfg: ml_collections.ConfigDict) -> options.ScorerOptions:
  """The record the whole-set scorer takes (``kdaif.whole_set`` and the solver)."""
  k = cfg.kdaif
  solver = _solver(k, min(k.whole_set.cg_iters, _CG_CHUNK))
  return options.ScorerOptions(
    kd=kd_options(cfg),
    solver=solver._replace(damping=whole_set_damping(cfg)),
    total_iters=int(k.whole_set.cg_iters),
    curvature_size=int(k.whole_set.curvature_size),
    chunk_size=int(cfg.eval_batch_size),
    scope=k.scope,
    precision=k.matmul_precision,
  )


def wrn_ssl_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The anchors' semi-supervised protocol (UDA / FixMatch / Meta Pseudo Labels).

  WRN-28-2 teacher and student, labelled batch 64 with 7x as many unlabelled,
  SGD 0.05 Nesterov with cosine decay and 5 warm-up epochs, weight decay 5e-4,
  RandAugment (2 ops, magnitude 10) + Cutout 16 strong views, UDA consistency on
  the teacher (threshold 0.8, sharpening 0.4), KD-AIF `joint`, EMA 0.999, and a
  final fine-tuning on the labels. Datasets set name, sizes, flips and epochs.
  """
  c.batch_size = 64
  c.eval_batch_size = 1000
  c.kdaif.score_memory = 0.0  # not measured on the semi-supervised path yet
  c.teacher.model = c.student.model = "wrn_28_2"
  for net in ("teacher", "student"):
    c[net].optimizer.update(
      clip_norm=0.0,
      name="sgd",
      lr=0.05,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
      schedule="cosine",
      warmup_epochs=5.0,
    )
  c.kd.temperature = 1.0
  c.kdaif.mechanism = "joint"
  c.kdaif.val_batch_size = 512
  c.kdaif.cg_iters = 3
  c.kdaif.refresh_every = 5
  c.kdaif.joint.update(mu=1.0, lr=0.05)
  c.ssl.update(
    unlabelled_ratio=7,
    targets="soft",
    uda_weight=1.0,
    uda_threshold=0.8,
    uda_temperature=0.4,
    ema=0.999,
    finetune_lr=0.01,
  )
  c.ssl.strong.update(num_ops=2, magnitude=10.0, cutout=16)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c


def variant(
  arg: str | None, allowed: tuple[str, ...] = ("smoke",), *, required: bool = False
) -> str | None:
  """Checks a config file's argument (``--config=FILE:ARG``) against its variants.

  Every ``get_config(arg)`` in ``configs/`` starts with it, so that a misspelt
  variant (``:smok``) fails at once instead of running the full experiment.

  Args:
    arg: the argument; None or "" mean the full experiment.
    allowed: the file's variant names.
    required: the file has no full experiment without a variant (e.g. GLUE's task).

  Returns:
    ``arg``, or None for the full experiment.

  Raises:
    ValueError: one line naming ``arg`` and the allowed variants.
  """
  if (arg is None or arg == "") and not required:
    return None
  if arg not in allowed:
    what = f"unknown config variant {arg!r}" if arg else "this config needs a variant"
    full = "" if required else " (or none, FILE.py without ':', for the full experiment)"
    raise ValueError(f"{what}; allowed: {', '.join(allowed)}{full}")
  return arg


def smoke(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any experiment to seconds on a CPU (for tests), keeping its mechanism.

  Digits stays digits (offline and small); other datasets become synthetic
  images of the same shape and class count, and large networks become small
  ones of the registry, so that the smoke test exercises every code path.
  """
  cfg = copy.deepcopy(cfg)  # keeps placeholder types: --config.data.data_dir still overrides
  if cfg.data.name != "digits":
    size = 32 if cfg.data.name != "synthetic" else cfg.data.synthetic.image_size
    classes = {"cifar100": 100}.get(cfg.data.name, cfg.data.synthetic.num_classes)
    cfg.data.name = "synthetic"
    cfg.data.synthetic.update(
      dict(num_train=128, num_val=32, num_test=64, image_size=size, channels=3, num_classes=classes)
    )
    cfg.teacher.model, cfg.student.model = "cnn_large", "cnn_small"
  else:
    cfg.data.num_train = 256
    cfg.data.val_size = 60 if cfg.data.num_labelled == 0 else cfg.data.val_size
  cfg.teacher.epochs = 1 if not cfg.teacher.init else 0
  cfg.student.epochs = 2
  cfg.kdaif.proxy_epochs = 1
  cfg.ssl.finetune_epochs = min(cfg.ssl.finetune_epochs, 1)
  if cfg.data.num_labelled > 0:
    k = cfg.data.synthetic.num_classes if cfg.data.name == "synthetic" else 10
    if cfg.data.name == "synthetic":
      cfg.data.num_labelled = 4 * k
      cfg.data.synthetic.num_train = 400
    cfg.ssl.unlabelled_ratio = min(cfg.ssl.unlabelled_ratio, 2)
  cfg.kdaif.period_epochs = 1
  # The WRN recipe's teacher lr (0.05) on the smoke's barely trained teacher and random
  # data lets the joint feedback diverge (teacher loss NaN at step 22 on some CPUs).
  cfg.kdaif.joint.lr = min(cfg.kdaif.joint.lr, 0.01)
  cfg.kdaif.cg_iters = min(cfg.kdaif.cg_iters, 3)
  cfg.kdaif.whole_set.cg_iters = 5
  cfg.kdaif.whole_set.curvature_size = 64
  cfg.batch_size = 32 if cfg.data.num_labelled == 0 else 16
  cfg.eval_batch_size = 64
  cfg.log_every_steps = 2
  cfg.checkpoint_every_steps = 4
  cfg.progress = "log"
  cfg.report = False
  for net in ("teacher", "student"):
    cfg[net].optimizer.decay_epochs = ()
    cfg[net].optimizer.warmup_epochs = 0.0
  return cfg
