"""GLUE (Wang et al., 2019): the nine tasks from local TFDS files, tokenised and packed.

``data.name = "glue/<task>"`` for cola, sst2, mrpc, qqp, stsb (regression), mnli
(tested on validation_matched), mnli_mismatched (validation_mismatched), qnli,
rte and wnli. GLUE's test labels are hidden, so the *validation* split is the
test split here (as in papers that report dev-set numbers), and the influence
validation set is a seeded slice of the training split, as for the images.

Text is stored where images are: ``Split.images`` holds int32 [N, 3, L] (token
ids, token types, attention mask; ``kdaif_jax.text.tokenize.pack``), with L a
length bucket, so the trainer, the steps and the scorer move it unchanged.
The ``data.text`` section (``text_config``): ``max_length`` (truncation),
``tokenizer`` ("minilm": the packaged all-MiniLM-L6-v2's; a directory with
tokenizer.json or vocab.txt; "": a WordPiece tokenizer trained on the task's
training text) and ``vocab_size`` (for the trained one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from kdaif_jax.data import sources
from kdaif_jax.data.noise import inject_noise
from kdaif_jax.data.options import _fail, _get
from kdaif_jax.data.splits import Dataset, Split, balanced_subset, complement


class Task(NamedTuple):
  """One GLUE task: TFDS config, its text fields, classes (1: regression), sizes."""

  config: str
  keys: tuple[str, ...]
  num_classes: int
  num_train: int
  test_split: str


GLUE_TASKS = {
  "cola": Task("cola", ("sentence",), 2, 8_551, "validation"),
  "sst2": Task("sst2", ("sentence",), 2, 67_349, "validation"),
  "mrpc": Task("mrpc", ("sentence1", "sentence2"), 2, 3_668, "validation"),
  "qqp": Task("qqp", ("question1", "question2"), 2, 363_846, "validation"),
  "stsb": Task("stsb", ("sentence1", "sentence2"), 1, 5_749, "validation"),
  "mnli": Task("mnli", ("premise", "hypothesis"), 3, 392_702, "validation_matched"),
  "mnli_mismatched": Task("mnli", ("premise", "hypothesis"), 3, 392_702, "validation_mismatched"),
  "qnli": Task("qnli", ("question", "sentence"), 2, 104_743, "validation"),
  "rte": Task("rte", ("sentence1", "sentence2"), 2, 2_490, "validation"),
  "wnli": Task("wnli", ("sentence1", "sentence2"), 2, 635, "validation"),
}
TEXT_DATASETS = tuple(f"glue/{t}" for t in GLUE_TASKS)
_STREAM_TEXT_VAL, _STREAM_TEXT_TRAIN = 20, 21


def text_config() -> ml_collections.ConfigDict:
  """The ``data.text`` section with its defaults (GLUE configs add it)."""
  # bucket_batches: each training batch runs at the smallest length bucket that
  # holds its longest sentence (False: every batch at the padded length L).
  return ml_collections.ConfigDict(
    dict(max_length=128, tokenizer="minilm", vocab_size=8000, bucket_batches=True)
  )


def task_of(name: str) -> str:
  """'glue/sst2' -> 'sst2'."""
  return name.split("/", 1)[1]


def is_regression(name: str) -> bool:
  """Whether the dataset's labels are real scores (stsb)."""
  return GLUE_TASKS[task_of(name)].num_classes == 1


def text_option(config: Any, field: str) -> Any:
  """``data.text.<field>`` of a ConfigDict or plain dict, else its default."""
  node = None
  try:
    node = config["text"][field]
  except (KeyError, TypeError, AttributeError):
    pass
  return text_config()[field] if node is None else node


def validate_text(config: Any) -> None:
  """Checks the options only text datasets have (one-line ValueError)."""
  name = _get(config, "name")
  n = text_option(config, "max_length")
  if isinstance(n, bool) or not isinstance(n, int) or not 8 <= n <= 512:
    _fail("text.max_length", n, "an integer in [8, 512]")
  v = text_option(config, "vocab_size")
  # A trained tokenizer's ids index the models' 30,522-row embedding table.
  if isinstance(v, bool) or not isinstance(v, int) or not 100 <= v <= 30_522:
    _fail("text.vocab_size", v, "an integer in [100, 30522]")
  if not isinstance(text_option(config, "bucket_batches"), bool):
    _fail("text.bucket_batches", text_option(config, "bucket_batches"), "True or False")
  if not isinstance(text_option(config, "tokenizer"), str):
    _fail("text.tokenizer", text_option(config, "tokenizer"), "'minilm', a directory, or ''")
  if _get(config, "num_labelled"):
    _fail("num_labelled", _get(config, "num_labelled"), f"0 ({name} is fully supervised)")
  if is_regression(name) and _get(config, "noise.rate"):
    _fail("noise.rate", _get(config, "noise.rate"), f"0 ({name} is a regression task)")


class TextInfo(NamedTuple):
  """What a text dataset adds to ``Dataset``.

  task: the GLUE task ('sst2', ...).
  regression: labels are float scores (stsb): one output, squared-error losses.
  train_texts: object [N_pool] the training pool's text by example id (pairs
    joined with " [SEP] "), for weights.csv and the report.
  """

  task: str
  regression: bool
  train_texts: np.ndarray


