"""python main.py --config=configs/cifar100_kd.py --workdir=workdirs/cifar100_kd

CIFAR-100 distillation, resnet32x4 (7.4M) -> resnet8x4 (1.2M), the recipe of
the distillation papers (CRD, Tian et al. 2020; DKD): 240 epochs, batch 64,
SGD momentum 0.9, lr 0.05 (0.01 for ShuffleNet/MobileNet students), weight
decay 5e-4, lr x0.1 at epochs 150, 180 and 210; KD temperature 4; pad-4 crop
and horizontal flip. Reference (docs/method.md §6): KD (Hinton) 73.33%,
CRD 75.51%, DKD 76.32% top-1 for the student. KD-AIF `online` adds the
influence weights; expect several GPU-hours for the 240 + 240 epochs
(teacher from scratch; set `--config.teacher.init=WORKDIR_OF_A_TEACHER_RUN`
to reuse one). Not run on this project's CPU machines.

Data: prepared once with TensorFlow installed:
  tfds build cifar100 --file_format=array_record --data_dir=DIR
then pass --config.data.data_dir=DIR (or leave the TFDS default).

`get_config('smoke')` shrinks it to seconds on synthetic 32x32x3 data (tests).
"""

from kdaif_jax import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.variant(arg, allowed=("smoke",))
  c = config_lib.base_config()
  c.data.name = "cifar100"
  c.data.val_size = 5000
  c.batch_size = 64
  c.eval_batch_size = 1000
  c.augment.pad, c.augment.flip = 4, True
  c.teacher.model, c.student.model = "resnet32x4", "resnet8x4"
  for net in ("teacher", "student"):
    c[net].epochs = 240
    opt = c[net].optimizer
    opt.update(
      name="sgd",
      lr=0.05,
      momentum=0.9,
      nesterov=False,
      weight_decay=5e-4,
      schedule="step",
      decay_epochs=(150, 180, 210),
      decay_factor=0.1,
      clip_norm=0.0,
    )
  c.kd.temperature = 4.0
  c.kd.alpha = 0.1  # CRD's KD baseline: 0.1 CE + 0.9 KD
  c.kdaif.val_batch_size = 512
  c.kdaif.cg_iters = 3
  c.kdaif.refresh_every = 10
  c.kdaif.whole_set.curvature_size = 2048
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  if arg == "smoke":
    c = config_lib.smoke(c)
  return c
