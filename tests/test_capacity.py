"""The throughput bound of a refinement server (server/capacity.py)."""

import pytest

from diffusionx.server.capacity import (
    bound,
    scaling_table,
    share_of_bound,
    step_time,
    step_time_at,
    steps_per_refinement,
)


def test_steps_per_refinement_of_the_load_mix():
    assert steps_per_refinement((0.3, 0.5, 0.7, 0.9), 10) == 6.0  # the k
    assert steps_per_refinement((0.05,), 10) == 1.0  # never zero steps for a strength above 0


def test_bound_and_share():
    assert bound(8, 0.1468, 6) == pytest.approx(9.08, abs=0.01)  # the figures at batch 8
    table = [{"batch": 1, "bound_per_s": 4.0}, {"batch": 8, "bound_per_s": 9.0}, {"batch": 16, "bound_per_s": 11.0}]
    value, share = share_of_bound(4.5, 8, table)
    assert value == 9.0 and share == pytest.approx(0.5)
    assert share_of_bound(4.5, 12, table)[0] == pytest.approx(10.0)  # between measured sizes
    assert share_of_bound(1.0, 40, table)[0] == 11.0  # beyond them: the largest


def test_step_time_at_interpolates_between_measured_batches():
    table = [{"batch": 1, "step_s": 0.02}, {"batch": 8, "step_s": 0.09}]
    assert step_time_at(4.5, table) == pytest.approx(0.055)
    assert step_time_at(0.5, table) == 0.02 and step_time_at(12, table) == 0.09  # clamped to what was measured
    assert step_time_at(3, table[:1]) == 0.02 and step_time_at(3, []) is None


def test_step_time_grows_with_the_batch(untrained_pair):
    unet = untrained_pair.cloud.unet
    rows = scaling_table(unet, [1, 8], latent_shape=(4, 16, 16), text_shape=(77, 128), k=6, repeats=3)
    one, eight = rows
    assert one["step_s"] > 0 and eight["step_s"] > one["step_s"]  # more rows cost more
    assert eight["bound_per_s"] > one["bound_per_s"]  # but less than 8x: batching pays
    assert step_time(unet, 2, latent_shape=(4, 16, 16), text_shape=(77, 128), repeats=1, warmup=0) > 0
