"""Input checks shared by the library: one-line errors before anything compiles."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def _is_traced(x: Any) -> bool:
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


def check_nonnegative(value: Any, name: str) -> None:
  """Raises ValueError for a concrete negative or non-finite value."""
  if _is_traced(value):
    return
  v = float(np.asarray(value))
  if not np.isfinite(v) or v < 0:
    raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_positive_int(value: Any, name: str) -> None:
  """Raises ValueError unless ``value`` is a Python int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_choice(value: Any, name: str, allowed: Sequence[str]) -> None:
  """Raises ValueError unless ``value`` is one of ``allowed``."""
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


def check_finite_tree(tree: Any, name: str) -> None:
  """Raises ValueError if a concrete (non-traced) leaf of ``tree`` has NaN or inf."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if _is_traced(leaf):
      continue
    if not np.all(np.isfinite(np.asarray(leaf))):
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} contains NaN or inf")
