"""python main.py --config=configs/cifar10_4k.py --workdir=workdirs/cifar10_4k

Semi-supervised KD-AIF on CIFAR-10 with 4,000 labels (400 per class, seeded,
class-balanced), the anchors' protocol: WRN-28-2 (1.47M) teacher and student,
unlabelled batch 7x the labelled batch of 64, weak views (pad-4 crop, flip)
for the teacher, strong views (RandAugment 2 ops at magnitude 10 + Cutout 16)
for the student, UDA consistency on the teacher (threshold 0.8, sharpening
0.4), `joint` KD-AIF feedback, EMA of the student, and a final fine-tuning of
the student on the labelled set (as Meta Pseudo Labels). Validation: 1,000
class-balanced labelled images held out of the training split (outside the
4,000). About 300k student steps.

Reference accuracies (docs/method.md §6, WRN-28-2): Meta Pseudo Labels
96.11 ± 0.07, FixMatch (RA) 95.74 ± 0.05, UDA 94.53 ± 0.18, labelled data only
82.14 ± 0.25. Expected time: several GPU-hours on one modern GPU (the KD-AIF
online step costs about 2-3x a plain step, BENCHMARKS.md); not run on this
project's CPU machines.

Data, prepared once with TensorFlow installed:
  tfds build cifar10 --file_format=array_record --data_dir=DIR
then --config.data.data_dir=DIR (or the TFDS default directory).

`get_config('smoke')` shrinks it to seconds on synthetic data (tests).
"""

from kdaif_jax import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.variant(arg, allowed=("smoke",))
  c = config_lib.wrn_ssl_recipe(config_lib.base_config())
  c.data.name = "cifar10"
  c.data.num_labelled = 4000
  c.data.val_size = 1000
  c.augment.pad, c.augment.flip = 4, True
  c.teacher.epochs = 200  # 62 steps per epoch over the 4,000 labels
  c.student.epochs = 3000  # 100 steps per epoch over ~45k unlabelled images
  c.ssl.finetune_epochs = 130  # ~8k steps, as MPL
  if arg == "smoke":
    c = config_lib.smoke(c)
  return c
