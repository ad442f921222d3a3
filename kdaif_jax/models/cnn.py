"""Small convolutional networks and an MLP for the digits set and for tests.

No paper to match here: these are the student/teacher pair for the offline
scikit-learn digits experiments (8x8x1 images), sized so that both train to
>95% accuracy in seconds on a CPU. Global average pooling before the dense head
lets the same modules run on 32x32x3 images too.

Parameter counts measured on 8x8x1 input, 10 classes:
  cnn_small  16,698 (widths 16, 32)
  cnn_large 146,842 (widths 48, 96)
  mlp        2,410 (hidden 32; 8x8x1 input)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# He initialisation suits ReLU networks without normalisation: activations keep
# their scale through the stack, so the un-normalised CNN trains without tuning.
_HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class CNN(nn.Module):
  """VGG-style CNN: stages of two 3x3 convs, 2x2 max pool between stages.

  Attributes:
    num_classes: number of logits.
    widths: channels of each stage; one 2x2 max pool separates stages.
    batch_norm: add BatchNorm after each conv (then the model has
      ``batch_stats``); without it the model is stateless.
    bn_momentum: running-average decay of BatchNorm.
    dtype: compute dtype; parameters and logits stay float32.
  """

  num_classes: int
  widths: tuple[int, ...] = (16, 32)
  batch_norm: bool = False
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Forward pass.

    Args:
      x: images [B, H, W, C], float32, normalised.
      train: use batch statistics (and update running ones) if BatchNorm.

    Returns:
      logits [B, num_classes], float32.
    """
    x = x.astype(self.dtype)
    for stage, width in enumerate(self.widths):
      if stage > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for _ in range(2):
        # A conv bias is redundant in front of BatchNorm's shift.
        x = nn.Conv(
          width,
          (3, 3),
          use_bias=not self.batch_norm,
          kernel_init=_HE_NORMAL,
          dtype=self.dtype,
        )(x)
        if self.batch_norm:
          x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            dtype=self.dtype,
          )(x)
        x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    # The head runs in float32: it is cheap and the logits feed the losses.
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


class MLP(nn.Module):
  """Two-layer perceptron on flattened input; stateless, for tests.

  Attributes:
    num_classes: number of logits.
    hidden: width of the hidden layer.
    dtype: compute dtype; parameters and logits stay float32.
  """

  num_classes: int
  hidden: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Forward pass.

    Args:
      x: inputs [B, ...], float32; flattened per example.
      train: unused (the MLP behaves the same in both modes).

    Returns:
      logits [B, num_classes], float32.
    """
    del train
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    x = nn.relu(nn.Dense(self.hidden, kernel_init=_HE_NORMAL, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))


# Registry entries: name -> constructor taking num_classes and keyword overrides.
MODELS: dict[str, Callable[..., nn.Module]] = {
  "cnn_small": functools.partial(CNN, widths=(16, 32)),
  "cnn_large": functools.partial(CNN, widths=(48, 96)),
  # With BatchNorm after every conv (stable on strongly augmented views, issue 11).
  "cnn_small_bn": functools.partial(CNN, widths=(16, 32), batch_norm=True),
  "cnn_large_bn": functools.partial(CNN, widths=(48, 96), batch_norm=True),
  "mlp": MLP,
}
