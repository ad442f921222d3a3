"""kdaif_jax.trajectory: checkpoint schedules, standardised averaging, saved scores."""

import numpy as np
import pytest

from kdaif_jax import trajectory


def test_checkpoint_steps_are_log_spaced_distinct_and_end_at_the_last_step():
  steps = trajectory.checkpoint_steps(500, 10, 0.02)
  assert steps[0] == 10 and steps[-1] == 500 and len(steps) == 10
  assert list(steps) == sorted(set(steps))
  ratios = np.diff(np.log(steps))  # equal steps in log time, up to rounding
  np.testing.assert_allclose(ratios, np.log(50) / 9, atol=0.05)
  assert trajectory.checkpoint_steps(3, 10) == (1, 2, 3)  # rounding merges the rest
  assert trajectory.checkpoint_steps(7, 1) == (7,)
  with pytest.raises(ValueError, match="allowed"):
    trajectory.checkpoint_steps(0, 3)


def test_scoring_epochs_leave_the_last_one_to_the_final_pass():
  assert trajectory.scoring_epochs(20, 5) == (1, 2, 4, 9)
  assert trajectory.scoring_epochs(2, 10) == (1,)
  assert trajectory.scoring_epochs(20, 0) == ()
  assert trajectory.scoring_epochs(1, 4) == ()  # one epoch: the final scores alone


def test_standardised_has_unit_spread_per_column_keeps_signs_and_constants():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(50, 3)) * np.array([1e-6, 1.0, 1e4]) + 0.5
  s[:, 2] = 7.0  # a constant column
  z = trajectory.standardised(s)
  np.testing.assert_allclose(z[:, :2].std(0), 1.0)
  np.testing.assert_array_equal(np.sign(z[:, :2]), np.sign(s[:, :2]))
  np.testing.assert_array_equal(z[:, 2], 0.0)
  assert trajectory.standardised(s[:, 0]).shape == (50,)


def test_average_ignores_each_checkpoints_scale():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=100), rng.normal(size=100)
  ref = (a / a.std() + b / b.std()) / 2
  np.testing.assert_allclose(trajectory.average([a, b]), ref)
  np.testing.assert_allclose(trajectory.average([1e-5 * a, 3e3 * b]), ref)
  np.testing.assert_allclose(trajectory.average([a]), a / a.std())
  with pytest.raises(ValueError):
    trajectory.average([])


def test_saved_scores_round_trip_and_missing_epochs_are_named(tmp_path):
  s = np.arange(5, dtype=np.float32)
  trajectory.save(str(tmp_path), 3, s)
  trajectory.save(str(tmp_path), 3, 2 * s)  # a resumed run rescoring the epoch overwrites
  found, missing = trajectory.load(str(tmp_path), (1, 3))
  assert missing == [1] and len(found) == 1
  np.testing.assert_array_equal(found[0], 2 * s)
  assert not [p for p in (tmp_path / trajectory.FOLDER).iterdir() if p.suffix == ".tmp"]


def test_the_final_record_averages_the_saved_epochs_and_names_the_missing(tmp_path, caplog):
  import types

  from kdaif_jax import results

  rng = np.random.default_rng(2)
  noisy = np.arange(40) < 10
  saved = {1: rng.normal(size=40), 3: rng.normal(size=40)}
  for e, s in saved.items():
    trajectory.save(str(tmp_path), e, s)
  final = rng.normal(size=40) + 5.0 * noisy  # the flipped examples harmful at the end
  run = types.SimpleNamespace(
    workdir=str(tmp_path),
    cfg=types.SimpleNamespace(student=types.SimpleNamespace(epochs=6)),
    scored=types.SimpleNamespace(noisy=noisy),
  )
  with caplog.at_level("WARNING", logger="kdaif_jax"):
    col, rec = results._trajectory(run, (1, 2, 3), final)
  assert rec["epochs"] == [1, 3, 6] and rec["missing"] == [2]
  assert "epochs [2]" in caplog.text
  np.testing.assert_allclose(col, trajectory.average([saved[1], saved[3], final]), rtol=1e-6)
  assert 0.5 < rec["auroc"] <= 1.0  # high (harmful) scores flag the flipped examples


def test_non_finite_scores_count_as_no_evidence():
  s = np.array([1.0, -1.0, np.nan, 3.0, np.inf])
  z = trajectory.standardised(s)
  assert np.all(np.isfinite(z)) and z[2] == z[4] == 0.0
  np.testing.assert_allclose(z[[0, 1, 3]], s[[0, 1, 3]] / np.std(s[[0, 1, 3]]))
  np.testing.assert_array_equal(trajectory.standardised(np.full(4, np.nan)), 0.0)
  with pytest.raises(ValueError, match="first"):
    trajectory.checkpoint_steps(10, 3, first=2.0)


def test_config_refuses_a_trajectory_without_an_epoch_before_the_last():
  from kdaif_jax import config

  cfg = config.base_config()
  cfg.kdaif.whole_set.trajectory, cfg.student.epochs = 10, 1
  with pytest.raises(ValueError, match=r"kdaif.whole_set.trajectory=10 .* student.epochs < 2"):
    config.validate(cfg)
  cfg.student.epochs = 2
  config.validate(cfg)


def test_checkpoint_steps_and_average_refuse_malformed_input():
  with pytest.raises(ValueError, match="integers"):
    trajectory.checkpoint_steps(10.5, 3)  # would not end at T
  with pytest.raises(ValueError, match="one shape"):
    trajectory.average([np.zeros(4), np.zeros(5)])
