"""The SAFE report's Sustainability section: size, FLOPs, wall time, influence share.

FLOPs are XLA's cost analysis of one compiled inference forward of one example (a dot or
convolution counts 2 per multiply-add, an elementwise op 1 per element); the input shape
and class count come from ``kdaif_jax.data`` (config.json's ``data`` section).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax import data, models
from kdaif_jax.report.render import fmt, num, pct, si, thousands
from kdaif_jax.report.workdir import Context


def forward_flops(model, input_shape) -> float | None:
  """FLOPs XLA counts for one inference forward pass (its compiled cost analysis).

  Args:
    model: a ``kdaif_jax.models.Model`` (applied with ``train=False``) or a Flax
      linen module (``module.apply(variables, x)``). Only shapes are initialised
      (``jax.eval_shape``); nothing is computed.
    input_shape: the full input shape, batch included, e.g. (1, 8, 8, 1).

  Returns:
    The count, or None when the backend gives no cost analysis.
  """
  x = jax.ShapeDtypeStruct(tuple(int(d) for d in input_shape), jnp.float32)
  key = jax.random.key(0)
  if isinstance(model, models.Model):
    params, state = jax.eval_shape(model.init, key, x)
    fn, args = (lambda p, s, x: model.apply(p, s, x, False)[0]), (params, state, x)
  else:
    variables = jax.eval_shape(model.init, key, x)
    fn, args = (lambda v, x: model.apply(v, x)), (variables, x)
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, dict):
    cost = [cost]
  flops = [c.get("flops") for c in (cost or []) if isinstance(c, dict)]
  flops = [float(f) for f in flops if f is not None and f >= 0]
  return sum(flops) if flops else None


def _data_fact(fn, cfg_data):
  """``fn(cfg_data)`` (``data.image_shape`` or ``data.num_classes``) of config.json's
  ``data`` section; None when it names no dataset or one this version does not know."""
  if not isinstance(cfg_data, dict) or cfg_data.get("name") is None:
    return None
  try:
    return fn(cfg_data)
  except (ValueError, TypeError):  # an unknown dataset, a malformed field
    return None


def _flops_of(c: Context) -> dict:
  """{net: (flops, parameters)} of one forward of one example; reasons noted on failure."""
  cfg_data = c.cfg("data")
  shape = _data_fact(data.image_shape, cfg_data)
  k = None if c.preds is None else c.preds["teacher_logits"].shape[1]
  if k is None:
    k = _data_fact(data.num_classes, cfg_data)
  out = {}
  for net in ("teacher", "student"):
    arch = c.cfg(f"{net}.model") or c.net(net, "architecture")
    try:
      if shape is None or k is None or arch is None:
        raise ValueError("input shape, classes or architecture unknown (config.json)")
      model = models.create(arch, int(k))
      params, _ = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *shape), jnp.float32)
      )
      out[net] = (forward_flops(model, (1, *shape)), models.param_count(params))
    except Exception as err:  # noqa: BLE001 - e.g. an architecture this version lacks
      out[net] = (None, None)
      c.files.note(
        "config.json", f"FLOPs of the {net}: {type(err).__name__}: {err}", f"{net} FLOPs"
      )
  return out


def _influence_share(c: Context) -> str:
  """How much of the student's training time went to influence, and how we know.

  none, oracle: nothing. static/periodic: measured, the whole-set scorings' seconds
  (metrics.jsonl scoring lines) against the student-side time. online/joint: the
  influence runs inside every step, so only a comparison tells: 1 - rate/rate_plain
  with the steps/s of a plain-KD baseline's student (same architecture, batch size,
  backend and device count); otherwise unknown.
  """
  s, mech = c.summary or {}, c.cfg("kdaif.mechanism") or (c.summary or {}).get("mechanism")
  wall = s.get("wall_time_s") or {}
  if mech == "none":
    return "Plain KD (`none`): no influence during training (0%)."
  if mech == "oracle":
    return (
      "The oracle (`oracle`): weights from the known answer (the injected flips, or the "
      "hidden labels of a semi-supervised run), no influence (0%)."
    )
  if mech in ("static", "periodic"):
    secs = sum(  # the trajectory's passes (kdaif.whole_set.trajectory) are a record, not weights
      num(r.get("seconds"))
      for r in c.records
      if r.get("kind") == "scoring" and r.get("phase") != "trajectory"
    )
    if not secs or not wall:
      return "Share of time on influence: unknown (no scoring lines or no wall times)."
    proxy = num(wall.get("proxy", 0)) if mech == "static" else 0.0
    # static scores between the proxy and student phases; periodic inside the student phase.
    total = num(wall.get("student")) + proxy + (secs if mech == "static" else 0.0)
    c.numbers["influence_share"] = secs / total
    return (
      f"Share of time on influence: {pct(secs / total)}, measured: the whole-set "
      f"scorings took {secs:.1f} s (metrics.jsonl scoring lines) of {total:.1f} s of "
      "student-side training"
      + (
        " (proxy + scoring + student). With the proxy student "
        f"it needs, `static` spends {pct((secs + proxy) / total)}"
        " of that time beyond training the final student."
        if mech == "static"
        else " (scorings included)."
      )
    )
  return _online_share(c, s) + _memory_init_cost(c)


def _memory_init_cost(c: Context) -> str:
  """The teacher's scoring pass that starts the score memory (``kdaif.memory_init``)."""
  secs = [
    num(r.get("seconds"))
    for r in c.records
    if r.get("kind") == "scoring" and r.get("phase") == "memory_init"
  ]
  if not secs:
    return ""
  return (
    f" Before the student's first step, the teacher's whole-set scoring that starts the "
    f"score memory took {sum(secs):.1f} s (metrics.jsonl, phase memory_init)."
  )


