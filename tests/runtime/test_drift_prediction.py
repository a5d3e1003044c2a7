"""The rebuild-error prediction that places anchors and sizes each block's replay margin, and
the tape's pruning of its records to those margins."""
import math

import numpy as np
import pytest
import torch

from gsr_compiler.runtime.choices import ChoiceTape
from gsr_compiler.runtime.drift import (DRIFT_CONSTANT, AnchorPolicy, block_margins,
                                        calibrated_scale, predicted_errors, recording_margins,
                                        unit_roundoff)
from gsr_compiler.runtime.replayed_relu import ReplayedReLU

U = unit_roundoff(torch.float32)


def test_unit_roundoff():
    assert U == 2.0 ** -24 and unit_roundoff(torch.float64) == 2.0 ** -53


def test_prediction_follows_growth_depth_and_anchors():
    # a state that grows 10x in its first block, then stays: block 0 is rebuilt from 10x,
    # 100 blocks away; the last block from the same scale, 1 block away
    rms = [1.0] + [10.0] * 100
    e = predicted_errors(rms, [], U)
    assert e[0] == pytest.approx(max(DRIFT_CONSTANT * U * 10 * math.sqrt(100), U * 100))
    assert e[-1] == pytest.approx(max(DRIFT_CONSTANT * U, U))
    assert np.all(np.diff(e[1:]) <= 0)  # fewer blocks to rebuild across, less error
    # an anchor at block 50 splits the walk: block 0 is rebuilt from block 50
    anchored = predicted_errors(rms, [50], U)
    assert anchored[0] == pytest.approx(max(DRIFT_CONSTANT * U * 10 * math.sqrt(50), U * 100))
    assert np.allclose(anchored[50:], e[50:])
    # aligned growth (a branch without a norm): the quadratic term takes over
    grown = predicted_errors([1.0, 1e3], [], U)
    assert grown[0] == pytest.approx(U * 1e6)


def test_block_margins_are_four_times_the_prediction_within_bounds():
    margins = block_margins(np.array([1e-7, 1e-4, 1.0]), 1e-4, 1e-3)
    assert margins == {0: 1e-4, 1: 4e-4, 2: 2e-3}
    assert block_margins(np.array([1e-7]), None, 1e-3) == {0: 4e-7}


def test_recording_margins_without_a_profile_take_the_largest():
    assert recording_margins(None, 3, U, 1e-4, 1e-3) == [2e-3] * 3
    assert recording_margins([1.0] * 5, 3, U, 1e-4, 1e-3) == [2e-3] * 3  # another depth
    previous = [1.0] + [10.0] * 100
    margins = recording_margins(previous, 100, U, 1e-4, 1e-3)
    # at least what this profile predicts now (twice the growth, to be safe)
    now = block_margins(predicted_errors(previous, [], U), 1e-4, 1e-3)
    assert all(m >= now[i] for i, m in enumerate(margins))
    assert margins[0] > margins[-1]


@pytest.mark.parametrize("setting,expected", [(None, []), (3, [3, 6, 9])])
def test_fixed_anchor_settings(setting, expected):
    xs = [torch.ones(100, 4), torch.ones(100, 4)]
    policy = AnchorPolicy(setting, xs, U, 5e-4)
    kept = [i for i in range(1, 11) if policy.wants(i, xs)]
    assert kept == expected and len(policy.rms) == 11


