"""On-device image augmentation for semi-supervised distillation (UDA / MPL).

Batched, jittable, pure-JAX versions of the usual recipes:

* :func:`weak`  -- random crop from a reflect-padded image + horizontal flip;
* :func:`cutout` -- one mid-grey square per image;
* :func:`randaugment` -- ``num_ops`` ops drawn uniformly (with replacement)
  per image from :data:`OPS`, each at ``magnitude / max_magnitude`` with a
  random sign;
* :func:`strong` -- ``weak`` -> ``randaugment`` -> ``cutout`` (UDA, FixMatch
  and Meta Pseudo Labels all use this composition for the strong view).

Images are ``[B, H, W, C]`` with C in {1, 3}, either uint8 in 0..255 or float
in [0, 1]; every function returns the same shape, dtype and range. All
randomness comes from the ``key`` argument: same key -> same output.

Per-image ops live in :mod:`kdaif_jax.data._augment_ops`, re-exported here as
``ops`` (physical arguments, e.g. ``ops.rotate(img, 90.0)``) and
:data:`OP_FNS` (``OP_FNS[name](img, level)`` with level in [-1, 1]); its
module docstring has the magnitude table. Arguments that change shapes or
control flow (``pad``, ``flip``, ``size``/``cutout_size``, ``num_ops``,
``ops``) must be static under ``jax.jit``; ``magnitude`` may be traced.

Typical use (static options bound with partial, key split per step)::

    strong_fn = jax.jit(functools.partial(augment.strong, num_ops=2, cutout_size=16))
    x_strong = strong_fn(jax.random.fold_in(key, step), x_uint8)

Implementation note: per-image op choice is ``jax.lax.switch`` under
``jax.vmap``; with a batched index XLA evaluates every op and selects, which
costs ~len(OPS) ops per step but is branch-free and fast for small images
(jitted ``strong`` on uint8 [128, 32, 32, 3]: ~30-40 ms on 2 CPU cores, after
a ~4 s compile).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kdaif_jax.data import _augment_ops

ops = _augment_ops
OPS: tuple[str, ...] = _augment_ops.OPS
OP_FNS = _augment_ops.OP_FNS

__all__ = ["OPS", "OP_FNS", "cutout", "ops", "randaugment", "strong", "weak"]


def _check_images(images: jax.Array) -> jax.Array:
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected images [B, H, W, C] with C in (1, 3), got {images.shape}")
  if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be uint8 or floating, got {images.dtype}")
  return images


def weak(key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
  """Random translation by crop-after-padding, plus random horizontal flip.

  The padding is REFLECT (no artificial black/grey border, as in the
  FixMatch/MPL PyTorch recipes), so ``pad`` must be smaller than H and W.
  Use ``flip=False`` for digits / SVHN, where mirroring changes the class.

  Args:
    key: PRNG key.
    images: [B, H, W, C] uint8 or float.
    pad: pixels of reflect padding per side; offsets are uniform in
      [0, 2 * pad] per axis and image. 0 disables cropping.
    flip: mirror each image left-right with probability 1/2.

  Returns:
    [B, H, W, C], same dtype. ``pad=0, flip=False`` is the identity.
  """
  images = _check_images(images)
  b, h, w, c = images.shape
  if pad < 0 or (pad > 0 and pad >= min(h, w)):
    raise ValueError(f"pad must be in [0, min(H, W)) for reflect padding, got {pad}")
  k_crop, k_flip = jax.random.split(key)
  out = images
  if pad > 0:
    padded = jnp.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    out = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(k_flip, 0.5, (b,))
    out = jnp.where(mirror[:, None, None, None], out[:, :, ::-1], out)
  return out


def cutout(key: jax.Array, images: jax.Array, *, size: int) -> jax.Array:
  """One ``size`` x ``size`` mid-grey square per image.

  The centre is uniform over all pixels, so squares near the border are
  clipped (the DeVries & Taylor / FixMatch convention). Grey is 128 for
  uint8 and 0.5 for float.

  Args:
    key: PRNG key.
    images: [B, H, W, C] uint8 or float.
    size: side of the square (static); 0 disables.

  Returns:
    [B, H, W, C], same dtype.
  """
  images = _check_images(images)
  if size < 0:
    raise ValueError(f"size must be >= 0, got {size}")
  if size == 0:
    return images
  b, h, w, _ = images.shape
  k_y, k_x = jax.random.split(key)
  center_y = jax.random.randint(k_y, (b,), 0, h)
  center_x = jax.random.randint(k_x, (b,), 0, w)
  return jax.vmap(lambda im, cy, cx: _augment_ops.cutout(im, cy, cx, size))(
    images, center_y, center_x
  )


def randaugment(
  key: jax.Array,
  images: jax.Array,
  *,
  num_ops: int = 2,
  magnitude: float | jax.Array = 10.0,
  max_magnitude: float = 10.0,
  ops: Sequence[str] = OPS,
  random_magnitude: bool = False,
) -> jax.Array:
  """RandAugment (Cubuk et al. 2020) applied independently per image.

  Each image gets ``num_ops`` ops drawn uniformly with replacement from
  ``ops``, each applied (probability 1) at ``level = magnitude /
  max_magnitude`` (clipped to [0, 1]) with an independent random sign, so
  e.g. rotate is +-30 degrees at full magnitude. ``max_magnitude = 10``
  follows the paper's 0..10 scale (UDA uses the same scale).

  Args:
    key: PRNG key.
    images: [B, H, W, C] uint8 or float.
    num_ops: ops per image (static); 0 is the identity.
    magnitude: strength in [0, max_magnitude]; may be traced.
    max_magnitude: magnitude that maps to each op's maximum strength.
    ops: names from :data:`OPS` to draw from (static).
    random_magnitude: if True, draw each op's level uniformly from
      [0, magnitude / max_magnitude] (FixMatch's RandAugment variant).

  Returns:
    [B, H, W, C], same dtype and range.
  """
  images = _check_images(images)
  names = tuple(ops)
  unknown = [n for n in names if n not in _augment_ops.LEVEL_OPS]
  if unknown:
    raise ValueError(f"unknown RandAugment ops {unknown}; choose from {OPS}")
  if num_ops < 0:
    raise ValueError(f"num_ops must be >= 0, got {num_ops}")
  if num_ops == 0 or not names:
    return images
  branches = [_augment_ops.LEVEL_OPS[n] for n in names]
  b = images.shape[0]
  k_op, k_sign, k_mag = jax.random.split(key, 3)
  op_idx = jax.random.randint(k_op, (b, num_ops), 0, len(names))
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (b, num_ops)), 1.0, -1.0)
  level = jnp.clip(jnp.asarray(magnitude, jnp.float32) / max_magnitude, 0.0, 1.0)
  if random_magnitude:
    level = level * jax.random.uniform(k_mag, (b, num_ops))
  levels = sign * level  # [B, num_ops], signed

  def step(x: jax.Array, op: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    return jax.lax.switch(op[0], branches, x, op[1]), None

  def one(x: jax.Array, idx: jax.Array, lvl: jax.Array) -> jax.Array:
    # scan rather than a Python loop: the switch is traced and compiled
    # once instead of num_ops times (about halves compile time).
    return jax.lax.scan(step, x, (idx, lvl))[0]

  # Convert once so the chained ops do not re-quantise uint8 in between.
  out = jax.vmap(one)(_augment_ops.to_float255(images), op_idx, levels)
  return _augment_ops.from_float255(out, images.dtype)


def strong(
  key: jax.Array,
  images: jax.Array,
  *,
  num_ops: int = 2,
  magnitude: float | jax.Array = 10.0,
  cutout_size: int = 16,
  pad: int = 4,
  flip: bool = True,
  max_magnitude: float = 10.0,
  ops: Sequence[str] = OPS,
  random_magnitude: bool = False,
) -> jax.Array:
  """Strong view for consistency training: weak -> RandAugment -> Cutout.

  Args:
    key: PRNG key.
    images: [B, H, W, C] uint8 or float.
    num_ops, magnitude, max_magnitude, ops, random_magnitude: see
      :func:`randaugment`.
    cutout_size: side of the cutout square (static); 0 disables. 16 is the
      usual value for 32x32 images.
    pad, flip: see :func:`weak`.

  Returns:
    [B, H, W, C], same dtype and range.
  """
  k_weak, k_ra, k_cut = jax.random.split(key, 3)
  out = weak(k_weak, images, pad=pad, flip=flip)
  out = randaugment(
    k_ra,
    out,
    num_ops=num_ops,
    magnitude=magnitude,
    max_magnitude=max_magnitude,
    ops=ops,
    random_magnitude=random_magnitude,
  )
  return cutout(k_cut, out, size=cutout_size)
