"""Per-image RandAugment operations in pure JAX.

Every public op here works on ONE image ``[H, W, C]`` (C = 1 or 3) that is
either ``uint8`` in 0..255 or floating point in [0, 1], and returns an image of
the same shape, dtype and range. Batching is done by the caller with
``jax.vmap`` (see :mod:`kdaif_jax.data.augment`).

Internally each op is written once on a "canonical" float32 image on the
0..255 scale (``_rotate``, ``_equalize``, ...). That lets ``randaugment``
convert a batch once, chain several ops without re-quantising, and convert
back once; the public names are thin dtype-preserving wrappers around them.

Two layers are exposed:

* physical ops with a physical argument, e.g. ``rotate(image, degrees)``,
  ``posterize(image, bits)``, ``brightness(image, factor)``;
* ``OP_FNS[name](image, level)`` with a signed ``level`` in [-1, 1] that is
  mapped onto the physical argument by the table below (``|level|`` is used by
  ops that have no direction). ``level = magnitude / max_magnitude`` times a
  random sign in RandAugment.

==============  =============================================  ==========
op              physical argument at ``level``                 level = 0
==============  =============================================  ==========
identity        none                                           identity
auto_contrast   none (per-channel min..max -> 0..255)          n/a
equalize        none (PIL-style per-channel histogram eq.)     n/a
rotate          degrees = 30 * level (positive = CCW)          identity
solarize        threshold = 256 * (1 - |level|)                identity
color           factor = 1 + 0.9 * level  (in [0.1, 1.9])      identity
posterize       bits = 8 - floor(4 * |level|)  (in [4, 8])     identity
contrast        factor = 1 + 0.9 * level                       identity
brightness      factor = 1 + 0.9 * level                       identity
sharpness       factor = 1 + 0.9 * level                       identity
shear_x/y       factor = 0.3 * level                           identity
translate_x/y   pixels = 0.3 * level * W (or H)                identity
==============  =============================================  ==========

Physical arguments are on the 0..255 scale for both dtypes (e.g. a solarize
threshold of 128 means 0.502 for a float image); posterize and equalize work
on the image quantised to 256 levels, the other ops keep float precision.

Geometric ops use an inverse affine warp about the image centre with
NEAREST sampling (as PIL's default in the reference implementations; it is
cheap and keeps exact 90-degree rotations / integer shifts lossless) and a
constant mid-grey fill of 128 (128/255 for float images), as in UDA/FixMatch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

FILL = 128.0  # geometric fill on the 0..255 scale
_MAX_ROTATE = 30.0  # degrees
_MAX_SHEAR = 0.3
_MAX_TRANSLATE = 0.3  # fraction of the image side
_MAX_ENHANCE = 0.9  # factor = 1 +- 0.9
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, same weights as PIL's convert("L")

CanonOp = Callable[..., jax.Array]


def to_float255(image: jax.Array) -> jax.Array:
  """Converts uint8 0..255 or float [0, 1] to float32 on the 0..255 scale.

  Args:
    image: any shape, dtype uint8 or floating.

  Returns:
    float32 array of the same shape.
  """
  image = jnp.asarray(image)
  if image.dtype == jnp.uint8:
    return image.astype(jnp.float32)
  if jnp.issubdtype(image.dtype, jnp.floating):
    return image.astype(jnp.float32) * 255.0
  raise TypeError(f"images must be uint8 or floating, got {image.dtype}")


def from_float255(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Inverse of :func:`to_float255`: clips, and rounds for uint8.

  Args:
    x: float32 array on the 0..255 scale.
    dtype: target dtype (uint8 or floating).

  Returns:
    array of ``dtype``; uint8 in 0..255 or floating in [0, 1].
  """
  x = jnp.clip(x, 0.0, 255.0)
  if jnp.dtype(dtype) == jnp.uint8:
    return jnp.round(x).astype(jnp.uint8)
  return (x / 255.0).astype(dtype)


_PUBLIC_DOC = """

    Args:
      image: one image [H, W, C], uint8 in 0..255 or float in [0, 1].
      *args: the op's scalar argument (may be traced), if it has one.

    Returns:
      [H, W, C] with the same dtype and range as ``image``.
    """


