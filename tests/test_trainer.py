"""End-to-end trainer: config smokes, mechanisms, files, resume, multi-device, bad input."""

import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kdaif_jax import checkpoint, influence, trainer, trajectory
from kdaif_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["default", "digits_noisy", "cifar100_kd", "digits_ssl", "cifar10_4k", "svhn_1k"]


def load_config(name, arg="smoke"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def tiny(cfg, mechanism="online"):
  """A smoke config with MLPs: every code path, seconds of compile."""
  cfg.teacher.model = cfg.student.model = "mlp"
  cfg.kdaif.mechanism = mechanism
  return cfg


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def student_train_lines(workdir):
  """The student phase's training lines of a run's metrics.jsonl."""
  lines = read_jsonl(workdir / "metrics.jsonl")
  return [r for r in lines if r["kind"] == "train" and r["phase"] == "student"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_smoke_writes_every_file(name, tmp_path):
  cfg = load_config(name)
  assert cfg.kdaif.mechanism in config_lib.MECHANISMS
  # The end-of-run report, for one supervised and one SSL run (tests/test_report.py has the rest).
  cfg.report = name in ("default", "digits_ssl")
  summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert (tmp_path / "report" / "report.md").exists() == cfg.report
  for f in (
    "summary.json",
    "metrics.jsonl",
    "config.json",
    "weights.csv",
    "splits.json",
    "predictions.npz",
    "experiment.json",
  ):
    assert (tmp_path / f).exists(), f
  assert any(n.startswith("events") for n in os.listdir(tmp_path / "tensorboard"))
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  for key in ("dataset", "mechanism", "device_count", "steps_per_second", "wall_time_s"):
    assert key in summary
  for net in ("teacher", "student"):
    assert 0.0 <= summary[net]["test_accuracy"] <= 1.0
    assert summary[net]["parameters"] > 0
    assert summary[net]["architecture"] == cfg[net].model
  assert summary["student"]["parameters"] <= summary["teacher"]["parameters"]
  rows = read_csv(tmp_path / "weights.csv")
  assert len(rows) == summary["num_scored"]
  if cfg.data.num_labelled:
    assert summary["num_scored"] == summary["num_unlabelled"] > 0
    assert {int(r["label"]) for r in rows} == {-1}  # labels dropped from what training sees
  w = np.array([float(r["weight"]) for r in rows])
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  # Self-influence in the classifier layer (scoring.make_self_influence_scorer): I_ii ≥ 0.
  self_infl = np.array([float(r["self_influence"]) for r in rows])
  assert np.all(np.isfinite(self_infl)) and np.all(self_infl >= 0) and self_infl.max() > 0
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  phases = {(r["kind"], r["phase"]) for r in lines}
  assert ("train", "teacher") in phases and ("train", "student") in phases
  assert ("eval", "student") in phases
  student_train = [r for r in lines if r["kind"] == "train" and r["phase"] == "student"]
  for key in (
    "loss",
    "accuracy",
    "w_mean",
    "w_std",
    "w_min",
    "w_max",
    "w_below_half",
    "cg_residual",
    "cg_iterations",
  ):
    assert key in student_train[-1], key
  if cfg.data.num_labelled:  # the teacher's pseudo-labels against the hidden true labels
    assert all(0 <= r["pseudo_label_accuracy"] <= 1 for r in student_train)
  if cfg.data.num_labelled and cfg.report:
    report = (tmp_path / "report" / "report.md").read_text()
    assert "The teacher's pseudo-labels on the unlabelled batches were right for" in report


@pytest.mark.parametrize("mechanism", ["none", "static", "periodic", "joint"])
def test_mechanisms_run_in_the_trainer(mechanism, tmp_path):
  cfg = tiny(load_config("digits_noisy"), mechanism)
  if mechanism != "joint":  # the memory belongs to the online step: ignored here
    cfg.kdaif.memory_init = "teacher"
  if mechanism == "periodic":  # the trajectory's scoring shares periodic's epoch hook
    cfg.kdaif.whole_set.trajectory, cfg.student.epochs, cfg.kdaif.period_epochs = 3, 3, 2
  summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert summary["mechanism"] == mechanism
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  scorings = [r for r in lines if r["kind"] == "scoring"]
  assert all(r["phase"] != "memory_init" for r in scorings)
  if mechanism == "periodic":
    # Epoch 1: the trajectory's own scoring; epoch 2: periodic's rescoring, saved for both.
    assert [(r["phase"], r["epoch"]) for r in scorings] == [("trajectory", 1), ("periodic", 2)]
    scorings = [r for r in scorings if r["phase"] != "trajectory"]
    assert summary["trajectory"]["epochs"] == [1, 2, 3]
    np.testing.assert_allclose(  # periodic's last rescoring (epoch 2) is the influence column
      np.load(tmp_path / trajectory.FOLDER / "epoch_0002.npy"),
      [float(r["influence"]) for r in read_csv(tmp_path / "weights.csv")],
      rtol=1e-4,
      atol=1e-6,
    )
  rows = read_csv(tmp_path / "weights.csv")
  w = np.array([float(r["weight"]) for r in rows])
  if mechanism in ("static", "periodic"):
    assert scorings and scorings[0]["phase"] == mechanism
    assert w.std() > 0
    assert "auroc" in scorings[0]  # noise injected: detection quality is logged
  if mechanism == "static":
    assert any(r["phase"] == "proxy" for r in lines if r["kind"] == "train")
  if mechanism == "none":
    np.testing.assert_array_equal(w, 1.0)
  if mechanism == "joint":
    student_train = [r for r in lines if r["kind"] == "train" and r["phase"] == "student"]
    assert "teacher_loss" in student_train[-1]
    assert any(
      r["net"] == "teacher" for r in lines if r["kind"] == "eval" and r["phase"] == "student"
    )


def test_whole_set_options_leave_the_online_training_unchanged(tmp_path):
  # The trajectory's extra scoring passes and the whole-set scorer's own damping change
  # what weights.csv reports, never the online student's training.
  runs = {}
  for name, k, damping in (("plain", 0, None), ("trajectory", 2, None), ("damping", 0, 1e-3)):
    cfg = tiny(load_config("digits_noisy"), "online")
    cfg.kdaif.whole_set.trajectory, cfg.kdaif.whole_set.damping = k, damping
    trainer.train_and_evaluate(cfg, str(tmp_path / name))
    runs[name] = read_csv(tmp_path / name / "weights.csv")
  plain, traj, damped = runs["plain"], runs["trajectory"], runs["damping"]
  assert "trajectory_influence" in traj[0] and "trajectory_influence" not in plain[0]
  for a, b in zip(plain, traj):
    assert {c: a[c] for c in a} == {c: b[c] for c in a}  # every other column, to the digit
  for c in ("id", "weight", "influence"):
    assert [r[c] for r in plain] == [r[c] for r in damped], c
  for c in ("final_influence", "self_influence"):  # both from the whole-set scorer
    scores = [np.array([float(r[c]) for r in run]) for run in (plain, damped)]
    assert np.all(np.isfinite(scores[1])), c
    assert not np.allclose(*scores, rtol=1e-2), c


def _spy_memory_init(monkeypatch):
  """Records the teacher's scores and the memory the student phase starts from."""
  from kdaif_jax import loop, scoring

  seen = {}
  make, run_phase = scoring.make_teacher_scorer, loop.run_phase

  def make_spy(*args, **kwargs):
    score = make(*args, **kwargs)

    def spy(*a, **k):
      out = score(*a, **k)
      seen.setdefault("scores", []).append(np.array(out[0]))
      return out

    return spy

  def run_phase_spy(run, phase, state, **kwargs):
    if phase == "student":
      seen["memory"] = np.asarray(state.score_memory)
      seen["visits"] = np.asarray(state.score_visits)
    return run_phase(run, phase, state, **kwargs)

  monkeypatch.setattr(scoring, "make_teacher_scorer", make_spy)
  monkeypatch.setattr(loop, "run_phase", run_phase_spy)
  return seen


@pytest.mark.parametrize("mechanism", ["online", "joint"])
def test_memory_init_teacher_starts_the_memory_from_the_teacher(mechanism, tmp_path, monkeypatch):
  seen = _spy_memory_init(monkeypatch)
  cfg = tiny(load_config("digits_asym"), mechanism)  # its recipe starts from the teacher
  assert cfg.kdaif.memory_init == "teacher" and cfg.data.noise.kind == "asymmetric"
  cfg.checkpoint_every_steps = 5
  trainer.train_and_evaluate(cfg, str(tmp_path))
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  scorings = [r for r in lines if r["kind"] == "scoring"]
  assert [r["phase"] for r in scorings] == ["memory_init"]
  assert "auroc" in scorings[0] and scorings[0]["w_std"] > 0
  # The student starts from the teacher's scores / their std, every example visited once.
  (scores,) = seen["scores"]
  np.testing.assert_allclose(seen["memory"], scores / scores.std(), rtol=1e-6)
  np.testing.assert_array_equal(seen["visits"], 1.0)
  if mechanism == "joint":
    return
  # A resumed run takes its memory from the checkpoint: no second teacher pass.
  folder = tmp_path / "checkpoints" / "student"
  steps = sorted(int(n) for n in os.listdir(folder))
  for n in steps[1:]:
    shutil.rmtree(folder / str(n))
  (tmp_path / "summary.json").unlink()
  trainer.train_and_evaluate(cfg, str(tmp_path))
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  assert sum(r["kind"] == "scoring" and r["phase"] == "memory_init" for r in lines) == 1
  assert len(seen["scores"]) == 1


def test_memory_init_with_non_finite_teacher_scores(tmp_path, monkeypatch, kdaif_log):
  from kdaif_jax import scoring

  def nan_scorer(*args, **kwargs):
    def score(state, arrays, key):
      n = arrays["train_labels"].shape[0]
      info = influence.SolveInfo(
        np.int32(1), np.float32(np.nan), np.bool_(False), np.bool_(False), np.bool_(True)
      )
      return np.full((n,), np.nan, np.float32), info

    return score

  monkeypatch.setattr(scoring, "make_teacher_scorer", nan_scorer)
  cfg = tiny(load_config("digits_asym"), "online")
  summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert "memory_init: 256 of the teacher's scores are not finite" in kdaif_log.text
  w = np.array([float(r["weight"]) for r in read_csv(tmp_path / "weights.csv")])
  assert np.all(np.isfinite(w)) and w.std() > 0 and summary["student"]["test_accuracy"] > 0


def test_memory_init_teacher_is_refused_in_semi_supervised_runs():
  cfg = load_config("digits_ssl", None)
  cfg.kdaif.memory_init = "teacher"
  with pytest.raises(ValueError, match=r"config\.kdaif\.memory_init='teacher' .*allowed: none"):
    config_lib.validate(cfg)


def test_oracle_weighs_out_exactly_the_flipped_labels(tmp_path):
  cfg = tiny(load_config("digits_asym"), "oracle")
  summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  rows = read_csv(tmp_path / "weights.csv")
  noisy = np.array([r["noisy"] in ("1", "True", "true") for r in rows])
  w = np.array([float(r["weight"]) for r in rows])
  assert 0 < noisy.sum() < len(rows)
  np.testing.assert_array_equal(w[noisy], 0.0)
  np.testing.assert_allclose(w[~noisy], len(rows) / (~noisy).sum(), rtol=1e-5)  # CSV: 6 digits
  assert summary["mechanism"] == "oracle" and summary["student"]["test_accuracy"] > 0
  # The step sees the frozen weights: its logged batch weights are 0 or the clean weight.
  student = student_train_lines(tmp_path)
  assert all(r["w_min"] == 0.0 or r["w_min"] > 1.0 for r in student)
  from kdaif_jax import report

  report.write_report(str(tmp_path))
  text = (tmp_path / "report" / "report.md").read_text()
  assert "The oracle (`oracle`): weights from the known answer (the injected flips" in text
  assert "the oracle's weight (the flip mask itself)" in text  # its AUROC 1 is by construction


def test_semi_supervised_oracle_weighs_out_the_wrong_pseudo_labels(tmp_path):
  cfg = tiny(load_config("digits_ssl"), "oracle")
  cfg.report = True
  trainer.train_and_evaluate(cfg, str(tmp_path))
  # Each logged batch: its mean weight is the share of right pseudo-labels, which
  # the step also logs, independently, against the hidden labels.
  student = student_train_lines(tmp_path)
  assert student
  for r in student:
    np.testing.assert_allclose(r["w_mean"], r["pseudo_label_accuracy"], rtol=1e-6)
  # weights.csv keeps every unlabelled example's 0/1 weight of its last visit.
  w = np.array([float(r["weight"]) for r in read_csv(tmp_path / "weights.csv")])
  assert set(np.unique(w)) == {0.0, 1.0}
  text = (tmp_path / "report" / "report.md").read_text()
  assert "hidden labels of a semi-supervised run" in text


def test_oracle_survives_a_batch_of_only_flipped_labels(tmp_path):
  # Every weight of such a batch is 0: a step with zero loss, not 0/0 (a NaN stop).
  cfg = tiny(load_config("digits_noisy"), "oracle")
  cfg.data.noise.update(rate=0.9, kind="symmetric")
  # Batches of 2 at 90% noise: 81% of them hold only flipped labels. 48 examples
  # keep the run short (24 steps per epoch).
  cfg.batch_size, cfg.data.num_train, cfg.student.epochs = 2, 48, 1
  cfg.checkpoint_every_steps = 1000  # a save every 4 steps would be most of the time
  summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  student = student_train_lines(tmp_path)
  assert all(np.isfinite(r["loss"]) for r in student)
  assert any(r["w_max"] == 0.0 for r in student)  # the case happened
  assert summary["student"]["test_accuracy"] > 0
  cfg.data.noise.rate = 0.0
  with pytest.raises(
    ValueError, match=r"config\.kdaif\.mechanism='oracle' .*allowed: any but oracle"
  ):
    config_lib.validate(cfg)


def test_joint_teacher_every_k_resumes_mid_accumulation_and_reproduces(tmp_path, monkeypatch):
  # kdaif.joint.every = 2 keeps half-accumulated teacher gradients in the state;
  # a checkpoint at an odd step must restore them (optax.MultiSteps' state).
  cfg = tiny(load_config("digits_ssl"), "joint")
  cfg.kdaif.joint.every, cfg.checkpoint_every_steps = 2, 5
  # Influence averaged over the run (kdaif_jax.trajectory): the scores of epoch 1 are
  # saved in the workdir, so the resumed run's weights.csv has the same column.
  cfg.kdaif.whole_set.trajectory = 2
  first, second = tmp_path / "a", tmp_path / "b"
  saves, save = [], checkpoint.PhaseCheckpoints.save

  def spy(self, step, *a, **k):  # was epoch 1's file on disk when this checkpoint was taken?
    if os.path.basename(self.directory) == "student":
      saves.append((step, (first / trajectory.FOLDER / "epoch_0001.npy").exists()))
    return save(self, step, *a, **k)

  monkeypatch.setattr(checkpoint.PhaseCheckpoints, "save", spy)
  summary = trainer.train_and_evaluate(cfg, str(first))
  monkeypatch.undo()
  spe = summary["steps_this_invocation"]["student"] // cfg.student.epochs
  late = [ok for step, ok in saves if step > spe]
  assert late and all(late)  # every checkpoint inside epoch 1 comes after its scores
  assert summary["trajectory"]["epochs"] == [1, 2] and not summary["trajectory"]["missing"]
  rows = read_csv(first / "weights.csv")
  final = np.array([float(r["final_influence"]) for r in rows])
  epoch1 = np.load(first / trajectory.FOLDER / "epoch_0001.npy")
  assert epoch1.shape == final.shape and not np.allclose(epoch1 / epoch1.std(), final / final.std())
  np.testing.assert_allclose(  # weights.csv keeps 6 significant digits
    [float(r["trajectory_influence"]) for r in rows],
    (epoch1 / epoch1.std() + final / final.std()) / 2,
    rtol=1e-4,
    atol=1e-5,
  )
  shutil.copytree(first, second)
  folder = second / "checkpoints" / "student"
  steps = sorted(int(n) for n in os.listdir(folder))
  assert 5 in steps and steps[-1] > 5
  for n in steps:
    if n > 5:
      shutil.rmtree(folder / str(n))
  (second / "summary.json").unlink()
  resumed = trainer.train_and_evaluate(cfg, str(second))
  assert resumed["steps_this_invocation"]["student"] == steps[-1] - 5
  assert read_csv(first / "weights.csv") == read_csv(second / "weights.csv")
  evals = [
    [r for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "eval" and r["net"] == "teacher"]
    for d in (first, second)
  ]
  assert evals[0][-1]["loss"] == evals[1][-1]["loss"]


def test_workdir_of_another_experiment_is_refused(tmp_path):
  cfg = tiny(load_config("default"), "none")
  cfg.student.epochs = 1
  trainer.train_and_evaluate(cfg, str(tmp_path))
  cfg.kd.temperature = 2.0
  with pytest.raises(checkpoint.CheckpointMismatchError, match="kd.temperature"):
    trainer.train_and_evaluate(cfg, str(tmp_path))


@pytest.mark.parametrize(
  "option,value,match",
  [
    ("data.name", "imagenet", "data.name"),
    ("student.model", "resnet1000", "student.model"),
    ("kdaif.mechanism", "sometimes", "kdaif.mechanism"),
    ("kdaif.weights", "softmax", "kdaif.weights"),
    ("kdaif.solver", "newton", "kdaif.solver"),
    ("kdaif.damping", -0.1, "kdaif.damping"),
    ("kdaif.cg_iters", 0, "kdaif.cg_iters"),
    ("kdaif.score_memory", 1.0, "kdaif.score_memory"),  # β = 1 would never learn
    ("kdaif.joint.every", 0, "kdaif.joint.every"),
    ("kdaif.memory_init", "student", "kdaif.memory_init"),
    ("kdaif.matmul_precision", "tensorfloat32", "kdaif.matmul_precision"),
    ("kdaif.whole_set.trajectory", 1, "kdaif.whole_set.trajectory"),  # final_influence again
    ("kdaif.whole_set.trajectory", -1, "kdaif.whole_set.trajectory"),
    ("kdaif.whole_set.damping", -1e-3, "kdaif.whole_set.damping"),
    ("kd.alpha", 1.5, "kd.alpha"),
    ("kd.temperature", 0.0, "kd.temperature"),
    ("student.optimizer.lr", 0.0, "student.optimizer.lr"),
    ("data.noise.rate", 1.0, "data.noise.rate"),
  ],
)
def test_bad_config_names_the_option(option, value, match):
  cfg = load_config("default", None)
  node = cfg
  *parents, leaf = option.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=re.escape(match)) as e:
    config_lib.validate(cfg)
  assert "\n" not in str(e.value)
  assert "allowed" in str(e.value)


def test_zero_damping_is_refused_for_the_whole_network_only():
  # The whole network's batch curvature is singular (rank <= B·K << P); the
  # classifier layer's null space (softmax shifts) is orthogonal to g_V.
  cfg = load_config("default", None)
  cfg.kdaif.damping = 0.0
  config_lib.validate(cfg)  # scope=head, the default
  cfg.kdaif.scope = "all"
  with pytest.raises(ValueError, match=r"kdaif\.damping=0\.0 is invalid; allowed: a number > 0"):
    config_lib.validate(cfg)
  cfg.kdaif.solver = "identity"  # which ignores it
  config_lib.validate(cfg)
  cfg.kdaif.scope, cfg.kdaif.solver, cfg.kdaif.curvature = "head", "lissa", "hessian"
  with pytest.raises(ValueError, match=r"> 0 with solver=lissa on the \(indefinite\) hessian"):
    config_lib.validate(cfg)
  # The whole-set scorer's own damping, when set, is > 0 in every scope (its
  # self-influence factors C + λI); None follows kdaif.damping.
  cfg.kdaif.damping, cfg.kdaif.solver, cfg.kdaif.curvature = 0.1, "cg", "ggn"
  cfg.kdaif.whole_set.damping = 0.0
  with pytest.raises(
    ValueError, match=r"kdaif\.whole_set\.damping=0\.0 is invalid; allowed: a number > 0"
  ):
    config_lib.validate(cfg)
  cfg.kdaif.whole_set.damping = 1e-4
  config_lib.validate(cfg)


def test_non_finite_self_influence_is_named_in_the_log(tmp_path, kdaif_log):
  # kdaif.damping = 0 (allowed in the classifier layer) leaves C + λI singular for the
  # whole-set scorer's self-influence: the NaN column comes with a warning.
  cfg = tiny(load_config("digits_noisy"), "none")
  cfg.kdaif.damping = 0.0
  trainer.train_and_evaluate(cfg, str(tmp_path))
  rows = read_csv(tmp_path / "weights.csv")
  bad = sum(not np.isfinite(float(r["self_influence"])) for r in rows)
  assert bad > 0
  assert f"self_influence: {bad} of {len(rows)} values are not finite" in kdaif_log.text
  assert "kdaif.whole_set.damping > 0" in kdaif_log.text


def _run_main(args, workdir, **kw):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}", *args]
  return subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
  )


