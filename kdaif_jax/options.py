"""Small typed records the steps and the scorer take instead of a config.

The trainer reads the experiment config once (``config.step_options`` and
``config.scorer_options``) and passes these hashable records down; nothing
below the trainer reads a ``ConfigDict``. Each record holds only what its code
branches on or computes with.
"""

from __future__ import annotations

from typing import NamedTuple

from kdaif_jax.influence import SolverOptions
from kdaif_jax.losses import KDOptions
from kdaif_jax.weights import WeightMap

MECHANISMS = ("none", "static", "periodic", "online", "joint", "small_loss", "oracle")
SCOPES = ("all", "head")

__all__ = [
  "MECHANISMS",
  "SCOPES",
  "InfluenceOptions",
  "KDOptions",
  "Mechanism",
  "SSLOptions",
  "ScorerOptions",
  "SolverOptions",
  "StepOptions",
  "WeightMap",
]


class Mechanism(NamedTuple):
  """An update mechanism (docs/method.md §4) and the flags the code branches on.

  name: one of ``MECHANISMS``.
  """

  name: str

  @property
  def plain(self) -> bool:
    """Plain KD: every weight is 1 (``none``)."""
    return self.name == "none"

  @property
  def online(self) -> bool:
    """Influence of every batch inside the step (``online``, ``joint``)."""
    return self.name in ("online", "joint")

  @property
  def joint(self) -> bool:
    """The teacher is updated from the student's feedback in the same step."""
    return self.name == "joint"

  @property
  def frozen_weights(self) -> bool:
    """Per-example weights fixed outside the step (a whole-set scoring, or the
    oracle's flip mask), gathered per batch. Supervised runs only: the
    semi-supervised oracle weighs each batch in the step (``ssl``)."""
    return self.name in ("static", "periodic", "oracle")

  @property
  def oracle(self) -> bool:
    """Benchmark reference: weight 0 on the injected flipped labels (``weights.oracle``),
    or in a semi-supervised run on the teacher's wrong pseudo-labels."""
    return self.name == "oracle"

  @property
  def proxy(self) -> bool:
    """Weights scored once with a plain-KD proxy student (``static``)."""
    return self.name == "static"

  @property
  def rescores(self) -> bool:
    """The whole training set is rescored every few epochs (``periodic``)."""
    return self.name == "periodic"

  @property
  def small_loss(self) -> bool:
    """The small-loss baseline: weights from the batch's training losses."""
    return self.name == "small_loss"

  @property
  def batch_weights(self) -> bool:
    """The step computes each batch's weights (and the run records them)."""
    return self.online or self.small_loss


class InfluenceOptions(NamedTuple):
  """The online influence block (docs/method.md §1-2).

  solver: how s = (C + λI)⁻¹ g_V is computed.
  weights: the map from influence to weights.
  warm_start: start CG from the previous s.
  scope: the parameters influence is computed in: "all" (the whole student) or
    "head" (its classifier layer; ``influence.restrict``).
  memory: β in [0, 1) of each example's memory of its standardised scores
    (``online.remember``); 0 weighs every batch by its own scores only.
  precision: the matrix-product precision of the influence maths, one of
    ``objectives.PRECISIONS``.
  """

  solver: SolverOptions = SolverOptions()
  weights: WeightMap = WeightMap()
  warm_start: bool = True
  scope: str = "all"
  memory: float = 0.0
  precision: str = "highest"


class SSLOptions(NamedTuple):
  """The semi-supervised step's options (docs/method.md §5)."""

  targets: str = "soft"
  unlabelled_weight: float = 1.0
  uda_weight: float = 0.0
  uda_threshold: float = 0.8
  uda_temperature: float = 0.4
  ema: float = 0.0
  fixmatch_threshold: float = 0.95


class StepOptions(NamedTuple):
  """Everything a KD / KD-AIF / SSL step needs besides its models and optimisers.

  mechanism: the update mechanism.
  kd: the distillation loss.
  influence: the online influence block (used when ``mechanism.online``).
  joint_mu: μ, the strength of the teacher's feedback loss (``joint``).
  ssl: semi-supervised options (SSL steps only).
  """

  mechanism: Mechanism = Mechanism("online")
  kd: KDOptions = KDOptions()
  influence: InfluenceOptions = InfluenceOptions()
  joint_mu: float = 1.0
  ssl: SSLOptions = SSLOptions()


class ScorerOptions(NamedTuple):
  """The whole-set scorer (``static``, ``periodic``, and the final record).

  kd: the training loss scored.
  solver: the inverse solve; ``maxiter`` is the length of one compiled chunk
    of CG iterations.
  total_iters: CG iterations in all (restarted chunks, each warm-started).
  curvature_size: training examples sampled for the curvature.
  chunk_size: examples scored per jvp.
  scope: "all" or "head", as in ``InfluenceOptions``.
  precision: as in ``InfluenceOptions``.
  """

  kd: KDOptions = KDOptions()
  solver: SolverOptions = SolverOptions()
  total_iters: int = 50
  curvature_size: int = 1024
  chunk_size: int = 256
  scope: str = "all"
  precision: str = "highest"
