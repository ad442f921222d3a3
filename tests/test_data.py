"""Tests for kdaif_jax.data: sources, splits, noise, config checks, TFDS reading."""

from __future__ import annotations

import ast
import io
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdaif_jax import data
from kdaif_jax.data import sources


def _config(**overrides):
  cfg = data.default_data_config()
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def _all_splits(ds):
  named = {"train": ds.train, "val": ds.val, "test": ds.test}
  if ds.unlabelled is not None:
    named["unlabelled"] = ds.unlabelled
  return named


def _assert_disjoint_ids(ds):
  named = _all_splits(ds)
  for name, split in named.items():
    assert len(np.unique(split.ids)) == len(split), f"duplicate ids in {name}"
  all_ids = np.concatenate([s.ids for s in named.values()])
  assert len(np.unique(all_ids)) == len(all_ids), "ids overlap between splits"


@pytest.fixture(scope="module")
def digits():
  return data.load(data.default_data_config())


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


def test_digits_shapes_and_dtypes(digits):
  from sklearn.datasets import load_digits

  assert digits.name == "digits" and digits.num_classes == 10
  assert digits.image_shape == (8, 8, 1)
  assert digits.class_names == tuple(str(c) for c in range(10))
  n_test = int(np.floor(0.2 * 1797 + 0.5))
  assert (len(digits.train), len(digits.val), len(digits.test)) == (
    1797 - n_test - 200,
    200,
    n_test,
  )
  assert digits.unlabelled is None
  for split in _all_splits(digits).values():
    assert split.images.dtype == np.uint8 and split.images.shape[1:] == (8, 8, 1)
    assert split.labels.dtype == np.int32 and split.clean_labels.dtype == np.int32
    assert split.ids.dtype == np.int64 and split.noisy.dtype == bool
    assert not split.noisy.any()
    np.testing.assert_array_equal(split.labels, split.clean_labels)
  # Ids index load_digits(); pixels are the 0..16 values * 16, clipped to 255.
  raw = load_digits()
  expected = np.clip(raw.images[digits.train.ids] * 16, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(digits.train.images[..., 0], expected)
  np.testing.assert_array_equal(digits.train.labels, raw.target[digits.train.ids])
  assert digits.mean.dtype == np.float32 and digits.mean.shape == (1,)
  assert digits.std.shape == (1,) and digits.std[0] > 0
  train01 = digits.train.images.astype(np.float64) / 255
  np.testing.assert_allclose(digits.mean, train01.mean(), rtol=1e-5)
  np.testing.assert_allclose(digits.std, train01.std(), rtol=1e-5)


def test_ids_unique_disjoint_and_cover_everything(digits):
  _assert_disjoint_ids(digits)
  all_ids = np.concatenate([s.ids for s in _all_splits(digits).values()])
  np.testing.assert_array_equal(np.sort(all_ids), np.arange(1797))


def test_same_seed_same_ids_different_seed_different_ids(digits):
  again = data.load(data.default_data_config())
  other = data.load(_config(seed=1))
  for name, split in _all_splits(digits).items():
    np.testing.assert_array_equal(split.ids, _all_splits(again)[name].ids)
    np.testing.assert_array_equal(split.images, _all_splits(again)[name].images)
    assert not np.array_equal(split.ids, _all_splits(other)[name].ids), name


def test_val_is_exactly_class_balanced(digits):
  np.testing.assert_array_equal(np.bincount(digits.val.labels, minlength=10), 20)
  # Stratified test split keeps class proportions to within one example.
  full = np.bincount(np.concatenate([s.labels for s in _all_splits(digits).values()]))
  expected = full * len(digits.test) / 1797
  assert np.all(np.abs(np.bincount(digits.test.labels) - expected) < 1)


def test_num_train_subset_is_balanced_and_keeps_val(digits):
  ds = data.load(_config(num_train=300))
  assert len(ds.train) == 300
  np.testing.assert_array_equal(np.bincount(ds.train.labels), 30)
  np.testing.assert_array_equal(ds.val.ids, digits.val.ids)
  assert set(ds.train.ids) <= set(digits.train.ids)


def test_ssl_split_digits():
  ds = data.load(_config(num_labelled=100))
  np.testing.assert_array_equal(np.bincount(ds.train.labels, minlength=10), 10)
  unl = ds.unlabelled
  assert unl is not None and len(unl) == 1797 - 359 - 200 - 100
  assert np.all(unl.labels == -1) and unl.labels.dtype == np.int32
  assert np.all((unl.clean_labels >= 0) & (unl.clean_labels < 10))
  assert not unl.noisy.any()
  _assert_disjoint_ids(ds)
  all_ids = np.concatenate([s.ids for s in _all_splits(ds).values()])
  assert len(all_ids) == 1797
  # Same seed, same labelled subset.
  again = data.load(_config(num_labelled=100))
  np.testing.assert_array_equal(ds.train.ids, again.train.ids)
  np.testing.assert_array_equal(ds.unlabelled.ids, again.unlabelled.ids)


# ---------------------------------------------------------------------------
# Label noise
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_noise_in_load_is_exact_and_only_on_train(kind):
  ds = data.load(_config(**{"noise.rate": 0.3, "noise.kind": kind}))
  train = ds.train
  expected = int(np.floor(0.3 * len(train) + 0.5))  # every class is mappable
  assert train.noisy.sum() == expected
  assert np.all(train.labels[train.noisy] != train.clean_labels[train.noisy])
  np.testing.assert_array_equal(train.labels[~train.noisy], train.clean_labels[~train.noisy])
  if kind == "asymmetric":
    np.testing.assert_array_equal(
      train.labels[train.noisy], (train.clean_labels[train.noisy] + 1) % 10
    )
  for split in (ds.val, ds.test):
    assert not split.noisy.any()
    np.testing.assert_array_equal(split.labels, split.clean_labels)
  # The noise seed alone changes which labels flip; the split is unchanged.
  other = data.load(_config(**{"noise.rate": 0.3, "noise.kind": kind, "noise.seed": 5}))
  np.testing.assert_array_equal(other.train.ids, train.ids)
  assert not np.array_equal(other.train.noisy, train.noisy)


def test_symmetric_noise_exact_count_and_uniform_targets():
  labels = np.repeat(np.arange(10), 400).astype(np.int32)
  noisy, flipped = data.inject_noise(labels, 10, 0.25, "symmetric", seed=0)
  assert noisy.dtype == np.int32 and flipped.dtype == bool
  assert flipped.sum() == 1000
  assert np.all(noisy[flipped] != labels[flipped])
  np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
  # Offsets (noisy - clean) mod K cover 1..9 roughly uniformly (~111 each).
  offsets = np.bincount((noisy[flipped] - labels[flipped]) % 10, minlength=10)
  assert offsets[0] == 0 and offsets[1:].min() > 60
  again, _ = data.inject_noise(labels, 10, 0.25, "symmetric", seed=0)
  np.testing.assert_array_equal(noisy, again)
  assert data.inject_noise(labels, 10, 0.0, "symmetric", seed=0)[1].sum() == 0


def test_asymmetric_cifar10_map():
  target = data.asymmetric_map(10, "cifar10")
  # truck->automobile, bird->airplane, deer->horse, cat<->dog.
  expected = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
  for c in range(10):
    assert target[c] == expected.get(c, c)
  labels = np.repeat(np.arange(10), 100).astype(np.int32)
  noisy, flipped = data.inject_noise(labels, 10, 0.4, "asymmetric", seed=3, dataset_name="cifar10")
  # rate is the fraction of the 500 mappable examples: exactly 200, 40 each.
  assert flipped.sum() == 200
  per_class = np.bincount(labels[flipped], minlength=10)
  np.testing.assert_array_equal(per_class[[2, 3, 4, 5, 9]], 40)
  assert per_class[[0, 1, 6, 7, 8]].sum() == 0
  np.testing.assert_array_equal(noisy[flipped], target[labels[flipped]])
  np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])


