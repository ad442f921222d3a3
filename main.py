"""KD-AIF trainer: ``python main.py --config=configs/default.py --workdir=DIR``.

Overrides: ``--config.kdaif.mechanism=joint --config.student.epochs=5``.
Rerunning the same command in the same workdir resumes from its checkpoints.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from kdaif_jax import trainer
from kdaif_jax.checkpoint import CheckpointMismatchError
from kdaif_jax.data import DataNotPreparedError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Folder for checkpoints and logs.")


def main(argv):
  del argv
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, DataNotPreparedError, CheckpointMismatchError, FileNotFoundError) as e:
    # Configuration and data problems: one line, no stack trace.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
