"""The `data` config section: its defaults, and reading it with those defaults.

A `data` section may be an ml_collections ConfigDict or a plain nested dict
(e.g. read back from a run's config.json); `_get` reads either, and a field that
is missing (or None) takes its value from `default_data_config()`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "svhn_cropped")


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` config section with its defaults (digits, offline)."""
  cfg = ml_collections.ConfigDict()
  cfg.name = "digits"
  cfg.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS default
  cfg.seed = 0
  cfg.val_size = 200  # class-balanced slice of training (synthetic: num_val)
  cfg.test_size = 0.2  # digits only: fraction (< 1) or count (>= 1)
  cfg.num_train = 0  # 0: all remaining training examples
  cfg.num_labelled = 0  # 0: fully supervised; > 0: SSL, multiple of K
  cfg.noise = ml_collections.ConfigDict({"rate": 0.0, "kind": "symmetric", "seed": 0})
  cfg.synthetic = ml_collections.ConfigDict(
    {
      "num_train": 500,
      "num_val": 100,
      "num_test": 200,
      "image_size": 8,
      "channels": 3,
      "num_classes": 10,
    }
  )
  return cfg


_DEFAULTS = default_data_config()


def _get(config: Any, dotted: str) -> Any:
  """config[dotted], falling back to the default when a field is missing."""
  node, default = config, _DEFAULTS
  for part in dotted.split("."):
    default = default[part]
    if node is None or not _has(node, part):
      node = None
    else:
      node = node[part]
  return default if node is None else node


def _has(node: Any, key: str) -> bool:
  try:
    return key in node
  except TypeError:
    return False


def _fail(option: str, value: Any, allowed: str) -> None:
  """Raises the one-line ValueError for a bad `data.<option>` value."""
  raise ValueError(f"data.{option}={value!r} is invalid; allowed values: {allowed}")
