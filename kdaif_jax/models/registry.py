"""Model registry: names -> Flax modules, wrapped as pure init/apply functions.

The trainer and the influence code only see ``Model.init`` and ``Model.apply``:
parameters and the other variable collections (BatchNorm statistics) are kept
apart, so ``jax.grad``/``jax.jvp`` act on the params pytree alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdaif_jax.models import bert, cnn, resnet, wrn

Params = Any  # pytree of arrays: the 'params' collection
ModelState = dict[str, Any]  # the other collections, e.g. {'batch_stats': ...}

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
  **cnn.MODELS,
  **resnet.MODELS,
  **wrn.MODELS,
}
# Text encoders (input: packed token batches [B, 3, L], not images), kept apart from
# ``names()`` (the image classifiers) and listed by ``text_names()``.
_TEXT_FACTORIES: dict[str, Callable[..., nn.Module]] = dict(bert.MODELS)


@dataclasses.dataclass(frozen=True)
class Model:
  """A classifier as two pure functions over (params, model_state).

  Attributes:
    name: registry name.
    module: the Flax linen module; ``module(x, train=...)`` returns logits.
    num_classes: number of logits.
    pretrained: text models: "" (random), "minilm" or a Hugging Face BERT
      directory whose weights ``init`` loads (``kdaif_jax.text.weights``).
  """

  name: str
  module: nn.Module
  num_classes: int
  pretrained: str = ""

  def init(self, key: jax.Array, sample_x: jax.Array) -> tuple[Params, ModelState]:
    """Initialise the variables.

    Works under ``jax.eval_shape`` (shapes only, no compute).

    Args:
      key: a PRNG key (``jax.random.key``).
      sample_x: example input [B, H, W, C] float32; only its shape and dtype
        matter.

    Returns:
      (params, model_state): the 'params' collection, and a dict of the other
      collections (``{'batch_stats': ...}`` for models with BatchNorm, ``{}``
      otherwise).
    """
    # Not jitted: compiling a whole deep net's init costs XLA:CPU tens of
    # seconds, while op-by-op dispatch reuses cached per-op compiles.
    variables = dict(self.module.init(key, sample_x, train=False))
    params = variables.pop("params")
    if self.pretrained:  # a student takes a subset of the file's layers
      from kdaif_jax.text import weights

      params = weights.init_pretrained(self.pretrained, params)
    return params, variables

  def apply(
    self, params: Params, model_state: ModelState, x: jax.Array, train: bool
  ) -> tuple[jax.Array, ModelState]:
    """Pure forward pass; no RNG (the models have no dropout).

    Args:
      params: the 'params' collection from ``init``.
      model_state: the other collections from ``init`` (or a previous apply).
      x: inputs [B, H, W, C] float32, normalised.
      train: a Python bool (static under ``jit``). True: BatchNorm uses batch
        statistics and the returned state holds the updated running averages.
        False: BatchNorm uses the running averages, so each example's logits
        do not depend on the rest of the batch, and the state is returned
        unchanged.

    Returns:
      (logits [B, num_classes] float32, new model_state).
    """
    variables = {"params": params, **model_state}
    if train and model_state:
      logits, new_state = self.module.apply(variables, x, train=True, mutable=list(model_state))
      return logits, dict(new_state)
    return self.module.apply(variables, x, train=train), model_state

  def in_float32(self) -> Model:
    """The same network computing in float32 (same params and collections).

    Influence runs through it (``kdaif_jax.objectives``): a run with
    ``config.dtype = "bfloat16"`` trains in bfloat16, but g_V, curvature products,
    CG and scores stay float32, where CG's recurrences are trustworthy.

    Returns:
      ``self`` when it already computes in float32 (or has no compute dtype).
    """
    dtype = getattr(self.module, "dtype", None)
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
      return self
    return dataclasses.replace(self, module=self.module.clone(dtype=jnp.dtype(jnp.float32)))


def names() -> list[str]:
  """Return the registered image model names, sorted."""
  return sorted(_FACTORIES)


def text_names() -> list[str]:
  """Return the registered text model names (BERT-style encoders), sorted."""
  return sorted(_TEXT_FACTORIES)


def create(name: str, num_classes: int, pretrained: str | None = None, **kwargs: Any) -> Model:
  """Build a registered model.

  Args:
    name: one of ``names()`` or ``text_names()``.
    num_classes: number of logits (>= 1).
    pretrained: text models only: "minilm" or a directory of pre-trained weights
      that ``Model.init`` loads; None or "" for a random initialisation.
    **kwargs: overrides of the module's attributes, e.g. ``hidden=64`` for
      'mlp', ``dtype='bfloat16'`` or ``bn_momentum=0.99``.

  Returns:
    The ``Model``.

  Raises:
    ValueError: unknown name or a non-positive num_classes.
    TypeError: a keyword the model does not have.
  """
  factories = {**_FACTORIES, **_TEXT_FACTORIES}
  if name not in factories:
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(names() + text_names())}")
  if int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  if "dtype" in kwargs:
    # Accept config strings ('bfloat16'); a numpy dtype is hashable, as
    # Flax modules must be.
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  for key, value in kwargs.items():
    if isinstance(value, list):
      kwargs[key] = tuple(value)  # configs give lists; modules need hashable
  if pretrained and name not in _TEXT_FACTORIES:
    raise ValueError(f"pretrained={pretrained!r}: only text models load pre-trained files")
  module = factories[name](num_classes=int(num_classes), **kwargs)
  return Model(name=name, module=module, num_classes=int(num_classes), pretrained=pretrained or "")


def param_count(params: Params) -> int:
  """Number of scalars in a params pytree.

  Args:
    params: pytree of arrays or of ``jax.ShapeDtypeStruct`` (from
      ``jax.eval_shape``).

  Returns:
    The total number of elements.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def head_keys(params: Params) -> tuple[str, ...]:
  """The top-level params key of the classifier head: the last top-level Dense layer.

  Every registry model ends in ``nn.Dense(num_classes)`` at the top level, named
  ``Dense_k`` with the largest k (an MLP's hidden layer is ``Dense_0``, its head
  ``Dense_1``). Influence restricted to it (``kdaif.scope = "head"``) needs only
  the features of the last hidden layer.

  Args:
    params: a model's params (a dict of top-level modules).

  Returns:
    A one-element tuple with the head's key.

  Raises:
    ValueError: no top-level Dense layer.
  """
  if "classifier" in params:  # the BERT models name their head (Hugging Face's name)
    return ("classifier",)
  dense = [k for k in params if k.startswith("Dense_") and k[len("Dense_") :].isdigit()]
  if not dense:
    raise ValueError(
      f"no top-level Dense layer (the classifier head) among params keys {sorted(params)}"
    )
  return (max(dense, key=lambda k: int(k[len("Dense_") :])),)
