"""Per-channel statistics of uint8 images and normalisation with them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def channel_stats(images: list[np.ndarray], chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std in [0, 1] scale of uint8 [N_i, H, W, C] arrays.

  Chunked float64 sums, so a 70k-image set never becomes one float copy.

  Returns:
    (mean float32 [C], std float32 [C]); std floored at 1e-3.
  """
  total, sq, count = 0.0, 0.0, 0
  for array in images:
    for start in range(0, len(array), chunk):
      x = array[start : start + chunk].astype(np.float64) / 255.0
      total = total + x.sum(axis=(0, 1, 2))
      sq = sq + np.square(x).sum(axis=(0, 1, 2))
      count += x.shape[0] * x.shape[1] * x.shape[2]
  mean = total / count
  std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def normalize(images: jax.Array, mean: Any, std: Any) -> jax.Array:
  """(images / 255 - mean) / std in float32; jittable.

  Args:
    images: [..., C] uint8, or float on the same [0, 255] scale (e.g. after
      on-device augmentation). Always divided by 255.
    mean: [C] channel means in [0, 1] scale (Dataset.mean).
    std: [C] channel stds in [0, 1] scale (Dataset.std).

  Returns:
    float32 array of the shape of `images`.
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def make_prepare(mean: Any, std: Any, text: bool = False) -> Callable[[jax.Array], jax.Array]:
  """The per-device input preparation of the steps (views arrive augmented).

  Args:
    mean, std: [C] channel statistics (``Dataset.mean`` / ``Dataset.std``).
    text: token batches (GLUE): passed to the model as they are.

  Returns:
    ``batch -> model inputs``: ``normalize`` with these statistics, or the identity.
  """
  if text:
    return lambda tokens: tokens
  mean, std = jnp.asarray(mean), jnp.asarray(std)
  return lambda images: normalize(images, mean, std)
