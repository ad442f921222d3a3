"""Data for kdaif_jax: host-side numpy splits, ready to be put on device once.

Entry points (the trainer calls them in this order):
  default_data_config()   the `data` config section with defaults
  validate_config(cfg)    ValueError on a bad option, before any data is touched
  load(cfg) -> Dataset    train / val / test (/ unlabelled) Splits as numpy
  normalize(x, mean, std) (x / 255 - mean) / std, jittable
  save_split_ids(ds, path) the ids of every split, as JSON, for auditing

Assembly of a Dataset from a raw source, in order (each stage has its own
seeded stream, so e.g. changing num_train never changes the validation set):
  1. val: a seeded class-balanced slice of the training split (val_size; for
     'synthetic' synthetic.num_val). Clean. Never the test split.
  2. num_train > 0: a seeded class-balanced subset of what remains.
  3. num_labelled > 0 (SSL): a seeded class-balanced labelled subset of that;
     everything else becomes `unlabelled` (labels -1; clean_labels kept for
     analysis only).
  4. label noise (noise.rate > 0) on the labelled train split only.
  5. mean / std: per channel, in [0, 1] scale, over train + unlabelled images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdaif_jax.data import noise, sources, splits
from kdaif_jax.data.noise import NOISE_KINDS, asymmetric_map, inject_noise
from kdaif_jax.data.sources import DataNotPreparedError, RawSource
from kdaif_jax.data.splits import (
  Dataset,
  Split,
  balanced_subset,
  complement,
  load_split_ids,
  save_split_ids,
  stratified_subset,
)

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
  raise ValueError(f"data.{option}={value!r} is invalid; allowed values: {allowed}")


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _num_classes(name: str, config: Any) -> int:
  if name == "digits":
    return sources.DIGITS_CLASSES
  if name == "synthetic":
    return int(_get(config, "synthetic.num_classes"))
  return sources.TFDS_DATASETS[name][0]


def _train_pool_size(name: str, config: Any) -> int:
  if name == "digits":
    return sources.DIGITS_SIZE - sources.digits_test_count(_get(config, "test_size"))
  if name == "synthetic":
    return int(_get(config, "synthetic.num_train")) + int(_get(config, "synthetic.num_val"))
  return sources.TFDS_DATASETS[name][1]


def _val_size(name: str, config: Any) -> int:
  return int(_get(config, "synthetic.num_val" if name == "synthetic" else "val_size"))


def validate_config(config: Any) -> None:
  """Checks the `data` config section without touching any data.

  Args:
    config: the `data` ConfigDict (missing fields take their defaults).

  Raises:
    ValueError: one line naming the option, its value and the allowed values.
  """
  name = _get(config, "name")
  if name not in DATASETS:
    _fail("name", name, ", ".join(DATASETS))
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
  k = _num_classes(name, config)
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


def load(config: Any) -> Dataset:
  """Loads and assembles the dataset described by the `data` config section.

  Args:
    config: the `data` ConfigDict (see `default_data_config`).

  Returns:
    Dataset; see this module's docstring for how the splits are made.

  Raises:
    ValueError: a bad option (see `validate_config`), or a class too small
      for a class-balanced selection.
    DataNotPreparedError: a TFDS dataset is not prepared in data_dir.
  """
  validate_config(config)
  name = _get(config, "name")
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


__all__ = [
  "DATASETS",
  "NOISE_KINDS",
  "DataNotPreparedError",
  "Dataset",
  "Split",
  "asymmetric_map",
  "balanced_subset",
  "channel_stats",
  "default_data_config",
  "inject_noise",
  "load",
  "load_split_ids",
  "noise",
  "normalize",
  "save_split_ids",
  "sources",
  "splits",
  "stratified_subset",
  "validate_config",
]
