"""Family splits and correlation metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from gsr_compiler.circuits import (
    DEEP_ARITHMETIC,
    average_metrics,
    family_of,
    regression_metrics,
    split_by_family,
)
from gsr_compiler.circuits.library import bundled_names


@pytest.mark.parametrize(
    "name, family",
    [("c432g", "c432"), ("c17_assign", "c17"), ("b17_Cg", "b17"), ("b17_C", "b17"),
     ("s27_unrolled_4", "s27"), ("banyan_256", "banyan"), ("mux_4", "mux"), ("div", "div")],
)  # fmt: skip
def test_family_of(name, family):
    assert family_of(name) == family


def test_split_keeps_families_together_and_deep_circuits_in_test():
    split = split_by_family()
    sides = [split.train, split.val, split.test]
    everything = sorted(n for side in sides for n in side)
    assert everything == bundled_names()  # each circuit exactly once
    for k, side in enumerate(sides):
        others = {family_of(n) for j, s in enumerate(sides) if j != k for n in s}
        assert not {family_of(n) for n in side} & others
    assert set(DEEP_ARITHMETIC) <= set(split.test)
    assert split.val and split.train
    assert split.side_of("c432g") == split.side_of("c432")
    assert split.side_of("b17_C") == split.side_of("b17_Cg")


def test_split_is_deterministic_and_seeded():
    assert split_by_family() == split_by_family()
    assert split_by_family(seed=1) != split_by_family(seed=0)
    # adding or removing circuits does not move the others
    names = [n for n in bundled_names() if n != "voter"]
    reduced = split_by_family(names)
    full = split_by_family()
    assert reduced.test == full.test


def test_metrics_match_scipy_and_definitions():
    rng = np.random.default_rng(0)
    t = rng.random(200)
    p = t + 0.3 * rng.standard_normal(200)
    m = regression_metrics(torch.tensor(p), torch.tensor(t))
    assert m.pearson == pytest.approx(np.corrcoef(p, t)[0, 1])
    assert m.spearman == pytest.approx(stats.spearmanr(p, t)[0])
    assert m.kendall == pytest.approx(stats.kendalltau(p, t)[0])
    assert m.r2 == pytest.approx(1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2))
    assert m.mae == pytest.approx(np.abs(p - t).mean())
    assert m.n == 200 and not m.degenerate
    perfect = regression_metrics(t, t)
    got = (perfect.pearson, perfect.kendall, perfect.r2, perfect.mae)
    assert got == pytest.approx((1, 1, 1, 0))


def test_mask_selects_nodes():
    t = np.arange(10.0)
    p = t.copy()
    p[:5] = 100  # garbage outside the mask
    mask = np.arange(10) >= 5
    assert regression_metrics(p, t, mask=mask).pearson == pytest.approx(1.0)
    assert regression_metrics(p, t, mask=mask).n == 5


def test_constant_labels_are_flagged_not_crashing():
    m = regression_metrics([0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    assert m.degenerate and m.reason == "constant labels"
    assert math.isnan(m.pearson) and math.isnan(m.kendall) and math.isnan(m.r2)
    assert m.mae == pytest.approx(0.8)
    # a constant prediction is a bad model, not missing data: correlations 0
    c = regression_metrics([0.5, 0.5, 0.5], [1.0, 2.0, 3.0])
    assert not c.degenerate and c.pearson == 0.0 and c.kendall == 0.0
    with pytest.raises(ValueError):
        regression_metrics([float("nan"), 1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        regression_metrics([1.0], [1.0, 2.0])


def test_average_skips_degenerate_circuits():
    good = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    half = regression_metrics([1.0, 3.0, 2.0], [1.0, 2.0, 3.0])
    flat = regression_metrics([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    avg = average_metrics({"a": good, "b": half, "c": flat})
    assert avg["circuits"] == 2 and avg["degenerate"] == 1
    assert avg["pearson"] == pytest.approx((good.pearson + half.pearson) / 2)
    assert avg["mae"] == pytest.approx((good.mae + half.mae + flat.mae) / 3)
    assert set(good.as_dict()) >= {"pearson", "spearman", "kendall", "r2", "mae", "n", "degenerate"}