def _open(task: Task, split: str, data_dir: str | None, open_fn):
  # The GLUE builder registers on import; tfds' own import of it can fail quietly.
  import tensorflow_datasets.text.glue  # noqa: F401

  return open_fn(f"glue/{task.config}", split, data_dir)


def _read(source: Any, keys: tuple[str, ...], batch_size: int = 4096):
  """(list of texts per key, labels [N]) of a random-access GLUE source."""
  n = len(source)
  if n == 0:
    raise ValueError(f"{source!r} is empty")
  texts = [[] for _ in keys]
  labels = []
  for start in range(0, n, batch_size):
    for record in source.__getitems__(list(range(start, min(n, start + batch_size)))):
      for out, key in zip(texts, keys):
        value = record[key]
        out.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
      labels.append(record["label"])
  return texts, np.asarray(labels)


def tokenizer_for(spec: str, train_texts: list[list[str]], vocab_size: int):
  """The tokenizer ``data.text.tokenizer`` names (trained on the texts when "")."""
  from kdaif_jax.text import tokenize, weights

  if spec == "":
    return tokenize.train_tokenizer([t for col in train_texts for t in col], vocab_size)
  return tokenize.load_tokenizer(weights.resolve(spec))


def _subset(labels: np.ndarray, total: int, k: int, seed: list[int], option: str) -> np.ndarray:
  """Class-balanced for classification, a seeded uniform draw for regression."""
  if k == 1:
    return np.sort(np.random.default_rng(seed).choice(len(labels), total, replace=False))
  try:
    return balanced_subset(labels, num_classes=k, total=total, seed=seed)
  except ValueError as err:
    raise ValueError(f"data.{option}={total} cannot be class-balanced: {err}") from None


def load_glue(config: Any, open_fn=sources.open_tfds_split) -> Dataset:
  """Reads, tokenises and splits a GLUE task (``data.name = 'glue/<task>'``).

  Args:
    config: the ``data`` section (validated by the caller).
    open_fn: (name, split, data_dir) -> random-access source; a seam for tests.

  Returns:
    Dataset: images int32 [N, 3, L], labels int32 (float32 for stsb),
    ``image_shape`` (3, L), ``text`` a ``TextInfo``.

  Raises:
    DataNotPreparedError: the TFDS files are missing (how to prepare them).
  """
  from kdaif_jax.text import tokenize

  name = _get(config, "name")
  task = GLUE_TASKS[task_of(name)]
  seed, data_dir = int(_get(config, "seed")), _get(config, "data_dir")
  k = task.num_classes
  raw = {}
  for split in ("train", task.test_split):
    source = _open(task, split, data_dir, open_fn)
    raw[split] = (*_read(source, task.keys), source)
  tok = tokenizer_for(
    text_option(config, "tokenizer"), raw["train"][0], int(text_option(config, "vocab_size"))
  )
  max_len = int(text_option(config, "max_length"))
  packed = {s: tokenize.pack(tok, *r[0], max_length=max_len) for s, r in raw.items()}
  length = max(p.shape[-1] for p in packed.values())
  splits = {}
  for split, (_, labels, _) in raw.items():
    x = np.pad(packed[split], ((0, 0), (0, 0), (0, length - packed[split].shape[-1])))
    y = labels.astype(np.float32 if k == 1 else np.int32)
    if k > 1 and (y.min() < 0 or y.max() >= k):
      raise ValueError(f"{name}/{split}: labels outside [0, {k})")
    offset = sources.SPLIT_ID_OFFSET["train" if split == "train" else "test"]
    splits[split] = Split(x, y, offset + np.arange(len(y)), y.copy(), np.zeros(len(y), bool))
  pool = splits["train"]
  val_size = int(_get(config, "val_size"))
  val_idx = _subset(pool.clean_labels, val_size, k, [seed, _STREAM_TEXT_VAL], "val_size")
  val, train = pool.take(val_idx), pool.take(complement(len(pool), val_idx))
  num_train = int(_get(config, "num_train"))
  if num_train:
    train = train.take(
      _subset(train.clean_labels, num_train, k, [seed, _STREAM_TEXT_TRAIN], "num_train")
    )
  rate = float(_get(config, "noise.rate"))
  if rate > 0:
    noisy, flipped = inject_noise(
      train.clean_labels, k, rate, _get(config, "noise.kind"), seed=int(_get(config, "noise.seed"))
    )
    train = dataclasses.replace(train, labels=noisy, noisy=flipped)
  texts = np.array([" [SEP] ".join(t) for t in zip(*raw["train"][0])], dtype=object)
  names = ("score",) if k == 1 else sources._class_names(raw["train"][2], k)
  return Dataset(
    name=name,
    num_classes=k,
    image_shape=(3, int(length)),
    mean=np.zeros(1, np.float32),
    std=np.ones(1, np.float32),
    train=train,
    val=val,
    test=splits[task.test_split],
    unlabelled=None,
    class_names=names,
    text=TextInfo(task_of(name), k == 1, texts),
  )