def _online_share(c: Context, s: dict) -> str:
  """The online mechanisms' share, from the steps/s of a plain-KD baseline."""
  b = c.base_summary or {}
  rate, rate_plain = (
    num((s.get("steps_per_second") or {}).get("student")),
    num((b.get("steps_per_second") or {}).get("student")),
  )
  same = (
    b.get("mechanism") == "none"
    and all(b.get(key) == s.get(key) for key in ("backend", "device_count"))
    and (b.get("student") or {}).get("architecture") == c.net("student", "architecture")
    and (c.base_config or {}).get("batch_size") == c.cfg("batch_size")
  )
  if not b or not same or not rate > 0 or not rate_plain > 0:
    return (
      "Share of time on influence: unknown. It runs inside every step; estimating it "
      "needs a plain-KD baseline workdir with the same student, batch size and hardware "
      "(`--baseline`)."
    )
  share = 1 - rate / rate_plain
  c.numbers["influence_share"] = share
  return (
    f"Share of time on influence: about {pct(share)}, estimated as 1 - rate/rate_plain "
    f"from the student steps/s ({rate:.3g} here vs {rate_plain:.3g} for plain KD in the "
    "baseline); both runs' other loads on the machine enter this estimate."
    + (" Negative: the difference is within timing noise." if share < 0 else "")
  )


def sustainability(c: Context) -> None:
  """Parameters and FLOPs (teacher / student), wall time and steps/s, CG, influence share."""
  c.add("h", 2, "Sustainability: size, compute, time")
  cost = _flops_of(c)
  par = {n: c.net(n, "parameters") or cost[n][1] for n in ("teacher", "student")}
  fl = {n: cost[n][0] for n in ("teacher", "student")}
  ratio = lambda d: (
    (fmt(d["teacher"] / d["student"], ".2f") + "x") if d["teacher"] and d["student"] else "n/a"
  )
  c.numbers.update(
    compression_ratio=par["teacher"] / par["student"]
    if par["teacher"] and par["student"]
    else None,
    flops=fl,
  )
  c.add(
    "table",
    ["", "teacher", "student", "compression (teacher / student)"],
    [
      ["parameters", thousands(par["teacher"]), thousands(par["student"]), ratio(par)],
      ["FLOPs per example (forward)", si(fl["teacher"]), si(fl["student"]), ratio(fl)],
    ],
  )
  c.add(
    "p",
    "FLOPs: XLA's cost analysis of the compiled inference forward pass of one example "
    "(2 per multiply-add; elementwise ops 1 each).",
  )
  s = c.summary or {}
  wall, rates = s.get("wall_time_s") or {}, s.get("steps_per_second") or {}
  if wall:
    known = ("teacher", "proxy", "student", "final", "total_this_invocation")
    phases = [k for k in known if k in wall] + [k for k in wall if k not in known]
    rows = [
      [k, fmt(num(wall[k]), ".1f"), fmt(num(rates.get(k)), ".2f") if k in rates else ""]
      for k in phases
    ]
    c.add("table", ["phase", "wall time (s)", "steps/s"], rows)
    c.add(
      "p",
      "Wall time of the last invocation for `total_this_invocation`; phases resumed "
      "from a checkpoint include the time before the restart. `final`: evaluation plus the "
      "whole-set influence written to weights.csv. Steps/s exclude the first (compiling) "
      "step.",
    )
  cg = [
    r
    for r in c.records
    if r.get("kind") == "train" and r.get("phase") == "student" and "cg_iterations" in r
  ]
  if cg:
    its = np.nanmean([num(r["cg_iterations"]) for r in cg])
    res = np.nanmedian([num(r.get("cg_residual")) for r in cg])
    c.add("p", f"CG per logged student step: {its:.1f} iterations, residual {res:.2e} (median).")
  c.add("p", _influence_share(c))
