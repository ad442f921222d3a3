"""Failure behaviour of training runs (README "Failure behaviour").

Each section reproduces one item of the reliability issue's training-runs half:
the input that used to run on silently (or end in a traceback) and what happens
now. 1 divergence and collapse, 2 one run per workdir, 3 config variants,
4 corrupt checkpoints, 5 step rates of a resumed run, 6 one-line CLI errors.

The end-to-end cases run ``main.py`` in subprocesses on ``configs/default.py:smoke``;
one finished smoke workdir (module fixture) is copied for the corruption cases.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import logging
import math
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdaif_jax import checkpoint, divergence, results, trainer
from kdaif_jax import config as config_lib
from kdaif_jax import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/default.py:smoke"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _popen(args, workdir=None):
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), *args]
  if workdir is not None:
    cmd.append(f"--workdir={workdir}")
  return subprocess.Popen(
    cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def run_main(args, workdir=None, timeout=600):
  """Runs main.py; returns (exit status, stdout and stderr together)."""
  p = _popen(args, workdir)
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def error_lines(out):
  return [ln for ln in out.splitlines() if ln.startswith("error:")]


def assert_one_line_error(rc, out, pattern, code=2):
  """Exit status ``code``, no traceback, exactly one ``error:`` line matching ``pattern``."""
  assert rc == code, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  lines = error_lines(out)
  assert len(lines) == 1, out[-3000:]
  assert re.search(pattern, lines[0]), lines[0]
  return lines[0]


def load_config(name, arg="smoke"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def step_dirs(folder):
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def checkpoint_arrays(folder, step):
  """Every array of a checkpointed state, as numpy (no target structure needed)."""
  path = os.path.join(folder, str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return jax.tree.leaves(ckptr.restore(path, restore_args=args))


def largest_file(folder):
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """A finished ``configs/default.py:smoke`` run: (workdir, its output)."""
  wd = tmp_path_factory.mktemp("smoke") / "run"
  rc, out = run_main([SMOKE], wd)
  assert rc == 0, out[-3000:]
  return wd, out


# --------------------------------------------------------------------------
# 1. Divergence stops the run; collapse is warned about
# --------------------------------------------------------------------------


def test_divergence_stops_at_once_and_keeps_the_last_finite_checkpoint(tmp_path):
  # lr 100 without clipping: the teacher's loss is NaN from step 5 (a step that is
  # neither logged nor checkpointed: found by the per-step guard). It used to run
  # every step, save NaN checkpoints over the good ones and exit 0.
  wd = tmp_path / "w"
  rc, out = run_main(
    [
      SMOKE,
      "--config.teacher.optimizer.lr=100",
      "--config.teacher.optimizer.clip_norm=0",
      "--config.teacher.epochs=3",
    ],
    wd,
  )
  line = assert_one_line_error(
    rc,
    out,
    r"^error: training diverged: teacher step \d+ loss=nan \(checkpoint at step \d+ kept\); "
    r"lower the learning rate \(config\.teacher\.optimizer\.lr=100\) or enable clipping",
    code=3,
  )
  bad, kept = map(int, re.search(r"step (\d+) loss.*step (\d+) kept", line).groups())
  assert kept < bad < 24  # stopped at once, not after all 24 steps
  folder = wd / "checkpoints" / "teacher"
  assert step_dirs(folder) == [kept]  # no NaN checkpoint was written, the finite one stays
  for leaf in checkpoint_arrays(folder, kept):
    if np.issubdtype(leaf.dtype, np.floating):
      assert np.isfinite(leaf).all()
  nan_steps = [
    r["step"]
    for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())
    if r["kind"] == "train" and r["loss"] == "nan"
  ]
  assert nan_steps == [bad]  # the diverged step's metrics are logged, nothing after it
  assert not (wd / "summary.json").exists()
  assert not (wd / checkpoint.LOCK_FILE).exists()  # released on error too


@pytest.mark.parametrize(
  "values,expected",
  [
    ({"loss": 1.0, "accuracy": float("nan")}, None),  # only watched keys count
    ({"loss": float("nan")}, "loss=nan"),
    ({"loss": 1.0, "w_mean": float("inf")}, "w_mean=inf"),
    ({"loss": 1.0, "influence_std": float("nan"), "cg_residual": 0.1}, "influence_std=nan"),
    ({"loss": 1.0, "cg_residual": float("nan")}, "cg_residual=nan"),
    ({"loss": 1.0, "teacher_loss": float("-inf")}, "teacher_loss=-inf"),
    ({"loss": 1.0, "diverged": 0.0, "cg_diverged": 0.0}, None),
    ({"loss": 1.0, "cg_diverged": 1.0}, "cg_diverged=True"),  # a LiSSA blow-up flag
    ({"loss": 1.0, "diverged": True}, "diverged=True"),
  ],
)
def test_divergence_guard_watches_loss_influence_weights_and_diverged_flags(values, expected):
  assert divergence.divergence(values) == expected


@pytest.mark.parametrize(
  "solver,curvature,hint",
  [
    ("lissa", "ggn", "raise config.kdaif.lissa_scale (10) or use kdaif.solver=cg"),
    ("cg", "hessian", "raise config.kdaif.damping (0.1) or use kdaif.curvature=ggn"),
    ("cg", "ggn", "raise config.kdaif.damping (0.1)"),
  ],
)
def test_a_diverged_solve_names_the_option_of_its_solver(solver, curvature, hint):
  cfg = load_config("default")
  cfg.kdaif.solver, cfg.kdaif.curvature = solver, curvature

  class _NoCheckpoint:
    def wait(self):
      pass

    def latest_step(self):
      return None

  err = divergence.diverged_error(cfg, "student", 7, "solve_diverged=True", _NoCheckpoint())
  assert str(err).endswith(hint), str(err)


def test_collapse_is_warned_in_the_log_the_summary_and_the_report(tmp_path):
  # lr 10 WITH clipping runs to the end at 10% accuracy (one class for everything):
  # finite, so no divergence, but the run must not read like a result.
  wd = tmp_path / "w"
  rc, out = run_main(
    [SMOKE, "--config.teacher.optimizer.lr=10", "--config.student.optimizer.lr=10"], wd
  )
  assert rc == 0, out[-3000:]
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["teacher"]["test_accuracy"] < 0.12
  warnings = summary["warnings"]
  assert any(w.startswith("teacher test accuracy") and "chance" in w for w in warnings), warnings
  for w in warnings:
    assert f"warning: {w}" in out
  # The report shows them (a folder with only summary.json: the rest is "missing").
  from kdaif_jax import report

  only = tmp_path / "only_summary"
  only.mkdir()
  shutil.copy(wd / "summary.json", only / "summary.json")
  rep = report.write_report(str(only))
  md = pathlib.Path(rep["report_md"]).read_text()
  for w in warnings:
    assert f"**Warning:** {w}" in md
  assert rep["numbers"]["warnings"] == warnings
  assert any(m["file"] == "workdir/metrics.jsonl" for m in rep["missing"])


def test_loss_rise_warning(tmp_path):
  path = tmp_path / "metrics.jsonl"

  def write(losses):
    with open(path, "w") as f:
      for step, loss in enumerate(losses, 1):
        f.write(json.dumps({"kind": "train", "phase": "student", "step": step, "loss": loss}))
        f.write("\n")
      f.write("not json (a truncated last line)\n")

  write([2.3, 1.5, 0.9, 0.7])
  assert results.loss_rise_warnings(str(path)) == []
  write([2.3, 4.0, 9.0, 12.5])
  (w,) = results.loss_rise_warnings(str(path))
  assert w.startswith("student training loss rose from 2.3 (step 1) to 12.5 (step 4)")
  assert results.loss_rise_warnings(str(tmp_path / "absent.jsonl")) == []


# --------------------------------------------------------------------------
# 2. One run per workdir; the experiment checked before the first step
# --------------------------------------------------------------------------


def test_second_run_in_a_held_workdir_is_refused_naming_the_holder(tmp_path):
  with checkpoint.WorkdirLock(str(tmp_path)) as lock:
    holder = json.loads(pathlib.Path(lock.path).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(checkpoint.WorkdirLockedError, match=f"in use by PID {os.getpid()}"):
      checkpoint.WorkdirLock(str(tmp_path)).acquire()  # another open file: refused too
    rc, out = run_main([SMOKE], tmp_path)
    assert_one_line_error(
      rc, out, rf"^error: --workdir={re.escape(str(tmp_path))} is in use by PID {os.getpid()} "
    )
    assert not (tmp_path / "experiment.json").exists()  # refused before writing anything
  assert not (tmp_path / checkpoint.LOCK_FILE).exists()  # released


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_log_line(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / checkpoint.LOCK_FILE).write_text(
    json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"})
  )
  with caplog.at_level(logging.INFO, logger="kdaif_jax"):
    lock = checkpoint.WorkdirLock(str(tmp_path)).acquire()
  assert f"took over the stale lock of PID {dead.pid}" in caplog.text
  assert json.loads((tmp_path / checkpoint.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / checkpoint.LOCK_FILE).exists()


def test_experiment_is_checked_before_the_first_step_without_checkpoints(tmp_path):
  # A run of `online` left its fingerprint and no checkpoint yet (killed early, or
  # still running before the lock existed); a `none` run used to start anyway.
  checkpoint.check_experiment(str(tmp_path), trainer._fingerprint(load_config("default")))
  rc, out = run_main([SMOKE, "--config.kdaif.mechanism=none"], tmp_path)
  assert_one_line_error(
    rc, out, r"holds a different experiment \(kdaif\.mechanism: 'online' -> 'none'\)"
  )
  assert not (tmp_path / "config.json").exists()
  assert not (tmp_path / "metrics.jsonl").exists()


def test_a_run_refused_for_its_data_or_teacher_init_does_not_claim_the_workdir(tmp_path):
  # Refused in validate(), before any data loads (it used to fail 20 s in).
  rc, out = run_main([SMOKE, f"--config.teacher.init={tmp_path / 'absent'}"], tmp_path)
  assert_one_line_error(rc, out, r"^error: config\.teacher\.init=.*no checkpoint folder found")
  # Refused once the data is known: the corrected command must not meet a recorded
  # fingerprint of the refused one ("holds a different experiment").
  rc, out = run_main([SMOKE, "--config.batch_size=100000"], tmp_path)
  assert_one_line_error(rc, out, r"^error: config\.batch_size=100000 exceeds the \d+ training")
  assert not (tmp_path / "experiment.json").exists()


def test_a_workdir_older_than_an_added_option_still_resumes(tmp_path):
  # experiment.json written before kdaif.matmul_precision and kdaif.whole_set's
  # trajectory and damping existed: the same experiment.
  fingerprint = trainer._fingerprint(load_config("default"))
  old = json.loads(json.dumps(fingerprint))
  del old["kdaif"]["matmul_precision"], old["kdaif"]["whole_set"]["trajectory"]
  del old["kdaif"]["whole_set"]["damping"]
  (tmp_path / checkpoint.EXPERIMENT_FILE).write_text(json.dumps(old))
  checkpoint.check_experiment(str(tmp_path), fingerprint)
  fingerprint["kdaif"]["matmul_precision"] = "default"
  with pytest.raises(checkpoint.CheckpointMismatchError, match="'highest' -> 'default'"):
    checkpoint.check_experiment(str(tmp_path), fingerprint)
  fingerprint["kdaif"]["matmul_precision"] = "highest"
  fingerprint["kdaif"]["whole_set"]["trajectory"] = 10
  with pytest.raises(checkpoint.CheckpointMismatchError, match="trajectory: 0 -> 10"):
    checkpoint.check_experiment(str(tmp_path), fingerprint)
  fingerprint["kdaif"]["whole_set"]["trajectory"] = 0
  fingerprint["kdaif"]["whole_set"]["damping"] = 1e-3
  with pytest.raises(checkpoint.CheckpointMismatchError, match="damping: None -> 0.001"):
    checkpoint.check_experiment(str(tmp_path), fingerprint)


# --------------------------------------------------------------------------
# 3. Config variants
# --------------------------------------------------------------------------

CONFIG_FILES = sorted(
  os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
)


@pytest.mark.parametrize("name", [n for n in CONFIG_FILES if n != "glue"])
def test_every_config_rejects_an_unknown_variant(name):
  with pytest.raises(ValueError, match=r"unknown config variant 'smok'; allowed: smoke") as e:
    load_config(name, "smok")
  assert "\n" not in str(e.value)
  full, smoke = load_config(name, None), load_config(name, "smoke")
  assert full.student.epochs > smoke.student.epochs  # both variants still load
  # --config.data.data_dir=DIR must override on the smoke variant too (its type is
  # what ml_collections' flag parser reads; a None without it is refused)
  assert smoke.data.get_type("data_dir") is str
  assert load_config(name, "").to_dict() == full.to_dict()


def test_glue_config_needs_a_task_and_names_them_all():
  # configs/glue.py has no full experiment without a task: no "(or none ...)" hint.
  with pytest.raises(ValueError, match=r"unknown config variant 'smok'; allowed: cola, sst2,") as e:
    load_config("glue", "smok")
  assert "\n" not in str(e.value) and "or none" not in str(e.value)
  assert "sst2_smoke" in str(e.value)
  with pytest.raises(ValueError, match=r"needs a task, e.g. :sst2"):
    load_config("glue", None)
  full, smoke = load_config("glue", "sst2"), load_config("glue", "sst2_smoke")
  assert full.student.epochs >= smoke.student.epochs and full.data.name == "glue/sst2"
  assert smoke.data.get_type("data_dir") is str  # --config.data.data_dir overrides


def test_variant_helper():
  assert config_lib.variant(None) is None and config_lib.variant("") is None
  assert config_lib.variant("big", allowed=("smoke", "big")) == "big"
  with pytest.raises(ValueError, match="allowed: smoke, big"):
    config_lib.variant("huge", allowed=("smoke", "big"))
  with pytest.raises(ValueError, match=r"this config needs a variant; allowed: a, b$"):
    config_lib.variant(None, allowed=("a", "b"), required=True)


# --------------------------------------------------------------------------
# 4. Corrupt checkpoints fall back to the newest good step
# --------------------------------------------------------------------------


def _small_state(scale=1.0):
  rng = np.random.default_rng(0)
  return {
    "w": jnp.asarray(rng.normal(size=(50, 40)) * scale, jnp.float32),
    "b": jnp.ones((7,), jnp.float32),
    "step": jnp.int32(3),
  }


def _saved(tmp_path, states):
  ck = checkpoint.PhaseCheckpoints(str(tmp_path), "student")
  for step, st in states.items():
    ck.save(step, st, {"elapsed": float(step), "checksum": checkpoint.state_digest(st)[1]})
  ck.close()
  return str(tmp_path / "checkpoints" / "student")


def _truncate(step_dir):
  big = largest_file(step_dir)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


def _garbage_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write("garbage")


def _random_bytes(step_dir):
  big = largest_file(step_dir)
  with open(big, "r+b") as f:
    f.seek(os.path.getsize(big) // 2)
    f.write(np.random.default_rng(7).bytes(16))


def _wrong_checksum(step_dir):
  (path,) = glob.glob(os.path.join(step_dir, "record", "*metadata*"))
  record = json.loads(pathlib.Path(path).read_text())
  record["checksum"] = "u32x2:" + "0" * 32
  with open(path, "w") as f:
    json.dump(record, f)


def _unsealed(corrupt):
  """A step without its file seal (older versions; a run killed right after the save)."""

  def damage(step_dir):
    os.remove(os.path.join(step_dir, checkpoint.SEAL_FILE))
    corrupt(step_dir)

  damage.__name__ = f"unsealed{corrupt.__name__}"
  return damage


@pytest.mark.parametrize(
  "corrupt,reason",
  [
    # The seal catches damaged files before Orbax reads any of them.
    (_truncate, r"unreadable: state/\S+ has \d+ bytes, saved with \d+"),
    (_garbage_metadata, r"unreadable: state/_METADATA has 7 bytes"),
    (_random_bytes, r"unreadable: state/\S+ changed on disk since it was saved"),
    (_wrong_checksum, r"unreadable: record/\S+ (changed on disk|has \d+ bytes)"),
    # Without a seal, Orbax's errors and the state checksum still catch them.
    (_unsealed(_garbage_metadata), r"unreadable: JSONDecodeError"),
    (_unsealed(_random_bytes), r"unreadable|checksum mismatch|non-finite"),
    (_unsealed(_wrong_checksum), r"checksum mismatch"),
  ],
)
def test_restore_falls_back_to_the_newest_good_step(tmp_path, caplog, corrupt, reason):
  good, newest = _small_state(4.0), _small_state(8.0)
  folder = _saved(tmp_path, {4: good, 8: newest})
  corrupt(os.path.join(folder, "8"))
  ck = checkpoint.PhaseCheckpoints(str(tmp_path), "student")
  with caplog.at_level(logging.WARNING, logger="kdaif_jax"):
    state, record, step = ck.restore_newest_valid(_small_state(), "student")
  assert step == 4 and record["elapsed"] == 4.0
  np.testing.assert_array_equal(state["w"], good["w"])
  (line,) = [r.getMessage() for r in caplog.records]
  assert re.search(rf"student: checkpoint at step 8 skipped \(({reason})", line), line
  assert "resuming from step 4" in line and "8.corrupt" in line
  assert sorted(os.listdir(folder)) == ["4", "8.corrupt"]  # kept aside for inspection
  ck.save(8, newest, {"checksum": checkpoint.state_digest(newest)[1]})  # step 8 reusable
  ck.close()
  assert step_dirs(folder) == [4, 8]


def test_non_finite_checkpoint_is_skipped_and_no_good_step_is_one_line_error(tmp_path):
  nan = {**_small_state(), "w": jnp.full((50, 40), jnp.nan, jnp.float32)}
  folder = _saved(tmp_path, {4: _small_state(), 8: nan})
  ck = checkpoint.PhaseCheckpoints(str(tmp_path), "student")
  assert ck.restore_newest_valid(_small_state())[2] == 4  # (written by an older version)
  ck.close()
  _garbage_metadata(os.path.join(folder, "4"))
  ck = checkpoint.PhaseCheckpoints(str(tmp_path), "student")
  with pytest.raises(checkpoint.CheckpointCorruptError) as e:
    ck.restore_newest_valid(_small_state())
  msg = str(e.value)
  assert "\n" not in msg and f"no checkpoint in {folder} could be restored" in msg
  assert "step 4: unreadable: state/_METADATA has 7 bytes" in msg
  empty = checkpoint.PhaseCheckpoints(str(tmp_path / "empty"), "student")
  assert empty.restore_newest_valid(_small_state()) is None


def test_teacher_init_reader_skips_a_non_finite_checkpoint(tmp_path):
  # ``config.teacher.init`` and the report read one network without the trainer's state.
  net = lambda v: {"teacher": {"params": {"w": jnp.full((3, 2), v, jnp.float32)}}}
  folder = _saved(tmp_path, {4: net(1.0), 8: net(jnp.nan)})
  params, _, step = checkpoint.restore_net_arrays(folder, "teacher")
  assert step == 4 and np.all(params["w"] == 1.0)


def test_teacher_init_takes_a_relative_path(tmp_path, monkeypatch):
  # Orbax refuses relative paths; --config.teacher.init=workdirs/x is how users write it.
  net = {"teacher": {"params": {"w": jnp.full((3, 2), 2.0, jnp.float32)}}}
  folder = _saved(tmp_path / "run", {4: net})
  monkeypatch.chdir(tmp_path)
  like = step_lib.NetState({"w": jnp.zeros((3, 2))}, {}, ())
  params, _ = checkpoint.load_net(os.path.relpath(folder, tmp_path), "teacher", like)
  assert np.all(params["w"] == 2.0)


def test_state_digest_is_exact_and_sees_every_bit():
  st = _small_state()
  finite, digest = checkpoint.state_digest(st)
  assert finite and digest == checkpoint.state_digest(_small_state())[1]
  w = np.asarray(st["w"]).copy()
  w[10, 3] = np.nextafter(w[10, 3], np.float32(np.inf))  # one ulp
  assert checkpoint.state_digest({**st, "w": jnp.asarray(w)})[1] != digest
  swapped = np.asarray(st["w"]).copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
  assert checkpoint.state_digest({**st, "w": jnp.asarray(swapped)})[1] != digest
  assert not checkpoint.state_digest({**st, "b": jnp.full((7,), jnp.inf)})[0]


def test_truncated_newest_student_step_resumes_from_the_previous_and_reproduces(
  smoke_run, tmp_path
):
  # Used to die with a ~150-line OUT_OF_RANGE traceback although step 12 was intact.
  src, _ = smoke_run
  wd = tmp_path / "copy"
  shutil.copytree(src, wd)
  folder = wd / "checkpoints" / "student"
  assert step_dirs(folder) == [12, 16]
  _truncate(str(folder / "16"))
  # And a lock left by a killed run (its process no longer exists).
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (wd / checkpoint.LOCK_FILE).write_text(
    json.dumps({"pid": dead.pid, "host": socket.gethostname()})
  )
  rc, out = run_main([SMOKE], wd)
  assert rc == 0, out[-3000:]
  assert f"took over the stale lock of PID {dead.pid}" in out
  assert re.search(r"student: checkpoint at step 16 skipped \(unreadable: ", out)
  assert "student: resumed from checkpoint at step 12" in out
  assert "Traceback" not in out, out[-5000:]
  resumed, original = ((d / "weights.csv").read_text().splitlines() for d in (wd, src))
  diff = [(a, b) for a, b in zip(resumed, original) if a != b]
  assert not diff and len(resumed) == len(original), f"{len(diff)} rows differ: {diff[:3]}"
  # 5. The teacher ran no step in this invocation: no 0.0 rate for it.
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["steps_this_invocation"] == {"teacher": 0, "student": 4}
  assert set(summary["steps_per_second"]) == {"student"}
  assert summary["steps_per_second"]["student"] > 0
  assert not (wd / checkpoint.LOCK_FILE).exists()


def test_no_restorable_step_is_a_one_line_error_naming_the_folder(smoke_run, tmp_path):
  src, _ = smoke_run
  wd = tmp_path / "copy"
  shutil.copytree(src, wd)
  folder = wd / "checkpoints" / "teacher"
  for step in step_dirs(folder):
    _garbage_metadata(str(folder / str(step)))
  rc, out = run_main([SMOKE], wd)
  assert_one_line_error(
    rc, out, rf"^error: no checkpoint in {re.escape(str(folder))} could be restored \(step 8: "
  )


# --------------------------------------------------------------------------
# 5. A fresh run's rates and records
# --------------------------------------------------------------------------


def test_finished_run_records_rates_checksums_and_releases_its_lock(smoke_run):
  wd, out = smoke_run
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["steps_this_invocation"] == {"teacher": 8, "student": 16}
  assert all(v > 0 for v in summary["steps_per_second"].values())
  assert isinstance(summary["warnings"], list)
  assert not (wd / checkpoint.LOCK_FILE).exists()
  for phase in ("teacher", "student"):
    for step in step_dirs(wd / "checkpoints" / phase):
      (path,) = glob.glob(str(wd / "checkpoints" / phase / str(step) / "record" / "*metadata*"))
      assert json.loads(pathlib.Path(path).read_text())["checksum"].startswith("u32x2:")
      # Every kept step is sealed: each of its files' size and sha256.
      step_dir = wd / "checkpoints" / phase / str(step)
      seal = json.loads((step_dir / checkpoint.SEAL_FILE).read_text())
      files = {
        str(p.relative_to(step_dir))
        for p in step_dir.rglob("*")
        if p.is_file() and p.name != checkpoint.SEAL_FILE
      }
      assert set(seal) == files and files
  with open(wd / "weights.csv") as f:
    assert all(math.isfinite(float(r["weight"])) for r in csv.DictReader(f))


# --------------------------------------------------------------------------
# 6. Command-line errors: one line naming the option
# --------------------------------------------------------------------------


def _cli_cases(tmp):
  bad_py = os.path.join(tmp, "bad_syntax.py")
  with open(bad_py, "w") as f:
    f.write("def get_config(arg=None):\n  return {'a': 1\n")
  a_file = os.path.join(tmp, "a_file")
  open(a_file, "w").close()
  if os.geteuid() == 0:
    unwritable = "/proc"  # root writes everywhere else; /proc takes no new files
  else:
    unwritable = os.path.join(tmp, "read_only")
    os.makedirs(unwritable)
    os.chmod(unwritable, 0o555)
  wd = os.path.join(tmp, "w")
  return {
    "misspelt_key": (
      [SMOKE, "--config.kdaif.mechansim=none", f"--workdir={wd}"],
      r"^error: --config\.kdaif\.mechansim: no such option in configs/default\.py; "
      r"Did you mean \"mechanism\"",
    ),
    "missing_file": (
      ["--config=configs/defualt.py", f"--workdir={wd}"],
      r"^error: --config=configs/defualt\.py: no such file$",
    ),
    "syntax_error": (
      [f"--config={bad_py}", f"--workdir={wd}"],
      rf"^error: --config={re.escape(bad_py)}: SyntaxError in {re.escape(bad_py)}, line \d",
    ),
    "bad_variant": (
      ["--config=configs/default.py:smok", f"--workdir={wd}"],
      r"^error: --config=configs/default\.py:smok: unknown config variant 'smok'; "
      r"allowed: smoke",
    ),
    "workdir_is_a_file": (
      [SMOKE, f"--workdir={a_file}"],
      rf"^error: --workdir={re.escape(a_file)} is a file, not a folder",
    ),
    "empty_workdir": ([SMOKE, "--workdir="], r"^error: --workdir is empty"),
    "unwritable_workdir": (
      [SMOKE, f"--workdir={unwritable}"],
      rf"^error: --workdir={re.escape(unwritable)}(: cannot create it| is not writable) \(",
    ),
  }


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory):
  """Every CLI case run at once (each process is mostly imports): {name: (rc, out, pattern)}."""
  tmp = str(tmp_path_factory.mktemp("cli"))
  cases = _cli_cases(tmp)
  procs = {name: _popen(args) for name, (args, _) in cases.items()}
  out = {}
  for name, p in procs.items():
    text, _ = p.communicate(timeout=300)
    out[name] = (p.returncode, text, cases[name][1])
  return out


@pytest.mark.parametrize(
  "case",
  [
    "misspelt_key",
    "missing_file",
    "syntax_error",
    "bad_variant",
    "workdir_is_a_file",
    "empty_workdir",
    "unwritable_workdir",
  ],
)
def test_cli_errors_are_one_line_naming_the_option(cli_errors, case):
  rc, out, pattern = cli_errors[case]
  assert_one_line_error(rc, out, pattern)
