"""kdaif_jax: knowledge distillation with adaptive influence weights (KD-AIF) in JAX/Flax.

Public API:
  influence  hvp, gnvp, cg_solve, lissa, scores, batch_influence (pure pytree maths)
  weights    influence -> per-example weights (sigmoid, sigmoid_down, exp_minmax, none;
             small_loss, the oracle reference)
  losses     per-example CE and KD losses ([B] each)
  lds        linear datamodeling score of an attribution, its split-half noise ceiling
  self_influence  I_ii = ∇ℓ_iᵀ (C + λI)⁻¹ ∇ℓ_i for every example (dense factor, small P)
  trajectory      influence averaged over a run's checkpoints (log-spaced, standardised)
"""

from kdaif_jax import influence, lds, losses, self_influence, trajectory, weights

__all__ = ["influence", "lds", "losses", "self_influence", "trajectory", "weights"]
__version__ = "0.1.0"