def _public(fn: CanonOp) -> CanonOp:
  """Wraps a canonical op so it accepts/returns uint8 or float [0,1]."""

  @functools.wraps(fn)
  def wrapped(image: jax.Array, *args: jax.Array | float) -> jax.Array:
    image = jnp.asarray(image)
    return from_float255(fn(to_float255(image), *args), image.dtype)

  wrapped.__name__ = wrapped.__qualname__ = fn.__name__.lstrip("_")
  wrapped.__doc__ = (fn.__doc__ or "") + _PUBLIC_DOC
  return wrapped


def _grey(x: jax.Array) -> jax.Array:
  """Luma [H, W, 1]; for 1-channel images the image itself (so colour ops
  degrade gracefully)."""
  if x.shape[-1] == 3:
    return (x @ jnp.asarray(_LUMA, jnp.float32))[..., None]
  return jnp.mean(x, axis=-1, keepdims=True)


def _blend(degenerate: jax.Array, x: jax.Array, factor: jax.Array | float) -> jax.Array:
  # PIL ImageEnhance semantics: factor 0 -> degenerate, 1 -> original,
  # >1 extrapolates away from the degenerate image.
  out = degenerate + jnp.asarray(factor, jnp.float32) * (x - degenerate)
  return jnp.clip(out, 0.0, 255.0)


def _quantise(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.int32)


# ---------------------------------------------------------------- pixel ops
def _identity(x: jax.Array) -> jax.Array:
  """Returns the image unchanged."""
  return x


def _auto_contrast(x: jax.Array) -> jax.Array:
  """Stretches each channel's min..max to the full range."""
  lo = jnp.min(x, axis=(0, 1), keepdims=True)
  hi = jnp.max(x, axis=(0, 1), keepdims=True)
  # Constant channels are left alone (PIL does the same) instead of / 0.
  scale = 255.0 / jnp.maximum(hi - lo, 1e-6)
  return jnp.where(hi > lo, (x - lo) * scale, x)