def test_cli_errors_are_one_line_before_any_compile(tmp_path):
  p = _run_main(["--config=configs/default.py", "--config.kdaif.mechanism=bogus"], tmp_path)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 2
  assert "Traceback" not in out
  assert re.search(r"^error: config\.kdaif\.mechanism='bogus' .*allowed: none, static", out, re.M)
  p = _run_main(
    ["--config=configs/cifar100_kd.py", f"--config.data.data_dir={tmp_path}/tfds"], tmp_path / "w"
  )
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 2 and "Traceback" not in out
  assert "tfds build cifar100" in out and "array_record" in out


def test_resume_after_sigkill(tmp_path):
  args = [
    "--config=configs/default.py:smoke",
    "--config.teacher.model=mlp",
    "--config.student.model=mlp",
    "--config.teacher.epochs=150",
    "--config.checkpoint_every_steps=20",
  ]
  p = _run_main(args, tmp_path)
  ckpt_dir = tmp_path / "checkpoints" / "teacher"
  deadline = time.time() + 300
  killed_after = None
  while time.time() < deadline and p.poll() is None:
    steps = (
      [int(n) for n in os.listdir(ckpt_dir)]
      if ckpt_dir.exists() and all(n.isdigit() for n in os.listdir(ckpt_dir))
      else []
    )
    if steps:
      killed_after = max(steps)
      p.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  p.communicate(timeout=60)
  assert killed_after is not None, "no checkpoint appeared before the run ended"
  assert not (tmp_path / "summary.json").exists()
  p = _run_main(args, tmp_path)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out[-3000:]
  m = re.search(r"teacher: resumed from checkpoint at step (\d+)", out)
  assert m and int(m.group(1)) >= killed_after
  assert json.loads((tmp_path / "summary.json").read_text())["mechanism"] == "online"
  teacher_steps = [
    r["step"]
    for r in read_jsonl(tmp_path / "metrics.jsonl")
    if r["kind"] == "train" and r["phase"] == "teacher"
  ]
  assert max(teacher_steps) == 150 * 8  # 256 examples / batch 32 = 8 steps per epoch