def test_asymmetric_cyclic_map_elsewhere():
  np.testing.assert_array_equal(data.asymmetric_map(4, "svhn_cropped"), [1, 2, 3, 0])
  np.testing.assert_array_equal(data.asymmetric_map(3), [1, 2, 0])


# ---------------------------------------------------------------------------
# Selection helpers
# ---------------------------------------------------------------------------


def test_balanced_subset_remainder_and_shortfall():
  labels = np.repeat(np.arange(4), [10, 10, 10, 3])
  idx = data.balanced_subset(labels, total=10, seed=0, num_classes=4)
  counts = np.bincount(labels[idx], minlength=4)
  assert counts.sum() == 10 and counts.max() - counts.min() <= 1
  assert np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(idx, data.balanced_subset(labels, total=10, seed=0, num_classes=4))
  with pytest.raises(ValueError, match="class 3 has 3 examples"):
    data.balanced_subset(labels, per_class=4, seed=0)


def test_stratified_subset_exact_total():
  labels = np.repeat(np.arange(3), [50, 30, 20])
  idx = data.stratified_subset(labels, total=33, seed=1)
  assert len(idx) == 33
  counts = np.bincount(labels[idx])
  assert np.all(np.abs(counts - np.array([16.5, 9.9, 6.6])) < 1)


