# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# <!-- This notebook's source is notebooks/quickstart.py (jupytext percent format).
#      Edit that file, then run `jupytext --sync notebooks/quickstart.py`
#      (or `jupytext --to ipynb`) to update the .ipynb. See notebooks/README.md. -->
# # kdaif_jax quick start: distillation that down-weights harmful training data
#
# **KD-AIF** (Wu et al., *Statistics* 2025) distils a large *teacher* network into a small
# *student* and weights every training example by its **influence** on a held-out validation
# loss (Koh & Liang, ICML 2017): $I_i = -\nabla\ell_i^\top (C + \lambda I)^{-1}\nabla L_V$.
# Examples that would raise the validation loss ($I_i > 0$, e.g. wrong labels) get small
# weights, the most helpful ones large (mean 1 per batch), recomputed at every step (`online`)
# in one jitted JAX function.
#
# This notebook trains KD-AIF and plain KD on scikit-learn's digits with 40% of the training
# labels flipped, compares them, writes the run's report and lists the most harmful examples.
# It runs offline in a couple of minutes on a laptop CPU (set `KDAIF_NOTEBOOK_SMALL=1` for a
# tiny version that runs in seconds).

# %%
# Colab only: installs kdaif_jax. Anywhere else this cell does nothing (no network).
import importlib.util
import subprocess
import sys

# Where pip takes kdaif_jax from on Colab: the repository URL (replace <you>), or a wheel
# or a folder on a mounted Drive, e.g. "/content/drive/MyDrive/kdaif_jax".
KDAIF_SOURCE = "git+https://github.com/<you>/kdaif_jax"


def on_colab() -> bool:
  if "google.colab" in sys.modules:
    return True
  try:
    return importlib.util.find_spec("google.colab") is not None
  except (ImportError, ValueError):  # no `google` package at all
    return False


ON_COLAB = on_colab()
if ON_COLAB and importlib.util.find_spec("kdaif_jax") is None:
  if "<you>" in KDAIF_SOURCE:
    raise ValueError("Set KDAIF_SOURCE above to where kdaif_jax can be installed from.")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", KDAIF_SOURCE], check=True)
  print("Installed kdaif_jax. If pip changed the jax version, restart the session once.")
print("on Colab:", ON_COLAB)

# %% [markdown]
# ## Setup
#
# `SMALL` (the environment variable `KDAIF_NOTEBOOK_SMALL=1`, set by the tests) shrinks the run
# to 256 training examples, MLP teacher and student, 1 teacher and 2 student epochs: it checks
# that everything runs, not that KD-AIF helps. All outputs go to a fresh temporary folder.

# %%
import csv
import os
import tempfile

import jax
import numpy as np
from IPython.display import Image, Markdown, display

import kdaif_jax
from kdaif_jax import config as config_lib
from kdaif_jax import metrics, report, trainer

SMALL = os.environ.get("KDAIF_NOTEBOOK_SMALL") == "1"
NOISE_RATE = 0.4  # share of training labels replaced by a uniformly random other class
WORKROOT = tempfile.mkdtemp(prefix="kdaif_quickstart_")
print(
  f"kdaif_jax {kdaif_jax.__version__}, jax {jax.__version__}, backend "
  f"{jax.default_backend()}, SMALL={SMALL}"
)
print("workdirs under", WORKROOT)

# %% [markdown]
# ## The experiment
#
# `config_lib.base_config()` is the default experiment (digits, `cnn_large` teacher →
# `cnn_small` student, KD-AIF `online` with Gauss-Newton curvature, 5 warm-started CG steps,
# damping 0.1, sigmoid weights). We add symmetric label noise to the training split; the
# validation slice (which the influence is measured against) and the test split stay clean.
# The teacher is trained on the noisy labels too.

# %%
cfg = config_lib.base_config()
cfg.data.noise.rate = NOISE_RATE
cfg.data.noise.kind = "symmetric"
cfg.kdaif.mechanism = "online"
if SMALL:
  cfg = config_lib.smoke(cfg)  # 256 examples, 1 teacher + 2 student epochs
  cfg.teacher.model = cfg.student.model = "mlp"
else:
  cfg.teacher.epochs, cfg.student.epochs = 15, 20
cfg.report = False  # written below, with the plain-KD run as the baseline
config_lib.validate(cfg)
print(
  f"{cfg.teacher.model} ({cfg.teacher.epochs} epochs) -> {cfg.student.model} "
  f"({cfg.student.epochs} epochs), noise {cfg.data.noise.rate:.0%} {cfg.data.noise.kind}, "
  f"batch {cfg.batch_size}"
)

# %% [markdown]
# ### 1. KD-AIF `online`
#
# `trainer.train_and_evaluate(config, workdir)` trains the teacher, then distils the student with
# per-step influence weights, evaluates both, scores the whole training set once more and writes
# `summary.json`, `weights.csv`, `metrics.jsonl`, checkpoints and more into the workdir. It
# returns the summary.

# %%
aif_dir = os.path.join(WORKROOT, "kdaif_online")
aif = trainer.train_and_evaluate(cfg, aif_dir)
print(sorted(os.listdir(aif_dir)))

# %% [markdown]
# ### 2. Plain KD with the same teacher
#
# `mechanism="none"` gives every example weight 1 (Hinton-style distillation). Setting
# `teacher.init` to the first workdir loads its trained teacher instead of training a new one, so
# the two students learn from exactly the same teacher.