def test_auto_anchors_where_the_predicted_error_passes_the_limit():
    xs = [torch.ones(100, 4), torch.ones(100, 4)]
    policy = AnchorPolicy("auto", xs, U, 5e-4)
    kept = []
    policy.note_exact(0, False)
    for i in range(1, 40):  # the state doubles every block; every update rounds
        groups = [t * 2 ** i for t in xs]
        if policy.wants(i, groups):
            kept.append(i)
        policy.note_exact(i, False)
    assert kept, "a state growing 2x per block must get anchors"
    # between anchors the predicted error stays under the limit
    errors = predicted_errors(policy.rms + [policy.rms[-1] * 2], kept, U)
    assert errors.max() <= 5e-4 * 2 + 1e-12
    flat = AnchorPolicy("auto", xs, U, 5e-4)
    flat.note_exact(0, False)
    assert not any(flat.wants(i, xs) for i in range(1, 1000))  # no growth, no anchor
    # updates the backward rebuilds exactly (patched) need no anchor, however the state grows
    patched = AnchorPolicy("auto", xs, U, 5e-4)
    for i in range(1, 40):
        patched.note_exact(i - 1, True)
        assert not patched.wants(i, [t * 2 ** i for t in xs])
    assert patched.finish(xs[0] * 2 ** 40).max() == 0.0


def test_calibration_rises_to_the_measured_error_and_never_falls():
    # measured 14x the prediction at block 0: the next forwards predict 14x more
    assert calibrated_scale(1.0, {0: 1.4e-3}, {0: 1e-4}) == pytest.approx(14.0)
    # the prediction it made was already calibrated x3: the new factor is relative to that
    assert calibrated_scale(3.0, {0: 2e-4, 8: 1e-5}, {0: 1e-4, 8: 1e-4}) == pytest.approx(6.0)
    # anchors placed with the calibration made the errors small: the factor stays
    assert calibrated_scale(6.0, {0: 1e-7}, {0: 1e-5}) == 6.0
    # blocks rebuilt exactly (predicted 0) and unmeasurable errors say nothing
    assert calibrated_scale(1.0, {0: 1e-3, 4: math.inf}, {0: 0.0, 4: 1e-4}) == 1.0


def test_a_calibrated_prediction_keeps_more_anchors():
    xs = [torch.ones(100, 4), torch.ones(100, 4)]

    def anchors(scale):
        policy = AnchorPolicy("auto", xs, U, 1e-5, scale)
        kept = []
        for i in range(1, 200):  # slow growth, every update rounds
            policy.note_exact(i - 1, False)
            if policy.wants(i, [t * (1 + i / 50) for t in xs]):
                kept.append(i)
        return kept, policy.finish(xs[0] * 5)

    plain, plain_errors = anchors(1.0)
    scaled, scaled_errors = anchors(14.0)
    assert len(scaled) > len(plain)
    assert scaled_errors.max() <= 1e-5 * 1.5  # what the scaled prediction allows
    np.testing.assert_allclose(predicted_errors([1.0, 2.0, 4.0], [], U, 14.0),
                               14.0 * predicted_errors([1.0, 2.0, 4.0], [], U))
    assert min(recording_margins([1.0] * 11, 10, U, 1e-6, 1e-3, 1e3)) > \
        min(recording_margins([1.0] * 11, 10, U, 1e-6, 1e-3))


def test_tape_keeps_only_the_choices_below_each_blocks_margin():
    tape = ChoiceTape(1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 64, generator=g)
    relu = ReplayedReLU()
    for block in range(2):
        with torch.no_grad(), tape.site(block, 0, replay=False):
            relu(x)
    rms = x.norm(dim=1, keepdim=True) / 8
    below = lambda m: int((x.abs() / rms < m).sum())  # noqa: E731
    tape.keep({0: 1e-2, 1: 1e-3})
    assert tape.stats.recorded == below(1e-2) + below(1e-3)
    assert below(1e-3) < below(1e-2)
    assert tape.block_margins == {0: 1e-2, 1: 1e-3} and tape.short == []
    # a block that needed more than the forward recorded below is reported short
    tape2 = ChoiceTape(1e-2)
    with torch.no_grad(), tape2.site(0, 0, replay=False, margin=1e-4):
        relu(x)
    tape2.keep({0: 1e-3})
    assert tape2.short == [0] and tape2.block_margins == {0: 1e-4}
