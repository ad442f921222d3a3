"""python main.py --config=configs/digits_noisy.py --workdir=workdirs/digits_noisy

Digits with 40% symmetric label noise on the training split (validation and
test stay clean), cnn_large -> cnn_small, KD-AIF `online`. The teacher is
trained on the noisy labels too. Compare against plain KD with
`--config.kdaif.mechanism=none`; bench/accuracy_digits.py does it over seeds
and noise rates. It should reach about 96% (`online` 95.91 ± 0.58 over 3 seeds
against plain KD's 94.89 ± 0.85; its weights find the flipped labels with AUROC
0.984; BENCHMARKS.md §3c). A few minutes on 2 CPU cores.

`get_config('smoke')` shrinks it to seconds (tests).
"""

from kdaif_jax import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.variant(arg, allowed=("smoke",))
  c = config_lib.base_config()
  c.data.noise.rate = 0.4
  c.data.noise.kind = "symmetric"
  if arg == "smoke":
    c = config_lib.smoke(c)
  return c
