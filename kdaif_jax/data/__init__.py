"""Data for kdaif_jax: host-side numpy splits, ready to be put on device once.

Entry points (the trainer calls them in this order):
  default_data_config()   the `data` config section with defaults
  validate_config(cfg)    ValueError on a bad option, before any data is touched
  load(cfg) -> Dataset    train / val / test (/ unlabelled) Splits as numpy
  normalize(x, mean, std) (x / 255 - mean) / std, jittable
  make_prepare(...)       the steps' input preparation (normalize; identity for text)
  save_split_ids(ds, path) the ids of every split, as JSON, for auditing
Facts of the configured dataset, without touching data (a ConfigDict or the
plain dict of a run's config.json): num_classes(cfg), image_shape(cfg).

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

Where things live (this file only re-exports):
  options.py    DATASETS, default_data_config, reading a section with defaults
  facts.py      num_classes, image_shape (per-dataset facts are in sources.py)
  validate.py   validate_config
  assemble.py   load (the stages above)
  channels.py   channel_stats, normalize
  sources.py    raw sources: digits, synthetic, TFDS array_record
  splits.py     Split, Dataset, class-balanced / stratified selection, split ids
  noise.py      label noise
  augment.py    batched on-device augmentation
"""

from __future__ import annotations

from kdaif_jax.data import noise, sources, splits
from kdaif_jax.data.assemble import load
from kdaif_jax.data.channels import channel_stats, make_prepare, normalize
from kdaif_jax.data.facts import image_shape, num_classes
from kdaif_jax.data.noise import NOISE_KINDS, asymmetric_map, inject_noise
from kdaif_jax.data.options import DATASETS, default_data_config
from kdaif_jax.data.sources import DataNotPreparedError
from kdaif_jax.data.splits import (
  Dataset,
  Split,
  balanced_subset,
  load_split_ids,
  save_split_ids,
  stratified_subset,
)
from kdaif_jax.data.validate import validate_config

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
  "image_shape",
  "inject_noise",
  "load",
  "load_split_ids",
  "make_prepare",
  "noise",
  "normalize",
  "num_classes",
  "save_split_ids",
  "sources",
  "splits",
  "stratified_subset",
  "validate_config",
]
