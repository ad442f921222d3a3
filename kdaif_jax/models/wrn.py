"""Pre-activation Wide ResNets (Zagoruyko & Komodakis, 2016).

Two published variants share this module:

* WRN-28-2 / WRN-28-8 as in FixMatch (Sohn et al., 2020) and Meta Pseudo
  Labels (Pham et al., 2021): leaky ReLU (slope 0.1), BN decay 0.999, and only
  the first stage's projection shortcut reads the pre-activated input (the
  FixMatch ``activate_before_residual`` rule); later projections read the raw
  block input.
* WRN-16-2 / WRN-40-2 as in CRD (Tian et al., 2020): ReLU, BN momentum 0.9
  (PyTorch's 0.1), every projection shortcut reads the pre-activated input.

Both: a 3x3 stem with 16 channels, three stages of ``(depth - 4) / 6`` blocks of
widths 16k, 32k, 64k and strides 1, 2, 2, a final BN + activation, global
average pooling and a dense head. Convolutions have no bias; He (fan-out)
initialisation. No dropout (the forward pass stays deterministic).

Parameter counts measured here (published numbers in brackets):
  name       10 classes          100 classes
  wrn_28_2    1,467,610 [1.47M]   1,479,220
  wrn_28_8   23,354,842 [23.4M]  23,401,012
  wrn_16_2      691,674             703,284 [0.70M]
  wrn_40_2    2,243,546           2,255,156 [2.26M]
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


class PreActBlock(nn.Module):
  """Pre-activation block: BN-act-conv-BN-act-conv plus a shortcut.

  Attributes:
    width: output channels.
    stride: stride of the first conv and of the projection shortcut.
    activate_shortcut: a projection shortcut reads the pre-activated input
      (True) or the raw block input (False).
    negative_slope: leaky-ReLU slope; 0 gives ReLU.
    bn_momentum: running-average decay of BatchNorm.
    dtype: compute dtype.
  """

  width: int
  stride: int = 1
  activate_shortcut: bool = True
  negative_slope: float = 0.0
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
    act = functools.partial(nn.leaky_relu, negative_slope=self.negative_slope)
    h = act(norm()(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.width:
      source = h if self.activate_shortcut else x
      shortcut = conv(self.width, (1, 1), strides=self.stride, padding="VALID")(source)
    h = conv(self.width, (3, 3), strides=self.stride, padding=_PAD1)(h)
    h = act(norm()(h))
    h = conv(self.width, (3, 3), padding=_PAD1)(h)
    return shortcut + h


class WideResNet(nn.Module):
  """Pre-activation WRN-depth-k.

  Attributes:
    num_classes: number of logits.
    depth: 6n + 4 layers, n blocks per stage.
    widen_factor: k; stage widths are 16k, 32k, 64k.
    negative_slope: leaky-ReLU slope; 0 gives ReLU.
    bn_momentum: running-average decay of BatchNorm.
    fixmatch_shortcuts: only the first stage's projection reads the
      pre-activated input (FixMatch); otherwise all projections do (CRD).
    dtype: compute dtype; parameters and logits stay float32.
  """

  num_classes: int
  depth: int = 28
  widen_factor: int = 2
  negative_slope: float = 0.0
  bn_momentum: float = 0.9
  fixmatch_shortcuts: bool = False
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
    if (self.depth - 4) % 6 != 0:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}")
    blocks = (self.depth - 4) // 6
    x = x.astype(self.dtype)
    x = nn.Conv(
      16,
      (3, 3),
      padding=_PAD1,
      use_bias=False,
      kernel_init=_CONV_INIT,
      dtype=self.dtype,
    )(x)
    widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
    for stage, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
      for i in range(blocks):
        x = PreActBlock(
          width=width,
          stride=stride if i == 0 else 1,
          activate_shortcut=stage == 0 or not self.fixmatch_shortcuts,
          negative_slope=self.negative_slope,
          bn_momentum=self.bn_momentum,
          dtype=self.dtype,
          name=f"stage{stage + 1}_block{i + 1}",
        )(x, train)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, dtype=self.dtype)(x)
    x = nn.leaky_relu(x, negative_slope=self.negative_slope)
    x = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    # The head runs in float32: it is cheap and the logits feed the losses.
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


_FIXMATCH = dict(negative_slope=0.1, bn_momentum=0.999, fixmatch_shortcuts=True)
_CRD = dict(negative_slope=0.0, bn_momentum=0.9, fixmatch_shortcuts=False)

# Registry entries: name -> constructor taking num_classes and keyword overrides.
MODELS: dict[str, Callable[..., nn.Module]] = {
  "wrn_28_2": functools.partial(WideResNet, depth=28, widen_factor=2, **_FIXMATCH),
  "wrn_28_8": functools.partial(WideResNet, depth=28, widen_factor=8, **_FIXMATCH),
  "wrn_16_2": functools.partial(WideResNet, depth=16, widen_factor=2, **_CRD),
  "wrn_40_2": functools.partial(WideResNet, depth=40, widen_factor=2, **_CRD),
}
