"""kdaif_jax: knowledge distillation with adaptive influence weights (KD-AIF) in JAX/Flax.

Public API:
  influence  hvp, gnvp, cg_solve, lissa, scores, batch_influence (pure pytree maths)
  weights    influence -> per-example weights (sigmoid, exp_minmax, none)
  losses     per-example CE and KD losses ([B] each)
"""

from kdaif_jax import influence, losses, weights

__all__ = ["influence", "losses", "weights"]
__version__ = "0.1.0"
