"""GLUE data on tfds.testing.mock_data, the config file, the one-line errors, and smoke runs."""

import csv
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from kdaif_jax import config as config_lib
from kdaif_jax import data, trainer
from kdaif_jax.data import glue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def glue_config(arg):
  spec = importlib.util.spec_from_file_location(
    "glue_cfg", os.path.join(ROOT, "configs", "glue.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture
def mock_glue(monkeypatch):
  """tfds.testing.mock_data, with tfds 4.9.10's unbound ``__getitems__`` fixed (as test_data)."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  def getitems(record_keys, generator, serialized=False):
    assert not serialized
    return [generator[k] for k in record_keys]

  monkeypatch.setattr(mocking, "_getitems", getitems)
  return lambda n=48: tfds.testing.mock_data(num_examples=n)


def _data(task, **text):
  c = data.default_data_config()
  c.name, c.data_dir, c.val_size = f"glue/{task}", "/nonexistent", 8
  c.text = glue.text_config()
  c.text.update(text)
  return c


@pytest.mark.parametrize(
  ("task", "tokenizer", "classes"), [("sst2", "minilm", 2), ("mnli", "minilm", 3), ("stsb", "", 1)]
)
def test_glue_data_on_mock_files(mock_glue, task, tokenizer, classes):
  cfg = _data(task, tokenizer=tokenizer, max_length=16)
  with mock_glue(40):
    ds = data.load(cfg)
  assert ds.num_classes == classes == data.num_classes(cfg)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (32, 8, 40)
  length = ds.image_shape[1]
  assert ds.image_shape[0] == 3 and length in (16,) and data.image_shape(cfg) == (3, 16)
  for split in (ds.train, ds.val, ds.test):
    x = split.images
    assert x.dtype == np.int32 and x.shape[1:] == (3, length)
    assert np.all(x[:, 0, 0] == 2 if tokenizer == "" else x[:, 0, 0] == 101)  # [CLS]
    assert np.all(x[:, 0][x[:, 2] == 0] == 0)  # padding is [PAD] = 0
  assert ds.train.labels.dtype == (np.float32 if classes == 1 else np.int32)
  assert set(ds.train.ids).isdisjoint(ds.val.ids) and min(ds.test.ids) >= 10**9
  assert len(ds.text.train_texts) == 40 and ds.text.regression == (classes == 1)
  if task == "mnli":
    assert " [SEP] " in ds.text.train_texts[0] and ds.train.images[:, 1].max() == 1  # pairs
  assert "tensorflow" not in sys.modules


def test_missing_glue_files_say_how_to_prepare(tmp_path):
  with pytest.raises(data.DataNotPreparedError) as info:
    data.load(_with_dir("rte", tmp_path))
  message = str(info.value)
  assert "\n" not in message and "'glue/rte'" in message
  assert f"tfds build glue/rte --file_format=array_record --data_dir={tmp_path}" in message


def _with_dir(task, path):
  c = _data(task)
  c.data_dir = str(path)
  return c


def test_config_every_task_and_the_errors():
  for task in glue.GLUE_TASKS:
    for arg in (task, f"{task}_smoke"):
      cfg = glue_config(arg)
      config_lib.validate(cfg)
      assert cfg.data.name == f"glue/{task}"
  with pytest.raises(ValueError, match="needs a task"):
    glue_config(None)
  with pytest.raises(ValueError, match="unknown config variant 'sst'"):
    glue_config("sst")
  cfg = glue_config("sst2")
  cfg.student.model = "cnn_small"
  with pytest.raises(
    ValueError, match=r"config.student.model='cnn_small' is invalid; allowed: bert_"
  ):
    config_lib.validate(cfg)
  cfg = glue_config("stsb")
  cfg.kdaif.mechanism = "joint"
  with pytest.raises(ValueError, match="joint.*regression"):
    config_lib.validate(cfg)
  cfg = glue_config("sst2")
  cfg.data.text.tokenizer = ""  # a trained tokenizer cannot feed pre-trained embeddings ...
  with pytest.raises(ValueError, match=r"data.text.tokenizer='' is invalid"):
    config_lib.validate(cfg)
  cfg.teacher.pretrained = cfg.student.pretrained = ""  # ... but trains both from scratch
  config_lib.validate(cfg)
  cfg = glue_config("sst2")
  cfg.data.text.max_length = 1000
  with pytest.raises(ValueError, match=r"data.text.max_length=1000 is invalid"):
    config_lib.validate(cfg)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.parametrize(
  ("task", "metric"), [("sst2", "accuracy"), ("mrpc", "f1"), ("stsb", "pearson")]
)
def test_glue_smoke_runs(mock_glue, tmp_path, task, metric):
  """MiniLM teacher (pre-trained, fine-tuned) -> 1-layer student with KD-AIF online."""
  cfg = glue_config(f"{task}_smoke")
  assert (cfg.teacher.model, cfg.student.model) == ("bert_minilm", "bert_minilm_l1")
  cfg.report = task in ("mrpc", "stsb")  # the report's table of sentences and task metrics
  with mock_glue():
    summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert (
    metric in summary["task_metrics"]["student"] and metric in summary["task_metrics"]["teacher"]
  )
  k = 1 if task == "stsb" else 2  # MiniLM (22,713,986 with 2 outputs) with a k-output head
  assert summary["teacher"]["parameters"] == 22_713_986 - 385 * (2 - k)
  assert summary["student"]["parameters"] < summary["teacher"]["parameters"]
  rows = _read_csv(tmp_path / "weights.csv")
  assert len(rows) == summary["num_scored"] == 32
  assert all(r["text"] for r in rows) and np.isfinite([float(r["weight"]) for r in rows]).all()
  lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  student = [r for r in lines if r["kind"] == "train" and r["phase"] == "student"]
  assert np.isfinite(student[-1]["loss"]) and "cg_residual" in student[-1]
  # a regression task has no training accuracy (NaN, which metrics.jsonl writes as
  # "nan"; not the argmax over one output, which read 0)
  assert all((r["accuracy"] == "nan") == (task == "stsb") for r in student)
  # Every evaluation logs the task's official metric; stsb has no accuracy.
  evals = [r for r in lines if r["kind"] == "eval" and r["phase"] == "student"]
  assert evals and all(metric in r for r in evals)
  assert all((r["accuracy"] is None) == (task == "stsb") for r in evals)
  assert (summary["student"]["test_accuracy"] is None) == (task == "stsb")
  final = summary["task_metrics"]["student"][metric]
  assert evals[-1][metric] == final or (np.isnan(final) and np.isnan(evals[-1][metric]))
  if cfg.report:
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| group | id | text |" in report and " [SEP] " in report
    header = next(
      ln for ln in report.splitlines() if ln.startswith("| network | ") and "val" not in ln
    )
    assert "official metrics" in report and f" {metric} |" in header
    if task == "stsb":  # the sentences' labels are the real-valued scores, not int()
      table = [ln for ln in report.splitlines() if ln.startswith(("| helpful |", "| harmful |"))]
      labels = [float(ln.split("|")[4]) for ln in table]
      assert table and any(v != round(v) for v in labels), table[:3]


def test_batches_run_at_their_own_length_bucket(mock_glue, tmp_path, monkeypatch):
  """Cutting each batch's trailing padding changes no number (masked tokens are inert)."""
  from kdaif_jax.text import tokenize

  # Finer buckets than the real ones, so that sst2's mock sentences (7-14 tokens,
  # padded to 16) fall into two of them.
  monkeypatch.setattr(tokenize, "LENGTH_BUCKETS", (4, 8, 12, 16, 32, 64, 128, 256, 512))
  used = []
  real = tokenize.batch_length
  monkeypatch.setattr(
    tokenize, "batch_length", lambda *a: used.append(real(*a)) or used[-1], raising=True
  )
  out = {}
  for bucketed in (True, False):
    cfg = glue_config("sst2_smoke")
    cfg.batch_size, cfg.teacher.epochs, cfg.student.epochs = 4, 1, 1
    cfg.data.text.bucket_batches = bucketed
    used.clear()
    with mock_glue():
      trainer.train_and_evaluate(cfg, str(tmp_path / str(bucketed)))
    text = (tmp_path / str(bucketed) / "metrics.jsonl").read_text()
    lines = [json.loads(s) for s in text.splitlines()]
    out[bucketed] = (
      [r["loss"] for r in lines if r["kind"] == "train"],
      [r["loss"] for r in lines if r["kind"] == "eval"],
      sorted(set(used)),
    )
  (train_b, eval_b, lengths_b), (train_p, eval_p, _) = out[True], out[False]
  assert {12, 16} <= set(lengths_b)  # batches ran at more than one length
  np.testing.assert_allclose(train_b, train_p, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(eval_b, eval_p, rtol=1e-4, atol=1e-6)
