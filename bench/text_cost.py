"""Cost of the GLUE text path on this machine: tokens per second.

``.venv/bin/python bench/text_cost.py [--quick]`` -> bench/results/text_cost.json

What is timed (median of the timed calls after one untimed run, jitted,
``axis_name=None``; ``bench/step_cost.py``'s ``measure``):
  teacher_forward   bert_minilm (all-MiniLM-L6-v2's shape, 22.7M) inference logits
  student_forward   each student (bert_minilm_l2 / _l1) inference logits
  teacher_step      one fine-tuning step of the teacher (cross-entropy, AdamW)
  plain_kd          one plain KD student step (``kdaif.mechanism=none``)
  online            one KD-AIF ``online`` step with the configs/glue.py defaults
                    (influence in the classifier layer, GGN, CG 5 warm-started,
                    validation batch 64, refreshed every step)
on a batch of 32 sequences padded to 64 tokens (a length bucket; sst2/mrpc
sentences fit in it). Tokens per second count padded tokens (B x L per call).
The weights are random (the cost does not depend on them).
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import _common
import jax
import jax.numpy as jnp
import numpy as np
import step_cost

from kdaif_jax import config as config_lib
from kdaif_jax import models, optim
from kdaif_jax import step as step_lib

BATCH, LENGTH, VAL_BATCH = 32, 64, 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def glue_config(mechanism: str):
  """configs/glue.py:sst2 with ``kdaif.mechanism`` set."""
  spec = importlib.util.spec_from_file_location(
    "glue_cfg", os.path.join(ROOT, "configs", "glue.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("sst2")
  cfg.kdaif.mechanism = mechanism
  return cfg


def tokens(rng: np.random.Generator, n: int) -> jnp.ndarray:
  """[n, 3, LENGTH] random token batches with 50-100% real tokens."""
  x = np.zeros((n, 3, LENGTH), np.int32)
  for i, m in enumerate(rng.integers(LENGTH // 2, LENGTH + 1, n)):
    x[i, 0, :m] = rng.integers(1000, 30_000, m)
    x[i, 2, :m] = 1
  return jnp.asarray(x)


def build(student, teacher, tx, seed: int = 0):
  """A TrainState and one (batch, val) pair of random token batches (2 classes)."""
  k_s, k_t, k_run = jax.random.split(jax.random.key(seed), 3)
  sample = jnp.zeros((1, 3, LENGTH), jnp.int32)
  s_params, s_ms = jax.jit(student.init)(k_s, sample)
  t_params, t_ms = jax.jit(teacher.init)(k_t, sample)
  state = step_lib.new_train_state(
    key=jax.random.key_data(k_run),
    student=step_lib.NetState(s_params, s_ms, tx.init(s_params)),
    teacher=step_lib.NetState(t_params, t_ms, tx.init(t_params)),
    num_examples=BATCH,
  )
  rng = np.random.default_rng(seed)
  batch = {
    "images": tokens(rng, BATCH),
    "labels": jnp.asarray(rng.integers(0, 2, BATCH), jnp.int32),
    "noisy": jnp.zeros((BATCH,), bool),
    "weights": jnp.ones((BATCH,), jnp.float32),
  }
  val = {"images": tokens(rng, VAL_BATCH), "labels": jnp.asarray(rng.integers(0, 2, VAL_BATCH))}
  return state, batch, val


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="one student, 3 repeats")
  args = ap.parse_args()
  repeats = 3 if args.quick else 5
  teacher = models.create("bert_minilm", 2)
  students = ["bert_minilm_l2"] if args.quick else ["bert_minilm_l2", "bert_minilm_l1"]
  out = {"environment": _common.environment(), "batch": BATCH, "length": LENGTH, "pairs": {}}
  ident = lambda x: x
  for name in students:
    student = models.create(name, 2)
    cfg = glue_config("online")
    tx = optim.make_optimizer(cfg.student.optimizer, steps_per_epoch=1000, epochs=3)
    state, batch, val = build(student, teacher, tx)
    print(f"\n{name} <- bert_minilm, batch {BATCH} x {LENGTH} tokens, val batch {VAL_BATCH}")
    res = {}
    for net, model in (("teacher_forward", teacher), ("student_forward", student)):
      st = state.teacher if net.startswith("teacher") else state.student
      fn = lambda p, ms, x, model=model: model.apply(p, ms, x, False)[0]
      res[net] = step_cost.measure(fn, (st.params, st.model_state, batch["images"]), repeats, net)
    if name == students[0]:  # the teacher's fine-tuning step does not depend on the student
      fn = step_lib.make_supervised_step(teacher, tx, ident, axis_name=None)
      res["teacher_step"] = step_cost.measure(fn, (state, batch), repeats, "teacher_step")
    for label, mech in (("plain_kd", "none"), ("online", "online")):
      opts = config_lib.step_options(glue_config(mech))
      fn = step_lib.make_kd_step(student, teacher, tx, None, ident, opts, axis_name=None)
      res[label] = step_cost.measure(fn, (state, batch, val), repeats, label)
    for r in res.values():
      r["tokens_per_s"] = round(BATCH * LENGTH / (r["median_ms"] / 1e3), 1)
    ratio = res["online"]["median_ms"] / res["plain_kd"]["median_ms"]
    flops = (res["online"]["flops"] or 0) / (res["plain_kd"]["flops"] or float("nan"))
    res["online_over_plain"] = {"time": round(ratio, 3), "flops": round(flops, 3)}
    print(
      "  tokens/s: "
      + ", ".join(f"{k} {v['tokens_per_s']:.0f}" for k, v in res.items() if "tokens_per_s" in v)
    )
    print(f"  online / plain KD: {ratio:.2f}x time, {flops:.2f}x FLOPs")
    out["pairs"][name] = res
  path = _common.write_json(_common.RESULTS_DIR / "text_cost.json", out)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