_MULTI = r"""
import json, sys
import jax
import numpy as np
sys.path.insert(0, {root!r})
from tests.test_trainer import load_config, tiny
from kdaif_jax import trainer
assert jax.device_count() == 8, jax.devices()
out = {{}}
for n in (1, 8):
  cfg = tiny(load_config("digits_noisy"), "online")
  cfg.num_devices = n
  cfg.augment.pad, cfg.augment.flip = 1, True  # views are drawn for the global batch
  cfg.kdaif.val_batch_size = 56
  wd = f"{tmp}/d{{n}}"
  s = trainer.train_and_evaluate(cfg, wd)
  lines = [json.loads(l) for l in open(wd + "/metrics.jsonl")]
  out[n] = {{"loss": [r["loss"] for r in lines if r["kind"] == "train"],
            "w_std": [r["w_std"] for r in lines if r["kind"] == "train" and "w_std" in r],
            "test_loss": s["student"]["test_loss"], "devices": s["device_count"]}}
cfg = tiny(load_config("default"))
cfg.batch_size = 36
try:
  trainer.train_and_evaluate(cfg, "{tmp}/bad")
  out["bad"] = None
except ValueError as e:
  out["bad"] = str(e)
print("RESULT" + json.dumps(out))
"""


def test_eight_devices_match_one(tmp_path, eight_cpu_env):
  code = _MULTI.format(root=ROOT, tmp=str(tmp_path))
  res = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=eight_cpu_env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.split("RESULT", 1)[1])
  one, eight = out["1"], out["8"]
  assert (one["devices"], eight["devices"]) == (1, 8)
  np.testing.assert_allclose(eight["loss"], one["loss"], rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(eight["w_std"], one["w_std"], rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(eight["test_loss"], one["test_loss"], rtol=2e-4)
  assert "batch_size=36" in out["bad"] and "device count (8)" in out["bad"]
