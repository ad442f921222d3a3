"""``python -m kdaif_jax.report WORKDIR [--baseline DIR] [--out DIR]``: see ``main``."""

import sys

from kdaif_jax.report.write import main

if __name__ == "__main__":
  sys.exit(main())
