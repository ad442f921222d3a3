"""The SAFE report: its helpers on hand-made inputs, a real tiny run, a damaged copy, the CLI;
the shared numpy metrics (kdaif_jax.metrics) by hand; the report package as a leaf."""

import base64
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import numpy as np
import pytest
from matplotlib import image as mpimg
from sklearn.metrics import roc_auc_score

from kdaif_jax import metrics, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg="smoke"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A finished tiny run: digits with 40% flipped labels, mlp -> mlp, online KD-AIF."""
  from kdaif_jax import trainer  # only here: the other tests need no training module

  cfg = load_config("digits_noisy")
  cfg.teacher.model = cfg.student.model = "mlp"
  cfg.kdaif.mechanism = "online"
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train_and_evaluate(cfg, workdir)
  return workdir


@pytest.fixture(scope="module")
def full_report(run_dir):
  return report.write_report(run_dir)


def _read(path):
  return pathlib.Path(path).read_text(encoding="utf-8")


def _check_pngs_and_html(out):
  assert out["figures"]
  for path in out["figures"].values():
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
  page = _read(out["report_html"])
  embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
  files = {pathlib.Path(p).read_bytes() for p in out["figures"].values()}
  assert len(embedded) == len(out["figures"])
  assert {base64.b64decode(e) for e in embedded} == files
  assert "src='" + os.sep not in page  # self-contained: no file links


def test_report_of_a_finished_run(run_dir, full_report):
  out = full_report
  assert os.path.dirname(out["report_md"]) == os.path.join(run_dir, "report")
  assert set(out["figures"]) == {
    "training_curves.png",
    "weights.png",
    "most_helpful.png",
    "most_harmful.png",
    "per_class_accuracy.png",
    "reliability.png",
  }
  _check_pngs_and_html(out)
  assert out["missing"] == []
  md = _read(out["report_md"])
  for word in (
    "AUROC",
    "ECE",
    "FLOPs",
    "compression",
    "precision@",
    "worst class",
    "Teacher from checkpoints/teacher",
    "## Missing",
    "Nothing: every file",
  ):
    assert word in md, word
  for name in out["figures"]:
    assert f"]({name})" in md
  # The report's detection numbers are the trainer's (same function, same weights.csv).
  summary = json.loads(_read(os.path.join(run_dir, "summary.json")))
  det = out["numbers"]["detection"]["low training weight (`weight`)"]
  assert det["auroc"] == pytest.approx(summary["noise_detection"]["auroc"], abs=1e-6)
  assert 0.0 <= out["numbers"]["student_ece"] <= 1.0
  # mlp -> mlp: same size.
  assert out["numbers"]["compression_ratio"] == pytest.approx(1.0)
  assert out["numbers"]["flops"]["student"] > 0


def test_report_with_a_baseline_estimates_the_influence_share(run_dir, tmp_path):
  base = tmp_path / "base"
  shutil.copytree(run_dir, base, ignore=shutil.ignore_patterns("checkpoints", "report"))
  summary = json.loads((base / "summary.json").read_text())
  rate = summary["steps_per_second"]["student"]
  summary.update(mechanism="none")
  summary["steps_per_second"]["student"] = 4 * rate
  (base / "summary.json").write_text(json.dumps(summary))
  out = report.write_report(run_dir, baseline=str(base), out_dir=str(tmp_path / "rep"))
  assert out["numbers"]["influence_share"] == pytest.approx(0.75, abs=1e-3)
  md = _read(out["report_md"])
  assert "baseline student (none)" in md and "1 - rate/rate_plain" in md
  assert out["missing"] == []


def test_a_baseline_that_is_absent_or_of_another_experiment_is_refused(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="baseline .* is not a folder"):
    report.write_report(run_dir, baseline=str(tmp_path / "absent"))
  base = tmp_path / "other"
  shutil.copytree(run_dir, base, ignore=shutil.ignore_patterns("checkpoints", "report"))
  config = json.loads((base / "config.json").read_text())
  config["data"]["noise"]["rate"] = 0.25 if config["data"]["noise"]["rate"] != 0.25 else 0.0
  config["data"]["data_dir"] = "/elsewhere"  # where the files lie: not the experiment
  (base / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"ran another experiment \(data\.noise\.rate: "):
    report.write_report(run_dir, baseline=str(base), out_dir=str(tmp_path / "rep"))
  assert not (tmp_path / "rep").exists()  # refused before writing anything
  proc = subprocess.run(
    [sys.executable, "-m", "kdaif_jax.report", run_dir, "--baseline", str(base)],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert proc.returncode == 2 and "ran another experiment" in proc.stderr
  # an option the baseline's (older) library did not have yet is not a difference
  del config["data"]["noise"]["rate"]
  (base / "config.json").write_text(json.dumps(config))
  report.write_report(run_dir, baseline=str(base), out_dir=str(tmp_path / "rep"))


def test_damaged_copy_still_reports_and_names_what_is_missing(run_dir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))
  os.remove(copy / "weights.csv")
  text = (copy / "metrics.jsonl").read_text()
  cut = text.rindex("\n", 0, len(text) - 1) + 20  # 20 characters into the last line
  (copy / "metrics.jsonl").write_text(text[:cut])
  out = report.write_report(str(copy))
  missing = {m["file"]: m for m in out["missing"]}
  assert "not found" in missing["workdir/weights.csv"]["problem"]
  assert "noise detection" in missing["workdir/weights.csv"]["disabled"]
  assert "truncated" in missing["workdir/metrics.jsonl"]["problem"]
  assert "weights.png" not in out["figures"] and "training_curves.png" in out["figures"]
  _check_pngs_and_html(out)
  md = _read(out["report_md"])
  assert "## Missing" in md and "weights.csv" in md and "ECE" in md


def test_empty_folder_gives_a_report_of_missing_files(tmp_path):
  out = report.write_report(str(tmp_path))
  names = {m["file"] for m in out["missing"]}
  for f in ("config.json", "summary.json", "metrics.jsonl", "weights.csv", "predictions.npz"):
    assert f"workdir/{f}" in names
  assert os.path.exists(out["report_md"]) and os.path.exists(out["report_html"])


def test_static_influence_share_is_measured_from_scoring_lines(tmp_path):
  # A hand-made partial workdir: static scored once for 5 s; proxy 10 s, student 35 s.
  (tmp_path / "config.json").write_text(json.dumps({"kdaif": {"mechanism": "static"}}))
  (tmp_path / "summary.json").write_text(
    json.dumps(
      {"mechanism": "static", "wall_time_s": {"teacher": 3.0, "proxy": 10.0, "student": 35.0}}
    )
  )
  (tmp_path / "metrics.jsonl").write_text(
    json.dumps({"kind": "scoring", "phase": "static", "step": 8, "epoch": 0, "seconds": 5.0}) + "\n"
  )
  out = report.write_report(str(tmp_path))
  assert out["numbers"]["influence_share"] == pytest.approx(5 / 50)
  md = _read(out["report_md"])
  assert "30.00% of that time beyond training the final student" in md
  assert "workdir/weights.csv" in {m["file"] for m in out["missing"]}


def test_online_report_names_the_teacher_pass_of_memory_init(tmp_path):
  # A hand-made partial workdir: online whose score memory started from the teacher.
  (tmp_path / "config.json").write_text(json.dumps({"kdaif": {"mechanism": "online"}}))
  (tmp_path / "summary.json").write_text(
    json.dumps({"mechanism": "online", "wall_time_s": {"teacher": 3.0, "student": 35.0}})
  )
  line = {"kind": "scoring", "phase": "memory_init", "step": 0, "epoch": 0, "seconds": 12.25}
  (tmp_path / "metrics.jsonl").write_text(json.dumps(line) + "\n")
  md = _read(report.write_report(str(tmp_path))["report_md"])
  assert "Share of time on influence: unknown" in md
  assert "starts the score memory took 12.2 s (metrics.jsonl, phase memory_init)" in md


def test_cli_writes_the_report(run_dir, tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "kdaif_jax.report", run_dir, "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "ECE" in (tmp_path / "report.md").read_text()
  assert (tmp_path / "report.html").exists()


# --------------------------------------------------------------------------
# Helpers on hand-made inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "weights, noisy",
  [
    ([0.1, 0.5, 0.5, 0.9, 0.5, 1.2, 0.3, 0.5], [1, 1, 0, 0, 1, 0, 0, 0]),  # ties across groups
    ([1.0, 1.0, 1.0, 1.0], [1, 0, 0, 1]),  # all tied: 0.5
    ([0.2, 0.4, 0.6, 0.8, 1.0], [1, 1, 0, 0, 0]),  # perfect
    ([0.2, 0.4, 0.6, 0.8, 1.0], [0, 0, 0, 1, 1]),  # inverted
  ],
)
def test_detection_metrics_match_sklearn(weights, noisy):
  w, y = np.asarray(weights), np.asarray(noisy, bool)
  det = metrics.detection_metrics(w, y)
  assert det["auroc"] == pytest.approx(roc_auc_score(y, -w), abs=1e-12)
  assert det["num_noisy"] == y.sum()


def test_detection_precision_at_k_by_hand():
  # k = 3 flipped; the 3 lowest weights are ids 0 (flipped), 3 (clean), 5 (flipped).
  w = np.array([0.1, 0.9, 0.8, 0.2, 0.7, 0.3, 0.6])
  y = np.array([1, 0, 0, 0, 0, 1, 1], bool)
  assert metrics.detection_metrics(w, y)["precision_at_k"] == pytest.approx(2 / 3)
  # Ties inside the k lowest do not matter: 0.2, 0.2 and 0.1 are all taken.
  w2 = np.array([0.2, 0.2, 0.9, 0.9, 0.1, 0.95])
  y2 = np.array([1, 0, 0, 0, 1, 1], bool)
  assert metrics.detection_metrics(w2, y2)["precision_at_k"] == pytest.approx(2 / 3)
  assert metrics.detection_metrics(w, np.zeros(7, bool))["auroc"] is None


def test_ece_by_hand():
  # Confidences 0.95 (bin 14), 0.9 (bin 13), 0.55 (bin 8), 0.55 (bin 8), 0.42 (bin 6).
  probs = np.array(
    [[0.95, 0.05, 0.0], [0.1, 0.9, 0.0], [0.55, 0.45, 0.0], [0.45, 0.55, 0.0], [0.29, 0.29, 0.42]]
  )
  labels = np.array([0, 0, 0, 0, 2])
  # Correct: yes, no, yes, no, yes.  Bin 14: |1 - 0.95| * 1; bin 13: |0 - 0.9| * 1;
  # bin 8: |0.5 - 0.55| * 2; bin 6 (0.42 in (6/15, 7/15]): |1 - 0.42| * 1.
  by_hand = (0.05 + 0.9 + 2 * 0.05 + 0.58) / 5
  assert report.expected_calibration_error(probs, labels) == pytest.approx(by_hand)
  # One bin: |accuracy - mean confidence| of everything.
  assert report.expected_calibration_error(probs, labels, num_bins=1) == pytest.approx(
    abs(3 / 5 - (0.95 + 0.9 + 0.55 + 0.55 + 0.42) / 5)
  )
  # Perfectly confident and right: 0.
  assert report.expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)


def test_per_class_accuracy_by_hand():
  logits = np.array([[2, 1, 0], [0, 3, 1], [5, 0, 0], [0, 0, 1], [0, 1, 0]], float)
  labels = np.array([0, 1, 1, 2, 0])
  # class 0: examples 0 (right), 4 (wrong) -> 0.5; class 1: 1 (right), 2 (wrong) -> 0.5;
  # class 2: 3 (right) -> 1; class 3: none -> NaN.
  acc = report.per_class_accuracy(logits, labels, 4)
  np.testing.assert_allclose(acc[:3], [0.5, 0.5, 1.0])
  assert np.isnan(acc[3])


@pytest.mark.parametrize("use_bias", [True, False])
def test_forward_flops_of_a_dense_layer(use_bias):
  # XLA counts the dot as 2 flops per multiply-add (2 * in * out) and the bias
  # add as 1 per output element.
  n_in, n_out = 13, 7
  flops = report.forward_flops(nn.Dense(n_out, use_bias=use_bias), (1, n_in))
  assert flops == 2 * n_in * n_out + (n_out if use_bias else 0)


def test_forward_flops_of_a_registry_model_scales_with_width():
  from kdaif_jax import models

  small = report.forward_flops(models.create("mlp", 10, hidden=8), (1, 8, 8, 1))
  big = report.forward_flops(models.create("mlp", 10, hidden=16), (1, 8, 8, 1))
  # Dense 64->h (+bias, +relu) and h->10 (+bias).
  assert small == 2 * 64 * 8 + 8 + 8 + 2 * 8 * 10 + 10
  assert big > small


def test_read_metrics_keeps_the_last_line_and_skips_broken_ones(tmp_path):
  lines = [
    {"kind": "train", "phase": "student", "step": 2, "loss": 1.0},
    {
      "kind": "eval",
      "phase": "student",
      "net": "student",
      "split": "val",
      "step": 2,
      "accuracy": 0.5,
    },
    {"kind": "train", "phase": "student", "step": 2, "loss": 0.5},  # resumed: rewritten
    {"kind": "train", "phase": "student", "step": 4, "loss": "nan"},
  ]
  text = "\n".join(json.dumps(x) for x in lines) + "\n[1, 2]\n\n" + '{"kind": "tra'
  (tmp_path / "metrics.jsonl").write_text(text)
  records, problems = report.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [(r["kind"], r["step"], r.get("loss")) for r in records] == [
    ("eval", 2, None),
    ("train", 2, 0.5),
    ("train", 4, "nan"),
  ]
  assert len(problems) == 2 and "line 7" in problems[1] and "truncated" in problems[1]
  assert report.read_metrics(str(tmp_path / "none.jsonl")) == ([], ["none.jsonl not found"])


def test_pseudo_label_by_epoch_averages_each_student_epoch():
  def train(phase, step, epoch, acc=None):
    rec = {"kind": "train", "phase": phase, "step": step, "epoch": epoch, "loss": 1.0}
    return rec if acc is None else {**rec, "pseudo_label_accuracy": acc}

  records = [
    train("teacher", 1, 0, 0.1),  # not the student phase
    train("student", 1, 0, 0.5),
    train("student", 2, 0, 0.7),
    {"kind": "eval", "phase": "student", "net": "student", "split": "val", "step": 2, "epoch": 1},
    train("student", 3, 1, 0.9),
    train("student", 4, 1, "nan"),  # a non-finite log line does not poison the epoch
    train("student", 5, 2),  # a step without the statistic
  ]
  by = report.pseudo_label_by_epoch(records)
  assert list(by) == [0, 1]
  np.testing.assert_allclose([by[0], by[1]], [0.6, 0.9])
  assert report.pseudo_label_by_epoch([train("student", 1, 0)]) == {}
  assert np.isnan(
    report.pseudo_label_by_epoch([train("student", 1, 3, None) | {"pseudo_label_accuracy": None}])[
      3
    ]
  )


def test_flops_from_config_alone_use_the_data_facts(tmp_path):
  # No predictions.npz: the input shape and class count come from kdaif_jax.data.
  cfg = {"data": {"name": "digits"}, "teacher": {"model": "mlp"}, "student": {"model": "mlp"}}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  out = report.write_report(str(tmp_path))
  from kdaif_jax import models

  expected = report.forward_flops(models.create("mlp", 10), (1, 8, 8, 1))
  assert out["numbers"]["flops"] == {"teacher": expected, "student": expected}
  assert not [m for m in out["missing"] if "FLOPs" in m["disabled"]]
  # A dataset this version does not know: FLOPs unknown, and the report says why.
  cfg["data"]["name"] = "imagenet"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  out = report.write_report(str(tmp_path))
  assert out["numbers"]["flops"] == {"teacher": None, "student": None}
  notes = {m["disabled"]: m["problem"] for m in out["missing"] if "FLOPs" in m["disabled"]}
  assert set(notes) == {"teacher FLOPs", "student FLOPs"}
  assert "input shape, classes or architecture unknown" in notes["student FLOPs"]


# --------------------------------------------------------------------------
# kdaif_jax.metrics by hand
# --------------------------------------------------------------------------


def test_detection_metrics_auroc_with_ties_by_hand():
  # Flipped weights {0.2, 0.5}, clean {0.5, 0.8}: of the 4 (flipped, clean) pairs, 0.2 is
  # lower than both (2), 0.5 ties 0.5 (1/2) and is lower than 0.8 (1): 3.5 / 4.
  w = np.array([0.2, 0.5, 0.5, 0.8])
  det = metrics.detection_metrics(w, np.array([1, 1, 0, 0], bool))
  assert det == {"auroc": pytest.approx(0.875), "precision_at_k": 1.0, "num_noisy": 2}
  # Same pairs, the tied 0.5 now clean at position 1: the k = 2 lowest are positions 0
  # and 1 (a stable sort keeps the earlier of two ties), one of them flipped.
  det = metrics.detection_metrics(w, [1, 0, 1, 0])
  assert det == {"auroc": pytest.approx(0.875), "precision_at_k": 0.5, "num_noisy": 2}
  # Eight examples: flipped {0.1, 0.5, 0.5} vs clean {0.5, 0.9, 1.2, 0.3, 0.5}:
  # 0.1 beats all 5; each 0.5 beats 0.9 and 1.2 and ties two 0.5s: 5 + 3 + 3 = 11 of 15.
  w8 = [0.1, 0.5, 0.5, 0.9, 0.5, 1.2, 0.3, 0.5]
  det = metrics.detection_metrics(w8, [1, 1, 0, 0, 1, 0, 0, 0])
  assert det["auroc"] == pytest.approx(11 / 15)
  # The 3 lowest: 0.1 (flipped), 0.3 (clean), the first 0.5 (position 1, flipped).
  assert det["precision_at_k"] == pytest.approx(2 / 3)
  assert isinstance(det["auroc"], float) and isinstance(det["num_noisy"], int)


def test_detection_metrics_none_cases():
  w = np.array([0.3, 0.1, 0.7])
  assert metrics.detection_metrics(w, [0, 0, 0]) == {
    "auroc": None,
    "precision_at_k": None,
    "num_noisy": 0,
  }
  assert metrics.detection_metrics(w, [1, 1, 1]) == {
    "auroc": None,
    "precision_at_k": None,
    "num_noisy": 3,
  }
  # Constant weights (plain KD): AUROC 0.5, but no "k lowest" to take.
  assert metrics.detection_metrics(np.ones(4), [1, 0, 0, 0]) == {
    "auroc": 0.5,
    "precision_at_k": None,
    "num_noisy": 1,
  }


def test_ece_and_calibration_bins_by_hand():
  # 5 bins of width 0.2. Confidences 0.85 (bin 4, right), 0.75 (bin 3, wrong),
  # 0.7 (bin 3, right), 0.55 (bin 2, right).
  probs = np.array([[0.85, 0.15], [0.75, 0.25], [0.3, 0.7], [0.55, 0.45]])
  labels = np.array([0, 1, 1, 0])
  count, conf_sum, acc_sum = metrics.calibration_bins(probs, labels, 5)
  np.testing.assert_array_equal(count, [0, 0, 1, 2, 1])
  np.testing.assert_allclose(conf_sum, [0, 0, 0.55, 1.45, 0.85])
  np.testing.assert_allclose(acc_sum, [0, 0, 1, 1, 1])
  # (1 * |1 - 0.55| + 2 * |0.5 - 0.725| + 1 * |1 - 0.85|) / 4
  assert metrics.expected_calibration_error(probs, labels, num_bins=5) == pytest.approx(1.05 / 4)
  assert np.isnan(metrics.expected_calibration_error(np.zeros((0, 3)), np.zeros(0, int)))
  # The report re-exports the same functions.
  assert report.expected_calibration_error is metrics.expected_calibration_error
  assert report.per_class_accuracy is metrics.per_class_accuracy


def test_softmax():
  p = metrics.softmax(np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]]))
  np.testing.assert_allclose(p, [[0.25, 0.75], [0.5, 0.5]])


def test_report_imports_no_training_module():
  code = (
    "import json, sys\n"
    "import kdaif_jax.report\n"
    "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kdaif_jax'))))\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert "kdaif_jax.report" in loaded and "kdaif_jax.metrics" in loaded
  for name in ("step", "ssl", "scoring", "loop", "trainer", "config"):
    assert f"kdaif_jax.{name}" not in loaded, name
