"""Named random streams: every random draw of a run has its own.

A step's key is ``fold_in(fold_in(run_key, stream), step)``, so each stream is
independent of the others and of how many steps other phases took; a whole-set
scoring key is ``key(seed + stream)``. The numbers are part of a run's
reproducibility (the same seed gives the same run): never renumber a stream.
"""

from __future__ import annotations

import enum

import jax

__all__ = ["RunStream", "StepStream", "run_key", "step_key"]


class StepStream(enum.IntEnum):
  """Per-step streams, folded into the state's key with the step number."""

  TRAIN_VIEW = 1  # weak augmentation of a supervised batch
  SSL_LABELLED_PICK = 2  # which labelled examples an SSL step draws
  SSL_LABELLED_VIEW = 3  # their weak augmentation
  SSL_WEAK_VIEW = 4  # weak view of the unlabelled batch (the teacher's input)
  SSL_STRONG_VIEW = 5  # strong view of the unlabelled batch (the student's input)
  VAL_SAMPLE = 6  # the validation batch of a refresh (kdaif.val_batch_size > 0)


class RunStream(enum.IntEnum):
  """Run-level streams, offsets of the config seed."""

  SCORING = 17  # curvature sample of the static / periodic scorings (then fold_in epoch)
  FINAL_SCORING = 99  # curvature sample of the final whole-set scoring (weights.csv)


def step_key(state, stream: StepStream) -> jax.Array:
  """The key of ``stream`` at ``state.step`` (``state.key`` holds raw key data)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), int(stream))
  return jax.random.fold_in(key, state.step)


def run_key(seed: int, stream: RunStream) -> jax.Array:
  """The key of a run-level ``stream`` for the config seed."""
  return jax.random.key(seed + int(stream))
