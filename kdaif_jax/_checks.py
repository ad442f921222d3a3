"""Input checks shared by the library: one-line errors before anything compiles."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_tree_match(reference: Any, tree: Any, name: str, ref_name: str) -> None:
  """Raises ValueError unless ``tree`` has the structure and leaf shapes of ``reference``."""
  ref_def, tree_def = jax.tree.structure(reference), jax.tree.structure(tree)
  if ref_def != tree_def:
    raise ValueError(
      f"{name} must have the same pytree structure as {ref_name}: "
      f"got {tree_def}, expected {ref_def}"
    )
  for path_leaf, leaf in zip(jax.tree_util.tree_leaves_with_path(reference), jax.tree.leaves(tree)):
    path, ref = path_leaf
    if np.shape(ref) != np.shape(leaf):
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, "
        f"but {ref_name}{jax.tree_util.keystr(path)} has shape {np.shape(ref)}"
      )
    ref_dtype, dtype = getattr(ref, "dtype", None), getattr(leaf, "dtype", None)
    if ref_dtype is not None and dtype is not None and ref_dtype != dtype:
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} has dtype {dtype}, "
        f"but {ref_name}{jax.tree_util.keystr(path)} has dtype {ref_dtype}"
      )


def check_scalar_fn(f: Any, name: str, *args, **kwargs) -> None:
  """Raises ValueError unless ``f(*args, **kwargs)`` returns a scalar (checked abstractly)."""
  out = jax.eval_shape(lambda *a: f(*a, **kwargs), *args)
  if getattr(out, "shape", None) != ():
    raise ValueError(
      f"{name} must return a scalar loss, got "
      f"{getattr(out, 'shape', type(out).__name__)}; reduce it (e.g. mean) first"
    )


def _scalar(value: Any, name: str) -> float | None:
  """``value`` as a float (None when traced); ValueError unless it is a scalar."""
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
  return None if is_traced(value) else float(np.asarray(value))


def check_nonnegative(value: Any, name: str) -> None:
  """Raises ValueError for a non-scalar, or a concrete negative or non-finite value."""
  v = _scalar(value, name)
  if v is not None and (not np.isfinite(v) or v < 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_positive_int(value: Any, name: str) -> None:
  """Raises ValueError unless ``value`` is a Python int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_choice(value: Any, name: str, allowed: Sequence[str]) -> None:
  """Raises ValueError unless ``value`` is one of ``allowed``."""
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


def check_finite_tree(tree: Any, name: str, hint: str = "") -> None:
  """Raises ValueError if a concrete (non-traced) leaf of ``tree`` has NaN or inf.

  Traced leaves (under ``jit``/``vmap``/``grad``) are skipped: their values are
  unknown at trace time, so the check costs nothing inside compiled code. The
  finiteness of device arrays is reduced on the device, one transfer in all.
  ``hint`` is appended to the message.
  """
  concrete = [
    (path, leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    if not is_traced(leaf) and _is_numeric(leaf)
  ]
  if not concrete:
    return
  # Device arrays reduce where they live. Eagerly even while a jit is tracing:
  # a concrete array closed over by the traced function would otherwise give a
  # traced flag that cannot be read.
  with jax.ensure_compile_time_eval():
    flags = [
      np.all(np.isfinite(leaf))
      if isinstance(leaf, (np.ndarray, np.generic, float, int))
      else jnp.all(jnp.isfinite(leaf))
      for _, leaf in concrete
    ]
  ok = np.asarray(jax.device_get(flags), bool).reshape(-1)
  if ok.all():
    return
  path = concrete[int(np.argmin(ok))][0]
  raise ValueError(f"{name}{jax.tree_util.keystr(path)} contains NaN or inf{hint}")


def _is_numeric(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    return isinstance(leaf, (int, float, complex)) and not isinstance(leaf, bool)
  return bool(jnp.issubdtype(dtype, jnp.number))


def dtype_of(leaf: Any) -> Any:
  """The dtype of an array, or numpy's for a Python scalar."""
  dtype = getattr(leaf, "dtype", None)
  return np.asarray(leaf).dtype if dtype is None else dtype


def check_float_tree(tree: Any, name: str) -> None:
  """Raises ValueError unless every leaf of ``tree`` is float32 or float64.

  The influence maths (curvature products, CG, LiSSA, scores) checks its inputs
  here: half precision (bfloat16, float16) is refused, because CG's recurrences
  lose conjugacy within a few iterations at 8 bits of mantissa. Dtypes are
  static, so this also checks traced leaves (free under ``jit``).
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = dtype_of(leaf)
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} has dtype {dtype}; "
        "influence needs float32 or float64 (half precision is not trustworthy in CG), "
        "cast it first"
      )


def check_positive(value: Any, name: str) -> None:
  """Raises ValueError for a non-scalar, or a concrete value that is not a finite number > 0."""
  v = _scalar(value, name)
  if v is not None and (not np.isfinite(v) or v <= 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_in_range(value: Any, name: str, lo: float, hi: float) -> None:
  """Raises ValueError for a non-scalar, or a concrete value outside [lo, hi]."""
  v = _scalar(value, name)
  if v is not None and not (np.isfinite(v) and lo <= v <= hi):
    raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value}")


def check_vector(x: Any, name: str, *, allow_empty: bool = False) -> None:
  """Raises ValueError unless ``x`` is a 1-D array (of at least one element).

  Shapes are static, so this also checks traced arrays (free under ``jit``).
  """
  shape = np.shape(x)
  if len(shape) != 1:
    raise ValueError(f"{name} must be a 1-D vector [B], got shape {shape}")
  if shape[0] == 0 and not allow_empty:
    raise ValueError(f"{name} is empty (shape {shape}); it needs at least one element")


def check_class_ids(labels: Any, num_classes: int, name: str, *, lo: int = 0) -> None:
  """Raises ValueError if concrete integer ``labels`` leave [lo, num_classes − 1].

  Traced labels are skipped (values unknown at trace time).
  """
  if is_traced(labels):
    return
  y = np.asarray(labels)
  bad = (y < lo) | (y >= num_classes)
  if bad.any():
    i = int(np.argmax(bad.reshape(-1)))
    raise ValueError(
      f"{name} contains {y.reshape(-1)[i]} at index {i}; class ids must be in "
      f"{lo}..{num_classes - 1} (K={num_classes} classes)"
    )