# ---------------------------------------------------------------------------
# normalize, config checks, synthetic, split-id files
# ---------------------------------------------------------------------------


def test_normalize_uint8_float_and_jit():
  x = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3) * 10
  mean = np.array([0.1, 0.2, 0.3], np.float32)
  std = np.array([0.5, 0.25, 2.0], np.float32)
  expected = (x.astype(np.float32) / 255 - mean) / std
  out = data.normalize(jnp.asarray(x), mean, std)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  jitted = jax.jit(data.normalize)(jnp.asarray(x, jnp.float32), mean, std)
  np.testing.assert_allclose(jitted, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "overrides, option, allowed",
  [
    ({"name": "mnist"}, "data.name", "digits, synthetic, cifar10"),
    ({"noise.rate": 1.0}, "data.noise.rate", "[0, 1)"),
    ({"noise.rate": -0.1}, "data.noise.rate", "[0, 1)"),
    ({"noise.kind": "pair"}, "data.noise.kind", "symmetric, asymmetric"),
    ({"num_labelled": 105}, "data.num_labelled", "multiple of num_classes=10"),
    ({"val_size": 0}, "data.val_size", "integer >= 1"),
    ({"test_size": 1797}, "data.test_size", "fraction in (0, 1)"),
    ({"num_train": 5000}, "data.num_train", "at most"),
  ],
)
def test_validate_config_errors(overrides, option, allowed):
  cfg = _config()
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    # Bypass ConfigDict type locking to reach the checks with any value.
    node.unlock()
    del node[leaf]
    node[leaf] = value
  with pytest.raises(ValueError) as info:
    data.validate_config(cfg)
  message = str(info.value)
  assert option in message and "allowed values" in message and allowed in message
  assert "\n" not in message
  with pytest.raises(ValueError):
    data.load(cfg)


def test_validate_config_accepts_all_datasets_without_data(monkeypatch):
  def no_data(*args, **kwargs):
    raise AssertionError("validate_config touched data")

  monkeypatch.setattr(sources, "tfds_source", no_data)
  monkeypatch.setattr(sources, "digits_source", no_data)
  for name in data.DATASETS:
    data.validate_config(_config(name=name, val_size=50))
  data.validate_config(_config(name="cifar10", val_size=5000, num_labelled=4000))
  data.validate_config(_config(name="svhn_cropped", num_labelled=1000))


# Every dataset: (num_classes, image_shape) with default options.
DATASET_FACTS = {
  "digits": (10, (8, 8, 1)),
  "synthetic": (10, (8, 8, 3)),
  "cifar10": (10, (32, 32, 3)),
  "cifar100": (100, (32, 32, 3)),
  "svhn_cropped": (10, (32, 32, 3)),
}


def test_dataset_facts_cover_every_dataset():
  assert set(DATASET_FACTS) == set(data.DATASETS)


@pytest.mark.parametrize("name", sorted(DATASET_FACTS))
def test_num_classes_and_image_shape_configdict_and_dict(name, monkeypatch):
  def no_data(*args, **kwargs):
    raise AssertionError("a dataset fact touched data")

  for source in ("tfds_source", "digits_source", "synthetic_source"):
    monkeypatch.setattr(sources, source, no_data)
  k, shape = DATASET_FACTS[name]
  cfg = _config(name=name)
  as_json = json.loads(json.dumps(cfg.to_dict()))  # as read back from config.json
  for config in (cfg, as_json, {"name": name}):
    assert data.num_classes(config) == k and type(data.num_classes(config)) is int
    assert data.image_shape(config) == shape
    assert all(type(d) is int for d in data.image_shape(config))