# %%
kd_cfg = cfg.copy_and_resolve_references()
kd_cfg.kdaif.mechanism = "none"
kd_cfg.teacher.init = aif_dir  # reuse the teacher trained above
kd_cfg.teacher.epochs = 0
kd_dir = os.path.join(WORKROOT, "plain_kd")
kd = trainer.train_and_evaluate(kd_cfg, kd_dir)


# %% [markdown]
# ### 3. Comparison
#
# Noise detection (`summary["noise_detection"]`): how well the run's signal ranks the flipped
# labels first. For KD-AIF it is the last training weight of each example (low weight = suspected
# wrong label); plain KD uses no weights, so its summary ranks the influence computed once after
# training (`final_influence` in `weights.csv`), a signal it never acted on. The last column ranks
# `final_influence` for both runs, the like-for-like comparison. AUROC 0.5 is chance;
# precision@k is the share of flipped labels among the k lowest-ranked examples, k = number
# flipped (chance = the noise rate).


# %%
def fmt(v, pattern="{:.3f}"):
  return "–" if v is None else pattern.format(v)


def final_influence_auroc(workdir):
  """AUROC of `final_influence` (one whole-set solve after training) from weights.csv."""
  with open(os.path.join(workdir, "weights.csv")) as f:
    rows = list(csv.DictReader(f))
  final = np.array([float(r["final_influence"]) for r in rows])
  flipped = np.array([r["noisy"] == "1" for r in rows])
  return metrics.detection_metrics(-final, flipped)["auroc"]  # high influence = suspicious


rows = []
for name, s, workdir in (("KD-AIF online", aif, aif_dir), ("plain KD", kd, kd_dir)):
  det = s["noise_detection"]
  cells = [
    name,
    f"`{s['mechanism']}`",
    fmt(s["teacher"]["test_accuracy"], "{:.2%}"),
    fmt(s["student"]["test_accuracy"], "{:.2%}"),
    fmt(det["auroc"]),
    fmt(det["precision_at_k"]),
    fmt(final_influence_auroc(workdir)),
    fmt(s["wall_time_s"].get("student"), "{:.0f} s"),
  ]
  rows.append("| " + " | ".join(cells) + " |")
header = (
  "| run | mechanism | teacher test acc. | student test acc. | noise AUROC (summary) "
  "| precision@k | AUROC of final influence | student phase |\n"
  "|---|---|---|---|---|---|---|---|"
)
display(Markdown("\n".join([header, *rows])))
gain = aif["student"]["test_accuracy"] - kd["student"]["test_accuracy"]
print(
  f"{aif['num_train']} training examples, {aif['noise_detection']['num_noisy']} flipped; "
  f"KD-AIF - plain KD student test accuracy: {gain:+.2%}"
)

# %% [markdown]
# ### 4. The report
#
# `report.write_report(workdir, baseline=...)` writes `report.md`, a self-contained
# `report.html` and the figures into `WORKDIR/report/`: training curves against the baseline,
# weight distributions and noise detection, the most helpful and most harmful training images,
# per-class accuracy and calibration, and the cost of influence.

# %%
rep = report.write_report(aif_dir, baseline=kd_dir)
print("report:", rep["report_md"])
for problem in rep["missing"]:
  print("missing:", problem)
for name, path in rep["figures"].items():
  display(Markdown(f"**{name}**"))
  display(Image(filename=path))

# %% [markdown]
# ### 5. The most harmful training examples
#
# `weights.csv` holds one row per training example: its given (possibly flipped) label, its true
# label, whether it was flipped, its last per-step influence and weight during training, and its
# `final_influence` from one whole-set solve with the final student (comparable across all
# examples). The most harmful examples should be mostly flipped labels.

# %%
with open(os.path.join(aif_dir, "weights.csv")) as f:
  table = list(csv.DictReader(f))
table.sort(key=lambda r: float(r["final_influence"]), reverse=True)
TOP = 15
lines = [
  "| id | given label | true label | flipped | final influence | last weight |",
  "|---|---|---|---|---|---|",
]
for r in table[:TOP]:
  lines.append(
    f"| {r['id']} | {r['label']} | {r['clean_label']} | "
    f"{'yes' if r['noisy'] == '1' else ''} | {float(r['final_influence']):+.3g} | "
    f"{float(r['weight']):.2f} |"
  )
display(Markdown("\n".join(lines)))
flipped_top = sum(r["noisy"] == "1" for r in table[:TOP])
print(
  f"{flipped_top} of the {TOP} most harmful are flipped labels "
  f"(noise rate {NOISE_RATE:.0%}: {NOISE_RATE * TOP:.0f} expected by chance)"
)

# %%
# One JSON line with the headline numbers (tests/test_notebooks.py reads it).
import json
import sys

result = {
  "python": sys.executable,
  "small": SMALL,
  **{
    key: {
      "student": s["student"]["test_accuracy"],
      "teacher": s["teacher"]["test_accuracy"],
      "auroc": s["noise_detection"]["auroc"],
    }
    for key, s in (("kdaif", aif), ("plain_kd", kd))
  },
  "figures": sorted(rep["figures"]),
  "report_md": rep["report_md"],
  "harmful_rows": len(lines) - 2,
  "flipped_in_top": flipped_top,
}
print("KDAIF_RESULT " + json.dumps(result))
