"""Facts of the dataset a `data` config section names, known without touching data.

The per-dataset facts themselves (class counts, split sizes, image shapes) are
written once in `kdaif_jax.data.sources`; synthetic's come from its config
section. Every function here accepts a ConfigDict or a plain nested dict (as
read back from a run's config.json); missing fields take their defaults.
"""

from __future__ import annotations

from typing import Any

from kdaif_jax.data import glue, sources
from kdaif_jax.data.options import DATASETS, _fail, _get


def _dataset_name(config: Any) -> str:
  """data.name, checked against DATASETS (one-line ValueError otherwise)."""
  name = _get(config, "name")
  if name not in DATASETS + glue.TEXT_DATASETS:
    _fail("name", name, ", ".join(DATASETS + glue.TEXT_DATASETS))
  return name


def num_classes(config: Any) -> int:
  """The number of classes of the dataset the `data` config section names.

  Args:
    config: the `data` section, a ConfigDict or a plain nested dict; missing
      fields take their defaults (see `default_data_config`).

  Returns:
    K: digits 10; synthetic its `synthetic.num_classes`; a TFDS dataset its
    class count in `sources.TFDS_DATASETS`.

  Raises:
    ValueError: data.name is not one of DATASETS.
  """
  name = _dataset_name(config)
  if name == "digits":
    return sources.DIGITS_CLASSES
  if name == "synthetic":
    return int(_get(config, "synthetic.num_classes"))
  if name in glue.TEXT_DATASETS:
    return glue.GLUE_TASKS[glue.task_of(name)].num_classes
  return sources.TFDS_DATASETS[name][0]


def image_shape(config: Any) -> tuple[int, int, int]:
  """The (H, W, C) of one image of the dataset the `data` config section names.

  Args:
    config: the `data` section, a ConfigDict or a plain nested dict; missing
      fields take their defaults (see `default_data_config`).

  Returns:
    (H, W, C): digits (8, 8, 1); synthetic (image_size, image_size, channels);
    a TFDS dataset its shape in `sources.TFDS_DATASETS`, e.g. (32, 32, 3).

  Raises:
    ValueError: data.name is not one of DATASETS.
  """
  name = _dataset_name(config)
  if name == "digits":
    return sources.DIGITS_IMAGE_SHAPE
  if name == "synthetic":
    size = int(_get(config, "synthetic.image_size"))
    return (size, size, int(_get(config, "synthetic.channels")))
  if name in glue.TEXT_DATASETS:  # token batches [3, L]; L at most text.max_length
    return (3, int(glue.text_option(config, "max_length")))
  return sources.TFDS_DATASETS[name][3]


def _train_pool_size(name: str, config: Any) -> int:
  """Examples of the source's training pool (validation is sliced from it)."""
  if name == "digits":
    return sources.DIGITS_SIZE - sources.digits_test_count(_get(config, "test_size"))
  if name == "synthetic":
    return int(_get(config, "synthetic.num_train")) + int(_get(config, "synthetic.num_val"))
  if name in glue.TEXT_DATASETS:
    return glue.GLUE_TASKS[glue.task_of(name)].num_train
  return sources.TFDS_DATASETS[name][1]


def _val_size(name: str, config: Any) -> int:
  """Examples of the validation slice (synthetic: synthetic.num_val)."""
  return int(_get(config, "synthetic.num_val" if name == "synthetic" else "val_size"))
