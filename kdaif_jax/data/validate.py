"""validate_config: checks every option of the `data` config section, touching no data."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdaif_jax.data import glue, sources
from kdaif_jax.data.facts import _dataset_name, _train_pool_size, _val_size, num_classes
from kdaif_jax.data.noise import NOISE_KINDS
from kdaif_jax.data.options import _fail, _get


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def validate_config(config: Any) -> None:
  """Checks the `data` config section without touching any data.

  Args:
    config: the `data` section, a ConfigDict or a plain nested dict (missing
      fields take their defaults).

  Raises:
    ValueError: one line naming the option, its value and the allowed values.
  """
  name = _dataset_name(config)
  for option in ("seed", "noise.seed"):
    if not _is_int(_get(config, option)):
      _fail(option, _get(config, option), "an integer")
  data_dir = _get(config, "data_dir")
  if data_dir is not None and not isinstance(data_dir, str):
    _fail("data_dir", data_dir, "None (the TFDS default) or a directory path")
  if name == "synthetic":
    for field in ("num_train", "num_val", "num_test", "image_size", "channels"):
      value = _get(config, f"synthetic.{field}")
      if not _is_int(value) or value < 1:
        _fail(f"synthetic.{field}", value, "an integer >= 1")
    k = _get(config, "synthetic.num_classes")
    if not _is_int(k) or k < 2:
      _fail("synthetic.num_classes", k, "an integer >= 2")
  else:
    val_size = _get(config, "val_size")
    if not _is_int(val_size) or val_size < 1:
      _fail("val_size", val_size, "an integer >= 1")
  if name == "digits":
    test_size = _get(config, "test_size")
    ok = _is_number(test_size) and (
      0 < test_size < 1 or (test_size >= 1 and test_size == int(test_size))
    )
    if not ok or sources.digits_test_count(test_size) >= sources.DIGITS_SIZE:
      _fail(
        "test_size",
        test_size,
        f"a fraction in (0, 1) or a count in [1, {sources.DIGITS_SIZE})",
      )
  k = num_classes(config)
  num_train, num_labelled = _get(config, "num_train"), _get(config, "num_labelled")
  if not _is_int(num_train) or num_train < 0:
    _fail("num_train", num_train, "0 (all) or an integer >= 1")
  if not _is_int(num_labelled) or num_labelled < 0 or num_labelled % k:
    _fail(
      "num_labelled",
      num_labelled,
      f"0 (fully supervised) or a positive multiple of num_classes={k}",
    )
  available = _train_pool_size(name, config) - _val_size(name, config)
  if available < 1:
    _fail(
      "val_size",
      _val_size(name, config),
      f"fewer than {available + _val_size(name, config)} (the training split of {name})",
    )
  if num_train > available:
    _fail(
      "num_train",
      num_train,
      f"0 or at most {available} ({name} after the validation slice)",
    )
  limit = num_train or available
  if num_labelled > limit:
    _fail(
      "num_labelled",
      num_labelled,
      f"0 or a multiple of {k} up to {limit} (the training examples)",
    )
  rate = _get(config, "noise.rate")
  if not _is_number(rate) or not 0 <= rate < 1:
    _fail("noise.rate", rate, "a number in [0, 1)")
  kind = _get(config, "noise.kind")
  if kind not in NOISE_KINDS:
    _fail("noise.kind", kind, ", ".join(NOISE_KINDS))
  if name in glue.TEXT_DATASETS:
    glue.validate_text(config)
