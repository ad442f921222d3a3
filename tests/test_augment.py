"""Tests for kdaif_jax.data.augment (batched on-device augmentation)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdaif_jax.data import augment

# Everything is called through jax.jit: op-by-op (eager) dispatch compiles
# each primitive separately and is several times slower to test. The jitted
# wrappers are module-level so each (function, shape, dtype) compiles once.
ops = SimpleNamespace(**{name: jax.jit(getattr(augment.ops, name)) for name in augment.OPS})
ops.cutout = jax.jit(augment.ops.cutout, static_argnames=("size",))
OP_FNS = {name: jax.jit(fn) for name, fn in augment.OP_FNS.items()}
_strong_jit = jax.jit(augment.strong)
weak_jit = jax.jit(augment.weak, static_argnames=("pad", "flip"))
cutout_jit = jax.jit(augment.cutout, static_argnames=("size",))
randaugment_jit = jax.jit(augment.randaugment, static_argnames=("num_ops", "ops"))


def strong_jit(key: jax.Array, images: jax.Array) -> jax.Array:
  # magnitude passed as a kwarg is traced by jax.jit: this also checks
  # that strong() works with a traced magnitude.
  return _strong_jit(key, images, magnitude=jnp.float32(10.0))


def _batch(dtype: type, b: int = 8, h: int = 16, w: int = 16, c: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (b, h, w, c), dtype=np.uint8)
  if dtype == np.uint8:
    return jnp.asarray(x)
  return jnp.asarray(x.astype(np.float32) / 255.0)


def _img(values, dtype=np.uint8) -> jnp.ndarray:
  """Builds an [H, W, C] image from nested lists / arrays of 0..255 values."""
  a = np.asarray(values, dtype=np.float64)
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  if dtype == np.uint8:
    return jnp.asarray(a.astype(np.uint8))
  return jnp.asarray((a / 255.0).astype(np.float32))


def _u8(x) -> np.ndarray:
  return np.asarray(x).astype(np.int64)


# ------------------------------------------------------------------ batch API
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_shapes_dtypes_ranges(dtype):
  x = _batch(dtype)
  key = jax.random.key(0)
  outs = {
    "weak": weak_jit(key, x),
    "cutout": cutout_jit(key, x, size=6),
    "strong": strong_jit(key, x),
  }
  for name, y in outs.items():
    assert y.shape == x.shape, name
    assert y.dtype == x.dtype, name
    y = np.asarray(y)
    if dtype == np.float32:
      assert np.all(np.isfinite(y)) and y.min() >= 0.0 and y.max() <= 1.0, name


def test_single_channel():
  # Colour ops must degrade gracefully on C=1 (a full strong() compile per
  # shape costs seconds, so only the channel-sensitive ops are drawn here).
  x = _batch(np.uint8, c=1)
  colour_ops = ("color", "contrast", "sharpness", "equalize", "auto_contrast")
  y = randaugment_jit(jax.random.key(0), x, ops=colour_ops)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert weak_jit(jax.random.key(0), x).shape == x.shape
  assert cutout_jit(jax.random.key(0), x, size=4).shape == x.shape


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_each_op_keeps_dtype_and_range(dtype):
  x = _img(np.random.default_rng(1).integers(0, 256, (8, 8, 3)), dtype)
  for name, fn in OP_FNS.items():
    for level in (-1.0, 1.0):
      y = fn(x, level)
      assert y.shape == x.shape and y.dtype == x.dtype, name
      if dtype == np.float32:
        assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0, name


def test_determinism_and_key_dependence():
  x = _batch(np.uint8)
  a = strong_jit(jax.random.key(1), x)
  b = strong_jit(jax.random.key(1), x)
  c = strong_jit(jax.random.key(2), x)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Images in one batch get independent draws (not one shared transform).
  same = x[:1].repeat(8, axis=0)
  out = np.asarray(strong_jit(jax.random.key(3), same))
  assert len({o.tobytes() for o in out}) > 1


def test_weak_identity_and_flip():
  x = _batch(np.uint8, b=16)
  np.testing.assert_array_equal(weak_jit(jax.random.key(0), x, pad=0, flip=False), x)
  y = np.asarray(weak_jit(jax.random.key(0), x, pad=0, flip=True))
  xn = np.asarray(x)
  flipped = [np.array_equal(yi, xi[:, ::-1]) for yi, xi in zip(y, xn)]
  kept = [np.array_equal(yi, xi) for yi, xi in zip(y, xn)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)


def test_weak_crop_is_window_of_reflect_padded_image():
  pad = 2
  x = _batch(np.uint8, b=16, h=8, w=8)
  y = np.asarray(weak_jit(jax.random.key(4), x, pad=pad, flip=False))
  padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  offsets = set()
  for i in range(len(y)):
    hits = [
      (dy, dx)
      for dy in range(2 * pad + 1)
      for dx in range(2 * pad + 1)
      if np.array_equal(padded[i, dy : dy + 8, dx : dx + 8], y[i])
    ]
    assert hits, i
    offsets.add(hits[0])
  assert len(offsets) > 1
  with pytest.raises(ValueError):
    augment.weak(jax.random.key(0), x, pad=8)


# ----------------------------------------------------------- per-image ops
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_identity(dtype):
  x = _img(np.random.default_rng(2).integers(0, 256, (5, 6, 3)), dtype)
  np.testing.assert_allclose(OP_FNS["identity"](x, 1.0), x, atol=1e-6)
  np.testing.assert_allclose(ops.identity(x), x, atol=1e-6)


def test_solarize():
  x = _img([[0, 100, 127, 128, 200, 255]])
  expect = [[0, 100, 127, 127, 55, 0]]
  np.testing.assert_array_equal(_u8(ops.solarize(x, 128.0))[..., 0], expect)
  # level 0.5 -> threshold 256 * 0.5 = 128; no direction, so sign ignored.
  np.testing.assert_array_equal(_u8(OP_FNS["solarize"](x, -0.5))[..., 0], expect)
  np.testing.assert_array_equal(OP_FNS["solarize"](x, 0.0), x)
  np.testing.assert_array_equal(
    _u8(OP_FNS["solarize"](x, 1.0))[..., 0], [[255, 155, 128, 127, 55, 0]]
  )
  xf = _img([[0, 100, 200]], np.float32)
  np.testing.assert_allclose(
    ops.solarize(xf, 128.0)[..., 0], [[0.0, 100 / 255, 55 / 255]], atol=1e-6
  )


def test_posterize():
  x = _img([[0b10110111, 255, 1, 0b10001111]])
  np.testing.assert_array_equal(_u8(ops.posterize(x, 4))[..., 0], [[0b10110000, 240, 0, 128]])
  np.testing.assert_array_equal(_u8(ops.posterize(x, 1))[..., 0], [[128, 128, 0, 128]])
  np.testing.assert_array_equal(ops.posterize(x, 8), x)
  # level 1 -> 4 bits, level 0.5 -> 6 bits, level 0 -> 8 bits.
  np.testing.assert_array_equal(OP_FNS["posterize"](x, 1.0), ops.posterize(x, 4))
  np.testing.assert_array_equal(
    _u8(OP_FNS["posterize"](x, 0.5))[..., 0], [[0b10110100, 252, 0, 0b10001100]]
  )
  np.testing.assert_array_equal(OP_FNS["posterize"](x, 0.0), x)


def test_auto_contrast():
  rng = np.random.default_rng(3)
  a = np.stack(
    [
      rng.integers(50, 101, (6, 6)),
      rng.integers(10, 21, (6, 6)),
      np.full((6, 6), 77),
    ],
    -1,
  )
  a[0, 0] = [50, 10, 77]
  a[0, 1] = [100, 20, 77]
  a[0, 2] = [75, 15, 77]
  y = _u8(ops.auto_contrast(_img(a)))
  assert y[..., 0].min() == 0 and y[..., 0].max() == 255
  np.testing.assert_array_equal(y[0, :3, 0], [0, 255, 128])  # 75 -> 127.5 -> 128
  np.testing.assert_array_equal(y[0, :3, 1], [0, 255, 128])
  np.testing.assert_array_equal(y[..., 2], 77)  # constant channel untouched
  yf = np.asarray(ops.auto_contrast(_img(a, np.float32)))
  np.testing.assert_allclose(yf[0, :3, 0], [0.0, 1.0, 0.5], atol=1e-5)


def test_equalize_two_levels_and_constant():
  a = np.full((32, 32), 50)
  a[16:] = 100
  # PIL's rule: step = (1024 - 512) // 255 = 2; lut[50] = (1 + 0) // 2 = 0,
  # lut[100] = (1 + 512) // 2 = 256 -> clipped to 255.
  y = _u8(ops.equalize(_img(a)))
  np.testing.assert_array_equal(y, np.where(a[..., None] == 50, 0, 255).repeat(3, -1))
  const = _img(np.full((8, 8), 42))
  np.testing.assert_array_equal(ops.equalize(const), const)


def test_rotate():
  x = _img(np.random.default_rng(4).integers(0, 256, (7, 7, 3)))
  np.testing.assert_array_equal(ops.rotate(x, 90.0), jnp.rot90(x, k=1, axes=(0, 1)))
  np.testing.assert_array_equal(ops.rotate(x, -90.0), jnp.rot90(x, k=-1, axes=(0, 1)))
  x8 = _img(np.random.default_rng(5).integers(0, 256, (8, 8, 3)))
  np.testing.assert_array_equal(ops.rotate(x8, 180.0), x8[::-1, ::-1])
  np.testing.assert_array_equal(ops.rotate(x, 0.0), x)
  # 45 degrees: centre pixel stays, corners fall outside -> grey fill.
  y = _u8(ops.rotate(x, 45.0))
  np.testing.assert_array_equal(y[3, 3], _u8(x)[3, 3])
  np.testing.assert_array_equal(y[0, 0], [128, 128, 128])
  yf = np.asarray(ops.rotate(_img(np.zeros((5, 5)), np.float32), 45.0))
  np.testing.assert_allclose(yf[0, 0], 128 / 255, atol=1e-6)
  # level 1 -> 30 degrees.
  np.testing.assert_array_equal(OP_FNS["rotate"](x, 1.0), ops.rotate(x, 30.0))
  np.testing.assert_array_equal(OP_FNS["rotate"](x, -1.0), ops.rotate(x, -30.0))


def test_translate():
  x = _img(np.random.default_rng(6).integers(0, 256, (6, 10, 3)))
  xn = _u8(x)
  y = _u8(ops.translate_x(x, 2.0))
  np.testing.assert_array_equal(y[:, 2:], xn[:, :-2])
  np.testing.assert_array_equal(y[:, :2], 128)
  y = _u8(ops.translate_x(x, -3.0))
  np.testing.assert_array_equal(y[:, :-3], xn[:, 3:])
  np.testing.assert_array_equal(y[:, -3:], 128)
  y = _u8(ops.translate_y(x, 1.0))
  np.testing.assert_array_equal(y[1:], xn[:-1])
  np.testing.assert_array_equal(y[:1], 128)
  # level 0.5 -> 0.3 * 0.5 * W = 1.5 px on W = 10; 1.0 -> 3 px.
  np.testing.assert_array_equal(OP_FNS["translate_x"](x, 1.0), ops.translate_x(x, 3.0))
  np.testing.assert_array_equal(OP_FNS["translate_y"](x, -1.0), ops.translate_y(x, -1.8))


def test_shear_moves_known_pixel():
  a = np.zeros((5, 5))
  a[4, 2] = 255  # bottom row, centre column
  a[0, 2] = 200  # top row, centre column
  a[2, 2] = 100  # centre: fixed point of any shear about the centre
  y = _u8(ops.shear_x(_img(a), 0.5))[..., 0]
  expect = np.zeros((5, 5))
  expect[4, 1], expect[0, 3], expect[2, 2] = 255, 200, 100
  # Rows 0/4 sample x + 0.5 * (y - 2) = x -+ 1, so the edge column of those
  # rows falls outside and gets grey.
  expect[0, 0] = expect[4, 4] = 128
  np.testing.assert_array_equal(y, expect)
  b = np.zeros((5, 5))
  b[2, 4] = 255
  y = _u8(ops.shear_y(_img(b), 0.5))[..., 0]
  assert y[1, 4] == 255 and y[2, 4] == 0
  np.testing.assert_array_equal(OP_FNS["shear_x"](_img(a), 1.0), ops.shear_x(_img(a), 0.3))


def test_brightness():
  x = _img([[0, 100, 200, 255]])
  np.testing.assert_array_equal(ops.brightness(x, 0.0), jnp.zeros_like(x))
  np.testing.assert_array_equal(_u8(ops.brightness(x, 0.5))[..., 0], [[0, 50, 100, 128]])
  # level -1 -> factor 0.1; level 1 -> factor 1.9 (clipped at 255).
  np.testing.assert_array_equal(_u8(OP_FNS["brightness"](x, -1.0))[..., 0], [[0, 10, 20, 26]])
  np.testing.assert_array_equal(_u8(OP_FNS["brightness"](x, 1.0))[..., 0], [[0, 190, 255, 255]])
  xf = _img([[0, 100, 200]], np.float32)
  np.testing.assert_allclose(ops.brightness(xf, 2.0)[..., 0], [[0.0, 200 / 255, 1.0]], atol=1e-6)


def test_contrast_moves_towards_mean():
  a = np.full((4, 4), 100)
  a[:, 2:] = 200  # grey image, mean luma 150
  x = _img(a)
  np.testing.assert_array_equal(ops.contrast(x, 0.0), jnp.full_like(x, 150))
  y = _u8(ops.contrast(x, 0.5))
  np.testing.assert_array_equal(y[:, :2], 125)
  np.testing.assert_array_equal(y[:, 2:], 175)
  np.testing.assert_array_equal(ops.contrast(x, 1.0), x)
  np.testing.assert_array_equal(_u8(OP_FNS["contrast"](x, -1.0))[:, :2], 145)  # factor 0.1


def test_color():
  grey = _img(np.random.default_rng(7).integers(0, 256, (6, 6)))
  for factor in (0.0, 0.5, 1.9):
    np.testing.assert_array_equal(ops.color(grey, factor), grey)
  red = _img(np.array([[[255, 0, 0]]]))
  np.testing.assert_array_equal(_u8(ops.color(red, 0.0)), [[[76, 76, 76]]])  # 0.299 * 255
  mono = _img(np.random.default_rng(8).integers(0, 256, (6, 6, 1)))
  np.testing.assert_array_equal(OP_FNS["color"](mono, 1.0), mono)  # C=1: no colour


def test_sharpness():
  const = _img(np.full((6, 6), 90))
  for factor in (0.0, 1.9):
    np.testing.assert_array_equal(ops.sharpness(const, factor), const)
  a = np.zeros((5, 5))
  a[2, 2] = 130
  y = _u8(ops.sharpness(_img(a), 0.0))[..., 0]
  expect = np.zeros((5, 5))
  expect[1:4, 1:4] = 10  # 130 / 13
  expect[2, 2] = 50  # 5 * 130 / 13
  np.testing.assert_array_equal(y, expect)


def test_against_pil():
  pil_image = pytest.importorskip("PIL.Image")
  pil_ops = pytest.importorskip("PIL.ImageOps")
  rng = np.random.default_rng(9)
  a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  low = rng.integers(80, 140, (16, 16, 3), dtype=np.uint8)
  pil = pil_image.fromarray(a)

  def close(mine, ref, tol=0):
    d = np.abs(_u8(mine) - np.asarray(ref).astype(np.int64))
    assert d.max() <= tol

  close(ops.equalize(jnp.asarray(a)), pil_ops.equalize(pil))
  close(ops.posterize(jnp.asarray(a), 3), pil_ops.posterize(pil, 3))
  close(ops.solarize(jnp.asarray(a), 100.0), pil_ops.solarize(pil, 100))
  # PIL truncates in its LUT where we round: allow 1 level.
  close(
    ops.auto_contrast(jnp.asarray(low)),
    pil_ops.autocontrast(pil_image.fromarray(low)),
    1,
  )
  ours = _u8(ops.rotate(jnp.asarray(a), 17.0))
  ref = np.asarray(pil.rotate(17, fillcolor=(128, 128, 128)))
  assert np.mean(np.any(ours != ref, axis=-1)) < 0.02  # nearest ties may differ


def test_cutout_square_and_borders():
  x = jnp.full((12, 12, 3), 10, jnp.uint8)
  y = np.asarray(ops.cutout(x, 5, 5, 4))
  mask = y[..., 0] == 128
  expect = np.zeros((12, 12), bool)
  expect[3:7, 3:7] = True
  np.testing.assert_array_equal(mask, expect)
  assert np.all(y[~mask] == 10)
  corner = np.asarray(ops.cutout(x, 0, 0, 4))[..., 0] == 128
  assert corner.sum() == 4 and corner[:2, :2].all()
  far = np.asarray(ops.cutout(x, 11, 11, 4))[..., 0] == 128
  assert far.sum() == 9 and far[9:, 9:].all()
  xf = jnp.full((6, 6, 1), 0.1, jnp.float32)
  np.testing.assert_allclose(np.asarray(ops.cutout(xf, 3, 3, 2))[2:4, 2:4], 0.5)


def test_cutout_batch():
  size = 5
  x = jnp.full((32, 12, 12, 3), 10, jnp.uint8)
  y = np.asarray(cutout_jit(jax.random.key(5), x, size=size))
  full = 0
  for yi in y:
    rows, cols = np.nonzero(yi[..., 0] == 128)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert np.all(yi[r0:r1, c0:c1] == 128) and len(rows) == (r1 - r0) * (c1 - c0)
    assert r1 - r0 <= size and c1 - c0 <= size
    if 0 < r0 and r1 < 12:
      assert r1 - r0 == size
    if 0 < c0 and c1 < 12:
      assert c1 - c0 == size
    full += len(rows) == size * size
  assert full > 0
  np.testing.assert_array_equal(augment.cutout(jax.random.key(0), x, size=0), x)


def test_randaugment_signs_and_identity():
  x = _batch(np.uint8, b=32, h=8, w=8)
  # Only brightness at full magnitude: each image is scaled by 0.1 or 1.9.
  y = _u8(randaugment_jit(jax.random.key(6), x, num_ops=1, ops=("brightness",)))
  xn = np.asarray(x).astype(np.float32)

  def scaled(sign: float) -> np.ndarray:
    # Same float32 arithmetic as the op (factor = 1 + 0.9 * level), so
    # rounding ties resolve identically.
    factor = np.float32(1.0) + np.float32(0.9) * np.float32(sign)
    return np.clip(np.round(xn * factor), 0, 255)

  dark = np.all(y == scaled(-1.0), axis=(1, 2, 3))
  bright = np.all(y == scaled(1.0), axis=(1, 2, 3))
  assert np.all(dark | bright) and dark.any() and bright.any()
  np.testing.assert_array_equal(augment.randaugment(jax.random.key(0), x, num_ops=0), x)
  np.testing.assert_array_equal(
    randaugment_jit(jax.random.key(0), x, ops=("rotate", "contrast"), magnitude=0.0),
    x,
  )
  with pytest.raises(ValueError):
    augment.randaugment(jax.random.key(0), x, ops=("nope",))
  with pytest.raises(ValueError):
    augment.strong(jax.random.key(0), x[0])