def _equalize_channel(xc: jax.Array) -> jax.Array:
  q = _quantise(xc)
  hist = jnp.bincount(q.ravel(), length=256)
  # PIL's recipe: the last occupied bin does not count towards the step, so
  # a one-level channel (step 0) is returned unchanged.
  step = (q.size - hist[jnp.max(q)]) // 255
  cum_before = jnp.cumsum(hist) - hist
  lut = (step // 2 + cum_before) // jnp.maximum(step, 1)
  lut = jnp.clip(lut, 0, 255).astype(jnp.float32)
  return jnp.where(step > 0, lut[q], xc)


def _equalize(x: jax.Array) -> jax.Array:
  """PIL-style per-channel histogram equalisation (on uint8 levels)."""
  return jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(x)


def _solarize(x: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """Inverts pixels >= threshold (threshold on the 0..255 scale)."""
  return jnp.where(x >= threshold, 255.0 - x, x)


def _posterize(x: jax.Array, bits: jax.Array | int) -> jax.Array:
  """Keeps the ``bits`` (0..8) most significant bits of each uint8 value."""
  # Bit-mask on the uint8 scale, keeping the `bits` most significant bits.
  shift = 8 - jnp.clip(jnp.asarray(bits, jnp.int32), 0, 8)
  mask = jnp.left_shift(jnp.int32(255), shift) & 255
  return (_quantise(x) & mask).astype(jnp.float32)


def _color(x: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Saturation: blends with the luma image (0 -> grey, 1 -> identity)."""
  return _blend(jnp.broadcast_to(_grey(x), x.shape), x, factor)


def _contrast(x: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Blends with the mean luma (0 -> flat grey, 1 -> identity)."""
  return _blend(jnp.mean(_grey(x)), x, factor)


def _brightness(x: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Multiplies by ``factor`` (0 -> black, 1 -> identity)."""
  return _blend(jnp.zeros_like(x), x, factor)


def _sharpness(x: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Blends with a 3x3-smoothed copy (0 -> smooth, 1 -> identity)."""
  # PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 as nine shifted
  # slices (cheaper than a conv for 3x3 on CPU); the 1-pixel border keeps
  # the original values, as PIL and the TF AutoAugment port do.
  h, w, _ = x.shape
  p = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
  total = sum(p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
  smooth = (total + 4.0 * x) / 13.0
  rows = jnp.arange(h)[:, None, None]
  cols = jnp.arange(w)[None, :, None]
  interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
  return _blend(jnp.where(interior, smooth, x), x, factor)


# ------------------------------------------------------------ geometric ops
def _affine(x: jax.Array, matrix: jax.Array) -> jax.Array:
  """Inverse warp: ``matrix`` [2, 3] maps centred output coords (u, v) =
  (col - cx, row - cy) to centred source coords; nearest sampling."""
  h, w, _ = x.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  rows, cols = jnp.meshgrid(
    jnp.arange(h, dtype=jnp.float32),
    jnp.arange(w, dtype=jnp.float32),
    indexing="ij",
  )
  u, v = cols - cx, rows - cy
  m = jnp.asarray(matrix, jnp.float32)
  src_x = jnp.round(m[0, 0] * u + m[0, 1] * v + m[0, 2] + cx).astype(jnp.int32)
  src_y = jnp.round(m[1, 0] * u + m[1, 1] * v + m[1, 2] + cy).astype(jnp.int32)
  valid = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  vals = x[jnp.clip(src_y, 0, h - 1), jnp.clip(src_x, 0, w - 1)]
  return jnp.where(valid[..., None], vals, FILL)


def _matrix(*entries: jax.Array | float) -> jax.Array:
  """[2, 3] float32 matrix from six (possibly traced) scalars, row-major."""
  return jnp.stack([jnp.asarray(e, jnp.float32) for e in entries]).reshape(2, 3)


def _rotate_matrix(degrees: jax.Array | float) -> jax.Array:
  t = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  c, s = jnp.cos(t), jnp.sin(t)
  # Inverse of a counter-clockwise rotation in (x right, y down) coords.
  return _matrix(c, -s, 0.0, s, c, 0.0)


def _shear_x_matrix(factor: jax.Array | float) -> jax.Array:
  return _matrix(1.0, factor, 0.0, 0.0, 1.0, 0.0)


def _shear_y_matrix(factor: jax.Array | float) -> jax.Array:
  return _matrix(1.0, 0.0, 0.0, factor, 1.0, 0.0)


def _translate_x_matrix(pixels: jax.Array | float) -> jax.Array:
  return _matrix(1.0, 0.0, -jnp.asarray(pixels, jnp.float32), 0.0, 1.0, 0.0)


def _translate_y_matrix(pixels: jax.Array | float) -> jax.Array:
  return _matrix(1.0, 0.0, 0.0, 0.0, 1.0, -jnp.asarray(pixels, jnp.float32))


def _rotate(x: jax.Array, degrees: jax.Array | float) -> jax.Array:
  """Rotates by ``degrees`` counter-clockwise about the centre; grey fill."""
  return _affine(x, _rotate_matrix(degrees))


def _shear_x(x: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Samples (x + factor * (y - cy), y): rows below centre move left."""
  return _affine(x, _shear_x_matrix(factor))


def _shear_y(x: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Samples (x, y + factor * (x - cx)): columns right of centre move up."""
  return _affine(x, _shear_y_matrix(factor))


def _translate_x(x: jax.Array, pixels: jax.Array | float) -> jax.Array:
  """Shifts content right by ``pixels`` (may be negative); grey fill."""
  return _affine(x, _translate_x_matrix(pixels))


def _translate_y(x: jax.Array, pixels: jax.Array | float) -> jax.Array:
  """Shifts content down by ``pixels`` (may be negative); grey fill."""
  return _affine(x, _translate_y_matrix(pixels))


# ------------------------------------------------------------ public ops
identity = _public(_identity)
auto_contrast = _public(_auto_contrast)
equalize = _public(_equalize)
solarize = _public(_solarize)
posterize = _public(_posterize)
color = _public(_color)
contrast = _public(_contrast)
brightness = _public(_brightness)
sharpness = _public(_sharpness)
rotate = _public(_rotate)
shear_x = _public(_shear_x)
shear_y = _public(_shear_y)
translate_x = _public(_translate_x)
translate_y = _public(_translate_y)


def cutout(image: jax.Array, center_y: jax.Array, center_x: jax.Array, size: int) -> jax.Array:
  """Sets a ``size`` x ``size`` square to mid-grey, clipped at the borders.

  Works in the image's own dtype (grey = 128 for uint8, 0.5 for float).

  Args:
    image: [H, W, C].
    center_y, center_x: integer centre; rows ``center_y - size // 2`` to
      ``center_y - size // 2 + size - 1`` are covered (columns likewise).
    size: side of the square (static).

  Returns:
    [H, W, C], same dtype.
  """
  image = jnp.asarray(image)
  h, w, _ = image.shape
  y0 = jnp.asarray(center_y, jnp.int32) - size // 2
  x0 = jnp.asarray(center_x, jnp.int32) - size // 2
  rows, cols = jnp.arange(h), jnp.arange(w)
  in_y = (rows >= y0) & (rows < y0 + size)
  in_x = (cols >= x0) & (cols < x0 + size)
  grey = 128 if image.dtype == jnp.uint8 else 0.5
  mask = (in_y[:, None] & in_x[None, :])[..., None]
  return jnp.where(mask, jnp.asarray(grey, image.dtype), image)


# ------------------------------------------------- level -> argument mapping
def _enhance(fn: CanonOp) -> CanonOp:
  return lambda x, level: fn(x, 1.0 + _MAX_ENHANCE * level)


def _posterize_level(x: jax.Array, level: jax.Array) -> jax.Array:
  # +1e-6 so that level 0.25/0.5/0.75 land on the intended bit count.
  bits = 8 - jnp.floor(4.0 * jnp.abs(level) + 1e-6).astype(jnp.int32)
  return _posterize(x, bits)


# Canonical (float 0..255) level ops used by randaugment; level in [-1, 1].
LEVEL_OPS: dict[str, CanonOp] = {
  "identity": lambda x, level: x,
  "auto_contrast": lambda x, level: _auto_contrast(x),
  "equalize": lambda x, level: _equalize(x),
  "rotate": lambda x, level: _rotate(x, _MAX_ROTATE * level),
  "solarize": lambda x, level: _solarize(x, 256.0 * (1.0 - jnp.abs(level))),
  "color": _enhance(_color),
  "posterize": _posterize_level,
  "contrast": _enhance(_contrast),
  "brightness": _enhance(_brightness),
  "sharpness": _enhance(_sharpness),
  "shear_x": lambda x, level: _shear_x(x, _MAX_SHEAR * level),
  "shear_y": lambda x, level: _shear_y(x, _MAX_SHEAR * level),
  "translate_x": lambda x, level: _translate_x(x, _MAX_TRANSLATE * x.shape[1] * level),
  "translate_y": lambda x, level: _translate_y(x, _MAX_TRANSLATE * x.shape[0] * level),
}

OPS: tuple[str, ...] = tuple(LEVEL_OPS)

_LEVEL_DOC = """RandAugment op {name!r} at a signed strength (see the module table).

    Args:
      image: one image [H, W, C], uint8 in 0..255 or float in [0, 1].
      level: scalar in [-1, 1] (may be traced); ops without a direction use
        ``|level|``.

    Returns:
      [H, W, C] with the same dtype and range as ``image``.
    """


def _level_op(name: str) -> CanonOp:
  fn = _public(LEVEL_OPS[name])
  fn.__name__ = fn.__qualname__ = name
  fn.__doc__ = _LEVEL_DOC.format(name=name)
  return fn


# Public dtype-preserving versions: OP_FNS[name](image [H,W,C], level) -> image.
OP_FNS: dict[str, CanonOp] = {name: _level_op(name) for name in OPS}
