"""Two processes on one machine with JAX's distributed runtime equal one process.

Each process is started through ``main.py`` with one CPU device (loopback
coordinator on a free port, gloo collectives: JAX's default on CPU), so the
'data' mesh spans two devices of two processes. The run is killed (SIGKILL to
both) after its first student checkpoint and restarted in the same workdir; the
losses of every logged step (before and after the kill), the weights in
weights.csv and the final test accuracy must equal those of one process with the
same global batch, with the tolerances of tests/test_trainer.py's 8-device test.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kdaif_jax import config as config_lib
from kdaif_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
  "--config=configs/digits_noisy.py:smoke",
  "--config.teacher.model=mlp",
  "--config.student.model=mlp",
  "--config.kdaif.mechanism=online",
  "--config.augment.flip=True",  # views are drawn for the global batch
]
TIMEOUT = 400  # seconds per invocation: a hung collective fails the test


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
  env.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", **extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, args, env, log):
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}", *ARGS, *args]
  with open(log, "w") as out:  # the child keeps its own descriptor
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _start_pair(workdir, logs, use_env):
  """Both processes of a 2-process run; coordinator/count/id from env vars or flags.

  The restarted pair reads the first pair's compiled programs from a persistent
  compilation cache (seconds saved; the numbers do not depend on it).
  """
  address = f"127.0.0.1:{_free_port()}"
  common = dict(
    JAX_COORDINATOR_BIND_ADDRESS=address,  # loopback only, not every interface
    JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  procs = []
  for pid in (0, 1):
    if use_env:
      coordinator = dict(JAX_COORDINATOR_ADDRESS=address, JAX_PROCESS_ID=str(pid))
      env = _env(**coordinator, JAX_NUM_PROCESSES="2", **common)
      args = ["--config.multihost=True"]
    else:
      env = _env(**common)
      args = [
        "--config.multihost=True",
        f"--config.distributed.coordinator_address={address}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={pid}",
      ]
    procs.append(_start(workdir, args, env, logs[pid]))
  return procs


def _wait(procs, logs, deadline):
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, f"{log}:\n" + log.read_text()[-3000:]


def _complete_steps(folder):
  if not folder.is_dir():
    return []
  return [int(n) for n in os.listdir(folder) if n.isdigit() and (folder / n / "state").is_dir()]


def _results(workdir):
  """Last line of each (phase, step) of metrics.jsonl, weights.csv and summary.json."""
  train = {}
  with open(workdir / "metrics.jsonl") as f:
    for line in f:
      r = json.loads(line)
      if r["kind"] == "train":
        train[(r["phase"], r["step"])] = r
  keys = sorted(train)
  with open(workdir / "weights.csv") as f:
    rows = list(csv.DictReader(f))
  return {
    "steps": keys,
    "loss": [train[k]["loss"] for k in keys],
    "w_std": [train[k]["w_std"] for k in keys if "w_std" in train[k]],
    "ids": [r["id"] for r in rows],
    "weight": np.array([float(r["weight"]) for r in rows]),
    "summary": json.loads((workdir / "summary.json").read_text()),
  }


def test_two_processes_match_one_and_resume_after_sigkill(tmp_path):
  t0 = time.time()
  ref_log = tmp_path / "one.log"
  ref = _start(tmp_path / "one", [], _env(), ref_log)
  _wait([ref], [ref_log], time.time() + TIMEOUT)

  workdir = tmp_path / "two"
  logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
  procs = _start_pair(workdir, logs, use_env=True)
  ckpts = workdir / "checkpoints" / "student"
  deadline, killed_after = time.time() + TIMEOUT, None
  try:
    while time.time() < deadline and all(p.poll() is None for p in procs):
      steps = _complete_steps(ckpts)
      if steps:
        killed_after = max(steps)
        for p in procs:
          p.send_signal(signal.SIGKILL)
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None and killed_after is None:
        p.kill()
      p.wait()
  assert killed_after is not None, (
    "no student checkpoint before the run ended:\n" + (logs[0].read_text()[-3000:])
  )
  assert not (workdir / "summary.json").exists()
  # Teacher lines are written once: process 1 writes no metrics.
  first = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  teacher_steps = [r["step"] for r in first if r["kind"] == "train" and r["phase"] == "teacher"]
  assert teacher_steps == sorted(set(teacher_steps)) and teacher_steps[-1] == 8

  logs = [tmp_path / "p0_resumed.log", tmp_path / "p1_resumed.log"]
  _wait(_start_pair(workdir, logs, use_env=False), logs, time.time() + TIMEOUT)
  for pid, log in enumerate(logs):
    text = log.read_text()
    assert f"process {pid} of 2" in text
    m = re.search(r"student: resumed from checkpoint at step (\d+)", text)
    assert m and int(m.group(1)) >= killed_after, text[-3000:]

  one, two = _results(tmp_path / "one"), _results(workdir)
  s1, s2 = one["summary"], two["summary"]
  assert (s1["device_count"], s1["process_count"]) == (1, 1)
  assert (s2["device_count"], s2["process_count"]) == (2, 2)
  assert two["steps"] == one["steps"] and len(one["steps"]) == 4 + 8
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(two["w_std"], one["w_std"], rtol=2e-3, atol=1e-4)
  assert two["ids"] == one["ids"]
  np.testing.assert_allclose(two["weight"], one["weight"], rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(s2["student"]["test_loss"], s1["student"]["test_loss"], rtol=2e-4)
  for net in ("teacher", "student"):
    # A count over 359 test examples: at most one near-tie may flip with the sum order.
    assert abs(s2[net]["test_accuracy"] - s1[net]["test_accuracy"]) <= 1 / 359 + 1e-9, net
  print(f"test_multihost: {time.time() - t0:.0f}s")


def test_distributed_options_are_checked():
  cases = [
    ({"num_processes": 2}, False, "config.multihost=False"),
    ({"num_processes": -1}, True, "config.distributed.num_processes=-1"),
    ({"num_processes": 2, "process_id": 2}, True, "config.distributed.process_id=2"),
    ({"process_id": -2}, True, "config.distributed.process_id=-2"),
    ({"coordinator_address": "localhost"}, True, "config.distributed.coordinator_address"),
  ]
  for options, multihost, match in cases:
    cfg = config_lib.base_config()
    cfg.multihost = multihost
    cfg.distributed.update(options)
    with pytest.raises(ValueError, match=re.escape(match)) as e:
      config_lib.validate(cfg)
    assert "allowed" in str(e.value) and "\n" not in str(e.value)
  cfg = config_lib.base_config()
  cfg.multihost = True
  cfg.distributed.update(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
  config_lib.validate(cfg)
  # How the processes find each other is no part of the experiment: resuming may change it.
  assert "distributed" not in trainer._fingerprint(cfg)
  assert "multihost" not in trainer._fingerprint(cfg)
