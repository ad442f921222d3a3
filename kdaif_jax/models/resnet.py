"""CIFAR ResNets with basic blocks, as used in the distillation literature.

Reference: the CIFAR ResNets of He et al. (2016) in the form used by the CRD
benchmark (Tian, Krishnan & Isola, "Contrastive Representation Distillation",
ICLR 2020): a 3x3 stem, three stages of ``(depth - 2) / 6`` basic blocks with
strides 1, 2, 2, projection shortcuts (1x1 conv + BN) wherever the shape
changes, global average pooling and a dense head. Convolutions have no bias;
He (fan-out) initialisation; BN momentum 0.9 (PyTorch's 0.1).

Parameter counts measured here (published CRD numbers in brackets):
  name        10 classes    100 classes
  resnet20      272,474       278,324  [0.27M / 0.28M]
  resnet56      855,770       861,620  [0.86M]
  resnet110   1,730,714     1,736,564  [1.74M]
  resnet8x4   1,210,410     1,233,540  [1.23M]
  resnet32x4  7,410,730     7,433,860  [7.43M]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's kaiming_normal_(mode='fan_out'), as in the reference code.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Explicit symmetric padding: 'SAME' pads a stride-2 conv on even input only at
# the end, which would shift features relative to the reference.
_PAD1 = ((1, 1), (1, 1))

CIFAR_WIDTHS = (16, 16, 32, 64)
X4_WIDTHS = (32, 64, 128, 256)


class BasicBlock(nn.Module):
  """Post-activation basic block: conv-BN-ReLU-conv-BN, add, ReLU.

  Attributes:
    width: output channels.
    stride: stride of the first conv and of the projection shortcut.
    bn_momentum: running-average decay of BatchNorm.
    dtype: compute dtype.
  """

  width: int
  stride: int = 1
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Apply the block to x [B, H, W, C_in]; returns [B, H/stride, W/stride, width]."""
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_CONV_INIT, dtype=self.dtype)
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      dtype=self.dtype,
    )
    h = conv(self.width, (3, 3), strides=self.stride, padding=_PAD1)(x)
    h = nn.relu(norm()(h))
    h = conv(self.width, (3, 3), padding=_PAD1)(h)
    h = norm()(h)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.width:
      shortcut = conv(self.width, (1, 1), strides=self.stride, padding="VALID")(x)
      shortcut = norm()(shortcut)
    return nn.relu(h + shortcut)


class ResNet(nn.Module):
  """CIFAR ResNet: stem, three stages of basic blocks, pool, dense head.

  Attributes:
    num_classes: number of logits.
    depth: 6n + 2 layers, n blocks per stage.
    widths: (stem, stage1, stage2, stage3) channels; (16, 16, 32, 64) for the
      plain CIFAR ResNets, (32, 64, 128, 256) for the "x4" ones.
    bn_momentum: running-average decay of BatchNorm.
    dtype: compute dtype; parameters and logits stay float32.
  """

  num_classes: int
  depth: int = 20
  widths: tuple[int, int, int, int] = CIFAR_WIDTHS
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Forward pass.

    Args:
      x: images [B, H, W, 3], float32, normalised.
      train: use batch statistics and update the running ones.

    Returns:
      logits [B, num_classes], float32.
    """
    if (self.depth - 2) % 6 != 0:
      raise ValueError(f"ResNet depth must be 6n + 2, got {self.depth}")
    blocks = (self.depth - 2) // 6
    x = x.astype(self.dtype)
    x = nn.Conv(
      self.widths[0],
      (3, 3),
      padding=_PAD1,
      use_bias=False,
      kernel_init=_CONV_INIT,
      dtype=self.dtype,
    )(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, dtype=self.dtype)(x)
    x = nn.relu(x)
    for stage, (width, stride) in enumerate(zip(self.widths[1:], (1, 2, 2), strict=True)):
      for i in range(blocks):
        x = BasicBlock(
          width,
          stride if i == 0 else 1,
          self.bn_momentum,
          self.dtype,
          name=f"stage{stage + 1}_block{i + 1}",
        )(x, train)
    x = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    # The head runs in float32: it is cheap and the logits feed the losses.
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


# Registry entries: name -> constructor taking num_classes and keyword overrides.
MODELS: dict[str, Callable[..., nn.Module]] = {
  "resnet20": functools.partial(ResNet, depth=20, widths=CIFAR_WIDTHS),
  "resnet56": functools.partial(ResNet, depth=56, widths=CIFAR_WIDTHS),
  "resnet110": functools.partial(ResNet, depth=110, widths=CIFAR_WIDTHS),
  "resnet8x4": functools.partial(ResNet, depth=8, widths=X4_WIDTHS),
  "resnet32x4": functools.partial(ResNet, depth=32, widths=X4_WIDTHS),
}