def test_num_classes_and_image_shape_missing_fields_take_defaults():
  for config in ({}, {"name": None}, {"seed": 3}):
    assert (data.num_classes(config), data.image_shape(config)) == (10, (8, 8, 1))
  custom = {"name": "synthetic", "synthetic": {"image_size": 12, "num_classes": 4}}
  assert data.num_classes(custom) == 4
  assert data.image_shape(custom) == (12, 12, 3)  # channels: the default
  custom = _config(name="synthetic", **{"synthetic.channels": 1, "synthetic.num_classes": 7})
  assert (data.num_classes(custom), data.image_shape(custom)) == (7, (8, 8, 1))
  assert data.image_shape({"name": "synthetic", "synthetic": {"channels": 2}}) == (8, 8, 2)


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    {"name": "synthetic"},
    {"name": "synthetic", "synthetic.image_size": 12, "synthetic.channels": 1},
    {"name": "synthetic", "synthetic.num_classes": 4, "synthetic.num_val": 40},
  ],
)
def test_dataset_facts_match_load(overrides):
  cfg = _config(**overrides)
  ds = data.load(cfg)
  assert data.num_classes(cfg) == ds.num_classes
  assert data.image_shape(cfg) == ds.image_shape


@pytest.mark.parametrize("fact", ["num_classes", "image_shape"])
def test_dataset_facts_unknown_name(fact):
  cfg = _config()
  cfg.unlock()
  cfg.name = "mnist"
  for config in (cfg, {"name": "mnist"}):
    with pytest.raises(ValueError) as info:
      getattr(data, fact)(config)
    message = str(info.value)
    assert "data.name='mnist'" in message and "\n" not in message
    assert "allowed values: digits, synthetic, cifar10, cifar100, svhn_cropped" in message


def test_data_init_only_reexports():
  path = pathlib.Path(data.__file__)
  assert path.name == "__init__.py"
  tree = ast.parse(path.read_text())
  defined = [
    node
    for node in ast.walk(tree)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
  ]
  assert not defined, [getattr(node, "name", "lambda") for node in defined]
  assert ast.get_docstring(tree)
  for node in tree.body[1:]:
    is_all = isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
    assert isinstance(node, (ast.Import, ast.ImportFrom)) or is_all, ast.dump(node)
  for name in data.__all__:
    assert getattr(data, name) is not None, name
  assert {"num_classes", "image_shape"} <= set(data.__all__)


