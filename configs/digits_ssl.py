"""python main.py --config=configs/digits_ssl.py --workdir=workdirs/digits_ssl

Semi-supervised KD-AIF on scikit-learn's digits (offline): 10 labelled images
per class (100), the rest of the training split unlabelled (labels dropped),
a class-balanced validation slice of 50 held out of the training split (5 per
class; fewer labels than the training budget, as a realistic SSL protocol
needs), test 359. Teacher cnn_large_bn trained on the 100 labels, then the
student cnn_small_bn learns from the teacher's soft targets on strongly
augmented unlabelled images with KD-AIF weights (`joint`: the teacher also
learns from the student's per-example influence feedback). Should reach about
96% student test accuracy (3 seeds: 96.01 ± 0.90; labelled only 89.69, plain
pseudo-labels 93.87, `online` 94.71, a FixMatch-style student 91.55; over ten
seeds of a later sweep joint 95.13 ± 1.78, pseudo-labels 94.07 ± 1.38). Under 5
minutes on 2 CPU cores. bench/accuracy_ssl.py runs every arm, and on request the
`oracle` reference (BENCHMARKS.md §4).

`get_config('smoke')` shrinks it to seconds (tests).
"""

from kdaif_jax import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.variant(arg, allowed=("smoke",))
  c = config_lib.base_config()
  c.data.num_labelled = 100
  c.data.val_size = 50
  c.batch_size = 16
  c.augment.pad, c.augment.flip = 1, False
  c.teacher.epochs = 60
  c.student.epochs = 30
  # Batch norm in both CNNs (influence reads its running averages, so examples stay
  # independent) and no gradient clipping: without batch norm the plain pseudo-label
  # student diverged on one seed of three unclipped, and clipping slowed every arm
  # (BENCHMARKS.md section 4). The same recipe for every arm of bench/accuracy_ssl.py.
  c.teacher.model, c.student.model = "cnn_large_bn", "cnn_small_bn"
  for net in ("teacher", "student"):
    c[net].optimizer.lr = 0.03
    c[net].optimizer.clip_norm = 0.0
  c.kd.temperature = 1.0
  c.kdaif.mechanism = "joint"
  # The semi-supervised numbers (BENCHMARKS.md §4) were measured without the score
  # memory (kdaif.score_memory, the supervised default since issue 9).
  c.kdaif.score_memory = 0.0
  c.kdaif.joint.mu = 0.5
  c.kdaif.joint.lr = 0.005
  c.ssl.unlabelled_ratio = 7
  c.ssl.targets = "soft"
  c.ssl.strong.update(num_ops=2, magnitude=5.0, cutout=3)
  if arg == "smoke":
    c = config_lib.smoke(c)
  return c
