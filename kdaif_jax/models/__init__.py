"""Flax classifiers behind one registry: ``create(name, num_classes)``.

Example:
  >>> model = create("cnn_small", 10)
  >>> params, state = model.init(jax.random.key(0), x[:1])
  >>> logits, state = model.apply(params, state, x, train=True)
"""

from kdaif_jax.models.registry import (
  Model,
  ModelState,
  Params,
  create,
  head_keys,
  names,
  param_count,
  text_names,
)

__all__ = [
  "Model",
  "ModelState",
  "Params",
  "create",
  "head_keys",
  "names",
  "param_count",
  "text_names",
]
