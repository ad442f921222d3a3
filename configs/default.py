"""make run  (= python main.py --config=configs/default.py --workdir=workdirs/default)

Digits (scikit-learn's bundled 8x8 images, offline), teacher cnn_large trained
from scratch, then student cnn_small distilled with KD-AIF `online` (influence
in the student's classifier layer, GGN curvature, CG 5 iterations warm-started,
damping 0.1, sigmoid weights). Should reach about 98% teacher and 95-96%
student test accuracy in under 3 minutes on 2 CPU cores.

`get_config('smoke')` shrinks it to seconds (tests).
"""

from kdaif_jax import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.variant(arg, allowed=("smoke",))
  c = config_lib.base_config()
  if arg == "smoke":
    c = config_lib.smoke(c)
  return c
