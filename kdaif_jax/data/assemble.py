"""load: assembles a Dataset from a raw source, as the `data` config section says.

The stages, in order (each has its own seeded stream, so e.g. changing
num_train never changes the validation set), are listed in the docstring of
`kdaif_jax.data`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kdaif_jax.data import glue, sources
from kdaif_jax.data.channels import channel_stats
from kdaif_jax.data.facts import _val_size
from kdaif_jax.data.noise import inject_noise
from kdaif_jax.data.options import _DEFAULTS, _get
from kdaif_jax.data.sources import RawSource
from kdaif_jax.data.splits import Dataset, balanced_subset, complement
from kdaif_jax.data.validate import validate_config


def _raw_source(name: str, config: Any) -> RawSource:
  seed = int(_get(config, "seed"))
  if name == "digits":
    return sources.digits_source(_get(config, "test_size"), seed)
  if name == "synthetic":
    syn = {f: int(_get(config, f"synthetic.{f}")) for f in _DEFAULTS.synthetic}
    return sources.synthetic_source(
      num_train=syn["num_train"] + syn["num_val"],
      num_test=syn["num_test"],
      image_size=syn["image_size"],
      channels=syn["channels"],
      num_classes=syn["num_classes"],
      seed=seed,
    )
  return sources.tfds_source(name, _get(config, "data_dir"))


def _balanced(option: str, value: int, labels: np.ndarray, k: int, **kwargs) -> np.ndarray:
  """balanced_subset, with a shortfall reported against the config option."""
  try:
    return balanced_subset(labels, num_classes=k, **kwargs)
  except ValueError as err:
    raise ValueError(f"data.{option}={value} cannot be class-balanced: {err}") from None


def load(config: Any) -> Dataset:
  """Loads and assembles the dataset described by the `data` config section.

  Args:
    config: the `data` ConfigDict (see `default_data_config`).

  Returns:
    Dataset; see the `kdaif_jax.data` docstring for how the splits are made.

  Raises:
    ValueError: a bad option (see `validate_config`), or a class too small
      for a class-balanced selection.
    DataNotPreparedError: a TFDS dataset is not prepared in data_dir.
  """
  validate_config(config)
  name = _get(config, "name")
  if name in glue.TEXT_DATASETS:
    return glue.load_glue(config)
  seed = int(_get(config, "seed"))
  raw = _raw_source(name, config)
  k = raw.num_classes
  pool = raw.train

  val_size = _val_size(name, config)
  val_idx = _balanced(
    "val_size",
    val_size,
    pool.clean_labels,
    k,
    total=val_size,
    seed=[seed, sources.STREAM_VAL],
  )
  val = pool.take(val_idx)
  train = pool.take(complement(len(pool), val_idx))

  num_train = int(_get(config, "num_train"))
  if num_train:
    train = train.take(
      _balanced(
        "num_train",
        num_train,
        train.clean_labels,
        k,
        total=num_train,
        seed=[seed, sources.STREAM_NUM_TRAIN],
      )
    )

  unlabelled = None
  num_labelled = int(_get(config, "num_labelled"))
  if num_labelled:
    lab_idx = _balanced(
      "num_labelled",
      num_labelled,
      train.clean_labels,
      k,
      per_class=num_labelled // k,
      seed=[seed, sources.STREAM_LABELLED],
    )
    rest = train.take(complement(len(train), lab_idx))
    unlabelled = dataclasses.replace(rest, labels=np.full(len(rest), -1, np.int32))
    train = train.take(lab_idx)

  rate = float(_get(config, "noise.rate"))
  if rate > 0:
    noisy_labels, flipped = inject_noise(
      train.clean_labels,
      k,
      rate,
      _get(config, "noise.kind"),
      seed=int(_get(config, "noise.seed")),
      dataset_name=name,
    )
    train = dataclasses.replace(train, labels=noisy_labels, noisy=flipped)

  stats_images = [train.images] + ([unlabelled.images] if unlabelled else [])
  mean, std = channel_stats(stats_images)
  return Dataset(
    name=name,
    num_classes=k,
    image_shape=tuple(int(d) for d in train.images.shape[1:]),
    mean=mean,
    std=std,
    train=train,
    val=val,
    test=raw.test,
    unlabelled=unlabelled,
    class_names=raw.class_names,
  )
