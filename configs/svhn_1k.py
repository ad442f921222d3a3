"""python main.py --config=configs/svhn_1k.py --workdir=workdirs/svhn_1k

Semi-supervised KD-AIF on SVHN (`svhn_cropped`) with 1,000 labels (100 per
class), the anchors' protocol: WRN-28-2 teacher and student, unlabelled batch
7x the labelled batch of 64, no horizontal flips (digits), RandAugment +
Cutout strong views for the student, UDA consistency on the teacher, `joint`
KD-AIF feedback, EMA, final fine-tuning on the labels. Validation: 1,000
class-balanced labelled images held out of the training split.

Reference accuracies (docs/method.md §6, WRN-28-2): Meta Pseudo Labels
98.01 ± 0.07, UDA 97.11 ± 0.17. Expected time: several GPU-hours on one modern
GPU; not run on this project's CPU machines.

Data, prepared once with TensorFlow installed:
  tfds build svhn_cropped --file_format=array_record --data_dir=DIR

`get_config('smoke')` shrinks it to seconds on synthetic data (tests).
"""

from kdaif_jax import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.variant(arg, allowed=("smoke",))
  c = config_lib.wrn_ssl_recipe(config_lib.base_config())
  c.data.name = "svhn_cropped"
  c.data.num_labelled = 1000
  c.data.val_size = 1000
  c.augment.pad, c.augment.flip = 2, False  # no mirrored digits
  c.teacher.epochs = 400  # 15 steps per epoch over the 1,000 labels
  c.student.epochs = 1300  # ~160 steps per epoch over ~71k unlabelled images
  c.ssl.finetune_epochs = 500  # ~8k steps, as MPL
  if arg == "smoke":
    c = config_lib.smoke(c)
  return c