def test_synthetic_is_deterministic_balanced_and_learnable():
  cfg = _config(name="synthetic")
  ds = data.load(cfg)
  assert ds.image_shape == (8, 8, 3) and ds.num_classes == 10
  assert (len(ds.train), len(ds.val), len(ds.test)) == (500, 100, 200)
  np.testing.assert_array_equal(np.bincount(ds.val.labels), 10)
  assert ds.train.images.dtype == np.uint8
  _assert_disjoint_ids(ds)
  again = data.load(cfg)
  np.testing.assert_array_equal(ds.train.images, again.train.images)
  assert not np.array_equal(
    ds.train.images, data.load(_config(name="synthetic", seed=1)).train.images
  )
  # A nearest-class-mean classifier already separates the classes.
  x = ds.train.images.reshape(len(ds.train), -1).astype(np.float32)
  centroids = np.stack([x[ds.train.labels == c].mean(0) for c in range(10)])
  xt = ds.test.images.reshape(len(ds.test), -1).astype(np.float32)
  pred = np.argmin(((xt[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  assert (pred == ds.test.labels).mean() > 0.9


def test_save_split_ids(tmp_path, digits):
  ds = data.load(_config(num_labelled=50, **{"noise.rate": 0.2}))
  path = tmp_path / "sub" / "split_ids.json"
  data.save_split_ids(ds, path)
  record = json.loads(path.read_text())
  assert record == data.load_split_ids(path)
  for name, split in _all_splits(ds).items():
    assert record[name] == split.ids.tolist()
  assert record["noisy"]["ids"] == ds.train.ids[ds.train.noisy].tolist()
  assert record["noisy"]["noisy_labels"] == ds.train.labels[ds.train.noisy].tolist()
  data.save_split_ids(digits, path)
  assert json.loads(path.read_text())["unlabelled"] is None


# ---------------------------------------------------------------------------
# TFDS: real array_record files written without TensorFlow; mock_data; errors
# ---------------------------------------------------------------------------


CIFAR10_NAMES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)


def _write_tiny_cifar10(data_dir, num_train=60, num_test=20):
  """Writes a real, tiny cifar10 in array_record format (no TensorFlow).

  Images are PNG-encoded with PIL and serialised by TFDS' own feature
  serialiser, so reading them back exercises the real tfds.data_source path.
  """
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module
  from PIL import Image

  builder = tfds.builder("cifar10", data_dir=str(data_dir), file_format="array_record")
  out_dir = pathlib.Path(builder.data_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  written, split_infos = {}, []
  for split, n in (("train", num_train), ("test", num_test)):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    writer = array_record_module.ArrayRecordWriter(
      str(out_dir / f"cifar10-{split}.array_record-00000-of-00001"),
      "group_size:1",
    )
    for i in range(n):
      png = io.BytesIO()
      Image.fromarray(images[i]).save(png, format="PNG")
      example = {
        "id": f"{split}_{i}",
        "image": png.getvalue(),
        "label": int(labels[i]),
      }
      writer.write(builder.info.features.serialize_example(example))
    writer.close()
    written[split] = (images, labels)
    template = tfds.core.ShardedFileTemplate(
      data_dir=out_dir,
      template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name="cifar10",
      split=split,
      filetype_suffix="array_record",
    )
    split_infos.append(
      tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0, filename_template=template)
    )
  # `tfds build` learns the CIFAR-10 names while preparing; so does this.
  builder.info.features["label"].names = list(CIFAR10_NAMES)
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(out_dir)
  return written


def test_tfds_reads_real_array_record_files(tmp_path):
  written = _write_tiny_cifar10(tmp_path)
  cfg = _config(name="cifar10", data_dir=str(tmp_path), val_size=10, num_labelled=20)
  ds = data.load(cfg)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert ds.class_names == CIFAR10_NAMES
  assert (data.num_classes(cfg), data.image_shape(cfg)) == (ds.num_classes, ds.image_shape)
  assert (len(ds.train), len(ds.val), len(ds.unlabelled), len(ds.test)) == (
    20,
    10,
    30,
    20,
  )
  np.testing.assert_array_equal(np.bincount(ds.train.labels), 2)
  np.testing.assert_array_equal(np.bincount(ds.val.labels), 1)
  _assert_disjoint_ids(ds)
  # Pixels and labels round-trip exactly; ids are index (+ 10**9 for test).
  for split in (ds.train, ds.val, ds.unlabelled):
    images, labels = written["train"]
    np.testing.assert_array_equal(split.images, images[split.ids])
    np.testing.assert_array_equal(split.clean_labels, labels[split.ids])
  images, labels = written["test"]
  np.testing.assert_array_equal(ds.test.ids, 10**9 + np.arange(20))
  np.testing.assert_array_equal(ds.test.images, images)
  np.testing.assert_array_equal(ds.test.labels, labels)
  assert "tensorflow" not in sys.modules, "reading must not import TensorFlow"


def test_tfds_mock_data(monkeypatch):
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  # tfds 4.9.10's mock sets `__getitems__` on a MagicMock instance, where it is
  # not bound, so batched reads fail with a TypeError inside tfds. Swap in an
  # unbound version of tfds' helper; `__getitem__` (bound correctly) is unchanged.
  def getitems(record_keys, generator, serialized=False):
    assert not serialized
    return [generator[k] for k in record_keys]

  monkeypatch.setattr(mocking, "_getitems", getitems)
  with tfds.testing.mock_data(num_examples=120):
    cfg = _config(name="svhn_cropped", data_dir="/nonexistent", val_size=10)
    ds = data.load(cfg)
    source = sources.open_tfds_split("svhn_cropped", "test", "/nonexistent")
    direct = np.stack([source[i]["image"] for i in range(len(source))])
  assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (110, 10, 120)
  assert (data.num_classes(cfg), data.image_shape(cfg)) == (ds.num_classes, ds.image_shape)
  assert len(ds.class_names) == 10
  np.testing.assert_array_equal(ds.test.images, direct)
  _assert_disjoint_ids(ds)
  assert "tensorflow" not in sys.modules


def test_not_prepared_error_names_dataset_dir_and_command(tmp_path):
  with pytest.raises(data.DataNotPreparedError) as info:
    data.load(_config(name="cifar100", data_dir=str(tmp_path)))
  message = str(info.value)
  assert "'cifar100'" in message and str(tmp_path) in message
  command = f"tfds build cifar100 --file_format=array_record --data_dir={tmp_path}"
  assert command in message
  assert info.value.data_dir == str(tmp_path)


def test_tfrecord_prepared_dataset_says_rebuild_as_array_record(tmp_path):
  import tensorflow_datasets as tfds

  builder = tfds.builder("cifar10", data_dir=str(tmp_path), file_format="tfrecord")
  pathlib.Path(builder.data_dir).mkdir(parents=True)
  builder.info.write_to_directory(builder.data_dir)
  with pytest.raises(data.DataNotPreparedError, match="--file_format=array_record"):
    data.load(_config(name="cifar10", data_dir=str(tmp_path)))
