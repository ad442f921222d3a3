"""Reading a workdir for the SAFE report: every problem recorded, nothing raised.

``Files`` reads one workdir's files (config.json, summary.json, metrics.jsonl,
weights.csv, predictions.npz, splits.json); each file that is absent or unreadable
becomes a ``missing`` entry {file, problem, disabled}. ``Context`` reads the run's
(and the baseline's) files once and collects what the sections produce.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
from flax import traverse_util

from kdaif_jax.report.render import num

_WEIGHT_COLUMNS = ("id", "label", "clean_label", "noisy", "influence", "weight")


def read_metrics(path: str) -> tuple[list[dict], list[str]]:
  """Reads metrics.jsonl: the last line per (kind, phase, net, split, step).

  Args:
    path: the file.

  Returns:
    (records in the order of their last occurrence, problems): problems are
    one-line strings, e.g. an unparsable (truncated) line that was skipped, or
    the file missing (then records is empty).
  """
  if not os.path.exists(path):
    return [], [f"{os.path.basename(path)} not found"]
  records: dict[tuple, dict] = {}
  problems = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        problems.append(f"line {n} is not valid JSON (truncated?); skipped")
        continue
      if not isinstance(rec, dict) or "kind" not in rec:
        problems.append(f"line {n} is not a metrics record; skipped")
        continue
      key = tuple(rec.get(k) for k in ("kind", "phase", "net", "split", "step"))
      records.pop(key, None)
      records[key] = rec
  return list(records.values()), problems


def pseudo_label_by_epoch(records: list[dict]) -> dict[int, float]:
  """SSL runs: the teacher's pseudo-label accuracy on the unlabelled batches
  (against the hidden true labels the splits keep for analysis), per student epoch.

  Args:
    records: metrics.jsonl records (``read_metrics``).

  Returns:
    {epoch (0-based): mean over the epoch's logged student steps} in epoch order;
    empty for a run that logged none (supervised runs).
  """
  by: dict[int, list[float]] = {}
  for r in records:
    if r.get("kind") == "train" and r.get("phase") == "student" and "pseudo_label_accuracy" in r:
      v, epoch = num(r["pseudo_label_accuracy"]), num(r.get("epoch", 0))
      if np.isfinite(epoch):
        by.setdefault(int(epoch), []).extend([v] if np.isfinite(v) else [])
  return {e: float(np.mean(by[e])) if by[e] else float("nan") for e in sorted(by)}


class Files:
  """Reads one workdir's files; each failure becomes a ``missing`` entry.

  Every reader takes ``disabled``: what the report loses without the file (it goes
  into the missing entry), and returns None (or []) when the file cannot be used.
  """

  def __init__(self, workdir: str, label: str, missing: list[dict]):
    self.dir, self.label, self.missing = workdir, label, missing

  def note(self, name: str, problem: str, disabled: str) -> None:
    """Records a missing entry for ``LABEL/name``."""
    self.missing.append({"file": f"{self.label}/{name}", "problem": problem, "disabled": disabled})

  def _path(self, name: str, disabled: str) -> str | None:
    path = os.path.join(self.dir, name)
    if not os.path.exists(path):
      self.note(name, "not found", disabled)
      return None
    return path

  def json(self, name: str, disabled: str) -> dict | None:
    """The JSON object in ``name``, as a dict."""
    path = self._path(name, disabled)
    if path is None:
      return None
    try:
      with open(path, encoding="utf-8") as f:
        return dict(json.load(f))
    except (ValueError, TypeError, OSError) as err:
      self.note(name, f"unreadable ({type(err).__name__}: {err})", disabled)
      return None

  def metrics(self, disabled: str) -> list[dict]:
    """metrics.jsonl's records (see ``read_metrics``); each skipped line is noted."""
    path = self._path("metrics.jsonl", disabled)
    if path is None:
      return []
    records, problems = read_metrics(path)
    for p in problems:
      self.note("metrics.jsonl", p, "nothing else: the other lines are used")
    return records

  def weights(self, disabled: str) -> dict | None:
    """weights.csv as {column: [N] array}; ids and class labels int64, ``noisy`` bool.

    Columns id, label, clean_label, noisy, influence, weight (and final_influence
    when present; ``text``, strings, for text datasets); incomplete rows are
    skipped (and noted).
    """
    path = self._path("weights.csv", disabled)
    if path is None:
      return None
    cols: dict[str, list] = {}
    texts: list[str] = []
    bad = 0
    try:
      with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        names = [c for c in (reader.fieldnames or []) if c in (*_WEIGHT_COLUMNS, "final_influence")]
        if not set(_WEIGHT_COLUMNS) <= set(names):
          raise ValueError(f"columns {reader.fieldnames}, need {', '.join(_WEIGHT_COLUMNS)}")
        for row in reader:
          try:
            vals = {c: float(row[c]) for c in names}
          except (TypeError, ValueError):
            bad += 1
            continue
          for c, v in vals.items():
            cols.setdefault(c, []).append(v)
          if "text" in reader.fieldnames:
            texts.append(row["text"] or "")
    except (ValueError, OSError, csv.Error) as err:
      self.note("weights.csv", f"unreadable ({err})", disabled)
      return None
    if bad:
      self.note("weights.csv", f"{bad} incomplete row(s) skipped", "nothing else")
    if not cols:
      self.note("weights.csv", "no rows", disabled)
      return None
    out = {c: np.asarray(v, np.float64) for c, v in cols.items()}
    for c in ("id", "label", "clean_label"):  # class ids; STS-B's scores stay real
      if c == "id" or np.array_equal(out[c], np.round(out[c])):
        out[c] = out[c].astype(np.int64)
    out["noisy"] = out["noisy"] > 0
    if texts:
      out["text"] = np.asarray(texts, object)
    return out

  def predictions(self, disabled: str) -> dict | None:
    """predictions.npz: ``labels`` [N], ``teacher_logits`` and ``student_logits`` [N, K]."""
    path = self._path("predictions.npz", disabled)
    try:
      if path is None:
        return None
      with np.load(path, allow_pickle=False) as z:
        out = {k: np.asarray(z[k]) for k in ("labels", "teacher_logits", "student_logits")}
      n = len(out["labels"])
      if any(out[k].ndim != 2 or len(out[k]) != n for k in ("teacher_logits", "student_logits")):
        raise ValueError("logits and labels disagree in shape")
      return out
    except Exception as err:  # noqa: BLE001 - a truncated zip raises many kinds
      self.note("predictions.npz", f"unreadable ({type(err).__name__}: {err})", disabled)
      return None


# What a plain-KD baseline must share with the run for its curves and accuracy to
# compare: the data (splits, noise, seeds) and the student's architecture and schedule.
# (A batch size of its own only makes the cost section's share unknown.)
_BASELINE_KEYS = ("data.", "student.model", "student.epochs", "teacher.model")


def baseline_differences(config: dict | None, base_config: dict | None) -> list[str]:
  """The options in which a baseline's config.json differs from the run's.

  Args:
    config, base_config: the two config.json dicts (None when unreadable: then
      nothing can be compared and the report names the missing file instead).

  Returns:
    ``["data.noise.rate: 0.4 -> 0.0", ...]`` over the data options (except
    ``data.data_dir``, where the files lie) and the networks and the student's
    schedule; an option only one of them has (a library version apart) is skipped.
  """
  if not config or not base_config:
    return []
  run, base = (traverse_util.flatten_dict(c, sep=".") for c in (config, base_config))
  keys = sorted(
    k
    for k in set(run) & set(base)
    if k.startswith(_BASELINE_KEYS) and k != "data.data_dir" and run[k] != base[k]
  )
  return [f"{k}: {base[k]!r} -> {run[k]!r}" for k in keys]


class Context:
  """What the sections share: the files read, the blocks and figures written, the numbers.

  Attributes:
    blocks: the report's blocks (see ``kdaif_jax.report.render``), in order.
    missing: [{file, problem, disabled}], run and baseline together.
    figures: {file name: path} of the PNGs written.
    numbers: headline values the sections found (returned by ``write_report``).
    dataset: the reloaded ``kdaif_jax.data.Dataset`` once a section loaded it, else None.
  """

  def __init__(self, workdir: str, baseline: str | None, out_dir: str):
    self.workdir, self.baseline, self.out_dir = workdir, baseline, out_dir
    self.blocks: list[tuple] = []
    self.missing: list[dict] = []
    self.figures: dict[str, str] = {}
    self.numbers: dict[str, Any] = {}
    self.dataset = None
    self.files = Files(workdir, "workdir", self.missing)
    self.config = self.files.json("config.json", "dataset pictures, FLOPs, teacher predictions")
    self.summary = self.files.json("summary.json", "overview numbers, wall time, throughput")
    self.records = self.files.metrics("training curves, CG statistics")
    self.weights = self.files.weights("weight histograms, noise detection, example pictures")
    self.preds = self.files.predictions("per-class accuracy, calibration (ECE)")
    self.base_summary, self.base_records, self.base_config = None, [], None
    if baseline:
      base = Files(baseline, "baseline", self.missing)
      if not os.path.isdir(baseline):
        base.note("", "not a folder", "every baseline comparison")
      else:
        self.base_config = base.json("config.json", "baseline batch-size check")
        self.base_summary = base.json("summary.json", "baseline accuracy, influence share")
        self.base_records = base.metrics("baseline training curves")

  def add(self, *block) -> None:
    """Appends one block, e.g. ``add("p", text)``."""
    self.blocks.append(block)

  def figure(self, name: str, fn, *args, alt: str = "") -> None:
    """Draws ``fn(OUT_DIR/name, *args)`` and appends its picture block."""
    path = fn(os.path.join(self.out_dir, name), *args)
    self.figures[name] = path
    self.add("img", name, alt or name)

  def cfg(self, dotted: str, default: Any = None) -> Any:
    """config.json's value at ``dotted`` (e.g. "data.name"), or ``default``."""
    node = self.config or {}
    for part in dotted.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    return default if node is None else node

  def net(self, net: str, key: str) -> Any:
    """summary.json's ``[net][key]``, or None."""
    return ((self.summary or {}).get(net) or {}).get(key)
