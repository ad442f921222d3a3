"""KD-AIF trainer: ``python main.py --config=configs/default.py --workdir=DIR``.

Overrides: ``--config.kdaif.mechanism=joint --config.student.epochs=5``.
Rerunning the same command in the same workdir resumes from its checkpoints.

Every expected failure ends in one ``error: ...`` line on stderr, no traceback:
exit status 2 for the command line, the config, the data and the workdir
(held by another run, another experiment's, unreadable checkpoints), 3 when
training diverged (README "Failure behaviour").
"""

import os
import sys

from absl import app, flags
from ml_collections import config_dict, config_flags

from kdaif_jax import trainer
from kdaif_jax.checkpoint import CheckpointCorruptError, CheckpointMismatchError, WorkdirLockedError
from kdaif_jax.data import DataNotPreparedError
from kdaif_jax.divergence import TrainingDivergedError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Folder for checkpoints and logs.")

USAGE_ERROR = 2
DIVERGED = 3


def _die(message: str, code: int = USAGE_ERROR) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _config_arg(argv: list[str]) -> str | None:
  """The value of ``--config`` on the command line (either spelling), or None."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _chain(err: BaseException) -> list[BaseException]:
  out = []
  while err is not None and err not in out:
    out.append(err)
    err = err.__cause__ or err.__context__
  return out


def _last_line(text: str) -> str:
  lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def _flag_error(err: BaseException, argv: list[str]) -> str:
  """One line for an exception raised while parsing the flags (and loading the config)."""
  chain = _chain(err)
  cfg = _config_arg(argv) or "configs/default.py"
  for e in chain:
    if isinstance(e, SyntaxError):
      return f"--config={cfg}: {type(e).__name__} in {e.filename}, line {e.lineno}: {e.msg}"
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  for e in chain:
    # ml_collections' unknown field: KeyError("'name'\nDid you mean ...?") (or no hint).
    text = str(e.args[0]) if isinstance(e, (KeyError, AttributeError)) and e.args else ""
    key = text.splitlines()[0].strip("'\"") if text else ""
    named = [o for o in overrides if key and key in o[len("--config.") :].split(".")]
    if named:
      hint = _last_line(text) if "Did you mean" in text else ""
      return f"{named[0]}: no such option in {cfg.split(':', 1)[0]}" + (f"; {hint}" if hint else "")
  msg = str(err).strip()
  if isinstance(err, flags.Error) and msg and "\n" not in msg:  # absl's own: names the flag
    return msg.removeprefix("flag ")
  root = chain[-1]
  return f"--config={cfg}: " + (_last_line(root) or type(root).__name__)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure (config file included) as one line."""
  arg = _config_arg(argv[1:])
  if arg is not None and not os.path.isfile(arg.split(":", 1)[0]):
    _die(f"--config={arg}: no such file")
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - whatever the config file raised: one line
    _die(_flag_error(e, argv[1:]))


def main(argv):
  del argv
  cfg = _CONFIG.value
  if not isinstance(cfg, config_dict.ConfigDict):  # ml_collections defers load errors
    try:
      cfg.to_dict()
    except Exception as e:  # noqa: BLE001
      _die(f"--config={_config_arg(sys.argv[1:])}: {_last_line(e)}")
  try:
    trainer.train_and_evaluate(cfg, _WORKDIR.value)
  except TrainingDivergedError as e:
    _die(str(e), DIVERGED)
  except (
    ValueError,
    DataNotPreparedError,
    CheckpointMismatchError,
    CheckpointCorruptError,
    WorkdirLockedError,
    FileNotFoundError,
  ) as e:
    # Configuration, data and workdir problems: one line, no stack trace.
    _die(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
